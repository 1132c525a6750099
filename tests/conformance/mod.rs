//! One behaviour suite for every `Store`: `store_conformance!(name, fixture)` makes a module of
//! tests, where `fixture` is an async fn returning `Option<Fixture<S>>` (`None` = skipped).
#![allow(dead_code)]

use std::{
    any::Any,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode};
use tokio::sync::Barrier;
use tower_idempotency::{
    Fingerprint, Reclaim, Record, Store, StoreKey, StoredResponse,
    store::{Claim, ClaimRequest, Token},
};

/// A store under test and whatever must live as long as it (e.g. its `redis-server`).
pub(crate) struct Fixture<S> {
    pub(crate) store: S,
    pub(crate) guard: Box<dyn Any + Send + Sync>,
}

/// Generous bound for anything that should be "prompt" on a loaded 2-core machine.
pub(crate) const PROMPT: Duration = Duration::from_secs(10);

pub(crate) fn random_key() -> StoreKey {
    let (a, b) = uuid::Uuid::new_v4().as_u64_pair();
    let (c, d) = uuid::Uuid::new_v4().as_u64_pair();
    let mut k = [0u8; 32];
    for (i, x) in [a, b, c, d].into_iter().enumerate() {
        k[i * 8..i * 8 + 8].copy_from_slice(&x.to_be_bytes());
    }
    StoreKey(k)
}

pub(crate) fn fp(n: u8) -> Fingerprint {
    Fingerprint([n; 32])
}

pub(crate) fn req(fingerprint: Fingerprint, lease: Duration) -> ClaimRequest {
    ClaimRequest {
        fingerprint,
        lease,
        ttl: Duration::from_secs(60),
        reclaim: Reclaim::AfterLease,
    }
}

const LONG: Duration = Duration::from_secs(60);

/// A record with repeated headers in a set order, a binary body and trailers.
pub(crate) fn rich_record(fingerprint: Fingerprint) -> Record {
    let mut headers = HeaderMap::new();
    headers.append("set-thing", HeaderValue::from_static("first"));
    headers.append("content-type", HeaderValue::from_static("application/json"));
    headers.append("set-thing", HeaderValue::from_static("second"));
    headers.append("set-thing", HeaderValue::from_static("third"));
    let mut trailers = HeaderMap::new();
    trailers.append("x-digest", HeaderValue::from_static("sha-256=abc"));
    trailers.append("x-digest", HeaderValue::from_static("sha-512=def"));
    let body: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    Record {
        fingerprint,
        response: Some(StoredResponse {
            status: StatusCode::CREATED,
            headers: headers.into(),
            body: Bytes::from(body),
            trailers: Some(trailers.into()),
        }),
    }
}

pub(crate) async fn acquire<S: Store>(store: &S, key: StoreKey, r: ClaimRequest) -> Token {
    match store.claim(key, r).await.expect("claim") {
        Claim::Acquired { token } => token,
        other => panic!("expected Acquired, got {other:?}"),
    }
}

/// Claims until `pred` accepts the answer, or panics after `PROMPT`.
pub(crate) async fn claim_until<S: Store>(
    store: &S,
    key: StoreKey,
    r: ClaimRequest,
    what: &str,
    pred: impl Fn(&Claim) -> bool,
) -> Claim {
    let deadline = Instant::now() + PROMPT;
    loop {
        let c = store.claim(key, r).await.expect("claim");
        if pred(&c) {
            return c;
        }
        assert!(Instant::now() < deadline, "{what}: still {c:?}");
        tokio::time::sleep(Duration::from_millis(20)).await; // polling with a deadline
    }
}

pub(crate) async fn claim_fresh_key_acquires<S: Store>(store: &S) {
    let key = random_key();
    let t = acquire(store, key, req(fp(1), LONG)).await;
    let other = acquire(store, random_key(), req(fp(1), LONG)).await;
    assert_ne!(t, other, "tokens of different claims differ");
}

pub(crate) async fn second_claim_sees_in_flight_with_its_fingerprint<S: Store>(store: &S) {
    let key = random_key();
    acquire(store, key, req(fp(1), LONG)).await;
    for f in [fp(1), fp(2)] {
        match store.claim(key, req(f, LONG)).await.expect("claim") {
            Claim::InFlight { fingerprint } => assert_eq!(fingerprint, fp(1)),
            other => panic!("expected InFlight, got {other:?}"),
        }
    }
}

pub(crate) async fn complete_then_claim_replays_identical_record<S: Store>(store: &S) {
    let key = random_key();
    let t = acquire(store, key, req(fp(3), LONG)).await;
    let record = rich_record(fp(3));
    assert!(
        store
            .complete(key, t, Arc::new(record.clone()), LONG)
            .await
            .expect("complete")
    );
    for _ in 0..2 {
        match store.claim(key, req(fp(3), LONG)).await.expect("claim") {
            Claim::Completed(got) => {
                assert_eq!(*got, record);
                let r = got.response.as_ref().expect("response");
                let order: Vec<_> = r.headers.get_all("set-thing").collect();
                assert_eq!(order, ["first", "second", "third"]);
                let t: Vec<_> = r
                    .trailers
                    .as_ref()
                    .expect("trailers")
                    .get_all("x-digest")
                    .collect();
                assert_eq!(t, ["sha-256=abc", "sha-512=def"]);
            }
            other => panic!("expected Completed, got {other:?}"),
        }
    }
    // A completed-but-not-replayable record keeps its fingerprint.
    let key = random_key();
    let t = acquire(store, key, req(fp(4), LONG)).await;
    let bare = Record {
        fingerprint: fp(4),
        response: None,
    };
    assert!(
        store
            .complete(key, t, Arc::new(bare.clone()), LONG)
            .await
            .unwrap()
    );
    match store.claim(key, req(fp(9), LONG)).await.expect("claim") {
        Claim::Completed(got) => assert_eq!(*got, bare),
        other => panic!("expected Completed, got {other:?}"),
    }
}

pub(crate) async fn stale_token_is_fenced_off<S: Store>(store: &S) {
    let key = random_key();
    let t = acquire(store, key, req(fp(1), LONG)).await;
    let stale = Token(t.0.wrapping_add(1));
    let rec = Arc::new(rich_record(fp(1)));
    assert!(!store.complete(key, stale, rec.clone(), LONG).await.unwrap());
    assert!(!store.release(key, stale).await.unwrap());
    assert!(!store.extend(key, stale, LONG).await.unwrap());
    assert!(matches!(
        store.claim(key, req(fp(1), LONG)).await.unwrap(),
        Claim::InFlight { .. }
    ));
    // The holder still can; afterwards nobody can.
    assert!(store.extend(key, t, LONG).await.unwrap());
    assert!(store.complete(key, t, rec.clone(), LONG).await.unwrap());
    assert!(!store.complete(key, t, rec, LONG).await.unwrap());
    assert!(!store.release(key, t).await.unwrap());
    assert!(!store.extend(key, t, LONG).await.unwrap());
    // Unknown key.
    assert!(!store.release(random_key(), t).await.unwrap());
}

pub(crate) async fn expired_lease_is_reclaimed_with_a_new_token<S: Store>(store: &S) {
    let key = random_key();
    let lease = Duration::from_millis(300);
    let old = acquire(store, key, req(fp(1), lease)).await;
    let c = claim_until(store, key, req(fp(1), LONG), "reclaim", |c| {
        matches!(c, Claim::Acquired { .. })
    })
    .await;
    let Claim::Acquired { token: new } = c else {
        unreachable!()
    };
    assert_ne!(new, old);
    // The crashed holder's late steps are refused; the new holder's are not.
    let rec = Arc::new(rich_record(fp(1)));
    assert!(!store.complete(key, old, rec.clone(), LONG).await.unwrap());
    assert!(!store.extend(key, old, LONG).await.unwrap());
    assert!(!store.release(key, old).await.unwrap());
    assert!(store.complete(key, new, rec.clone(), LONG).await.unwrap());
    assert!(matches!(
        store.claim(key, req(fp(1), LONG)).await.unwrap(),
        Claim::Completed(r) if *r == *rec
    ));
}

pub(crate) async fn reclaim_never_reports_abandoned<S: Store>(store: &S) {
    let key = random_key();
    let mut r = req(fp(5), Duration::from_millis(300));
    r.reclaim = Reclaim::Never;
    let old = acquire(store, key, r).await;
    let c = claim_until(store, key, r, "abandon", |c| {
        !matches!(c, Claim::InFlight { .. })
    })
    .await;
    match c {
        Claim::Abandoned { fingerprint } => assert_eq!(fingerprint, fp(5)),
        other => panic!("expected Abandoned, got {other:?}"),
    }
    // It stays abandoned, and the old holder cannot complete any more.
    assert!(matches!(
        store.claim(key, r).await.unwrap(),
        Claim::Abandoned { .. }
    ));
    let rec = Arc::new(rich_record(fp(5)));
    assert!(!store.complete(key, old, rec, LONG).await.unwrap());
}

pub(crate) async fn release_frees_the_key<S: Store>(store: &S) {
    let key = random_key();
    let t = acquire(store, key, req(fp(1), LONG)).await;
    assert!(store.release(key, t).await.unwrap());
    let t2 = acquire(store, key, req(fp(2), LONG)).await;
    assert_ne!(t, t2);
}

pub(crate) async fn record_expires_after_its_ttl<S: Store>(store: &S) {
    let key = random_key();
    let t = acquire(store, key, req(fp(1), LONG)).await;
    let rec = Arc::new(rich_record(fp(1)));
    assert!(
        store
            .complete(key, t, rec, Duration::from_millis(300))
            .await
            .unwrap()
    );
    // Still within the TTL: replayed. (An `Acquired` here would hold the key for `LONG`, and
    // the expiry below could not be seen.)
    assert!(matches!(
        store.claim(key, req(fp(1), LONG)).await.unwrap(),
        Claim::Completed(_)
    ));
    claim_until(store, key, req(fp(1), LONG), "ttl expiry", |c| {
        matches!(c, Claim::Acquired { .. })
    })
    .await;
}

pub(crate) async fn extend_keeps_the_claim_past_its_first_lease<S: Store>(store: &S) {
    let key = random_key();
    let lease = Duration::from_millis(1500);
    let t = acquire(store, key, req(fp(1), lease)).await;
    let start = Instant::now();
    // Renew every 300 ms for three leases; the claim must never be lost.
    while start.elapsed() < lease * 3 {
        tokio::time::sleep(Duration::from_millis(300)).await; // the passage of time is the subject
        assert!(store.extend(key, t, lease).await.unwrap(), "lease lost");
        assert!(matches!(
            store.claim(key, req(fp(1), lease)).await.unwrap(),
            Claim::InFlight { .. }
        ));
    }
}

async fn wakes_on<S: Store + Clone>(store: &S, complete: bool) {
    let key = random_key();
    let t = acquire(store, key, req(fp(1), LONG)).await;
    let s = store.clone();
    let waiter = tokio::spawn(async move {
        let start = Instant::now();
        s.wait(key, Duration::from_secs(50)).await.expect("wait");
        start.elapsed()
    });
    // Let the waiter get into its wait: subscribed, first read done. A single yield did not
    // ensure that, and a waiter that starts after the outcome sees it on its first read, so a
    // broken wake-up would have passed. (Loopback Redis takes about a millisecond for it.)
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !waiter.is_finished(),
        "the waiter returned while the key was held"
    );
    if complete {
        let rec = Arc::new(rich_record(fp(1)));
        assert!(store.complete(key, t, rec, LONG).await.unwrap());
    } else {
        assert!(store.release(key, t).await.unwrap());
    }
    let woke = tokio::time::timeout(PROMPT, waiter)
        .await
        .expect("waiter did not wake")
        .expect("waiter task");
    assert!(woke < PROMPT, "woke after {woke:?}");
}

pub(crate) async fn wait_wakes_on_complete<S: Store + Clone>(store: &S) {
    wakes_on(store, true).await;
}

pub(crate) async fn wait_wakes_on_release<S: Store + Clone>(store: &S) {
    wakes_on(store, false).await;
}

pub(crate) async fn wait_returns_at_its_timeout<S: Store>(store: &S) {
    let key = random_key();
    acquire(store, key, req(fp(1), LONG)).await;
    let start = Instant::now();
    let timeout = Duration::from_millis(600);
    tokio::time::timeout(PROMPT, store.wait(key, timeout))
        .await
        .expect("wait hung past its timeout")
        .expect("wait");
    let took = start.elapsed();
    assert!(
        took >= timeout - Duration::from_millis(50),
        "returned early: {took:?}"
    );
    // Still held: nothing happened.
    assert!(matches!(
        store.claim(key, req(fp(1), LONG)).await.unwrap(),
        Claim::InFlight { .. }
    ));
}

pub(crate) async fn concurrent_claims_acquire_exactly_once<S: Store + Clone>(store: &S) {
    const TASKS: usize = 200;
    let key = random_key();
    let barrier = Arc::new(Barrier::new(TASKS));
    let tasks: Vec<_> = (0..TASKS)
        .map(|_| {
            let s = store.clone();
            let b = barrier.clone();
            tokio::spawn(async move {
                b.wait().await;
                s.claim(key, req(fp(1), LONG)).await.expect("claim")
            })
        })
        .collect();
    let mut acquired = 0;
    for t in tasks {
        match t.await.expect("task") {
            Claim::Acquired { .. } => acquired += 1,
            Claim::InFlight { fingerprint } => assert_eq!(fingerprint, fp(1)),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(acquired, 1);
}

/// Instantiates the suite for one store: `store_conformance!(module_name, fixture_fn);`
#[macro_export]
macro_rules! store_conformance {
    ($name:ident, $fixture:path) => {
        mod $name {
            $crate::store_conformance!(@tests $fixture;
                claim_fresh_key_acquires,
                second_claim_sees_in_flight_with_its_fingerprint,
                complete_then_claim_replays_identical_record,
                stale_token_is_fenced_off,
                expired_lease_is_reclaimed_with_a_new_token,
                reclaim_never_reports_abandoned,
                release_frees_the_key,
                record_expires_after_its_ttl,
                extend_keeps_the_claim_past_its_first_lease,
                wait_wakes_on_complete,
                wait_wakes_on_release,
                wait_returns_at_its_timeout,
                concurrent_claims_acquire_exactly_once,
            );
        }
    };
    (@tests $fixture:path; $($check:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() {
                let Some(fixture) = $fixture().await else { return };
                $crate::conformance::$check(&fixture.store).await;
                drop(fixture);
            }
        )*
    };
}

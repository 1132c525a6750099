//! Records live for their TTL (client keys and derived keys apart), and `MemoryStore` stays
//! within its entry and byte bounds whatever the traffic.

use std::{
    convert::Infallible,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use tower::{Service, ServiceBuilder, ServiceExt, service_fn};
use tower_idempotency::{
    Fingerprint, IdempotencyLayer, MemoryStore, Reclaim, Record, Store, StoreError, StoreKey,
    StoredResponse,
    store::{Claim, ClaimRequest},
};

fn counted_service(
    layer: IdempotencyLayer<MemoryStore>,
) -> (
    Arc<AtomicUsize>,
    impl Service<Request<Full<Bytes>>, Response = Response<impl http_body::Body>, Error = Infallible>
    + Clone,
) {
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let svc =
        ServiceBuilder::new()
            .layer(layer)
            .service(service_fn(move |_req| {
                let n = r.fetch_add(1, Ordering::SeqCst) + 1;
                async move {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(format!("run {n}")))))
                }
            }));
    (runs, svc)
}

fn post(key: Option<&str>) -> Request<Full<Bytes>> {
    let mut b = Request::post("/pay");
    if let Some(k) = key {
        b = b.header("idempotency-key", k);
    }
    b.body(Full::new(Bytes::from_static(b"amount=1"))).unwrap()
}

async fn replayed<S>(svc: &S, req: Request<Full<Bytes>>) -> bool
where
    S: Service<Request<Full<Bytes>>, Error = Infallible> + Clone,
    S::Response: HasHeaders,
{
    let res = svc.clone().oneshot(req).await.unwrap();
    res.is_replay()
}

trait HasHeaders {
    fn is_replay(&self) -> bool;
}

impl<B> HasHeaders for Response<B> {
    fn is_replay(&self) -> bool {
        self.headers().contains_key("idempotent-replayed")
    }
}

#[tokio::test(start_paused = true)]
async fn records_replay_before_ttl_and_not_after() {
    let layer = IdempotencyLayer::new(MemoryStore::new())
        .client_key_ttl(Duration::from_secs(3600))
        .derived_key_ttl(Duration::from_secs(60));
    let (runs, svc) = counted_service(layer);

    assert!(!replayed(&svc, post(Some("k"))).await);
    assert!(!replayed(&svc, post(None)).await);
    tokio::time::advance(Duration::from_secs(59)).await;
    assert!(replayed(&svc, post(Some("k"))).await);
    assert!(
        replayed(&svc, post(None)).await,
        "derived key inside its 60 s"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 2);

    tokio::time::advance(Duration::from_secs(2)).await;
    assert!(
        !replayed(&svc, post(None)).await,
        "derived key expired after 60 s"
    );
    assert!(
        replayed(&svc, post(Some("k"))).await,
        "client key still inside 1 h"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 3);

    tokio::time::advance(Duration::from_secs(3600)).await;
    assert!(
        !replayed(&svc, post(Some("k"))).await,
        "client key expired after 1 h"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 4);
}

#[test]
fn default_ttls_are_24h_and_60s() {
    assert_eq!(
        IdempotencyLayer::<MemoryStore>::DEFAULT_CLIENT_KEY_TTL,
        Duration::from_secs(86_400)
    );
    assert_eq!(
        IdempotencyLayer::<MemoryStore>::DEFAULT_DERIVED_KEY_TTL,
        Duration::from_secs(60)
    );
}

fn key(i: u64) -> StoreKey {
    let mut k = [0u8; 32];
    k[..8].copy_from_slice(&i.to_be_bytes());
    StoreKey(k)
}

fn claim_req(i: u64) -> ClaimRequest {
    ClaimRequest {
        fingerprint: Fingerprint(key(i).0),
        lease: Duration::from_secs(10),
        ttl: Duration::from_secs(3600),
        reclaim: Reclaim::AfterLease,
    }
}

fn record(i: u64, body: usize) -> Arc<Record> {
    Arc::new(Record {
        fingerprint: Fingerprint(key(i).0),
        response: Some(StoredResponse {
            status: StatusCode::OK,
            headers: Default::default(),
            body: Bytes::from(vec![b'x'; body]),
            trailers: None,
        }),
    })
}

async fn claim_and_complete(store: &MemoryStore, i: u64, body: usize) -> Result<(), StoreError> {
    match store.claim(key(i), claim_req(i)).await? {
        Claim::Acquired { token } => {
            assert!(
                store
                    .complete(key(i), token, record(i, body), Duration::from_secs(3600))
                    .await?
            );
            Ok(())
        }
        other => panic!("fresh key {i} not acquired: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_unique_keys_never_exceed_the_entry_bound() {
    const CAP: usize = 10_000;
    const KEYS: u64 = 1_000_000;
    const TASKS: u64 = 4;
    let store = MemoryStore::new().max_entries(CAP);
    let max_seen = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..TASKS)
        .map(|t| {
            let store = store.clone();
            let max_seen = max_seen.clone();
            tokio::spawn(async move {
                for i in (t..KEYS).step_by(TASKS as usize) {
                    claim_and_complete(&store, i, 16).await.unwrap();
                    max_seen.fetch_max(store.len(), Ordering::Relaxed);
                    if i % 64 == t {
                        // Store calls never wait; yield so the tasks really interleave.
                        tokio::task::yield_now().await;
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let max_seen = max_seen.load(Ordering::Relaxed);
    assert!(max_seen <= CAP, "held {max_seen} entries, bound {CAP}");
    assert_eq!(store.len(), CAP, "full, but not over");
    // The newest record survives; the oldest went first.
    claim_and_complete(&store, KEYS, 16).await.unwrap();
    assert!(matches!(
        store.claim(key(KEYS), claim_req(KEYS)).await.unwrap(),
        Claim::Completed(_)
    ));
    assert!(matches!(
        store.claim(key(0), claim_req(0)).await.unwrap(),
        Claim::Acquired { .. }
    ));
}

#[tokio::test]
async fn the_byte_bound_holds() {
    const MAX_BYTES: usize = 1 << 20;
    let store = MemoryStore::new().max_bytes(MAX_BYTES);
    let mut max_seen = 0;
    for i in 0..5_000u64 {
        claim_and_complete(&store, i, 10 * 1024).await.unwrap();
        max_seen = max_seen.max(store.bytes());
    }
    assert!(
        max_seen <= MAX_BYTES,
        "held {max_seen} bytes, bound {MAX_BYTES}"
    );
    assert!(
        store.len() < 110,
        "about 100 records of 10 KiB fit: {}",
        store.len()
    );
    assert!(store.len() > 80, "{}", store.len());
}

#[tokio::test]
async fn a_record_larger_than_the_byte_bound_is_kept_as_not_replayable() {
    let store = MemoryStore::new().max_bytes(4096);
    claim_and_complete(&store, 1, 8192).await.unwrap();
    match store.claim(key(1), claim_req(1)).await.unwrap() {
        Claim::Completed(r) => assert!(r.response.is_none(), "kept without its response"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn in_flight_claims_are_never_evicted() {
    const CAP: usize = 100;
    let store = MemoryStore::new().max_entries(CAP);
    let mut tokens = Vec::new();
    for i in 0..CAP as u64 {
        match store.claim(key(i), claim_req(i)).await.unwrap() {
            Claim::Acquired { token } => tokens.push(token),
            other => panic!("{other:?}"),
        }
    }
    // Full of in-flight claims: a new key is refused rather than evicting one.
    assert!(matches!(
        store.claim(key(1000), claim_req(1000)).await,
        Err(StoreError::Capacity)
    ));
    // One completes; a new key now evicts that completed record, never a claim.
    assert!(
        store
            .complete(key(0), tokens[0], record(0, 10), Duration::from_secs(60))
            .await
            .unwrap()
    );
    assert!(matches!(
        store.claim(key(1000), claim_req(1000)).await.unwrap(),
        Claim::Acquired { .. }
    ));
    for i in 1..CAP as u64 {
        assert!(
            matches!(
                store.claim(key(i), claim_req(i)).await.unwrap(),
                Claim::InFlight { .. }
            ),
            "claim {i} survived"
        );
    }
    assert_eq!(store.len(), CAP);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_through_the_layer_stays_within_the_bound() {
    let store = MemoryStore::new().max_entries(1_000);
    let (runs, svc) = counted_service(IdempotencyLayer::new(store.clone()));
    for i in 0..5_000 {
        let res = svc
            .clone()
            .oneshot(post(Some(&format!("k{i}"))))
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert!(store.len() <= 1_000);
    }
    assert_eq!(runs.load(Ordering::SeqCst), 5_000);
    assert_eq!(store.len(), 1_000);
}

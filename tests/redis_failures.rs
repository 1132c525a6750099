//! What happens when things go wrong around `RedisStore`: a crashed leader, Redis killed under
//! load and restarted, a malformed value under one of our keys.
#![cfg(feature = "redis")]

#[path = "support/redis_app.rs"]
mod redis_app;
#[path = "support/redis_server.rs"]
mod redis_server;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{Router, body::Body, http::Request};
use redis_app::{Counter, eventually, pay_router};
use redis_server::RedisServer;
use tower::ServiceExt;
use tower_idempotency::{
    FailureMode, IdempotencyLayer, RedisStore, Store, StoreError, StoreKey,
    redis::{self, AsyncCommands},
    store::{ClaimRequest, Token},
};

fn pay(key: &str) -> Request<Body> {
    Request::post("/pay")
        .header("idempotency-key", key)
        .body(Body::from("amount=4200"))
        .expect("request")
}

struct Answer {
    status: u16,
    retry_after: bool,
    charge: String,
    body: String,
}

async fn send(app: &Router, req: Request<Body>) -> Answer {
    let res = app.clone().oneshot(req).await.expect("infallible");
    let status = res.status().as_u16();
    let retry_after = res.headers().contains_key("retry-after");
    let charge = res
        .headers()
        .get("x-charge-id")
        .map(|v| v.to_str().unwrap_or("?").to_owned())
        .unwrap_or_default();
    let bytes = axum::body::to_bytes(res.into_body(), usize::MAX)
        .await
        .expect("body");
    Answer {
        status,
        retry_after,
        charge,
        body: String::from_utf8_lossy(&bytes).into_owned(),
    }
}

/// The one Redis key under `prefix`, as the store key it names.
async fn only_key(
    conn: &mut redis::aio::MultiplexedConnection,
    prefix: &str,
) -> (String, StoreKey) {
    let keys: Vec<String> = conn.keys(format!("{prefix}*")).await.expect("KEYS");
    assert_eq!(keys.len(), 1, "keys: {keys:?}");
    let name = keys[0].clone();
    let hex = name
        .strip_prefix(prefix)
        .and_then(|s| s.strip_prefix('{'))
        .and_then(|s| s.strip_suffix('}'))
        .expect("prefix{hex}");
    let mut k = [0u8; 32];
    for (i, b) in k.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("hex");
    }
    (name, StoreKey(k))
}

/// Must show 2: a leader that crashes with the claim held (its whole runtime dies: no release,
/// no heartbeat) blocks duplicates only until its lease expires; then one duplicate reclaims and
/// runs, the others get its response; the crashed leader's late `complete` is fenced off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashed_leader_blocks_until_lease_expiry_then_one_reclaims() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let lease = Duration::from_millis(1500);
    let prefix = "crash:";
    let crashed = Counter::default();
    let survivor = Counter::default();

    // Instance A, in a runtime of its own, so that it can die the way a process does.
    let url = server.url();
    let a_counter = crashed.clone();
    let a_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let a_app_task = a_runtime.spawn(async move {
        let store = RedisStore::connect(url)
            .await
            .expect("connect")
            .prefix(prefix);
        let app = pay_router(a_counter, Duration::from_secs(3600))
            .layer(IdempotencyLayer::new(store).lease(lease));
        send(&app, pay("order-7")).await.status
    });
    crashed.started().await;
    let claimed_at = Instant::now();
    a_runtime.shutdown_background(); // the crash
    drop(a_app_task);

    let client = redis::Client::open(server.url()).expect("client");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let (name, key) = only_key(&mut conn, prefix).await;
    let old: u64 = conn
        .hget(&name, "t")
        .await
        .expect("token of the crashed claim");

    // Instance B: duplicates keep coming.
    let store = RedisStore::connect(server.url())
        .await
        .expect("connect")
        .prefix(prefix);
    let app = pay_router(survivor.clone(), Duration::ZERO)
        .layer(IdempotencyLayer::new(store.clone()).lease(lease));
    let dups: Vec<_> = (0..50)
        .map(|_| {
            let app = app.clone();
            tokio::spawn(async move {
                let a = send(&app, pay("order-7")).await;
                (a, Instant::now())
            })
        })
        .collect();
    let mut charges = Vec::new();
    for d in dups {
        let (a, at) = d.await.expect("duplicate");
        assert_eq!(a.status, 201, "{}", a.body);
        assert!(
            at >= claimed_at + lease - Duration::from_millis(500),
            "a duplicate was answered before the crashed claim's lease expired"
        );
        charges.push(a.charge);
    }
    charges.dedup();
    assert_eq!(charges.len(), 1, "one response for every duplicate");
    assert_eq!(
        survivor.runs(),
        1,
        "exactly one duplicate reclaimed and ran"
    );
    assert_eq!(crashed.runs(), 1);

    // The crashed leader comes back late: fencing refuses it, the record stays the survivor's.
    let late = Arc::new(tower_idempotency::Record {
        fingerprint: tower_idempotency::Fingerprint([0; 32]),
        response: None,
    });
    let ttl = Duration::from_secs(60);
    assert!(!store.complete(key, Token(old), late, ttl).await.unwrap());
    assert!(!store.release(key, Token(old)).await.unwrap());
    assert!(!store.extend(key, Token(old), lease).await.unwrap());
    let after = send(&app, pay("order-7")).await;
    assert_eq!(after.charge, charges[0]);
    assert_eq!(survivor.runs(), 1);
}

/// Must show 4: Redis killed under load. Fail-closed answers 503 + Retry-After within the
/// store timeout; fail-open passes through; nothing panics or hangs; after Redis restarts on
/// the same port, the same service instances work again within 2 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_under_load_then_restarted() {
    let Some(mut server) = RedisServer::start() else {
        return;
    };
    let timeout = Duration::from_millis(500);
    let make = |mode: FailureMode, counter: Counter| {
        let url = server.url();
        async move {
            let client = redis::Client::open(url).expect("client");
            let store = RedisStore::connect_with(client, timeout)
                .await
                .expect("connect")
                .prefix("load:");
            pay_router(counter, Duration::ZERO).layer(
                IdempotencyLayer::new(store)
                    .failure_mode(mode)
                    .store_timeout(timeout),
            )
        }
    };
    let closed_runs = Counter::default();
    let open_runs = Counter::default();
    let closed = make(FailureMode::Closed, closed_runs.clone()).await;
    let open = make(FailureMode::Open, open_runs.clone()).await;

    // Load: workers send unique keys to both services until told to stop, recording what
    // they got after the kill.
    let killed = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let bound = timeout + Duration::from_secs(1); // the timeout, plus scheduling slack
    let workers: Vec<_> = (0..8)
        .map(|w| {
            let app = if w % 2 == 0 {
                closed.clone()
            } else {
                open.clone()
            };
            let (killed, stop) = (killed.clone(), stop.clone());
            tokio::spawn(async move {
                let mut after_kill = Vec::new();
                let mut i = 0;
                while !stop.load(Ordering::SeqCst) {
                    i += 1;
                    let was_killed = killed.load(Ordering::SeqCst);
                    let start = Instant::now();
                    let a = tokio::time::timeout(
                        Duration::from_secs(30),
                        send(&app, pay(&format!("w{w}-{i}"))),
                    )
                    .await
                    .expect("request hung");
                    if was_killed {
                        after_kill.push((a.status, a.retry_after, start.elapsed()));
                    }
                    tokio::task::yield_now().await;
                }
                (w % 2 == 0, after_kill)
            })
        })
        .collect();
    eventually("load before the kill", Duration::from_secs(30), || async {
        (closed_runs.runs() > 20 && open_runs.runs() > 20).then_some(())
    })
    .await;

    let port = server.port();
    server = tokio::task::spawn_blocking({
        let killed = killed.clone();
        move || {
            server.kill();
            killed.store(true, Ordering::SeqCst);
            server
        }
    })
    .await
    .expect("kill");

    // Wait for answers during the outage, then stop the load.
    let open_before = open_runs.runs();
    eventually(
        "answers during the outage",
        Duration::from_secs(30),
        || async { (open_runs.runs() > open_before + 20).then_some(()) },
    )
    .await;
    let closed_503 = send(&closed, pay("outage-probe")).await;
    assert_eq!(closed_503.status, 503, "{}", closed_503.body);
    assert!(closed_503.retry_after);
    assert!(closed_503.body.contains("store-unavailable"));
    stop.store(true, Ordering::SeqCst);
    let mut closed_seen = 0;
    for w in workers {
        let (is_closed, after) = w.await.expect("worker panicked");
        for (status, retry_after, took) in after {
            assert!(took <= bound, "answered after {took:?} (bound {bound:?})");
            if is_closed {
                // Recorded only for requests that started after the server process was gone
                // (killed and reaped): none of them can have claimed, so none may run.
                assert_eq!(status, 503, "fail-closed answered {status} with Redis down");
                assert!(retry_after);
                closed_seen += 1;
            } else {
                assert_eq!(status, 201, "fail-open must pass through");
            }
        }
    }
    assert!(closed_seen > 0, "no 503 seen during the outage");

    // Restart on the same port; the same service instances recover by themselves.
    let server = tokio::task::spawn_blocking(move || {
        server.restart();
        server
    })
    .await
    .expect("restart");
    assert_eq!(server.port(), port);
    let restarted = Instant::now();
    let mut n = 0;
    eventually("recovery after restart", Duration::from_secs(10), || {
        n += 1;
        let closed = closed.clone();
        async move { (send(&closed, pay(&format!("after-{n}"))).await.status == 201).then_some(()) }
    })
    .await;
    let recovered = restarted.elapsed();
    assert!(
        recovered < Duration::from_secs(2),
        "recovered only after {recovered:?}"
    );
    // And protection is back: a duplicate replays.
    let runs = closed_runs.runs();
    let a = send(&closed, pay("after-check")).await;
    let b = send(&closed, pay("after-check")).await;
    assert_eq!((a.status, b.status), (201, 201));
    assert_eq!(a.charge, b.charge);
    assert_eq!(closed_runs.runs(), runs + 1);
    eprintln!("recovered {recovered:?} after the restart");
}

/// Must show 5: a malformed value under one of our keys is a store error (503 when failing
/// closed), never a panic, never replayed as garbage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_value_is_a_store_error() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let prefix = "bad:";
    let store = RedisStore::connect(server.url())
        .await
        .expect("connect")
        .prefix(prefix);
    let counter = Counter::default();
    let app =
        pay_router(counter.clone(), Duration::ZERO).layer(IdempotencyLayer::new(store.clone()));
    assert_eq!(send(&app, pay("k-1")).await.status, 201);

    let client = redis::Client::open(server.url()).expect("client");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let (name, key) = only_key(&mut conn, prefix).await;
    // The leader's client is answered before the record is written: wait for the write.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let record: Option<Vec<u8>> = conn.hget(&name, "r").await.expect("HGET");
        if record.is_some() {
            break;
        }
        assert!(Instant::now() < deadline, "the record was never written");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let req = ClaimRequest {
        fingerprint: tower_idempotency::Fingerprint([1; 32]),
        lease: Duration::from_secs(10),
        ttl: Duration::from_secs(60),
        reclaim: tower_idempotency::Reclaim::AfterLease,
    };

    let mut truncated: Vec<u8> = conn.hget(&name, "r").await.expect("record");
    truncated.truncate(truncated.len() / 2);
    let mut future_version: Vec<u8> = conn.hget(&name, "r").await.expect("record");
    future_version[2] = 99;
    type Corruption = Box<dyn Fn(&str) -> redis::Cmd>;
    let corruptions: Vec<(&str, Corruption)> = vec![
        (
            "a plain string",
            Box::new(|k| redis::cmd("SET").arg(k).arg("garbage").clone()),
        ),
        (
            "a list",
            Box::new(|k| redis::cmd("RPUSH").arg(k).arg("x").clone()),
        ),
        (
            "random record bytes",
            Box::new(|k| {
                redis::cmd("HSET")
                    .arg(k)
                    .arg(&["v", "1", "s", "c", "r", "\u{1}\u{2}garbage"])
                    .clone()
            }),
        ),
        (
            "a truncated record",
            Box::new(move |k| {
                redis::cmd("HSET")
                    .arg(k)
                    .arg("v")
                    .arg("1")
                    .arg("s")
                    .arg("c")
                    .arg("r")
                    .arg(truncated.clone())
                    .clone()
            }),
        ),
        (
            "a record of a future version",
            Box::new(move |k| {
                redis::cmd("HSET")
                    .arg(k)
                    .arg("v")
                    .arg("1")
                    .arg("s")
                    .arg("c")
                    .arg("r")
                    .arg(future_version.clone())
                    .clone()
            }),
        ),
        (
            "an unknown layout",
            Box::new(|k| redis::cmd("HSET").arg(k).arg(&["v", "7", "s", "c"]).clone()),
        ),
        (
            "an unknown state",
            Box::new(|k| {
                redis::cmd("HSET")
                    .arg(k)
                    .arg(&["v", "1", "s", "zz"])
                    .clone()
            }),
        ),
    ];
    for (what, corrupt) in corruptions {
        let _: () = redis::cmd("DEL")
            .arg(&name)
            .query_async(&mut conn)
            .await
            .expect("DEL");
        let _: () = corrupt(&name).query_async(&mut conn).await.expect("write");
        let direct = store.claim(key, req).await;
        assert!(
            matches!(direct, Err(StoreError::Corrupt(_))),
            "{what}: claim gave {direct:?}"
        );
        let a = send(&app, pay("k-1")).await;
        assert_eq!(a.status, 503, "{what}: {}", a.body);
        assert!(a.retry_after);
        assert!(!a.body.contains("garbage"));
        // Fenced steps refuse to touch a foreign value.
        let t = Token(1);
        let released = store.release(key, t).await;
        assert!(!matches!(released, Ok(true)), "{what}: {released:?}");
    }
    assert_eq!(
        counter.runs(),
        1,
        "a corrupt record never runs the handler again"
    );
}

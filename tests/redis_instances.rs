//! Several instances sharing one Redis behave as one: one execution per logical request.
#![cfg(feature = "redis")]

#[path = "support/redis_app.rs"]
mod redis_app;
#[path = "support/redis_server.rs"]
mod redis_server;

use std::{collections::HashSet, sync::Arc, time::Duration};

use redis_app::{Counter, Instance, pay_router, serve};
use redis_server::RedisServer;
use tokio::sync::Barrier;
use tower_idempotency::{IdempotencyLayer, RedisStore};

async fn instances(
    server: &RedisServer,
    n: usize,
    counter: &Counter,
    work: Duration,
    lease: Option<Duration>,
) -> Vec<Instance> {
    let mut out = Vec::new();
    for _ in 0..n {
        // A connection (and a layer) of its own per instance, as separate processes would have.
        let store = RedisStore::connect(server.url())
            .await
            .expect("connect")
            .prefix("shop:");
        let mut layer = IdempotencyLayer::new(store);
        if let Some(l) = lease {
            layer = layer.lease(l);
        }
        out.push(serve(pay_router(counter.clone(), work).layer(layer)).await);
    }
    out
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(512)
        .timeout(Duration::from_secs(120))
        .build()
        .expect("client")
}

#[derive(Debug, PartialEq, Eq, Hash, Clone)]
struct Seen {
    status: u16,
    charge: String,
    steps: Vec<String>,
    body: String,
}

async fn post(client: &reqwest::Client, url: &str, key: &str) -> (Seen, bool) {
    let res = client
        .post(url)
        .header("idempotency-key", key)
        .body("amount=4200")
        .send()
        .await
        .expect("request");
    let header = |name: &str| -> Vec<String> {
        res.headers()
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap_or("?").to_owned())
            .collect()
    };
    let replayed = header("idempotent-replayed") == ["true"];
    let status = res.status().as_u16();
    let charge = header("x-charge-id").concat();
    let steps = header("x-step");
    let body = res.text().await.expect("body");
    (
        Seen {
            status,
            charge,
            steps,
            body,
        },
        replayed,
    )
}

/// Must show 1: four axum instances (separate layers, separate connections, one Redis) get
/// 2,000 concurrent duplicates over HTTP: one execution, identical responses everywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_instances_2000_duplicates_one_execution() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let counter = Counter::default();
    let work = Duration::from_millis(300);
    let apps = instances(&server, 4, &counter, work, None).await;
    let urls: Vec<String> = apps.iter().map(|a| a.url("/pay")).collect();
    let client = client();
    const N: usize = 2000;
    let barrier = Arc::new(Barrier::new(N));
    let tasks: Vec<_> = (0..N)
        .map(|i| {
            let client = client.clone();
            let url = urls[i % urls.len()].clone();
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                post(&client, &url, "order-42").await
            })
        })
        .collect();
    let mut seen = HashSet::new();
    let mut replayed = 0;
    for t in tasks {
        let (s, r) = t.await.expect("task");
        replayed += usize::from(r);
        seen.insert(s);
    }
    assert_eq!(counter.runs(), 1, "executions of the handler");
    assert_eq!(seen.len(), 1, "distinct responses: {seen:#?}");
    let only = seen.into_iter().next().expect("one response");
    assert_eq!(only.status, 201);
    assert_eq!(only.steps, ["reserved", "captured"]);
    assert!(only.body.contains(&only.charge));
    assert_eq!(
        replayed,
        N - 1,
        "every response but the leader's is a replay"
    );

    // A later duplicate, on any instance, is a replay of the same execution.
    for url in &urls {
        let (s, r) = post(&client, url, "order-42").await;
        assert!(r);
        assert_eq!(s, only);
    }
    assert_eq!(counter.runs(), 1);
}

/// Must show 3: a handler that runs three times longer than the lease executes once, while
/// duplicates keep arriving on other instances: heartbeats keep the claim.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_three_leases_long_runs_once() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let counter = Counter::default();
    let lease = Duration::from_millis(1500);
    let apps = instances(&server, 3, &counter, lease * 3, Some(lease)).await;
    let client = client();
    let first = {
        let client = client.clone();
        let url = apps[0].url("/pay");
        tokio::spawn(async move { post(&client, &url, "slow-1").await })
    };
    counter.started().await;
    // Duplicates throughout the run, on the other instances: each must wait, none may run.
    let mut dups = Vec::new();
    for wave in 0..4 {
        for app in &apps[1..] {
            let client = client.clone();
            let url = app.url("/pay");
            dups.push(tokio::spawn(
                async move { post(&client, &url, "slow-1").await },
            ));
        }
        if wave < 3 {
            tokio::time::sleep(lease).await; // spread arrivals over the run
        }
    }
    let (leader, leader_replayed) = first.await.expect("leader");
    assert!(!leader_replayed);
    assert_eq!(leader.status, 201);
    for d in dups {
        let (s, r) = d.await.expect("duplicate");
        assert!(r, "duplicate not a replay: {s:?}");
        assert_eq!(s, leader);
    }
    assert_eq!(counter.runs(), 1, "executions of the handler");
}

/// Pub/sub only ever speeds waiters up. A subscriber connection that accepts but never
/// answers (a half-open socket, a stalled proxy) must not hold a waiter until `max_wait`: the
/// subscribe is bounded by the store's timeout, then the waiter polls and gets the replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_subscriber_connection_does_not_hold_waiters() {
    const MAX_WAIT: Duration = Duration::from_secs(40);
    let Some(server) = RedisServer::start() else {
        return;
    };
    // A "Redis" for pub/sub that completes the connection handshake (+OK to each command) and
    // then never answers a SUBSCRIBE: a connection that went silent after it was made.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_url = format!("redis://{}/", silent.local_addr().unwrap());
    let subscribes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    tokio::spawn({
        let subscribes = subscribes.clone();
        async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            while let Ok((mut socket, _)) = silent.accept().await {
                let subscribes = subscribes.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut mute = false;
                    while let Ok(n) = socket.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        let text = String::from_utf8_lossy(&buf[..n]).to_ascii_uppercase();
                        if text.contains("SUBSCRIBE") {
                            subscribes.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            mute = true;
                        }
                        if !mute {
                            let commands =
                                text.split("\r\n").filter(|l| l.starts_with('*')).count();
                            let _ = socket.write_all(&b"+OK\r\n".repeat(commands)).await;
                        }
                    }
                });
            }
        }
    });
    let counter = Counter::default();
    let work = Duration::from_millis(500);
    let mut apps = Vec::new();
    for _ in 0..2 {
        let store = RedisStore::connect(server.url())
            .await
            .expect("connect")
            .prefix("stall:")
            .timeout(Duration::from_millis(300))
            .notifications(redis::Client::open(silent_url.as_str()).unwrap());
        let layer = IdempotencyLayer::new(store).max_wait(MAX_WAIT);
        apps.push(serve(pay_router(counter.clone(), work).layer(layer)).await);
    }
    let client = client();
    let (a, b) = (apps[0].url("/pay"), apps[1].url("/pay"));
    let first = tokio::spawn({
        let client = client.clone();
        async move { post(&client, &a, "stall-1").await }
    });
    counter.started().await;
    let asked = std::time::Instant::now();
    let (dup, replayed) = post(&client, &b, "stall-1").await;
    // Not a speed check: the original takes 0.5 s; a waiter held by the stalled subscribe is
    // answered only when its max_wait runs out.
    assert!(
        asked.elapsed() < MAX_WAIT / 2,
        "the waiter was held {:?} by the stalled subscriber",
        asked.elapsed()
    );
    let (orig, _) = first.await.unwrap();
    assert!(
        subscribes.load(std::sync::atomic::Ordering::SeqCst) > 0,
        "the waiter never tried to subscribe: the stall was not exercised"
    );
    assert_eq!(dup.status, 201, "the waiter gave up: {dup:?}");
    assert!(replayed);
    assert_eq!(dup, orig);
    assert_eq!(counter.runs(), 1);
}

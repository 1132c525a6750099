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

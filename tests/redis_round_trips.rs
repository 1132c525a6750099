//! Must show 6: round trips counted by Redis itself (`INFO commandstats` deltas): a first
//! execution costs two script calls (claim, complete) plus heartbeats, a replay costs one.
#![cfg(feature = "redis")]

#[path = "support/redis_app.rs"]
mod redis_app;
#[path = "support/redis_server.rs"]
mod redis_server;

use std::{collections::HashMap, time::Duration};

use axum::{Router, body::Body, http::Request};
use redis_app::{Counter, eventually, pay_router};
use redis_server::RedisServer;
use tower::ServiceExt;
use tower_idempotency::{IdempotencyLayer, RedisStore};

/// Commands Redis executed, by name, leaving out our own `INFO`.
fn snapshot(server: &RedisServer) -> HashMap<String, u64> {
    server
        .command_calls()
        .into_iter()
        .filter(|(name, _)| name != "info")
        .collect()
}

/// Per-command calls between two snapshots (only the commands that ran).
fn delta(before: &HashMap<String, u64>, after: &HashMap<String, u64>) -> HashMap<String, u64> {
    after
        .iter()
        .filter_map(|(k, v)| {
            let d = v - before.get(k).copied().unwrap_or(0);
            (d > 0).then(|| (k.clone(), d))
        })
        .collect()
}

async fn pay(app: &Router, key: &str) -> u16 {
    let req = Request::post("/pay")
        .header("idempotency-key", key)
        .body(Body::from("amount=1"))
        .expect("request");
    let res = app.clone().oneshot(req).await.expect("infallible");
    let status = res.status().as_u16();
    let _ = axum::body::to_bytes(res.into_body(), usize::MAX).await;
    status
}

/// Commands our scripts run inside Redis. `INFO commandstats` counts them too, but they are
/// not round trips; any other command would be one.
const IN_SCRIPTS: [&str; 8] = [
    "time", "type", "hget", "hmget", "hset", "del", "pexpire", "publish",
];

/// Runs one request and returns what Redis executed for it, once at least `min_scripts`
/// script calls arrived (the leader answers its client before it writes the outcome).
async fn measured(
    server: &RedisServer,
    app: &Router,
    key: &str,
    min_scripts: u64,
    executes: bool,
) -> HashMap<String, u64> {
    let before = snapshot(server);
    assert_eq!(pay(app, key).await, 201);
    // The client is answered before the outcome is written: an execution is measured once the
    // completing script ran (it is the one that publishes), so its write is not counted in the
    // next measurement.
    eventually("the outcome's write", Duration::from_secs(10), || async {
        let d = delta(&before, &snapshot(server));
        let count = |k: &str| d.get(k).copied().unwrap_or(0);
        let written = !executes || count("publish") >= 1;
        (count("evalsha") >= min_scripts && written).then_some(d)
    })
    .await
}

/// The round trips in `d`: script calls, after checking nothing else was sent.
fn round_trips(d: &HashMap<String, u64>) -> u64 {
    let other: Vec<_> = d
        .keys()
        .filter(|k| *k != "evalsha" && !IN_SCRIPTS.contains(&k.as_str()))
        .collect();
    assert!(
        other.is_empty(),
        "commands besides scripts: {other:?} in {d:?}"
    );
    d.get("evalsha").copied().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_execution_costs_two_round_trips_and_a_replay_one() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let store = RedisStore::connect(server.url())
        .await
        .expect("connect")
        .prefix("rt:");
    let counter = Counter::default();
    let app =
        pay_router(counter.clone(), Duration::ZERO).layer(IdempotencyLayer::new(store.clone()));
    // Warm up: scripts get loaded on first use (SCRIPT LOAD after a NOSCRIPT).
    // Measured like the rest, so that their writes are done before the next measurement.
    measured(&server, &app, "warm-up", 2, true).await;
    measured(&server, &app, "warm-up", 1, false).await;

    let first = measured(&server, &app, "order-1", 2, true).await;
    let replay = measured(&server, &app, "order-1", 1, false).await;
    eprintln!("first execution: {first:?}; replay: {replay:?}");
    assert_eq!(round_trips(&first), 2, "first execution: claim + complete");
    assert_eq!(round_trips(&replay), 1, "replay: one claim");
    assert_eq!(counter.runs(), 2);

    // A slow handler adds one renewal per third of a lease, nothing else.
    let lease = Duration::from_millis(900);
    let work = Duration::from_millis(2000);
    let slow =
        pay_router(Counter::default(), work).layer(IdempotencyLayer::new(store).lease(lease));
    // Warm up the renewal script as well.
    measured(&server, &slow, "warm-up-slow", 3, true).await;
    let slow_first = measured(&server, &slow, "order-2", 3, true).await;
    let beats = round_trips(&slow_first) - 2;
    let max_beats = (work.as_millis() / (lease / 3).as_millis()) as u64 + 1;
    // One renewal per third of a lease: 6 in 2 s, give or take one at each end. Renewing once
    // per lease (2) must not pass.
    let min_beats = max_beats - 3;
    eprintln!(
        "slow first execution ({work:?} handler, {lease:?} lease): {slow_first:?} = 2 + {beats} heartbeats"
    );
    assert!(
        (min_beats..=max_beats).contains(&beats),
        "{beats} heartbeats, expected {min_beats}..={max_beats}"
    );
    let slow_replay = measured(&server, &slow, "order-2", 1, false).await;
    assert_eq!(round_trips(&slow_replay), 1);
}

//! A client that times out or disconnects does not cancel the side effect: the handler
//! finishes once, its response is stored, and the retry receives it.

mod harness;

use std::time::Duration;

use axum::{Router, extract::State, routing::post};
use harness::*;
use tower_idempotency::{IdempotencyLayer, MemoryStore};

#[derive(Clone, Default)]
struct Slow {
    /// Requests that reached the router (in front of the idempotency layer).
    arrived: Counter,
    started: Counter,
    done: Counter,
    gate: Gate,
}

async fn charge(State(s): State<Slow>) -> (http::StatusCode, String) {
    s.started.hit();
    s.gate.wait().await;
    let n = s.done.hit();
    (http::StatusCode::CREATED, format!("charge #{n}"))
}

async fn start() -> (Slow, String) {
    let slow = Slow::default();
    let app = Router::new()
        .route("/charge", post(charge))
        .layer(IdempotencyLayer::new(MemoryStore::new()))
        .layer(count_arrivals(slow.arrived.clone()))
        .with_state(slow.clone());
    let addr = serve(app).await;
    (slow, format!("http://{addr}/charge"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_disconnects_handler_completes_once_and_retry_gets_stored_response() {
    let (slow, url) = start().await;
    let client = client();
    let leader = tokio::spawn(
        client
            .post(&url)
            .header("idempotency-key", "pay-1")
            .body("amount=5")
            .send(),
    );
    assert!(eventually(Duration::from_secs(10), || slow.started.get() == 1).await);
    // The client goes away mid-request: its connection is dropped.
    leader.abort();
    assert!(leader.await.unwrap_err().is_cancelled());
    slow.gate.open();
    assert!(
        eventually(Duration::from_secs(10), || slow.done.get() == 1).await,
        "the handler still completes after the disconnect"
    );
    let res = client
        .post(&url)
        .header("idempotency-key", "pay-1")
        .body("amount=5")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    assert!(is_replayed(&res));
    assert_eq!(res.text().await.unwrap(), "charge #1");
    assert_eq!(slow.started.get(), 1);
    assert_eq!(slow.done.get(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_timeout_then_retry_while_running_waits_for_the_result() {
    let (slow, url) = start().await;
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let err = impatient
        .post(&url)
        .header("idempotency-key", "pay-2")
        .body("amount=7")
        .send()
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err}");
    assert_eq!(slow.started.get(), 1);
    // The retry arrives while the first attempt still runs: it waits, then gets the outcome.
    let retry = tokio::spawn(
        client()
            .post(&url)
            .header("idempotency-key", "pay-2")
            .body("amount=7")
            .send(),
    );
    // Open the gate only once the retry is in: it must find the first attempt still running.
    assert!(eventually(Duration::from_secs(10), || slow.arrived.get() == 2).await);
    assert_eq!(
        slow.done.get(),
        0,
        "the first attempt finished before the retry came"
    );
    slow.gate.open();
    let res = retry.await.unwrap().unwrap();
    assert_eq!(res.status(), 201);
    assert!(is_replayed(&res));
    assert_eq!(res.text().await.unwrap(), "charge #1");
    assert_eq!(slow.started.get(), 1);
    assert_eq!(slow.done.get(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_cancellation_under_concurrency_runs_once() {
    let (slow, url) = start().await;
    let client = client();
    let tasks: Vec<_> = (0..200)
        .map(|_| {
            tokio::spawn(
                client
                    .post(&url)
                    .header("idempotency-key", "pay-3")
                    .body("amount=9")
                    .send(),
            )
        })
        .collect();
    assert!(eventually(Duration::from_secs(10), || slow.started.get() == 1).await);
    // Every other client gives up, the leader's possibly among them.
    let mut kept = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        if i % 2 == 0 {
            t.abort();
        } else {
            kept.push(t);
        }
    }
    slow.gate.open();
    for t in kept {
        let res = t.await.unwrap().unwrap();
        assert_eq!(res.status(), 201);
        assert_eq!(res.text().await.unwrap(), "charge #1");
    }
    assert!(eventually(Duration::from_secs(10), || slow.done.get() == 1).await);
    assert_eq!(slow.started.get(), 1);
}

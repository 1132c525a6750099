//! A holder that vanishes (its process dies with the claim held): after one lease the next
//! duplicate runs again (`Reclaim::AfterLease`, at-least-once) or is told the outcome is
//! unknown (`Reclaim::Never`, at-most-once). Over HTTP for the duplicate; the "crashed"
//! instance runs on a runtime of its own that the test shuts down.

mod harness;

use std::{convert::Infallible, time::Duration};

use axum::{Router, routing::post};
use bytes::Bytes;
use harness::*;
use http::Request;
use http_body_util::Full;
use tokio::sync::Notify;
use tower::{ServiceBuilder, ServiceExt, service_fn};
use tower_idempotency::{IdempotencyLayer, MemoryStore, Reclaim};

const LEASE: Duration = Duration::from_millis(150);

/// Starts the request on an instance that hangs in the handler, then kills that instance.
async fn crash_holding(store: &MemoryStore) {
    let started = std::sync::Arc::new(Notify::new());
    let s = started.clone();
    let crashed = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let svc = ServiceBuilder::new()
        .layer(IdempotencyLayer::new(store.clone()).lease(LEASE))
        .service(service_fn(move |_req: Request<_>| {
            let s = s.clone();
            async move {
                s.notify_one();
                std::future::pending::<()>().await;
                Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::new())))
            }
        }));
    let req = Request::post("/pay")
        .header("idempotency-key", "order-1")
        .body(Full::new(Bytes::from_static(b"amount=5")))
        .unwrap();
    crashed.spawn(svc.oneshot(req));
    started.notified().await;
    // The process dies: no release, no more lease renewals.
    crashed.shutdown_background();
}

async fn duplicate(store: &MemoryStore, reclaim: Reclaim, runs: &Counter) -> reqwest::Response {
    let r = runs.clone();
    let app = Router::new()
        .route(
            "/pay",
            post(move || async move {
                r.hit();
                "charged"
            }),
        )
        .layer(
            IdempotencyLayer::new(store.clone())
                .lease(LEASE)
                .reclaim(reclaim),
        );
    let addr = serve(app).await;
    client()
        .post(format!("http://{addr}/pay"))
        .header("idempotency-key", "order-1")
        .body("amount=5")
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_lease_a_duplicate_reclaims_and_runs() {
    let store = MemoryStore::new();
    crash_holding(&store).await;
    let runs = Counter::default();
    let res = duplicate(&store, Reclaim::AfterLease, &runs).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.text().await.unwrap(), "charged");
    assert_eq!(runs.get(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_reclaim_never_the_outcome_is_unknown() {
    let store = MemoryStore::new();
    crash_holding(&store).await;
    let runs = Counter::default();
    let res = duplicate(&store, Reclaim::Never, &runs).await;
    // No Retry-After: a client that retries 409 only after one does not retry this.
    assert!(res.headers().get("retry-after").is_none());
    let body = assert_problem(res, 409, "outcome-unknown").await;
    assert!(body.contains("does not run it again"), "{body}");
    assert_eq!(runs.get(), 0);
}

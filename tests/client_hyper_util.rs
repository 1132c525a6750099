//! hyper-util's legacy client under the client layers, and under `IdempotencyLayer` as a
//! request deduplicator.

mod client_support;

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{
    Router,
    extract::{Request, State},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::post,
};
use bytes::Bytes;
use client_support::*;
use http::StatusCode;
use http_body_util::{BodyExt, Full};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use tokio::sync::Notify;
use tower::{ServiceBuilder, ServiceExt, retry::RetryLayer};
use tower_idempotency::{
    IdempotencyLayer, KeyMode, MemoryStore, RequestBody, Scope,
    client::{IdempotencyKeyLayer, RetryPolicy},
};

#[derive(Clone, Default)]
struct Faults {
    attempts: Counter,
    keys: Keys,
}

/// Outside the upstream's idempotency layer: attempt 1 is answered too late for the client's
/// timeout, attempt 2 with a 502 — both after the work was done.
async fn faults(State(f): State<Faults>, req: Request, next: Next) -> Response {
    let n = f.attempts.hit();
    f.keys.record(req.headers());
    let res = next.run(req).await;
    match n {
        1 => {
            tokio::time::sleep(Duration::from_secs(2)).await;
            res
        }
        2 => StatusCode::BAD_GATEWAY.into_response(),
        _ => res,
    }
}

#[tokio::test]
async fn hyper_util_client_under_key_retry_and_timeout() {
    let executions = Counter::default();
    let f = Faults::default();
    let upstream = serve(
        Router::new()
            .route(
                "/charges",
                post(|State(c): State<Counter>, body: String| async move {
                    (
                        StatusCode::CREATED,
                        format!("charge #{} for {body}", c.hit()),
                    )
                }),
            )
            .with_state(executions.clone())
            .layer(IdempotencyLayer::new(MemoryStore::new()).key_mode(KeyMode::Required))
            .layer(middleware::from_fn_with_state(f.clone(), faults)),
    )
    .await;

    // The recipe: key outside, retry, a timeout per attempt, hyper-util's client.
    let http = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let client = ServiceBuilder::new()
        .layer(IdempotencyKeyLayer::new())
        .layer(RetryLayer::new(
            RetryPolicy::new().base_backoff(Duration::from_millis(5)),
        ))
        .timeout(Duration::from_millis(300))
        .service(http);

    let req = http::Request::post(format!("http://{upstream}/charges"))
        .body(Full::new(Bytes::from_static(b"100 EUR")))
        .unwrap();
    let res = client.oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    assert_eq!(res.headers()["idempotent-replayed"], "true");
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "charge #1 for 100 EUR");
    assert_eq!(f.attempts.get(), 3, "timed out, 502, answer");
    assert_eq!(executions.get(), 1);
    let keys = f.keys.all();
    assert!(
        keys[0].is_some() && keys.iter().all(|k| k == &keys[0]),
        "{keys:?}"
    );
}

/// Opens once `n` requests have entered.
struct Gate {
    n: usize,
    entered: AtomicUsize,
    notify: Notify,
}

impl Gate {
    fn enter(&self) {
        if self.entered.fetch_add(1, Ordering::SeqCst) + 1 >= self.n {
            self.notify.notify_waiters();
        }
    }

    async fn wait(&self) {
        loop {
            let notified = self.notify.notified();
            if self.entered.load(Ordering::SeqCst) >= self.n {
                return;
            }
            notified.await;
        }
    }
}

#[tokio::test]
async fn idempotency_layer_over_a_client_collapses_identical_concurrent_calls() {
    const PER_BODY: usize = 150;
    let executions = Counter::default();
    // The upstream has no protection of its own; it holds each call until every caller has
    // sent its request, so all of them are in flight together.
    let gate = Arc::new(Gate {
        n: 2 * PER_BODY,
        entered: AtomicUsize::new(0),
        notify: Notify::new(),
    });
    let (c, g) = (executions.clone(), gate.clone());
    let upstream = serve(Router::new().route(
        "/v1/quote",
        post(move |body: String| async move {
            let n = c.hit();
            g.wait().await;
            format!("quote #{n} for {body}")
        }),
    ))
    .await;

    let http = Client::builder(TokioExecutor::new()).build_http::<RequestBody<Full<Bytes>>>();
    let dedup = ServiceBuilder::new()
        .layer(
            IdempotencyLayer::new(MemoryStore::new())
                .scope(|parts| Scope::new(parts.uri.authority().map_or("", |a| a.as_str()))),
        )
        .service(http);

    let tasks: Vec<_> = (0..2 * PER_BODY)
        .map(|i| {
            let body = if i % 2 == 0 { "EURUSD" } else { "GBPUSD" };
            let req = http::Request::post(format!("http://{upstream}/v1/quote"))
                .body(Full::new(Bytes::from_static(body.as_bytes())))
                .unwrap();
            let (dedup, gate) = (dedup.clone(), gate.clone());
            tokio::spawn(async move {
                let call = dedup.oneshot(req);
                gate.enter();
                let res = call.await.unwrap();
                assert_eq!(res.status(), StatusCode::OK);
                let body = res.into_body().collect().await.unwrap().to_bytes();
                String::from_utf8(body.to_vec()).unwrap()
            })
        })
        .collect();
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap());
    }

    assert_eq!(
        executions.get(),
        2,
        "one upstream call per distinct request"
    );
    answers.sort();
    answers.dedup();
    assert_eq!(
        answers.len(),
        2,
        "every caller of one request got its answer: {answers:?}"
    );
}

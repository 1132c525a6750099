//! End to end over real HTTP: N concurrent logical requests through key layer → retry →
//! per-attempt timeout → reqwest, against an upstream that injects timeouts after the work,
//! dropped connections and 503s. Exactly N billed executions.

mod client_support;

use std::{
    hash::{DefaultHasher, Hash, Hasher},
    sync::Arc,
    time::Duration,
};

use axum::{Extension, Router, body::Body, response::IntoResponse, routing::post};
use client_support::*;
use dashmap::DashMap;
use http::{HeaderMap, Request, Response, StatusCode};
use hyper::body::Incoming;
use tower::{BoxError, ServiceBuilder, ServiceExt, retry::RetryLayer, service_fn};
use tower_idempotency::{
    IdempotencyLayer, KeyMode, MemoryStore,
    client::{IdempotencyKeyLayer, RetryPolicy},
};

const N: usize = 200;
const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(400);
const LATE: Duration = Duration::from_millis(900);
const SLOW_WORK: Duration = Duration::from_millis(600);

#[derive(Clone, Copy)]
struct Slow;

#[derive(Clone, Default)]
struct Upstream {
    executions: Counter,
    ledger: Arc<DashMap<String, usize>>,
    attempts: Counter,
    per_key: Arc<DashMap<String, usize>>,
    late: Counter,
    dropped: Counter,
    unavailable: Counter,
    slow: Counter,
}

/// The billing handler: one bill per execution, keyed by the client's key.
async fn complete(
    Extension(up): Extension<Upstream>,
    slow: Option<Extension<Slow>>,
    headers: HeaderMap,
    prompt: String,
) -> impl IntoResponse {
    up.executions.hit();
    if slow.is_some() {
        tokio::time::sleep(SLOW_WORK).await;
    }
    let key = headers["idempotency-key"].to_str().unwrap().to_owned();
    *up.ledger.entry(key).or_default() += 1;
    (StatusCode::OK, format!("completion of {prompt}"))
}

enum Fault {
    None,
    Late,
    DropAfter,
    Unavailable,
    SlowWork,
    DropBefore,
}

fn plan(key: &str, attempt: usize) -> Fault {
    let mut h = DefaultHasher::new();
    key.hash(&mut h);
    let h = h.finish();
    match (attempt, h % 5, (h / 5) % 3) {
        (1, 1, _) => Fault::Late,
        (1, 2, _) => Fault::DropAfter,
        (1, 3, _) => Fault::Unavailable,
        (1, 4, _) => Fault::SlowWork,
        (2, _, 1) => Fault::DropBefore,
        (2, _, 2) => Fault::Unavailable,
        _ => Fault::None,
    }
}

async fn faulty(
    up: Upstream,
    app: Router,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, BoxError> {
    up.attempts.hit();
    let key = req
        .headers()
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let attempt = {
        let mut n = up.per_key.entry(key.clone()).or_default();
        *n += 1;
        *n
    };
    match plan(&key, attempt) {
        Fault::None => Ok(app.oneshot(req).await?),
        Fault::Late => {
            up.late.hit();
            let res = app.oneshot(req).await?;
            tokio::time::sleep(LATE).await;
            Ok(res)
        }
        Fault::DropAfter => {
            up.dropped.hit();
            let _done = app.oneshot(req).await?;
            Err("connection dropped after the work".into())
        }
        Fault::Unavailable => {
            up.unavailable.hit();
            Ok(StatusCode::SERVICE_UNAVAILABLE.into_response())
        }
        Fault::SlowWork => {
            up.slow.hit();
            req.extensions_mut().insert(Slow);
            Ok(app.oneshot(req).await?)
        }
        Fault::DropBefore => {
            up.dropped.hit();
            Err("connection dropped before the work".into())
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_logical_requests_with_faults_bill_exactly_n() {
    let up = Upstream::default();
    let app = Router::new()
        .route("/v1/chat/completions", post(complete))
        .layer(IdempotencyLayer::new(MemoryStore::new()).key_mode(KeyMode::Required))
        .layer(Extension(up.clone()));
    let u = up.clone();
    let addr = serve_faulty(service_fn(move |req| faulty(u.clone(), app.clone(), req))).await;

    let http = reqwest::Client::new();
    let client = ServiceBuilder::new()
        .layer(IdempotencyKeyLayer::new())
        .layer(RetryLayer::new(
            RetryPolicy::new()
                .max_attempts(6)
                .base_backoff(Duration::from_millis(10)),
        ))
        .timeout(ATTEMPT_TIMEOUT)
        .service(http.clone());

    let url = format!("http://{addr}/v1/chat/completions");
    let tasks: Vec<_> = (0..N)
        .map(|i| {
            let req = http.post(&url).body(format!("prompt {i}")).build().unwrap();
            let client = client.clone();
            tokio::spawn(async move {
                let res = client.oneshot(req).await.unwrap();
                assert_eq!(res.status(), StatusCode::OK);
                assert_eq!(
                    res.text().await.unwrap(),
                    format!("completion of prompt {i}")
                );
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }

    let billed: usize = up.ledger.iter().map(|e| *e.value()).sum();
    assert_eq!(up.executions.get(), N, "upstream executions");
    assert_eq!(billed, N, "billed completions");
    assert_eq!(up.ledger.len(), N, "one bill per logical request");
    assert!(up.attempts.get() > N, "retries happened");
    for (what, c) in [
        ("late answers", &up.late),
        ("dropped connections", &up.dropped),
        ("503s", &up.unavailable),
        ("slow executions", &up.slow),
    ] {
        assert!(c.get() > 0, "no {what} injected");
    }
}

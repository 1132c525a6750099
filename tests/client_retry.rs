//! The retry policy under the key layer, over real HTTP with reqwest: every attempt carries one
//! key, the upstream runs once, and only what is safe and useful is retried.

mod client_support;

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use axum::{
    Router,
    body::Body,
    extract::{Path, State},
    response::{IntoResponse, Response},
    routing::{any, post},
};
use client_support::*;
use http::{HeaderMap, StatusCode};
use tower::{ServiceBuilder, ServiceExt, retry::RetryLayer};
use tower_idempotency::{
    IdempotencyLayer, KeyMode, MemoryStore,
    client::{IdempotencyKeyLayer, RetryPolicy},
};

fn fast_policy() -> RetryPolicy {
    RetryPolicy::new()
        .base_backoff(Duration::from_millis(2))
        .max_backoff(Duration::from_millis(20))
}

/// Sends `req` through key layer → retry → reqwest.
async fn send(
    policy: RetryPolicy,
    req: reqwest::Request,
) -> Result<reqwest::Response, reqwest::Error> {
    ServiceBuilder::new()
        .layer(IdempotencyKeyLayer::new())
        .layer(RetryLayer::new(policy))
        .service(reqwest::Client::new())
        .oneshot(req)
        .await
}

#[derive(Clone)]
struct Hop {
    upstream: String,
    attempts: Counter,
    keys: Keys,
    http: reqwest::Client,
}

/// Forwards to the upstream, then answers 502 to the first two attempts whatever the
/// upstream said: the work is done, the caller does not know it.
async fn hop(State(h): State<Hop>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    let n = h.attempts.hit();
    h.keys.record(&headers);
    let mut req = h.http.post(&h.upstream).body(body);
    if let Some(key) = headers.get("idempotency-key") {
        req = req.header("idempotency-key", key);
    }
    let Ok(up) = req.send().await else {
        return StatusCode::BAD_GATEWAY.into_response();
    };
    if n <= 2 {
        return StatusCode::BAD_GATEWAY.into_response();
    }
    let status = up.status();
    let replayed = up.headers().get("idempotent-replayed").cloned();
    let text = up.text().await.unwrap_or_default();
    let mut res = (status, text).into_response();
    if let Some(v) = replayed {
        res.headers_mut().insert("idempotent-replayed", v);
    }
    res
}

#[tokio::test]
async fn flaky_hop_502_twice_one_key_one_execution() {
    let executions = Counter::default();
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
            .layer(IdempotencyLayer::new(MemoryStore::new()).key_mode(KeyMode::Required)),
    )
    .await;
    let h = Hop {
        upstream: format!("http://{upstream}/charges"),
        attempts: Counter::default(),
        keys: Keys::default(),
        http: reqwest::Client::new(),
    };
    let hop_addr = serve(
        Router::new()
            .route("/charges", post(hop))
            .with_state(h.clone()),
    )
    .await;

    let req = reqwest::Client::new()
        .post(format!("http://{hop_addr}/charges"))
        .body("100 EUR")
        .build()
        .unwrap();
    let res = send(fast_policy(), req).await.unwrap();

    assert_eq!(res.status(), StatusCode::CREATED);
    assert_eq!(res.headers()["idempotent-replayed"], "true");
    assert_eq!(res.text().await.unwrap(), "charge #1 for 100 EUR");
    assert_eq!(h.attempts.get(), 3, "two 502s, then the answer");
    assert_eq!(executions.get(), 1, "the upstream handler ran once");
    let keys = h.keys.all();
    assert_eq!(keys.len(), 3);
    assert!(keys[0].is_some());
    assert!(
        keys.iter().all(|k| k == &keys[0]),
        "one key on every attempt: {keys:?}"
    );
}

/// A server that answers each attempt at `/{name}` from a script, then repeats its last line.
#[derive(Clone)]
struct Script {
    attempts: Counter,
    lines: &'static [(u16, Option<&'static str>)],
}

async fn scripted(State(s): State<Script>, Path(_): Path<String>) -> Response {
    let n = s.attempts.hit();
    let (status, retry_after) = s.lines[(n - 1).min(s.lines.len() - 1)];
    let mut res = Response::new(Body::from(format!("attempt {n}")));
    *res.status_mut() = StatusCode::from_u16(status).unwrap();
    if let Some(after) = retry_after {
        res.headers_mut()
            .insert("retry-after", after.parse().unwrap());
    }
    res
}

/// Serves `lines` at `/{name}`; returns the script (for its attempt counter) and the address.
async fn serve_script(lines: &'static [(u16, Option<&'static str>)]) -> (Script, SocketAddr) {
    let s = Script {
        attempts: Counter::default(),
        lines,
    };
    let addr = serve(
        Router::new()
            .route("/{name}", any(scripted))
            .with_state(s.clone()),
    )
    .await;
    (s, addr)
}

/// Runs one POST against a scripted server; returns (final status, attempts, elapsed).
async fn run_script(
    lines: &'static [(u16, Option<&'static str>)],
    policy: RetryPolicy,
) -> (StatusCode, usize, Duration) {
    let (s, addr) = serve_script(lines).await;
    let req = reqwest::Client::new()
        .post(format!("http://{addr}/x"))
        .body("{}")
        .build()
        .unwrap();
    let start = Instant::now();
    let res = send(policy, req).await.unwrap();
    (res.status(), s.attempts.get(), start.elapsed())
}

#[tokio::test]
async fn bad_request_is_never_retried() {
    let (status, attempts, _) = run_script(&[(400, None), (200, None)], fast_policy()).await;
    assert_eq!((status.as_u16(), attempts), (400, 1));
}

#[tokio::test]
async fn unprocessable_is_never_retried() {
    // Even with a Retry-After: 422 means the key was reused for another request.
    let (status, attempts, _) = run_script(&[(422, Some("0")), (200, None)], fast_policy()).await;
    assert_eq!((status.as_u16(), attempts), (422, 1));
}

#[tokio::test]
async fn other_client_errors_are_never_retried() {
    for lines in [
        &[(401, None), (200, None)][..],
        &[(404, None), (200, None)],
        &[(413, None), (200, None)],
    ] {
        let lines: &'static [_] = Box::leak(lines.to_vec().into_boxed_slice());
        let (status, attempts, _) = run_script(lines, fast_policy()).await;
        assert_eq!(
            (status, attempts),
            (StatusCode::from_u16(lines[0].0).unwrap(), 1)
        );
    }
}

#[tokio::test]
async fn conflict_is_retried_after_retry_after() {
    let (status, attempts, elapsed) =
        run_script(&[(409, Some("1")), (200, None)], fast_policy()).await;
    assert_eq!((status.as_u16(), attempts), (200, 2));
    assert!(elapsed >= Duration::from_secs(1), "waited {elapsed:?}");
}

#[tokio::test]
async fn conflict_without_retry_after_is_not_retried() {
    let (status, attempts, _) = run_script(&[(409, None), (200, None)], fast_policy()).await;
    assert_eq!((status.as_u16(), attempts), (409, 1));
}

#[tokio::test]
async fn too_many_requests_and_server_errors_are_retried() {
    let (status, attempts, _) = run_script(
        &[
            (429, Some("0")),
            (500, None),
            (503, None),
            (504, None),
            (200, None),
        ],
        fast_policy(),
    )
    .await;
    assert_eq!((status.as_u16(), attempts), (200, 5));
}

#[tokio::test]
async fn attempts_are_bounded() {
    let (status, attempts, _) = run_script(&[(503, None)], fast_policy().max_attempts(3)).await;
    assert_eq!((status.as_u16(), attempts), (503, 3));
}

#[tokio::test]
async fn retry_after_beyond_the_limit_ends_the_retries() {
    let (status, attempts, _) =
        run_script(&[(503, Some("3600")), (200, None)], fast_policy()).await;
    assert_eq!((status.as_u16(), attempts), (503, 1));
}

#[tokio::test]
async fn dropped_connections_are_retried_and_bounded() {
    // Reads each request, then closes the connection without an answer.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Counter::default();
    let a = accepted.clone();
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            a.hit();
            let mut buf = [0u8; 4096];
            let _ = tokio::io::AsyncReadExt::read(&mut stream, &mut buf).await;
            drop(stream);
        }
    });
    let req = reqwest::Client::new()
        .post(format!("http://{addr}/x"))
        .body("{}")
        .build()
        .unwrap();
    let err = send(fast_policy().max_attempts(4), req).await.unwrap_err();
    assert!(!err.is_status(), "{err}");
    assert_eq!(accepted.get(), 4);
}

#[tokio::test]
async fn a_post_without_key_is_not_retried() {
    // The key layer inside the retry layer is the mistake this guards against: the retry
    // layer keeps the request as it was before the key was added.
    let (s, addr) = serve_script(&[(503, None), (200, None)]).await;
    let req = reqwest::Client::new()
        .post(format!("http://{addr}/x"))
        .body("{}")
        .build()
        .unwrap();
    let res = ServiceBuilder::new()
        .layer(RetryLayer::new(fast_policy()))
        .layer(IdempotencyKeyLayer::new())
        .service(reqwest::Client::new())
        .oneshot(req)
        .await
        .unwrap();
    assert_eq!((res.status().as_u16(), s.attempts.get()), (503, 1));

    // A PUT is idempotent by definition: retried without a key.
    let req = reqwest::Client::new()
        .put(format!("http://{addr}/x"))
        .body("{}")
        .build()
        .unwrap();
    let res = ServiceBuilder::new()
        .layer(RetryLayer::new(fast_policy()))
        .service(reqwest::Client::new())
        .oneshot(req)
        .await
        .unwrap();
    assert_eq!((res.status().as_u16(), s.attempts.get()), (200, 2));
}

#[tokio::test]
async fn a_streaming_body_is_sent_once() {
    let (s, addr) = serve_script(&[(503, None), (200, None)]).await;
    let stream = futures_util::stream::iter([Ok::<_, std::io::Error>("{}")]);
    let req = reqwest::Client::new()
        .post(format!("http://{addr}/x"))
        .body(reqwest::Body::wrap_stream(stream))
        .build()
        .unwrap();
    let res = send(fast_policy(), req).await.unwrap();
    assert_eq!((res.status().as_u16(), s.attempts.get()), (503, 1));
}

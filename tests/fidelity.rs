//! A replay is the original response: status, headers (in order), body and trailers — minus
//! `set-cookie`, `date` and hop-by-hop headers.

mod harness;

use std::convert::Infallible;

use axum::{Router, extract::State, response::IntoResponse, routing::post};
use bytes::Bytes;
use harness::*;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header};
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody};
use tower::{ServiceBuilder, ServiceExt, service_fn};
use tower_idempotency::{IdempotencyLayer, MemoryStore};

const OLD_DATE: &str = "Mon, 01 Jan 2001 00:00:00 GMT";

async fn create(State(c): State<Counter>) -> impl IntoResponse {
    let n = c.hit();
    let mut headers = HeaderMap::new();
    headers.insert(header::LOCATION, HeaderValue::from_static("/orders/42"));
    for v in ["a", "b", "c"] {
        headers.append("x-multi", HeaderValue::from_static(v));
    }
    headers.insert("x-run", HeaderValue::from(n));
    headers.insert(
        header::SET_COOKIE,
        HeaderValue::from_static("session=secret"),
    );
    headers.insert(header::DATE, HeaderValue::from_static(OLD_DATE));
    (
        StatusCode::CREATED,
        headers,
        format!("{{\"order\":42,\"run\":{n}}}"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_keeps_status_location_repeated_headers_and_body() {
    let counter = Counter::default();
    let app = Router::new()
        .route("/orders", post(create))
        .layer(IdempotencyLayer::new(MemoryStore::new()))
        .with_state(counter.clone());
    let addr = serve(app).await;
    let client = client();
    let send = || {
        client
            .post(format!("http://{addr}/orders"))
            .header("idempotency-key", "order-42")
            .body("{}")
            .send()
    };
    let first = send().await.unwrap();
    assert!(!is_replayed(&first));
    // The client that ran it gets everything, its cookie included.
    assert_eq!(first.headers()["set-cookie"], "session=secret");
    let first_body = first.text().await.unwrap();

    let replay = send().await.unwrap();
    assert!(is_replayed(&replay));
    assert_eq!(replay.status(), 201);
    assert_eq!(replay.headers()["location"], "/orders/42");
    let multi: Vec<_> = replay.headers().get_all("x-multi").iter().collect();
    assert_eq!(multi, ["a", "b", "c"], "repeated headers, in order");
    assert_eq!(replay.headers()["x-run"], "1");
    assert!(
        replay.headers().get("set-cookie").is_none(),
        "set-cookie is never replayed"
    );
    // The server may set a fresh Date; the stored one must not come back.
    assert!(
        replay
            .headers()
            .get_all("date")
            .iter()
            .all(|d| d != OLD_DATE)
    );
    assert_eq!(replay.text().await.unwrap(), first_body);
    assert_eq!(counter.get(), 1);
}

type TestBody =
    StreamBody<futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>;

/// A response with chunks, trailers and hop-by-hop headers, served in process (an HTTP server
/// would rewrite the hop-by-hop headers itself).
fn with_trailers() -> Response<TestBody> {
    let mut trailers = HeaderMap::new();
    trailers.insert("x-checksum", HeaderValue::from_static("abc123"));
    let frames = vec![
        Ok(Frame::data(Bytes::from_static(b"part one, "))),
        Ok(Frame::data(Bytes::from_static(b"part two"))),
        Ok(Frame::trailers(trailers)),
    ];
    Response::builder()
        .status(StatusCode::ACCEPTED)
        .header(header::CONNECTION, "x-private")
        .header("x-private", "for this hop only")
        .header("keep-alive", "timeout=5")
        .header("proxy-connection", "keep-alive")
        .header(header::TRANSFER_ENCODING, "chunked")
        .header(header::UPGRADE, "h2c")
        .header("x-kept", "yes")
        .body(StreamBody::new(futures_util::stream::iter(frames)))
        .unwrap()
}

#[tokio::test]
async fn replay_keeps_trailers_and_drops_hop_by_hop_headers() {
    let counter = Counter::default();
    let c = counter.clone();
    let svc = ServiceBuilder::new()
        .layer(IdempotencyLayer::new(MemoryStore::new()))
        .service(service_fn(move |_req: Request<_>| {
            c.hit();
            async move { Ok::<_, Infallible>(with_trailers()) }
        }));
    let request = || {
        Request::post("/jobs")
            .header("idempotency-key", "job-1")
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap()
    };
    let first = svc.clone().oneshot(request()).await.unwrap();
    let first = first.into_body().collect().await.unwrap();
    assert_eq!(first.trailers().unwrap()["x-checksum"], "abc123");

    let replay = svc.clone().oneshot(request()).await.unwrap();
    assert_eq!(replay.status(), StatusCode::ACCEPTED);
    assert_eq!(replay.headers()[REPLAYED], "true");
    assert_eq!(replay.headers()["x-kept"], "yes");
    for hop in [
        "connection",
        "keep-alive",
        "transfer-encoding",
        "upgrade",
        "proxy-connection",
        "x-private",
    ] {
        assert!(replay.headers().get(hop).is_none(), "{hop} replayed");
    }
    let body = replay.into_body().collect().await.unwrap();
    assert_eq!(body.trailers().unwrap()["x-checksum"], "abc123");
    assert_eq!(body.to_bytes(), "part one, part two");
    assert_eq!(counter.get(), 1);
}

#[tokio::test]
async fn strip_list_is_configurable() {
    let svc = ServiceBuilder::new()
        .layer(
            IdempotencyLayer::new(MemoryStore::new())
                .strip_headers([header::HeaderName::from_static("x-kept")]),
        )
        .service(service_fn(|_req: Request<_>| async move {
            Ok::<_, Infallible>(with_trailers())
        }));
    let request = || {
        Request::post("/jobs")
            .header("idempotency-key", "job-2")
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    svc.clone().oneshot(request()).await.unwrap();
    let replay = svc.oneshot(request()).await.unwrap();
    assert!(replay.headers().get("x-kept").is_none());
}

/// A chunked response with a `Trailer` header and a trailer field, as a handler over HTTP/1
/// sends it.
async fn checksummed(State(c): State<Counter>) -> Response<TestBody> {
    c.hit();
    let mut res = with_trailers();
    res.headers_mut().clear();
    res.headers_mut()
        .insert(header::TRAILER, HeaderValue::from_static("x-checksum"));
    res
}

/// Trailers reach the client over a real HTTP/1 connection, on the first execution and on the
/// replay: the response announces them (`Trailer` is not hop-by-hop) and its body does not
/// claim an exact length (which would make the server send `Content-Length`, and no trailers).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trailers_survive_http1_first_and_replayed() {
    let counter = Counter::default();
    let app = Router::new()
        .route("/jobs", post(checksummed))
        .layer(IdempotencyLayer::new(MemoryStore::new()))
        .with_state(counter.clone());
    let addr = serve(app).await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    for replayed in [false, true] {
        let req = Request::post(format!("http://{addr}/jobs"))
            .header("idempotency-key", "sum-1")
            .header(header::TE, "trailers")
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap();
        let res = client.request(req).await.unwrap();
        assert_eq!(res.status(), StatusCode::ACCEPTED);
        assert_eq!(res.headers().contains_key(REPLAYED), replayed);
        assert_eq!(
            res.headers()[header::TRAILER],
            "x-checksum",
            "replayed: {replayed}"
        );
        let body = res.into_body().collect().await.unwrap();
        let trailers = body.trailers().cloned();
        assert_eq!(body.to_bytes(), "part one, part two");
        assert_eq!(
            trailers.as_ref().and_then(|t| t.get("x-checksum")),
            Some(&HeaderValue::from_static("abc123")),
            "replayed: {replayed}"
        );
    }
    assert_eq!(counter.get(), 1);
}

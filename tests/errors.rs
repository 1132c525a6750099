//! Inner-service errors, panics and unreadable bodies: every client gets an answer (never a
//! hang), nothing is stored, and a retry runs again.

use std::{
    convert::Infallible,
    io,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody};
use tokio::{sync::Notify, task::JoinHandle};
use tower::{ServiceBuilder, ServiceExt, service_fn, util::BoxCloneService};
use tower_idempotency::{IdempotencyLayer, MemoryStore, ResponseBody};

fn req(body: &'static str) -> Request<Full<Bytes>> {
    Request::post("/call")
        .header("idempotency-key", "k")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap()
}

/// How the first attempt ends.
type Attempt = Result<Response<Full<Bytes>>, io::Error>;
type Reply = Result<Response<ResponseBody<Full<Bytes>>>, io::Error>;
type Svc = BoxCloneService<Request<Full<Bytes>>, Response<ResponseBody<Full<Bytes>>>, io::Error>;

/// A layered service whose first attempt is held until `waiters` duplicates have joined it, then
/// ends as `first` says (given the response "attempt 1"); later attempts answer "attempt n".
/// Returns the leader's and the waiters' tasks, the service, and the execution counter.
///
/// Meant for a current-thread runtime: when the test task runs, every spawned request has been
/// polled as far as it can go, so "entered" means "joined the flight".
async fn held_leader(
    waiters: usize,
    first: fn(Response<Full<Bytes>>) -> Attempt,
) -> (
    JoinHandle<Reply>,
    Vec<JoinHandle<Reply>>,
    Svc,
    Arc<AtomicUsize>,
) {
    let calls = Arc::new(AtomicUsize::new(0));
    let entered = Arc::new(AtomicUsize::new(0));
    let release = Arc::new(Notify::new());
    let (c, r, e) = (calls.clone(), release.clone(), entered.clone());
    let svc = ServiceBuilder::new()
        .map_request(move |req: Request<Full<Bytes>>| {
            e.fetch_add(1, Ordering::SeqCst);
            req
        })
        .layer(IdempotencyLayer::new(MemoryStore::new()))
        .service(service_fn(move |_req: Request<_>| {
            let n = c.fetch_add(1, Ordering::SeqCst) + 1;
            let r = r.clone();
            async move {
                let res = Response::new(Full::new(Bytes::from(format!("attempt {n}"))));
                if n > 1 {
                    return Ok(res);
                }
                r.notified().await;
                first(res)
            }
        }));
    let svc = BoxCloneService::new(svc);
    let leader = tokio::spawn(svc.clone().oneshot(req("a")));
    let joined: Vec<_> = (0..waiters)
        .map(|_| tokio::spawn(svc.clone().oneshot(req("a"))))
        .collect();
    while entered.load(Ordering::SeqCst) < waiters + 1 || calls.load(Ordering::SeqCst) == 0 {
        tokio::task::yield_now().await;
    }
    release.notify_one();
    (leader, joined, svc, calls)
}

#[tokio::test]
async fn inner_error_reaches_the_leader_and_waiters_and_is_not_stored() {
    let (leader, waiters, svc, calls) =
        held_leader(50, |_| Err(io::Error::other("upstream reset"))).await;
    let err = leader.await.unwrap().unwrap_err();
    assert_eq!(err.to_string(), "upstream reset");
    for w in waiters {
        let res = w.await.unwrap().unwrap();
        assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(res.headers()["retry-after"], "1");
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert!(String::from_utf8_lossy(&body).contains("first-attempt-failed"));
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    // Not stored: a retry runs again and succeeds.
    let res = svc.clone().oneshot(req("a")).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn unreadable_request_body_is_400_and_never_runs() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let svc = ServiceBuilder::new()
        .layer(IdempotencyLayer::new(MemoryStore::new()))
        .service(service_fn(move |_req: Request<_>| {
            c.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, Infallible>(Response::new(Full::new(Bytes::new()))) }
        }));
    let frames: Vec<Result<Frame<Bytes>, io::Error>> = vec![
        Ok(Frame::data(Bytes::from_static(b"partial"))),
        Err(io::Error::other("connection reset by peer")),
    ];
    let request = Request::post("/call")
        .header("idempotency-key", "k")
        .body(StreamBody::new(futures_util::stream::iter(frames)))
        .unwrap();
    let res = svc.oneshot(request).await.unwrap();
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    assert_eq!(res.headers()["content-type"], "application/problem+json");
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("body-read-error"));
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn waiters_share_an_unstored_5xx_and_a_retry_runs_again() {
    let (leader, waiters, svc, calls) = held_leader(20, |mut res| {
        *res.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        Ok(res)
    })
    .await;
    let res = leader.await.unwrap().unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(!res.headers().contains_key("idempotent-replayed"));
    for w in waiters {
        let res = w.await.unwrap().unwrap();
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(res.headers()["idempotent-replayed"], "true");
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "attempt 1");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    // Not stored: the retry runs again.
    let res = svc.clone().oneshot(req("a")).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "attempt 2");
}

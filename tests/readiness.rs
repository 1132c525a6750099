//! The layer calls the inner service only after it was readied, as `tower::Service` requires:
//! the spawned execution takes the readied instance, never an un-readied clone.

use std::{
    convert::Infallible,
    future::{Ready, ready},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tower::{Layer, Service, ServiceExt};
use tower_idempotency::{IdempotencyLayer, MemoryStore, RequestBody};

/// Panics when called without a successful `poll_ready` on the same instance.
struct Strict {
    ready: bool,
    calls: Arc<AtomicUsize>,
}

impl Clone for Strict {
    fn clone(&self) -> Self {
        // A clone is a new instance: it has not been readied.
        Strict {
            ready: false,
            calls: self.calls.clone(),
        }
    }
}

impl Service<Request<RequestBody<Full<Bytes>>>> for Strict {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.ready = true;
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _req: Request<RequestBody<Full<Bytes>>>) -> Self::Future {
        assert!(self.ready, "called without poll_ready");
        self.ready = false;
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        ready(Ok(Response::new(Full::new(Bytes::from(format!(
            "call {n}"
        ))))))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inner_service_is_always_readied_before_call() {
    let calls = Arc::new(AtomicUsize::new(0));
    let mut svc = IdempotencyLayer::new(MemoryStore::new()).layer(Strict {
        ready: false,
        calls: calls.clone(),
    });
    let req = |method: &str, key: &str| {
        Request::builder()
            .method(method)
            .uri("/x")
            .header("idempotency-key", key)
            .body(Full::new(Bytes::from_static(b"body")))
            .unwrap()
    };
    // The same service instance, readied before each call, as a server drives it.
    for (method, key, want) in [
        ("POST", "a", "call 1"),
        ("POST", "a", "call 1"), // replay: inner not called
        ("POST", "b", "call 2"),
        ("GET", "a", "call 3"), // pass-through
        ("PATCH", "c", "call 4"),
    ] {
        let res = svc
            .ready()
            .await
            .unwrap()
            .call(req(method, key))
            .await
            .unwrap();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, want, "{method} {key}");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 4);
}

//! One execution per logical request under real concurrency: duplicates that arrive while the
//! first runs wait for it and receive the same response.

mod harness;

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{Router, body::Body, extract::State, routing::post};
use harness::*;
use http::Request;
use http_body_util::BodyExt;
use tower::{Service, ServiceExt};
use tower_idempotency::{IdempotencyLayer, MemoryStore};

#[derive(Clone)]
struct Pay {
    counter: Counter,
    gate: Gate,
}

async fn pay(State(p): State<Pay>, body: axum::body::Bytes) -> (http::StatusCode, String) {
    p.gate.wait().await;
    let n = p.counter.hit();
    (
        http::StatusCode::CREATED,
        format!("charge #{n}: {}", String::from_utf8_lossy(&body)),
    )
}

/// Counts requests that reached the layer, so the test knows when all are in.
#[derive(Clone)]
struct Entered<S> {
    inner: S,
    count: Arc<AtomicUsize>,
}

impl<S: Service<Request<Body>>> Service<Request<Body>> for Entered<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;
    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }
    fn call(&mut self, req: Request<Body>) -> S::Future {
        self.count.fetch_add(1, Ordering::SeqCst);
        self.inner.call(req)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_concurrent_duplicates_run_once() {
    const N: usize = 10_000;
    let pay_state = Pay {
        counter: Counter::default(),
        gate: Gate::default(),
    };
    let router = Router::new()
        .route("/payments", post(pay))
        .layer(IdempotencyLayer::new(MemoryStore::new()))
        .with_state(pay_state.clone());
    let entered = Arc::new(AtomicUsize::new(0));
    let svc = Entered {
        inner: router,
        count: entered.clone(),
    };

    let mut tasks = Vec::with_capacity(N);
    for _ in 0..N {
        let svc = svc.clone();
        tasks.push(tokio::spawn(async move {
            let req = Request::post("/payments")
                .header("idempotency-key", "\"pay-42\"")
                .body(Body::from("amount=4200"))
                .unwrap();
            let res = svc.oneshot(req).await.unwrap();
            let replayed = res.headers().get(REPLAYED).is_some_and(|v| v == "true");
            let status = res.status();
            let body = res.into_body().collect().await.unwrap().to_bytes();
            (status, replayed, body)
        }));
    }
    // Hold the handler until every request has entered the layer: they are all concurrent.
    assert!(
        eventually(Duration::from_secs(60), || entered.load(Ordering::SeqCst)
            == N)
        .await,
        "only {} of {N} requests entered",
        entered.load(Ordering::SeqCst)
    );
    pay_state.gate.open();

    let mut replayed = 0;
    let mut first = None;
    for t in tasks {
        let (status, was_replayed, body) = t.await.unwrap();
        let first = first.get_or_insert_with(|| (status, body.clone()));
        assert_eq!((status, &body), (first.0, &first.1));
        replayed += usize::from(was_replayed);
    }
    assert_eq!(pay_state.counter.get(), 1, "handler executions");
    let (status, body) = first.unwrap();
    assert_eq!(status, 201);
    assert_eq!(body, "charge #1: amount=4200");
    assert_eq!(replayed, N - 1, "all but the leader's response are replays");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_duplicates_over_http_without_a_key_run_once() {
    // A double click: identical POSTs, no key; the derived key catches them.
    const N: usize = 300;
    let pay_state = Pay {
        counter: Counter::default(),
        gate: Gate::default(),
    };
    let entered = Arc::new(AtomicUsize::new(0));
    let count = entered.clone();
    let app = Router::new()
        .route("/payments", post(pay))
        .layer(IdempotencyLayer::new(MemoryStore::new()))
        .layer(axum::middleware::map_request(move |req: Request<Body>| {
            count.fetch_add(1, Ordering::SeqCst);
            async move { req }
        }))
        .with_state(pay_state.clone());
    let addr = serve(app).await;
    let client = client();
    let tasks: Vec<_> = (0..N)
        .map(|_| {
            let req = client
                .post(format!("http://{addr}/payments"))
                .header("authorization", "Bearer alice")
                .body("amount=10")
                .send();
            tokio::spawn(async move {
                let res = req.await.unwrap();
                let replayed = is_replayed(&res);
                (res.status(), replayed, res.text().await.unwrap())
            })
        })
        .collect();
    // Release the handler once every request has reached the layer.
    assert!(
        eventually(Duration::from_secs(60), || entered.load(Ordering::SeqCst)
            == N)
        .await
    );
    pay_state.gate.open();
    let mut replayed = 0;
    for t in tasks {
        let (status, was_replayed, body) = t.await.unwrap();
        assert_eq!(status, 201);
        assert_eq!(body, "charge #1: amount=10");
        replayed += usize::from(was_replayed);
    }
    assert_eq!(pay_state.counter.get(), 1);
    assert_eq!(replayed, N - 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distinct_requests_are_not_coalesced() {
    let pay_state = Pay {
        counter: Counter::default(),
        gate: Gate::default(),
    };
    pay_state.gate.open();
    let app = Router::new()
        .route("/payments", post(pay))
        .layer(IdempotencyLayer::new(MemoryStore::new()))
        .with_state(pay_state.clone());
    let addr = serve(app).await;
    let client = client();
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let req = client
                .post(format!("http://{addr}/payments"))
                .header("idempotency-key", format!("order-{i}"))
                .body(format!("amount={i}"))
                .send();
            tokio::spawn(async move { req.await.unwrap().status() })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), 201);
    }
    assert_eq!(pay_state.counter.get(), 200);
}

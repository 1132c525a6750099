//! Methods outside the policy pass through untouched: the handler runs every time and no
//! response is marked as a replay.

mod harness;

use axum::{Router, extract::State, routing::any};
use harness::*;
use http::Method;
use tower_idempotency::{IdempotencyLayer, MemoryStore};

async fn handler(State(c): State<Counter>) -> String {
    format!("run #{}", c.hit())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uncovered_methods_pass_through() {
    let counter = Counter::default();
    let app = Router::new()
        .route("/r", any(handler))
        .layer(IdempotencyLayer::new(MemoryStore::new()).max_body(8))
        .with_state(counter.clone());
    let addr = serve(app).await;
    let client = client();
    let methods = [
        Method::GET,
        Method::HEAD,
        Method::OPTIONS,
        Method::PUT,
        Method::DELETE,
    ];
    let mut expected = 0;
    for method in methods {
        for _ in 0..2 {
            // A key, and a body over the layer's limit: neither matters when uncovered.
            let res = client
                .request(method.clone(), format!("http://{addr}/r"))
                .header("idempotency-key", "k")
                .body("a body longer than eight bytes")
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), 200, "{method}");
            assert!(!is_replayed(&res), "{method}");
            expected += 1;
        }
        assert_eq!(counter.get(), expected, "{method} runs every time");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn covered_methods_are_configurable() {
    let counter = Counter::default();
    let app = Router::new()
        .route("/r", any(handler))
        .layer(IdempotencyLayer::new(MemoryStore::new()).methods([Method::PUT]))
        .with_state(counter.clone());
    let addr = serve(app).await;
    let client = client();
    for _ in 0..2 {
        client
            .put(format!("http://{addr}/r"))
            .header("idempotency-key", "k")
            .send()
            .await
            .unwrap();
        client
            .post(format!("http://{addr}/r"))
            .header("idempotency-key", "k")
            .send()
            .await
            .unwrap();
    }
    // PUT ran once (covered), POST twice (no longer covered).
    assert_eq!(counter.get(), 3);
}

//! A streamed response with `RedisStore`: stored at the end of the stream and replayed on
//! another instance; a duplicate there while it streams waits for the outcome.
#![cfg(feature = "redis")]

mod harness;
#[path = "support/redis_server.rs"]
mod redis_server;

use std::time::Duration;

use axum::{Router, routing::post};
use harness::{sse::*, *};
use redis_server::RedisServer;
use tower_idempotency::{IdempotencyLayer, RedisStore};

async fn instance(server: &RedisServer, g: &Gen) -> String {
    let store = RedisStore::connect(server.url()).await.expect("connect");
    let app = Router::new()
        .route("/v1/completions", post(generate))
        .layer(IdempotencyLayer::new(store))
        .with_state(g.clone());
    let addr = serve(app).await;
    format!("http://{addr}/v1/completions")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_is_stored_and_replayed_across_instances() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let g = Gen::default();
    let (a, b) = (instance(&server, &g).await, instance(&server, &g).await);
    let client = client();
    let send = |url: &str| {
        client
            .post(url)
            .header("idempotency-key", "completion-9")
            .body("{\"prompt\":\"hi\"}")
            .send()
    };
    let leader = send(&a).await.unwrap();
    assert!(!is_replayed(&leader));
    let reading = tokio::spawn(read_all(leader));
    assert!(eventually(Duration::from_secs(10), || g.produced.get() >= 10).await);

    // On the other instance while it streams: waits for the end, then gets all of it.
    let dup = send(&b).await.unwrap();
    assert!(is_replayed(&dup));
    assert_eq!(
        g.produced.get(),
        EVENTS,
        "answered only after the stream ended"
    );
    assert_eq!(read_all(dup).await.unwrap(), whole_stream());
    assert_eq!(reading.await.unwrap().unwrap(), whole_stream());

    for url in [&a, &b] {
        let later = send(url).await.unwrap();
        assert!(is_replayed(&later));
        assert_eq!(later.headers()["content-type"], "text/event-stream");
        assert_eq!(read_all(later).await.unwrap(), whole_stream());
    }
    assert_eq!(g.runs.get(), 1);
}

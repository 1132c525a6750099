//! Streaming responses (SSE): relayed frame by frame to the leader, teed to duplicates that
//! attach mid-stream, kept to the end when the leader's client leaves, and stored for replay.

mod harness;

use std::time::Duration;

use axum::{Router, routing::post};
use harness::{sse::*, *};
use tokio::time::Instant;
use tower_idempotency::{IdempotencyLayer, MemoryStore};

async fn start(layer: IdempotencyLayer<MemoryStore>) -> (Gen, String) {
    let g = Gen::default();
    let app = Router::new()
        .route("/v1/completions", post(generate))
        .layer(layer)
        .with_state(g.clone());
    let addr = serve(app).await;
    (g, format!("http://{addr}/v1/completions"))
}

fn request(client: &reqwest::Client, url: &str) -> reqwest::RequestBuilder {
    client
        .post(url)
        .header("idempotency-key", "completion-1")
        .body("{\"prompt\":\"hi\"}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_is_relayed_live_teed_mid_stream_and_replayed() {
    let (g, url) = start(IdempotencyLayer::new(MemoryStore::new())).await;
    let client = client();

    let sent = Instant::now();
    let mut leader = request(&client, &url).send().await.unwrap();
    let first = leader.chunk().await.unwrap().unwrap();
    let ttfb = sent.elapsed();
    assert_eq!(first, event(0));
    assert!(
        ttfb < Duration::from_millis(50),
        "first event after {ttfb:?}: the stream must not be buffered"
    );
    let rest = tokio::spawn(read_all(leader));

    // A duplicate in the middle of the stream.
    assert!(eventually(Duration::from_secs(10), || g.produced.get() >= 10).await);
    let dup = request(&client, &url).send().await.unwrap();
    assert!(is_replayed(&dup));
    let dup = read_all(dup).await.unwrap();

    let mut leader_bytes = first.to_vec();
    leader_bytes.extend(rest.await.unwrap().unwrap());
    assert_eq!(leader_bytes, whole_stream());
    assert_eq!(
        dup,
        whole_stream(),
        "the mid-stream duplicate gets every frame"
    );

    // After the end: replayed from the store.
    let later = request(&client, &url).send().await.unwrap();
    assert!(is_replayed(&later));
    assert_eq!(later.headers()["content-type"], "text/event-stream");
    assert_eq!(read_all(later).await.unwrap(), whole_stream());
    assert_eq!(g.runs.get(), 1);
    assert_eq!(g.produced.get(), EVENTS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_leaving_mid_stream_does_not_stop_the_generation() {
    let (g, url) = start(IdempotencyLayer::new(MemoryStore::new())).await;
    let client = client();
    let mut leader = request(&client, &url).send().await.unwrap();
    let mut got = 0;
    while got < 5 {
        leader.chunk().await.unwrap().unwrap();
        got += 1;
    }
    drop(leader); // the client goes away after five events
    assert!(
        eventually(Duration::from_secs(10), || g.produced.get() == EVENTS).await,
        "the paid generation runs to its end"
    );
    // The outcome is stored right after the last frame; a retry replays all 40 events.
    let retry = async {
        loop {
            let res = request(&client, &url).send().await.unwrap();
            if is_replayed(&res) {
                return read_all(res).await.unwrap();
            }
        }
    };
    let replayed = tokio::time::timeout(Duration::from_secs(10), retry)
        .await
        .unwrap();
    assert_eq!(replayed, whole_stream());
    assert_eq!(g.runs.get(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_fails_truncates_for_everyone_and_a_retry_runs_again() {
    let (g, url) = start(IdempotencyLayer::new(MemoryStore::new())).await;
    let url = format!("{url}?fail_at=20");
    let client = client();
    let leader = request(&client, &url).send().await.unwrap();
    assert!(eventually(Duration::from_secs(10), || g.produced.get() >= 5).await);
    let dup = request(&client, &url).send().await.unwrap();
    assert!(is_replayed(&dup));
    let (leader_got, leader_err) = read_all(leader).await.unwrap_err();
    let (dup_got, _) = read_all(dup).await.unwrap_err();
    let first_twenty: Vec<u8> = (0..20).flat_map(|i| event(i).to_vec()).collect();
    assert_eq!(leader_got, first_twenty, "{leader_err}");
    assert_eq!(dup_got, first_twenty);
    assert_eq!(g.runs.get(), 1);

    // Not stored: the retry runs the generation again (and fails again at 20).
    let retry = request(&client, &url).send().await.unwrap();
    assert!(!is_replayed(&retry));
    assert!(read_all(retry).await.is_err());
    assert_eq!(g.runs.get(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_over_the_limit_reaches_attached_clients_but_is_not_replayable() {
    // Far less than the 40 events: the recording stops early.
    let layer = IdempotencyLayer::new(MemoryStore::new()).max_stored_response(512);
    let (g, url) = start(layer).await;
    let client = client();
    let leader = request(&client, &url).send().await.unwrap();
    // Attached before the limit is passed (the first events are small).
    let dup = request(&client, &url).send().await.unwrap();
    assert!(is_replayed(&dup));
    let (a, b) = tokio::join!(read_all(leader), read_all(dup));
    assert_eq!(a.unwrap(), whole_stream());
    assert_eq!(b.unwrap(), whole_stream());
    let later = request(&client, &url).send().await.unwrap();
    let body = assert_problem(later, 409, "not-replayable").await;
    assert!(body.contains("will not run again"));
    assert_eq!(g.runs.get(), 1);
}

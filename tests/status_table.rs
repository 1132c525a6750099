//! Every row of the README's status table, over real HTTP: axum on 127.0.0.1:0 and reqwest.

mod harness;

use std::{sync::Arc, time::Duration};

use axum::{
    Extension, Router,
    body::Bytes,
    extract::{RawQuery, State},
    http::{HeaderValue, StatusCode},
    response::IntoResponse,
    routing::post,
};
use harness::*;
use tower_idempotency::{
    Concurrent, DoNotStore, FailureMode, IdempotencyLayer, KeyMode, MemoryStore, Record, Store,
    StoreError, StoreKey,
    problem::Problem,
    store::{Claim, ClaimRequest, Token},
};

#[derive(Clone)]
struct App {
    counter: Counter,
    gate: Option<Gate>,
    started: Counter,
}

/// `?status=N&size=N` of the test handler.
#[derive(Default)]
struct Params {
    status: Option<u16>,
    size: Option<usize>,
}

fn params(query: Option<String>) -> Params {
    let mut p = Params::default();
    for pair in query.unwrap_or_default().split('&') {
        match pair.split_once('=') {
            Some(("status", v)) => p.status = v.parse().ok(),
            Some(("size", v)) => p.size = v.parse().ok(),
            _ => {}
        }
    }
    p
}

async fn pay(State(app): State<App>, RawQuery(q): RawQuery, body: Bytes) -> impl IntoResponse {
    let p = params(q);
    app.started.hit();
    if let Some(g) = &app.gate {
        g.wait().await;
    }
    let n = app.counter.hit();
    let status = StatusCode::from_u16(p.status.unwrap_or(201)).unwrap();
    let body = match p.size {
        Some(size) => "x".repeat(size),
        None => format!("charge #{n} for {}", String::from_utf8_lossy(&body)),
    };
    (status, body)
}

fn router(layer: IdempotencyLayer<MemoryStore>, app: App) -> Router {
    Router::new()
        .route("/pay", post(pay))
        .layer(layer)
        .with_state(app)
}

fn app() -> App {
    App {
        counter: Counter::default(),
        gate: None,
        started: Counter::default(),
    }
}

/// Serves one counted `POST` route behind `layer`; returns the counter and the route's URL.
async fn serve_route<H, T, St>(handler: H, layer: IdempotencyLayer<St>) -> (Counter, String)
where
    H: axum::handler::Handler<T, Counter>,
    T: 'static,
    St: Store,
{
    let counter = Counter::default();
    let app = Router::new()
        .route("/r", post(handler))
        .layer(layer)
        .with_state(counter.clone());
    let addr = serve(app).await;
    (counter, format!("http://{addr}/r"))
}

/// Serves `layer` with the handler held behind a closed gate, sends the first `POST` with
/// `key` and `body`, and returns once the handler runs: the gate, the app, the URL and the
/// first request's task.
async fn hold_first(
    layer: IdempotencyLayer<MemoryStore>,
    key: &'static str,
    body: &'static str,
) -> (
    Gate,
    App,
    String,
    tokio::task::JoinHandle<reqwest::Result<reqwest::Response>>,
) {
    let gate = Gate::default();
    let app = App {
        gate: Some(gate.clone()),
        ..app()
    };
    let url = start(layer, &app).await;
    let first = tokio::spawn(
        client()
            .post(&url)
            .header("idempotency-key", key)
            .body(body)
            .send(),
    );
    assert!(eventually(Duration::from_secs(10), || app.started.get() == 1).await);
    (gate, app, url, first)
}

async fn start(layer: IdempotencyLayer<MemoryStore>, app: &App) -> String {
    let addr = serve(router(layer, app.clone())).await;
    format!("http://{addr}/pay")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_keys_are_400_and_never_run() {
    let app = app();
    let url = start(IdempotencyLayer::new(MemoryStore::new()), &app).await;
    let client = client();
    let cases: Vec<(&str, Vec<&[u8]>)> = vec![
        ("empty", vec![b""]),
        ("empty sf-string", vec![b"\"\""]),
        ("too long", vec!["k".repeat(256).leak().as_bytes()]),
        ("non-ascii", vec![b"caf\xc3\xa9"]),
        ("control char in string", vec![b"\"a\tb\""]),
        ("two header lines", vec![b"a", b"b"]),
        ("comma list", vec![b"a, b"]),
        ("list of strings", vec![b"\"a\", \"b\""]),
        ("unterminated string", vec![b"\"abc"]),
    ];
    for (what, values) in cases {
        let mut req = client.post(&url).body("x").build().unwrap();
        for v in values {
            req.headers_mut()
                .append("idempotency-key", HeaderValue::from_bytes(v).unwrap());
        }
        let res = client.execute(req).await.unwrap();
        let body = assert_problem(res, 400, "invalid-key").await;
        assert!(body.contains("Idempotency-Key"), "{what}: {body}");
    }
    assert_eq!(app.counter.get(), 0);

    // The longest valid key, and the same key as sf-string and token, are accepted.
    let long = "k".repeat(255);
    let res = client
        .post(&url)
        .header("idempotency-key", &long)
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let res = client
        .post(&url)
        .header("idempotency-key", format!("\"{long}\""))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    assert!(
        is_replayed(&res),
        "sf-string and bare token name the same key"
    );
    assert_eq!(app.counter.get(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_key_missing_is_400() {
    let app = app();
    let layer = IdempotencyLayer::new(MemoryStore::new()).key_mode(KeyMode::Required);
    let url = start(layer, &app).await;
    let res = client().post(&url).body("x").send().await.unwrap();
    assert_problem(res, 400, "missing-key").await;
    assert_eq!(app.counter.get(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn optional_key_missing_passes_through() {
    let app = app();
    let layer = IdempotencyLayer::new(MemoryStore::new()).key_mode(KeyMode::Optional);
    let url = start(layer, &app).await;
    let client = client();
    for _ in 0..2 {
        let res = client.post(&url).body("x").send().await.unwrap();
        assert_eq!(res.status(), 201);
        assert!(!is_replayed(&res));
    }
    assert_eq!(app.counter.get(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_over_limit_is_413_without_running() {
    let app = app();
    let layer = IdempotencyLayer::new(MemoryStore::new()).max_body(1024);
    let url = start(layer, &app).await;
    // The server answers 413 without reading the body, then closes that connection: no
    // pooling, so no request lands on a connection the server is closing.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();

    // Declared by Content-Length: refused before reading.
    let res = client
        .post(&url)
        .header("idempotency-key", "big")
        .body(vec![b'a'; 2048])
        .send()
        .await
        .unwrap();
    assert_problem(res, 413, "body-too-large").await;

    // Chunked, no Content-Length: refused once it grows past the limit.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..8).map(|_| Ok(vec![b'b'; 512])).collect();
    let res = client
        .post(&url)
        .header("idempotency-key", "chunked")
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .unwrap();
    assert_problem(res, 413, "body-too-large").await;
    assert_eq!(app.counter.get(), 0);

    // At the limit exactly: runs.
    let res = client
        .post(&url)
        .header("idempotency-key", "fits")
        .body(vec![b'a'; 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    assert_eq!(app.counter.get(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_reused_with_another_body_is_422() {
    let app = app();
    let url = start(IdempotencyLayer::new(MemoryStore::new()), &app).await;
    let client = client();
    let send = |body: &'static str| {
        client
            .post(&url)
            .header("idempotency-key", "order-1")
            .body(body)
            .send()
    };
    assert_eq!(send("amount=1").await.unwrap().status(), 201);
    assert_problem(send("amount=100").await.unwrap(), 422, "key-reused").await;
    // Another query string is another request too.
    let res = client
        .post(format!("{url}?amount=100"))
        .header("idempotency-key", "order-1")
        .body("amount=1")
        .send()
        .await
        .unwrap();
    assert_problem(res, 422, "key-reused").await;
    assert_eq!(app.counter.get(), 1);
}

/// The fingerprint covers the method and the path too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_reused_with_another_method_or_path_is_422() {
    let app = app();
    let router = Router::new()
        .route("/pay", post(pay).patch(pay))
        .route("/refund", post(pay))
        .layer(IdempotencyLayer::new(MemoryStore::new()))
        .with_state(app.clone());
    let addr = serve(router).await;
    let client = client();
    let send = |method: reqwest::Method, path: &str| {
        client
            .request(method, format!("http://{addr}{path}"))
            .header("idempotency-key", "order-2")
            .body("amount=1")
            .send()
    };
    assert_eq!(
        send(reqwest::Method::POST, "/pay").await.unwrap().status(),
        201
    );
    let res = send(reqwest::Method::PATCH, "/pay").await.unwrap();
    assert_problem(res, 422, "key-reused").await;
    let res = send(reqwest::Method::POST, "/refund").await.unwrap();
    assert_problem(res, 422, "key-reused").await;
    assert_eq!(app.counter.get(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_reused_while_in_flight_is_422() {
    let (gate, app, url, first) =
        hold_first(IdempotencyLayer::new(MemoryStore::new()), "k", "a").await;
    let client = client();
    let res = client
        .post(&url)
        .header("idempotency-key", "k")
        .body("b")
        .send()
        .await
        .unwrap();
    assert_problem(res, 422, "key-reused").await;
    gate.open();
    assert_eq!(first.await.unwrap().unwrap().status(), 201);
    assert_eq!(app.counter.get(), 1);
}

/// "Forever" settings: a duplicate that waits computes its deadline from `max_wait`, the store
/// step's from `store_timeout`, the claim's from `lease` and the record's from the TTL; none
/// may overflow (they used to panic at request time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unbounded_durations_do_not_panic() {
    let layer = IdempotencyLayer::new(MemoryStore::new())
        .max_wait(Duration::MAX)
        .store_timeout(Duration::MAX)
        .lease(Duration::MAX)
        .client_key_ttl(Duration::MAX);
    let (gate, app, url, first) = hold_first(layer, "forever", "a").await;
    let duplicate = tokio::spawn(
        client()
            .post(&url)
            .header("idempotency-key", "forever")
            .body("a")
            .send(),
    );
    // Time for the duplicate to reach the layer and start waiting; if it is late, it is
    // replayed instead, and the test still checks the TTL arithmetic.
    tokio::time::sleep(Duration::from_millis(200)).await;
    gate.open();
    let res = first.await.unwrap().unwrap();
    assert_eq!(res.status(), 201);
    let res = duplicate.await.unwrap().unwrap();
    assert_eq!(res.status(), 201);
    assert!(is_replayed(&res));
    assert_eq!(app.counter.get(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_wait_exceeded_is_409_with_retry_after() {
    let layer = IdempotencyLayer::new(MemoryStore::new()).max_wait(Duration::from_millis(200));
    let (gate, app, url, first) = hold_first(layer, "slow", "a").await;
    let client = client();
    let res = client
        .post(&url)
        .header("idempotency-key", "slow")
        .body("a")
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers()["retry-after"], "1");
    assert_problem(res, 409, "in-flight").await;
    gate.open();
    let res = first.await.unwrap().unwrap();
    assert_eq!(res.status(), 201);
    assert!(!is_replayed(&res));
    // Once done, the duplicate is replayed.
    let res = client
        .post(&url)
        .header("idempotency-key", "slow")
        .body("a")
        .send()
        .await
        .unwrap();
    assert!(is_replayed(&res));
    assert_eq!(app.counter.get(), 1);
    assert_eq!(app.started.get(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_reject_is_409_at_once() {
    // A wait long enough that a waiting duplicate would outlive the timeout below.
    let layer = IdempotencyLayer::new(MemoryStore::new())
        .concurrent(Concurrent::Reject)
        .max_wait(Duration::from_secs(600));
    let (gate, app, url, first) = hold_first(layer, "strict", "a").await;
    let client = client();
    let dup = client
        .post(&url)
        .header("idempotency-key", "strict")
        .body("a")
        .send();
    let res = tokio::time::timeout(Duration::from_secs(20), dup)
        .await
        .expect("answered while the original still runs")
        .unwrap();
    assert_eq!(res.headers()["retry-after"], "1");
    assert_problem(res, 409, "in-flight").await;
    assert_eq!(
        app.counter.get(),
        0,
        "the original is still held at the gate"
    );
    gate.open();
    assert_eq!(first.await.unwrap().unwrap().status(), 201);
    assert_eq!(app.counter.get(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_and_throttles_are_not_stored_and_a_retry_runs_again() {
    let app = app();
    let url = start(IdempotencyLayer::new(MemoryStore::new()), &app).await;
    let client = client();
    let mut expected = 0;
    for status in [500u16, 502, 503, 408, 425, 429] {
        let key = format!("k-{status}");
        for _ in 0..2 {
            let res = client
                .post(format!("{url}?status={status}"))
                .header("idempotency-key", &key)
                .body("a")
                .send()
                .await
                .unwrap();
            assert_eq!(res.status().as_u16(), status);
            assert!(!is_replayed(&res), "{status} must not be replayed");
            expected += 1;
        }
        assert_eq!(app.counter.get(), expected, "{status} runs again on retry");
    }
    // Other 4xx are the outcome of the request: stored and replayed.
    for status in [400u16, 404, 409, 422] {
        let key = format!("k-{status}");
        for attempt in 0..2 {
            let res = client
                .post(format!("{url}?status={status}"))
                .header("idempotency-key", &key)
                .body("a")
                .send()
                .await
                .unwrap();
            assert_eq!(res.status().as_u16(), status);
            assert_eq!(is_replayed(&res), attempt == 1);
        }
        expected += 1;
        assert_eq!(app.counter.get(), expected, "{status} is stored");
    }
}

async fn vetoed(State(c): State<Counter>) -> impl IntoResponse {
    let n = c.hit();
    (Extension(DoNotStore), format!("quote #{n}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_veto_is_respected() {
    let (counter, url) = serve_route(vetoed, IdempotencyLayer::new(MemoryStore::new())).await;
    let client = client();
    for n in 1..=2 {
        let res = client
            .post(url.as_str())
            .header("idempotency-key", "q")
            .send()
            .await
            .unwrap();
        assert!(!is_replayed(&res));
        assert_eq!(res.text().await.unwrap(), format!("quote #{n}"));
    }
    assert_eq!(counter.get(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_response_reaches_the_leader_and_is_never_run_again() {
    let app = app();
    let layer = IdempotencyLayer::new(MemoryStore::new()).max_stored_response(1024);
    let url = start(layer, &app).await;
    let client = client();
    let send = || {
        client
            .post(format!("{url}?size=4096"))
            .header("idempotency-key", "report")
            .body("a")
            .send()
    };
    let res = send().await.unwrap();
    assert_eq!(res.status(), 201);
    assert_eq!(res.text().await.unwrap(), "x".repeat(4096));
    let body = assert_problem(send().await.unwrap(), 409, "not-replayable").await;
    assert!(body.contains("will not run again"), "{body}");
    assert_eq!(app.counter.get(), 1);
}

async fn events(State(c): State<Counter>) -> impl IntoResponse {
    c.hit();
    (
        [("content-type", "text/event-stream")],
        "data: one\n\ndata: two\n\n",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_stream_is_relayed_then_replayed() {
    let (counter, url) = serve_route(events, IdempotencyLayer::new(MemoryStore::new())).await;
    let client = client();
    let send = || {
        client
            .post(url.as_str())
            .header("idempotency-key", "gen-1")
            .send()
    };
    let res = send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert!(!is_replayed(&res));
    assert_eq!(res.text().await.unwrap(), "data: one\n\ndata: two\n\n");
    let res = send().await.unwrap();
    assert!(is_replayed(&res));
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    assert_eq!(res.text().await.unwrap(), "data: one\n\ndata: two\n\n");
    assert_eq!(counter.get(), 1);
}

#[derive(Clone, Default)]
struct PanicAfterGate {
    started: Counter,
    gate: Gate,
}

async fn panics_after_gate(State(s): State<PanicAfterGate>) -> &'static str {
    s.started.hit();
    s.gate.wait().await;
    panic!("handler bug while a duplicate waits");
}

/// Duplicates waiting on an original that panics get the 500 problem (with `Retry-After`),
/// not a hang and not a second run of their own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_of_a_panicking_original_get_500() {
    let state = PanicAfterGate::default();
    let arrived = Counter::default();
    let router = Router::new()
        .route("/boom", post(panics_after_gate))
        .layer(IdempotencyLayer::new(MemoryStore::new()))
        .layer(count_arrivals(arrived.clone()))
        .with_state(state.clone());
    let addr = serve(router).await;
    let send = || {
        client()
            .post(format!("http://{addr}/boom"))
            .header("idempotency-key", "boom-2")
            .send()
    };
    let first = tokio::spawn(send());
    assert!(eventually(Duration::from_secs(10), || state.started.get() == 1).await);
    let waiters: Vec<_> = (0..3).map(|_| tokio::spawn(send())).collect();
    assert!(eventually(Duration::from_secs(10), || arrived.get() == 4).await);
    state.gate.open();
    let res = first.await.unwrap().unwrap();
    assert_problem(res, 500, "first-attempt-failed").await;
    for w in waiters {
        let res = w.await.unwrap().unwrap();
        assert_eq!(res.headers()["retry-after"], "1");
        assert_problem(res, 500, "first-attempt-failed").await;
    }
    assert_eq!(state.started.get(), 1, "a waiter ran the handler itself");
}

async fn panics_first(State(c): State<Counter>) -> &'static str {
    if c.hit() == 1 {
        panic!("handler bug on first call");
    }
    "ok"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panicking_handler_is_500_then_a_retry_runs() {
    let (counter, url) = serve_route(panics_first, IdempotencyLayer::new(MemoryStore::new())).await;
    let client = client();
    let send = || {
        client
            .post(url.as_str())
            .header("idempotency-key", "boom")
            .send()
    };
    let res = send().await.unwrap();
    assert_eq!(res.headers()["retry-after"], "1");
    assert_problem(res, 500, "first-attempt-failed").await;
    let res = send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert!(!is_replayed(&res));
    assert_eq!(res.text().await.unwrap(), "ok");
    assert_eq!(counter.get(), 2);
}

async fn counted_ok(State(c): State<Counter>) -> &'static str {
    c.hit();
    "ok"
}

/// A store whose every operation fails, as an unreachable Redis would.
struct DownStore;

fn down() -> StoreError {
    StoreError::Unavailable("connection refused".into())
}

impl Store for DownStore {
    async fn claim(&self, _: StoreKey, _: ClaimRequest) -> Result<Claim, StoreError> {
        Err(down())
    }
    async fn complete(
        &self,
        _: StoreKey,
        _: Token,
        _: Arc<Record>,
        _: Duration,
    ) -> Result<bool, StoreError> {
        Err(down())
    }
    async fn release(&self, _: StoreKey, _: Token) -> Result<bool, StoreError> {
        Err(down())
    }
    async fn extend(&self, _: StoreKey, _: Token, _: Duration) -> Result<bool, StoreError> {
        Err(down())
    }
    async fn wait(&self, _: StoreKey, _: Duration) -> Result<(), StoreError> {
        Err(down())
    }
}

/// A `MemoryStore` with faults a real store can have: lease renewals that hang until a gate
/// opens (a slow Redis), and waits that always fail (claims still answer).
#[derive(Clone, Default)]
struct Faulty {
    store: MemoryStore,
    renewal_gate: Option<Gate>,
    renewals: Counter,
    waits_fail: bool,
}

impl Store for Faulty {
    async fn claim(&self, key: StoreKey, req: ClaimRequest) -> Result<Claim, StoreError> {
        self.store.claim(key, req).await
    }
    async fn complete(
        &self,
        key: StoreKey,
        token: Token,
        record: Arc<Record>,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        self.store.complete(key, token, record, ttl).await
    }
    async fn release(&self, key: StoreKey, token: Token) -> Result<bool, StoreError> {
        self.store.release(key, token).await
    }
    async fn extend(
        &self,
        key: StoreKey,
        token: Token,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        self.renewals.hit();
        if let Some(gate) = &self.renewal_gate {
            gate.wait().await;
        }
        self.store.extend(key, token, lease).await
    }
    async fn wait(&self, key: StoreKey, timeout: Duration) -> Result<(), StoreError> {
        if self.waits_fail {
            return Err(down());
        }
        self.store.wait(key, timeout).await
    }
}

/// Works in 40 steps of 5 ms, counting each.
async fn stepping(State(steps): State<Counter>) -> &'static str {
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(5)).await;
        steps.hit();
    }
    "done"
}

/// The handler keeps running while a lease renewal waits on the store: the renewal is polled
/// beside the work, not instead of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_lease_renewal_does_not_stall_the_handler() {
    let gate = Gate::default();
    let store = Faulty {
        renewal_gate: Some(gate.clone()),
        ..Faulty::default()
    };
    let layer = IdempotencyLayer::new(store.clone())
        .lease(Duration::from_millis(30))
        .store_timeout(Duration::from_secs(30));
    let (steps, url) = serve_route(stepping, layer).await;
    let res = tokio::spawn(
        client()
            .post(url.as_str())
            .header("idempotency-key", "s")
            .send(),
    );
    assert!(eventually(Duration::from_secs(10), || store.renewals.get() >= 1).await);
    let at_renewal = steps.get();
    // The renewal is held at the gate; the handler must still finish all its steps.
    assert!(
        eventually(Duration::from_secs(10), || steps.get() == 40).await,
        "the handler stalled at step {} (step {at_renewal} when the renewal started)",
        steps.get()
    );
    assert!(
        at_renewal < 40,
        "the renewal started before the handler's work"
    );
    gate.open();
    let res = res.await.unwrap().unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.text().await.unwrap(), "done");
}

/// Fail-open is for a store that cannot decide. One that answered "held by another instance"
/// and then failed to wait has decided: the duplicate must not run beside the original.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_wait_never_runs_the_request_beside_the_holder() {
    let store = Faulty {
        waits_fail: true,
        ..Faulty::default()
    };
    let gate = Gate::default();
    let app = App {
        gate: Some(gate.clone()),
        ..app()
    };
    // Two instances: separate layers (no shared in-process coalescing), one store.
    let open = || IdempotencyLayer::new(store.clone()).failure_mode(FailureMode::Open);
    let addr1 = serve(
        Router::new()
            .route("/pay", post(pay))
            .layer(open())
            .with_state(app.clone()),
    )
    .await;
    let addr2 = serve(
        Router::new()
            .route("/pay", post(pay))
            .layer(open())
            .with_state(app.clone()),
    )
    .await;
    let send = |addr: std::net::SocketAddr| {
        client()
            .post(format!("http://{addr}/pay"))
            .header("idempotency-key", "held")
            .body("a")
            .send()
    };
    let first = tokio::spawn(send(addr1));
    assert!(eventually(Duration::from_secs(10), || app.started.get() == 1).await);
    let second = tokio::spawn(send(addr2));
    // The second instance claims, is told "in flight", and its wait fails; give it time to
    // do so a few times.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(app.started.get(), 1, "the duplicate ran beside the holder");
    gate.open();
    let res = first.await.unwrap().unwrap();
    assert_eq!(res.status(), 201);
    let res = second.await.unwrap().unwrap();
    assert_eq!(res.status(), 201);
    assert!(is_replayed(&res));
    assert_eq!(app.counter.get(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_down_fails_closed_with_503() {
    let (counter, url) = serve_route(counted_ok, IdempotencyLayer::new(DownStore)).await;
    let res = client()
        .post(url.as_str())
        .header("idempotency-key", "k")
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers()["retry-after"], "1");
    assert_problem(res, 503, "store-unavailable").await;
    assert_eq!(counter.get(), 0);
}

#[derive(Clone, Default)]
struct LogBuf(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogBuf {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

// Current-thread runtime: the server's tasks run on this thread, under this test's subscriber.
#[tokio::test]
async fn store_down_fails_open_with_a_warning() {
    let logs = LogBuf::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let (counter, url) = serve_route(
        counted_ok,
        IdempotencyLayer::new(DownStore).failure_mode(FailureMode::Open),
    )
    .await;
    let client = client();
    for _ in 0..2 {
        let res = client
            .post(url.as_str())
            .header("idempotency-key", "k")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        assert!(!is_replayed(&res));
    }
    assert_eq!(counter.get(), 2, "unprotected: each request runs");
    let logs = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("WARN"), "{logs}");
    assert!(logs.contains("fail open"), "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn problem_responses_can_be_replaced() {
    let app = app();
    let layer = IdempotencyLayer::new(MemoryStore::new()).problem_responder(|p: &Problem| {
        let mut res = p.to_response();
        res.headers_mut()
            .insert("x-problem", HeaderValue::from_static("custom"));
        res
    });
    let url = start(layer, &app).await;
    let res = client()
        .post(&url)
        .header("idempotency-key", "")
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers()["x-problem"], "custom");
    assert_problem(res, 400, "invalid-key").await;
}

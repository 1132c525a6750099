//! The same axum handler and 1 KiB POSTs through this crate, a peer crate, and the naive pattern.
//!
//! Four axum routers around one handler (reads the body, answers `201` with a small JSON):
//!
//! - `bare`: no idempotency, but still through `Router::layer` (with
//!   `tower::layer::util::Identity`), because `Router::layer` boxes every route: the ratios
//!   then show the middleware's own cost, not axum's boxing;
//! - `ours`: `IdempotencyLayer::new(MemoryStore::new())`, the defaults;
//! - `axum-idempotent` (crates.io 0.6), set up as its README says: `IdempotentLayer` keyed by
//!   the `Idempotency-Key` header, inside a `ruts` `SessionLayer` on a `MokaStore`, inside
//!   `CookieManagerLayer`. It caches only for requests that carry a live session, so every
//!   request carries a session cookie from a login route. For first executions each request
//!   gets a session of its own (logged in and out outside the clock): the peer's `MokaStore`
//!   scans every field of a session on each write, so this is its most favourable setup.
//!   In header mode it does not hash the request body (no 422 for a reused key);
//! - `naive`: the widely copied check-cache → call → store middleware, written here: a
//!   `Mutex<HashMap>` from key to response, no in-flight lock, no body fingerprint, no scope.
//!
//! Every request of every router carries the same headers (content type, key, a session
//! cookie). The variants run interleaved in chunks of 256 requests, rotating which goes first;
//! the ratios of summed times are the result. Then each router gets 100 concurrent duplicates
//! onto a handler that takes 10 ms, and the handler's execution count is printed: the
//! lock-less ones run it many times, ours must run it once (asserted).
//!
//! Targets (issue 5): at least 2x faster than `axum-idempotent` on first execution and replay.
//!
//! ```text
//! cargo bench --bench peers
//! ```

use std::{
    collections::HashMap,
    convert::Infallible,
    future::Future,
    hint::black_box,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use axum::{
    Router,
    body::{Body, Bytes, to_bytes},
    extract::{Request, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::Response,
    routing,
};
use axum_idempotent::{IdempotentLayer, IdempotentOptions};
use ruts::{CookieOptions, Session, SessionLayer, store::Ttl, store::moka::MokaStore};
use tokio::runtime::Runtime;
use tower::{Layer, Service, ServiceExt, layer::util::Identity};
use tower_cookies::CookieManagerLayer;
use tower_idempotency::{IdempotencyLayer, MemoryStore};

#[path = "support/mod.rs"]
mod support;

use support::{CHUNK, Totals, Variant, interleave};
const NAMES: [&str; 4] = ["bare", "ours", "axum-idempotent", "naive"];
const BARE: usize = 0;
const OURS: usize = 1;
const PEER: usize = 2;
const NAIVE: usize = 3;
/// A cookie of the peer's shape, for the routers that need none.
const FAKE_COOKIE: &str = "session=q2c0Yk9wVnR3b1lPbWlWUWxzQkxZQQ";

/// Handler state: its execution counter and how long it takes.
#[derive(Clone)]
struct App {
    runs: Arc<AtomicU64>,
    delay: Duration,
}

async fn pay(State(app): State<App>, body: Bytes) -> (StatusCode, HeaderMap, &'static str) {
    app.runs.fetch_add(1, Ordering::Relaxed);
    black_box(body);
    if !app.delay.is_zero() {
        tokio::time::sleep(app.delay).await;
    }
    let mut h = HeaderMap::new();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    (StatusCode::CREATED, h, "{\"id\":\"ch_123\",\"ok\":true}")
}

/// Starts a session (the peer caches only for requests that carry one).
async fn login(session: Session<MokaStore>) -> StatusCode {
    let ttl = Ttl::new(3600).unwrap();
    session.set("user", &"alice", ttl, None).await.unwrap();
    StatusCode::NO_CONTENT
}

async fn logout(session: Session<MokaStore>) -> StatusCode {
    session.delete().await.unwrap();
    StatusCode::NO_CONTENT
}

fn handler() -> Router<App> {
    Router::new().route("/v1/payments", routing::post(pay))
}

fn bare(app: App) -> Router {
    handler().layer(Identity::new()).with_state(app)
}

fn ours(app: App) -> Router {
    handler()
        .layer(IdempotencyLayer::new(MemoryStore::new()))
        .with_state(app)
}

/// `axum-idempotent` in the layer order its README gives.
fn peer(app: App) -> Router {
    let store = Arc::new(MokaStore::builder().build());
    let options = IdempotentOptions::default()
        .use_idempotency_key_header(Some("Idempotency-Key"), true)
        .expire_after(60 * 5);
    handler()
        .layer(IdempotentLayer::<MokaStore>::new(options))
        .route("/login", routing::post(login))
        .route("/logout", routing::post(logout))
        .layer(SessionLayer::new(store).with_cookie_options(CookieOptions::build().name("session")))
        .layer(CookieManagerLayer::new())
        .with_state(app)
}

fn naive(app: App) -> Router {
    handler().layer(NaiveLayer::default()).with_state(app)
}

/// The check-cache → call → store pattern: nothing stops two requests with one key from both
/// missing the cache and both running the handler.
#[derive(Clone, Default)]
struct NaiveLayer {
    cache: Arc<Mutex<HashMap<String, Cached>>>,
}

#[derive(Clone)]
struct Cached {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl<S> Layer<S> for NaiveLayer {
    type Service = Naive<S>;
    fn layer(&self, inner: S) -> Naive<S> {
        Naive {
            inner,
            cache: self.cache.clone(),
        }
    }
}

#[derive(Clone)]
struct Naive<S> {
    inner: S,
    cache: Arc<Mutex<HashMap<String, Cached>>>,
}

impl<S> Service<Request> for Naive<S>
where
    S: Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let cache = self.cache.clone();
        Box::pin(async move {
            let Some(key) = req
                .headers()
                .get("idempotency-key")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
            else {
                return inner.call(req).await;
            };
            // 1. check the cache
            let hit = cache.lock().unwrap().get(&key).cloned();
            if let Some(c) = hit {
                let mut res = Response::new(Body::from(c.body));
                *res.status_mut() = c.status;
                *res.headers_mut() = c.headers;
                res.headers_mut()
                    .insert("idempotent-replayed", HeaderValue::from_static("true"));
                return Ok(res);
            }
            // 2. call the handler
            let res = inner.call(req).await?;
            let (parts, body) = res.into_parts();
            let body = to_bytes(body, usize::MAX).await.unwrap_or_default();
            // 3. store the response
            if parts.status.is_success() {
                cache.lock().unwrap().insert(
                    key,
                    Cached {
                        status: parts.status,
                        headers: parts.headers.clone(),
                        body: body.clone(),
                    },
                );
            }
            Ok(Response::from_parts(parts, Body::from(body)))
        })
    }
}

fn post(body: &Bytes, key: &str, cookie: &str) -> Request {
    Request::post("/v1/payments")
        .header("content-type", "application/json")
        .header("idempotency-key", key)
        .header("cookie", cookie)
        .body(Body::from(body.clone()))
        .unwrap()
}

async fn call(router: &mut Router, req: Request) -> Response<Bytes> {
    let res = ServiceExt::<Request>::ready(router)
        .await
        .unwrap()
        .call(req)
        .await
        .unwrap();
    let (parts, body) = res.into_parts();
    Response::from_parts(parts, to_bytes(body, usize::MAX).await.unwrap())
}

/// Logs in on the peer router and returns the `name=value` of its session cookie.
async fn session_cookie(router: &mut Router) -> String {
    let req = Request::post("/login").body(Body::empty()).unwrap();
    let res = call(router, req).await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    let set = res
        .headers()
        .get_all(header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with("session="))
        .expect("the login sets the session cookie");
    set.split(';').next().unwrap().to_owned()
}

async fn end_session(router: &mut Router, cookie: &str) {
    let req = Request::post("/logout")
        .header("cookie", cookie)
        .body(Body::empty())
        .unwrap();
    black_box(call(router, req).await);
}

async fn drive(router: &mut Router, reqs: Vec<Request>) -> Duration {
    // The batch's buffer is freed after the clock stops: freeing it is the harness's cost
    // (glibc consolidates its free lists then), not the service's.
    let mut reqs = reqs.into_iter();
    let start = Instant::now();
    for req in reqs.by_ref() {
        let res = ServiceExt::<Request>::ready(router)
            .await
            .unwrap()
            .call(req)
            .await
            .unwrap();
        black_box(to_bytes(res.into_body(), usize::MAX).await.unwrap());
    }
    let took = start.elapsed();
    drop(reqs);
    took
}

/// A variant whose requests are built before the clock starts.
fn variant<'a>(mut router: Router, mut build: impl FnMut(u64) -> Request + 'a) -> Variant<'a> {
    Box::new(move |rt, from, n| {
        let reqs: Vec<_> = (from..from + n).map(&mut build).collect();
        rt.block_on(drive(&mut router, reqs))
    })
}

/// The peer with first executions: each request in a session of its own, started and ended
/// outside the clock.
fn peer_first<'a>(mut router: Router, body: Bytes) -> Variant<'a> {
    Box::new(move |rt, from, n| {
        rt.block_on(async {
            let mut cookies = Vec::with_capacity(n as usize);
            for _ in 0..n {
                cookies.push(session_cookie(&mut router).await);
            }
            let reqs = (from..from + n)
                .zip(&cookies)
                .map(|(i, c)| post(&body, &format!("key-{i}"), c))
                .collect();
            let t = drive(&mut router, reqs).await;
            for c in &cookies {
                end_session(&mut router, c).await;
            }
            t
        })
    })
}

fn app(delay: Duration) -> App {
    App {
        runs: Arc::new(AtomicU64::new(0)),
        delay,
    }
}

/// Checks that each middleware replays a sequential duplicate, so the timings compare work
/// that really happens.
fn sanity(rt: &Runtime, body: &Bytes) {
    rt.block_on(async {
        for (name, make, header) in [
            ("ours", ours as fn(App) -> Router, "idempotent-replayed"),
            ("axum-idempotent", peer, "idempotency-replayed"),
            ("naive", naive, "idempotent-replayed"),
        ] {
            let a = app(Duration::ZERO);
            let mut router = make(a.clone());
            let cookie = if name == "axum-idempotent" {
                session_cookie(&mut router).await
            } else {
                FAKE_COOKIE.to_owned()
            };
            let first = call(&mut router, post(body, "sanity", &cookie)).await;
            let second = call(&mut router, post(body, "sanity", &cookie)).await;
            assert_eq!(first.status(), StatusCode::CREATED, "{name}");
            assert_eq!(second.status(), StatusCode::CREATED, "{name}");
            assert_eq!(first.body(), second.body(), "{name}");
            assert!(second.headers().contains_key(header), "{name}: no replay");
            assert_eq!(a.runs.load(Ordering::Relaxed), 1, "{name}: ran twice");
        }
    });
}

/// 100 concurrent duplicates onto a 10 ms handler, `rounds` times; executions per round.
fn concurrent_runs(make: fn(App) -> Router, with_session: bool, rounds: u64) -> Vec<u64> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let body = Bytes::from(vec![b'x'; 1024]);
    rt.block_on(async {
        let a = app(Duration::from_millis(10));
        let mut router = make(a.clone());
        let cookie = if with_session {
            session_cookie(&mut router).await
        } else {
            FAKE_COOKIE.to_owned()
        };
        let mut per_round = Vec::new();
        for r in 0..rounds {
            let before = a.runs.load(Ordering::Relaxed);
            let key = format!("concurrent-{r}");
            let tasks: Vec<_> = (0..100)
                .map(|_| {
                    let req = post(&body, &key, &cookie);
                    let router = router.clone();
                    tokio::spawn(async move {
                        let res = router.oneshot(req).await.unwrap();
                        let status = res.status();
                        black_box(to_bytes(res.into_body(), usize::MAX).await.unwrap());
                        status
                    })
                })
                .collect();
            for t in tasks {
                assert_eq!(t.await.unwrap(), StatusCode::CREATED);
            }
            per_round.push(a.runs.load(Ordering::Relaxed) - before);
        }
        per_round
    })
}

fn main() {
    let mut c = support::criterion(20, Duration::from_millis(500), Duration::from_secs(3));
    let rt = support::current_thread();
    let body = Bytes::from((0..1024).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
    sanity(&rt, &body);
    let mut report: Vec<(&str, Vec<f64>)> = Vec::new();
    let mut seq = 0u64;

    // First execution: a fresh key every request.
    let totals = Totals::default();
    let (b0, b1, b3) = (body.clone(), body.clone(), body.clone());
    let mut variants = vec![
        variant(bare(app(Duration::ZERO)), move |i| {
            post(&b0, &format!("key-{i}"), FAKE_COOKIE)
        }),
        variant(ours(app(Duration::ZERO)), move |i| {
            post(&b1, &format!("key-{i}"), FAKE_COOKIE)
        }),
        peer_first(peer(app(Duration::ZERO)), body.clone()),
        variant(naive(app(Duration::ZERO)), move |i| {
            post(&b3, &format!("key-{i}"), FAKE_COOKIE)
        }),
    ];
    c.bench_function("peers/post_first/1024", |b| {
        b.iter_custom(|iters| interleave(&rt, iters, &mut variants, OURS, &totals, &mut seq))
    });
    drop(variants);
    if totals.0.lock().unwrap().1 > 0 {
        report.push(("POST 1 KiB first ", (0..4).map(|i| totals.ns(i)).collect()));
    }

    // Replay: one key completed before the run, in one session.
    let totals = Totals::default();
    let mut routers = [
        bare(app(Duration::ZERO)),
        ours(app(Duration::ZERO)),
        peer(app(Duration::ZERO)),
        naive(app(Duration::ZERO)),
    ];
    let peer_cookie = rt.block_on(session_cookie(&mut routers[PEER]));
    let mut variants: Vec<Variant<'_>> = Vec::new();
    for (i, mut router) in routers.into_iter().enumerate() {
        let cookie = if i == PEER {
            peer_cookie.clone()
        } else {
            FAKE_COOKIE.to_owned()
        };
        let warm = rt.block_on(call(&mut router, post(&body, "replayed", &cookie)));
        assert_eq!(warm.status(), StatusCode::CREATED);
        let body = body.clone();
        variants.push(variant(router, move |_| post(&body, "replayed", &cookie)));
    }
    c.bench_function("peers/post_replay/1024", |b| {
        b.iter_custom(|iters| interleave(&rt, iters, &mut variants, OURS, &totals, &mut seq))
    });
    drop(variants);
    if totals.0.lock().unwrap().1 > 0 {
        report.push(("POST 1 KiB replay", (0..4).map(|i| totals.ns(i)).collect()));
    }

    println!(
        "\n== 1 KiB POST through axum routers (same run, interleaved in chunks of {CHUNK}) =="
    );
    for (name, ns) in &report {
        println!(
            "{name}  ours/bare {:.2}  axum-idempotent/bare {:.2}  naive/bare {:.2}   ours is {:.2}x faster than axum-idempotent, {:.2}x the naive time   [{}]",
            ns[OURS] / ns[BARE],
            ns[PEER] / ns[BARE],
            ns[NAIVE] / ns[BARE],
            ns[PEER] / ns[OURS],
            ns[OURS] / ns[NAIVE],
            NAMES
                .iter()
                .zip(ns)
                .map(|(n, t)| format!("{n} {t:.0} ns"))
                .collect::<Vec<_>>()
                .join(", "),
        );
    }

    println!(
        "\n== handler executions under 100 concurrent duplicates (10 ms handler), per round =="
    );
    let rounds = 5;
    for (i, make, session) in [
        (BARE, bare as fn(App) -> Router, false),
        (OURS, ours, false),
        (PEER, peer, true),
        (NAIVE, naive, false),
    ] {
        let runs = concurrent_runs(make, session, rounds);
        println!("{:<16} {runs:?}", NAMES[i]);
        if i == OURS {
            assert!(runs.iter().all(|&r| r == 1), "ours ran more than once");
        }
    }
    c.final_summary();
}

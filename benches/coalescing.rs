//! Fan-in: how long concurrent duplicates of one request wait for the single execution.
//!
//! Each round sends 1, 100, 1,000 or 10,000 copies of one POST (same `Idempotency-Key`, same
//! 1 KiB body, a fresh key every round) at once through the layer, on a multi-thread runtime.
//! The handler sleeps 10 ms (a stand-in for a payment provider or an LLM call). The result is
//! the time from the first spawn until the **last** copy has its whole response, as a ratio to
//! the handler time, beside the same fan-in onto the bare handler (which runs N times).
//!
//! Every layered round asserts that the handler ran exactly once and every copy got `201`;
//! the printed execution counts are the proof. Layered and bare rounds alternate, and which
//! goes first rotates, so machine-speed drifts hit both alike.
//!
//! Target (issue 5): 10,000 copies all answered within 1.2 × 10 ms + 20 ms = 32 ms.
//!
//! ```text
//! cargo bench --bench coalescing
//! ```

use std::{
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

use bytes::Bytes;
use criterion::Criterion;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::runtime::Runtime;
use tower::{Layer, Service, ServiceExt};
use tower_idempotency::{IdempotencyLayer, MemoryStore};

/// What the handler costs: the unit of every ratio below.
const HANDLER: Duration = Duration::from_millis(10);
const FAN_IN: [usize; 4] = [1, 100, 1_000, 10_000];

/// A handler that takes [`HANDLER`] and counts its executions.
#[derive(Clone)]
struct Slow {
    runs: Arc<AtomicU64>,
}

impl<B> Service<Request<B>> for Slow {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, _: Request<B>) -> Self::Future {
        self.runs.fetch_add(1, Ordering::Relaxed);
        Box::pin(async {
            tokio::time::sleep(HANDLER).await;
            let mut res = Response::new(Full::new(Bytes::from_static(
                b"{\"id\":\"ch_123\",\"ok\":true}",
            )));
            *res.status_mut() = StatusCode::CREATED;
            res.headers_mut()
                .insert("content-type", "application/json".parse().unwrap());
            Ok(res)
        })
    }
}

fn post(body: &Bytes, key: u64) -> Request<Full<Bytes>> {
    Request::post("/v1/payments")
        .header("content-type", "application/json")
        .header("authorization", "Bearer sk_test_123")
        .header("idempotency-key", format!("\"fan-in-{key}\""))
        .body(Full::new(body.clone()))
        .unwrap()
}

/// Sends every request at once, each on its own task; returns the time from the first spawn
/// until the last response body was read.
async fn fan_in<S, B>(svc: &S, reqs: Vec<Request<Full<Bytes>>>) -> Duration
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: std::fmt::Debug,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: std::fmt::Debug,
{
    let start = Instant::now();
    let tasks: Vec<_> = reqs
        .into_iter()
        .map(|req| {
            let svc = svc.clone();
            tokio::spawn(async move {
                let res = svc.oneshot(req).await.unwrap();
                assert_eq!(res.status(), StatusCode::CREATED);
                black_box(res.into_body().collect().await.unwrap());
                Instant::now()
            })
        })
        .collect();
    let mut last = start;
    for t in tasks {
        last = last.max(t.await.unwrap());
    }
    last - start
}

/// Per fan-in: every round's time, bare and layered.
#[derive(Default)]
struct Rounds {
    bare: Vec<Duration>,
    layered: Vec<Duration>,
}

fn main() {
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args();
    let rt: Runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let body = Bytes::from(vec![b'x'; 1024]);
    let runs = Arc::new(AtomicU64::new(0));
    let handler = Slow { runs: runs.clone() };
    let layered = IdempotencyLayer::new(MemoryStore::new()).layer(handler.clone());
    let mut key = 0u64;
    let mut report = Vec::new();

    for n in FAN_IN {
        let rounds = Mutex::new(Rounds::default());
        c.bench_function(&format!("fan_in/{n}"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for i in 0..iters {
                    key += 1;
                    let layered_reqs: Vec<_> = (0..n).map(|_| post(&body, key)).collect();
                    let bare_reqs: Vec<_> = (0..n).map(|_| post(&body, key)).collect();
                    let (mut t_layered, mut t_bare) = (Duration::ZERO, Duration::ZERO);
                    let mut layered_reqs = Some(layered_reqs);
                    let mut bare_reqs = Some(bare_reqs);
                    for k in 0..2 {
                        if (k + i as usize).is_multiple_of(2) {
                            let before = runs.load(Ordering::Relaxed);
                            let reqs = layered_reqs.take().unwrap();
                            t_layered = rt.block_on(fan_in(&layered, reqs));
                            let ran = runs.load(Ordering::Relaxed) - before;
                            assert_eq!(ran, 1, "fan-in {n}: the handler ran {ran} times");
                        } else {
                            let before = runs.load(Ordering::Relaxed);
                            t_bare = rt.block_on(fan_in(&handler, bare_reqs.take().unwrap()));
                            assert_eq!(runs.load(Ordering::Relaxed) - before, n as u64);
                        }
                    }
                    let mut r = rounds.lock().unwrap();
                    r.layered.push(t_layered);
                    r.bare.push(t_bare);
                    total += t_layered;
                }
                total
            })
        });
        let r = rounds.into_inner().unwrap();
        if r.layered.is_empty() {
            continue;
        }
        let ratio = |d: Duration| d.as_secs_f64() / HANDLER.as_secs_f64();
        let mean = |v: &[Duration]| ratio(v.iter().sum::<Duration>() / v.len() as u32);
        let worst = |v: &[Duration]| ratio(*v.iter().max().unwrap());
        let budget = HANDLER.mul_f64(1.2) + Duration::from_millis(20);
        let over = r.layered.iter().filter(|d| **d > budget).count();
        report.push(format!(
            "fan-in {n:>6}  layered last/handler mean {:>5.2} worst {:>5.2}   bare (runs {n}) mean {:>5.2} worst {:>5.2}   executions 1 per round ({} rounds, {} over {:.0} ms)",
            mean(&r.layered),
            worst(&r.layered),
            mean(&r.bare),
            worst(&r.bare),
            r.layered.len(),
            over,
            budget.as_secs_f64() * 1e3,
        ));
    }

    println!(
        "\n== time until the last duplicate has its response, / handler time ({} ms) ==",
        HANDLER.as_millis()
    );
    for line in &report {
        println!("{line}");
    }
    c.final_summary();
}

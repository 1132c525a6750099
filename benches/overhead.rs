//! What the layer costs per request, as ratios to baselines measured in the same run.
//!
//! Variants are interleaved in chunks of 256 requests with the order rotated every chunk (see
//! the benchmarking notes in the README), so the machine's speed drifts hit both sides alike.
//!
//! - `get`: GET pass-through, layered vs the bare service.
//! - `post_first/<size>`: covered POST with a fresh key each time (hash, claim, spawn, store).
//! - `post_replay/<size>`: covered POST whose key completed before (hash, claim, replay).
//! - `floor/<size>`: SHA-256 of the body plus one DashMap insert and remove — the cost no
//!   idempotency layer can avoid.
//!
//! ```text
//! cargo bench --bench overhead
//! ```

use std::{
    convert::Infallible,
    future::{Ready, ready},
    sync::Mutex,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use std::hint::black_box;

use criterion::{BenchmarkId, Criterion};
use dashmap::DashMap;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use sha2::{Digest, Sha256};
use tower::{Layer, Service, ServiceExt};
use tower_idempotency::{IdempotencyLayer, MemoryStore};

const CHUNK: u64 = 256;

/// A handler doing nearly nothing, so the layer's own cost shows.
#[derive(Clone, Copy)]
struct Handler;

impl<B> Service<Request<B>> for Handler {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = Ready<Result<Self::Response, Infallible>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, _: Request<B>) -> Self::Future {
        let mut res = Response::new(Full::new(Bytes::from_static(
            b"{\"id\":\"ch_123\",\"ok\":true}",
        )));
        *res.status_mut() = StatusCode::CREATED;
        res.headers_mut()
            .insert("content-type", "application/json".parse().unwrap());
        ready(Ok(res))
    }
}

type Build = Box<dyn FnMut(u64) -> Request<Full<Bytes>>>;

async fn drive<S>(svc: &mut S, reqs: Vec<Request<Full<Bytes>>>) -> Duration
where
    S: Service<Request<Full<Bytes>>>,
    S::Error: std::fmt::Debug,
{
    let start = Instant::now();
    for req in reqs {
        let res = svc.ready().await.unwrap().call(req).await.unwrap();
        black_box(res);
    }
    start.elapsed()
}

/// Paired totals of one comparison, per criterion sample: (requests, baseline, layered).
#[derive(Default)]
struct Pairs(Mutex<Vec<(u64, Duration, Duration)>>);

impl Pairs {
    /// Total layered time over total baseline time, and the median of per-sample ratios.
    fn ratio(&self) -> (f64, f64) {
        let pairs = self.0.lock().unwrap();
        let (b, l) = pairs.iter().fold((0.0, 0.0), |(b, l), (_, x, y)| {
            (b + x.as_secs_f64(), l + y.as_secs_f64())
        });
        let mut ratios: Vec<f64> = pairs
            .iter()
            .map(|(_, x, y)| y.as_secs_f64() / x.as_secs_f64())
            .collect();
        ratios.sort_by(f64::total_cmp);
        (
            l / b,
            ratios.get(ratios.len() / 2).copied().unwrap_or(f64::NAN),
        )
    }

    /// Nanoseconds per request: (baseline, layered).
    fn ns(&self) -> (f64, f64) {
        let pairs = self.0.lock().unwrap();
        let (n, b, l) = pairs.iter().fold((0u64, 0.0, 0.0), |(n, b, l), (k, x, y)| {
            (n + k, b + x.as_secs_f64(), l + y.as_secs_f64())
        });
        (b * 1e9 / n as f64, l * 1e9 / n as f64)
    }
}

fn body(size: usize) -> Bytes {
    Bytes::from((0..size).map(|i| (i % 251) as u8).collect::<Vec<u8>>())
}

fn post(body: &Bytes, key: u64) -> Request<Full<Bytes>> {
    Request::post("/v1/payments?currency=eur")
        .header("content-type", "application/json")
        .header("authorization", "Bearer sk_test_123")
        .header("idempotency-key", key)
        .body(Full::new(body.clone()))
        .unwrap()
}

/// Runs `iters` requests through each of `bare` and `layered`, chunk by chunk, alternating
/// which goes first; records both totals and returns the layered one.
fn paired<B, L>(
    rt: &tokio::runtime::Runtime,
    iters: u64,
    bare: &mut B,
    layered: &mut L,
    build_bare: &mut Build,
    build_layered: &mut Build,
    pairs: &Pairs,
) -> Duration
where
    B: Service<Request<Full<Bytes>>>,
    B::Error: std::fmt::Debug,
    L: Service<Request<Full<Bytes>>>,
    L::Error: std::fmt::Debug,
{
    let (mut tb, mut tl) = (Duration::ZERO, Duration::ZERO);
    let mut done = 0;
    let mut flip = false;
    while done < iters {
        let n = CHUNK.min(iters - done);
        let rb: Vec<_> = (0..n).map(|i| build_bare(done + i)).collect();
        let rl: Vec<_> = (0..n).map(|i| build_layered(done + i)).collect();
        rt.block_on(async {
            if flip {
                tl += drive(layered, rl).await;
                tb += drive(bare, rb).await;
            } else {
                tb += drive(bare, rb).await;
                tl += drive(layered, rl).await;
            }
        });
        flip = !flip;
        done += n;
    }
    pairs.0.lock().unwrap().push((iters, tb, tl));
    tl
}

/// SHA-256 of the body plus one DashMap insert and remove, per request.
fn floor(iters: u64, body: &Bytes, map: &DashMap<[u8; 32], u64>) -> Duration {
    let start = Instant::now();
    for i in 0..iters {
        let mut h = Sha256::new();
        h.update(i.to_be_bytes());
        h.update(body);
        let k: [u8; 32] = h.finalize().into();
        map.insert(k, i);
        black_box(map.remove(&k));
    }
    start.elapsed()
}

fn main() {
    let mut c = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut report = Vec::new();

    // GET pass-through.
    {
        let pairs = Pairs::default();
        let mut bare = Handler;
        let mut layered = IdempotencyLayer::new(MemoryStore::new()).layer(Handler);
        let get = || {
            Box::new(|_| {
                Request::get("/v1/payments/ch_123")
                    .header("authorization", "Bearer sk_test_123")
                    .body(Full::new(Bytes::new()))
                    .unwrap()
            }) as Build
        };
        let (mut gb, mut gl) = (get(), get());
        c.bench_function("get/pass_through", |b| {
            b.iter_custom(|iters| {
                paired(
                    &rt,
                    iters,
                    &mut bare,
                    &mut layered,
                    &mut gb,
                    &mut gl,
                    &pairs,
                )
            })
        });
        let (total, median) = pairs.ratio();
        let (b, l) = pairs.ns();
        report.push(format!(
            "GET pass-through          layered/bare {total:.3} (median {median:.3})  bare {b:.0} ns, layered {l:.0} ns"
        ));
    }

    let mut group = c.benchmark_group("post");
    for size in [1024usize] {
        let data = body(size);
        // Floor.
        let map = DashMap::new();
        let mut floor_total = (Duration::ZERO, 0u64);
        group.bench_with_input(BenchmarkId::new("floor", size), &size, |b, _| {
            b.iter_custom(|iters| {
                let t = floor(iters, &data, &map);
                floor_total.0 += t;
                floor_total.1 += iters;
                t
            })
        });
        let floor_ns = floor_total.0.as_secs_f64() * 1e9 / floor_total.1 as f64;

        // First execution: a new key every request.
        let pairs = Pairs::default();
        let mut bare = Handler;
        let mut layered = IdempotencyLayer::new(MemoryStore::new()).layer(Handler);
        let mut seq = 0u64;
        let d1 = data.clone();
        let d2 = data.clone();
        let mut fb: Build = Box::new(move |i| post(&d1, i));
        let mut fl: Build = Box::new(move |_| {
            seq += 1;
            post(&d2, seq)
        });
        group.bench_with_input(BenchmarkId::new("first_execution", size), &size, |b, _| {
            b.iter_custom(|iters| {
                paired(
                    &rt,
                    iters,
                    &mut bare,
                    &mut layered,
                    &mut fb,
                    &mut fl,
                    &pairs,
                )
            })
        });
        let (ratio, median) = pairs.ratio();
        let (b, l) = pairs.ns();
        report.push(format!(
            "POST {size} B first execution  layered/bare {ratio:.2} (median {median:.2})  overhead (layered-bare)/floor {:.2}  [bare {b:.0} ns, layered {l:.0} ns]",
            (l - b) / floor_ns
        ));

        // Replay: one key, completed before the run.
        let pairs = Pairs::default();
        let mut bare = Handler;
        let mut layered = IdempotencyLayer::new(MemoryStore::new()).layer(Handler);
        rt.block_on(async {
            let warm: Request<Full<Bytes>> = post(&data, 7);
            let _ = ServiceExt::<Request<Full<Bytes>>>::ready(&mut layered)
                .await
                .unwrap()
                .call(warm)
                .await;
        });
        let d1 = data.clone();
        let d2 = data.clone();
        let mut rb: Build = Box::new(move |_| post(&d1, 7));
        let mut rl: Build = Box::new(move |_| post(&d2, 7));
        group.bench_with_input(BenchmarkId::new("replay", size), &size, |b, _| {
            b.iter_custom(|iters| {
                paired(
                    &rt,
                    iters,
                    &mut bare,
                    &mut layered,
                    &mut rb,
                    &mut rl,
                    &pairs,
                )
            })
        });
        let (ratio, median) = pairs.ratio();
        let (b, l) = pairs.ns();
        report.push(format!(
            "POST {size} B replay           layered/bare {ratio:.2} (median {median:.2})  layered/floor {:.2}  [bare {b:.0} ns, layered {l:.0} ns]",
            l / floor_ns
        ));
        report.push(format!(
            "floor {size} B (SHA-256 + DashMap insert/remove)  {floor_ns:.0} ns"
        ));
    }
    group.finish();

    println!("\n== ratios (same run, interleaved) ==");
    for line in report {
        println!("{line}");
    }
    c.final_summary();
}

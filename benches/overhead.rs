//! What the layer costs per request, as ratios to baselines measured in the same run.
//!
//! Every comparison interleaves its variants in chunks of 256 requests and rotates which one
//! goes first each chunk, so the machine's speed drifts hit all of them alike; the ratios of
//! the summed times are the result (absolute times on a shared machine are noise).
//!
//! - `get`: GET pass-through, layered vs the bare service.
//! - `post_first/<size>`: covered POST with a fresh key every request (hash, claim, spawn,
//!   store), vs bare and vs the floor.
//! - `post_replay/<size>`: covered POST whose key completed before (hash, claim, replay).
//! - floor: SHA-256 of the body plus one DashMap insert and remove — the work no idempotency
//!   layer can avoid.
//!
//! ```text
//! cargo bench --bench overhead
//! ```

use std::{
    hint::black_box,
    time::{Duration, Instant},
};

use bytes::Bytes;
use dashmap::DashMap;
use http::{Request, StatusCode};
use http_body_util::Full;
use sha2::{Digest, Sha256};
use tower::{Layer, Service, ServiceExt};
use tower_idempotency::{IdempotencyLayer, IdempotencyService, MemoryStore};

#[path = "support/mod.rs"]
mod support;

use support::{CHUNK, Handler, Totals, Variant, interleave};

async fn drive<S>(svc: &mut S, reqs: Vec<Request<Full<Bytes>>>) -> Duration
where
    S: Service<Request<Full<Bytes>>>,
    S::Error: std::fmt::Debug,
{
    // The batch's buffer is freed after the clock stops: freeing it is the harness's cost
    // (glibc consolidates its free lists then), not the service's.
    let mut reqs = reqs.into_iter();
    let start = Instant::now();
    for req in reqs.by_ref() {
        let res = svc.ready().await.unwrap().call(req).await.unwrap();
        black_box(res);
    }
    let took = start.elapsed();
    drop(reqs);
    took
}

/// A service variant: requests are built before the clock starts.
fn service<'a, S>(
    mut svc: S,
    mut build: impl FnMut(u64) -> Request<Full<Bytes>> + 'a,
) -> Variant<'a>
where
    S: Service<Request<Full<Bytes>>> + 'a,
    S::Error: std::fmt::Debug,
{
    Box::new(move |rt, from, n| {
        let reqs: Vec<_> = (from..from + n).map(&mut build).collect();
        rt.block_on(drive(&mut svc, reqs))
    })
}

/// The floor: SHA-256 of the body plus one DashMap insert and remove per request.
fn floor<'a>(body: Bytes) -> Variant<'a> {
    let map: DashMap<[u8; 32], u64> = DashMap::new();
    Box::new(move |_, from, n| {
        let start = Instant::now();
        for i in from..from + n {
            let mut h = Sha256::new();
            h.update(i.to_be_bytes());
            h.update(&body);
            let k: [u8; 32] = h.finalize().into();
            map.insert(k, i);
            black_box(map.remove(&k));
        }
        start.elapsed()
    })
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

fn layered() -> IdempotencyService<Handler, MemoryStore> {
    IdempotencyLayer::new(MemoryStore::new()).layer(Handler)
}

fn main() {
    let mut c = support::criterion(20, Duration::from_millis(500), Duration::from_secs(3));
    let rt = support::current_thread();
    let mut report = Vec::new();
    let mut seq = 0u64;

    // GET pass-through: [bare, layered].
    let get = |_| {
        Request::get("/v1/payments/ch_123")
            .header("authorization", "Bearer sk_test_123")
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    let totals = Totals::default();
    let mut variants = vec![service(Handler, get), service(layered(), get)];
    c.bench_function("get/pass_through", |b| {
        b.iter_custom(|iters| interleave(&rt, iters, &mut variants, 1, &totals, &mut seq))
    });
    drop(variants);
    if totals.0.lock().unwrap().1 > 0 {
        let (b, l) = (totals.ns(0), totals.ns(1));
        report.push(format!(
            "GET pass-through, tower  layered/bare {:.3}   [bare {b:.0} ns, layered {l:.0} ns]",
            l / b
        ));
    }

    // GET pass-through on an axum router, as users deploy it. The bare router also goes
    // through `Router::layer` (an identity layer): that boxes every route, and the ratio should
    // be the idempotency layer's own cost.
    let router = |idempotency: bool| {
        let r = axum::Router::new().route(
            "/v1/payments/{id}",
            axum::routing::get(|| async { "{\"id\":\"ch_123\"}" }),
        );
        // `with_state` finalizes the routes once, as `axum::serve` does.
        if idempotency {
            r.layer(IdempotencyLayer::new(MemoryStore::new()))
                .with_state(())
        } else {
            r.layer(tower::layer::util::Identity::new()).with_state(())
        }
    };
    let totals = Totals::default();
    let mut variants = vec![service(router(false), get), service(router(true), get)];
    c.bench_function("get/axum_router", |b| {
        b.iter_custom(|iters| interleave(&rt, iters, &mut variants, 1, &totals, &mut seq))
    });
    drop(variants);
    if totals.0.lock().unwrap().1 > 0 {
        let (b, l) = (totals.ns(0), totals.ns(1));
        report.push(format!(
            "GET pass-through, axum   layered/bare {:.3}   [bare {b:.0} ns, layered {l:.0} ns]",
            l / b
        ));
    }

    for size in [256usize, 1024, 16 * 1024, 256 * 1024] {
        let data = body(size);
        // First execution: [bare, layered with a fresh key each time, floor].
        let totals = Totals::default();
        let (d1, d2) = (data.clone(), data.clone());
        let mut variants = vec![
            service(Handler, move |i| post(&d1, i)),
            service(layered(), move |i| post(&d2, i)),
            floor(data.clone()),
        ];
        c.bench_function(&format!("post_first/{size}"), |b| {
            b.iter_custom(|iters| interleave(&rt, iters, &mut variants, 1, &totals, &mut seq))
        });
        drop(variants);
        if totals.0.lock().unwrap().1 > 0 {
            let (b, l, f) = (totals.ns(0), totals.ns(1), totals.ns(2));
            report.push(format!(
                "POST {size:>6} B first    layered/bare {:>5.2}  (layered-bare)/floor {:>5.2}  [bare {b:.0} ns, layered {l:.0} ns, floor {f:.0} ns]",
                l / b,
                (l - b) / f
            ));
        }

        // Replay: [bare, layered on a key completed before the run, floor].
        let totals = Totals::default();
        let mut warm = layered();
        rt.block_on(async {
            // The first request runs; the second must be a replay, or this would time first
            // executions under the replay label.
            for replayed in [false, true] {
                let req: Request<Full<Bytes>> = post(&data, 7);
                let res = ServiceExt::<Request<Full<Bytes>>>::ready(&mut warm)
                    .await
                    .unwrap()
                    .call(req)
                    .await
                    .unwrap();
                assert_eq!(res.status(), StatusCode::CREATED);
                assert_eq!(res.headers().contains_key("idempotent-replayed"), replayed);
            }
        });
        let (d1, d2) = (data.clone(), data.clone());
        let mut variants = vec![
            service(Handler, move |_| post(&d1, 7)),
            service(warm, move |_| post(&d2, 7)),
            floor(data.clone()),
        ];
        c.bench_function(&format!("post_replay/{size}"), |b| {
            b.iter_custom(|iters| interleave(&rt, iters, &mut variants, 1, &totals, &mut seq))
        });
        drop(variants);
        if totals.0.lock().unwrap().1 > 0 {
            let (b, l, f) = (totals.ns(0), totals.ns(1), totals.ns(2));
            report.push(format!(
                "POST {size:>6} B replay   layered/bare {:>5.2}  layered/floor        {:>5.2}  [bare {b:.0} ns, layered {l:.0} ns, floor {f:.0} ns]",
                l / b,
                l / f
            ));
        }
    }

    println!("\n== ratios (same run, interleaved in chunks of {CHUNK}) ==");
    for line in &report {
        println!("{line}");
    }
    c.final_summary();
}

//! Heap allocations per request on the layer's paths, counted by a counting global allocator
//! (deterministic, unlike timings). Each figure is the layered count minus the bare service's
//! count for the same requests, so it is the layer's own.
//!
//! ```text
//! cargo bench --bench allocs
//! ```

// A global allocator is an unsafe trait; this bench only counts and forwards to `System`.
#![allow(unsafe_code)]

use std::{
    alloc::{GlobalAlloc, Layout, System},
    sync::atomic::{AtomicU64, Ordering},
};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use tower::{Layer, Service, ServiceExt};
#[path = "support/mod.rs"]
mod support;

use support::Handler;
use tower_idempotency::{IdempotencyLayer, MemoryStore};

struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(new_size as u64, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const N: u64 = 10_000;

/// Allocations and bytes per request for `n` requests through `svc`; requests are built
/// before counting starts.
async fn count<S>(svc: &mut S, reqs: Vec<Request<Full<Bytes>>>) -> (f64, f64)
where
    S: Service<Request<Full<Bytes>>>,
    S::Error: std::fmt::Debug,
{
    let n = reqs.len() as f64;
    let (a0, b0) = (
        ALLOCS.load(Ordering::Relaxed),
        BYTES.load(Ordering::Relaxed),
    );
    for req in reqs {
        let res = svc.ready().await.unwrap().call(req).await.unwrap();
        drop(res);
    }
    let (a1, b1) = (
        ALLOCS.load(Ordering::Relaxed),
        BYTES.load(Ordering::Relaxed),
    );
    ((a1 - a0) as f64 / n, (b1 - b0) as f64 / n)
}

fn post(body: &Bytes, key: u64) -> Request<Full<Bytes>> {
    Request::post("/v1/payments")
        .header("idempotency-key", key)
        .body(Full::new(body.clone()))
        .unwrap()
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let body = Bytes::from(vec![b'x'; 1024]);
    rt.block_on(async {
        let mut layered = IdempotencyLayer::new(MemoryStore::new()).layer(Handler);
        let mut bare = Handler;
        let get = |_| {
            Request::get("/v1/payments/1")
                .body(Full::new(Bytes::new()))
                .unwrap()
        };

        let base = count(&mut bare, (0..N).map(get).collect()).await;
        let lay = count(&mut layered, (0..N).map(get).collect()).await;
        println!(
            "GET pass-through      +{:.2} allocations, +{:.0} bytes per request",
            lay.0 - base.0,
            lay.1 - base.1
        );

        let base = count(&mut bare, (0..N).map(|i| post(&body, i)).collect()).await;
        let lay = count(&mut layered, (N..2 * N).map(|i| post(&body, i)).collect()).await;
        println!(
            "POST 1 KiB first      +{:.2} allocations, +{:.0} bytes per request",
            lay.0 - base.0,
            lay.1 - base.1
        );

        let router = |idempotency: bool| {
            let r = axum::Router::new().route(
                "/v1/payments/{id}",
                axum::routing::get(|| async { "{}" }).post(|| async { "{}" }),
            );
            // `with_state` finalizes the routes once, as `axum::serve` does.
            if idempotency {
                r.layer(IdempotencyLayer::new(MemoryStore::new()))
                    .with_state(())
            } else {
                r.layer(tower::layer::util::Identity::new()).with_state(())
            }
        };
        let (mut bare_router, mut layered_router) = (router(false), router(true));
        let base = count(&mut bare_router, (0..N).map(get).collect()).await;
        let lay = count(&mut layered_router, (0..N).map(get).collect()).await;
        println!(
            "GET pass-through, axum +{:.2} allocations, +{:.0} bytes per request",
            lay.0 - base.0,
            lay.1 - base.1
        );

        let base = count(&mut bare, (0..N).map(|_| post(&body, 1)).collect()).await;
        let lay = count(&mut layered, (0..N).map(|_| post(&body, N)).collect()).await;
        println!(
            "POST 1 KiB replay     +{:.2} allocations, +{:.0} bytes per request",
            lay.0 - base.0,
            lay.1 - base.1
        );
    });
}

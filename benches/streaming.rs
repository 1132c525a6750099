//! A streamed 1 MiB response (`text/event-stream`, 64 frames of 16 KiB): time to first byte
//! and total time, bare vs layered (first execution: relayed through the tee, recorded and
//! stored), as ratios from one interleaved run — once in process (the layer's own cost against
//! a service that does nothing) and once over HTTP on loopback (what a client sees: axum
//! server, hyper-util client).
//!
//! ```text
//! cargo bench --bench streaming
//! ```

use std::{
    cell::RefCell,
    convert::Infallible,
    future::{Ready, ready},
    rc::Rc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use tower::{Layer, Service, ServiceExt};
use tower_idempotency::{IdempotencyLayer, MemoryStore};

#[path = "support/mod.rs"]
mod support;

use support::{Totals, Variant, interleave_chunked};

const FRAME: usize = 16 * 1024;
const FRAMES: usize = 64;

type Frames = std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>;

/// Streams 1 MiB as server-sent events.
#[derive(Clone)]
struct Generator(Bytes);

impl<B> Service<Request<B>> for Generator {
    type Response = Response<StreamBody<futures_util::stream::Iter<Frames>>>;
    type Error = Infallible;
    type Future = Ready<Result<Self::Response, Infallible>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, _: Request<B>) -> Self::Future {
        let frames: Vec<_> = (0..FRAMES)
            .map(|i| Ok(Frame::data(self.0.slice(i * FRAME..(i + 1) * FRAME))))
            .collect();
        let mut res = Response::new(StreamBody::new(futures_util::stream::iter(frames)));
        res.headers_mut()
            .insert("content-type", "text/event-stream".parse().unwrap());
        ready(Ok(res))
    }
}

/// Runs requests through `svc`, adding each one's time to first frame to `ttfb`.
fn variant<'a, S, B>(mut svc: S, ttfb: Rc<RefCell<Duration>>) -> Variant<'a>
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>> + 'a,
    S::Error: std::fmt::Debug,
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Debug,
{
    Box::new(move |rt, from, n| {
        let reqs: Vec<_> = (from..from + n)
            .map(|i| {
                Request::post("/v1/chat/completions")
                    .header("idempotency-key", i)
                    .body(Full::new(Bytes::from_static(b"{\"stream\":true}")))
                    .unwrap()
            })
            .collect();
        rt.block_on(async {
            // The batch's buffer is freed after the clock stops (see `overhead`).
            let mut reqs = reqs.into_iter();
            let start = Instant::now();
            for req in reqs.by_ref() {
                let t0 = Instant::now();
                let res = svc.ready().await.unwrap().call(req).await.unwrap();
                let mut body = res.into_body();
                let first = body.frame().await.unwrap().unwrap();
                *ttfb.borrow_mut() += t0.elapsed();
                std::hint::black_box(first);
                while let Some(f) = body.frame().await {
                    std::hint::black_box(f.unwrap());
                }
            }
            let took = start.elapsed();
            drop(reqs);
            took
        })
    })
}

/// Runs requests over HTTP to `url`, adding each one's time to first frame to `ttfb`.
fn http_variant<'a>(
    client: Client<HttpConnector, Full<Bytes>>,
    url: String,
    ttfb: Rc<RefCell<Duration>>,
) -> Variant<'a> {
    Box::new(move |rt, from, n| {
        rt.block_on(async {
            let start = Instant::now();
            for i in from..from + n {
                let req = Request::post(url.as_str())
                    .header("idempotency-key", i)
                    .body(Full::new(Bytes::from_static(b"{\"stream\":true}")))
                    .unwrap();
                let t0 = Instant::now();
                let mut body = client.request(req).await.unwrap().into_body();
                let first = body.frame().await.unwrap().unwrap();
                *ttfb.borrow_mut() += t0.elapsed();
                std::hint::black_box(first);
                while let Some(f) = body.frame().await {
                    std::hint::black_box(f.unwrap());
                }
            }
            start.elapsed()
        })
    })
}

fn report(what: &str, totals: &Totals, tb: &RefCell<Duration>, tl: &RefCell<Duration>) {
    if totals.0.lock().unwrap().1 == 0 {
        return;
    }
    let (b, l) = (totals.ns(0), totals.ns(1));
    let n = totals.0.lock().unwrap().1 as f64;
    let (fb, fl) = (
        tb.borrow().as_secs_f64() * 1e9 / n,
        tl.borrow().as_secs_f64() * 1e9 / n,
    );
    println!(
        "\n== 1 MiB event stream, 64 frames, {what} (same run, interleaved in chunks of 8) =="
    );
    println!(
        "time to first frame  layered/bare {:.2}  [bare {:.1} µs, layered {:.1} µs]",
        fl / fb,
        fb / 1e3,
        fl / 1e3
    );
    println!(
        "total                layered/bare {:.2}  [bare {:.0} µs, layered {:.0} µs]",
        l / b,
        b / 1e3,
        l / 1e3
    );
}

fn main() {
    let mut c = support::criterion(10, Duration::from_millis(500), Duration::from_secs(5));
    let rt = support::current_thread();
    let data = Bytes::from(vec![b'x'; FRAME * FRAMES]);
    let gen_ = Generator(data);
    let (tb, tl) = (
        Rc::new(RefCell::new(Duration::ZERO)),
        Rc::new(RefCell::new(Duration::ZERO)),
    );
    let layered = IdempotencyLayer::new(MemoryStore::new().max_bytes(64 << 20)).layer(gen_.clone());
    let mut variants = vec![
        variant(gen_.clone(), tb.clone()),
        variant(layered, tl.clone()),
    ];
    let totals = Totals::default();
    let mut seq = 0;
    c.bench_function("stream_1mib/total", |b| {
        b.iter_custom(|iters| {
            interleave_chunked(8, &rt, iters, &mut variants, 1, &totals, &mut seq)
        })
    });
    drop(variants);
    report("in process", &totals, &tb, &tl);

    // Over HTTP: the same generator behind an axum router with and without the layer.
    let serve = |idempotency: bool| {
        let router = axum::Router::new().route_service("/v1/chat/completions", gen_.clone());
        let router = if idempotency {
            router.layer(IdempotencyLayer::new(
                MemoryStore::new().max_bytes(64 << 20),
            ))
        } else {
            router.layer(tower::layer::util::Identity::new())
        };
        rt.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
            format!("http://{addr}/v1/chat/completions")
        })
    };
    let (bare_url, layered_url) = (serve(false), serve(true));
    let client =
        rt.block_on(async { Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>() });
    let (tb, tl) = (
        Rc::new(RefCell::new(Duration::ZERO)),
        Rc::new(RefCell::new(Duration::ZERO)),
    );
    let mut variants = vec![
        http_variant(client.clone(), bare_url, tb.clone()),
        http_variant(client, layered_url, tl.clone()),
    ];
    let totals = Totals::default();
    c.bench_function("stream_1mib/http", |b| {
        b.iter_custom(|iters| {
            interleave_chunked(8, &rt, iters, &mut variants, 1, &totals, &mut seq)
        })
    });
    drop(variants);
    report("over HTTP on loopback", &totals, &tb, &tl);
    c.final_summary();
}

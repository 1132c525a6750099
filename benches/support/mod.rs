//! The interleaving harness shared by the benches: variants run in chunks, order rotated.
#![allow(dead_code)]

use std::{
    convert::Infallible,
    future::{Ready, ready},
    sync::Mutex,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use criterion::Criterion;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use tokio::runtime::Runtime;
use tower::Service;

/// A handler doing nearly nothing (a small JSON 201), so the layer's own cost shows.
#[derive(Clone, Copy)]
pub(crate) struct Handler;

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
        res.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        ready(Ok(res))
    }
}

/// Criterion with `samples` samples of `measure` each, after `warm_up`; command-line flags
/// (filters, `--profile-time`) still apply.
pub(crate) fn criterion(samples: usize, warm_up: Duration, measure: Duration) -> Criterion {
    Criterion::default()
        .sample_size(samples)
        .warm_up_time(warm_up)
        .measurement_time(measure)
        .configure_from_args()
}

/// A current-thread runtime: the layer's spawned work runs on the measuring thread.
pub(crate) fn current_thread() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Requests per chunk; the order of variants rotates every chunk.
pub(crate) const CHUNK: u64 = 256;

/// Runs `n` requests starting at sequence number `from`; returns the time they took.
pub(crate) type Variant<'a> = Box<dyn FnMut(&Runtime, u64, u64) -> Duration + 'a>;

/// Summed time per variant, and requests run, over all criterion samples.
#[derive(Default)]
pub(crate) struct Totals(pub(crate) Mutex<(Vec<Duration>, u64)>);

impl Totals {
    pub(crate) fn ns(&self, i: usize) -> f64 {
        let t = self.0.lock().unwrap();
        t.0[i].as_secs_f64() * 1e9 / t.1 as f64
    }
}

/// Interleaves `variants` over `iters` requests each, chunk by chunk, rotating the order;
/// adds every variant's time to `totals` and returns the time of variant `subject`.
pub(crate) fn interleave(
    rt: &Runtime,
    iters: u64,
    variants: &mut [Variant<'_>],
    subject: usize,
    totals: &Totals,
    seq: &mut u64,
) -> Duration {
    interleave_chunked(CHUNK, rt, iters, variants, subject, totals, seq)
}

/// [`interleave`] with another chunk size (for heavy requests).
pub(crate) fn interleave_chunked(
    chunk: u64,
    rt: &Runtime,
    iters: u64,
    variants: &mut [Variant<'_>],
    subject: usize,
    totals: &Totals,
    seq: &mut u64,
) -> Duration {
    let mut times = vec![Duration::ZERO; variants.len()];
    let mut done = 0;
    let mut round = 0usize;
    while done < iters {
        let n = chunk.min(iters - done);
        for k in 0..variants.len() {
            let i = (k + round) % variants.len();
            times[i] += variants[i](rt, *seq, n);
        }
        *seq += n;
        done += n;
        round += 1;
    }
    let mut t = totals.0.lock().unwrap();
    if t.0.is_empty() {
        t.0 = vec![Duration::ZERO; variants.len()];
    }
    for (acc, x) in t.0.iter_mut().zip(&times) {
        *acc += *x;
    }
    t.1 += iters;
    times[subject]
}

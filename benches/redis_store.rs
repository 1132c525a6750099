//! `RedisStore` on loopback against `MemoryStore`, through the layer, in the same run.
//!
//! Both variants run the same requests (1 KiB POST, trivial handler) interleaved in chunks of
//! 128 requests with the order rotated every chunk, so the machine's speed drifts hit both
//! alike; the result is the ratio Redis / memory.
//!
//! - `first_execution`: a fresh key every request (claim, handler, complete).
//! - `replay`: a key completed before the run (one claim, replay).
//!
//! ```text
//! cargo bench --bench redis_store --features redis        # starts its own redis-server
//! REDIS_URL=redis://127.0.0.1:6380/ cargo bench --bench redis_store --features redis
//! ```

use std::{
    hint::black_box,
    net::TcpListener,
    process::{Child, Command, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use tower::{Layer, Service, ServiceExt};
#[path = "support/mod.rs"]
mod support;

use support::Handler;
use tower_idempotency::{IdempotencyLayer, MemoryStore, RedisStore};

const CHUNK: u64 = 128;

fn post(body: &Bytes, key: &str) -> Request<Full<Bytes>> {
    Request::post("/v1/payments")
        .header("authorization", "Bearer sk_test_123")
        .header("idempotency-key", key)
        .body(Full::new(body.clone()))
        .expect("request")
}

async fn drive<S>(svc: &mut S, reqs: Vec<Request<Full<Bytes>>>) -> Duration
where
    S: Service<
            Request<Full<Bytes>>,
            Response = Response<tower_idempotency::ResponseBody<Full<Bytes>>>,
        >,
    S::Error: std::fmt::Debug,
{
    // The batch's buffer is freed after the clock stops: freeing it is the harness's cost
    // (glibc consolidates its free lists then), not the service's.
    let mut reqs = reqs.into_iter();
    let start = Instant::now();
    for req in reqs.by_ref() {
        let res = svc
            .ready()
            .await
            .expect("ready")
            .call(req)
            .await
            .expect("call");
        assert!(res.status().is_success(), "status {}", res.status());
        black_box(res);
    }
    let took = start.elapsed();
    drop(reqs);
    took
}

/// Per criterion sample: (requests, memory total, redis total).
#[derive(Default)]
struct Pairs(Mutex<Vec<(u64, Duration, Duration)>>);

impl Pairs {
    fn report(&self, what: &str) -> String {
        let pairs = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let (n, m, r) = pairs.iter().fold((0u64, 0.0, 0.0), |(n, m, r), (k, x, y)| {
            (n + k, m + x.as_secs_f64(), r + y.as_secs_f64())
        });
        let mut ratios: Vec<f64> = pairs
            .iter()
            .map(|(_, x, y)| y.as_secs_f64() / x.as_secs_f64())
            .collect();
        ratios.sort_by(f64::total_cmp);
        let median = ratios.get(ratios.len() / 2).copied().unwrap_or(f64::NAN);
        format!(
            "{what:<16} redis/memory {:.1} (median {median:.1})  [memory {:.1} µs, redis {:.1} µs per request]",
            r / m,
            m * 1e6 / n as f64,
            r * 1e6 / n as f64,
        )
    }
}

/// A `redis-server` on a free loopback port, killed on drop.
struct OwnRedis(Child, std::path::PathBuf);

impl Drop for OwnRedis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

fn redis_url() -> (String, Option<OwnRedis>) {
    if let Ok(url) = std::env::var("REDIS_URL") {
        return (url, None);
    }
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let dir = std::env::temp_dir().join(format!("redis-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server on PATH (or set REDIS_URL)");
    (
        format!("redis://127.0.0.1:{port}/"),
        Some(OwnRedis(child, dir)),
    )
}

fn main() {
    let mut c = support::criterion(10, Duration::from_millis(500), Duration::from_secs(5));
    let rt = support::current_thread();
    let (url, _own) = redis_url();
    let redis = rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match RedisStore::connect(url.as_str()).await {
                Ok(s) => break s.prefix(format!("bench:{}:", uuid::Uuid::new_v4())),
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("cannot connect to {url}: {e}"),
            }
        }
    });
    let data = Bytes::from((0..1024).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
    let mut mem = IdempotencyLayer::new(MemoryStore::new()).layer(Handler);
    let mut red = IdempotencyLayer::new(redis).layer(Handler);
    let mut report = Vec::new();

    for (name, fresh) in [("first_execution", true), ("replay", false)] {
        let pairs = Pairs::default();
        let mut seq = 0u64;
        if !fresh {
            rt.block_on(async {
                drive(&mut mem, vec![post(&data, "replayed")]).await;
                drive(&mut red, vec![post(&data, "replayed")]).await;
            });
        }
        let mut flip = false;
        c.bench_function(&format!("redis_vs_memory/{name}"), |b| {
            b.iter_custom(|iters| {
                let (mut tm, mut tr) = (Duration::ZERO, Duration::ZERO);
                let mut done = 0;
                while done < iters {
                    let n = CHUNK.min(iters - done);
                    let mut batch = || -> Vec<_> {
                        (0..n)
                            .map(|_| {
                                seq += 1;
                                let key = if fresh {
                                    format!("k{seq}")
                                } else {
                                    "replayed".to_owned()
                                };
                                post(&data, &key)
                            })
                            .collect()
                    };
                    let (rm, rr) = (batch(), batch());
                    rt.block_on(async {
                        if flip {
                            tr += drive(&mut red, rr).await;
                            tm += drive(&mut mem, rm).await;
                        } else {
                            tm += drive(&mut mem, rm).await;
                            tr += drive(&mut red, rr).await;
                        }
                    });
                    flip = !flip;
                    done += n;
                }
                pairs
                    .0
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((iters, tm, tr));
                tr
            })
        });
        report.push(pairs.report(name));
    }

    println!("\n== RedisStore (loopback) vs MemoryStore, through the layer, same run ==");
    for line in report {
        println!("{line}");
    }
    c.final_summary();
}

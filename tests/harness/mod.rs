//! Shared helpers for the HTTP behaviour tests: a real axum server on 127.0.0.1:0, a real
//! client, and a handler whose executions are counted.
#![allow(dead_code, unreachable_pub)]

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::Router;

pub mod sse;
use tokio::sync::Notify;

/// Counts handler executions; the count is the assertion of every exactly-once test.
#[derive(Clone, Default)]
pub struct Counter(Arc<AtomicUsize>);

impl Counter {
    pub fn hit(&self) -> usize {
        self.0.fetch_add(1, Ordering::SeqCst) + 1
    }
    pub fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

/// A gate a handler waits on until the test opens it.
#[derive(Clone, Default)]
pub struct Gate {
    open: Arc<std::sync::atomic::AtomicBool>,
    notify: Arc<Notify>,
}

impl Gate {
    pub async fn wait(&self) {
        loop {
            let notified = self.notify.notified();
            if self.open.load(Ordering::SeqCst) {
                return;
            }
            notified.await;
        }
    }
    pub fn open(&self) {
        self.open.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }
}

/// A layer that counts the requests reaching it: put it outside the idempotency layer to know
/// a duplicate has arrived before letting the original finish.
pub fn count_arrivals(
    arrived: Counter,
) -> tower::util::MapRequestLayer<impl Fn(axum::extract::Request) -> axum::extract::Request + Clone>
{
    tower::util::MapRequestLayer::new(move |req| {
        arrived.hit();
        req
    })
}

/// Serves `app` on a fresh loopback port; the server lives as long as the runtime.
pub async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    addr
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()
        .unwrap()
}

/// Polls `cond` until it holds or `within` passes; returns whether it held.
pub async fn eventually(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if cond() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

pub const REPLAYED: &str = "idempotent-replayed";

pub fn is_replayed(res: &reqwest::Response) -> bool {
    res.headers().get(REPLAYED).is_some_and(|v| v == "true")
}

/// Asserts an RFC 9457 problem response with `status` and `type` ending in `slug`, and returns
/// its body.
pub async fn assert_problem(res: reqwest::Response, status: u16, slug: &str) -> String {
    assert_eq!(res.status().as_u16(), status, "status");
    assert_eq!(
        res.headers()["content-type"],
        "application/problem+json",
        "content-type"
    );
    let body = res.text().await.unwrap();
    assert!(
        body.contains(&format!(
            "\"type\":\"urn:tower-idempotency:problem:{slug}\""
        )),
        "problem type {slug} in {body}"
    );
    assert!(body.contains(&format!("\"status\":{status}")), "{body}");
    assert!(body.contains("\"detail\":"), "{body}");
    body
}

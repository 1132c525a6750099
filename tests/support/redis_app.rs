//! Axum instances for the Redis tests: a counted `POST /pay` handler behind an
//! `IdempotencyLayer`, served on 127.0.0.1:0.
#![allow(dead_code)] // each test binary uses a different part

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{
    Router,
    http::StatusCode,
    response::{AppendHeaders, IntoResponse},
    routing::post,
};
use tokio::{sync::Notify, task::JoinHandle};

/// Counts handler executions and lets a test see the first one start.
#[derive(Clone, Default)]
pub(crate) struct Counter {
    runs: Arc<AtomicUsize>,
    started: Arc<Notify>,
}

impl Counter {
    pub(crate) fn runs(&self) -> usize {
        self.runs.load(Ordering::SeqCst)
    }

    /// Resolves once the handler has started at least once.
    pub(crate) async fn started(&self) {
        loop {
            let n = self.started.notified();
            if self.runs() > 0 {
                return;
            }
            n.await;
        }
    }
}

/// `POST /pay`: counts, works for `work`, answers 201 with a charge id unique to this
/// execution (so identical responses prove a replay of one execution), repeated headers.
pub(crate) fn pay_router(counter: Counter, work: Duration) -> Router {
    Router::new().route(
        "/pay",
        post(move |body: String| {
            let counter = counter.clone();
            async move {
                let n = counter.runs.fetch_add(1, Ordering::SeqCst) + 1;
                counter.started.notify_waiters();
                if !work.is_zero() {
                    tokio::time::sleep(work).await; // the handler's own work, not synchronisation
                }
                let charge = uuid::Uuid::new_v4().to_string();
                (
                    StatusCode::CREATED,
                    AppendHeaders([
                        ("x-charge-id", charge.clone()),
                        ("x-step", "reserved".to_owned()),
                        ("x-step", "captured".to_owned()),
                    ]),
                    format!("{{\"charge\":\"{charge}\",\"execution\":{n},\"echo\":{body:?}}}"),
                )
                    .into_response()
            }
        }),
    )
}

/// A server task, aborted on drop.
pub(crate) struct Instance {
    pub(crate) addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Instance {
    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub(crate) async fn serve(app: Router) -> Instance {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Instance { addr, task }
}

/// Polls `f` until it returns `Some`, or panics after `deadline`.
pub(crate) async fn eventually<T, F, Fut>(what: &str, within: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await; // polling with a deadline
    }
}

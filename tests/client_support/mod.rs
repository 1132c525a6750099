//! Shared pieces of the client tests: a server that drops connections, and the keys it saw.
//! The loopback server and the counter are the HTTP tests' own (`tests/harness`).
#![allow(dead_code, unreachable_pub, unused_imports)] // each test binary uses a part

#[path = "../harness/mod.rs"]
mod harness;
pub use harness::{Counter, serve};

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use http::{HeaderMap, Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tower::{Service, ServiceExt};

/// Serves a service that may fail: an error closes the connection without an answer, a real
/// dropped connection as the client sees it.
pub async fn serve_faulty<S, E>(svc: S) -> SocketAddr
where
    S: Service<Request<Incoming>, Response = Response<axum::body::Body>, Error = E>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let svc = svc.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| svc.clone().oneshot(req));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

/// The `Idempotency-Key` of every request seen, in order.
#[derive(Clone, Default)]
pub struct Keys(Arc<Mutex<Vec<Option<String>>>>);

impl Keys {
    pub fn record(&self, headers: &HeaderMap) -> Option<String> {
        let key = headers
            .get("idempotency-key")
            .map(|v| v.to_str().unwrap().to_owned());
        self.0.lock().unwrap().push(key.clone());
        key
    }

    pub fn all(&self) -> Vec<Option<String>> {
        self.0.lock().unwrap().clone()
    }
}

pub type Never = Infallible;

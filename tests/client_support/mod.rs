//! Shared pieces of the client tests: loopback servers and counters.
#![allow(dead_code, unreachable_pub)]

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
};

use axum::Router;
use http::{HeaderMap, Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tower::{Service, ServiceExt};

/// Serves `app` on 127.0.0.1:0 for the rest of the test; returns its address.
pub async fn serve(app: Router) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

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

/// A shared counter.
#[derive(Clone, Default)]
pub struct Counter(Arc<AtomicUsize>);

impl Counter {
    /// Adds one; returns the new count.
    pub fn hit(&self) -> usize {
        self.0.fetch_add(1, Ordering::SeqCst) + 1
    }

    pub fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
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

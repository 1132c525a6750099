//! `IdempotencyLayer` on a plain hyper server (hyper-util's auto connection builder), without
//! axum. The example serves on 127.0.0.1, sends a payment twice with the same key through
//! hyper-util's client, prints both answers, and exits.
//!
//! ```text
//! cargo run --example hyper_server
//! ```

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::{
    client::legacy::Client,
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
    service::TowerToHyperService,
};
use tower::{ServiceBuilder, service_fn};
use tower_idempotency::{IdempotencyLayer, MemoryStore, RequestBody};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let charges = Arc::new(AtomicUsize::new(0));
    let counter = charges.clone();
    // The handler sees the buffered body through `RequestBody<Incoming>`.
    let handler = service_fn(move |req: Request<RequestBody<Incoming>>| {
        let counter = counter.clone();
        async move {
            let body = req.into_body().collect().await?.to_bytes();
            let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
            let text = format!("charge #{n} for {}", String::from_utf8_lossy(&body));
            let mut res = Response::new(Full::new(Bytes::from(text)));
            *res.status_mut() = StatusCode::CREATED;
            Ok::<_, hyper::Error>(res)
        }
    });
    let service = ServiceBuilder::new()
        .layer(IdempotencyLayer::new(MemoryStore::new()))
        .service(handler);

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    println!("hyper server on http://{addr}");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let service = TowerToHyperService::new(service.clone());
            tokio::spawn(async move {
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });

    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    for attempt in 1..=2 {
        let req = Request::post(format!("http://{addr}/payments"))
            .header("idempotency-key", "\"order-7\"")
            .body(Full::new(Bytes::from_static(b"amount=700")))?;
        let res = client.request(req).await?;
        let status = res.status();
        let replayed = res.headers().contains_key("idempotent-replayed");
        let body = res.into_body().collect().await?.to_bytes();
        println!(
            "attempt {attempt}: {status} replayed={replayed} body={:?}",
            String::from_utf8_lossy(&body)
        );
    }
    let runs = charges.load(Ordering::SeqCst);
    println!("handler executions: {runs}");
    if runs == 1 {
        Ok(())
    } else {
        Err(format!("expected one execution, got {runs}").into())
    }
}

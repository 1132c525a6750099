//! A small server for `scripts/loadtest.sh`: the same routes with and without the layer.
//!
//! - `POST /on/pay`, `GET /on/item`: behind `IdempotencyLayer::new(MemoryStore::new())`;
//! - `POST /off/pay`, `GET /off/item`: the same handlers through `Router::layer(Identity)`,
//!   so both halves pay axum's per-layer boxing and the difference is the layer's own cost.
//!
//! The handler reads the body and answers `201` with a small JSON document.
//!
//! ```text
//! cargo run --release --example loadtest_server -- 8080    # or PORT=8080; 0 picks a free port
//! ```
//!
//! Listens on 127.0.0.1 only and prints `listening on 127.0.0.1:<port>` once it accepts.

use axum::{
    Router,
    body::Bytes,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::{get, post},
};
use tower::layer::util::Identity;
use tower_idempotency::{IdempotencyLayer, MemoryStore};

async fn pay(body: Bytes) -> impl IntoResponse {
    std::hint::black_box(body);
    (
        StatusCode::CREATED,
        [(header::CONTENT_TYPE, "application/json")],
        "{\"id\":\"ch_123\",\"ok\":true}",
    )
}

async fn item() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        "{\"id\":\"ch_123\",\"amount\":100}",
    )
}

fn routes() -> Router {
    Router::new()
        .route("/pay", post(pay))
        .route("/item", get(item))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let port: u16 = match std::env::args()
        .nth(1)
        .or_else(|| std::env::var("PORT").ok())
    {
        Some(p) => p.parse()?,
        None => 0,
    };
    let app = Router::new()
        .nest(
            "/on",
            routes().layer(IdempotencyLayer::new(MemoryStore::new())),
        )
        .nest("/off", routes().layer(Identity::new()));
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    println!("listening on {}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}

//! An SSE generator for the streaming tests: 40 events 25 ms apart, counted.

use std::{io, time::Duration};

use axum::{
    body::Body,
    extract::{RawQuery, State},
    http::header,
    response::Response,
};
use bytes::Bytes;

use super::Counter;

pub const EVENTS: usize = 40;
pub const GAP: Duration = Duration::from_millis(25);

#[derive(Clone, Default)]
pub struct Gen {
    pub runs: Counter,
    /// Events produced, over all runs.
    pub produced: Counter,
}

pub fn event(i: usize) -> Bytes {
    Bytes::from(format!(
        "id: {i}\ndata: {{\"token\":\"t{i}\",\"pad\":\"{}\"}}\n\n",
        "x".repeat(i)
    ))
}

pub fn whole_stream() -> Vec<u8> {
    (0..EVENTS).flat_map(|i| event(i).to_vec()).collect()
}

/// `POST /v1/completions?fail_at=N`: 40 SSE events 25 ms apart, or an error at event N.
pub async fn generate(State(g): State<Gen>, RawQuery(q): RawQuery) -> Response {
    g.runs.hit();
    let fail_at: Option<usize> = q
        .as_deref()
        .and_then(|q| q.strip_prefix("fail_at="))
        .and_then(|n| n.parse().ok());
    let stream = futures_util::stream::unfold(0usize, move |i| {
        let g = g.clone();
        async move {
            if i == EVENTS {
                return None;
            }
            if i > 0 {
                tokio::time::sleep(GAP).await;
            }
            if fail_at == Some(i) {
                return Some((Err(io::Error::other("model crashed")), EVENTS));
            }
            g.produced.hit();
            Some((Ok::<_, io::Error>(event(i)), i + 1))
        }
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .body(Body::from_stream(stream))
        .unwrap()
}

/// Reads a body to its end; `Err` if it ended in an error (a truncated stream).
pub async fn read_all(mut res: reqwest::Response) -> Result<Vec<u8>, (Vec<u8>, reqwest::Error)> {
    let mut out = Vec::new();
    loop {
        match res.chunk().await {
            Ok(Some(c)) => out.extend_from_slice(&c),
            Ok(None) => return Ok(out),
            Err(e) => return Err((out, e)),
        }
    }
}

//! An OpenAI-compatible gateway that never pays twice for one completion.
//!
//! ```text
//! cargo run --example llm_gateway --features reqwest
//! ```
//!
//! Three pieces, all on 127.0.0.1:
//!
//! - a mock **upstream** LLM API (`POST /v1/chat/completions`) that bills every completion it
//!   runs. It is protected by `IdempotencyLayer`, keyed by its client's `Idempotency-Key`, and
//!   injects real faults in front of that layer: an answer sent after the client's timeout
//!   (the work is done), a connection dropped before or after the work, a 503, a completion
//!   slower than the client's timeout;
//! - the **gateway** (axum, `POST /v1/chat/completions`) behind `IdempotencyLayer`, calling the
//!   upstream through reqwest + `IdempotencyKeyLayer` + `RetryPolicy` + a per-attempt timeout,
//!   with an upstream key derived from its caller's key;
//! - **callers** that send every logical request once, twice or three times at once (double
//!   clicks), and sometimes again after the answer (a retry after a lost response).
//!
//! It prints what was sent and what ran, and exits non-zero unless billed completions equal
//! logical requests and every copy of a request got the same completion.

use std::{
    collections::HashMap,
    hash::{DefaultHasher, Hash, Hasher},
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{
    Extension, Router,
    body::{Body, Bytes},
    extract::State,
    http::{HeaderMap, Request, Response, StatusCode, header},
    response::IntoResponse,
    routing::post,
};
use dashmap::DashMap;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tower::{BoxError, ServiceBuilder, ServiceExt, retry::RetryLayer};
use tower_idempotency::{
    IdempotencyLayer, KeyMode, MemoryStore,
    client::{IdempotencyKeyLayer, RetryPolicy},
};

const LOGICAL: usize = 150;
const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(400);
const LATE: Duration = Duration::from_millis(900);
const SLOW_COMPLETION: Duration = Duration::from_millis(600);

#[derive(Clone, Default)]
struct Count(Arc<AtomicUsize>);

impl Count {
    fn hit(&self) -> usize {
        self.0.fetch_add(1, Ordering::SeqCst) + 1
    }
    fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

/// What the upstream saw and did.
#[derive(Clone, Default)]
struct Upstream {
    received: Count,
    executions: Count,
    /// Completions billed, per key of the gateway's requests.
    bills: Arc<DashMap<String, usize>>,
    per_key: Arc<DashMap<String, usize>>,
    late: Count,
    dropped: Count,
    unavailable: Count,
    slow: Count,
}

// ---------------------------------------------------------------------------------------------
// The upstream: a paid completion API with faults.

#[derive(Clone, Copy)]
struct Slow;

async fn completion(
    Extension(up): Extension<Upstream>,
    slow: Option<Extension<Slow>>,
    headers: HeaderMap,
    body: Bytes,
) -> impl IntoResponse {
    let n = up.executions.hit();
    if slow.is_some() {
        tokio::time::sleep(SLOW_COMPLETION).await;
    }
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    *up.bills.entry(key).or_default() += 1;
    let tokens = body.len() / 4;
    (
        [(header::CONTENT_TYPE, "application/json")],
        format!(
            r#"{{"id":"chatcmpl-{n}","object":"chat.completion","choices":[{{"index":0,"message":{{"role":"assistant","content":"answer #{n}"}},"finish_reason":"stop"}}],"usage":{{"prompt_tokens":{tokens},"completion_tokens":3}}}}"#
        ),
    )
}

enum Fault {
    None,
    Late,
    DropAfter,
    DropBefore,
    Unavailable,
    Slow,
}

/// Which fault an attempt meets: decided by its key, so the run is varied but each attempt
/// of a key meets its own fault; from the third attempt on, none.
fn plan(key: &str, attempt: usize) -> Fault {
    let mut h = DefaultHasher::new();
    key.hash(&mut h);
    let h = h.finish();
    match (attempt, h % 6, (h / 6) % 3) {
        (1, 1, _) => Fault::Late,
        (1, 2, _) => Fault::DropAfter,
        (1, 3, _) => Fault::Unavailable,
        (1, 4, _) => Fault::Slow,
        (1, 5, _) => Fault::DropBefore,
        (2, _, 1) => Fault::DropBefore,
        (2, _, 2) => Fault::Unavailable,
        _ => Fault::None,
    }
}

async fn faulty(
    up: Upstream,
    app: Router,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, BoxError> {
    up.received.hit();
    let key = req
        .headers()
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let attempt = {
        let mut n = up.per_key.entry(key.clone()).or_default();
        *n += 1;
        *n
    };
    match plan(&key, attempt) {
        Fault::None => Ok(app.oneshot(req).await?),
        Fault::Late => {
            up.late.hit();
            let res = app.oneshot(req).await?;
            tokio::time::sleep(LATE).await;
            Ok(res)
        }
        Fault::DropAfter => {
            up.dropped.hit();
            let _billed = app.oneshot(req).await?;
            Err("connection dropped after the completion".into())
        }
        Fault::DropBefore => {
            up.dropped.hit();
            Err("connection dropped before the completion".into())
        }
        Fault::Unavailable => {
            up.unavailable.hit();
            Ok((StatusCode::SERVICE_UNAVAILABLE, "overloaded").into_response())
        }
        Fault::Slow => {
            up.slow.hit();
            req.extensions_mut().insert(Slow);
            Ok(app.oneshot(req).await?)
        }
    }
}

/// Serves the upstream over hyper, so that a fault can drop the connection for real.
async fn start_upstream(up: Upstream) -> std::io::Result<String> {
    let app = Router::new()
        .route("/v1/chat/completions", post(completion))
        .layer(IdempotencyLayer::new(MemoryStore::new()).key_mode(KeyMode::Required))
        .layer(Extension(up.clone()));
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (up, app) = (up.clone(), app.clone());
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(move |req| faulty(up.clone(), app.clone(), req));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(format!("http://{addr}/v1/chat/completions"))
}

// ---------------------------------------------------------------------------------------------
// The gateway.

type UpstreamClient =
    tower::util::BoxCloneSyncService<reqwest::Request, reqwest::Response, BoxError>;

#[derive(Clone)]
struct Gateway {
    http: reqwest::Client,
    upstream: UpstreamClient,
    url: String,
    executions: Count,
}

/// The upstream key of a call made for a caller's request: derived from the caller's
/// principal and key, so that even if this handler runs again for the same caller request (its
/// first run failed with a 502 that the gateway's layer did not store), the upstream sees the
/// same key and bills once. Without a caller key, `IdempotencyKeyLayer` makes a fresh one.
fn upstream_key(headers: &HeaderMap) -> Option<String> {
    let key = headers.get("idempotency-key")?;
    let mut h = Sha256::new();
    for v in headers.get_all(header::AUTHORIZATION) {
        h.update(v.as_bytes());
    }
    h.update([0]);
    h.update(key.as_bytes());
    let hex: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    Some(format!("\"gw-{hex}\""))
}

async fn gateway(State(g): State<Gateway>, headers: HeaderMap, body: Bytes) -> Response<Body> {
    g.executions.hit();
    let mut req = g
        .http
        .post(&g.url)
        .header(header::AUTHORIZATION, "Bearer sk-gateway")
        .header(header::CONTENT_TYPE, "application/json")
        .body(body);
    if let Some(key) = upstream_key(&headers) {
        req = req.header("idempotency-key", key);
    }
    let res = match req.build() {
        Ok(req) => g.upstream.oneshot(req).await,
        Err(e) => Err(e.into()),
    };
    match res {
        Ok(res) => {
            let status = res.status();
            match res.bytes().await {
                Ok(body) => {
                    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
                }
                Err(_) => StatusCode::BAD_GATEWAY.into_response(),
            }
        }
        // Retries exhausted. A 502 is not stored by the gateway's layer, so the caller may
        // retry; the upstream key stays the same.
        Err(_) => StatusCode::BAD_GATEWAY.into_response(),
    }
}

async fn start_gateway(
    upstream_url: String,
    attempts: Count,
    executions: Count,
) -> std::io::Result<String> {
    let http = reqwest::Client::new();
    let upstream = ServiceBuilder::new()
        .layer(IdempotencyKeyLayer::new())
        .layer(RetryLayer::new(
            RetryPolicy::new()
                .max_attempts(6)
                .base_backoff(Duration::from_millis(10)),
        ))
        .timeout(ATTEMPT_TIMEOUT)
        .map_request(move |req: reqwest::Request| {
            attempts.hit();
            req
        })
        .map_err(BoxError::from)
        .service(http.clone());
    let g = Gateway {
        http,
        upstream: UpstreamClient::new(upstream),
        url: upstream_url,
        executions,
    };
    let app = Router::new()
        .route("/v1/chat/completions", post(gateway))
        .with_state(g)
        .layer(IdempotencyLayer::new(MemoryStore::new()));
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(format!("http://{addr}/v1/chat/completions"))
}

// ---------------------------------------------------------------------------------------------
// The callers.

async fn call(http: &reqwest::Client, url: &str, i: usize) -> Result<String, String> {
    let body =
        format!(r#"{{"model":"mock-1","messages":[{{"role":"user","content":"question {i}"}}]}}"#);
    let res = http
        .post(url)
        .header("idempotency-key", format!("\"caller-{i}\""))
        .header(header::CONTENT_TYPE, "application/json")
        .body(body)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = res.status();
    let text = res.text().await.map_err(|e| e.to_string())?;
    if status != StatusCode::OK {
        return Err(format!("{status}: {text}"));
    }
    Ok(text)
}

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<bool, BoxError> {
    let up = Upstream::default();
    let attempts = Count::default();
    let upstream_url = start_upstream(up.clone()).await?;
    let executions = Count::default();
    let gateway_url = start_gateway(upstream_url, attempts.clone(), executions.clone()).await?;

    // Logical request i is sent (i % 3) + 1 times at once, and every fifth once more after
    // its answer arrived.
    let http = reqwest::Client::new();
    let sent = Count::default();
    let tasks: Vec<_> = (0..LOGICAL)
        .map(|i| {
            let (http, url, sent) = (http.clone(), gateway_url.clone(), sent.clone());
            tokio::spawn(async move {
                let copies = (i % 3) + 1;
                let concurrent: Vec<_> = (0..copies)
                    .map(|_| {
                        sent.hit();
                        let (http, url) = (http.clone(), url.clone());
                        tokio::spawn(async move { call(&http, &url, i).await })
                    })
                    .collect();
                let mut answers = Vec::new();
                for c in concurrent {
                    answers.push(c.await.map_err(|e| e.to_string()).and_then(|r| r));
                }
                if i % 5 == 0 {
                    sent.hit();
                    answers.push(call(&http, &url, i).await);
                }
                (i, answers)
            })
        })
        .collect();

    let mut failures = Vec::new();
    let mut inconsistent = 0;
    let mut answered: HashMap<usize, String> = HashMap::new();
    for t in tasks {
        let (i, answers) = t.await?;
        let mut first: Option<&String> = None;
        for a in &answers {
            match a {
                Ok(body) => match first {
                    None => first = Some(body),
                    Some(f) if f != body => inconsistent += 1,
                    Some(_) => {}
                },
                Err(e) => failures.push(format!("request {i}: {e}")),
            }
        }
        if let Some(f) = first {
            answered.insert(i, f.clone());
        }
    }

    let billed: usize = up.bills.iter().map(|e| *e.value()).sum();
    let double_billed = up.bills.iter().filter(|e| *e.value() > 1).count();
    let rows = [
        ("logical requests", LOGICAL),
        ("requests sent to the gateway", sent.get()),
        ("gateway handler executions", executions.get()),
        ("attempts sent upstream", attempts.get()),
        ("  answered after the client's timeout", up.late.get()),
        ("  connections dropped", up.dropped.get()),
        ("  503 overloaded", up.unavailable.get()),
        ("  completions slower than the timeout", up.slow.get()),
        ("upstream executions", up.executions.get()),
        ("billed completions", billed),
        ("keys billed more than once", double_billed),
        ("failed caller requests", failures.len()),
        ("copies with a different answer", inconsistent),
    ];
    println!("{:<40} {:>6}", "", "count");
    for (name, n) in rows {
        println!("{name:<40} {n:>6}");
    }
    for f in failures.iter().take(5) {
        println!("failure: {f}");
    }

    let ok = billed == LOGICAL
        && up.executions.get() == LOGICAL
        && executions.get() == LOGICAL
        && double_billed == 0
        && failures.is_empty()
        && inconsistent == 0
        && answered.len() == LOGICAL;
    println!(
        "\n{}",
        if ok {
            "OK: billed completions = logical requests"
        } else {
            "FAILED: billed completions != logical requests, or a caller saw an error"
        }
    );
    Ok(ok)
}

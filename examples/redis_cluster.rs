//! Several server instances sharing one Redis, driven over real HTTP through duplicate
//! scenarios that land on different instances, as a load balancer would spread them.
//!
//! ```text
//! cargo run --example redis_cluster --features redis                 # starts its own redis-server
//! REDIS_URL=redis://127.0.0.1:6379/ cargo run --example redis_cluster --features redis
//! ```
//!
//! Prints one row per scenario: logical requests, requests sent, handler executions per logical
//! request. Exits non-zero if any logical request ran a wrong number of times.

use std::{
    collections::HashMap,
    net::TcpListener as StdListener,
    process::{Child, Command, ExitCode, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode},
    routing::post,
};
use tower_idempotency::{IdempotencyLayer, RedisStore};

const INSTANCES: usize = 3;

/// Handler executions per logical request (the `x-logical` request header).
#[derive(Clone, Default)]
struct Ledger(Arc<Mutex<HashMap<String, usize>>>);

impl Ledger {
    fn record(&self, logical: &str) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *map.entry(logical.to_owned()).or_default() += 1;
    }
    fn executions(&self, logical: &str) -> usize {
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.get(logical).copied().unwrap_or(0)
    }
}

/// `POST /payments`: charges the card (slowly, like a payment provider).
async fn pay(
    State(ledger): State<Ledger>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, String) {
    let logical = headers
        .get("x-logical")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    ledger.record(logical);
    tokio::time::sleep(Duration::from_millis(300)).await;
    (
        StatusCode::CREATED,
        format!("charged {} for {logical}", String::from_utf8_lossy(&body)),
    )
}

/// A `redis-server` this example started, stopped on drop.
struct OwnRedis {
    child: Child,
    dir: std::path::PathBuf,
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start_redis() -> Result<(String, OwnRedis), String> {
    let port = StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?
        .port();
    let dir = std::env::temp_dir().join(format!("redis-cluster-example-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("redis-server not found ({e}); set REDIS_URL instead"))?;
    Ok((
        format!("redis://127.0.0.1:{port}/"),
        OwnRedis { child, dir },
    ))
}

struct Cluster {
    urls: Vec<String>,
    client: reqwest::Client,
    ledger: Ledger,
}

struct Row {
    scenario: &'static str,
    sent: usize,
    /// (logical request, executions, expected)
    logical: Vec<(String, usize, usize)>,
}

impl Cluster {
    /// Sends one request of `logical` with `key` to instance `i`; returns status and body.
    async fn send(&self, i: usize, logical: &str, key: &str, body: &str) -> (u16, String) {
        let res = self
            .client
            .post(&self.urls[i % self.urls.len()])
            .header("idempotency-key", key)
            .header("x-logical", logical)
            .body(body.to_owned())
            .send()
            .await;
        match res {
            Ok(r) => {
                let s = r.status().as_u16();
                (s, r.text().await.unwrap_or_default())
            }
            Err(e) => (0, e.to_string()),
        }
    }

    fn row(&self, scenario: &'static str, sent: usize, logical: &[(&str, usize)]) -> Row {
        Row {
            scenario,
            sent,
            logical: logical
                .iter()
                .map(|(l, want)| (l.to_string(), self.ledger.executions(l), *want))
                .collect(),
        }
    }
}

/// Two clicks, 5 ms apart, on two instances.
async fn double_click(c: &Cluster, run: &str) -> Row {
    let key = format!("{run}-click");
    let (a, b) = tokio::join!(c.send(0, &key, &key, "10 EUR"), async {
        tokio::time::sleep(Duration::from_millis(5)).await;
        c.send(1, &key, &key, "10 EUR").await
    });
    let same = a == b;
    let mut row = c.row("double click, two instances", 2, &[(&key, 1)]);
    if !same {
        row.logical[0].2 = usize::MAX; // different answers: mark as wrong
    }
    row
}

/// A client times out while the first attempt still runs, retries on another instance.
async fn timeout_then_retry(c: &Cluster, run: &str) -> Row {
    let key = format!("{run}-timeout");
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(50))
        .build()
        .unwrap_or_default();
    let _ = impatient
        .post(&c.urls[0])
        .header("idempotency-key", &key)
        .header("x-logical", &key)
        .body("20 EUR")
        .send()
        .await;
    let (s, _) = c.send(1, &key, &key, "20 EUR").await;
    let (s2, _) = c.send(2, &key, &key, "20 EUR").await;
    let mut row = c.row("timeout, retry elsewhere", 3, &[(&key, 1)]);
    if (s, s2) != (201, 201) {
        row.logical[0].2 = usize::MAX;
    }
    row
}

/// 300 concurrent duplicates spread over every instance.
async fn burst(c: &Cluster, run: &str) -> Row {
    let key = format!("{run}-burst");
    let answers = futures_util::future::join_all((0..300).map(|i| {
        let key = key.clone();
        async move { c.send(i, &key, &key, "30 EUR").await }
    }))
    .await;
    let distinct: std::collections::HashSet<_> = answers.into_iter().collect();
    let mut row = c.row("300 concurrent duplicates", 300, &[(&key, 1)]);
    if distinct.len() != 1 {
        row.logical[0].2 = usize::MAX;
    }
    row
}

/// The same key with another amount: 422, the handler does not run again.
async fn key_reused(c: &Cluster, run: &str) -> Row {
    let key = format!("{run}-reuse");
    let (s1, _) = c.send(0, &key, &key, "40 EUR").await;
    let (s2, _) = c.send(1, &key, &key, "4000 EUR").await;
    let mut row = c.row("key reused, other body", 2, &[(&key, 1)]);
    if (s1, s2) != (201, 422) {
        row.logical[0].2 = usize::MAX;
    }
    row
}

/// Ten distinct payments, each sent twice to different instances: ten executions.
async fn distinct(c: &Cluster, run: &str) -> Row {
    let keys: Vec<String> = (0..10).map(|i| format!("{run}-distinct-{i}")).collect();
    futures_util::future::join_all(keys.iter().enumerate().flat_map(|(i, k)| {
        [(i, k.clone()), (i + 1, k.clone())]
            .map(|(inst, k)| async move { c.send(inst, &k, &k, "50 EUR").await })
    }))
    .await;
    let want: Vec<(&str, usize)> = keys.iter().map(|k| (k.as_str(), 1)).collect();
    c.row("10 payments, each sent twice", 20, &want)
}

#[tokio::main]
async fn main() -> ExitCode {
    let (url, _own) = match std::env::var("REDIS_URL") {
        Ok(url) => (url, None),
        Err(_) => match start_redis() {
            Ok((url, own)) => (url, Some(own)),
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::FAILURE;
            }
        },
    };
    let run = uuid::Uuid::new_v4().simple().to_string();
    let ledger = Ledger::default();
    let mut urls = Vec::new();
    for _ in 0..INSTANCES {
        // Each instance has its own store connection, as separate processes would.
        let deadline = Instant::now() + Duration::from_secs(10);
        let store = loop {
            match RedisStore::connect(url.as_str()).await {
                Ok(s) => break s.prefix(format!("example:{run}:")),
                Err(e) if Instant::now() < deadline => {
                    tracing_hint(&e);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => {
                    eprintln!("cannot connect to {url}: {e}");
                    return ExitCode::FAILURE;
                }
            }
        };
        let app = Router::new()
            .route("/payments", post(pay))
            .with_state(ledger.clone())
            .layer(IdempotencyLayer::new(store));
        let listener = match tokio::net::TcpListener::bind("127.0.0.1:0").await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("bind: {e}");
                return ExitCode::FAILURE;
            }
        };
        let addr = listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        urls.push(format!("http://{addr}/payments"));
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
    }
    let cluster = Cluster {
        urls,
        client: reqwest::Client::new(),
        ledger,
    };
    println!("{INSTANCES} instances on {url}\n");
    let rows = vec![
        double_click(&cluster, &run).await,
        timeout_then_retry(&cluster, &run).await,
        burst(&cluster, &run).await,
        key_reused(&cluster, &run).await,
        distinct(&cluster, &run).await,
    ];
    println!(
        "{:<30} {:>8} {:>8} {:>24}",
        "scenario", "logical", "sent", "executions per logical"
    );
    let mut ok = true;
    for r in &rows {
        let counts: Vec<String> = r.logical.iter().map(|(_, n, _)| n.to_string()).collect();
        let good = r.logical.iter().all(|(_, n, want)| n == want);
        ok &= good;
        println!(
            "{:<30} {:>8} {:>8} {:>24} {}",
            r.scenario,
            r.logical.len(),
            r.sent,
            counts.join(","),
            if good { "ok" } else { "WRONG" }
        );
    }
    if ok {
        println!("\nevery logical request ran exactly once");
        ExitCode::SUCCESS
    } else {
        println!("\nFAILED: some logical request ran a wrong number of times");
        ExitCode::FAILURE
    }
}

fn tracing_hint(e: &tower_idempotency::StoreError) {
    eprintln!("waiting for Redis: {e}");
}

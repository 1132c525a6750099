//! The main demo: an axum payment endpoint behind `IdempotencyLayer` with the in-memory store,
//! driven over real HTTP through the failures that make payments run twice.
//!
//! ```text
//! cargo run --example double_submit
//! ```
//!
//! Prints one row per scenario: requests sent, handler executions, statuses seen. Exits
//! non-zero if any scenario ran the handler a wrong number of times.

use std::{
    collections::HashMap,
    process::ExitCode,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode},
    routing::post,
};
use tower_idempotency::{IdempotencyLayer, MemoryStore};

/// Handler executions per scenario (the `x-scenario` request header).
#[derive(Clone, Default)]
struct Ledger(Arc<Mutex<HashMap<String, usize>>>);

impl Ledger {
    fn record(&self, scenario: &str) -> usize {
        let mut map = self.0.lock().unwrap();
        let n = map.entry(scenario.to_owned()).or_default();
        *n += 1;
        *n
    }
    fn executions(&self, scenario: &str) -> usize {
        self.0.lock().unwrap().get(scenario).copied().unwrap_or(0)
    }
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// `POST /payments`: charges the card. Demo knobs: `x-delay-ms` (a slow payment provider)
/// and `x-fail-first` (the provider answers 503 on the first attempt).
async fn pay(
    State(ledger): State<Ledger>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, String) {
    let scenario = header(&headers, "x-scenario");
    ledger.record(&format!("{scenario}/started"));
    if let Ok(ms) = header(&headers, "x-delay-ms").parse::<u64>() {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let n = ledger.record(scenario);
    if header(&headers, "x-fail-first") == "1" && n == 1 {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "provider unavailable".into(),
        );
    }
    let user = header(&headers, "authorization");
    (
        StatusCode::CREATED,
        format!(
            "{{\"charge\":{n},\"user\":\"{user}\",\"request\":\"{}\"}}",
            String::from_utf8_lossy(&body)
        ),
    )
}

struct Row {
    scenario: &'static str,
    sent: usize,
    executions: usize,
    expected: usize,
    statuses: Vec<String>,
}

struct Demo {
    url: String,
    client: reqwest::Client,
    ledger: Ledger,
}

impl Demo {
    fn post(&self, scenario: &str) -> reqwest::RequestBuilder {
        self.client.post(&self.url).header("x-scenario", scenario)
    }

    async fn wait_for_executions(&self, scenario: &str, n: usize) {
        for _ in 0..1000 {
            if self.ledger.executions(scenario) >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn row(&self, scenario: &'static str, expected: usize, seen: Vec<String>) -> Row {
        Row {
            scenario,
            sent: seen.len(),
            executions: self.ledger.executions(scenario),
            expected,
            statuses: seen,
        }
    }
}

fn describe(res: &reqwest::Response) -> String {
    let replayed = res.headers().contains_key("idempotent-replayed");
    format!(
        "{}{}",
        res.status().as_u16(),
        if replayed { " (replay)" } else { "" }
    )
}

async fn double_click(d: &Demo) -> Row {
    let s = "double click, no key";
    let send = || {
        d.post(s)
            .header("authorization", "Bearer alice")
            .body("amount=4200")
            .send()
    };
    let (a, b) = tokio::join!(send(), send());
    d.row(s, 1, vec![describe(&a.unwrap()), describe(&b.unwrap())])
}

async fn timeout_then_retry(d: &Demo) -> Row {
    let s = "client timeout, retry while running";
    let first = d
        .post(s)
        .header("idempotency-key", "pay-timeout")
        .header("x-delay-ms", "600")
        .timeout(Duration::from_millis(150))
        .body("amount=990")
        .send()
        .await;
    let first = match first {
        Err(e) if e.is_timeout() => "timeout".to_owned(),
        Err(e) => format!("error: {e}"),
        Ok(r) => describe(&r),
    };
    let retry = d
        .post(s)
        .header("idempotency-key", "pay-timeout")
        .header("x-delay-ms", "600")
        .body("amount=990")
        .send()
        .await
        .unwrap();
    d.row(s, 1, vec![first, describe(&retry)])
}

async fn retry_after_disconnect(d: &Demo) -> Row {
    let s = "retry after client disconnected";
    let first = tokio::spawn(
        d.post(s)
            .header("idempotency-key", "pay-disconnect")
            .header("x-delay-ms", "300")
            .body("amount=15")
            .send(),
    );
    d.wait_for_executions(&format!("{s}/started"), 1).await;
    first.abort(); // the phone goes into a tunnel: the connection is dropped
    d.wait_for_executions(s, 1).await;
    let retry = d
        .post(s)
        .header("idempotency-key", "pay-disconnect")
        .header("x-delay-ms", "300")
        .body("amount=15")
        .send()
        .await
        .unwrap();
    d.row(s, 1, vec!["disconnected".into(), describe(&retry)])
}

async fn key_reused(d: &Demo) -> Row {
    let s = "same key, different body";
    let a = d
        .post(s)
        .header("idempotency-key", "pay-reuse")
        .body("amount=1")
        .send()
        .await
        .unwrap();
    let b = d
        .post(s)
        .header("idempotency-key", "pay-reuse")
        .body("amount=100")
        .send()
        .await
        .unwrap();
    d.row(s, 1, vec![describe(&a), describe(&b)])
}

async fn two_users(d: &Demo) -> Row {
    let s = "two users, same key";
    let mut seen = Vec::new();
    let mut bodies = Vec::new();
    for user in ["Bearer alice", "Bearer bob", "Bearer alice", "Bearer bob"] {
        let res = d
            .post(s)
            .header("authorization", user)
            .header("idempotency-key", "checkout-1")
            .body("cart=7")
            .send()
            .await
            .unwrap();
        seen.push(describe(&res));
        bodies.push(res.text().await.unwrap());
    }
    let mut row = d.row(s, 2, seen);
    // Each user's replay must be their own response.
    if bodies[0] != bodies[2] || bodies[1] != bodies[3] || bodies[0] == bodies[1] {
        row.expected = usize::MAX;
    }
    row
}

async fn fails_then_retry(d: &Demo) -> Row {
    let s = "503 from handler, then retry";
    let mut seen = Vec::new();
    for _ in 0..2 {
        let res = d
            .post(s)
            .header("idempotency-key", "pay-503")
            .header("x-fail-first", "1")
            .body("amount=30")
            .send()
            .await
            .unwrap();
        seen.push(describe(&res));
    }
    d.row(s, 2, seen)
}

#[tokio::main]
async fn main() -> ExitCode {
    let ledger = Ledger::default();
    let app = Router::new()
        .route("/payments", post(pay))
        .layer(IdempotencyLayer::new(MemoryStore::new()))
        .with_state(ledger.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    println!("payment endpoint on http://{addr}/payments (IdempotencyLayer + MemoryStore)\n");

    let demo = Demo {
        url: format!("http://{addr}/payments"),
        client: reqwest::Client::new(),
        ledger,
    };
    let rows = vec![
        double_click(&demo).await,
        timeout_then_retry(&demo).await,
        retry_after_disconnect(&demo).await,
        key_reused(&demo).await,
        two_users(&demo).await,
        fails_then_retry(&demo).await,
    ];

    println!(
        "{:<36} {:>8} {:>11} {:>9}  statuses seen",
        "scenario", "requests", "executions", "expected"
    );
    println!("{}", "-".repeat(100));
    let mut ok = true;
    for r in &rows {
        let good = r.executions == r.expected;
        ok &= good;
        let expected = if r.expected == usize::MAX {
            "LEAK".to_owned()
        } else {
            r.expected.to_string()
        };
        println!(
            "{:<36} {:>8} {:>11} {:>9}  {}{}",
            r.scenario,
            r.sent,
            r.executions,
            expected,
            r.statuses.join(", "),
            if good { "" } else { "   <-- WRONG" }
        );
    }
    println!();
    if ok {
        println!("every logical request ran the handler exactly once");
        ExitCode::SUCCESS
    } else {
        println!("FAILED: some scenario ran the handler a wrong number of times");
        ExitCode::FAILURE
    }
}

//! Keys are namespaced by principal: one user never receives another's cached response.

mod harness;

use axum::{Router, extract::State, http::HeaderMap, routing::post};
use harness::*;
use tower_idempotency::{IdempotencyLayer, MemoryStore, Scope};

async fn whoami(State(c): State<Counter>, headers: HeaderMap) -> String {
    let n = c.hit();
    let who = headers
        .get("authorization")
        .or_else(|| headers.get("cookie"))
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    format!("#{n} for {who}")
}

async fn start(layer: IdempotencyLayer<MemoryStore>) -> (Counter, String) {
    let counter = Counter::default();
    let app = Router::new()
        .route("/orders", post(whoami))
        .layer(layer)
        .with_state(counter.clone());
    let addr = serve(app).await;
    (counter, format!("http://{addr}/orders"))
}

async fn post_as(url: &str, header: (&str, &str), key: &str) -> (bool, String) {
    let res = client()
        .post(url)
        .header(header.0, header.1)
        .header("idempotency-key", key)
        .body("same body")
        .send()
        .await
        .unwrap();
    let replayed = is_replayed(&res);
    (replayed, res.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_key_from_two_users_runs_twice_and_never_crosses() {
    let (counter, url) = start(IdempotencyLayer::new(MemoryStore::new())).await;
    let alice = ("authorization", "Bearer alice");
    let bob = ("authorization", "Bearer bob");
    assert_eq!(
        post_as(&url, alice, "k1").await,
        (false, "#1 for Bearer alice".into())
    );
    assert_eq!(
        post_as(&url, bob, "k1").await,
        (false, "#2 for Bearer bob".into())
    );
    assert_eq!(
        post_as(&url, alice, "k1").await,
        (true, "#1 for Bearer alice".into())
    );
    assert_eq!(
        post_as(&url, bob, "k1").await,
        (true, "#2 for Bearer bob".into())
    );
    assert_eq!(counter.get(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_sessions_are_principals_too() {
    let (counter, url) = start(IdempotencyLayer::new(MemoryStore::new())).await;
    let a = ("cookie", "session=aaa");
    let b = ("cookie", "session=bbb");
    assert_eq!(
        post_as(&url, a, "k").await,
        (false, "#1 for session=aaa".into())
    );
    assert_eq!(
        post_as(&url, b, "k").await,
        (false, "#2 for session=bbb".into())
    );
    assert_eq!(
        post_as(&url, a, "k").await,
        (true, "#1 for session=aaa".into())
    );
    assert_eq!(counter.get(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn derived_keys_are_scoped_as_well() {
    let (counter, url) = start(IdempotencyLayer::new(MemoryStore::new())).await;
    let client = client();
    for who in ["Bearer alice", "Bearer bob"] {
        let res = client
            .post(&url)
            .header("authorization", who)
            .body("same body")
            .send()
            .await
            .unwrap();
        assert!(!is_replayed(&res));
        assert!(res.text().await.unwrap().ends_with(who));
    }
    assert_eq!(counter.get(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_scope_by_user_id_survives_token_rotation() {
    // The user id comes from a header here; in an application, from the auth middleware.
    let layer = IdempotencyLayer::new(MemoryStore::new()).scope(|parts| {
        match parts.headers.get("x-user-id") {
            Some(id) => Scope::new(id.as_bytes()),
            None => Scope::from_credentials(parts),
        }
    });
    let (counter, url) = start(layer).await;
    let client = client();
    let send = |token: &'static str, user: &'static str| {
        client
            .post(&url)
            .header("authorization", token)
            .header("x-user-id", user)
            .header("idempotency-key", "k")
            .body("same body")
            .send()
    };
    let first = send("Bearer old-token", "u1").await.unwrap();
    assert!(!is_replayed(&first));
    let again = send("Bearer refreshed-token", "u1").await.unwrap();
    assert!(is_replayed(&again), "same user, new token: same scope");
    let other = send("Bearer old-token", "u2").await.unwrap();
    assert!(!is_replayed(&other), "another user: another scope");
    assert_eq!(counter.get(), 2);
}

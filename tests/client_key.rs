//! `IdempotencyKeyLayer` over real HTTP with reqwest: which requests get a key, and which key.

mod client_support;

use axum::{Router, routing::any};
use client_support::*;
use http::{HeaderValue, Method};
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_idempotency::client::IdempotencyKeyLayer;

/// A server that records the key of each request.
async fn recorder() -> (String, Keys) {
    let keys = Keys::default();
    let k = keys.clone();
    let addr = serve(Router::new().route(
        "/{*path}",
        any(move |headers: http::HeaderMap| async move {
            k.record(&headers);
        }),
    ))
    .await;
    (format!("http://{addr}/v1/things"), keys)
}

fn is_quoted_uuid_v4(key: &str) -> bool {
    key.strip_prefix('"')
        .and_then(|k| k.strip_suffix('"'))
        .and_then(|k| uuid::Uuid::parse_str(k).ok())
        .is_some_and(|u| u.get_version_num() == 4)
}

#[tokio::test]
async fn caller_key_kept_get_unkeyed_each_post_its_own_key() {
    let (url, keys) = recorder().await;
    let http = reqwest::Client::new();
    let mut client = ServiceBuilder::new()
        .layer(IdempotencyKeyLayer::new())
        .service(http.clone());

    let reqs = [
        http.post(&url)
            .header("idempotency-key", "order-42")
            .body("a")
            .build()
            .unwrap(),
        http.get(&url).build().unwrap(),
        http.post(&url).body("b").build().unwrap(),
        http.post(&url).body("b").build().unwrap(),
        http.patch(&url).body("c").build().unwrap(),
        http.delete(&url).build().unwrap(),
    ];
    for req in reqs {
        let res = client.ready().await.unwrap().call(req).await.unwrap();
        assert!(res.status().is_success());
    }

    let keys = keys.all();
    assert_eq!(
        keys[0].as_deref(),
        Some("order-42"),
        "the caller's key is kept"
    );
    assert_eq!(keys[1], None, "GET gets no key");
    let (a, b, c) = (
        keys[2].clone().unwrap(),
        keys[3].clone().unwrap(),
        keys[4].clone().unwrap(),
    );
    assert!(is_quoted_uuid_v4(&a) && is_quoted_uuid_v4(&b) && is_quoted_uuid_v4(&c));
    assert_ne!(a, b, "two logical POSTs, two keys");
    assert_eq!(keys[5], None, "DELETE gets no key");
}

#[tokio::test]
async fn methods_and_generator_are_configurable() {
    let (url, keys) = recorder().await;
    let http = reqwest::Client::new();
    let n = Counter::default();
    let client = ServiceBuilder::new()
        .layer(
            IdempotencyKeyLayer::new()
                .methods([Method::POST, Method::PUT])
                .generator(move || HeaderValue::from(n.hit())),
        )
        .service(http.clone());
    for req in [
        http.put(&url).body("a").build().unwrap(),
        http.patch(&url).body("b").build().unwrap(),
        http.post(&url).body("c").build().unwrap(),
    ] {
        client.clone().oneshot(req).await.unwrap();
    }
    assert_eq!(
        keys.all(),
        [Some("1".to_owned()), None, Some("2".to_owned())]
    );
}

#[tokio::test]
async fn many_concurrent_posts_get_distinct_keys() {
    let (url, keys) = recorder().await;
    let http = reqwest::Client::new();
    let client = ServiceBuilder::new()
        .layer(IdempotencyKeyLayer::new())
        .service(http.clone());
    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let req = http.post(&url).body("same body").build().unwrap();
            tokio::spawn(client.clone().oneshot(req))
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let mut all: Vec<_> = keys.all().into_iter().map(Option::unwrap).collect();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 200);
}

//! [`RedisStore`]: a [`Store`] in Redis, shared by every instance connected to it.

use std::{fmt, sync::Arc, time::Duration};

use bytes::Bytes;
use redis::{IntoConnectionInfo, Value, aio::ConnectionLike};
use tokio::time::Instant;

use super::{Claim, ClaimRequest, Reclaim, Store, StoreError, Token};
use crate::{
    key::{Fingerprint, StoreKey},
    record::Record,
};

mod codec;
mod notify;
mod scripts;

use notify::Notifier;
use scripts::{CLAIM_SCRIPT, COMPLETE_SCRIPT, EXTEND_SCRIPT, PEEK_SCRIPT, RELEASE_SCRIPT};

/// A [`Store`] in Redis (single node or Redis Cluster), shared by every instance connected to
/// it: duplicates landing on different instances still run the inner service once.
///
/// ```no_run
/// use axum::{Router, routing::post};
/// use tower_idempotency::{IdempotencyLayer, RedisStore};
///
/// # async fn pay() -> &'static str { "charged" }
/// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store = RedisStore::connect("redis://127.0.0.1:6379/").await?;
/// let app: Router = Router::new()
///     .route("/payments", post(pay))
///     .layer(IdempotencyLayer::new(store));
/// # Ok(()) }
/// ```
///
/// - Every step is one Lua script, so one round trip: a first execution costs a claim and a
///   complete (plus one lease renewal per third of a lease while the handler runs), a replay
///   costs one claim. Scripts are sent as `EVALSHA` and loaded on demand (also after a Redis
///   restart).
/// - Each stored key is one Redis hash named `<prefix>{<64 hex digits>}`; the `{…}` hash tag
///   keeps everything about one key in one cluster slot.
/// - Fencing tokens are random 64-bit values chosen per claim; an expired lease is taken over
///   by a compare-and-set inside the claim script. Lease deadlines use Redis's own clock.
/// - Completed records are stored in a compact, versioned binary encoding; a value that does not
///   decode is [`StoreError::Corrupt`], handled by the layer's failure mode.
/// - Waiters subscribe to a per-key channel (published by the complete and release scripts),
///   then read the key, then wait for a message **or** the next poll, whichever is first.
/// - Every operation is bounded by [`RedisStore::timeout`]; the connections made by
///   [`RedisStore::connect`] reconnect by themselves.
///
/// What it does not cover: an instance that crashes after the side effect but before the
/// complete leaves a claim that the next duplicate takes over once the lease ends, and runs
/// again ([`Reclaim::Never`] answers "outcome unknown" instead); and instances on separate
/// Redis deployments (one per region, say) do not see each other's keys.
///
/// Cheap to clone (clones share the connection). The type parameter is the redis-rs
/// connection: a [`ConnectionManager`](redis::aio::ConnectionManager) by default (made by
/// [`RedisStore::connect`]), or any other async connection via
/// [`RedisStore::from_connection`]: a multiplexed connection, or a cluster connection with the
/// `redis-cluster` feature ([`connect_cluster`](RedisStore::connect_cluster)).
pub struct RedisStore<C = redis::aio::ConnectionManager> {
    conn: C,
    prefix: Arc<str>,
    timeout: Duration,
    poll_interval: Duration,
    notifier: Arc<Notifier>,
}

impl<C: Clone> Clone for RedisStore<C> {
    fn clone(&self) -> Self {
        RedisStore {
            conn: self.conn.clone(),
            prefix: self.prefix.clone(),
            timeout: self.timeout,
            poll_interval: self.poll_interval,
            notifier: self.notifier.clone(),
        }
    }
}

impl<C> fmt::Debug for RedisStore<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .field("poll_interval", &self.poll_interval)
            .field("notifier", &self.notifier)
            .finish_non_exhaustive()
    }
}

fn unavailable(e: redis::RedisError) -> StoreError {
    StoreError::Unavailable(Box::new(e))
}

impl RedisStore {
    /// Default key prefix: `idempotency:`.
    pub const DEFAULT_PREFIX: &'static str = "idempotency:";
    /// Default bound on one operation, and the connection and response timeouts of the
    /// connections this type makes: 2 seconds.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
    /// Default interval at which a waiter re-reads a key it waits for: 250 ms.
    pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(250);

    /// Connects to the Redis at `url` (`redis://host:port/db`, `rediss://…`, `unix://…`) with a
    /// [`ConnectionManager`](redis::aio::ConnectionManager) that reconnects by itself, and a
    /// subscriber connection for wake-ups. Uses [`DEFAULT_TIMEOUT`](Self::DEFAULT_TIMEOUT).
    ///
    /// # Errors
    /// When the URL is invalid or Redis cannot be reached within the timeout.
    pub async fn connect(url: impl IntoConnectionInfo) -> Result<Self, StoreError> {
        let client = redis::Client::open(url).map_err(unavailable)?;
        Self::connect_with(client, Self::DEFAULT_TIMEOUT).await
    }

    /// Like [`connect`](Self::connect), from a configured client, with `timeout` as the
    /// connection timeout, the response timeout and the bound on each store operation.
    ///
    /// # Errors
    /// When Redis cannot be reached within `timeout`.
    pub async fn connect_with(
        client: redis::Client,
        timeout: Duration,
    ) -> Result<Self, StoreError> {
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            // Retry a lost connection quickly and briefly: requests fail per the failure mode
            // meanwhile, and the next request after Redis is back reconnects.
            .set_number_of_retries(2)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(250));
        let conn = tokio::time::timeout(timeout, client.get_connection_manager_with_config(config))
            .await
            .map_err(|_| StoreError::Timeout)?
            .map_err(unavailable)?;
        Ok(RedisStore::from_connection(conn)
            .timeout(timeout)
            .notifications(client))
    }
}

#[cfg(feature = "redis-cluster")]
impl RedisStore<redis::cluster_async::ClusterConnection> {
    /// Connects to a Redis Cluster through any of `nodes`, with a subscriber connection to the
    /// first node for wake-ups (cluster pub/sub reaches every node). Uses
    /// [`DEFAULT_TIMEOUT`](RedisStore::DEFAULT_TIMEOUT).
    ///
    /// # Errors
    /// When a node address is invalid or the cluster cannot be reached within the timeout.
    pub async fn connect_cluster<I, T>(nodes: I) -> Result<Self, StoreError>
    where
        I: IntoIterator<Item = T>,
        T: IntoConnectionInfo,
    {
        let timeout = RedisStore::DEFAULT_TIMEOUT;
        let nodes = nodes
            .into_iter()
            .map(IntoConnectionInfo::into_connection_info)
            .collect::<Result<Vec<_>, _>>()
            .map_err(unavailable)?;
        let first = nodes
            .first()
            .cloned()
            .ok_or_else(|| StoreError::Unavailable("no cluster node given".into()))?;
        let client = redis::cluster::ClusterClientBuilder::new(nodes)
            .connection_timeout(timeout)
            .response_timeout(timeout)
            .build()
            .map_err(unavailable)?;
        let conn = tokio::time::timeout(timeout, client.get_async_connection())
            .await
            .map_err(|_| StoreError::Timeout)?
            .map_err(unavailable)?;
        let subscriber = redis::Client::open(first).map_err(unavailable)?;
        Ok(RedisStore::from_connection(conn)
            .timeout(timeout)
            .notifications(subscriber))
    }
}

/// What [`Store::wait`] reads about a key.
#[derive(PartialEq, Eq)]
enum Held {
    /// A live claim with this token, for about this long.
    By(Vec<u8>, Duration),
    /// No live claim: it completed, was released, abandoned, or its lease ran out.
    Free,
}

impl<C> RedisStore<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    /// A store over an existing connection, e.g. a
    /// [`MultiplexedConnection`](redis::aio::MultiplexedConnection) or a cluster connection.
    ///
    /// Waiters poll only; add [`notifications`](Self::notifications) for pub/sub wake-ups.
    /// Set timeouts on the connection itself as well: [`timeout`](Self::timeout) bounds each
    /// operation, the connection's own settings decide how it reconnects.
    pub fn from_connection(conn: C) -> Self {
        RedisStore {
            conn,
            prefix: RedisStore::DEFAULT_PREFIX.into(),
            timeout: RedisStore::DEFAULT_TIMEOUT,
            poll_interval: RedisStore::DEFAULT_POLL_INTERVAL,
            notifier: Arc::new(Notifier::new(None, RedisStore::DEFAULT_TIMEOUT)),
        }
    }

    /// The prefix of every Redis key and channel this store uses. Default
    /// [`DEFAULT_PREFIX`](RedisStore::DEFAULT_PREFIX). Give each application its own.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into().into();
        self
    }

    /// Bound on one store operation; past it, the operation fails with
    /// [`StoreError::Timeout`]. Default [`DEFAULT_TIMEOUT`](RedisStore::DEFAULT_TIMEOUT).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self.notifier = Arc::new(Notifier::new(self.notifier_client(), timeout));
        self
    }

    /// How often a waiter re-reads the key it waits for, in case a pub/sub message was lost.
    /// Default [`DEFAULT_POLL_INTERVAL`](RedisStore::DEFAULT_POLL_INTERVAL).
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval.max(Duration::from_millis(1));
        self
    }

    /// Wake waiters with pub/sub through a subscriber connection made from `client`
    /// ([`connect`](RedisStore::connect) does this). Waiters keep polling as well.
    pub fn notifications(mut self, client: redis::Client) -> Self {
        self.notifier = Arc::new(Notifier::new(Some(client), self.timeout));
        self
    }

    fn notifier_client(&self) -> Option<redis::Client> {
        self.notifier.client().cloned()
    }

    /// The Redis key (and pub/sub channel) of `key`.
    pub fn redis_key(&self, key: &StoreKey) -> String {
        format!("{}{{{key}}}", self.prefix)
    }

    async fn run(&self, inv: &redis::ScriptInvocation<'_>) -> Result<Value, StoreError> {
        let mut conn = self.conn.clone();
        match tokio::time::timeout(self.timeout, inv.invoke_async::<Value>(&mut conn)).await {
            Ok(r) => r.map_err(unavailable),
            Err(_) => Err(StoreError::Timeout),
        }
    }

    async fn fenced(&self, inv: &redis::ScriptInvocation<'_>) -> Result<bool, StoreError> {
        match self.run(inv).await? {
            Value::Int(1) => Ok(true),
            Value::Int(0) => Ok(false),
            Value::Int(-1) => Err(StoreError::Corrupt(
                "the key holds a value that is not an idempotency record".into(),
            )),
            other => Err(unexpected(&other)),
        }
    }

    async fn peek(&self, rkey: &str) -> Result<Held, StoreError> {
        let reply = self.run(&PEEK_SCRIPT.key(rkey)).await?;
        let items = array(reply)?;
        match items.as_slice() {
            [tag] if bytes(tag) == Some(b"n") => Ok(Held::Free),
            [tag, token, left] if bytes(tag) == Some(b"f") => {
                let token = bytes(token).ok_or_else(|| unexpected(token))?.to_vec();
                let left = int(left).ok_or_else(|| unexpected(left))?;
                Ok(Held::By(token, Duration::from_millis(left.max(0) as u64)))
            }
            [tag, why] if bytes(tag) == Some(b"e") => Err(corrupt_reply(why)),
            _ => Err(StoreError::Corrupt("unexpected peek reply".into())),
        }
    }

    async fn wait_for(&self, key: StoreKey, timeout: Duration) -> Result<(), StoreError> {
        let deadline = crate::policy::deadline(Instant::now(), timeout);
        let rkey = self.redis_key(&key);
        // Subscribe, then read, then wait: a message published after the read is not missed,
        // and an outcome that came before the subscription is seen by the read.
        let watch = self.notifier.watch(&rkey, deadline).await;
        let mut first: Option<Vec<u8>> = None;
        loop {
            let notified = watch.notify().notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            let (token, left) = match self.peek(&rkey).await? {
                Held::Free => return Ok(()),
                Held::By(token, left) => (token, left),
            };
            match &first {
                Some(t) if *t != token => return Ok(()),
                Some(_) => {}
                None => first = Some(token),
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(());
            }
            let next = deadline
                .min(crate::policy::deadline(now, self.poll_interval))
                .min(crate::policy::deadline(
                    now,
                    left.saturating_add(Duration::from_millis(1)),
                ));
            tokio::select! {
                () = notified => return Ok(()),
                () = tokio::time::sleep_until(next) => {}
            }
            if Instant::now() >= deadline {
                return Ok(());
            }
        }
    }
}

fn unexpected(v: &Value) -> StoreError {
    StoreError::Corrupt(format!("unexpected reply from Redis: {v:?}"))
}

fn corrupt_reply(why: &Value) -> StoreError {
    StoreError::Corrupt(
        bytes(why)
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .unwrap_or_else(|| "malformed value under an idempotency key".into()),
    )
}

fn array(v: Value) -> Result<Vec<Value>, StoreError> {
    match v {
        Value::Array(items) => Ok(items),
        other => Err(unexpected(&other)),
    }
}

fn bytes(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(n) => Some(*n),
        _ => None,
    }
}

fn fingerprint(v: &Value) -> Result<Fingerprint, StoreError> {
    bytes(v)
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .map(Fingerprint)
        .ok_or_else(|| StoreError::Corrupt("claim with a malformed fingerprint".into()))
}

/// Whole milliseconds, at least 1, at most [`LONGEST`](crate::policy::LONGEST): a lease plus a
/// TTL stays an integer Redis accepts (a script that fails halfway keeps what it wrote).
fn millis(d: Duration) -> u64 {
    let ms = d.min(crate::policy::LONGEST).as_millis();
    u64::try_from(ms).unwrap_or(u64::MAX).max(1)
}

impl<C> Store for RedisStore<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    async fn claim(&self, key: StoreKey, req: ClaimRequest) -> Result<Claim, StoreError> {
        let token = uuid::Uuid::new_v4().as_u64_pair().0;
        let rkey = self.redis_key(&key);
        let mut inv = CLAIM_SCRIPT.key(&rkey);
        inv.arg(token)
            .arg(&req.fingerprint.0[..])
            .arg(millis(req.lease))
            .arg(millis(req.ttl))
            .arg(if req.reclaim == Reclaim::Never { 0 } else { 1 });
        let mut items = array(self.run(&inv).await?)?;
        if items.len() == 2
            && bytes(&items[0]) == Some(b"c")
            && let Value::BulkString(raw) = items.swap_remove(1)
        {
            return Ok(Claim::Completed(Arc::new(codec::decode(Bytes::from(raw))?)));
        }
        let Some((tag, rest)) = items.split_first() else {
            return Err(unexpected(&Value::Nil));
        };
        match (bytes(tag), rest) {
            (Some(b"a"), []) => Ok(Claim::Acquired {
                token: Token(token),
            }),
            (Some(b"f"), [fp, _left]) => Ok(Claim::InFlight {
                fingerprint: fingerprint(fp)?,
            }),
            (Some(b"x"), [fp]) => Ok(Claim::Abandoned {
                fingerprint: fingerprint(fp)?,
            }),
            (Some(b"e"), [why]) => Err(corrupt_reply(why)),
            _ => Err(unexpected(tag)),
        }
    }

    async fn complete(
        &self,
        key: StoreKey,
        token: Token,
        record: Arc<Record>,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let rkey = self.redis_key(&key);
        let encoded = codec::encode(&record);
        let mut inv = COMPLETE_SCRIPT.key(&rkey);
        inv.arg(token.0).arg(encoded).arg(millis(ttl));
        self.fenced(&inv).await
    }

    async fn release(&self, key: StoreKey, token: Token) -> Result<bool, StoreError> {
        let rkey = self.redis_key(&key);
        let mut inv = RELEASE_SCRIPT.key(&rkey);
        inv.arg(token.0);
        self.fenced(&inv).await
    }

    async fn extend(
        &self,
        key: StoreKey,
        token: Token,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        let rkey = self.redis_key(&key);
        let mut inv = EXTEND_SCRIPT.key(&rkey);
        inv.arg(token.0).arg(millis(lease));
        self.fenced(&inv).await
    }

    async fn wait(&self, key: StoreKey, timeout: Duration) -> Result<(), StoreError> {
        self.wait_for(key, timeout).await
    }
}

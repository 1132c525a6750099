//! The store conformance suite, run against every store the crate ships: `MemoryStore`,
//! `RedisStore` on one `redis-server`, and `RedisStore` on a 3-master Redis Cluster (the Redis
//! ones with `--features redis` / `--features redis-cluster`; each starts its own servers).

mod conformance;

use conformance::Fixture;
use tower_idempotency::MemoryStore;

async fn memory() -> Option<Fixture<MemoryStore>> {
    Some(Fixture {
        store: MemoryStore::new(),
        guard: Box::new(()),
    })
}

store_conformance!(memory_store, super::memory);

#[cfg(feature = "redis")]
#[path = "support/redis_server.rs"]
mod redis_server;

#[cfg(feature = "redis")]
mod redis_fixtures {
    use std::{
        sync::{Mutex, Weak},
        time::Duration,
    };

    use super::{Fixture, redis_server};
    #[cfg(feature = "redis-cluster")]
    use redis_server::RedisCluster;
    use redis_server::RedisServer;
    use tower_idempotency::{RedisStore, redis};

    static SINGLE: Mutex<Weak<RedisServer>> = Mutex::new(Weak::new());

    /// A long poll interval: waiters that wake promptly were woken by pub/sub.
    const NO_POLL: Duration = Duration::from_secs(600);

    pub(crate) async fn single() -> Option<Fixture<RedisStore>> {
        let server =
            tokio::task::spawn_blocking(|| redis_server::shared(&SINGLE, RedisServer::start))
                .await
                .expect("start redis-server")?;
        let store = RedisStore::connect(server.url())
            .await
            .expect("connect")
            .prefix(format!("conf:{}:", uuid::Uuid::new_v4()))
            .poll_interval(NO_POLL);
        Some(Fixture {
            store,
            guard: Box::new(server),
        })
    }

    /// The same store without pub/sub: waiters must still wake, by polling.
    pub(crate) async fn single_polling_only()
    -> Option<Fixture<RedisStore<redis::aio::MultiplexedConnection>>> {
        let server =
            tokio::task::spawn_blocking(|| redis_server::shared(&SINGLE, RedisServer::start))
                .await
                .expect("start redis-server")?;
        let client = redis::Client::open(server.url()).expect("client");
        let conn = client
            .get_multiplexed_async_connection()
            .await
            .expect("connect");
        let store = RedisStore::from_connection(conn).poll_interval(Duration::from_millis(50));
        Some(Fixture {
            store,
            guard: Box::new(server),
        })
    }

    #[cfg(feature = "redis-cluster")]
    static CLUSTER: Mutex<Weak<RedisCluster>> = Mutex::new(Weak::new());

    #[cfg(feature = "redis-cluster")]
    pub(crate) async fn cluster()
    -> Option<Fixture<RedisStore<redis::cluster_async::ClusterConnection>>> {
        let cluster =
            tokio::task::spawn_blocking(|| redis_server::shared(&CLUSTER, RedisCluster::start))
                .await
                .expect("start redis cluster")?;
        let store = RedisStore::connect_cluster(cluster.urls())
            .await
            .expect("connect to the cluster")
            .prefix(format!("conf:{}:", uuid::Uuid::new_v4()))
            .poll_interval(NO_POLL);
        Some(Fixture {
            store,
            guard: Box::new(cluster),
        })
    }
}

#[cfg(feature = "redis")]
store_conformance!(redis_single_node, super::redis_fixtures::single);

#[cfg(feature = "redis")]
store_conformance!(
    redis_polling_only,
    super::redis_fixtures::single_polling_only
);

#[cfg(feature = "redis-cluster")]
store_conformance!(redis_cluster, super::redis_fixtures::cluster);

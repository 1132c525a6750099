//! Pub/sub wake-ups for waiters: one subscriber connection per store, shared by every waiter
//! of the process, reconnected lazily after a loss.
//!
//! Pub/sub only makes waiters faster. It is at-most-once (a message published while the
//! subscriber connection is down is gone), so every waiter also polls.

use std::{
    fmt,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use dashmap::{DashMap, mapref::entry::Entry};
use futures_util::StreamExt;
use redis::aio::PubSubSink;
use tokio::{
    sync::{Mutex, Notify, oneshot},
    time::Instant,
};

/// Channel name → (notifier, number of waiters watching it).
type Watches = DashMap<String, (Arc<Notify>, usize)>;

/// How long a failed subscriber connection is left alone before the next attempt.
const RECONNECT_BACKOFF: Duration = Duration::from_millis(250);

pub(super) struct Notifier {
    client: Option<redis::Client>,
    connect_timeout: Duration,
    watches: Arc<Watches>,
    conn: Mutex<Conn>,
}

#[derive(Default)]
struct Conn {
    live: Option<Live>,
    last_failure: Option<Instant>,
}

struct Live {
    sink: PubSubSink,
    alive: Arc<AtomicBool>,
    /// Dropped with the notifier: stops the reader task, which closes the connection.
    _stop: oneshot::Sender<()>,
}

impl fmt::Debug for Notifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Notifier")
            .field("enabled", &self.client.is_some())
            .field("watched", &self.watches.len())
            .finish()
    }
}

/// A waiter's interest in one channel; unsubscribes when the last waiter of it goes.
pub(super) struct Watch {
    notify: Arc<Notify>,
    channel: String,
    watches: Arc<Watches>,
    sink: Option<PubSubSink>,
}

impl Watch {
    pub(super) fn notify(&self) -> &Notify {
        &self.notify
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let last = match self.watches.entry(std::mem::take(&mut self.channel)) {
            Entry::Occupied(mut o) => {
                o.get_mut().1 -= 1;
                if o.get().1 == 0 {
                    let (channel, _) = o.remove_entry();
                    Some(channel)
                } else {
                    None
                }
            }
            Entry::Vacant(_) => None,
        };
        // A waiter that subscribes again in between may lose its subscription: it polls.
        if let (Some(channel), Some(mut sink)) = (last, self.sink.take())
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            rt.spawn(async move {
                let _ =
                    tokio::time::timeout(Duration::from_secs(2), sink.unsubscribe(channel)).await;
            });
        }
    }
}

impl Notifier {
    pub(super) fn new(client: Option<redis::Client>, connect_timeout: Duration) -> Self {
        Notifier {
            client,
            connect_timeout,
            watches: Arc::default(),
            conn: Mutex::new(Conn::default()),
        }
    }

    pub(super) fn client(&self) -> Option<&redis::Client> {
        self.client.as_ref()
    }

    /// Registers interest in `channel` and subscribes to it, waiting for the server's
    /// confirmation (so a message published after this returns is delivered) until `deadline`
    /// or the connection timeout, whichever is sooner. Without pub/sub, or when subscribing
    /// fails or times out, the watch is never notified: callers poll.
    pub(super) async fn watch(&self, channel: &str, deadline: Instant) -> Watch {
        let notify = {
            let mut e = self
                .watches
                .entry(channel.to_owned())
                .or_insert_with(|| (Arc::new(Notify::new()), 0));
            e.1 += 1;
            e.0.clone()
        };
        let mut watch = Watch {
            notify,
            channel: channel.to_owned(),
            watches: self.watches.clone(),
            sink: None,
        };
        // Pub/sub only speeds a waiter up: every step of it is bounded by the connection
        // timeout, never by the waiter's own (much longer) deadline.
        let until = deadline.min(crate::policy::deadline(
            Instant::now(),
            self.connect_timeout,
        ));
        if let Some(mut sink) = self.sink(until).await {
            match tokio::time::timeout_at(until, sink.subscribe(channel)).await {
                Ok(Ok(())) => watch.sink = Some(sink),
                Ok(Err(_)) => {
                    tracing::debug!(channel, "idempotency pub/sub subscribe failed; polling");
                }
                Err(_) => {
                    // A connection that does not answer: the next waiter makes a new one.
                    tracing::debug!(channel, "idempotency pub/sub subscribe timed out; polling");
                    if let Ok(mut conn) = self.conn.try_lock() {
                        conn.live = None;
                        conn.last_failure = Some(Instant::now());
                    }
                }
            }
        }
        watch
    }

    /// The live subscriber connection, connecting when there is none (at most every
    /// [`RECONNECT_BACKOFF`]).
    async fn sink(&self, deadline: Instant) -> Option<PubSubSink> {
        let client = self.client.as_ref()?;
        let mut conn = tokio::time::timeout_at(deadline, self.conn.lock())
            .await
            .ok()?;
        if let Some(live) = &conn.live {
            if live.alive.load(Ordering::Acquire) {
                return Some(live.sink.clone());
            }
            conn.live = None;
        }
        if conn
            .last_failure
            .is_some_and(|t| t.elapsed() < RECONNECT_BACKOFF)
        {
            return None;
        }
        match tokio::time::timeout_at(deadline, client.get_async_pubsub()).await {
            Ok(Ok(pubsub)) => {
                let (sink, stream) = pubsub.split();
                let alive = Arc::new(AtomicBool::new(true));
                let (stop, stopped) = oneshot::channel();
                tokio::spawn(read_messages(
                    stream,
                    self.watches.clone(),
                    alive.clone(),
                    stopped,
                ));
                conn.live = Some(Live {
                    sink: sink.clone(),
                    alive,
                    _stop: stop,
                });
                conn.last_failure = None;
                Some(sink)
            }
            Ok(Err(error)) => {
                tracing::debug!(%error, "idempotency pub/sub connection failed; polling");
                conn.last_failure = Some(Instant::now());
                None
            }
            Err(_) => {
                conn.last_failure = Some(Instant::now());
                None
            }
        }
    }
}

async fn read_messages(
    mut stream: redis::aio::PubSubStream,
    watches: Arc<Watches>,
    alive: Arc<AtomicBool>,
    mut stop: oneshot::Receiver<()>,
) {
    loop {
        tokio::select! {
            _ = &mut stop => break,
            msg = stream.next() => {
                let Some(msg) = msg else { break };
                if let Some(w) = watches.get(msg.get_channel_name()) {
                    w.0.notify_waiters();
                }
            }
        }
    }
    alive.store(false, Ordering::Release);
}

//! The tee of a streaming response: the leader's task reads the inner body once and sends
//! every frame to the leader's client, to every duplicate that attached mid-stream, and into a
//! recording (bounded by the stored-response limit) that becomes the stored response.
//!
//! ```text
//!                        ┌──────────────► leader's client      (live frames)
//! inner body ──► task ───┼──────────────► duplicate A          (frames so far, then live)
//!  (read once)           ├──────────────► duplicate B …
//!                        └──► recording ─► store at end of stream (replayed later)
//! ```
//!
//! A subscriber attaches under the tee's lock: it receives a copy of the frames recorded so
//! far, and its channel is added to the live list before the next frame is recorded, so it
//! sees every frame exactly once, in order.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, StatusCode};
use http_body::Frame;
use tokio::sync::mpsc;

use crate::{BoxError, record::StoredHeaders};

/// Frames relayed to one client.
pub(crate) type FrameSender = mpsc::Sender<Result<Frame<Bytes>, BoxError>>;
pub(crate) type FrameReceiver = mpsc::Receiver<Result<Frame<Bytes>, BoxError>>;

/// Frames buffered per client between the task and that client's connection.
pub(crate) const CHANNEL: usize = 32;

/// A streaming response being relayed.
pub(crate) struct Tee {
    /// Status and replayable headers, for duplicates that attach.
    pub(crate) status: StatusCode,
    pub(crate) headers: StoredHeaders,
    limit: usize,
    state: Mutex<State>,
}

struct State {
    /// Every frame so far while the recording is within the limit.
    frames: Vec<Frame<Bytes>>,
    len: usize,
    /// The recording passed the limit and was dropped: late duplicates cannot attach.
    overflow: bool,
    /// Subscribers that attached since the relay last looked.
    joining: Vec<FrameSender>,
    /// How the stream ended, once it did.
    end: Option<End>,
}

#[derive(Clone)]
enum End {
    Complete,
    Failed(String),
}

/// What a duplicate gets when it attaches.
pub(crate) struct Attached {
    pub(crate) prefix: VecDeque<Frame<Bytes>>,
    /// Live frames; `None` when the stream had already ended (the prefix is everything).
    pub(crate) live: Option<FrameReceiver>,
    /// The stream's error, when it had already ended in one.
    pub(crate) error: Option<BoxError>,
}

fn copy(frame: &Frame<Bytes>) -> Frame<Bytes> {
    match (frame.data_ref(), frame.trailers_ref()) {
        (Some(d), _) => Frame::data(d.clone()),
        (None, Some(t)) => Frame::trailers(t.clone()),
        // http-body frames are data or trailers; anything else carries nothing to replay.
        (None, None) => Frame::data(Bytes::new()),
    }
}

impl Tee {
    pub(crate) fn new(status: StatusCode, headers: StoredHeaders, limit: usize) -> Arc<Self> {
        Arc::new(Tee {
            status,
            headers,
            limit,
            state: Mutex::new(State {
                frames: Vec::new(),
                len: 0,
                overflow: false,
                joining: Vec::new(),
                end: None,
            }),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Attaches a duplicate: the frames so far, then the live ones. `None` once the recording
    /// overflowed (the start of the stream is gone).
    pub(crate) fn attach(&self) -> Option<Attached> {
        let mut state = self.state();
        if state.overflow {
            return None;
        }
        let prefix = state.frames.iter().map(copy).collect();
        match state.end.clone() {
            Some(End::Complete) => Some(Attached {
                prefix,
                live: None,
                error: None,
            }),
            Some(End::Failed(e)) => Some(Attached {
                prefix,
                live: None,
                error: Some(e.into()),
            }),
            None => {
                let (tx, rx) = mpsc::channel(CHANNEL);
                state.joining.push(tx);
                Some(Attached {
                    prefix,
                    live: Some(rx),
                    error: None,
                })
            }
        }
    }
}

/// The task's side of a tee: sends each frame to every subscriber and records it.
pub(crate) struct Relay {
    tee: Arc<Tee>,
    subscribers: Vec<FrameSender>,
}

impl Relay {
    /// Starts relaying to `first` (the leader's client).
    pub(crate) fn new(tee: Arc<Tee>, first: FrameSender) -> Self {
        Relay {
            tee,
            subscribers: vec![first],
        }
    }

    /// Records `frame` and sends it to every subscriber, waiting for slow ones (backpressure
    /// reaches the inner body). Clients that went away are dropped; the relay goes on.
    pub(crate) async fn frame(&mut self, frame: Frame<Bytes>) {
        {
            let mut state = self.tee.state();
            if !state.overflow {
                state.len += frame.data_ref().map_or(0, Bytes::len);
                if state.len > self.tee.limit {
                    state.overflow = true;
                    state.frames = Vec::new();
                } else {
                    state.frames.push(copy(&frame));
                }
            }
            self.subscribers.append(&mut state.joining);
        }
        let mut gone = Vec::new();
        for (i, s) in self.subscribers.iter().enumerate() {
            if s.send(Ok(copy(&frame))).await.is_err() {
                gone.push(i);
            }
        }
        for i in gone.into_iter().rev() {
            self.subscribers.swap_remove(i);
        }
    }

    /// Ends the stream: subscribers see the end (or `error`). Returns the recorded body and
    /// trailers when the stream completed within the limit.
    pub(crate) async fn finish(
        mut self,
        error: Option<BoxError>,
    ) -> Option<(Bytes, Option<HeaderMap>)> {
        let (recorded, message) = {
            let mut state = self.tee.state();
            self.subscribers.append(&mut state.joining);
            let message = error.as_ref().map(|e| e.to_string());
            state.end = Some(match &message {
                Some(m) => End::Failed(m.clone()),
                None => End::Complete,
            });
            // The frames stay: a duplicate may still attach until the outcome is published.
            let recorded = (!state.overflow && message.is_none()).then(|| {
                let mut trailers = None;
                let mut body = BytesMut::with_capacity(state.len);
                for f in &state.frames {
                    if let Some(d) = f.data_ref() {
                        body.extend_from_slice(d);
                    } else if let Some(t) = f.trailers_ref() {
                        trailers = Some(t.clone());
                    }
                }
                (body.freeze(), trailers)
            });
            (recorded, message)
        };
        if let Some(m) = message {
            for s in &self.subscribers {
                let _ = s.send(Err(m.clone().into())).await;
            }
        }
        // Dropping the senders ends every subscriber's body.
        self.subscribers.clear();
        recorded
    }
}

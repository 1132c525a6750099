//! Request and response bodies of the idempotency service.

use std::{
    collections::VecDeque,
    fmt,
    pin::Pin,
    task::{Context, Poll, ready},
};

use crate::{BoxError, tee::FrameReceiver};
use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

/// A buffered request body: its chunks in order, and trailers. The common single-chunk body
/// without trailers needs no allocation, and the whole thing is 40 bytes, so requests that
/// pass through (whose body type is `RequestBody` too) stay small.
#[derive(Debug, Default)]
pub(crate) struct Chunks {
    first: Option<Bytes>,
    rest: Option<Box<Rest>>,
}

#[derive(Debug, Default)]
struct Rest {
    chunks: VecDeque<Bytes>,
    trailers: Option<HeaderMap>,
}

impl Chunks {
    pub(crate) fn push(&mut self, chunk: Bytes) {
        if self.first.is_none() && self.rest.is_none() {
            self.first = Some(chunk);
        } else {
            self.rest
                .get_or_insert_with(Default::default)
                .chunks
                .push_back(chunk);
        }
    }

    pub(crate) fn set_trailers(&mut self, trailers: HeaderMap) {
        self.rest.get_or_insert_with(Default::default).trailers = Some(trailers);
    }

    fn next(&mut self) -> Option<Frame<Bytes>> {
        if let Some(first) = self.first.take() {
            return Some(Frame::data(first));
        }
        let rest = self.rest.as_mut()?;
        match rest.chunks.pop_front() {
            Some(c) => Some(Frame::data(c)),
            None => rest.trailers.take().map(Frame::trailers),
        }
    }

    fn len(&self) -> u64 {
        let first = self.first.as_ref().map_or(0, Bytes::len);
        let rest = self
            .rest
            .as_ref()
            .map_or(0, |r| r.chunks.iter().map(Bytes::len).sum());
        (first + rest) as u64
    }

    fn is_end(&self) -> bool {
        self.first.is_none()
            && self
                .rest
                .as_ref()
                .is_none_or(|r| r.chunks.is_empty() && r.trailers.is_none())
    }
}

pin_project! {
    /// The request body the inner service sees: the original body when the layer did not
    /// buffer it (uncovered methods, unprotected requests), else the buffered chunks, unchanged
    /// and uncopied.
    pub struct RequestBody<B> {
        #[pin]
        kind: RequestKind<B>,
    }
}

pin_project! {
    #[project = RequestKindProj]
    enum RequestKind<B> {
        Inner { #[pin] body: B },
        Buffered { chunks: Chunks },
    }
}

impl<B> RequestBody<B> {
    #[inline]
    pub(crate) fn inner(body: B) -> Self {
        RequestBody {
            kind: RequestKind::Inner { body },
        }
    }

    pub(crate) fn buffered(chunks: Chunks) -> Self {
        RequestBody {
            kind: RequestKind::Buffered { chunks },
        }
    }
}

impl<B: Body<Data = Bytes>> Body for RequestBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.project().kind.project() {
            RequestKindProj::Inner { body } => body.poll_frame(cx),
            RequestKindProj::Buffered { chunks } => Poll::Ready(chunks.next().map(Ok)),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            RequestKind::Inner { body } => body.is_end_stream(),
            RequestKind::Buffered { chunks } => chunks.is_end(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            RequestKind::Inner { body } => body.size_hint(),
            RequestKind::Buffered { chunks } => SizeHint::with_exact(chunks.len()),
        }
    }
}

impl<B> fmt::Debug for RequestBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            RequestKind::Inner { .. } => f.write_str("RequestBody::Inner"),
            RequestKind::Buffered { chunks } => {
                write!(f, "RequestBody::Buffered({} bytes)", chunks.len())
            }
        }
    }
}

/// Frames relayed from the task running the inner service.
struct Relayed {
    prefix: VecDeque<Frame<Bytes>>,
    rx: Option<FrameReceiver>,
    error: Option<BoxError>,
}

pin_project! {
    /// The response body of the idempotency service: the inner body untouched (pass-through),
    /// a whole body (first execution that fit the stored-response limit, replay, problem), or
    /// frames relayed from the task that runs the inner service (streams, large bodies).
    pub struct ResponseBody<B> {
        #[pin]
        kind: ResponseKind<B>,
    }
}

pin_project! {
    #[project = ResponseKindProj]
    enum ResponseKind<B> {
        Inner { #[pin] body: B },
        Full { data: Option<Bytes>, trailers: Option<Box<HeaderMap>> },
        // Boxed: streams are rare, and pass-through responses should stay small.
        Channel { relay: Box<Relayed> },
    }
}

impl<B> ResponseBody<B> {
    #[inline]
    pub(crate) fn inner(body: B) -> Self {
        ResponseBody {
            kind: ResponseKind::Inner { body },
        }
    }

    pub(crate) fn full(data: Bytes, trailers: Option<HeaderMap>) -> Self {
        ResponseBody {
            kind: ResponseKind::Full {
                data: (!data.is_empty()).then_some(data),
                trailers: trailers.map(Box::new),
            },
        }
    }

    /// Frames relayed by the task running the inner service: `prefix` first (frames recorded
    /// before this client attached), then the live ones, then `error` if the stream failed
    /// before this client attached.
    pub(crate) fn channel(
        prefix: VecDeque<Frame<Bytes>>,
        rx: Option<FrameReceiver>,
        error: Option<BoxError>,
    ) -> Self {
        ResponseBody {
            kind: ResponseKind::Channel {
                relay: Box::new(Relayed { prefix, rx, error }),
            },
        }
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project().kind.project() {
            ResponseKindProj::Inner { body } => body.poll_frame(cx).map_err(Into::into),
            ResponseKindProj::Full { data, trailers } => Poll::Ready(
                data.take()
                    .map(|d| Ok(Frame::data(d)))
                    .or_else(|| trailers.take().map(|t| Ok(Frame::trailers(*t)))),
            ),
            ResponseKindProj::Channel { relay } => {
                let Relayed { prefix, rx, error } = &mut **relay;
                if let Some(frame) = prefix.pop_front() {
                    return Poll::Ready(Some(Ok(frame)));
                }
                if let Some(live) = rx {
                    match ready!(live.poll_recv(cx)) {
                        Some(item) => return Poll::Ready(Some(item)),
                        None => *rx = None,
                    }
                }
                Poll::Ready(error.take().map(Err))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            ResponseKind::Inner { body } => body.is_end_stream(),
            ResponseKind::Full { data, trailers } => data.is_none() && trailers.is_none(),
            ResponseKind::Channel { relay } => {
                relay.prefix.is_empty() && relay.rx.is_none() && relay.error.is_none()
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            ResponseKind::Inner { body } => body.size_hint(),
            ResponseKind::Full { data, trailers } => {
                let len = data.as_ref().map_or(0, |d| d.len() as u64);
                if trailers.is_some() {
                    // Not exact: an HTTP/1 server would answer with `Content-Length`, which
                    // cannot carry trailers, and drop them.
                    let mut hint = SizeHint::new();
                    hint.set_lower(len);
                    hint
                } else {
                    SizeHint::with_exact(len)
                }
            }
            ResponseKind::Channel { .. } => SizeHint::default(),
        }
    }
}

impl<B> fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            ResponseKind::Inner { .. } => f.write_str("ResponseBody::Inner"),
            ResponseKind::Full { data, .. } => write!(
                f,
                "ResponseBody::Full({} bytes)",
                data.as_ref().map_or(0, |d| d.len())
            ),
            ResponseKind::Channel { .. } => f.write_str("ResponseBody::Stream"),
        }
    }
}

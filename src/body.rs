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

/// Buffered body chunks, in order. The common single-chunk body needs no allocation.
#[derive(Debug, Default)]
pub(crate) struct Chunks {
    first: Option<Bytes>,
    rest: VecDeque<Bytes>,
}

impl Chunks {
    pub(crate) fn push(&mut self, chunk: Bytes) {
        if self.first.is_none() && self.rest.is_empty() {
            self.first = Some(chunk);
        } else {
            self.rest.push_back(chunk);
        }
    }

    fn pop(&mut self) -> Option<Bytes> {
        self.first.take().or_else(|| self.rest.pop_front())
    }

    fn len(&self) -> u64 {
        let first = self.first.as_ref().map_or(0, Bytes::len);
        (first + self.rest.iter().map(Bytes::len).sum::<usize>()) as u64
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
        Buffered { chunks: Chunks, trailers: Option<Box<HeaderMap>>, remaining: u64 },
    }
}

impl<B> RequestBody<B> {
    #[inline]
    pub(crate) fn inner(body: B) -> Self {
        RequestBody {
            kind: RequestKind::Inner { body },
        }
    }

    pub(crate) fn buffered(chunks: Chunks, trailers: Option<HeaderMap>) -> Self {
        let remaining = chunks.len();
        RequestBody {
            kind: RequestKind::Buffered {
                chunks,
                trailers: trailers.map(Box::new),
                remaining,
            },
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
            RequestKindProj::Buffered {
                chunks,
                trailers,
                remaining,
            } => Poll::Ready(match chunks.pop() {
                Some(c) => {
                    *remaining -= c.len() as u64;
                    Some(Ok(Frame::data(c)))
                }
                None => trailers.take().map(|t| Ok(Frame::trailers(*t))),
            }),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            RequestKind::Inner { body } => body.is_end_stream(),
            RequestKind::Buffered {
                chunks, trailers, ..
            } => chunks.len() == 0 && trailers.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            RequestKind::Inner { body } => body.size_hint(),
            RequestKind::Buffered { remaining, .. } => SizeHint::with_exact(*remaining),
        }
    }
}

impl<B> fmt::Debug for RequestBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            RequestKind::Inner { .. } => f.write_str("RequestBody::Inner"),
            RequestKind::Buffered { remaining, .. } => {
                write!(f, "RequestBody::Buffered({remaining} bytes)")
            }
        }
    }
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
        Channel {
            prefix: VecDeque<Frame<Bytes>>,
            rx: Option<FrameReceiver>,
            error: Option<BoxError>,
        },
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
            kind: ResponseKind::Channel { prefix, rx, error },
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
            ResponseKindProj::Channel { prefix, rx, error } => {
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
            ResponseKind::Channel { prefix, rx, error } => {
                prefix.is_empty() && rx.is_none() && error.is_none()
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            ResponseKind::Inner { body } => body.size_hint(),
            ResponseKind::Full { data, .. } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
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

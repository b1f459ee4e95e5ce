//! The one loop behind every live WebSocket (`ws_doc` and `repo::socket`).
//!
//! Both sockets need the same things around their own behaviour: a ping every `--ping-secs`
//! and closing a peer that went silent (4008), the per-socket message rate (1008), closing on
//! an oversize or malformed frame (1009), replies to pipelined uploads in the order the uploads
//! came, and at shutdown finishing accepted work before saying goodbye (1001). They differ only
//! in what a frame means and what the server side pushes; a [`Session`] supplies that and
//! nothing else.
//!
//! A session never touches the socket: it puts what it wants sent into the [`Outbox`], and the
//! loop writes it in one place (`flush`). That is where a bounded outbound queue or pings while
//! a send is blocked would go. The loop is generic over the sink and the stream, so its tests
//! run over channels on paused time (`tests.rs`).

use std::collections::VecDeque;
use std::fmt::Display;
use std::future::Future;
use std::pin::pin;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes};
use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesOrdered;
use futures_util::{FutureExt, Sink, SinkExt, Stream, StreamExt};
use tokio_util::sync::CancellationToken;

use super::caller::expiry;
use super::close::{
    CLOSE_FELL_BEHIND, CLOSE_GOING_AWAY, CLOSE_RATE_LIMIT, CLOSE_TOKEN_EXPIRED, CLOSE_TOO_BIG,
};
use super::keepalive::Keepalive;
use crate::limits::RateLimit;
use crate::state::AppState;

#[cfg(test)]
mod tests;

/// Pipelined replies one socket may have in flight; past it the loop stops reading frames
/// until the oldest is answered. Enough for one busy client to batch well in the document owner.
pub const MAX_IN_FLIGHT: usize = 32;
/// How long the final close frame may take: a dead peer must not hold the task.
const CLOSE_SEND_LIMIT: Duration = Duration::from_secs(1);

/// What the loop needs besides the socket.
#[derive(Debug, Clone)]
pub struct Settings {
    pub ping_interval: Duration,
    pub max_messages_per_sec: u32,
    /// Cancelled at shutdown.
    pub shutdown: CancellationToken,
    /// When the caller's token expires: the socket closes then (4401).
    pub expires_at: Option<tokio::time::Instant>,
}

impl Settings {
    pub fn new(state: &AppState) -> Self {
        Self {
            ping_interval: state.limits.ping_interval,
            max_messages_per_sec: state.limits.max_messages_per_sec,
            shutdown: state.shutdown.clone(),
            expires_at: None,
        }
    }
}

/// A data frame from the peer (pings, pongs and closes are the loop's).
#[derive(Debug)]
pub enum Frame {
    Binary(Bytes),
    /// A text frame; neither socket takes text, so its content is not kept.
    Text,
}

/// One kind of live socket's own behaviour.
pub trait Session: Send {
    /// What the server side pushes to this socket.
    type Event: Send;

    /// Runs before the first frame is read: greet the peer, or refuse it by closing.
    fn open(&mut self, _out: &mut Outbox) -> impl Future<Output = ()> + Send {
        async {}
    }

    /// The next event from the server side; `None` once there will be none. Must be
    /// cancel-safe: the loop drops it whenever a frame, a reply or a tick comes first.
    fn next_event(&mut self) -> impl Future<Output = Option<Self::Event>> + Send;

    /// Handles one event from the server side.
    fn on_event(&mut self, event: Self::Event, out: &mut Outbox);

    /// Handles one data frame from the peer (within its message rate).
    fn on_frame(&mut self, frame: Frame, out: &mut Outbox) -> impl Future<Output = ()> + Send;

    /// Waits for accepted work that is not a pipelined reply; runs (after the replies) when the
    /// server shuts down and when the peer closed. Bound it: shutdown waits for it.
    fn drain(&mut self) -> impl Future<Output = ()> + Send {
        async {}
    }

    /// Runs once when the socket has ended, however it ended.
    fn finish(&mut self) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// What a session wants sent. The loop sends it after each callback, in this order: the
/// messages, then the close (which ends the socket; pipelined replies still running are
/// dropped with it).
pub struct Outbox {
    now: VecDeque<Message>,
    replies: FuturesOrdered<BoxFuture<'static, Message>>,
    close: Option<CloseFrame>,
}

impl Outbox {
    fn new() -> Self {
        Self {
            now: VecDeque::new(),
            replies: FuturesOrdered::new(),
            close: None,
        }
    }

    /// Sends `msg` now (before pipelined replies that are still running).
    pub fn send(&mut self, msg: Message) {
        self.now.push_back(msg);
    }

    /// Sends what `reply` resolves to, after the replies queued before it.
    pub fn reply_later(&mut self, reply: impl Future<Output = Message> + Send + 'static) {
        self.replies.push_back(reply.boxed());
    }

    /// Closes the socket after the messages sent so far; the first close asked for wins.
    pub fn close(&mut self, code: u16, reason: impl Into<Utf8Bytes>) {
        if self.close.is_none() {
            self.close = Some(CloseFrame {
                code,
                reason: reason.into(),
            });
        }
    }

    /// Pipelined replies still running.
    pub fn in_flight(&self) -> usize {
        self.replies.len()
    }
}

/// Why a socket ended badly (a clean close, by either side, is `Ok`).
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("sending to the peer failed: {0}")]
    Send(String),
    #[error("bad frame from the peer: {0}")]
    Receive(String),
}

/// Whether the socket is still open after a flush.
#[derive(Debug, PartialEq, Eq)]
enum Flow {
    Open,
    Closed,
}

/// What woke the loop.
enum Wake<E, V> {
    Frame(Option<Result<Message, E>>),
    Reply(Message),
    Event(Option<V>),
    Ping,
    Shutdown,
    Expired,
}

/// Runs `session` on a socket until either side closes it, then calls [`Session::finish`].
pub async fn run<Si, St, E, S>(
    sink: Si,
    stream: St,
    session: &mut S,
    settings: Settings,
) -> Result<(), SocketError>
where
    Si: Sink<Message>,
    Si::Error: Display,
    St: Stream<Item = Result<Message, E>>,
    E: Display,
    S: Session,
{
    let result: Result<(), SocketError> = async {
        let mut sink = pin!(sink);
        let mut stream = pin!(stream);
        let mut out = Outbox::new();
        session.open(&mut out).await;
        if flush(&mut sink, &mut out).await? == Flow::Closed {
            return Ok(());
        }
        let mut keepalive = Keepalive::new(settings.ping_interval);
        let mut ping = keepalive.timer();
        let mut rate = RateLimit::per_second(settings.max_messages_per_sec);
        let mut events = true;
        loop {
            let wake = tokio::select! {
                frame = stream.next(), if out.in_flight() < MAX_IN_FLIGHT => Wake::Frame(frame),
                Some(reply) = out.replies.next(), if out.in_flight() > 0 => Wake::Reply(reply),
                event = session.next_event(), if events => Wake::Event(event),
                _ = ping.tick() => Wake::Ping,
                _ = settings.shutdown.cancelled() => Wake::Shutdown,
                _ = expiry(settings.expires_at) => Wake::Expired,
            };
            match wake {
                Wake::Frame(frame) => {
                    keepalive.seen();
                    let frame = match frame {
                        Some(Ok(Message::Binary(bytes))) => Frame::Binary(bytes),
                        Some(Ok(Message::Text(_))) => Frame::Text,
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                        Some(Ok(Message::Close(_))) | None => {
                            // The peer left: what it sent still completes, unanswered.
                            while out.replies.next().await.is_some() {}
                            session.drain().await;
                            return Ok(());
                        }
                        Some(Err(e)) => {
                            tracing::info!(error = %e, "closing a socket over a bad frame");
                            crate::metrics::rejected("message_too_big");
                            out.close(CLOSE_TOO_BIG, "message too big or malformed");
                            flush(&mut sink, &mut out).await?;
                            return Err(SocketError::Receive(e.to_string()));
                        }
                    };
                    if rate.allow() {
                        session.on_frame(frame, &mut out).await;
                    } else {
                        tracing::warn!("closing a socket over its message rate");
                        crate::metrics::rejected("rate_limited");
                        out.close(CLOSE_RATE_LIMIT, "message rate limit exceeded");
                    }
                }
                Wake::Reply(reply) => out.send(reply),
                Wake::Event(Some(event)) => session.on_event(event, &mut out),
                Wake::Event(None) => events = false,
                Wake::Ping if keepalive.expired() => {
                    tracing::debug!("closing a socket that stopped answering pings");
                    out.close(CLOSE_FELL_BEHIND, "no answer to pings; reconnect to resync");
                }
                Wake::Ping => out.send(Message::Ping(Bytes::new())),
                Wake::Shutdown => {
                    // Finish what was accepted, answer it, then say goodbye.
                    while let Some(reply) = out.replies.next().await {
                        out.send(reply);
                        flush(&mut sink, &mut out).await?;
                    }
                    session.drain().await;
                    out.close(CLOSE_GOING_AWAY, "server shutting down");
                }
                Wake::Expired => {
                    // Answer what was accepted before the token ran out, then close.
                    tracing::debug!("closing a socket whose token expired");
                    crate::auth::Refusal::Expired.count();
                    while let Some(reply) = out.replies.next().await {
                        out.send(reply);
                        flush(&mut sink, &mut out).await?;
                    }
                    out.close(
                        CLOSE_TOKEN_EXPIRED,
                        "token expired; reconnect with a fresh one",
                    );
                }
            }
            if flush(&mut sink, &mut out).await? == Flow::Closed {
                return Ok(());
            }
        }
    }
    .await;
    session.finish().await;
    result
}

/// The one place that writes to the socket: the outbox's messages in order, then its close.
async fn flush<Si>(sink: &mut std::pin::Pin<&mut Si>, out: &mut Outbox) -> Result<Flow, SocketError>
where
    Si: Sink<Message>,
    Si::Error: Display,
{
    while let Some(msg) = out.now.pop_front() {
        sink.send(msg)
            .await
            .map_err(|e| SocketError::Send(e.to_string()))?;
    }
    let Some(frame) = out.close.take() else {
        return Ok(Flow::Open);
    };
    let closing = sink.send(Message::Close(Some(frame)));
    // Best effort: the socket ends either way.
    let _ = tokio::time::timeout(CLOSE_SEND_LIMIT, closing).await;
    Ok(Flow::Closed)
}

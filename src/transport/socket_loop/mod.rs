//! The one loop behind every live WebSocket (`ws_doc` and `repo::socket`).
//!
//! Both sockets need the same things around their own behaviour: a ping every `--ping-secs`
//! and closing a peer that went silent (4008), the per-socket message rate (1008), closing on
//! an oversize (1009) or malformed (1002) frame, replies to pipelined uploads in the order the
//! uploads came, a peer that cannot keep up (4008), and at shutdown finishing accepted work
//! before saying goodbye (1001). They differ only in what a frame means and what the server
//! side pushes; a [`Session`] supplies that and nothing else.
//!
//! A session never touches the socket: it puts what it wants sent into the [`Outbox`], and the
//! loop hands it to the `Writer` (`writer.rs`), the one place that writes. The loop never awaits a
//! send: the writer is polled alongside the frames, replies, events and timers, so pings go out
//! and silence is noticed while a send is blocked, and a send that takes longer than
//! `--send-timeout-secs` closes the socket. The session is asked for more only when nothing
//! waits behind the message being written: what the peer has not taken stays in the session's
//! own bounded queue (a repo peer's byte budget, a subscriber's batches), which overflows there.
//!
//! Every close but a dead peer's is orderly: the replies in flight are answered first (every
//! stored upload is acknowledged before the close), the close frame is written, and the loop
//! keeps reading, discarding what comes, until the peer answers the close or a short linger
//! ends. Dropping a socket whose peer is still sending makes the kernel reset the connection,
//! and a reset can destroy the close frame before the client reads it (a client then sees 1006
//! instead of 1008 or 1009).
//!
//! The loop is generic over the sink and the stream, so its tests run over channels on paused
//! time (`tests.rs`).

use std::collections::VecDeque;
use std::error::Error;
use std::fmt::Display;
use std::future::{poll_fn, Future};
use std::pin::pin;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes};
use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesOrdered;
use futures_util::{FutureExt, Sink, Stream, StreamExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use self::broken::{classify, Broken};
use self::writer::{Hold, Writer, Wrote};
use super::caller::expiry;
use super::close::{
    CLOSE_FELL_BEHIND, CLOSE_GOING_AWAY, CLOSE_MALFORMED, CLOSE_RATE_LIMIT, CLOSE_TOKEN_EXPIRED,
    CLOSE_TOO_BIG,
};
use super::keepalive::Keepalive;
use crate::limits::RateLimit;
use crate::state::AppState;

mod broken;
#[cfg(test)]
mod tests;
mod writer;

/// Pipelined replies one socket may have in flight; past it the loop stops reading frames
/// until the oldest is answered. Enough for one busy client to batch well in the document owner.
pub const MAX_IN_FLIGHT: usize = 32;
/// How long a close frame may take once the peer is known to be behind or gone.
const CLOSE_SEND_LIMIT: Duration = Duration::from_secs(1);
/// How long, once the close frame is written, the loop waits for the peer's answer (reading
/// and discarding what it still sends) before dropping the connection.
const CLOSE_LINGER: Duration = Duration::from_secs(2);

/// What the loop needs besides the socket.
#[derive(Debug, Clone)]
pub struct Settings {
    pub ping_interval: Duration,
    pub max_messages_per_sec: u32,
    /// How long writing one message may take (`--send-timeout-secs`).
    pub send_timeout: Duration,
    /// Bytes that may wait behind the message being written (`--max-peer-queue`); past it the
    /// peer has fallen behind (4008).
    pub max_queue: usize,
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
            send_timeout: state.limits.send_timeout,
            max_queue: state.limits.max_peer_queue,
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
    ///
    /// `room` is false while a message still waits to be written: then return only an event
    /// that closes the socket (and leave the rest in the session's own bounded queue).
    fn next_event(&mut self, room: bool) -> impl Future<Output = Option<Self::Event>> + Send;

    /// Handles one event from the server side.
    fn on_event(&mut self, event: Self::Event, out: &mut Outbox);

    /// Handles one data frame from the peer (within its message rate).
    fn on_frame(&mut self, frame: Frame, out: &mut Outbox) -> impl Future<Output = ()> + Send;

    /// Waits for accepted work that is not a pipelined reply; runs once, after the replies:
    /// before the close frame at shutdown, else when the socket has ended. Bound it: shutdown
    /// waits for it.
    fn drain(&mut self) -> impl Future<Output = ()> + Send {
        async {}
    }

    /// Runs once when the socket has ended, however it ended.
    fn finish(&mut self) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// How a session asked to close.
struct CloseRequest {
    frame: CloseFrame,
    /// Without sending what still waits.
    now: bool,
}

/// What a session wants sent. The loop takes it after each callback: the messages go to the
/// writer in order; a close first lets the replies in flight finish and be sent.
pub struct Outbox {
    now: VecDeque<(Message, Option<Hold>)>,
    replies: FuturesOrdered<BoxFuture<'static, Message>>,
    close: Option<CloseRequest>,
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
        self.now.push_back((msg, None));
    }

    /// Sends `msg` and keeps `hold` until it is written (or the socket ends): a budget charge
    /// then counts the message for as long as it waits.
    pub fn send_holding(&mut self, msg: Message, hold: impl Send + 'static) {
        self.now.push_back((msg, Some(Box::new(hold))));
    }

    /// Sends what `reply` resolves to, after the replies queued before it.
    pub fn reply_later(&mut self, reply: impl Future<Output = Message> + Send + 'static) {
        self.replies.push_back(reply.boxed());
    }

    /// Closes the socket after the messages sent so far and the replies still running; the
    /// first close asked for wins.
    pub fn close(&mut self, code: u16, reason: impl Into<Utf8Bytes>) {
        self.request_close(code, reason, false);
    }

    /// Closes the socket without sending what still waits (the peer is too far behind for it
    /// to matter); replies still running finish unanswered.
    pub fn close_now(&mut self, code: u16, reason: impl Into<Utf8Bytes>) {
        self.request_close(code, reason, true);
    }

    fn request_close(&mut self, code: u16, reason: impl Into<Utf8Bytes>, now: bool) {
        if self.close.is_none() {
            self.close = Some(CloseRequest {
                frame: CloseFrame {
                    code,
                    reason: reason.into(),
                },
                now,
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
    #[error("the peer vanished without a close frame: {0}")]
    Lost(String),
}

/// Where the socket is in its life.
enum Phase {
    /// Serving the session.
    Open,
    /// Closing: the replies in flight finish and are sent (and, at shutdown, the session is
    /// drained) before `frame` is queued. Frames are read only to be discarded.
    Finishing { frame: CloseFrame, drain: bool },
    /// The close frame is queued; `until` bounds it when the peer is behind or gone.
    Closing { until: Option<Instant> },
    /// Our close frame is written, or the peer's came: read until the peer is done, or `until`.
    Lingering { until: Instant },
    /// Nothing more to read or write.
    Ended,
}

impl Phase {
    fn deadline(&self) -> Option<Instant> {
        match self {
            Phase::Closing { until } => *until,
            Phase::Lingering { until } => Some(*until),
            _ => None,
        }
    }

    fn serving(&self) -> bool {
        matches!(self, Phase::Open | Phase::Finishing { .. })
    }
}

/// What woke the loop.
enum Wake<E, V> {
    Frame(Option<Result<Message, E>>),
    Reply(Message),
    Event(Option<V>),
    Wrote(Result<Wrote, SocketError>),
    Ping,
    Shutdown,
    Expired,
    Deadline,
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
    E: Error + 'static,
    S: Session,
{
    let mut sink = pin!(sink);
    let stream = pin!(stream);
    let writer = Writer::new(sink.as_mut(), settings.send_timeout);
    let mut socket = Socket {
        writer,
        stream,
        reading: true,
        out: Outbox::new(),
        phase: Phase::Open,
        drained: false,
        result: Ok(()),
    };
    socket.serve(session, &settings).await;
    // Uploads the peer can no longer hear about still complete, unanswered.
    while socket.out.replies.next().await.is_some() {}
    if !socket.drained {
        session.drain().await;
    }
    session.finish().await;
    socket.result
}

/// One socket's loop state.
struct Socket<'a, Si, St> {
    writer: Writer<'a, Si>,
    stream: std::pin::Pin<&'a mut St>,
    /// The stream may still yield frames.
    reading: bool,
    out: Outbox,
    phase: Phase,
    drained: bool,
    result: Result<(), SocketError>,
}

impl<Si, St, E> Socket<'_, Si, St>
where
    Si: Sink<Message>,
    Si::Error: Display,
    St: Stream<Item = Result<Message, E>>,
    E: Error + 'static,
{
    async fn serve<S: Session>(&mut self, session: &mut S, settings: &Settings) {
        session.open(&mut self.out).await;
        let mut keepalive = Keepalive::new(settings.ping_interval);
        let mut ping = keepalive.timer();
        let mut rate = RateLimit::per_second(settings.max_messages_per_sec);
        let mut events = true;
        loop {
            self.take_outbox();
            if let Phase::Finishing { frame, drain } = &self.phase {
                if self.out.in_flight() == 0 {
                    if *drain {
                        session.drain().await;
                        self.drained = true;
                    }
                    self.writer.close(frame.clone());
                    self.phase = Phase::Closing { until: None };
                }
            }
            if matches!(self.phase, Phase::Open) && self.writer.backlog() > settings.max_queue {
                tracing::info!("closing a socket whose outbound queue overflowed");
                crate::metrics::rejected("fell_behind");
                self.close_now(CLOSE_FELL_BEHIND, "fell behind; reconnect to resync");
            }
            if matches!(self.phase, Phase::Ended) {
                return;
            }
            let open = matches!(self.phase, Phase::Open);
            let read = self.reading
                && match self.phase {
                    Phase::Open => self.out.in_flight() < MAX_IN_FLIGHT,
                    Phase::Ended => false,
                    _ => true,
                };
            let room = self.writer.has_room();
            let busy = self.writer.busy();
            let serving = self.phase.serving();
            let deadline = self.phase.deadline();
            let writer = &mut self.writer;
            let wake = tokio::select! {
                frame = self.stream.next(), if read => Wake::Frame(frame),
                Some(reply) = self.out.replies.next(), if self.out.in_flight() > 0 => {
                    Wake::Reply(reply)
                }
                event = session.next_event(room), if events && open => Wake::Event(event),
                wrote = poll_fn(|cx| writer.poll_write(cx)), if busy => Wake::Wrote(wrote),
                _ = ping.tick(), if serving => Wake::Ping,
                _ = settings.shutdown.cancelled(), if open => Wake::Shutdown,
                _ = expiry(settings.expires_at), if open => Wake::Expired,
                _ = expiry(deadline), if deadline.is_some() => Wake::Deadline,
                // Nothing left to wait for (not expected): the socket is done.
                else => Wake::Deadline,
            };
            match wake {
                Wake::Frame(Some(Ok(msg))) => {
                    keepalive.seen();
                    let frame = match msg {
                        Message::Binary(bytes) => Frame::Binary(bytes),
                        Message::Text(_) => Frame::Text,
                        Message::Ping(_) | Message::Pong(_) => continue,
                        Message::Close(_) => {
                            self.peer_closed();
                            continue;
                        }
                    };
                    if !open {
                        // Closing: what the peer still sends is read only to be discarded.
                        continue;
                    }
                    if rate.allow() {
                        session.on_frame(frame, &mut self.out).await;
                    } else {
                        tracing::warn!("closing a socket over its message rate");
                        crate::metrics::rejected("rate_limited");
                        self.finish(CLOSE_RATE_LIMIT, "message rate limit exceeded", false);
                    }
                }
                Wake::Frame(None) => {
                    self.reading = false;
                    self.peer_closed();
                }
                Wake::Frame(Some(Err(e))) => {
                    self.reading = false;
                    self.broken(&e);
                }
                Wake::Reply(reply) => {
                    if serving {
                        self.writer.send(reply, None);
                    }
                }
                Wake::Event(Some(event)) => session.on_event(event, &mut self.out),
                Wake::Event(None) => events = false,
                Wake::Wrote(Ok(Wrote::Message)) => {}
                Wake::Wrote(Ok(Wrote::Close)) => {
                    self.phase = Phase::Lingering {
                        until: Instant::now() + CLOSE_LINGER,
                    };
                }
                Wake::Wrote(Ok(Wrote::TimedOut)) => match self.phase {
                    Phase::Open | Phase::Finishing { .. } | Phase::Closing { until: None } => {
                        tracing::info!(timeout = ?settings.send_timeout, "closing a socket whose send timed out");
                        crate::metrics::rejected("send_timeout");
                        self.close_now(CLOSE_FELL_BEHIND, "fell behind; reconnect to resync");
                    }
                    _ => self.phase = Phase::Ended,
                },
                Wake::Wrote(Err(e)) => {
                    tracing::debug!(error = %e, "writing to a socket failed");
                    crate::metrics::rejected("connection_lost");
                    self.end(Err(e));
                }
                Wake::Ping if keepalive.expired() => {
                    tracing::debug!("closing a socket that stopped answering pings");
                    crate::metrics::rejected("ping_timeout");
                    self.close_now(CLOSE_FELL_BEHIND, "no answer to pings; reconnect to resync");
                }
                Wake::Ping => self.writer.ping(),
                Wake::Shutdown => self.finish(CLOSE_GOING_AWAY, "server shutting down", true),
                Wake::Expired => {
                    tracing::debug!("closing a socket whose token expired");
                    crate::auth::Refusal::Expired.count();
                    let reason = "token expired; reconnect with a fresh one";
                    self.finish(CLOSE_TOKEN_EXPIRED, reason, false);
                }
                Wake::Deadline => self.phase = Phase::Ended,
            }
        }
    }

    /// Moves what the session asked for to the writer.
    fn take_outbox(&mut self) {
        while let Some((msg, hold)) = self.out.now.pop_front() {
            if self.phase.serving() {
                self.writer.send(msg, hold);
            }
        }
        if let Some(CloseRequest { frame, now }) = self.out.close.take() {
            if now {
                self.close_now(frame.code, frame.reason);
            } else {
                self.finish(frame.code, frame.reason, false);
            }
        }
    }

    /// Starts an orderly close: replies first, then `code` (the first close wins).
    fn finish(&mut self, code: u16, reason: impl Into<Utf8Bytes>, drain: bool) {
        if matches!(self.phase, Phase::Open) {
            let frame = CloseFrame {
                code,
                reason: reason.into(),
            };
            self.phase = Phase::Finishing { frame, drain };
        }
    }

    /// Closes a peer that is behind or gone: `code` right after the message being written,
    /// for at most [`CLOSE_SEND_LIMIT`]; replies in flight finish unanswered.
    fn close_now(&mut self, code: u16, reason: impl Into<Utf8Bytes>) {
        if matches!(self.phase, Phase::Lingering { .. } | Phase::Ended) {
            return;
        }
        self.writer.close_now(CloseFrame {
            code,
            reason: reason.into(),
        });
        self.phase = Phase::Closing {
            until: Some(Instant::now() + CLOSE_SEND_LIMIT),
        };
    }

    /// The peer closed (its close frame, or the end of the stream): nothing more is written.
    /// Reading on for a moment sends tungstenite's answer to the close.
    fn peer_closed(&mut self) {
        self.writer.abandon();
        self.phase = match self.phase {
            Phase::Lingering { .. } | Phase::Ended => Phase::Ended,
            _ if !self.reading => Phase::Ended,
            _ => Phase::Lingering {
                until: Instant::now() + CLOSE_LINGER,
            },
        };
    }

    /// Reading failed: a message too big or malformed is answered with its close code; a peer
    /// that vanished is not answered at all.
    fn broken(&mut self, e: &E) {
        match classify(e) {
            Broken::Lost => {
                tracing::debug!(error = %e, "a socket's peer vanished without a close frame");
                crate::metrics::rejected("connection_lost");
                self.end(Err(SocketError::Lost(e.to_string())));
            }
            kind => {
                let (code, reason, counted) = match kind {
                    Broken::TooBig => (CLOSE_TOO_BIG, "message too big", "message_too_big"),
                    _ => (CLOSE_MALFORMED, "malformed frame", "malformed_frame"),
                };
                tracing::info!(error = %e, "closing a socket over a bad frame");
                crate::metrics::rejected(counted);
                self.result = Err(SocketError::Receive(e.to_string()));
                match self.phase {
                    Phase::Open => self.finish(code, reason, false),
                    // The stream has ended: the close under way goes out, then the linger.
                    Phase::Finishing { .. } | Phase::Closing { .. } => {}
                    Phase::Lingering { .. } | Phase::Ended => self.phase = Phase::Ended,
                }
            }
        }
    }

    fn end(&mut self, result: Result<(), SocketError>) {
        self.writer.abandon();
        self.phase = Phase::Ended;
        if self.result.is_ok() {
            self.result = result;
        }
    }
}

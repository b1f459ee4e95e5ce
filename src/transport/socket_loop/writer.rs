//! The one place that writes to a live socket.
//!
//! A send to a peer that does not read blocks once the TCP buffers are full. A loop that
//! awaited each send could meanwhile neither ping, nor read pongs, nor notice that the peer was
//! gone: a stalled peer stayed connected for minutes, and slow readers that did answer pings
//! were reset because no ping was sent while a send was blocked. So the loop never awaits a
//! send: it polls the writer alongside everything else, and the writer moves on whenever the
//! socket takes bytes.
//!
//! The writer sends one message at a time, in order, except that a ping goes before the
//! messages still waiting: it waits only for the message being written (TCP is one stream of
//! bytes; nothing can overtake a frame half written). Each message must be written within
//! `--send-timeout-secs`; one that is not is reported once as [`Wrote::TimedOut`], and the loop
//! closes the socket (4008). A message queued with a hold (a repo peer's budget charge) keeps
//! the hold until it is written, so the peer's budget counts it until then.

use std::collections::VecDeque;
use std::fmt::Display;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message};
use futures_util::Sink;
use tokio::time::{Instant, Sleep};

use super::SocketError;

/// What a message holds until it is written (dropped then, or when the socket ends).
pub type Hold = Box<dyn Send>;

/// What the writer finished.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Wrote {
    /// A message (or a ping) is written.
    Message,
    /// The close frame is written; nothing more will be.
    Close,
    /// The message being written has taken longer than the send timeout (reported once).
    TimedOut,
}

/// The message being written.
struct Current {
    /// Until it is handed to the sink.
    msg: Option<Message>,
    _hold: Option<Hold>,
    close: bool,
}

pub(super) struct Writer<'a, Si> {
    sink: Pin<&'a mut Si>,
    send_timeout: Duration,
    ping: bool,
    waiting: VecDeque<(Message, Option<Hold>)>,
    waiting_bytes: usize,
    /// Written once nothing waits.
    close: Option<CloseFrame>,
    current: Option<Current>,
    /// The send timeout of the current message (made on the first send that has to wait).
    timer: Option<Pin<Box<Sleep>>>,
    deadline: Instant,
    timed_out: bool,
    /// Written the close frame, or gave up writing: nothing more is accepted.
    done: bool,
}

impl<'a, Si> Writer<'a, Si>
where
    Si: Sink<Message>,
    Si::Error: Display,
{
    pub(super) fn new(sink: Pin<&'a mut Si>, send_timeout: Duration) -> Self {
        Self {
            sink,
            send_timeout,
            ping: false,
            waiting: VecDeque::new(),
            waiting_bytes: 0,
            close: None,
            current: None,
            timer: None,
            deadline: Instant::now(),
            timed_out: false,
            done: false,
        }
    }

    /// Queues `msg` behind what waits; nothing is queued once a close is.
    pub(super) fn send(&mut self, msg: Message, hold: Option<Hold>) {
        if self.closing() {
            return;
        }
        self.waiting_bytes += weight(&msg);
        self.waiting.push_back((msg, hold));
    }

    /// Queues a ping ahead of the messages that wait (one at most).
    pub(super) fn ping(&mut self) {
        if !self.closing() {
            self.ping = true;
        }
    }

    /// Queues the close frame behind what waits. The first close asked for wins.
    pub(super) fn close(&mut self, frame: CloseFrame) {
        if !self.closing() {
            self.close = Some(frame);
        }
    }

    /// Drops what waits and queues `frame` right behind the message being written: the peer
    /// is too far behind, or gone, for the rest to matter.
    pub(super) fn close_now(&mut self, frame: CloseFrame) {
        if self.done || self.current.as_ref().is_some_and(|c| c.close) {
            return;
        }
        self.ping = false;
        self.waiting.clear();
        self.waiting_bytes = 0;
        self.close = Some(frame);
    }

    /// Nothing more is written: the peer closed or vanished.
    pub(super) fn abandon(&mut self) {
        self.done = true;
        self.ping = false;
        self.waiting.clear();
        self.waiting_bytes = 0;
        self.close = None;
        self.current = None;
    }

    fn closing(&self) -> bool {
        self.done || self.close.is_some() || self.current.as_ref().is_some_and(|c| c.close)
    }

    /// Something is being written or waits.
    pub(super) fn busy(&self) -> bool {
        !self.done
            && (self.current.is_some()
                || self.ping
                || !self.waiting.is_empty()
                || self.close.is_some())
    }

    /// Nothing waits behind the message being written: the session may hand over more. (Its
    /// own queue, bounded, holds the rest; pulling it in here would only move the memory.)
    pub(super) fn has_room(&self) -> bool {
        self.waiting.is_empty() && !self.closing()
    }

    /// Bytes waiting behind the message being written, when more than one message waits (a
    /// single message may be large: the document itself, a catch-up).
    pub(super) fn backlog(&self) -> usize {
        if self.waiting.len() > 1 {
            self.waiting_bytes
        } else {
            0
        }
    }

    /// Writes on; resolves each time a message is written (or timed out, or the sink failed).
    /// Only poll it while [`busy`](Self::busy). Cancel-safe: its state lives in the writer.
    pub(super) fn poll_write(&mut self, cx: &mut Context<'_>) -> Poll<Result<Wrote, SocketError>> {
        if self.current.is_none() {
            let Some(next) = self.next() else {
                return Poll::Pending;
            };
            self.current = Some(next);
            self.deadline = Instant::now() + self.send_timeout;
            self.timed_out = false;
            if let Some(timer) = self.timer.as_mut() {
                timer.as_mut().reset(self.deadline);
            }
        }
        match self.advance(cx) {
            Poll::Ready(Ok(())) => {
                let close = self.current.take().is_some_and(|c| c.close);
                if close {
                    self.done = true;
                    return Poll::Ready(Ok(Wrote::Close));
                }
                Poll::Ready(Ok(Wrote::Message))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending if self.timed_out => Poll::Pending,
            Poll::Pending => {
                let deadline = self.deadline;
                let timer = self
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                if timer.as_mut().poll(cx).is_ready() {
                    self.timed_out = true;
                    return Poll::Ready(Ok(Wrote::TimedOut));
                }
                Poll::Pending
            }
        }
    }

    /// The next message to write: a ping, then what waits, then the close.
    fn next(&mut self) -> Option<Current> {
        if std::mem::take(&mut self.ping) {
            return Some(Current {
                msg: Some(Message::Ping(Default::default())),
                _hold: None,
                close: false,
            });
        }
        if let Some((msg, hold)) = self.waiting.pop_front() {
            self.waiting_bytes -= weight(&msg);
            return Some(Current {
                msg: Some(msg),
                _hold: hold,
                close: false,
            });
        }
        self.close.take().map(|frame| Current {
            msg: Some(Message::Close(Some(frame))),
            _hold: None,
            close: true,
        })
    }

    /// Hands the current message to the sink and flushes it.
    fn advance(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), SocketError>> {
        let send_error = |e: Si::Error| SocketError::Send(e.to_string());
        let Some(current) = self.current.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        if current.msg.is_some() {
            ready!(self.sink.as_mut().poll_ready(cx)).map_err(send_error)?;
            if let Some(msg) = current.msg.take() {
                self.sink.as_mut().start_send(msg).map_err(send_error)?;
            }
        }
        self.sink.as_mut().poll_flush(cx).map_err(send_error)
    }
}

/// The bytes a message holds.
fn weight(msg: &Message) -> usize {
    match msg {
        Message::Binary(b) | Message::Ping(b) | Message::Pong(b) => b.len(),
        Message::Text(t) => t.len(),
        Message::Close(_) => 0,
    }
}

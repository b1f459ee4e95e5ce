//! The loop over channels, on paused time: a test sink stands for the socket's write half (a
//! TCP buffer of a given capacity that the test, as the peer, reads from), a channel stream
//! for its read half, and a test session whose uploads finish when the test opens their gate.
//! Nothing sleeps; the paused clock jumps to the next timer when all is idle.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_tungstenite::tungstenite::error::{CapacityError, ProtocolError};
use tokio_tungstenite::tungstenite::Error as WsError;

use super::*;
use crate::transport::close::CLOSE_DELETED;

/// Longer than any test waits: keepalive is only under test where a test says so.
const NO_PINGS: Duration = Duration::from_secs(100_000);

enum Event {
    Push(Message),
    Close(u16),
}

struct TestSession {
    greeting: Option<Message>,
    events: mpsc::UnboundedReceiver<Event>,
    /// Each upload's number and the gate that completes it.
    gates: mpsc::UnboundedSender<(u8, oneshot::Sender<()>)>,
    drained: Arc<AtomicBool>,
    finished: Arc<AtomicBool>,
}

impl Session for TestSession {
    type Event = Event;

    async fn open(&mut self, out: &mut Outbox) {
        if let Some(msg) = self.greeting.take() {
            out.send(msg);
        }
    }

    async fn next_event(&mut self, room: bool) -> Option<Event> {
        if !room {
            return std::future::pending().await;
        }
        self.events.recv().await
    }

    fn on_event(&mut self, event: Event, out: &mut Outbox) {
        match event {
            Event::Push(msg) => out.send(msg),
            Event::Close(code) => out.close(code, "closed by the session"),
        }
    }

    async fn on_frame(&mut self, frame: Frame, out: &mut Outbox) {
        match frame {
            Frame::Binary(bytes) => {
                let n = bytes.first().copied().unwrap_or(0);
                let (open, gate) = oneshot::channel();
                let _ = self.gates.send((n, open));
                out.reply_later(async move {
                    let _ = gate.await;
                    text(&format!("ack {n}"))
                });
            }
            Frame::Text => out.send(text("echo")),
        }
    }

    async fn drain(&mut self) {
        self.drained.store(true, Ordering::SeqCst);
    }

    async fn finish(&mut self) {
        self.finished.store(true, Ordering::SeqCst);
    }
}

fn text(s: &str) -> Message {
    Message::Text(s.to_owned().into())
}

fn binary(len: usize) -> Message {
    Message::Binary(Bytes::from(vec![0u8; len]))
}

/// The socket's send buffer: the loop writes into it while it has room, the test (the peer)
/// reads from it. A write that does not fit stays pending, like a send to a peer that does
/// not read.
struct Pipe {
    queue: VecDeque<Message>,
    bytes: usize,
    capacity: usize,
    writer: Option<Waker>,
}

fn size(msg: &Message) -> usize {
    match msg {
        Message::Binary(b) | Message::Ping(b) | Message::Pong(b) => b.len(),
        Message::Text(t) => t.len(),
        Message::Close(_) => 2,
    }
}

struct TestSink {
    pipe: Arc<Mutex<Pipe>>,
    readable: Arc<Notify>,
}

impl TestSink {
    /// Ready when the buffer holds no more than `limit` bytes; else the writer waits.
    fn wait_for(
        &self,
        cx: &mut Context<'_>,
        full: impl Fn(&Pipe) -> bool,
    ) -> Poll<Result<(), String>> {
        let mut pipe = self.pipe.lock().unwrap();
        if full(&pipe) {
            pipe.writer = Some(cx.waker().clone());
            Poll::Pending
        } else {
            Poll::Ready(Ok(()))
        }
    }
}

impl Sink<Message> for TestSink {
    type Error = String;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), String>> {
        self.wait_for(cx, |p| p.bytes >= p.capacity)
    }

    fn start_send(self: Pin<&mut Self>, msg: Message) -> Result<(), String> {
        let mut pipe = self.pipe.lock().unwrap();
        pipe.bytes += size(&msg);
        pipe.queue.push_back(msg);
        self.readable.notify_one();
        Ok(())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), String>> {
        self.wait_for(cx, |p| p.bytes > p.capacity)
    }

    fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), String>> {
        Poll::Ready(Ok(()))
    }
}

/// The far side of the socket, and handles on the session.
struct Peer {
    frames: mpsc::UnboundedSender<Result<Message, axum::Error>>,
    pipe: Arc<Mutex<Pipe>>,
    readable: Arc<Notify>,
    gates: mpsc::UnboundedReceiver<(u8, oneshot::Sender<()>)>,
    events: mpsc::UnboundedSender<Event>,
    shutdown: CancellationToken,
    drained: Arc<AtomicBool>,
    finished: Arc<AtomicBool>,
    task: JoinHandle<Result<(), SocketError>>,
}

/// How a test's socket is set up.
struct Setup {
    ping_interval: Duration,
    max_messages_per_sec: u32,
    greeting: Option<Message>,
    expires_at: Option<Instant>,
    send_timeout: Duration,
    max_queue: usize,
    /// Bytes the socket's send buffer holds.
    capacity: usize,
}

impl Default for Setup {
    fn default() -> Self {
        Self {
            ping_interval: NO_PINGS,
            max_messages_per_sec: 100,
            greeting: None,
            expires_at: None,
            send_timeout: NO_PINGS,
            max_queue: usize::MAX,
            capacity: usize::MAX,
        }
    }
}

fn start(ping_interval: Duration, max_messages_per_sec: u32, greeting: Option<Message>) -> Peer {
    launch(Setup {
        ping_interval,
        max_messages_per_sec,
        greeting,
        ..Setup::default()
    })
}

/// [`start`] for a caller whose token expires at `expires_at`.
fn start_until(
    ping_interval: Duration,
    max_messages_per_sec: u32,
    greeting: Option<Message>,
    expires_at: Option<tokio::time::Instant>,
) -> Peer {
    launch(Setup {
        ping_interval,
        max_messages_per_sec,
        greeting,
        expires_at,
        ..Setup::default()
    })
}

fn launch(setup: Setup) -> Peer {
    let (frames, frames_rx) = mpsc::unbounded_channel();
    let (gates_tx, gates) = mpsc::unbounded_channel();
    let (events, events_rx) = mpsc::unbounded_channel();
    let shutdown = CancellationToken::new();
    let drained = Arc::new(AtomicBool::new(false));
    let finished = Arc::new(AtomicBool::new(false));
    let mut session = TestSession {
        greeting: setup.greeting,
        events: events_rx,
        gates: gates_tx,
        drained: drained.clone(),
        finished: finished.clone(),
    };
    let pipe = Arc::new(Mutex::new(Pipe {
        queue: VecDeque::new(),
        bytes: 0,
        capacity: setup.capacity,
        writer: None,
    }));
    let readable = Arc::new(Notify::new());
    let sink = TestSink {
        pipe: pipe.clone(),
        readable: readable.clone(),
    };
    let stream = UnboundedReceiverStream::new(frames_rx);
    let settings = Settings {
        ping_interval: setup.ping_interval,
        max_messages_per_sec: setup.max_messages_per_sec,
        send_timeout: setup.send_timeout,
        max_queue: setup.max_queue,
        shutdown: shutdown.clone(),
        expires_at: setup.expires_at,
    };
    let task = tokio::spawn(async move { run(sink, stream, &mut session, settings).await });
    Peer {
        frames,
        pipe,
        readable,
        gates,
        events,
        shutdown,
        drained,
        finished,
        task,
    }
}

impl Peer {
    fn frame(&self, msg: Message) {
        self.frames.send(Ok(msg)).expect("the loop reads frames");
    }

    fn upload(&self, n: u8) {
        self.frame(Message::Binary(Bytes::from(vec![n])));
    }

    fn push(&self, msg: Message) {
        let _ = self.events.send(Event::Push(msg));
    }

    /// Takes the oldest message out of the socket's buffer, making room for the loop.
    fn take(&self) -> Option<Message> {
        let mut pipe = self.pipe.lock().unwrap();
        let msg = pipe.queue.pop_front()?;
        pipe.bytes -= size(&msg);
        if let Some(w) = pipe.writer.take() {
            w.wake();
        }
        Some(msg)
    }

    /// The next message the loop sent (the paused clock runs ahead to it).
    async fn next(&mut self) -> Message {
        let deadline = Instant::now() + Duration::from_secs(1_000_000);
        loop {
            if let Some(msg) = self.take() {
                return msg;
            }
            assert!(!self.task.is_finished(), "the loop ended without sending");
            let ready = self.readable.notified();
            tokio::select! {
                _ = ready => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            assert!(Instant::now() < deadline, "the loop sent nothing");
        }
    }

    /// Nothing is sent for `wait`.
    async fn quiet_for(&mut self, wait: Duration) {
        tokio::time::sleep(wait).await;
        if let Some(msg) = self.take() {
            panic!("expected nothing, got {msg:?}");
        }
    }

    async fn gate(&mut self) -> (u8, oneshot::Sender<()>) {
        self.gates
            .recv()
            .await
            .expect("an upload reached the session")
    }

    /// Waits for the loop to end; its result, and that nothing more was sent.
    async fn ended(self) -> Result<(), SocketError> {
        let result = self.task.await.expect("the loop panicked");
        let left = self.pipe.lock().unwrap().queue.pop_front();
        assert!(left.is_none(), "sent after ending: {left:?}");
        assert!(self.finished.load(Ordering::SeqCst), "finish ran");
        result
    }
}

fn close_code(msg: &Message) -> Option<u16> {
    match msg {
        Message::Close(Some(frame)) => Some(frame.code),
        _ => None,
    }
}

fn assert_text(msg: &Message, want: &str) {
    match msg {
        Message::Text(t) => assert_eq!(t.as_str(), want),
        other => panic!("expected {want:?}, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn pings_every_interval_and_closes_a_silent_peer_with_4008() {
    let every = Duration::from_secs(10);
    let began = Instant::now();
    let mut peer = start(every, 100, None);
    for n in 1..=2u32 {
        let msg = peer.next().await;
        assert!(matches!(msg, Message::Ping(_)), "{msg:?}");
        assert_eq!(began.elapsed(), every * n);
    }
    // Silent for 30 s > two intervals + 500 ms: the third tick closes instead of pinging.
    let msg = peer.next().await;
    assert_eq!(close_code(&msg), Some(CLOSE_FELL_BEHIND));
    assert_eq!(began.elapsed(), every * 3);
    assert!(peer.ended().await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn a_peer_that_answers_pings_stays_open() {
    let every = Duration::from_secs(10);
    let mut peer = start(every, 100, None);
    for _ in 0..10 {
        let msg = peer.next().await;
        assert!(matches!(msg, Message::Ping(_)), "{msg:?}");
        peer.frame(Message::Pong(Bytes::new()));
    }
    // The peer closes: the loop ends without a close frame of its own.
    peer.frame(Message::Close(None));
    assert!(peer.ended().await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn a_socket_over_its_message_rate_is_closed_with_1008() {
    let mut peer = start(NO_PINGS, 5, None);
    // A burst of twice the rate passes; the next frame closes the socket.
    for i in 0..11 {
        peer.frame(text(&i.to_string()));
    }
    for _ in 0..10 {
        assert_text(&peer.next().await, "echo");
    }
    assert_eq!(close_code(&peer.next().await), Some(CLOSE_RATE_LIMIT));
    assert!(peer.ended().await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn replies_go_out_in_upload_order_even_when_later_ones_finish_first() {
    let mut peer = start(NO_PINGS, 100, None);
    let mut gates = Vec::new();
    for n in 1..=3 {
        peer.upload(n);
        gates.push(peer.gate().await);
    }
    let (n3, g3) = gates.pop().unwrap();
    let (n2, g2) = gates.pop().unwrap();
    assert_eq!((n2, n3), (2, 3));
    g3.send(()).unwrap();
    g2.send(()).unwrap();
    peer.quiet_for(Duration::from_secs(60)).await;
    // A message that is not a pipelined reply is not held back by them.
    peer.frame(text("now"));
    assert_text(&peer.next().await, "echo");
    let (n1, g1) = gates.pop().unwrap();
    assert_eq!(n1, 1);
    g1.send(()).unwrap();
    for n in 1..=3 {
        assert_text(&peer.next().await, &format!("ack {n}"));
    }
    peer.frame(Message::Close(None));
    assert!(peer.ended().await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn reading_pauses_while_the_in_flight_limit_is_reached() {
    let mut peer = start(NO_PINGS, 1000, None);
    for n in 0..=MAX_IN_FLIGHT as u8 {
        peer.upload(n);
    }
    peer.frame(text("behind the uploads"));
    let mut gates = Vec::new();
    for _ in 0..MAX_IN_FLIGHT {
        gates.push(peer.gate().await);
    }
    // The next upload and the text wait in the stream until a reply goes out.
    peer.quiet_for(Duration::from_secs(60)).await;
    assert!(peer.gates.try_recv().is_err(), "read past the limit");
    let (first, open) = gates.remove(0);
    assert_eq!(first, 0);
    open.send(()).unwrap();
    assert_text(&peer.next().await, "ack 0");
    // One slot freed: the next upload is read, and the limit is reached again.
    assert_eq!(peer.gate().await.0, MAX_IN_FLIGHT as u8);
    peer.quiet_for(Duration::from_secs(60)).await;
    let (second, open) = gates.remove(0);
    assert_eq!(second, 1);
    open.send(()).unwrap();
    assert_text(&peer.next().await, "ack 1");
    assert_text(&peer.next().await, "echo");
    peer.frame(Message::Close(None));
    // Let the loop take the close before the held uploads finish (dropped gates release
    // them); otherwise it may see their replies first and send them.
    peer.quiet_for(Duration::from_secs(1)).await;
    drop(gates);
    assert!(peer.ended().await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn shutdown_answers_in_flight_uploads_then_closes_with_1001() {
    let mut peer = start(NO_PINGS, 100, None);
    peer.upload(1);
    peer.upload(2);
    let (_, g1) = peer.gate().await;
    let (_, g2) = peer.gate().await;
    peer.shutdown.cancel();
    peer.quiet_for(Duration::from_secs(60)).await;
    assert!(
        !peer.drained.load(Ordering::SeqCst),
        "drained before the replies"
    );
    g2.send(()).unwrap();
    g1.send(()).unwrap();
    assert_text(&peer.next().await, "ack 1");
    assert_text(&peer.next().await, "ack 2");
    assert_eq!(close_code(&peer.next().await), Some(CLOSE_GOING_AWAY));
    assert!(peer.drained.load(Ordering::SeqCst));
    assert!(peer.ended().await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn an_expired_token_answers_accepted_uploads_then_closes_with_4401() {
    let start_at = tokio::time::Instant::now();
    let expiry = start_at + Duration::from_secs(30);
    let mut peer = start_until(NO_PINGS, 100, None, Some(expiry));
    peer.upload(1);
    let (_, g1) = peer.gate().await;
    // Past the expiry the loop waits for the accepted upload, answers it, then closes.
    peer.quiet_for(Duration::from_secs(31)).await;
    g1.send(()).unwrap();
    assert_text(&peer.next().await, "ack 1");
    assert_eq!(close_code(&peer.next().await), Some(CLOSE_TOKEN_EXPIRED));
    assert!(tokio::time::Instant::now() >= expiry);
    assert!(peer.ended().await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn a_bad_frame_closes_with_1009() {
    let mut peer = start(NO_PINGS, 100, None);
    let too_long = CapacityError::MessageTooLong {
        size: 2 << 20,
        max_size: 1 << 20,
    };
    let e = axum::Error::new(WsError::Capacity(too_long));
    peer.frames.send(Err(e)).unwrap();
    assert_eq!(close_code(&peer.next().await), Some(CLOSE_TOO_BIG));
    assert!(matches!(peer.ended().await, Err(SocketError::Receive(_))));
}

#[tokio::test(start_paused = true)]
async fn the_session_greets_pushes_and_closes_after_what_it_sent() {
    let greeting = Message::Binary(Bytes::from_static(b"hello"));
    let mut peer = start(NO_PINGS, 100, Some(greeting.clone()));
    assert_eq!(peer.next().await, greeting);
    let pushed = Message::Binary(Bytes::from_static(b"pushed"));
    peer.events.send(Event::Push(pushed.clone())).ok();
    peer.events.send(Event::Close(CLOSE_DELETED)).ok();
    assert_eq!(peer.next().await, pushed);
    assert_eq!(close_code(&peer.next().await), Some(CLOSE_DELETED));
    let drained = peer.drained.clone();
    assert!(peer.ended().await.is_ok());
    assert!(
        drained.load(Ordering::SeqCst),
        "drained once the socket ended"
    );
}

#[tokio::test(start_paused = true)]
async fn when_the_peer_leaves_its_uploads_finish_unanswered() {
    let mut peer = start(NO_PINGS, 100, None);
    peer.upload(7);
    let (_, gate) = peer.gate().await;
    peer.frame(Message::Close(None));
    peer.quiet_for(Duration::from_secs(60)).await;
    assert!(!peer.task.is_finished(), "waits for the upload");
    assert!(!peer.drained.load(Ordering::SeqCst));
    gate.send(()).unwrap();
    let drained = peer.drained.clone();
    assert!(peer.ended().await.is_ok(), "no ack: nobody is listening");
    assert!(drained.load(Ordering::SeqCst));
}

#[tokio::test(start_paused = true)]
async fn a_session_that_stops_pushing_keeps_the_socket_open() {
    let mut peer = start(Duration::from_secs(10), 100, None);
    // Dropping the event source: `next_event` returns `None` and the loop stops asking.
    let (dead, _) = mpsc::unbounded_channel();
    peer.events = dead;
    peer.frame(text("still here"));
    assert_text(&peer.next().await, "echo");
    assert!(matches!(peer.next().await, Message::Ping(_)));
    peer.frame(Message::Close(None));
    assert!(peer.ended().await.is_ok());
}

fn is_ping(msg: &Message) -> bool {
    matches!(msg, Message::Ping(_))
}

/// A peer that reads nothing: the first message fills its buffer and every send after it
/// blocks. Keepalive goes on regardless, and after two silent intervals the loop gives the
/// close frame a moment and drops the socket.
#[tokio::test(start_paused = true)]
async fn a_peer_that_reads_nothing_is_closed_after_two_intervals_while_a_send_is_blocked() {
    let every = Duration::from_secs(10);
    let began = Instant::now();
    let peer = launch(Setup {
        ping_interval: every,
        capacity: 1_000,
        ..Setup::default()
    });
    peer.push(binary(10_000));
    peer.push(binary(10_000));
    let finished = peer.finished.clone();
    let pipe = peer.pipe.clone();
    let result = peer.task.await.unwrap();
    assert!(result.is_ok(), "{result:?}");
    // Ping ticks at 10 s and 20 s; at 30 s the peer has been silent for more than 20.5 s.
    assert_eq!(began.elapsed(), every * 3 + CLOSE_SEND_LIMIT);
    assert!(finished.load(Ordering::SeqCst));
    let left: Vec<usize> = pipe.lock().unwrap().queue.iter().map(size).collect();
    assert_eq!(
        left,
        vec![10_000],
        "only the first message got into the buffer"
    );
}

/// A ping does not wait behind the queue: it goes out right after the message being written,
/// and a peer that answers it keeps its connection.
#[tokio::test(start_paused = true)]
async fn a_ping_goes_out_right_after_the_blocked_message() {
    let every = Duration::from_secs(10);
    let mut peer = launch(Setup {
        ping_interval: every,
        capacity: 1_000,
        ..Setup::default()
    });
    for n in 1..=3u8 {
        peer.push(Message::Binary(Bytes::from(vec![n; 10_000])));
    }
    // At 10 s the ping is due; the buffer is still full of the first message.
    tokio::time::sleep(Duration::from_secs(15)).await;
    let first = peer.next().await;
    assert!(matches!(&first, Message::Binary(b) if b[0] == 1));
    assert!(
        is_ping(&peer.next().await),
        "the ping overtook the waiting messages"
    );
    peer.frame(Message::Pong(Bytes::new()));
    for n in 2..=3u8 {
        let msg = peer.next().await;
        assert!(matches!(&msg, Message::Binary(b) if b[0] == n), "{msg:?}");
    }
    peer.frame(Message::Close(None));
    assert!(peer.ended().await.is_ok());
}

/// A reader that takes one message every 4 s and answers pings: its sends are slow but each
/// completes, pings reach it between messages, and it is never closed.
#[tokio::test(start_paused = true)]
async fn a_slow_reader_that_answers_pings_keeps_its_connection() {
    let every = Duration::from_secs(5);
    let mut peer = launch(Setup {
        ping_interval: every,
        send_timeout: Duration::from_secs(30),
        capacity: 1_000,
        ..Setup::default()
    });
    for n in 0..20u8 {
        peer.push(Message::Binary(Bytes::from(vec![n; 10_000])));
    }
    let began = Instant::now();
    let (mut data, mut pings) = (0u8, 0);
    while data < 20 {
        tokio::time::sleep(Duration::from_secs(4)).await;
        match peer.next().await {
            Message::Binary(b) => {
                assert_eq!(b[0], data, "in order");
                data += 1;
            }
            Message::Ping(_) => {
                pings += 1;
                peer.frame(Message::Pong(Bytes::new()));
            }
            other => panic!("closed a slow reader that answers pings: {other:?}"),
        }
    }
    assert!(began.elapsed() > Duration::from_secs(80));
    assert!(pings >= 10, "pinged every interval: {pings}");
    peer.frame(Message::Close(None));
    let pipe = peer.pipe.clone();
    assert!(peer.task.await.unwrap().is_ok());
    // Only a ping written before the loop saw the close may be left unread.
    assert!(pipe.lock().unwrap().queue.iter().all(is_ping));
}

/// A peer that stays alive (it keeps sending) but takes nothing in: the send that does not
/// complete within the timeout closes it with 4008.
#[tokio::test(start_paused = true)]
async fn a_send_that_takes_longer_than_the_timeout_closes_with_4008() {
    let timeout = Duration::from_secs(30);
    let began = Instant::now();
    let mut peer = launch(Setup {
        send_timeout: timeout,
        capacity: 1_000,
        ..Setup::default()
    });
    peer.push(binary(10_000));
    peer.push(binary(10_000));
    // Waits past the timeout, then reads: the blocked message, then the close right after it.
    tokio::time::sleep(timeout + Duration::from_millis(500)).await;
    assert!(matches!(peer.next().await, Message::Binary(_)));
    let msg = peer.next().await;
    assert_eq!(close_code(&msg), Some(CLOSE_FELL_BEHIND), "{msg:?}");
    assert!(began.elapsed() < timeout + CLOSE_SEND_LIMIT);
    // The loop waits for the peer's answer to the close, and ends when it comes.
    peer.frame(Message::Close(None));
    assert!(peer.ended().await.is_ok());
}

/// Over the rate, the uploads already accepted are answered before the close, and nothing
/// the peer sends after the limit reaches the session.
#[tokio::test(start_paused = true)]
async fn over_the_rate_every_accepted_upload_is_acked_then_1008() {
    let mut peer = start(NO_PINGS, 5, None);
    // The burst allowance is twice the rate: ten uploads pass, the eleventh trips the limit.
    for n in 1..=14u8 {
        peer.upload(n);
    }
    let mut gates = Vec::new();
    for _ in 0..10 {
        gates.push(peer.gate().await);
    }
    peer.quiet_for(Duration::from_secs(60)).await;
    assert!(
        peer.gates.try_recv().is_err(),
        "an upload past the limit was taken"
    );
    for (_, gate) in gates.into_iter().rev() {
        gate.send(()).unwrap();
    }
    for n in 1..=10 {
        assert_text(&peer.next().await, &format!("ack {n}"));
    }
    assert_eq!(close_code(&peer.next().await), Some(CLOSE_RATE_LIMIT));
    let closed_at = Instant::now();
    peer.frame(Message::Close(None));
    let drained = peer.drained.clone();
    assert!(peer.ended().await.is_ok());
    assert!(
        closed_at.elapsed() < CLOSE_LINGER,
        "ended on the peer's answer"
    );
    assert!(drained.load(Ordering::SeqCst));
}

/// Without an answer to its close frame, the loop drops the socket after the linger.
#[tokio::test(start_paused = true)]
async fn the_close_lingers_for_the_peers_answer_then_drops_the_socket() {
    let mut peer = start(NO_PINGS, 100, None);
    peer.events.send(Event::Close(CLOSE_DELETED)).ok();
    assert_eq!(close_code(&peer.next().await), Some(CLOSE_DELETED));
    let closed_at = Instant::now();
    // What the peer still sends is read and discarded.
    peer.upload(1);
    let task = &mut peer.task;
    let _ = tokio::time::timeout(CLOSE_LINGER * 2, task).await;
    assert_eq!(closed_at.elapsed(), CLOSE_LINGER);
    assert!(
        peer.gates.try_recv().is_err(),
        "an upload after the close was taken"
    );
}

/// Replies that pile up for a peer that does not read (it keeps sending) are bounded too.
#[tokio::test(start_paused = true)]
async fn replies_piling_up_past_the_queue_bound_close_with_4008() {
    let mut peer = launch(Setup {
        capacity: 10,
        max_queue: 100,
        ..Setup::default()
    });
    peer.push(binary(1_000));
    // The message is being written (and blocked) before the echoes pile up behind it.
    tokio::time::sleep(Duration::from_millis(100)).await;
    for _ in 0..30 {
        peer.frame(text("more"));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(matches!(peer.next().await, Message::Binary(_)));
    let msg = peer.next().await;
    assert_eq!(close_code(&msg), Some(CLOSE_FELL_BEHIND), "{msg:?}");
    peer.frame(Message::Close(None));
    assert!(peer.ended().await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn a_malformed_frame_closes_with_1002() {
    let mut peer = start(NO_PINGS, 100, None);
    let e = axum::Error::new(WsError::Protocol(ProtocolError::NonZeroReservedBits));
    peer.frames.send(Err(e)).unwrap();
    assert_eq!(close_code(&peer.next().await), Some(CLOSE_MALFORMED));
    assert!(matches!(peer.ended().await, Err(SocketError::Receive(_))));
}

/// A peer that vanished is not written to; its uploads in flight still complete.
#[tokio::test(start_paused = true)]
async fn a_peer_that_vanishes_gets_no_close_frame() {
    let mut peer = start(NO_PINGS, 100, None);
    peer.upload(1);
    let (_, gate) = peer.gate().await;
    let gone = WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake);
    peer.frames.send(Err(axum::Error::new(gone))).unwrap();
    peer.quiet_for(Duration::from_secs(10)).await;
    assert!(!peer.task.is_finished(), "waits for the upload");
    gate.send(()).unwrap();
    assert!(matches!(peer.ended().await, Err(SocketError::Lost(_))));
}

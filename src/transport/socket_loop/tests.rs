//! The loop over channels, on paused time: a channel sink stands for the socket's write half,
//! a channel stream for its read half, and a test session whose uploads finish when the test
//! opens their gate. Nothing sleeps; the paused clock jumps to the next timer when all is idle.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_stream::wrappers::UnboundedReceiverStream;

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

    async fn next_event(&mut self) -> Option<Event> {
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

/// The far side of the socket, and handles on the session.
struct Peer {
    frames: mpsc::UnboundedSender<Result<Message, String>>,
    sent: mpsc::UnboundedReceiver<Message>,
    gates: mpsc::UnboundedReceiver<(u8, oneshot::Sender<()>)>,
    events: mpsc::UnboundedSender<Event>,
    shutdown: CancellationToken,
    drained: Arc<AtomicBool>,
    finished: Arc<AtomicBool>,
    task: JoinHandle<Result<(), SocketError>>,
}

fn start(ping_interval: Duration, max_messages_per_sec: u32, greeting: Option<Message>) -> Peer {
    start_until(ping_interval, max_messages_per_sec, greeting, None)
}

/// [`start`] for a caller whose token expires at `expires_at`.
fn start_until(
    ping_interval: Duration,
    max_messages_per_sec: u32,
    greeting: Option<Message>,
    expires_at: Option<tokio::time::Instant>,
) -> Peer {
    let (frames, frames_rx) = mpsc::unbounded_channel();
    let (sent_tx, sent) = mpsc::unbounded_channel();
    let (gates_tx, gates) = mpsc::unbounded_channel();
    let (events, events_rx) = mpsc::unbounded_channel();
    let shutdown = CancellationToken::new();
    let drained = Arc::new(AtomicBool::new(false));
    let finished = Arc::new(AtomicBool::new(false));
    let mut session = TestSession {
        greeting,
        events: events_rx,
        gates: gates_tx,
        drained: drained.clone(),
        finished: finished.clone(),
    };
    let sink = futures_util::sink::unfold(
        sent_tx,
        |tx: mpsc::UnboundedSender<Message>, msg: Message| async move {
            tx.send(msg).map_err(|e| e.to_string())?;
            Ok::<_, String>(tx)
        },
    );
    let stream = UnboundedReceiverStream::new(frames_rx);
    let settings = Settings {
        ping_interval,
        max_messages_per_sec,
        shutdown: shutdown.clone(),
        expires_at,
    };
    let task = tokio::spawn(async move { run(sink, stream, &mut session, settings).await });
    Peer {
        frames,
        sent,
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

    /// The next message the loop sent (the paused clock runs ahead to it).
    async fn next(&mut self) -> Message {
        tokio::time::timeout(Duration::from_secs(1_000_000), self.sent.recv())
            .await
            .expect("the loop sent nothing")
            .expect("the loop ended without sending")
    }

    /// Nothing is sent for `wait`.
    async fn quiet_for(&mut self, wait: Duration) {
        if let Ok(msg) = tokio::time::timeout(wait, self.sent.recv()).await {
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
    async fn ended(mut self) -> Result<(), SocketError> {
        let result = self.task.await.expect("the loop panicked");
        assert!(self.sent.recv().await.is_none(), "sent after ending");
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
    peer.frames.send(Err("message too big".into())).unwrap();
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
    assert!(
        !peer.drained.load(Ordering::SeqCst),
        "a session close drops work"
    );
    assert!(peer.ended().await.is_ok());
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

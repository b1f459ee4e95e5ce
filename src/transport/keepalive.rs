//! Dead-peer detection for the live sockets: ping every interval; a peer that has sent nothing
//! (not even a pong) for two intervals and 500 ms is closed with
//! [`CLOSE_FELL_BEHIND`](super::close::CLOSE_FELL_BEHIND).
//!
//! Tokio's clock, so the loop's tests run on paused time.

use std::time::Duration;

use tokio::time::{Instant, Interval, MissedTickBehavior};

/// Slack past two intervals: a pong that is merely late is not a dead peer.
const SLACK: Duration = Duration::from_millis(500);

pub struct Keepalive {
    every: Duration,
    last_seen: Instant,
}

impl Keepalive {
    pub fn new(every: Duration) -> Self {
        Self {
            every,
            last_seen: Instant::now(),
        }
    }

    /// The ping timer; its first tick is one interval from now.
    pub fn timer(&self) -> Interval {
        let mut t = tokio::time::interval_at(Instant::now() + self.every, self.every);
        t.set_missed_tick_behavior(MissedTickBehavior::Delay);
        t
    }

    /// Call on every frame received from the peer.
    pub fn seen(&mut self) {
        self.last_seen = Instant::now();
    }

    /// True when the peer has been silent too long.
    pub fn expired(&self) -> bool {
        self.last_seen.elapsed() > self.every * 2 + SLACK
    }
}

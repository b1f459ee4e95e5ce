//! Rate-limited warnings: a full queue or a receiver that refuses every call would otherwise
//! log once per write. The first occurrence is logged, then at most one line per interval,
//! carrying how many happened since the previous line (the counters count every one).

use std::time::{Duration, Instant};

pub struct Throttle {
    every: Duration,
    last: Option<Instant>,
    unlogged: u64,
}

impl Throttle {
    pub fn new(every: Duration) -> Self {
        Self {
            every,
            last: None,
            unlogged: 0,
        }
    }

    /// Counts one occurrence at `now`; when it is time for a line, how many it stands for.
    pub fn hit(&mut self, now: Instant) -> Option<u64> {
        self.unlogged += 1;
        if self
            .last
            .is_some_and(|last| now.saturating_duration_since(last) < self.every)
        {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.unlogged))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_with_the_count() {
        let t0 = Instant::now();
        let every = Duration::from_secs(10);
        let mut t = Throttle::new(every);
        assert_eq!(t.hit(t0), Some(1));
        for i in 1..=5 {
            assert_eq!(t.hit(t0 + Duration::from_secs(i)), None);
        }
        assert_eq!(t.hit(t0 + every), Some(6));
        assert_eq!(t.hit(t0 + every + Duration::from_secs(1)), None);
        assert_eq!(t.hit(t0 + every * 3), Some(2));
    }
}

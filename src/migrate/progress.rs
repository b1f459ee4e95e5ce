//! Progress on stderr while documents are imported or exported: a bar (indicatif) when stderr
//! is a terminal, and otherwise a plain line at most once a second (logs and CI output stay
//! readable and small, however many documents there are), plus one when the run ends.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Least time between two plain progress lines.
const PLAIN_EVERY: Duration = Duration::from_secs(1);

pub struct Progress {
    what: &'static str,
    total: u64,
    done: u64,
    started: Instant,
    shown: Shown,
}

enum Shown {
    Bar(ProgressBar),
    Plain { last: Instant },
}

impl Progress {
    /// Progress of `total` documents, for the command `what` (`import`, `export`).
    pub fn new(what: &'static str, total: u64) -> Self {
        let now = Instant::now();
        let shown = if std::io::stderr().is_terminal() {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            let template = "{prefix}: {bar:40} {pos}/{len} documents ({elapsed}, {eta} left)";
            if let Ok(style) = ProgressStyle::with_template(template) {
                bar.set_style(style);
            }
            bar.set_prefix(what);
            Shown::Bar(bar)
        } else {
            eprintln!(
                "{what}: {total} {}",
                if total == 1 { "document" } else { "documents" }
            );
            Shown::Plain { last: now }
        };
        Self {
            what,
            total,
            done: 0,
            started: now,
            shown,
        }
    }

    /// One more document done.
    pub fn inc(&mut self) {
        self.done += 1;
        match &mut self.shown {
            Shown::Bar(bar) => bar.inc(1),
            Shown::Plain { last } => {
                let now = Instant::now();
                if due(*last, now) {
                    *last = now;
                    eprintln!("{}: {}/{} documents", self.what, self.done, self.total);
                }
            }
        }
    }

    /// The last line: how many were done, in how long. The bar is cleared, so the summary
    /// that follows stands alone.
    pub fn finish(self) {
        if let Shown::Bar(bar) = &self.shown {
            bar.finish_and_clear();
        }
        eprintln!(
            "{}: {}/{} documents in {:.1} s",
            self.what,
            self.done,
            self.total,
            self.started.elapsed().as_secs_f64()
        );
    }
}

/// Whether a plain line is due at `now`, the last one having been printed at `last`.
fn due(last: Instant, now: Instant) -> bool {
    now.saturating_duration_since(last) >= PLAIN_EVERY
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_lines_come_at_most_once_a_second() {
        let t = Instant::now();
        assert!(!due(t, t));
        assert!(!due(t, t + Duration::from_millis(999)));
        assert!(due(t, t + Duration::from_secs(1)));
        assert!(
            !due(t + Duration::from_secs(1), t),
            "a clock going back prints nothing"
        );
    }
}

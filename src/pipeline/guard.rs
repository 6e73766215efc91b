//! The dead-letter guard: stops the service instead of dead-lettering a
//! whole topic after a bad deploy or a revoked key.

use std::collections::VecDeque;

use crate::config::DeadLetterSettings;

/// The guard's counters at one moment (recent outcomes, dead letters in
/// the window, consecutive dead letters).
pub type GuardSnapshot = (VecDeque<bool>, usize, usize);

/// Stops the pipeline when too much goes to the dead-letter topic: more
/// than `max_ratio` of the last `window` records (once the window is full),
/// or `max_consecutive` in a row. A tripped guard aborts the batch, so the
/// records are not dead-lettered and are processed again after the cause is
/// fixed.
#[derive(Debug)]
pub struct DeadLetterGuard {
    settings: DeadLetterSettings,
    recent: VecDeque<bool>,
    dead_in_window: usize,
    consecutive: usize,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GuardTripped {
    #[error("{count} consecutive records were dead-lettered (dead_letter.max_consecutive = {limit}); stopping instead of dead-lettering the whole topic. Last reason: {reason}")]
    Consecutive {
        count: usize,
        limit: usize,
        reason: String,
    },
    #[error("{dead} of the last {window} records were dead-lettered (dead_letter.max_ratio = {ratio}); stopping instead of dead-lettering the whole topic. Last reason: {reason}")]
    Ratio {
        dead: usize,
        window: usize,
        ratio: f64,
        reason: String,
    },
}

impl DeadLetterGuard {
    pub fn new(settings: DeadLetterSettings) -> DeadLetterGuard {
        DeadLetterGuard {
            recent: VecDeque::with_capacity(settings.window),
            settings,
            dead_in_window: 0,
            consecutive: 0,
        }
    }

    /// Records one processed record. `dead` says whether it was
    /// dead-lettered (with `reason`).
    pub fn observe(&mut self, dead: bool, reason: &str) -> Result<(), GuardTripped> {
        if self.recent.len() == self.settings.window {
            if let Some(true) = self.recent.pop_front() {
                self.dead_in_window -= 1;
            }
        }
        self.recent.push_back(dead);
        if dead {
            self.dead_in_window += 1;
            self.consecutive += 1;
        } else {
            self.consecutive = 0;
        }
        if self.consecutive >= self.settings.max_consecutive {
            return Err(GuardTripped::Consecutive {
                count: self.consecutive,
                limit: self.settings.max_consecutive,
                reason: reason.to_string(),
            });
        }
        if self.recent.len() == self.settings.window
            && self.dead_in_window as f64 > self.settings.max_ratio * self.settings.window as f64
        {
            return Err(GuardTripped::Ratio {
                dead: self.dead_in_window,
                window: self.settings.window,
                ratio: self.settings.max_ratio,
                reason: reason.to_string(),
            });
        }
        Ok(())
    }

    /// A snapshot to restore when a batch is aborted.
    pub fn snapshot(&self) -> GuardSnapshot {
        (self.recent.clone(), self.dead_in_window, self.consecutive)
    }

    pub fn restore(&mut self, s: GuardSnapshot) {
        self.recent = s.0;
        self.dead_in_window = s.1;
        self.consecutive = s.2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(window: usize, ratio: f64, consecutive: usize) -> DeadLetterGuard {
        DeadLetterGuard::new(DeadLetterSettings {
            max_ratio: ratio,
            window,
            max_consecutive: consecutive,
        })
    }

    #[test]
    fn consecutive_dead_letters_trip_the_guard() {
        let mut g = guard(100, 0.9, 3);
        assert!(g.observe(true, "x").is_ok());
        assert!(g.observe(true, "x").is_ok());
        assert!(matches!(
            g.observe(true, "forbidden"),
            Err(GuardTripped::Consecutive { count: 3, .. })
        ));
    }

    #[test]
    fn a_good_record_resets_the_consecutive_count() {
        let mut g = guard(100, 0.9, 3);
        for _ in 0..10 {
            assert!(g.observe(true, "x").is_ok());
            assert!(g.observe(true, "x").is_ok());
            assert!(g.observe(false, "").is_ok());
        }
    }

    #[test]
    fn ratio_applies_only_over_a_full_window() {
        let mut g = guard(10, 0.5, 100);
        for i in 0..9 {
            assert!(g.observe(i % 3 != 0, "x").is_ok(), "record {i}");
        }
        assert!(matches!(
            g.observe(true, "x"),
            Err(GuardTripped::Ratio { dead: 7, .. })
        ));
    }
}

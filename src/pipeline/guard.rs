//! The dead-letter guard: stops the service instead of dead-lettering a
//! whole topic after a bad deploy or a revoked key.
//!
//! It counts only dead letters whose reason says so
//! ([`Reason::counts_for_guard`]): a provider's outage (`exhausted`) or its
//! rejection of individual users (`bad_request`, `unprocessable`) is the
//! provider's answer about those users, not a mistake of ours that stopping
//! would let a person fix. Its rules are checked on each counted dead
//! letter, so it trips on the record that crosses a limit (its batch is
//! then aborted, not committed), names that record's stage and reason, and
//! never trips on a record that was not dead-lettered.

use std::collections::VecDeque;

use crate::config::DeadLetterSettings;
use crate::core::dead_letter::{Reason, Stage};

/// The guard's counters at one moment (recent outcomes, dead letters in
/// the window, consecutive dead letters).
pub type GuardSnapshot = (VecDeque<bool>, usize, usize);

/// Stops the pipeline when too much goes to the dead-letter topic: more
/// than `max_ratio × window` of the last `window` records, or
/// `max_consecutive` in a row. A tripped guard aborts the batch, so the
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
    #[error("{count} consecutive records were dead-lettered (dead_letter.max_consecutive = {limit}); stopping instead of dead-lettering the whole topic. Last dead letter: stage {}, reason {}", .stage.as_str(), .reason.as_str())]
    Consecutive {
        count: usize,
        limit: usize,
        stage: Stage,
        reason: Reason,
    },
    #[error("{dead} of the last {window} records were dead-lettered (dead_letter.max_ratio = {ratio}); stopping instead of dead-lettering the whole topic. Last dead letter: stage {}, reason {}", .stage.as_str(), .reason.as_str())]
    Ratio {
        dead: usize,
        window: usize,
        ratio: f64,
        stage: Stage,
        reason: Reason,
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

    /// Records one processed record: `dead` is the stage and reason of its
    /// dead letter that counts for the guard, if any. Trips only on such a
    /// dead letter, the one that crosses a limit.
    pub fn observe(&mut self, dead: Option<(Stage, Reason)>) -> Result<(), GuardTripped> {
        if self.recent.len() == self.settings.window.max(1) {
            if let Some(true) = self.recent.pop_front() {
                self.dead_in_window -= 1;
            }
        }
        self.recent.push_back(dead.is_some());
        let Some((stage, reason)) = dead else {
            self.consecutive = 0;
            return Ok(());
        };
        self.dead_in_window += 1;
        self.consecutive += 1;
        if self.consecutive >= self.settings.max_consecutive {
            return Err(GuardTripped::Consecutive {
                count: self.consecutive,
                limit: self.settings.max_consecutive,
                stage,
                reason,
            });
        }
        // Counted against the whole window even before `window` records
        // were seen: the dead letters among the last `window` records are
        // these whatever came before, so the record that crosses the limit
        // is the one that trips (not a later one that fills the window).
        if self.dead_in_window as f64 > self.settings.max_ratio * self.settings.window as f64 {
            return Err(GuardTripped::Ratio {
                dead: self.dead_in_window,
                window: self.settings.window,
                ratio: self.settings.max_ratio,
                stage,
                reason,
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
    use crate::providers::Provider;

    fn guard(window: usize, ratio: f64, consecutive: usize) -> DeadLetterGuard {
        DeadLetterGuard::new(DeadLetterSettings {
            max_ratio: ratio,
            window,
            max_consecutive: consecutive,
        })
    }

    const DECODE: Option<(Stage, Reason)> = Some((Stage::Decode, Reason::MalformedJson));
    const FORBIDDEN: Option<(Stage, Reason)> =
        Some((Stage::Poll(Provider::Finbox), Reason::Forbidden));

    #[test]
    fn consecutive_dead_letters_trip_the_guard_naming_the_last_stage_and_reason() {
        let mut g = guard(100, 0.9, 3);
        assert!(g.observe(DECODE).is_ok());
        assert!(g.observe(DECODE).is_ok());
        let tripped = g.observe(FORBIDDEN).unwrap_err();
        assert!(matches!(
            tripped,
            GuardTripped::Consecutive {
                count: 3,
                stage: Stage::Poll(Provider::Finbox),
                reason: Reason::Forbidden,
                ..
            }
        ));
        assert!(
            tripped
                .to_string()
                .ends_with("Last dead letter: stage poll_finbox, reason forbidden"),
            "{tripped}"
        );
    }

    #[test]
    fn a_good_record_resets_the_consecutive_count() {
        let mut g = guard(100, 0.9, 3);
        for _ in 0..10 {
            assert!(g.observe(DECODE).is_ok());
            assert!(g.observe(DECODE).is_ok());
            assert!(g.observe(None).is_ok());
        }
    }

    #[test]
    fn the_ratio_trips_on_the_dead_letter_that_crosses_it_even_before_the_window_is_full() {
        let mut g = guard(10, 0.5, 100);
        // 5 of (at most) 10 is not more than half.
        for _ in 0..5 {
            assert!(g.observe(DECODE).is_ok());
        }
        assert!(g.observe(None).is_ok());
        // The 7th record of 10: 6 dead letters are more than half of any
        // window it ends up in.
        let tripped = g.observe(FORBIDDEN).unwrap_err();
        assert!(matches!(
            tripped,
            GuardTripped::Ratio {
                dead: 6,
                window: 10,
                reason: Reason::Forbidden,
                ..
            }
        ));
    }

    #[test]
    fn the_ratio_is_over_the_last_window_records_only() {
        let mut g = guard(10, 0.5, 100);
        for _ in 0..5 {
            assert!(g.observe(DECODE).is_ok());
        }
        for _ in 0..5 {
            assert!(g.observe(None).is_ok());
        }
        // Each of these pushes an older dead letter out of the window.
        for i in 0..5 {
            assert!(g.observe(DECODE).is_ok(), "dead letter {i}");
        }
        // This one pushes out a good record: 6 of the last 10.
        assert!(matches!(
            g.observe(DECODE),
            Err(GuardTripped::Ratio { dead: 6, .. })
        ));
    }

    #[test]
    fn records_without_dead_letters_never_trip_the_guard() {
        // As many dead letters as the ratio allows in a window not yet
        // full, then only good records: filling the window with them once
        // tripped the ratio rule on a batch without a dead letter.
        let mut g = guard(200, 0.5, 1_000);
        for i in 0..100 {
            assert!(g.observe(DECODE).is_ok(), "dead letter {i}");
        }
        for i in 0..1_000 {
            assert!(g.observe(None).is_ok(), "good record {i}");
        }
        // The 101st dead letter among 200 records trips at once.
        let mut g = guard(200, 0.5, 1_000);
        for _ in 0..100 {
            assert!(g.observe(DECODE).is_ok());
        }
        assert!(g.observe(None).is_ok());
        assert!(g.observe(DECODE).is_err());
    }

    #[test]
    fn a_restored_snapshot_undoes_an_aborted_batch() {
        let mut g = guard(200, 0.5, 3);
        assert!(g.observe(DECODE).is_ok());
        let before = g.snapshot();
        assert!(g.observe(DECODE).is_ok());
        assert!(g.observe(DECODE).is_err());
        g.restore(before);
        assert!(g.observe(DECODE).is_ok());
    }
}

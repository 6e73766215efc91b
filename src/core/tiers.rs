//! Delay tiers: which delay topic a wait goes to, and what to do with a task
//! record read back from one. Pure; the Kafka loop applies the answers.
//!
//! Every record in one tier topic waits the same length, so records in a
//! partition become due in the order they were written: the loop looks only
//! at the head record and pauses the partition until it is due. A record
//! whose task is due later than its tier is forwarded to the tier that fits
//! the rest of the wait; a remainder shorter than the smallest tier is waited
//! out by pausing (which delays the records behind it by less than that
//! smallest tier). Nothing is ever processed before its due time.

use std::time::Duration;

use crate::task::{Millis, Task, TaskDecodeError};

/// What to do with a task record read from a tier topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadAction {
    /// The record's tier wait is not over: pause the partition until then.
    NotYet { resume_at: Millis },
    /// Due: process it now.
    Process,
    /// The rest of the wait is shorter than the smallest tier: pause the
    /// partition until the task is due.
    Hold { resume_at: Millis },
    /// Send it on to tier `tier` for the rest of the wait.
    Forward { tier: usize },
}

/// What to do with one record read from a tier topic, all told: a record
/// that is not a task is poison; a task is processed, forwarded, or its
/// partition held.
#[derive(Debug)]
pub enum TierRead {
    /// Not a task record (dead-lettered as `task_decode` / `invalid_task`).
    Poison(TaskDecodeError),
    /// Due: process it now.
    Due(Task),
    /// Send it on to tier `tier` for the rest of the wait.
    Forward(Task, usize),
    /// Pause the partition until `resume_at` and read the record again then.
    Hold { resume_at: Millis },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DelayTiers {
    tiers_ms: Vec<i64>,
    /// A rest shorter than this is waited out where the record is read
    /// (held), not forwarded: the smallest tier, or longer
    /// ([`DelayTiers::holding`]).
    hold_ms: i64,
}

impl DelayTiers {
    /// `tiers` must be non-empty and strictly increasing (config validates).
    pub fn new(tiers: &[Duration]) -> DelayTiers {
        let mut tiers_ms: Vec<i64> = tiers.iter().map(|d| d.as_millis() as i64).collect();
        tiers_ms.sort_unstable();
        tiers_ms.dedup();
        if tiers_ms.is_empty() {
            tiers_ms.push(1_000);
        }
        let hold_ms = tiers_ms[0];
        DelayTiers { tiers_ms, hold_ms }
    }

    /// Holds a record whose rest is shorter than `ms` (when that is longer
    /// than the smallest tier) instead of forwarding it: a reader that
    /// keeps records due within `ms` in memory waits them out there,
    /// which saves a hop through the smallest tier (a record to write,
    /// commit and read again) per wait.
    pub fn holding(mut self, ms: i64) -> DelayTiers {
        self.hold_ms = ms.max(self.tiers_ms[0]);
        self
    }

    pub fn len(&self) -> usize {
        self.tiers_ms.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tiers_ms.is_empty()
    }

    pub fn tier_ms(&self, tier: usize) -> i64 {
        self.tiers_ms[tier.min(self.tiers_ms.len() - 1)]
    }

    /// The tier's name in topic names: `1s`, `30s`, `5m`, `1h`, `1h 30m` ->
    /// `1h30m`.
    pub fn label(&self, tier: usize) -> String {
        humantime::format_duration(Duration::from_millis(self.tier_ms(tier) as u64))
            .to_string()
            .replace(' ', "")
    }

    pub fn topic(&self, prefix: &str, tier: usize) -> String {
        format!("{prefix}.{}", self.label(tier))
    }

    /// All tier topics, in tier order.
    pub fn topics(&self, prefix: &str) -> Vec<String> {
        (0..self.len()).map(|i| self.topic(prefix, i)).collect()
    }

    /// The tier for a wait of `wait_ms`: the shortest tier at least as long
    /// as the wait when it is longer by no more than the smallest tier (the
    /// record's wait is then counted from earlier than its writing, see
    /// [`DelayTiers::since`], so it comes back when due); otherwise the
    /// largest tier not longer than the wait, or the smallest when the wait
    /// is shorter than every tier (the record is then held until due, see
    /// [`DelayTiers::on_read`]).
    ///
    /// Without the first rule a wait just short of a tier went to the tier
    /// below and was forwarded again and again: 4.9 s took four hops of
    /// 1 s, each one more record to read, write and commit, and under a
    /// burst of due users each hop's commit came later.
    pub fn route(&self, wait_ms: i64) -> usize {
        let up = self.tiers_ms.iter().position(|t| *t >= wait_ms);
        if let Some(up) = up {
            if self.tiers_ms[up] - wait_ms <= self.tiers_ms[0] {
                return up;
            }
        }
        self.tiers_ms
            .iter()
            .rposition(|t| *t <= wait_ms)
            .unwrap_or(0)
    }

    /// The timestamp of a task record written to `tier` at `now` for a
    /// task due at `due_at`: `now`, or, when the tier is longer than the
    /// wait ([`DelayTiers::route`]), that much earlier, so that its tier
    /// time is its due time.
    ///
    /// Records of one tier partition then no longer come due strictly in
    /// the order they were written: a record can be due before one written
    /// ahead of it, by at most the smallest tier (the most a wait is
    /// counted from earlier). The consume loop starts each record's work
    /// at its own due time all the same (`pipeline::waiting`), and
    /// commits in read order.
    pub fn since(&self, tier: usize, due_at: Millis, now: Millis) -> Millis {
        now.min(due_at.saturating_sub(self.tier_ms(tier)))
    }

    /// Decides about a record of tier `tier` written at `record_ts` for a
    /// task due at `due_at`, read at `now`.
    ///
    /// A task due before its tier's wait is over (a wait shorter than the
    /// smallest tier) is processed at its own due time: the records behind it
    /// become due no earlier than its tier time, so order is kept.
    pub fn on_read(
        &self,
        tier: usize,
        record_ts: Millis,
        due_at: Millis,
        now: Millis,
    ) -> ReadAction {
        if due_at <= now {
            return ReadAction::Process;
        }
        let tier_due = record_ts.saturating_add(self.tier_ms(tier));
        if now < tier_due {
            return ReadAction::NotYet {
                resume_at: tier_due.min(due_at),
            };
        }
        let rest = due_at - now;
        if rest < self.hold_ms {
            ReadAction::Hold { resume_at: due_at }
        } else {
            ReadAction::Forward {
                tier: self.route(rest),
            }
        }
    }

    /// Decides about a record of tier `tier` with value `value`, written at
    /// `written` (its timestamp; a record without one counts as written
    /// `now`), read at `now`.
    pub fn classify(
        &self,
        tier: usize,
        value: Option<&[u8]>,
        written: Option<Millis>,
        now: Millis,
    ) -> TierRead {
        let task = match value.map(Task::decode) {
            Some(Ok(t)) => t,
            Some(Err(e)) => return TierRead::Poison(e),
            None => return TierRead::Poison(TaskDecodeError::Malformed("empty value".into())),
        };
        match self.on_read(tier, written.unwrap_or(now), task.due_at, now) {
            ReadAction::Process => TierRead::Due(task),
            ReadAction::Forward { tier } => TierRead::Forward(task, tier),
            ReadAction::NotYet { resume_at } | ReadAction::Hold { resume_at } => {
                TierRead::Hold { resume_at }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn tiers() -> DelayTiers {
        DelayTiers::new(
            &["1s", "5s", "10s", "30s", "1m", "5m", "10m", "30m", "1h"]
                .map(|s| humantime::parse_duration(s).unwrap()),
        )
    }

    #[test]
    fn topic_names_use_compact_labels() {
        let t = tiers();
        assert_eq!(t.topic("d", 0), "d.1s");
        assert_eq!(t.topic("d", 4), "d.1m");
        assert_eq!(t.topic("d", 8), "d.1h");
        let odd = DelayTiers::new(&[Duration::from_secs(5400)]);
        assert_eq!(odd.label(0), "1h30m");
    }

    #[test]
    fn a_task_due_before_its_tier_time_is_processed_at_its_due_time() {
        let t = tiers();
        assert_eq!(
            t.on_read(0, 0, 300, 10),
            ReadAction::NotYet { resume_at: 300 }
        );
        assert_eq!(t.on_read(0, 0, 300, 300), ReadAction::Process);
    }

    fn task_due_at(due_at: Millis) -> Vec<u8> {
        use crate::task::{OnboardedUser, ProviderTrack, SourceRef, TASK_VERSION};
        Task {
            v: TASK_VERSION,
            user: OnboardedUser {
                event_id: "e".into(),
                user_id: "u".into(),
                finbox_customer_id: "u".into(),
                credeau_user_id: "u".into(),
                onboarded_at: 0,
            },
            origin: SourceRef {
                topic: "in".into(),
                partition: 0,
                offset: 0,
            },
            created_at: 0,
            due_at,
            finbox: ProviderTrack::pending(due_at, 10_000),
            credeau: ProviderTrack::pending(due_at, 15_000),
            replay_of: None,
        }
        .encode()
    }

    #[test]
    fn a_tier_record_that_is_not_a_task_is_poison() {
        let t = tiers();
        match t.classify(0, None, Some(0), 10) {
            TierRead::Poison(TaskDecodeError::Malformed(m)) => assert_eq!(m, "empty value"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            t.classify(0, Some(b"{not a task"), Some(0), 10),
            TierRead::Poison(_)
        ));
    }

    #[test]
    fn a_tier_record_is_processed_forwarded_or_held_by_its_due_time() {
        let t = tiers();
        let v = task_due_at(100_000);
        // Due: processed, whatever its tier.
        match t.classify(3, Some(&v), Some(0), 100_000) {
            TierRead::Due(task) => assert_eq!(task.due_at, 100_000),
            other => panic!("{other:?}"),
        }
        // Its 10 s tier wait is not over: held until then.
        assert!(matches!(
            t.classify(2, Some(&v), Some(50_000), 55_000),
            TierRead::Hold { resume_at: 60_000 }
        ));
        // Tier wait over, 40 s still to go: forwarded to the 30 s tier.
        assert!(matches!(
            t.classify(2, Some(&v), Some(50_000), 60_000),
            TierRead::Forward(_, 3)
        ));
        // Less than the smallest tier to go: held until due.
        assert!(matches!(
            t.classify(2, Some(&v), Some(50_000), 99_500),
            TierRead::Hold { resume_at: 100_000 }
        ));
        // No timestamp: counts as written now, so its tier wait starts now.
        assert!(matches!(
            t.classify(0, Some(&v), None, 10_000),
            TierRead::Hold { resume_at: 11_000 }
        ));
    }

    #[test]
    fn route_picks_largest_tier_not_longer_than_the_wait() {
        let t = tiers();
        assert_eq!(t.route(10_000), 2);
        assert_eq!(t.route(14_999), 2);
        assert_eq!(t.route(10 * 3_600_000), 8);
        assert_eq!(t.route(3_999), 0);
    }

    #[test]
    fn a_wait_just_short_of_a_tier_goes_to_it_counted_from_earlier() {
        let t = tiers();
        // 4.9 s: the 5 s tier, counted from 0.1 s before now (not four
        // hops of 1 s).
        assert_eq!(t.route(4_900), 1);
        assert_eq!(t.since(1, 10_000 + 4_900, 10_000), 9_900);
        assert_eq!(t.route(4_000), 1);
        assert_eq!(t.route(29_000), 3);
        assert_eq!(t.route(28_999), 2);
        // Shorter than the smallest tier: that tier, due on its tier time.
        assert_eq!(t.route(500), 0);
        assert_eq!(t.since(0, 10_500, 10_000), 9_500);
        // A tier not longer than the wait: counted from now.
        assert_eq!(t.since(2, 10_000 + 14_999, 10_000), 10_000);
    }

    #[test]
    fn a_reader_holding_longer_than_the_smallest_tier_holds_rests_under_it() {
        let t = tiers();
        let held = tiers().holding(2_000);
        // Read from the 5 s tier at its time with 1.5 s left: forwarded to
        // the 1 s tier by default, held by a reader that waits 2 s ahead.
        let (ts, due, now) = (0, 6_500, 5_000);
        assert_eq!(t.on_read(1, ts, due, now), ReadAction::Forward { tier: 0 });
        assert_eq!(
            held.on_read(1, ts, due, now),
            ReadAction::Hold { resume_at: due }
        );
        // 2 s or more left: forwarded either way.
        assert_eq!(
            held.on_read(1, 0, 7_000, 5_000),
            ReadAction::Forward { tier: 0 }
        );
        // Never shorter than the smallest tier.
        let short = tiers().holding(10);
        assert_eq!(
            short.on_read(1, 0, 5_900, 5_000),
            ReadAction::Hold { resume_at: 5_900 }
        );
    }

    proptest! {
        /// Simulates a task's whole journey through the tiers: it is never
        /// processed before it is due, and it is processed within one
        /// smallest-tier of its due time (plus the loop's own reaction time,
        /// zero here), in a bounded number of hops.
        #[test]
        fn a_task_is_never_processed_early_and_hops_are_bounded(
            wait in 0i64..(8 * 3_600_000),
            start in 0i64..1_000_000_000,
        ) {
            let t = tiers();
            let due = start + wait;
            let mut now = start;
            let mut tier = t.route(due - now);
            let mut written = t.since(tier, due, now);
            prop_assert!(written <= now);
            prop_assert!(now - written <= t.tier_ms(0));
            let mut hops = 1;
            loop {
                match t.on_read(tier, written, due, now) {
                    ReadAction::NotYet { resume_at } => {
                        prop_assert!(resume_at > now);
                        now = resume_at;
                    }
                    ReadAction::Hold { resume_at } => {
                        prop_assert_eq!(resume_at, due);
                        prop_assert!(due - now < 1_000);
                        now = resume_at;
                    }
                    ReadAction::Forward { tier: next } => {
                        let since = t.since(next, due, now);
                        prop_assert!(since + t.tier_ms(next) <= due);
                        prop_assert!(now - since <= t.tier_ms(0));
                        tier = next;
                        written = since;
                        hops += 1;
                    }
                    ReadAction::Process => break,
                }
            }
            prop_assert!(now >= due, "processed early: now {} due {}", now, due);
            // The model reacts instantly, so the only lateness would come
            // from the routing itself: there is none.
            prop_assert_eq!(now, due);
            prop_assert!(hops <= 30, "{} hops", hops);
            // A wait just short of a tier takes that tier alone.
            if t.tiers_ms.iter().any(|x| *x >= wait && *x - wait <= 1_000) {
                prop_assert_eq!(hops, 1);
            }
        }
    }
}

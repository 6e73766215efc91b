//! The pipeline's metrics as typed events, and the one rule for when they
//! are counted.
//!
//! What a record's processing did (the record consumed and what became of
//! it, the task due, scheduled or forwarded, how late its poll was, the
//! events published, the dead letters, the onboarding-to-combined latency)
//! is a [`Committed`] event: the worker collects them with the record's
//! outputs, and the loop counts them only once the batch's transaction has
//! committed. A batch that is aborted and processed again is therefore
//! counted once, when it commits, like its outputs. What happens on the
//! way (provider requests and retries, straggler cuts, rate-limit waits,
//! transactions and their outcome, loop iterations) is counted when it
//! happens, where it happens.

use super::Metrics;

/// Where a consumed record came from (`topic` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Input,
    Delay,
}

impl Source {
    fn as_str(self) -> &'static str {
        match self {
            Source::Input => "input",
            Source::Delay => "delay",
        }
    }
}

/// What became of a consumed record (`result` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// An input event accepted as a new task.
    Accepted,
    /// A task record whose poll was due.
    Due,
    /// A task record not due yet, moved on to a longer tier.
    Forwarded,
    /// A record that could not be read, dead-lettered.
    DeadLettered,
}

impl Fate {
    fn as_str(self) -> &'static str {
        match self {
            Fate::Accepted => "accepted",
            Fate::Due => "due",
            Fate::Forwarded => "forwarded",
            Fate::DeadLettered => "dead_lettered",
        }
    }
}

/// One thing a record's processing did, counted once its batch commits.
#[derive(Debug, Clone, PartialEq)]
pub enum Committed {
    Consumed {
        from: Source,
        fate: Fate,
    },
    /// A task read from a tier was due; `late_s` after its due time.
    TaskDue {
        tier: String,
        late_s: f64,
    },
    /// The input event's task was due at once (no tier wait to count).
    InputDue {
        late_s: f64,
    },
    TaskScheduled {
        tier: String,
    },
    TaskForwarded {
        from: String,
    },
    /// An event published on an output topic (`kind` label).
    Published {
        kind: &'static str,
    },
    /// A dead letter, by its `stage` and `reason` labels (the wire
    /// values of the dead-letter contract, `crate::core::dead_letter`).
    DeadLettered {
        stage: &'static str,
        reason: &'static str,
    },
    /// Seconds from onboarding to the combined event.
    CombinedLatency(f64),
}

impl Committed {
    /// Counts the event.
    pub fn emit(&self, m: &Metrics) {
        match self {
            Committed::Consumed { from, fate } => m
                .events_consumed
                .with_label_values(&[from.as_str(), fate.as_str()])
                .inc(),
            Committed::TaskDue { tier, late_s } => {
                m.tasks_due.with_label_values(&[tier]).inc();
                m.poll_lateness.with_label_values(&[tier]).observe(*late_s);
            }
            Committed::InputDue { late_s } => {
                m.poll_lateness
                    .with_label_values(&["input"])
                    .observe(*late_s);
            }
            Committed::TaskScheduled { tier } => m.tasks_scheduled.with_label_values(&[tier]).inc(),
            Committed::TaskForwarded { from } => m.tasks_forwarded.with_label_values(&[from]).inc(),
            Committed::Published { kind } => m.published.with_label_values(&[kind]).inc(),
            Committed::DeadLettered { stage, reason } => {
                m.dead_letters.with_label_values(&[stage, reason]).inc()
            }
            Committed::CombinedLatency(s) => m.onboarding_to_combined.observe(*s),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(m: &Metrics, line_start: &str) -> f64 {
        m.render()
            .lines()
            .find(|l| l.starts_with(line_start))
            .and_then(|l| l.rsplit_once(' '))
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0.0)
    }

    #[test]
    fn each_event_moves_its_own_metric_under_its_labels() {
        let m = Metrics::new();
        Committed::Consumed {
            from: Source::Delay,
            fate: Fate::Forwarded,
        }
        .emit(&m);
        Committed::TaskDue {
            tier: "10s".into(),
            late_s: 0.25,
        }
        .emit(&m);
        Committed::DeadLettered {
            stage: "decode",
            reason: "malformed_json",
        }
        .emit(&m);
        Committed::Published {
            kind: "insights_ready",
        }
        .emit(&m);
        assert_eq!(
            value(
                &m,
                r#"insights_events_consumed_total{result="forwarded",topic="delay"}"#
            ),
            1.0
        );
        assert_eq!(value(&m, r#"insights_tasks_due_total{tier="10s"}"#), 1.0);
        assert_eq!(
            value(&m, r#"insights_poll_lateness_seconds_sum{tier="10s"}"#),
            0.25
        );
        assert_eq!(
            value(
                &m,
                r#"insights_dead_letters_total{reason="malformed_json",stage="decode"}"#
            ),
            1.0
        );
        assert_eq!(
            value(&m, r#"insights_published_total{topic="insights_ready"}"#),
            1.0
        );
    }
}

//! The task record: the whole waiting state of one onboarded user, as it
//! travels through the delay topics. It is the only place a waiting user
//! lives, so it must be self-contained and versioned. It never holds SMS
//! bodies or secrets (those are published, not carried).

use serde::{Deserialize, Serialize};

use crate::providers::{Provider, ProviderErrorKind};

/// Unix time in milliseconds. Every time in a task is wall-clock time so a
/// task read by another process (after a crash or rebalance) means the same.
pub type Millis = i64;

pub const TASK_VERSION: u8 = 1;

/// Where a record came from, for dead-letter headers and tracing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceRef {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// The identity of the onboarding this task serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OnboardedUser {
    pub event_id: String,
    pub user_id: String,
    /// CUSTOMER_ID sent to FinBox (defaults to user_id).
    pub finbox_customer_id: String,
    /// user_id sent to Credeau (defaults to user_id).
    pub credeau_user_id: String,
    pub onboarded_at: Millis,
}

/// Final outcome of one provider for one user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Complete,
    NoData,
    NotFound,
    TimedOut,
    Failed,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Complete => "complete",
            Outcome::NoData => "no_data",
            Outcome::NotFound => "not_found",
            Outcome::TimedOut => "timed_out",
            Outcome::Failed => "failed",
        }
    }
}

/// The last error a provider gave for this user (safe text only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastError {
    pub kind: ProviderErrorKind,
    pub http_status: Option<u16>,
    pub message: String,
    pub provider_request_id: Option<String>,
    /// With `IdentityMismatch`: the id the provider's answer named.
    /// Absent in tasks written before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answered_id: Option<String>,
}

/// One provider's state within a task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProviderTrack {
    /// Polls made so far (one per scheduled visit, whatever the in-process
    /// retries inside it).
    pub polls: u32,
    pub first_poll_at: Option<Millis>,
    /// When the next poll may happen (pending only).
    pub next_poll_at: Millis,
    /// The current spacing between polls (grows with backoff).
    pub interval_ms: i64,
    /// FinBox: when `not_found` was first seen in the current streak.
    pub not_found_since: Option<Millis>,
    pub last_error: Option<LastError>,
    /// Set once the provider is terminal; never changes afterwards.
    pub done: Option<Done>,
    /// Polls in a row that ended in a retryable error (after their
    /// in-process retries); any answer resets it. Absent in tasks written
    /// before it existed, which read as 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub failed_polls: u32,
    /// Polls in a row cut short because the record was holding its batch
    /// (see `schedule.straggler_wait`); each one doubles the next poll's
    /// leash. Any answer resets it. Absent when zero.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub cut_polls: u32,
    /// The provider's `request_id` of its latest answer that was not an
    /// error (FinBox sends one with every status). Absent in older tasks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// The data problem of the final answer (FinBox `data` not in the
    /// documented shape, repaired JSON, an answer that says it is
    /// incomplete), carried into the combined event. Absent when none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_problem: Option<String>,
    /// The provider said it holds more than it sent. Absent when false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub partial: bool,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Done {
    pub outcome: Outcome,
    pub at: Millis,
    /// How many records the provider returned (predictors or SMS).
    pub items: Option<u32>,
}

impl ProviderTrack {
    pub fn pending(next_poll_at: Millis, interval_ms: i64) -> Self {
        ProviderTrack {
            polls: 0,
            first_poll_at: None,
            next_poll_at,
            interval_ms,
            not_found_since: None,
            last_error: None,
            done: None,
            failed_polls: 0,
            cut_polls: 0,
            request_id: None,
            data_problem: None,
            partial: false,
        }
    }
    pub fn is_done(&self) -> bool {
        self.done.is_some()
    }
    pub fn outcome(&self) -> Option<Outcome> {
        self.done.as_ref().map(|d| d.outcome)
    }
}

/// The waiting state of one user.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Task {
    pub v: u8,
    pub user: OnboardedUser,
    /// The input record that started this task.
    pub origin: SourceRef,
    pub created_at: Millis,
    /// When this task must next be looked at: the earliest pending poll.
    pub due_at: Millis,
    pub finbox: ProviderTrack,
    pub credeau: ProviderTrack,
    /// Set when the task was sent back by `dlq replay`; carried into the
    /// combined event so consumers can tell a superseding result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replay_of: Option<String>,
}

impl Task {
    pub fn track(&self, p: Provider) -> &ProviderTrack {
        match p {
            Provider::Finbox => &self.finbox,
            Provider::Credeau => &self.credeau,
        }
    }
    pub fn track_mut(&mut self, p: Provider) -> &mut ProviderTrack {
        match p {
            Provider::Finbox => &mut self.finbox,
            Provider::Credeau => &mut self.credeau,
        }
    }
    pub fn is_done(&self) -> bool {
        self.finbox.is_done() && self.credeau.is_done()
    }
    /// Providers whose poll is due at `now`.
    pub fn due_providers(&self, now: Millis) -> Vec<Provider> {
        Provider::ALL
            .into_iter()
            .filter(|p| {
                let t = self.track(*p);
                !t.is_done() && t.next_poll_at <= now
            })
            .collect()
    }
    /// Recomputes `due_at` from the pending providers.
    pub fn refresh_due(&mut self) {
        if let Some(d) = Provider::ALL
            .into_iter()
            .map(|p| self.track(p))
            .filter(|t| !t.is_done())
            .map(|t| t.next_poll_at)
            .min()
        {
            self.due_at = d;
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        // Serializing plain structs of strings and numbers cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Result<Task, TaskDecodeError> {
        let task: Task =
            serde_json::from_slice(bytes).map_err(|e| TaskDecodeError::Malformed(e.to_string()))?;
        if task.v != TASK_VERSION {
            return Err(TaskDecodeError::Version(task.v));
        }
        Ok(task)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TaskDecodeError {
    #[error("task record is not valid: {0}")]
    Malformed(String),
    #[error("task record version {0} is not supported (this build reads {TASK_VERSION})")]
    Version(u8),
}

#[cfg(test)]
mod tests {
    use super::*;

    pub fn sample() -> Task {
        Task {
            v: TASK_VERSION,
            user: OnboardedUser {
                event_id: "e1".into(),
                user_id: "u1".into(),
                finbox_customer_id: "u1".into(),
                credeau_user_id: "u1".into(),
                onboarded_at: 1_000,
            },
            origin: SourceRef {
                topic: "in".into(),
                partition: 0,
                offset: 7,
            },
            created_at: 1_000,
            due_at: 31_000,
            finbox: ProviderTrack::pending(31_000, 10_000),
            credeau: ProviderTrack::pending(41_000, 15_000),
            replay_of: None,
        }
    }

    #[test]
    fn task_round_trips_through_its_encoding() {
        let t = sample();
        assert_eq!(Task::decode(&t.encode()).unwrap(), t);
    }

    #[test]
    fn a_task_written_before_failed_polls_and_request_id_existed_still_decodes() {
        let t = sample();
        let mut old: serde_json::Value = serde_json::from_slice(&t.encode()).unwrap();
        let finbox = old["finbox"].as_object_mut().unwrap();
        assert!(!finbox.contains_key("failed_polls"), "zero is not written");
        finbox.remove("request_id");
        let decoded = Task::decode(&serde_json::to_vec(&old).unwrap()).unwrap();
        assert_eq!(decoded, t);

        let mut counted = sample();
        counted.finbox.failed_polls = 2;
        counted.finbox.request_id = Some("r-1".into());
        assert_eq!(Task::decode(&counted.encode()).unwrap(), counted);
    }

    #[test]
    fn unknown_version_is_rejected() {
        let mut t = sample();
        t.v = 9;
        let err = Task::decode(&t.encode()).unwrap_err();
        assert_eq!(err, TaskDecodeError::Version(9));
    }

    #[test]
    fn due_is_the_earliest_pending_poll() {
        let mut t = sample();
        t.finbox.done = Some(Done {
            outcome: Outcome::Complete,
            at: 5,
            items: Some(3),
        });
        t.refresh_due();
        assert_eq!(t.due_at, 41_000);
        assert_eq!(t.due_providers(41_000), vec![Provider::Credeau]);
    }
}

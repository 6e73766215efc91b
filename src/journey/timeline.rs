//! A user's journey built from the records the service wrote for them:
//! the task snapshots in the delay tiers (each one a scheduled poll), the
//! published events, and the dead letters, in time order, with what
//! happens next. Only identities, times, outcomes, HTTP statuses and
//! counts are taken from the records: never an SMS body.

use serde::Serialize;
use serde_json::Value;

use crate::dlq::inspect::rfc3339;
use crate::dlq::read::DlqRecord;
use crate::events::dead_letter::headers as h;
use crate::providers::Provider;
use crate::task::{ProviderTrack, Task};

/// What a topic the journey reads is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A delay tier: index and label (`10s`).
    Tier(usize),
    FinboxPredictors,
    SmsExtraction,
    InsightsReady,
    DeadLetter,
}

/// One record of the user's, with where it was read.
#[derive(Debug, Clone)]
pub struct Found {
    pub role: Role,
    pub tier_label: Option<String>,
    pub topic: String,
    pub record: DlqRecord,
}

/// One provider's state in a scheduled poll.
#[derive(Debug, Clone, Serialize)]
pub struct TrackView {
    pub state: String,
    pub polls: u32,
    /// Pending: when this provider is next asked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_poll_at: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "step", rename_all = "snake_case")]
pub enum StepKind {
    /// A task record written to a delay tier: the next poll is scheduled.
    Scheduled {
        tier: String,
        due_at: Option<String>,
        finbox: TrackView,
        credeau: TrackView,
    },
    /// What a provider answered, as the next task record (or the final
    /// event) shows it.
    ProviderOutcome {
        provider: String,
        poll: u32,
        result: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        http_status: Option<u16>,
    },
    /// An event published for the user.
    Published { event: String, detail: String },
    /// A dead letter of the user's.
    DeadLetter {
        stage: String,
        reason: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        provider: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        http_status: Option<String>,
        message: String,
    },
}

#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub at: Option<String>,
    #[serde(skip)]
    pub at_ms: i64,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    #[serde(flatten)]
    pub kind: StepKind,
}

#[derive(Debug, Clone, Serialize)]
pub struct Onboarding {
    pub event_id: String,
    pub onboarded_at: Option<String>,
    pub input_topic: String,
    pub input_partition: i32,
    pub input_offset: i64,
}

/// Where the user is now and what happens next.
#[derive(Debug, Clone, Serialize)]
pub struct Next {
    /// `waiting`, `complete`, `dead_lettered` or `not_found`.
    pub state: String,
    pub summary: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_poll_due: Option<String>,
    /// Per pending provider: when it is given up (`timed_out`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub deadlines: Vec<(String, String)>,
}

/// The per-provider deadlines, counted from onboarding.
#[derive(Debug, Clone, Copy)]
pub struct Deadlines {
    pub finbox_ms: i64,
    pub credeau_ms: i64,
}

fn time(ms: i64) -> Option<String> {
    rfc3339(ms)
}

fn view(t: &ProviderTrack) -> TrackView {
    TrackView {
        state: t
            .outcome()
            .map(|o| o.as_str().to_string())
            .unwrap_or_else(|| "pending".into()),
        polls: t.polls,
        next_poll_at: if t.is_done() {
            None
        } else {
            time(t.next_poll_at)
        },
    }
}

/// What one provider's track says about its latest poll, when it made one
/// since `before`.
fn outcome_since(
    before: Option<&ProviderTrack>,
    now: &ProviderTrack,
) -> Option<(String, Option<u16>)> {
    let (polls, failed, cut, done) = before
        .map(|b| (b.polls, b.failed_polls, b.cut_polls, b.is_done()))
        .unwrap_or((0, 0, 0, false));
    if now.polls <= polls && now.is_done() == done {
        return None;
    }
    let status = now.last_error.as_ref().and_then(|e| e.http_status);
    Some(match (&now.done, &now.last_error) {
        (Some(d), _) => {
            let items = d.items.map(|n| format!(", {n} items")).unwrap_or_default();
            let err = now
                .last_error
                .as_ref()
                .filter(|_| d.outcome.as_str() == "failed")
                .map(|e| format!(" ({})", e.kind.as_str()))
                .unwrap_or_default();
            (format!("{}{err}{items}", d.outcome.as_str()), status)
        }
        (None, Some(e)) if now.failed_polls > failed => (
            format!("error {}, asked again later", e.kind.as_str()),
            status,
        ),
        (None, _) if now.cut_polls > cut => (
            "no answer in time (cut short), asked again later".into(),
            None,
        ),
        (None, _) => ("not ready yet".into(), None),
    })
}

/// The facts of a published event that are safe to show.
fn published_detail(role: Role, value: Option<&[u8]>) -> (String, String) {
    let json: Option<Value> = value.and_then(|v| serde_json::from_slice(v).ok());
    let bytes = value.map(<[u8]>::len).unwrap_or(0);
    let field = |k: &str| json.as_ref().map(|j| j[k].clone()).unwrap_or(Value::Null);
    match role {
        Role::FinboxPredictors => ("finbox_predictors".into(), format!("{bytes} bytes")),
        // The entries are SMS: only the part numbers and counts are shown.
        Role::SmsExtraction => (
            "sms_extraction".into(),
            match (field("part"), field("parts"), field("total_sms")) {
                (Value::Number(p), Value::Number(n), Value::Number(t)) => {
                    format!("part {p} of {n}, {t} SMS in all, {bytes} bytes")
                }
                _ => format!("{bytes} bytes"),
            },
        ),
        Role::InsightsReady => {
            let side = |p: &str| {
                let o = field(p);
                let mut s = format!("{p} {}", o["outcome"].as_str().unwrap_or("?"));
                if let Some(k) = o["error_kind"].as_str() {
                    s.push_str(&format!(" ({k})"));
                }
                if let Some(st) = o["http_status"].as_u64() {
                    s.push_str(&format!(" HTTP {st}"));
                }
                s
            };
            let detail = if json.is_some() {
                format!("{}, {}", side("finbox"), side("credeau"))
            } else {
                format!("{bytes} bytes")
            };
            ("insights_ready".into(), detail)
        }
        _ => (String::new(), String::new()),
    }
}

/// The user's journey from their records.
pub struct Journey {
    pub onboarding: Option<Onboarding>,
    pub steps: Vec<Step>,
    pub next: Next,
}

/// Builds the journey of `found` (the user's records, any order) as of `now`.
pub fn build(found: &[Found], deadlines: Deadlines, now: i64) -> Journey {
    let mut found: Vec<&Found> = found.iter().collect();
    // Written in one transaction, records share a time: the insights-ready
    // event, which closes the journey, goes last among them.
    found.sort_by_key(|f| {
        (
            f.record.timestamp.unwrap_or(0),
            f.role == Role::InsightsReady,
            f.record.offset,
        )
    });
    let mut steps = Vec::new();
    let mut onboarding = None;
    let mut last_task: Option<Task> = None;
    let mut last_scheduled: Option<Task> = None;
    let mut last_task_dead_letter_at: Option<i64> = None;
    let mut ready_at: Option<i64> = None;
    for f in found {
        let r = &f.record;
        let at_ms = r.timestamp.unwrap_or(0);
        let step = |kind| Step {
            at: time(at_ms),
            at_ms,
            topic: f.topic.clone(),
            partition: r.partition,
            offset: r.offset,
            kind,
        };
        let task = match f.role {
            Role::Tier(_) => r.value.as_deref().and_then(|v| Task::decode(v).ok()),
            Role::DeadLetter if r.header(h::REPLAY_TARGET) == Some("task") => {
                r.value.as_deref().and_then(|v| Task::decode(v).ok())
            }
            _ => None,
        };
        if let Some(t) = &task {
            if onboarding.is_none() {
                onboarding = Some(Onboarding {
                    event_id: t.user.event_id.clone(),
                    onboarded_at: time(t.user.onboarded_at),
                    input_topic: t.origin.topic.clone(),
                    input_partition: t.origin.partition,
                    input_offset: t.origin.offset,
                });
            }
            for p in Provider::ALL {
                let before = last_task.as_ref().map(|b| b.track(p));
                if let Some((result, http_status)) = outcome_since(before, t.track(p)) {
                    steps.push(step(StepKind::ProviderOutcome {
                        provider: p.as_str().into(),
                        poll: t.track(p).polls,
                        result,
                        http_status,
                    }));
                }
            }
        }
        match f.role {
            Role::Tier(_) => {
                if let Some(t) = task.clone() {
                    steps.push(step(StepKind::Scheduled {
                        tier: f.tier_label.clone().unwrap_or_default(),
                        due_at: time(t.due_at),
                        finbox: view(&t.finbox),
                        credeau: view(&t.credeau),
                    }));
                    last_scheduled = Some(t);
                }
            }
            Role::DeadLetter => {
                if task.is_some() {
                    last_task_dead_letter_at = Some(at_ms);
                }
                let get = |k: &str| r.header(k).map(str::to_string);
                steps.push(step(StepKind::DeadLetter {
                    stage: get(h::STAGE).unwrap_or_else(|| "-".into()),
                    reason: r.reason().to_string(),
                    provider: get(h::PROVIDER),
                    http_status: get(h::HTTP_STATUS),
                    message: get(h::ERROR_MESSAGE).unwrap_or_default(),
                }));
            }
            role => {
                let (event, detail) = published_detail(role, r.value.as_deref());
                if role == Role::InsightsReady {
                    ready_at = Some(at_ms);
                }
                steps.push(step(StepKind::Published { event, detail }));
            }
        }
        if let Some(t) = task {
            last_task = Some(t);
        }
    }
    let next = next(
        &steps,
        last_scheduled.as_ref(),
        last_task_dead_letter_at,
        ready_at,
        deadlines,
        now,
    );
    Journey {
        onboarding,
        steps,
        next,
    }
}

fn next(
    steps: &[Step],
    last_scheduled: Option<&Task>,
    last_task_dead_letter_at: Option<i64>,
    ready_at: Option<i64>,
    deadlines: Deadlines,
    now: i64,
) -> Next {
    let plain = |state: &str, summary: String| Next {
        state: state.into(),
        summary,
        next_poll_due: None,
        deadlines: vec![],
    };
    if steps.is_empty() {
        return plain("not_found", "no record of this user in the window".into());
    }
    if let Some(at) = ready_at {
        return plain(
            "complete",
            format!(
                "insights ready published at {}: nothing more will happen",
                time(at).unwrap_or_default()
            ),
        );
    }
    let Some(task) = last_scheduled else {
        return plain(
            "dead_lettered",
            "dead-lettered before any poll was scheduled (see the dead letter above; `dlq replay` sends it back once fixed)".into(),
        );
    };
    let scheduled_at = steps
        .iter()
        .rev()
        .find(|s| matches!(s.kind, StepKind::Scheduled { .. }))
        .map(|s| s.at_ms)
        .unwrap_or(0);
    if last_task_dead_letter_at.is_some_and(|d| d >= scheduled_at) {
        return plain(
            "dead_lettered",
            "the task was dead-lettered and is not scheduled again (`dlq replay` sends it back once fixed)".into(),
        );
    }
    let mut deadline_list = Vec::new();
    for (p, ms) in [
        (Provider::Finbox, deadlines.finbox_ms),
        (Provider::Credeau, deadlines.credeau_ms),
    ] {
        if !task.track(p).is_done() {
            let at = task.user.onboarded_at.saturating_add(ms);
            deadline_list.push((p.as_str().to_string(), time(at).unwrap_or_default()));
        }
    }
    let due = task.due_at;
    let summary = if due + 60_000 < now {
        format!(
            "waiting: the next poll was due at {} and has not happened yet (is the service running and keeping up?)",
            time(due).unwrap_or_default()
        )
    } else {
        format!(
            "waiting: next poll due at {}",
            time(due).unwrap_or_default()
        )
    };
    Next {
        state: "waiting".into(),
        summary,
        next_poll_due: time(due),
        deadlines: deadline_list,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::{OnboardedUser, SourceRef, TASK_VERSION};

    const DEADLINES: Deadlines = Deadlines {
        finbox_ms: 3_600_000,
        credeau_ms: 7_200_000,
    };

    fn task(due_at: i64) -> Task {
        Task {
            v: TASK_VERSION,
            user: OnboardedUser {
                event_id: "ev-1".into(),
                user_id: "u-1".into(),
                finbox_customer_id: "u-1".into(),
                credeau_user_id: "u-1".into(),
                onboarded_at: 1_000,
            },
            origin: SourceRef {
                topic: "in".into(),
                partition: 2,
                offset: 7,
            },
            created_at: 1_000,
            due_at,
            finbox: ProviderTrack::pending(due_at, 10_000),
            credeau: ProviderTrack::pending(due_at, 10_000),
            replay_of: None,
        }
    }

    fn found(role: Role, offset: i64, ts: i64, value: Vec<u8>, headers: &[(&str, &str)]) -> Found {
        Found {
            role,
            tier_label: matches!(role, Role::Tier(_)).then(|| "10s".to_string()),
            topic: "t".into(),
            record: DlqRecord {
                partition: 0,
                offset,
                timestamp: Some(ts),
                key: Some("u-1".into()),
                headers: headers
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                raw_key: Some(b"u-1".to_vec()),
                value: Some(value),
            },
        }
    }

    #[test]
    fn a_scheduled_task_is_waiting_with_its_next_poll_and_deadlines() {
        let mut polled = task(20_000);
        polled.finbox.polls = 1;
        let j = build(
            &[
                found(Role::Tier(0), 0, 5_000, task(10_000).encode(), &[]),
                found(Role::Tier(0), 1, 12_000, polled.encode(), &[]),
            ],
            DEADLINES,
            15_000,
        );
        assert_eq!(j.onboarding.as_ref().unwrap().input_offset, 7);
        assert_eq!(j.next.state, "waiting");
        assert_eq!(j.next.next_poll_due, rfc3339(20_000));
        assert_eq!(
            j.next.deadlines,
            vec![
                ("finbox".to_string(), rfc3339(3_601_000).unwrap()),
                ("credeau".to_string(), rfc3339(7_201_000).unwrap())
            ]
        );
        let outcomes: Vec<&StepKind> = j
            .steps
            .iter()
            .map(|s| &s.kind)
            .filter(|k| matches!(k, StepKind::ProviderOutcome { .. }))
            .collect();
        assert!(
            matches!(outcomes.as_slice(), [StepKind::ProviderOutcome { provider, poll: 1, result, .. }]
                if provider == "finbox" && result == "not ready yet"),
            "{outcomes:?}"
        );
        // Long past its due time: flagged.
        let late = build(
            &[found(Role::Tier(0), 0, 5_000, task(10_000).encode(), &[])],
            DEADLINES,
            10_000 + 61_000,
        );
        assert!(
            late.next.summary.contains("has not happened yet"),
            "{}",
            late.next.summary
        );
    }

    #[test]
    fn a_dead_lettered_onboarding_event_and_an_empty_window_say_so() {
        let j = build(
            &[found(
                Role::DeadLetter,
                0,
                5_000,
                b"{".to_vec(),
                &[(h::STAGE, "decode"), (h::ERROR_CLASS, "malformed_json")],
            )],
            DEADLINES,
            6_000,
        );
        assert_eq!(j.next.state, "dead_lettered");
        assert!(j.onboarding.is_none());
        assert_eq!(build(&[], DEADLINES, 0).next.state, "not_found");
    }

    #[test]
    fn an_sms_event_is_shown_by_its_counts_only() {
        let value = serde_json::json!({
            "part": 1, "parts": 2, "total_sms": 3,
            "entries": [{"sms_body": "your OTP is 123456"}],
        });
        let j = build(
            &[found(
                Role::SmsExtraction,
                0,
                5_000,
                value.to_string().into_bytes(),
                &[],
            )],
            DEADLINES,
            6_000,
        );
        let shown = serde_json::to_string(&j.steps).unwrap();
        assert!(shown.contains("part 1 of 2, 3 SMS in all"), "{shown}");
        assert!(!shown.contains("OTP"), "{shown}");
    }
}

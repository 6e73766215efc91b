//! Processing one consumed record into the records to produce for it: the
//! shell around the pure core. It polls the providers (concurrently for one
//! user), applies their answers, and builds the next task record, the output
//! events and the dead letters. It never touches Kafka itself: the loop
//! produces what it returns, inside the batch's transaction.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::core::dead_letter::{self, Reason, ReplayTarget};
use crate::core::tiers::{DelayTiers, TierRead};
use crate::core::{self, Answer, Effects, Policies};
use crate::events::{DecodeError, InputDecoder, OutputEncoder};
use crate::metrics::events::{Committed, Fate, Source};
use crate::metrics::Metrics;
use crate::pipeline::deadletter::{DeadLetter, Stage};
use crate::providers::budget::{self, RecordClock};
use crate::providers::{CredeauApi, FinboxApi, Provider};
use crate::task::{Millis, Outcome, SourceRef, Task, TaskDecodeError};

pub fn now_ms() -> Millis {
    chrono::Utc::now().timestamp_millis()
}

/// Where a consumed record came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    Input,
    Tier(usize),
}

/// A consumed record, detached from the consumer.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub kind: SourceKind,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub timestamp: Option<Millis>,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
}

/// What kind of record an output is, for metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutKind {
    FinboxPredictors,
    SmsExtraction,
    InsightsReady,
    Delay(usize),
    DeadLetter,
}

impl OutKind {
    pub fn label(self) -> &'static str {
        match self {
            OutKind::FinboxPredictors => "finbox_predictors",
            OutKind::SmsExtraction => "sms_extraction",
            OutKind::InsightsReady => "insights_ready",
            OutKind::Delay(_) => "delay",
            OutKind::DeadLetter => "dead_letter",
        }
    }
}

/// A record to produce.
#[derive(Debug, Clone)]
pub struct OutRecord {
    pub kind: OutKind,
    pub topic: String,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
}

impl OutRecord {
    /// Drops the key, value and headers once they were handed to the
    /// producer; the kind and topic stay for what is counted on commit.
    pub fn release_payload(&mut self) {
        self.key = None;
        self.value = None;
        self.headers = Vec::new();
    }
}

/// Everything one consumed record leads to.
#[derive(Debug, Default)]
pub struct Processed {
    pub outputs: Vec<OutRecord>,
    /// The dead-letter reasons among the outputs (for the guard).
    pub dead_letters: Vec<(Stage, Reason)>,
    /// Providers that ended `failed` while processing this record. Their
    /// dead letter is written when the user's task finishes (so it holds the
    /// final state and a replay re-asks only the failed provider), but the
    /// guard counts them at once.
    pub failures: Vec<(Stage, Reason)>,
    /// What to count once the batch commits (`metrics::events`).
    pub counted: Vec<Committed>,
    /// The outputs' bytes, counted against `schedule.max_in_flight_bytes`
    /// while they wait for their transaction.
    pub held: Option<HeldBytes>,
}

impl Processed {
    /// Bytes of the outputs (key, value, headers).
    pub fn output_bytes(&self) -> usize {
        self.outputs
            .iter()
            .map(|o| record_size(&o.key, &o.value, &o.headers))
            .sum()
    }
}

/// What a record weighs in memory against `schedule.max_in_flight_bytes`:
/// its key, value and headers.
pub fn record_size(
    key: &Option<Vec<u8>>,
    value: &Option<Vec<u8>>,
    headers: &[(String, Vec<u8>)],
) -> usize {
    key.as_ref().map_or(0, Vec::len)
        + value.as_ref().map_or(0, Vec::len)
        + headers
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum::<usize>()
}

/// Bytes counted in a shared total for as long as this lives.
#[derive(Debug)]
pub struct HeldBytes {
    bytes: usize,
    total: Arc<AtomicUsize>,
}

impl HeldBytes {
    pub fn new(bytes: usize, total: Arc<AtomicUsize>) -> HeldBytes {
        total.fetch_add(bytes, Ordering::Relaxed);
        HeldBytes { bytes, total }
    }
}

impl Drop for HeldBytes {
    fn drop(&mut self) {
        self.total.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

impl Processed {
    fn count(&mut self, event: Committed) {
        self.counted.push(event);
    }

    /// Every event this record's processing leads to once committed: its
    /// own, one per event published, one per dead letter.
    pub fn committed(&self) -> impl Iterator<Item = Committed> + '_ {
        let published = self.outputs.iter().filter_map(|o| match o.kind {
            OutKind::Delay(_) | OutKind::DeadLetter => None,
            k => Some(Committed::Published { kind: k.label() }),
        });
        let dead = self
            .dead_letters
            .iter()
            .map(|(stage, reason)| Committed::DeadLettered {
                stage: *stage,
                reason: *reason,
            });
        self.counted.iter().cloned().chain(published).chain(dead)
    }
}

/// A failure that is not the record's fault (the schema registry is down):
/// the batch is retried instead of dead-lettering anything.
#[derive(Debug, thiserror::Error)]
#[error("transient failure: {0}")]
pub struct Transient(pub String);

/// The work to do for one consumed record, decided by the loop.
#[derive(Debug)]
pub enum Job {
    /// An onboarded event from the input topic.
    Input(Incoming),
    /// A task that is due now.
    Due(Incoming, Task),
    /// A task that came back before its due time: send it on.
    Forward(Incoming, Task, usize),
    /// A delay-topic record that is not a task.
    PoisonTask(Incoming, TaskDecodeError),
}

/// Topic names the worker writes to.
#[derive(Debug, Clone)]
pub struct OutputTopics {
    pub finbox_predictors: String,
    pub sms_extraction: String,
    pub combined: String,
    pub dead_letter: String,
    pub tiers: Vec<String>,
}

pub struct Worker {
    pub finbox: Arc<dyn FinboxApi>,
    pub credeau: Arc<dyn CredeauApi>,
    pub decoder: Arc<InputDecoder>,
    pub encoder: Arc<OutputEncoder>,
    pub policies: Policies,
    pub tiers: DelayTiers,
    pub topics: OutputTopics,
    pub max_message_bytes: usize,
    /// How long one record's provider calls may take, retries included
    /// (`schedule.record_budget`). A call still unanswered then counts as a
    /// timed-out poll, and the core schedules the next one through a delay
    /// tier, so no record holds its batch longer.
    pub record_budget: std::time::Duration,
    /// How long a record may wait on a provider before the loop cuts it
    /// short (`schedule.straggler_wait`;
    /// zero: never), doubled for every poll cut short in a row.
    pub straggler_wait: std::time::Duration,
    pub metrics: Arc<Metrics>,
}

/// Header naming the kind of event on output topics.
pub const EVENT_TYPE_HEADER: &str = "insights.event_type";

impl Worker {
    /// Processes one record; its provider calls run on `clock` (the record
    /// budget, and the loop's cut of a straggler).
    pub async fn process(&self, job: Job, clock: Arc<RecordClock>) -> Result<Processed, Transient> {
        let mut out = Processed::default();
        match job {
            Job::Input(rec) => match self.decoder.decode(rec.value.as_deref()).await {
                Ok(event) => {
                    let now = now_ms();
                    let origin = SourceRef {
                        topic: rec.topic.clone(),
                        partition: rec.partition,
                        offset: rec.offset,
                    };
                    let task = core::start(event.into_user(), origin, now, &self.policies);
                    out.count(Committed::Consumed {
                        from: Source::Input,
                        fate: Fate::Accepted,
                    });
                    self.advance(task, &rec, now, &clock, &mut out).await;
                }
                Err(e) => match dead_letter::decode_failed(&e) {
                    None => return Err(Transient(e.to_string())),
                    Some(reason) => {
                        out.count(Committed::Consumed {
                            from: Source::Input,
                            fate: Fate::DeadLettered,
                        });
                        tracing::warn!(
                            topic = %rec.topic, partition = rec.partition, offset = rec.offset,
                            reason = reason.as_str(), error = %e, "input event dead-lettered"
                        );
                        self.dead_letter_input(&rec, Stage::Decode, reason, &e, &mut out);
                    }
                },
            },
            Job::Due(rec, task) => {
                let now = now_ms();
                let late_s = (now - task.due_at).max(0) as f64 / 1000.0;
                out.count(match rec.kind {
                    SourceKind::Tier(t) => Committed::TaskDue {
                        tier: self.tiers.label(t),
                        late_s,
                    },
                    SourceKind::Input => Committed::InputDue { late_s },
                });
                out.count(Committed::Consumed {
                    from: Source::Delay,
                    fate: Fate::Due,
                });
                self.advance(task, &rec, now, &clock, &mut out).await;
            }
            Job::Forward(rec, task, tier) => {
                if let SourceKind::Tier(from) = rec.kind {
                    out.count(Committed::TaskForwarded {
                        from: self.tiers.label(from),
                    });
                }
                out.count(Committed::Consumed {
                    from: Source::Delay,
                    fate: Fate::Forwarded,
                });
                out.outputs.push(self.delay_record(&task, tier));
            }
            Job::PoisonTask(rec, e) => {
                out.count(Committed::Consumed {
                    from: Source::Delay,
                    fate: Fate::DeadLettered,
                });
                tracing::warn!(topic = %rec.topic, partition = rec.partition, offset = rec.offset, error = %e, "task record dead-lettered");
                self.dead_letter_input(&rec, Stage::TaskDecode, Reason::InvalidTask, &e, &mut out);
            }
        }
        Ok(out)
    }

    /// Polls whatever is due for this task, applies the answers, and emits
    /// the outputs plus the next task record (or the combined event).
    async fn advance(
        &self,
        mut task: Task,
        rec: &Incoming,
        now: Millis,
        clock: &Arc<RecordClock>,
        out: &mut Processed,
    ) {
        let due = task.due_providers(now);
        // The time the decisions below were made at: the next wait is routed
        // from it, so a 10 s spacing goes to the 10 s tier in one hop rather
        // than to a shorter tier plus forwards (it can never run early: the
        // tier wait starts later still, when the record is written).
        let mut decided_at = now;
        if !due.is_empty() {
            let poll_finbox = due.contains(&Provider::Finbox);
            let poll_credeau = due.contains(&Provider::Credeau);
            let finbox_id = task.user.finbox_customer_id.clone();
            let credeau_id = task.user.credeau_user_id.clone();
            let budget = self.record_budget;
            let leash = core::straggler_leash(&task, &due, self.straggler_wait, budget);
            clock.begin(budget, leash, core::cuts_in_a_row(&task, &due));
            let (fa, ca) = tokio::join!(
                async {
                    if poll_finbox {
                        let call = self.finbox.fetch_predictors(&finbox_id);
                        Some(within_budget(Provider::Finbox, clock, budget, call).await)
                    } else {
                        None
                    }
                },
                async {
                    if poll_credeau {
                        let call = self.credeau.fetch_sms(&credeau_id);
                        Some(within_budget(Provider::Credeau, clock, budget, call).await)
                    } else {
                        None
                    }
                }
            );
            let answered_at = now_ms();
            decided_at = answered_at;
            // `None`: not polled; `Some(None)`: cut short.
            match fa {
                Some(Some(a)) => {
                    let fx = core::apply(&mut task, Answer::Finbox(a), answered_at, &self.policies);
                    self.effects(&mut task, fx, answered_at, out);
                }
                Some(None) => self.cut_short(&mut task, Provider::Finbox, answered_at),
                None => {}
            }
            match ca {
                Some(Some(a)) => {
                    let fx =
                        core::apply(&mut task, Answer::Credeau(a), answered_at, &self.policies);
                    self.effects(&mut task, fx, answered_at, out);
                }
                Some(None) => self.cut_short(&mut task, Provider::Credeau, answered_at),
                None => {}
            }
        }
        let now = now_ms();
        if task.is_done() {
            self.dead_letter_failed_providers(&task, rec, out);
            match self.encoder.insights_ready(&task, now) {
                Ok(value) => {
                    out.outputs.push(self.output(
                        OutKind::InsightsReady,
                        &self.topics.combined,
                        &task,
                        value,
                        vec![],
                    ));
                    out.count(Committed::CombinedLatency(
                        (now - task.user.onboarded_at).max(0) as f64 / 1000.0,
                    ));
                }
                Err(e) => {
                    // The combined event is built from our own task state; if
                    // it cannot be encoded the task itself is dead-lettered so
                    // nothing is lost silently.
                    let dl = task_dead_letter(
                        &task,
                        rec,
                        Stage::Publish,
                        Reason::EncodeFailed,
                        &e.to_string(),
                    );
                    self.push_dead_letter(dl, out);
                }
            }
        } else {
            let tier = self.tiers.route(task.due_at - decided_at);
            out.count(Committed::TaskScheduled {
                tier: self.tiers.label(tier),
            });
            out.outputs.push(self.delay_record(&task, tier));
        }
    }

    /// A poll cut short while its record held the batch: polled again
    /// when due.
    fn cut_short(&self, task: &mut Task, provider: Provider, now: Millis) {
        self.metrics
            .stragglers_cut
            .with_label_values(&[provider.as_str()])
            .inc();
        tracing::debug!(
            provider = provider.as_str(),
            user_id = %task.user.user_id,
            "poll cut short: the record was holding its batch; polled again when due"
        );
        core::cut_short(task, provider, now, &self.policies);
    }

    fn effects(&self, task: &mut Task, fx: Effects, now: Millis, out: &mut Processed) {
        if let Some(insights) = fx.finbox_insights {
            match self.encoder.finbox_predictors(task, &insights, now) {
                Ok(value) => out.outputs.push(self.output(
                    OutKind::FinboxPredictors,
                    &self.topics.finbox_predictors,
                    task,
                    value,
                    vec![],
                )),
                Err(e) => self.fail_publish(task, Provider::Finbox, &e, out),
            }
        }
        if let Some(sms) = fx.sms {
            match self
                .encoder
                .sms_extraction(task, &sms, now, self.max_message_bytes)
            {
                Ok(parts) => {
                    let n = parts.len();
                    for (i, value) in parts.into_iter().enumerate() {
                        let headers = vec![
                            (
                                "insights.part".to_string(),
                                (i + 1).to_string().into_bytes(),
                            ),
                            ("insights.parts".to_string(), n.to_string().into_bytes()),
                        ];
                        out.outputs.push(self.output(
                            OutKind::SmsExtraction,
                            &self.topics.sms_extraction,
                            task,
                            value,
                            headers,
                        ));
                    }
                }
                Err(e) => self.fail_publish(task, Provider::Credeau, &e, out),
            }
        }
        if let Some(f) = fx.failure {
            let (stage, reason) = f.stage_reason();
            tracing::warn!(
                provider = %f.provider, reason = reason.as_str(), http_status = ?f.error.http_status,
                provider_request_id = ?f.error.provider_request_id,
                error = %f.error, "provider failed for a user; dead-lettered when the user's task ends"
            );
            out.failures.push((stage, reason));
        }
    }

    /// One dead letter per provider that ended `failed`, written with the
    /// task's final state.
    fn dead_letter_failed_providers(&self, task: &Task, rec: &Incoming, out: &mut Processed) {
        for p in Provider::ALL {
            let track = task.track(p);
            if track.outcome() != Some(Outcome::Failed) {
                continue;
            }
            let Some(err) = &track.last_error else {
                continue;
            };
            let (stage, reason) = dead_letter::provider_failed(p, err.kind);
            let mut dl = task_dead_letter(task, rec, stage, reason, &err.message);
            dl.attempts = track.polls;
            dl.provider = Some(p);
            dl.http_status = err.http_status;
            dl.provider_request_id = err.provider_request_id.clone();
            dl.answered_id = err.answered_id.clone();
            self.push_dead_letter(dl, out);
        }
    }

    /// An output that cannot be encoded (an SMS entry larger than a record):
    /// the provider ends as failed and the task is dead-lettered.
    fn fail_publish(
        &self,
        task: &mut Task,
        p: Provider,
        e: &crate::events::EncodeError,
        out: &mut Processed,
    ) {
        // Only a size is fixed by `topics.max_message_bytes`: anything else
        // has its own reason (`publish/encode_failed`).
        let kind = match e {
            crate::events::EncodeError::TooLarge { .. } => {
                crate::providers::ProviderErrorKind::OutputTooLarge
            }
            _ => crate::providers::ProviderErrorKind::OutputUnencodable,
        };
        let msg = &e.to_string();
        let failure = core::fail_publish(task, p, now_ms(), kind, msg);
        tracing::warn!(provider = %p, error = msg, "output cannot be published; dead-lettered when the user's task ends");
        out.failures.push(failure);
    }

    fn dead_letter_input(
        &self,
        rec: &Incoming,
        stage: Stage,
        reason: Reason,
        error: &dyn std::fmt::Display,
        out: &mut Processed,
    ) {
        let mut dl = record_dead_letter(rec, stage, reason, &error.to_string());
        dl.replay_target = dead_letter::record_replay_target(stage);
        self.push_dead_letter(dl, out);
    }

    fn push_dead_letter(&self, dl: DeadLetter, out: &mut Processed) {
        out.dead_letters.push((dl.stage, dl.reason));
        out.outputs.push(OutRecord {
            kind: OutKind::DeadLetter,
            topic: self.topics.dead_letter.clone(),
            key: dl.key.clone(),
            headers: dl.headers(),
            value: dl.value,
        });
    }

    fn delay_record(&self, task: &Task, tier: usize) -> OutRecord {
        OutRecord {
            kind: OutKind::Delay(tier),
            topic: self.topics.tiers[tier.min(self.topics.tiers.len() - 1)].clone(),
            key: Some(task.user.user_id.as_bytes().to_vec()),
            value: Some(task.encode()),
            headers: vec![],
        }
    }

    fn output(
        &self,
        kind: OutKind,
        topic: &str,
        task: &Task,
        value: Vec<u8>,
        mut headers: Vec<(String, Vec<u8>)>,
    ) -> OutRecord {
        headers.push((
            EVENT_TYPE_HEADER.to_string(),
            kind.label().as_bytes().to_vec(),
        ));
        headers.push((
            "insights.event_id".to_string(),
            task.user.event_id.as_bytes().to_vec(),
        ));
        OutRecord {
            kind,
            topic: topic.to_string(),
            key: Some(task.user.user_id.as_bytes().to_vec()),
            value: Some(value),
            headers,
        }
    }
}

/// Runs one provider call on the record's clock: its in-process retries
/// see the deadline and stop rather than sleep past it, a call still
/// running at the deadline is cut off and reported as a timeout (polled
/// again when due), and a call the loop cuts short because the record
/// holds its batch ends with `None` (polled again when due, with a longer
/// leash).
async fn within_budget<T>(
    provider: Provider,
    clock: &Arc<RecordClock>,
    budget: std::time::Duration,
    call: impl std::future::Future<Output = Result<T, crate::providers::ProviderError>>,
) -> Option<Result<T, crate::providers::ProviderError>> {
    let deadline = clock
        .deadline()
        .unwrap_or_else(|| tokio::time::Instant::now() + budget);
    let scoped = budget::RECORD.scope(clock.clone(), call);
    tokio::select! {
        // A retry's sleep ends with the failed attempt's error when the
        // record is cut: that answer is taken first.
        biased;
        r = tokio::time::timeout_at(deadline, scoped) => Some(match r {
            Ok(r) => r,
            Err(_) => Err(crate::providers::http::error(
                provider,
                crate::providers::ProviderErrorKind::Timeout,
                None,
                format!(
                    "no answer within the record budget ({}, schedule.record_budget); polled again when due",
                    humantime::format_duration(budget)
                ),
            )),
        }),
        _ = clock.cut_off() => None,
    }
}

/// A dead letter of the consumed record itself (its key, value and headers),
/// not replayable until the caller says how.
fn record_dead_letter(rec: &Incoming, stage: Stage, reason: Reason, message: &str) -> DeadLetter {
    DeadLetter {
        key: rec.key.clone(),
        value: rec.value.clone(),
        stage,
        reason,
        message: message.to_string(),
        original_topic: rec.topic.clone(),
        original_partition: rec.partition,
        original_offset: rec.offset,
        original_timestamp: rec.timestamp,
        attempts: 1,
        provider: None,
        http_status: None,
        provider_request_id: None,
        answered_id: None,
        user_id: None,
        event_id: None,
        replay_target: ReplayTarget::None,
        failed_at: now_ms(),
        original_headers: rec.headers.clone(),
    }
}

/// A dead letter whose value is the task record (replayed as a task).
fn task_dead_letter(
    task: &Task,
    rec: &Incoming,
    stage: Stage,
    reason: Reason,
    message: &str,
) -> DeadLetter {
    DeadLetter {
        key: Some(task.user.user_id.as_bytes().to_vec()),
        value: Some(task.encode()),
        user_id: Some(task.user.user_id.clone()),
        event_id: Some(task.user.event_id.clone()),
        replay_target: ReplayTarget::Task,
        original_headers: vec![],
        ..record_dead_letter(rec, stage, reason, message)
    }
}

/// Decides what to do with a record from a delay tier (synchronously, in the
/// consume loop): hold its partition, forward it, or process it.
pub enum TierDecision {
    Hold { resume_at: Millis },
    Job(Box<Job>),
}

pub fn classify_tier_record(
    tiers: &DelayTiers,
    tier: usize,
    rec: Incoming,
    now: Millis,
) -> TierDecision {
    let job = match tiers.classify(tier, rec.value.as_deref(), rec.timestamp, now) {
        TierRead::Poison(e) => Job::PoisonTask(rec, e),
        TierRead::Due(task) => Job::Due(rec, task),
        TierRead::Forward(task, tier) => Job::Forward(rec, task, tier),
        TierRead::Hold { resume_at } => return TierDecision::Hold { resume_at },
    };
    TierDecision::Job(Box::new(job))
}

impl From<DecodeError> for Transient {
    fn from(e: DecodeError) -> Self {
        Transient(e.to_string())
    }
}

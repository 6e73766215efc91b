//! Processing one consumed record into the records to produce for it: the
//! shell around the pure core. It polls the providers (concurrently for one
//! user), applies their answers, and builds the next task record, the output
//! events and the dead letters. It never touches Kafka itself: the loop
//! produces what it returns, inside the batch's transaction.

use std::sync::Arc;

use crate::core::dead_letter::{self, Reason, ReplayTarget, Stage};
use crate::core::tiers::{DelayTiers, TierRead};
use crate::core::{self, Answer, Effects, Policies};
use crate::events::DeadLetter;
use crate::events::{DecodeError, InputDecoder, OutputEncoder};
use crate::metrics::events::{Committed, Fate, Source};
use crate::metrics::Metrics;
use crate::pipeline::parked::{Call, ParkedCalls, Polled};
use crate::pipeline::record::{
    Incoming, Job, OutKind, OutRecord, Processed, SourceKind, Transient,
};
use crate::providers::budget::RecordClock;
use crate::providers::call::{self, PollOutcome};
use crate::providers::{CredeauApi, FinboxApi, Provider};
use crate::task::{Millis, Outcome, SourceRef, Task};

pub fn now_ms() -> Millis {
    chrono::Utc::now().timestamp_millis()
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
    /// (`schedule.record_budget`). A call still running then ends as
    /// [`call::run`] says, and the core schedules the next poll through a
    /// delay tier, so no record holds its batch longer.
    pub record_budget: std::time::Duration,
    /// How long a record may wait on a provider before the loop cuts it
    /// short (`schedule.straggler_wait`; zero: never); its call is then
    /// parked for the user's next poll.
    pub straggler_wait: std::time::Duration,
    /// Calls of records cut short, still running for their user's next
    /// poll.
    pub parked: ParkedCalls,
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
                Err(e) => match e.dead_letter_reason() {
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
                out.outputs.push(self.delay_record(&task, tier, now_ms()));
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

    /// Polls the task's due providers, has the core settle what they
    /// answered, carries out its plan, and ends the task (the combined
    /// event) or schedules its next wait.
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
            let results = self.poll(&task, &due, clock).await;
            decided_at = now_ms();
            let plan = core::settle(&mut task, results, decided_at, &self.policies);
            self.carry_out(&mut task, plan, decided_at, out);
        }
        self.conclude(task, rec, decided_at, out);
    }

    /// Calls the due providers of one user at once, within the record's
    /// budget and leash.
    async fn poll(
        &self,
        task: &Task,
        due: &[Provider],
        clock: &Arc<RecordClock>,
    ) -> Vec<(Provider, core::PollResult)> {
        let finbox_id = task.user.finbox_customer_id.clone();
        let credeau_id = task.user.credeau_user_id.clone();
        clock.begin(
            self.record_budget,
            core::straggler_leash(self.straggler_wait, self.record_budget),
        );
        let (finbox, credeau) = tokio::join!(
            async {
                if !due.contains(&Provider::Finbox) {
                    return None;
                }
                let (api, id) = (self.finbox.clone(), finbox_id.clone());
                let call = async move { api.fetch_predictors(&id).await };
                let start = || self.start(Provider::Finbox, clock, call, Answer::Finbox);
                Some(self.call(Provider::Finbox, &finbox_id, clock, start).await)
            },
            async {
                if !due.contains(&Provider::Credeau) {
                    return None;
                }
                let (api, id) = (self.credeau.clone(), credeau_id.clone());
                let call = async move { api.fetch_sms(&id).await };
                let start = || self.start(Provider::Credeau, clock, call, Answer::Credeau);
                Some(
                    self.call(Provider::Credeau, &credeau_id, clock, start)
                        .await,
                )
            }
        );
        [(Provider::Finbox, finbox), (Provider::Credeau, credeau)]
            .into_iter()
            .filter_map(|(p, polled)| polled.map(|polled| (p, polled.into())))
            .collect()
    }

    /// Carries out what the core decided: the events to publish and the
    /// failures of each answer, the polls cut short counted.
    fn carry_out(&self, task: &mut Task, plan: core::Plan, now: Millis, out: &mut Processed) {
        for fx in plan.effects {
            self.effects(task, fx, now, out);
        }
        for provider in plan.cut {
            self.metrics
                .stragglers_cut
                .with_label_values(&[provider.as_str()])
                .inc();
            tracing::debug!(
                provider = provider.as_str(),
                user_id = %task.user.user_id,
                "poll cut short: the record was holding its batch; its call is parked for the next poll"
            );
        }
    }

    /// A task done gets its combined event (and its failed providers'
    /// dead letters); one still waiting goes to the delay tier its next
    /// poll falls in, counted from `decided_at`.
    fn conclude(&self, task: Task, rec: &Incoming, decided_at: Millis, out: &mut Processed) {
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
            out.outputs.push(self.delay_record(&task, tier, decided_at));
        }
    }

    /// Starts `call` on the record's clock (`providers::call`), spawned so
    /// that it can outlive the record's turn in its batch; `answer` makes
    /// its result the provider's [`Answer`].
    fn start<T, F>(
        &self,
        provider: Provider,
        clock: &Arc<RecordClock>,
        call: F,
        answer: fn(Result<T, crate::providers::ProviderError>) -> Answer,
    ) -> Call
    where
        T: Send + 'static,
        F: std::future::Future<Output = Result<T, crate::providers::ProviderError>>
            + Send
            + 'static,
    {
        let (log, run) = call::start(provider, clock, self.record_budget, call);
        let handle = tokio::spawn(async move {
            match run.await {
                PollOutcome::Answered(r) => Polled::Answered(answer(r)),
                PollOutcome::NotSent => Polled::NotSent,
                PollOutcome::Cut => Polled::Unanswered,
            }
        });
        Call { handle, log }
    }

    /// One provider call of a record: the call parked for this user by an
    /// earlier cut if there is one (its answer, or the rest of the wait for
    /// it, without asking the provider again), else the one `start`
    /// starts. When the loop cuts the record short first, a call that has
    /// sent a request is parked, still running, for the next poll
    /// ([`Polled::Parked`]); one still waiting for our own rate-limit
    /// permit is dropped and was no poll ([`Polled::NotSent`]).
    async fn call(
        &self,
        provider: Provider,
        id: &str,
        clock: &Arc<RecordClock>,
        start: impl FnOnce() -> Call,
    ) -> Polled {
        let deadline = clock
            .deadline()
            .unwrap_or_else(|| tokio::time::Instant::now() + self.record_budget);
        let (mut call, resumed) = match self.parked.take(provider, id) {
            Some(call) => (call, true),
            None => (start(), false),
        };
        // A call taken back from an earlier cut keeps its own record's
        // clock; the wait for it counts on this record's, so the loop can
        // cut this record short too.
        let _resumed_wait = resumed.then(|| (clock.waiting(), clock.awaiting_answer()));
        tokio::select! {
            // An answer that is there is taken before a cut.
            biased;
            joined = &mut call.handle => joined.unwrap_or_else(|e| {
                Polled::Answered(answer_of(provider, crate::providers::http::error(
                    provider,
                    crate::providers::ProviderErrorKind::Timeout,
                    None,
                    format!("the provider call ended without an answer ({e}); polled again when due"),
                )))
            }),
            _ = clock.cut_off() => {
                if call.log.sent() == 0 {
                    call.handle.abort();
                    Polled::NotSent
                } else {
                    self.parked.park(provider, id, call, deadline);
                    Polled::Parked
                }
            }
        }
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
            timestamp: None,
        });
    }

    /// A task record for tier `tier`, written for a wait that began at
    /// `now` (its timestamp is [`DelayTiers::since`]).
    fn delay_record(&self, task: &Task, tier: usize, now: Millis) -> OutRecord {
        OutRecord {
            kind: OutKind::Delay(tier),
            topic: self.topics.tiers[tier.min(self.topics.tiers.len() - 1)].clone(),
            key: Some(task.user.user_id.as_bytes().to_vec()),
            value: Some(task.encode()),
            headers: vec![],
            timestamp: Some(self.tiers.since(tier, task.due_at, now)),
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
            timestamp: None,
        }
    }
}

/// A failed call as `provider`'s answer.
fn answer_of(provider: Provider, e: crate::providers::ProviderError) -> Answer {
    match provider {
        Provider::Finbox => Answer::Finbox(Err(e)),
        Provider::Credeau => Answer::Credeau(Err(e)),
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
/// consume loop): wait for it to be due (the record is handed back), forward
/// it, or process it.
pub enum TierDecision {
    Hold { rec: Incoming, resume_at: Millis },
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
        TierRead::Hold { resume_at } => return TierDecision::Hold { rec, resume_at },
    };
    TierDecision::Job(Box::new(job))
}

impl From<DecodeError> for Transient {
    fn from(e: DecodeError) -> Self {
        Transient(e.to_string())
    }
}

//! The pure decision core: from (task, what a provider just answered, now,
//! policy) to what happens next. No I/O, no clocks: the Kafka loop feeds it
//! and carries out its decisions, and property tests cover its state space.

pub mod dead_letter;
pub mod tiers;

use std::time::Duration;

use crate::providers::{
    CredeauAnswer, FinboxAnswer, FinboxInsights, Provider, ProviderError, ProviderErrorKind,
    SmsExtraction,
};
use crate::task::{
    Done, LastError, Millis, OnboardedUser, Outcome, ProviderTrack, SourceRef, Task, TASK_VERSION,
};
use dead_letter::{Reason, Stage};

pub use crate::config::{PollPolicy, FINBOX_MIN_POLL_INTERVAL};

/// The polling policies of both providers.
#[derive(Debug, Clone, PartialEq)]
pub struct Policies {
    pub finbox: PollPolicy,
    pub credeau: PollPolicy,
}

impl Policies {
    pub fn get(&self, p: Provider) -> &PollPolicy {
        match p {
            Provider::Finbox => &self.finbox,
            Provider::Credeau => &self.credeau,
        }
    }
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The smallest spacing allowed between two polls of a provider.
fn min_interval_ms(p: Provider, policy: &PollPolicy) -> i64 {
    let floor = match p {
        Provider::Finbox => ms(FINBOX_MIN_POLL_INTERVAL),
        Provider::Credeau => 1_000,
    };
    ms(policy.poll_interval).max(floor)
}

/// A new task for an onboarded user read from the input topic.
pub fn start(user: OnboardedUser, origin: SourceRef, now: Millis, policies: &Policies) -> Task {
    let track = |p: Provider| {
        let policy = policies.get(p);
        ProviderTrack::pending(
            user.onboarded_at.saturating_add(ms(policy.initial_delay)),
            min_interval_ms(p, policy),
        )
    };
    let mut task = Task {
        v: TASK_VERSION,
        finbox: track(Provider::Finbox),
        credeau: track(Provider::Credeau),
        user,
        origin,
        created_at: now,
        due_at: now,
        replay_of: None,
    };
    task.refresh_due();
    task
}

/// What one provider answered during one poll.
#[derive(Debug, Clone)]
pub enum Answer {
    Finbox(Result<FinboxAnswer, ProviderError>),
    Credeau(Result<CredeauAnswer, ProviderError>),
}

impl Answer {
    pub fn provider(&self) -> Provider {
        match self {
            Answer::Finbox(_) => Provider::Finbox,
            Answer::Credeau(_) => Provider::Credeau,
        }
    }
}

/// Why a provider ended as `failed` and must be dead-lettered.
#[derive(Debug, Clone, PartialEq)]
pub struct ProviderFailure {
    pub provider: Provider,
    pub error: ProviderError,
    /// True when the provider kept failing until the deadline or until
    /// `max_failed_polls` polls in a row had failed (exhausted retries),
    /// false for an answer that is never retryable.
    pub exhausted: bool,
}

impl ProviderFailure {
    /// The stage and reason the failure is counted under at once (by the
    /// dead-letter guard) and dead-lettered with when the task ends.
    pub fn stage_reason(&self) -> (Stage, Reason) {
        dead_letter::provider_failed(self.provider, self.error.kind)
    }
}

/// The effects of applying one answer.
#[derive(Debug, Default)]
pub struct Effects {
    pub finbox_insights: Option<FinboxInsights>,
    pub sms: Option<SmsExtraction>,
    pub failure: Option<ProviderFailure>,
}

/// Applies one provider's answer to the task at `now`. Terminal providers
/// are never changed (an answer for one is ignored).
pub fn apply(task: &mut Task, answer: Answer, now: Millis, policies: &Policies) -> Effects {
    let provider = answer.provider();
    let policy = policies.get(provider).clone();
    let deadline_at = task.user.onboarded_at.saturating_add(ms(policy.deadline));
    let mut effects = Effects::default();
    let track = task.track_mut(provider);
    if track.is_done() {
        return effects;
    }
    track.polls = track.polls.saturating_add(1);
    track.first_poll_at.get_or_insert(now);
    // Answered, even with an error: no longer a run of cut polls.
    track.cut_polls = 0;
    let at = When {
        now,
        deadline_at,
        policy: &policy,
    };
    match answer {
        Answer::Finbox(Ok(a)) => {
            answered(track);
            if let Some(id) = a.request_id() {
                track.request_id = Some(id.to_owned());
            }
            effects.finbox_insights = finbox_answered(track, a, &at);
        }
        Answer::Credeau(Ok(a)) => {
            answered(track);
            effects.sms = credeau_answered(track, a, &at);
        }
        Answer::Finbox(Err(error)) | Answer::Credeau(Err(error)) => {
            effects.failure = failed(track, provider, error, &at);
        }
    }
    task.refresh_due();
    effects
}

/// When an answer is applied: now, the provider's deadline and policy.
struct When<'a> {
    now: Millis,
    deadline_at: Millis,
    policy: &'a PollPolicy,
}

impl When<'_> {
    fn finish(&self, track: &mut ProviderTrack, outcome: Outcome, items: Option<u32>) {
        track.done = Some(Done {
            outcome,
            at: self.now,
            items,
        });
    }

    fn schedule(&self, provider: Provider, track: &mut ProviderTrack, hint_ms: i64) {
        schedule(
            provider,
            track,
            self.policy,
            self.now,
            hint_ms,
            self.deadline_at,
        );
    }
}

/// A provider that answered (not with an error): its failures in a row are
/// over.
fn answered(track: &mut ProviderTrack) {
    track.last_error = None;
    track.failed_polls = 0;
}

/// FinBox answered: its insights when complete (to publish).
fn finbox_answered(
    track: &mut ProviderTrack,
    answer: FinboxAnswer,
    at: &When<'_>,
) -> Option<FinboxInsights> {
    match answer {
        FinboxAnswer::Complete(insights) => {
            let n = u32::try_from(insights.predictors.len()).unwrap_or(u32::MAX);
            at.finish(track, Outcome::Complete, Some(n));
            track.data_problem = insights.data_problem.clone();
            return Some(insights);
        }
        FinboxAnswer::NoData { .. } => at.finish(track, Outcome::NoData, Some(0)),
        FinboxAnswer::NotFound { .. } => {
            let since = *track.not_found_since.get_or_insert(at.now);
            let grace = at.policy.not_found_grace.map(ms).unwrap_or(0);
            if at.now.saturating_sub(since) >= grace {
                at.finish(track, Outcome::NotFound, None);
            } else {
                at.schedule(Provider::Finbox, track, 0);
            }
        }
        FinboxAnswer::InProgress { suggested_wait, .. } => {
            track.not_found_since = None;
            at.schedule(Provider::Finbox, track, suggested_wait.map(ms).unwrap_or(0));
        }
    }
    None
}

/// Credeau answered: its SMS when it had any (to publish).
fn credeau_answered(
    track: &mut ProviderTrack,
    answer: CredeauAnswer,
    at: &When<'_>,
) -> Option<SmsExtraction> {
    match answer {
        CredeauAnswer::Data(sms) => {
            let n = u32::try_from(sms.entries.len()).unwrap_or(u32::MAX);
            at.finish(track, Outcome::Complete, Some(n));
            track.data_problem = sms.data_problem.clone();
            track.partial = sms.partial;
            Some(sms)
        }
        CredeauAnswer::Empty => {
            at.schedule(Provider::Credeau, track, 0);
            None
        }
    }
}

/// A provider's error: kept as its last error; a retryable one is polled
/// again (until `max_failed_polls` in a row or its deadline), any other
/// ends it `failed`. The failure to dead-letter when it ended so.
fn failed(
    track: &mut ProviderTrack,
    provider: Provider,
    error: ProviderError,
    at: &When<'_>,
) -> Option<ProviderFailure> {
    track.last_error = Some(LastError {
        kind: error.kind,
        http_status: error.http_status,
        message: error.message.clone(),
        provider_request_id: error.provider_request_id.clone(),
        answered_id: error.answered_id.clone(),
    });
    if !error.is_retryable() {
        at.finish(track, Outcome::Failed, None);
        return Some(ProviderFailure {
            provider,
            error,
            exhausted: false,
        });
    }
    track.failed_polls = track.failed_polls.saturating_add(1);
    let budget_spent = at
        .policy
        .max_failed_polls
        .is_some_and(|max| track.failed_polls >= max);
    if budget_spent {
        // The provider's own advice after its retries ("if the issue
        // persists, please contact support"): stop asking.
        at.finish(track, Outcome::Failed, None);
    } else {
        at.schedule(provider, track, error.retry_after.map(ms).unwrap_or(0));
    }
    (track.outcome() == Some(Outcome::Failed)).then_some(ProviderFailure {
        provider,
        error,
        exhausted: true,
    })
}

/// What one poll of a due provider brought.
// Moved once per poll into `settle`: boxing the answer would allocate for
// every poll to save nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum PollResult {
    /// The provider answered, or failed (its last answer).
    Answered(Answer),
    /// Cut short, or unanswered when the call's budget ran out: nothing
    /// learnt ([`cut_short`]).
    Cut,
    /// No request was sent ([`not_sent`]).
    NotSent,
}

/// What a poll leads to, for the worker to carry out in one pass: the
/// effects of each answer (events to publish, failures to dead-letter)
/// and the providers cut short.
#[derive(Debug, Default)]
pub struct Plan {
    pub effects: Vec<Effects>,
    pub cut: Vec<Provider>,
}

/// Applies one poll's results to the task at `now`, all at once.
pub fn settle(
    task: &mut Task,
    results: Vec<(Provider, PollResult)>,
    now: Millis,
    policies: &Policies,
) -> Plan {
    let mut plan = Plan::default();
    for (provider, result) in results {
        match result {
            PollResult::Answered(answer) => plan.effects.push(apply(task, answer, now, policies)),
            PollResult::Cut => {
                cut_short(task, provider, now, policies);
                plan.cut.push(provider);
            }
            PollResult::NotSent => not_sent(task, provider, now, policies),
        }
    }
    plan
}

/// A poll cut short because its record was holding its batch (its call
/// parked), or unanswered when its call's budget ran out: no answer came,
/// so nothing is learnt; the provider is polled again when due (as after
/// an empty answer). Terminal providers are never changed.
pub fn cut_short(task: &mut Task, provider: Provider, now: Millis, policies: &Policies) {
    let policy = policies.get(provider).clone();
    let deadline_at = task.user.onboarded_at.saturating_add(ms(policy.deadline));
    let track = task.track_mut(provider);
    if track.is_done() {
        return;
    }
    // The request goes on (parked): it counts as a poll when its answer
    // is applied, not here.
    track.first_poll_at.get_or_insert(now);
    track.cut_polls = track.cut_polls.saturating_add(1);
    schedule(provider, track, &policy, now, 0, deadline_at);
    task.refresh_due();
}

/// How soon a provider whose call sent nothing is asked again.
pub const NOT_SENT_RETRY: Duration = Duration::from_secs(1);

/// A call that sent no request: it waited for our own rate-limit permit
/// until its record was cut or its budget ran out. The provider was not
/// asked, so nothing is counted (no poll, no failed poll, no cut, no
/// longer spacing): it is asked again [`NOT_SENT_RETRY`] from `now`, or
/// ends as [`schedule`] ends it once its deadline has passed. Terminal
/// providers are never changed.
pub fn not_sent(task: &mut Task, provider: Provider, now: Millis, policies: &Policies) {
    let policy = policies.get(provider);
    let deadline_at = task.user.onboarded_at.saturating_add(ms(policy.deadline));
    let track = task.track_mut(provider);
    if track.is_done() {
        return;
    }
    if now >= deadline_at {
        schedule(provider, track, policy, now, 0, deadline_at);
    } else {
        let next = now.saturating_add(ms(NOT_SENT_RETRY));
        track.next_poll_at = track.next_poll_at.max(next.min(deadline_at.max(now)));
    }
    task.refresh_due();
}

/// How long a record may wait on providers while it holds its batch
/// before it is cut short (its call is parked and taken back by the next
/// poll, so the leash need not grow for a slow provider to be heard):
/// `wait`, or `None` when it is zero or not below `budget` (the record
/// budget then bounds the call, and an unanswered call is a timeout).
pub fn straggler_leash(
    wait: std::time::Duration,
    budget: std::time::Duration,
) -> Option<std::time::Duration> {
    (!wait.is_zero() && wait < budget).then_some(wait)
}

/// An output of provider `p` that cannot be published (an SMS entry larger
/// than a record): the provider ends `failed` at `now` with `message` as its
/// last error, so the task is dead-lettered when it ends and a replay
/// reopens only this provider. Returns the stage and reason the failure is
/// counted under.
pub fn fail_publish(
    task: &mut Task,
    p: Provider,
    now: Millis,
    kind: ProviderErrorKind,
    message: &str,
) -> (Stage, Reason) {
    let track = task.track_mut(p);
    track.done = Some(Done {
        outcome: Outcome::Failed,
        at: now,
        items: None,
    });
    track.last_error = Some(LastError {
        kind,
        http_status: None,
        message: message.to_string(),
        provider_request_id: None,
        answered_id: None,
    });
    dead_letter::provider_failed(p, kind)
}

/// Schedules the next poll no sooner than the current spacing (and `hint`),
/// grows the spacing, and ends the provider when the deadline has passed:
/// `failed` if it was still failing, `not_found` if FinBox still did not
/// know the user, `timed_out` otherwise. The last poll happens at the
/// deadline itself.
fn schedule(
    provider: Provider,
    track: &mut ProviderTrack,
    policy: &PollPolicy,
    now: Millis,
    hint_ms: i64,
    deadline_at: Millis,
) {
    if now >= deadline_at {
        let outcome = if track.last_error.is_some() {
            Outcome::Failed
        } else if track.not_found_since.is_some() {
            Outcome::NotFound
        } else {
            Outcome::TimedOut
        };
        track.done = Some(Done {
            outcome,
            at: now,
            items: None,
        });
        return;
    }
    let floor = min_interval_ms(provider, policy);
    let interval = track.interval_ms.max(floor);
    // A provider's asked-for wait is honoured up to the larger of the
    // spacing cap and its retry cap: never cut to the spacing cap alone.
    let hint_cap = ms(policy.max_poll_interval)
        .max(ms(policy.max_retry_after))
        .max(floor);
    let wait = interval.max(hint_ms.min(hint_cap));
    // Never poll before the floor, but do make a last poll at the deadline
    // rather than giving up early.
    let next = now.saturating_add(wait);
    track.next_poll_at = if next > deadline_at {
        deadline_at.max(now.saturating_add(floor))
    } else {
        next
    };
    let grown = (interval as f64 * policy.backoff_multiplier).round() as i64;
    track.interval_ms = grown.clamp(floor, ms(policy.max_poll_interval).max(floor));
}

#[cfg(test)]
mod tests;

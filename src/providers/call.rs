//! One provider call of a record, as the record's clock sees it: how many
//! requests it actually sent, the last answer the provider gave, whether
//! an answer's body is arriving, and how the call ends when the loop cuts
//! the record short or the record budget runs out.
//!
//! Why a log beside the call: the call's own future is dropped when the
//! record is cut or its budget is spent, and what it learnt until then
//! must not be lost with it. Waiting for our own rate-limit permit sent
//! nothing, so such a call is no poll at all ([`PollOutcome::NotSent`]);
//! a call whose last request is still unanswered at the deadline ends with
//! the provider's last answer (a 503 stays a 503), not with our cut. A body
//! that is arriving is never cut by either: the transport cuts a body that
//! stalls ([`crate::providers::http`]).

use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use super::budget::{RecordClock, RECORD};
use super::{Provider, ProviderError, ProviderErrorKind};

/// What one call of a record has done so far.
#[derive(Debug, Default)]
pub struct CallLog {
    /// Requests sent (a rate-limit permit taken and the request issued).
    sent: AtomicU32,
    /// When the latest request was sent.
    last_sent_at: Mutex<Option<tokio::time::Instant>>,
    /// The provider's last failed answer (or transport failure).
    last_error: Mutex<Option<ProviderError>>,
    /// Answer bodies being read now.
    streaming: AtomicU32,
    /// Woken when a body has been read (or abandoned).
    body_done: Notify,
}

impl CallLog {
    /// Requests this call has sent.
    pub fn sent(&self) -> u32 {
        self.sent.load(Ordering::Acquire)
    }

    fn last_error(&self) -> Option<ProviderError> {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn is_streaming(&self) -> bool {
        self.streaming.load(Ordering::Acquire) > 0
    }

    /// Resolves once the record is cut short or `deadline` has passed, and
    /// no body of this call is arriving.
    async fn stopped(&self, clock: &RecordClock, deadline: tokio::time::Instant) -> Stop {
        let why = tokio::select! {
            _ = clock.cut_off() => Stop::Cut,
            _ = tokio::time::sleep_until(deadline) => Stop::Deadline,
        };
        loop {
            let done = self.body_done.notified();
            tokio::pin!(done);
            done.as_mut().enable();
            if !self.is_streaming() {
                return why;
            }
            done.await;
        }
    }
}

enum Stop {
    Cut,
    Deadline,
}

tokio::task_local! {
    /// The log of the provider call being made (set by [`run`]).
    static CALL: Arc<CallLog>;
}

/// Counts a request as sent by the current call (its permit taken).
pub(crate) fn note_sent() {
    let _ = CALL.try_with(|log| {
        log.sent.fetch_add(1, Ordering::AcqRel);
        *log.last_sent_at.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(tokio::time::Instant::now());
    });
}

/// Keeps the current call's last failed answer.
pub(crate) fn note_failed(error: &ProviderError) {
    let _ = CALL.try_with(|log| {
        *log.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(error.clone());
    });
}

/// Marks an answer's body as arriving until the guard is dropped: neither
/// the loop's cut nor the record budget ends the call meanwhile.
pub(crate) fn body_arriving() -> Option<BodyGuard> {
    let log = CALL.try_with(Arc::clone).ok()?;
    log.streaming.fetch_add(1, Ordering::AcqRel);
    let clock = RECORD.try_with(Arc::clone).ok();
    if let Some(clock) = &clock {
        clock.body_started();
    }
    Some(BodyGuard { log, clock })
}

/// An answer body being read (see [`body_arriving`]).
#[derive(Debug)]
pub struct BodyGuard {
    log: Arc<CallLog>,
    clock: Option<Arc<RecordClock>>,
}

impl Drop for BodyGuard {
    fn drop(&mut self) {
        if let Some(clock) = &self.clock {
            clock.body_ended();
        }
        self.log.streaming.fetch_sub(1, Ordering::AcqRel);
        self.log.body_done.notify_waiters();
    }
}

/// How one provider call of a record ended.
#[derive(Debug)]
pub enum PollOutcome<T> {
    /// The provider answered, or failed: `Err` holds its last answer (a
    /// request still unanswered when the budget ran out is a timeout).
    Answered(Result<T, ProviderError>),
    /// The loop cut the record short while a request was out, or the
    /// budget ran out with the latest request out for less than half of
    /// it (its permit came late): no answer, nothing learnt, asked again
    /// when due.
    Cut,
    /// No request was sent: the call waited for our own rate-limit permit
    /// until the record was cut or its budget ran out. Not a poll.
    NotSent,
}

/// Runs one provider call on the record's clock: its retries see the
/// record's deadline and stop rather than sleep past it; at the deadline
/// (or when the loop cuts the record) the call ends as the [`CallLog`]
/// says, unless a body is arriving, which is let finish.
pub async fn run<T>(
    provider: Provider,
    clock: &Arc<RecordClock>,
    budget: Duration,
    call: impl Future<Output = Result<T, ProviderError>>,
) -> PollOutcome<T> {
    let deadline = clock
        .deadline()
        .unwrap_or_else(|| tokio::time::Instant::now() + budget);
    let log = Arc::new(CallLog::default());
    let scoped = RECORD.scope(clock.clone(), CALL.scope(log.clone(), call));
    let why = tokio::select! {
        // A retry's sleep ends with the failed attempt's error when the
        // record is cut, and a body read to its end is an answer: the
        // call's own result is taken first.
        biased;
        r = scoped => return PollOutcome::Answered(r),
        why = log.stopped(clock, deadline) => why,
    };
    let sent = log.sent();
    if sent == 0 {
        return PollOutcome::NotSent;
    }
    let out_for = log
        .last_sent_at
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .map(|at| at.elapsed())
        .unwrap_or_default();
    match (why, log.last_error()) {
        (Stop::Cut, _) => PollOutcome::Cut,
        (Stop::Deadline, Some(mut last)) => {
            last.attempts = sent;
            PollOutcome::Answered(Err(last))
        }
        // A request sent late in the budget (its permit came late) had no
        // fair chance to be answered: not the provider's timeout.
        (Stop::Deadline, None) if out_for < budget / 2 => PollOutcome::Cut,
        (Stop::Deadline, None) => {
            let mut e = super::http::error(
                provider,
                ProviderErrorKind::Timeout,
                None,
                format!(
                    "no answer within the record budget ({}, schedule.record_budget); polled again when due",
                    humantime::format_duration(budget)
                ),
            );
            e.attempts = sent;
            PollOutcome::Answered(Err(e))
        }
    }
}

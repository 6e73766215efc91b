//! One provider call of a record, as the record's clock sees it: how many
//! requests it actually sent, the last answer the provider gave, whether
//! an answer's body is arriving, and how the call ends when the loop cuts
//! the record short or the record budget runs out.
//!
//! Why a log beside the call: the call's own future is dropped when its
//! budget is spent, and what it learnt until then must not be lost with
//! it; and the loop, cutting a record short, asks it whether the call has
//! sent anything yet. Waiting for our own rate-limit permit sent
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
}

tokio::task_local! {
    /// The log of the provider call being made (set by [`start`]).
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

impl BodyGuard {
    /// Counts an answer announced `len` bytes long against the record's
    /// answers, and waits (at most `cap`) until the budget has room for it
    /// ([`RecordClock::make_room`]).
    pub(crate) async fn make_room(&self, len: usize, cap: std::time::Duration) {
        if let Some(clock) = &self.clock {
            clock.make_room(len, cap).await;
        }
    }

    /// Counts `n` more bytes of the body against the record's answers.
    pub(crate) fn arrived(&self, n: usize) {
        if let Some(clock) = &self.clock {
            clock.answer_arrived(n);
        }
    }
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

/// Starts one provider call on the record's clock: its retries see the
/// record's deadline and stop rather than sleep past it; at the deadline
/// the call ends as the [`CallLog`] says, unless a body is arriving, which
/// is let finish. The loop's cut does not end it: the caller decides what
/// a cut does with the running call (the pipeline parks it for the user's
/// next poll). Returns the call's log and the call, to be spawned.
pub fn start<T, F>(
    provider: Provider,
    clock: &Arc<RecordClock>,
    budget: Duration,
    call: F,
) -> (Arc<CallLog>, impl Future<Output = PollOutcome<T>> + Send)
where
    T: Send,
    F: Future<Output = Result<T, ProviderError>> + Send,
{
    let deadline = clock
        .deadline()
        .unwrap_or_else(|| tokio::time::Instant::now() + budget);
    let log = Arc::new(CallLog::default());
    let scoped = RECORD.scope(clock.clone(), CALL.scope(log.clone(), call));
    let own = log.clone();
    let run = async move {
        tokio::select! {
            // A body read to its end is an answer: the call's own result
            // is taken first.
            biased;
            r = scoped => PollOutcome::Answered(r),
            () = own.past_deadline(deadline) => own.at_deadline(provider, budget),
        }
    };
    (log, run)
}

impl CallLog {
    /// Resolves once `deadline` has passed and no body of this call is
    /// arriving.
    async fn past_deadline(&self, deadline: tokio::time::Instant) {
        tokio::time::sleep_until(deadline).await;
        loop {
            let done = self.body_done.notified();
            tokio::pin!(done);
            done.as_mut().enable();
            if !self.is_streaming() {
                return;
            }
            done.await;
        }
    }

    /// How a call still running at its record's deadline ends.
    fn at_deadline<T>(&self, provider: Provider, budget: Duration) -> PollOutcome<T> {
        let sent = self.sent();
        if sent == 0 {
            return PollOutcome::NotSent;
        }
        let out_for = self
            .last_sent_at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map(|at| at.elapsed())
            .unwrap_or_default();
        match self.last_error() {
            Some(mut last) => {
                last.attempts = sent;
                PollOutcome::Answered(Err(last))
            }
            // A request sent late in the budget (its permit came late) had
            // no fair chance to be answered: not the provider's timeout.
            None if out_for < budget / 2 => PollOutcome::Cut,
            None => {
                let mut e = ProviderError::new(
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
}

/// Runs one call on the record's clock to its end, as [`start`] runs it,
/// in place: when the loop cuts the record first, the call is dropped and
/// ends [`PollOutcome::NotSent`] if it had sent nothing (it waited for our
/// own permit), else [`PollOutcome::Cut`], unless an answer's body is
/// arriving, which is let finish. (The pipeline's worker parks a
/// cut call instead, for the user's next poll.)
pub async fn run<T, F>(
    provider: Provider,
    clock: &Arc<RecordClock>,
    budget: Duration,
    call: F,
) -> PollOutcome<T>
where
    T: Send,
    F: Future<Output = Result<T, ProviderError>> + Send,
{
    let (log, run) = start(provider, clock, budget, call);
    tokio::pin!(run);
    tokio::select! {
        biased;
        outcome = &mut run => outcome,
        _ = clock.cut_off() => {
            if log.sent() == 0 {
                PollOutcome::NotSent
            } else if log.is_streaming() {
                // A body that is arriving is let finish.
                run.await
            } else {
                PollOutcome::Cut
            }
        }
    }
}

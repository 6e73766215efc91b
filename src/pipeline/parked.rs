//! Provider calls that outlive their record's turn in a batch.
//!
//! Batches commit in read order, so a record still waiting on a provider
//! holds every record read after it. Such a record is cut short once it
//! has waited past its leash, and its task goes back to the delay tiers to
//! be polled again. Its request is not dropped: it is parked here, still
//! running, and the next poll of the same user and provider takes it back
//! instead of asking the provider again. A slow answer therefore costs its
//! own user a round trip through the delay tiers, never the other users
//! their latency, and never the user its data: the answer that arrives
//! late is the one the next poll uses. A parked call ends at the record
//! budget it started with (an unanswered call is then a timed-out poll),
//! and a cut call makes no further retries.
//!
//! The calls live in this process's memory only. A crash, or a rebalance
//! that moves the user's delay partition to another instance, loses them;
//! the next poll then asks the provider again, as any repoll does
//! (provider calls may be repeated; published records never are). Calls
//! never taken back (the user's partition moved) are dropped once they
//! are older than their budget plus a margin, and there are at most
//! `capacity` parked at once (the oldest is dropped first).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::core::Answer;
use crate::providers::call::CallLog;
use crate::providers::Provider;

/// How one provider call of a record ended, as the worker applies it.
// Moved once per call, from the call's task to the worker: boxing the
// answer would allocate for every call to save nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Polled {
    /// The provider answered, or failed (its last answer).
    Answered(Answer),
    /// No request was sent: the call waited for our own rate-limit permit
    /// until its budget ran out. Not a poll.
    NotSent,
    /// Its latest request, sent late in the budget, was still unanswered:
    /// nothing learnt, asked again when due.
    Unanswered,
    /// The record was cut short while the call waited on the provider: the
    /// call is parked, still running, for the user's next poll.
    Parked,
}

/// A running provider call: its task and its log.
#[derive(Debug)]
pub struct Call {
    pub handle: JoinHandle<Polled>,
    pub log: Arc<CallLog>,
}

/// A call still running (or finished) whose record was cut short.
#[derive(Debug)]
struct ParkedCall {
    call: Call,
    /// Until when the call may run (its record budget); kept a little
    /// longer so a poll due right after it still finds the answer.
    keep_until: Instant,
}

/// The parked calls of this process, by provider and the id the provider
/// knows the user by.
#[derive(Debug)]
pub struct ParkedCalls {
    calls: Mutex<HashMap<(Provider, String), ParkedCall>>,
    capacity: usize,
}

/// How long past its budget a finished call is kept for its next poll.
const KEEP_MARGIN: Duration = Duration::from_secs(600);

impl ParkedCalls {
    pub fn new(capacity: usize) -> ParkedCalls {
        ParkedCalls {
            calls: Mutex::new(HashMap::new()),
            capacity: capacity.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(Provider, String), ParkedCall>> {
        self.calls.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Parks a call of `provider` for the user it knows as `id`, running
    /// until `deadline`. A call parked before for the same user is dropped
    /// (it cannot be older than the poll that took it back).
    pub fn park(&self, provider: Provider, id: &str, call: Call, deadline: Instant) {
        let mut calls = self.lock();
        let now = Instant::now();
        calls.retain(|_, c| {
            let keep = c.keep_until > now;
            if !keep {
                c.call.handle.abort();
            }
            keep
        });
        while calls.len() >= self.capacity {
            let Some(oldest) = calls
                .iter()
                .min_by_key(|(_, c)| c.keep_until)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            if let Some(c) = calls.remove(&oldest) {
                c.call.handle.abort();
            }
        }
        let parked = ParkedCall {
            call,
            keep_until: deadline + KEEP_MARGIN,
        };
        if let Some(old) = calls.insert((provider, id.to_string()), parked) {
            old.call.handle.abort();
        }
    }

    /// Takes back the call parked for this user and provider, if any.
    pub fn take(&self, provider: Provider, id: &str) -> Option<Call> {
        self.lock()
            .remove(&(provider, id.to_string()))
            .map(|c| c.call)
    }

    /// How many calls are parked now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for ParkedCalls {
    fn drop(&mut self) {
        for (_, c) in self.lock().drain() {
            c.call.handle.abort();
        }
    }
}

impl From<Polled> for crate::core::PollResult {
    fn from(polled: Polled) -> Self {
        match polled {
            Polled::Answered(answer) => crate::core::PollResult::Answered(answer),
            Polled::Parked | Polled::Unanswered => crate::core::PollResult::Cut,
            Polled::NotSent => crate::core::PollResult::NotSent,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::ProviderErrorKind;

    fn answered() -> Call {
        Call {
            handle: tokio::spawn(async {
                Polled::Answered(Answer::Credeau(Err(crate::providers::http::error(
                    Provider::Credeau,
                    ProviderErrorKind::Timeout,
                    None,
                    "x",
                ))))
            }),
            log: Arc::default(),
        }
    }

    fn hanging() -> Call {
        Call {
            handle: tokio::spawn(std::future::pending::<Polled>()),
            log: Arc::default(),
        }
    }

    #[tokio::test]
    async fn a_parked_call_is_taken_back_once_by_its_user_and_provider() {
        let parked = ParkedCalls::new(8);
        let deadline = Instant::now() + Duration::from_secs(15);
        parked.park(Provider::Credeau, "u1", answered(), deadline);
        assert!(parked.take(Provider::Finbox, "u1").is_none());
        assert!(parked.take(Provider::Credeau, "u2").is_none());
        let call = parked.take(Provider::Credeau, "u1").expect("parked");
        assert!(matches!(
            call.handle.await.unwrap(),
            Polled::Answered(Answer::Credeau(Err(_)))
        ));
        assert!(parked.take(Provider::Credeau, "u1").is_none());
        assert!(parked.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn the_oldest_call_makes_room_and_stale_calls_are_dropped() {
        let parked = ParkedCalls::new(2);
        let now = Instant::now();
        let hang = hanging;
        parked.park(Provider::Credeau, "a", hang(), now + Duration::from_secs(1));
        parked.park(Provider::Credeau, "b", hang(), now + Duration::from_secs(2));
        parked.park(Provider::Credeau, "c", hang(), now + Duration::from_secs(3));
        assert_eq!(parked.len(), 2);
        assert!(
            parked.take(Provider::Credeau, "a").is_none(),
            "the oldest left"
        );
        tokio::time::advance(KEEP_MARGIN + Duration::from_secs(4)).await;
        parked.park(
            Provider::Finbox,
            "d",
            hang(),
            Instant::now() + Duration::from_secs(1),
        );
        assert_eq!(parked.len(), 1, "calls past their keep time are dropped");
        assert!(parked.take(Provider::Finbox, "d").is_some());
    }
}

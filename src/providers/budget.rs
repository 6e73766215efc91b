//! The time one record may spend on provider calls, seen from both sides:
//! the pipeline sets the record's budget and may cut a straggler short;
//! the retry loop (`http::with_retries`) marks when the record is waiting
//! on a provider (an attempt in flight or a retry's sleep, not a
//! rate-limit permit) and stops retrying once the budget is spent or the
//! record is cut.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// One record's provider time.
#[derive(Debug)]
pub struct RecordClock {
    /// What the stored times are counted from.
    base: Instant,
    /// When the provider calls must be over, in ms from `base`
    /// (`u64::MAX` before `begin`).
    deadline_ms: AtomicU64,
    /// How long the record may wait on providers while it holds its batch
    /// before it is cut short (`u64::MAX`: never).
    cut_after_ms: AtomicU64,
    /// Attempts in flight or retry sleeps in progress now.
    waiting: AtomicU32,
    /// When the current wait on providers began, in ms from `base` plus one
    /// (0: not waiting).
    waiting_since: AtomicU64,
    cut: CancellationToken,
}

impl Default for RecordClock {
    fn default() -> Self {
        RecordClock {
            base: Instant::now(),
            deadline_ms: AtomicU64::new(u64::MAX),
            cut_after_ms: AtomicU64::new(u64::MAX),
            waiting: AtomicU32::new(0),
            waiting_since: AtomicU64::new(0),
            cut: CancellationToken::new(),
        }
    }
}

impl RecordClock {
    pub fn new() -> Arc<RecordClock> {
        Arc::new(RecordClock::default())
    }

    fn now_ms(&self) -> u64 {
        self.base.elapsed().as_millis() as u64
    }

    /// Starts the record's provider calls: they must be over within
    /// `budget`, and may be cut short after `cut_after` of waiting on a
    /// provider (`None`: never).
    pub fn begin(&self, budget: Duration, cut_after: Option<Duration>) {
        let now = self.now_ms();
        self.deadline_ms
            .store(now + budget.as_millis() as u64, Ordering::Relaxed);
        self.cut_after_ms.store(
            cut_after.map_or(u64::MAX, |d| d.as_millis() as u64),
            Ordering::Relaxed,
        );
    }

    /// When the provider calls must be over (`None` before `begin`).
    pub fn deadline(&self) -> Option<Instant> {
        match self.deadline_ms.load(Ordering::Relaxed) {
            u64::MAX => None,
            ms => Some(self.base + Duration::from_millis(ms)),
        }
    }

    /// Marks the record as waiting on a provider until the guard is
    /// dropped.
    pub fn waiting(self: &Arc<Self>) -> WaitingGuard {
        if self.waiting.fetch_add(1, Ordering::AcqRel) == 0 {
            self.waiting_since
                .store(self.now_ms() + 1, Ordering::Release);
        }
        WaitingGuard(self.clone())
    }

    /// Whether the record has waited on a provider for at least its cut
    /// time, and is waiting still.
    pub fn is_straggling(&self) -> bool {
        let cut_after = self.cut_after_ms.load(Ordering::Relaxed);
        if cut_after == u64::MAX || self.waiting.load(Ordering::Acquire) == 0 {
            return false;
        }
        match self.waiting_since.load(Ordering::Acquire) {
            0 => false,
            since => self.now_ms() + 1 >= since.saturating_add(cut_after),
        }
    }

    /// Cuts the record's provider calls short.
    pub fn cut(&self) {
        self.cut.cancel();
    }

    pub fn is_cut(&self) -> bool {
        self.cut.is_cancelled()
    }

    /// Resolves once the record is cut short.
    pub async fn cut_off(&self) {
        self.cut.cancelled().await
    }
}

/// Counts the record as waiting on a provider while alive.
#[derive(Debug)]
pub struct WaitingGuard(Arc<RecordClock>);

impl Drop for WaitingGuard {
    fn drop(&mut self) {
        if self.0.waiting.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.waiting_since.store(0, Ordering::Release);
        }
    }
}

tokio::task_local! {
    /// The clock of the record being processed (set by the pipeline's
    /// worker around each provider call).
    pub static RECORD: Arc<RecordClock>;
}

/// Whether waiting `delay` before the next attempt stays within the
/// record's deadline (always, outside a record).
pub(crate) fn retry_fits(delay: Duration) -> bool {
    RECORD
        .try_with(|clock| {
            clock
                .deadline()
                .is_none_or(|deadline| Instant::now() + delay < deadline)
        })
        .unwrap_or(true)
}

/// The record's clock, if the caller runs inside one.
pub(crate) fn current() -> Option<Arc<RecordClock>> {
    RECORD.try_with(Arc::clone).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_record_straggles_only_while_waiting_on_a_provider_past_its_cut_time() {
        let clock = RecordClock::new();
        clock.begin(Duration::from_secs(15), Some(Duration::from_secs(2)));
        tokio::time::advance(Duration::from_secs(5)).await;
        // Five seconds waiting for a rate-limit permit do not count.
        assert!(!clock.is_straggling());
        let guard = clock.waiting();
        tokio::time::advance(Duration::from_millis(1900)).await;
        assert!(!clock.is_straggling());
        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(clock.is_straggling());
        drop(guard);
        assert!(!clock.is_straggling(), "no longer waiting");
    }

    #[tokio::test(start_paused = true)]
    async fn a_record_without_a_cut_time_never_straggles() {
        let clock = RecordClock::new();
        clock.begin(Duration::from_secs(15), None);
        let _guard = clock.waiting();
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(!clock.is_straggling());
    }

    #[tokio::test(start_paused = true)]
    async fn retries_fit_only_before_the_deadline() {
        let clock = RecordClock::new();
        clock.begin(Duration::from_secs(10), None);
        let fits = |d| RECORD.sync_scope(clock.clone(), || retry_fits(d));
        assert!(fits(Duration::from_secs(9)));
        assert!(!fits(Duration::from_secs(10)));
        assert!(retry_fits(Duration::from_secs(3600)), "outside a record");
    }
}

//! The time one record may spend on provider calls, seen from both sides:
//! the pipeline sets the record's budget and may cut a straggler short;
//! the retry loop (`retry::with_retries`) marks when the record is waiting
//! on a provider (an attempt in flight or a retry's sleep, not a
//! rate-limit permit, not an answer's body arriving) and stops retrying
//! once the budget is spent or the record is cut. How one call ends then
//! is [`super::call`]'s.

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
    /// Attempts in flight or retry sleeps (waits on providers).
    waiting: Stretch,
    /// Requests sent and not yet answered (until the answer's status and
    /// headers; not retry sleeps, not reading a body).
    awaiting: Stretch,
    /// The longest wait for an answer of this record that has ended (not
    /// cut short), in ms.
    longest_await_ms: AtomicU64,
    /// Answer bodies being read now: a record receiving one is not a
    /// straggler.
    bodies: AtomicU32,
    /// The bytes of this record's answer bodies read so far, counted in
    /// `ledger` too until the record lets them go (`u64::MAX`: let go).
    answer_bytes: AtomicU64,
    ledger: Option<Arc<dyn AnswerLedger>>,
    cut: CancellationToken,
}

/// Where a record's answer bytes count for the pipeline's byte budget
/// (the pipeline's gate keeps it): an answer's size is known only as it
/// arrives, and one that announces a large size waits there, unread,
/// until the budget has room for it.
pub trait AnswerLedger: Send + Sync + std::fmt::Debug {
    /// Counts `n` more bytes read.
    fn add(&self, n: u64);
    /// Lets go of `n` bytes counted.
    fn remove(&self, n: u64);
    /// For an answer of `bytes` (already counted) that must wait for room,
    /// the wait: it resolves once the record may read it, or after `cap`
    /// at most. `None`: the answer is read at once.
    fn room_for(&self, bytes: u64, cap: Duration) -> Option<futures::future::BoxFuture<'_, ()>>;
}

impl Default for RecordClock {
    fn default() -> Self {
        RecordClock {
            base: Instant::now(),
            deadline_ms: AtomicU64::new(u64::MAX),
            cut_after_ms: AtomicU64::new(u64::MAX),
            waiting: Stretch::default(),
            awaiting: Stretch::default(),
            longest_await_ms: AtomicU64::new(0),
            bodies: AtomicU32::new(0),
            answer_bytes: AtomicU64::new(0),
            ledger: None,
            cut: CancellationToken::new(),
        }
    }
}

impl RecordClock {
    pub fn new() -> Arc<RecordClock> {
        Arc::new(RecordClock::default())
    }

    /// A clock that counts the record's answer bytes in `ledger` too,
    /// until [`RecordClock::let_go_of_answers`], and makes a large answer
    /// wait there before it is read.
    pub fn metered(ledger: Arc<dyn AnswerLedger>) -> Arc<RecordClock> {
        Arc::new(RecordClock {
            ledger: Some(ledger),
            ..RecordClock::default()
        })
    }

    /// Counts an answer that has announced `len` bytes, then waits, at
    /// most `cap`, until the byte budget has room for it. Meanwhile the
    /// answer waits in the connection, unread (the provider's sending
    /// blocks), so it holds no memory of ours.
    pub(crate) async fn make_room(&self, len: usize, cap: Duration) {
        self.answer_arrived(len);
        if let Some(wait) = self
            .ledger
            .as_ref()
            .and_then(|l| l.room_for(len as u64, cap))
        {
            wait.await;
        }
    }

    /// Counts `n` more bytes of an answer's body of this record (nothing
    /// once the record has let go of its answers: a call parked by a cut
    /// may still be reading one).
    pub(crate) fn answer_arrived(&self, n: usize) {
        let n = n as u64;
        let counted = self
            .answer_bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {
                (b != u64::MAX).then(|| b.saturating_add(n).min(u64::MAX - 1))
            });
        if let (Ok(_), Some(ledger)) = (counted, &self.ledger) {
            ledger.add(n);
        }
    }

    /// The record's work is over: its answer bytes no longer count.
    /// Returns how many there were (0 the second time).
    pub fn let_go_of_answers(&self) -> u64 {
        let counted = self.answer_bytes.swap(u64::MAX, Ordering::AcqRel);
        if counted == u64::MAX {
            return 0;
        }
        if let Some(ledger) = &self.ledger {
            ledger.remove(counted);
        }
        counted
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
        self.waiting.enter(self.now_ms());
        WaitingGuard(self.clone())
    }

    /// Whether the record has waited on a provider for at least its cut
    /// time, and is waiting still (an answer's body arriving is not
    /// waiting: it is cut only when it stalls).
    pub fn is_straggling(&self) -> bool {
        let cut_after = self.cut_after_ms.load(Ordering::Relaxed);
        cut_after != u64::MAX
            && self.bodies.load(Ordering::Acquire) == 0
            && self.waiting.lasted(self.now_ms(), cut_after)
    }

    /// Whether an answer's body of this record is arriving now.
    pub fn is_receiving_body(&self) -> bool {
        self.bodies.load(Ordering::Acquire) > 0
    }

    pub(crate) fn body_started(&self) {
        self.bodies.fetch_add(1, Ordering::AcqRel);
    }

    pub(crate) fn body_ended(&self) {
        self.bodies.fetch_sub(1, Ordering::AcqRel);
    }

    /// Marks a request sent to a provider and not yet answered (status
    /// and headers) until the guard is dropped.
    pub fn awaiting_answer(self: &Arc<Self>) -> AwaitingGuard {
        self.awaiting.enter(self.now_ms());
        AwaitingGuard(self.clone())
    }

    /// The longest wait for an answer of this record that has ended.
    pub fn longest_await(&self) -> Duration {
        Duration::from_millis(self.longest_await_ms.load(Ordering::Acquire))
    }

    /// Whether the record has waited on providers (a request in flight,
    /// its body being read, a retry's sleep) for `leash` and may be cut at
    /// all. Cutting a record parks its call, which goes on (its retries
    /// and its body included) for the user's next poll, so any wait may
    /// be cut.
    pub fn outlasts(&self, leash: Duration) -> bool {
        if self.cut_after_ms.load(Ordering::Relaxed) == u64::MAX {
            return false;
        }
        self.waiting.lasted(self.now_ms(), leash.as_millis() as u64)
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

/// Counts a request of the record as awaiting its answer while alive.
#[derive(Debug)]
pub struct AwaitingGuard(Arc<RecordClock>);

impl Drop for AwaitingGuard {
    fn drop(&mut self) {
        let clock = &self.0;
        let lasted = clock.awaiting.leave(clock.now_ms());
        // A request cut short is no measure of how long answers take.
        if let Some(took) = lasted.filter(|_| !clock.is_cut()) {
            clock.longest_await_ms.fetch_max(took, Ordering::AcqRel);
        }
    }
}

impl Drop for WaitingGuard {
    fn drop(&mut self) {
        self.0.waiting.leave(self.0.now_ms());
    }
}

/// Overlapping spans of one kind (a FinBox and a Credeau call of the same
/// record) counted as one stretch: how many are open, and since when.
#[derive(Debug, Default)]
struct Stretch {
    open: AtomicU32,
    /// When the stretch began, in ms from the clock's base plus one (0:
    /// none open).
    since: AtomicU64,
}

impl Stretch {
    fn enter(&self, now_ms: u64) {
        if self.open.fetch_add(1, Ordering::AcqRel) == 0 {
            self.since.store(now_ms + 1, Ordering::Release);
        }
    }

    /// Closes one span; when it was the last, how long the stretch lasted.
    fn leave(&self, now_ms: u64) -> Option<u64> {
        if self.open.fetch_sub(1, Ordering::AcqRel) != 1 {
            return None;
        }
        match self.since.swap(0, Ordering::AcqRel) {
            0 => None,
            since => Some((now_ms + 1).saturating_sub(since)),
        }
    }

    /// Whether a stretch is open and has lasted at least `ms`.
    fn lasted(&self, now_ms: u64, ms: u64) -> bool {
        if self.open.load(Ordering::Acquire) == 0 {
            return false;
        }
        match self.since.load(Ordering::Acquire) {
            0 => false,
            since => now_ms + 1 >= since.saturating_add(ms),
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
    async fn a_record_outlasts_a_leash_by_any_wait_on_a_provider() {
        let clock = RecordClock::new();
        clock.begin(Duration::from_secs(15), Some(Duration::from_secs(5)));
        let waiting = clock.waiting();
        let answer = clock.awaiting_answer();
        tokio::time::advance(Duration::from_millis(300)).await;
        drop(answer);
        assert_eq!(clock.longest_await(), Duration::from_millis(300));
        assert!(!clock.outlasts(Duration::from_millis(500)));
        // Sleeping before a retry, or reading a body, is waiting too: the
        // call is parked when the record is cut, and goes on.
        tokio::time::advance(Duration::from_millis(200)).await;
        assert!(clock.outlasts(Duration::from_millis(500)));
        let answer = clock.awaiting_answer();
        clock.cut();
        drop(answer);
        drop(waiting);
        assert_eq!(
            clock.longest_await(),
            Duration::from_millis(300),
            "a request cut short is not counted"
        );
        assert!(!clock.outlasts(Duration::from_millis(1)), "no wait open");
    }

    #[tokio::test(start_paused = true)]
    async fn a_record_without_a_leash_is_never_cut_for_its_peers() {
        let clock = RecordClock::new();
        clock.begin(Duration::from_secs(15), None);
        let _answer = clock.awaiting_answer();
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(!clock.outlasts(Duration::from_millis(500)));
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

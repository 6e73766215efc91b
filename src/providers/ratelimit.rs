//! The client-side rate limit of one provider: a token bucket (governor's
//! GCRA) shared by every task that calls the provider, whose rate can change
//! at run time and which backs off by itself after a 429.
//!
//! Why a rebuildable bucket: governor's limiters have a fixed quota, and the
//! pipeline changes ours when partitions move between instances. A rate
//! change therefore swaps in a new bucket that starts empty (never full), so
//! a change can only delay a permit, never let an extra one through.
//!
//! Back-off on 429 (so a configured limit above the provider's real one
//! corrects itself): each 429 halves the effective rate, at most once per
//! [`CUT_SPACING`] (a burst of concurrent 429s is one signal, not many) and
//! never below 1/16 of the configured rate. [`BACKOFF_WINDOW`] after the
//! last 429 the configured rate is restored in one step.
//!
//! The back-off is a factor (1/2 per cut), not a remembered rate: the rate
//! in force is always the configured rate (this instance's share of the
//! limit, which moves with every rebalance) times that factor. A share cut
//! to nothing during a rebalance and given back a moment later therefore
//! gives back the backed-off share, not the lowest rate it passed through.
//! `insights_rate_limit_per_minute{provider}` shows that rate, set here
//! whenever the share or the back-off changes it.
//!
//! A configured rate of 0 (an instance holding no partitions has no share)
//! hands out no permit at all until a rate is set again, so the shares of
//! the instances never add up to more than the deployment's limit.

use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock, Reference};
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::{InMemoryState, NotKeyed};
use governor::Quota;
use tokio::sync::Notify;

use super::Provider;
use crate::metrics::Metrics;

/// How long the rate stays reduced after the last 429.
pub const BACKOFF_WINDOW: Duration = Duration::from_secs(60);
/// 429s closer together than this count as one when halving the rate.
pub const CUT_SPACING: Duration = Duration::from_secs(5);
/// The effective rate never drops below `configured / MAX_CUT_FACTOR`.
pub const MAX_CUT_FACTOR: u32 = 16;
/// How many halvings `MAX_CUT_FACTOR` allows.
const MAX_CUTS: u32 = MAX_CUT_FACTOR.trailing_zeros();
/// How long a caller without a rate (0) sleeps before it checks again; a
/// rate set in the meantime wakes it at once.
const NO_RATE_RECHECK: Duration = Duration::from_secs(60);

type Bucket<C> =
    governor::RateLimiter<NotKeyed, InMemoryState, C, NoOpMiddleware<<C as Clock>::Instant>>;

struct State<C: Clock> {
    configured: u32,
    /// Halvings in force (the back-off factor is `1 / 2^cuts`).
    cuts: u32,
    effective: u32,
    backoff_until: Option<C::Instant>,
    last_cut: Option<C::Instant>,
    /// `None` at a rate of 0: no permits.
    bucket: Option<Arc<Bucket<C>>>,
}

/// A token bucket for one provider. Share it in an `Arc`; every HTTP
/// attempt (retries included) takes one permit.
pub struct RateLimiter<C: Clock + Clone = DefaultClock> {
    provider: Provider,
    burst: NonZeroU32,
    clock: C,
    state: Mutex<State<C>>,
    changed: Notify,
    metrics: Option<Arc<Metrics>>,
}

impl RateLimiter<DefaultClock> {
    /// A limiter of `per_minute` requests per minute whose waits are observed
    /// into `rate_limiter_wait{provider}`. Its burst is 100 ms worth of the
    /// configured rate (at least 1): with burst 1 every permit that wakes a
    /// little late is lost for good, which measured 9-16 % under the limit
    /// at 50-100 requests/s; a tenth of a second of slack makes that up while
    /// staying far inside a provider's own per-second allowance.
    pub fn new(provider: Provider, per_minute: u32, metrics: Arc<Metrics>) -> Self {
        let burst = (per_minute / 600).max(1);
        let mut limiter = Self::with_clock(provider, per_minute, burst, DefaultClock::default());
        // Not shown yet: the service sets this instance's share (0 until it
        // has partitions) before it calls anyone, and that shows it.
        limiter.metrics = Some(metrics);
        limiter
    }
}

/// The quota for `per_minute` with the period rounded up, so the real rate
/// never exceeds the configured one.
fn quota(per_minute: u32, burst: NonZeroU32) -> Quota {
    let per_minute = u64::from(per_minute.max(1));
    let period = Duration::from_nanos(60_000_000_000u64.div_ceil(per_minute));
    // The period is at least 1 ns (per_minute <= u32::MAX), so `with_period`
    // cannot fail; the fallback only keeps this total.
    Quota::with_period(period)
        .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
        .allow_burst(burst)
}

impl<C: Clock + Clone> RateLimiter<C> {
    /// A limiter on any governor clock (tests use `FakeRelativeClock`).
    pub fn with_clock(provider: Provider, per_minute: u32, burst: u32, clock: C) -> Self {
        let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
        let bucket = (per_minute > 0).then(|| {
            Arc::new(Bucket::<C>::direct_with_clock(
                quota(per_minute, burst),
                clock.clone(),
            ))
        });
        RateLimiter {
            provider,
            burst,
            clock,
            state: Mutex::new(State {
                configured: per_minute,
                cuts: 0,
                effective: per_minute,
                backoff_until: None,
                last_cut: None,
                bucket,
            }),
            changed: Notify::new(),
            metrics: None,
        }
    }

    pub fn provider(&self) -> Provider {
        self.provider
    }

    fn lock(&self) -> MutexGuard<'_, State<C>> {
        // A panic while holding this lock cannot leave the state half
        // written (every update is a few plain assignments), so a poisoned
        // lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Puts the configured rate times the back-off factor in force: swaps
    /// in an empty bucket at that rate (if it changed), shows it, and wakes
    /// the waiters.
    fn rebuild(&self, state: &mut State<C>) {
        let effective = match state.configured {
            0 => 0,
            configured => (configured >> state.cuts).max(1),
        };
        if let Some(m) = &self.metrics {
            show_rate(m, self.provider, effective);
        }
        if effective == state.effective {
            return;
        }
        state.effective = effective;
        state.bucket = (effective > 0).then(|| {
            let bucket =
                Bucket::<C>::direct_with_clock(quota(effective, self.burst), self.clock.clone());
            // Start empty: the old bucket may just have handed out its burst.
            let _ = bucket.check_n(self.burst);
            Arc::new(bucket)
        });
        self.changed.notify_waiters();
    }

    /// The current bucket (none at a rate of 0), after ending an expired
    /// back-off.
    fn current(&self) -> Option<Arc<Bucket<C>>> {
        let mut state = self.lock();
        if let Some(until) = state.backoff_until {
            if self.clock.now() >= until {
                state.backoff_until = None;
                state.last_cut = None;
                state.cuts = 0;
                self.rebuild(&mut state);
            }
        }
        state.bucket.clone()
    }

    /// Takes a permit if one is free now; otherwise how long until one may be.
    pub fn try_acquire(&self) -> Result<(), Duration> {
        let Some(bucket) = self.current() else {
            return Err(NO_RATE_RECHECK);
        };
        bucket
            .check()
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }

    /// Waits for a permit; returns how long it waited (also observed into
    /// `rate_limiter_wait{provider}`). Safe to call from many tasks while
    /// the rate changes: a change wakes every waiter to re-check.
    pub async fn acquire(&self) -> Duration {
        let started = Instant::now();
        loop {
            // Registered before checking, so a rate change between the
            // check and the sleep still wakes us.
            let changed = self.changed.notified();
            match self.try_acquire() {
                Ok(()) => break,
                Err(wait) => {
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = changed => {}
                    }
                }
            }
        }
        let waited = started.elapsed();
        if let Some(m) = &self.metrics {
            m.rate_limiter_wait
                .with_label_values(&[self.provider.as_str()])
                .observe(waited.as_secs_f64());
        }
        waited
    }

    /// Sets the configured rate (e.g. this instance's share of the
    /// deployment's limit; 0 hands out no permits). A back-off running
    /// applies to the new rate as it did to the old one (the same factor),
    /// until its window ends.
    pub fn set_rate_per_minute(&self, per_minute: u32) {
        let mut state = self.lock();
        state.configured = per_minute;
        self.rebuild(&mut state);
    }

    /// Reports a 429 from the provider: halves the effective rate (see the
    /// module documentation) and restarts the back-off window.
    pub fn note_rate_limited(&self) {
        let now = self.clock.now();
        let mut state = self.lock();
        state.backoff_until = Some(now + Nanos::from(BACKOFF_WINDOW));
        let recently_cut = state
            .last_cut
            .is_some_and(|cut| Duration::from(now.duration_since(cut)) < CUT_SPACING);
        if recently_cut {
            return;
        }
        state.last_cut = Some(now);
        state.cuts = (state.cuts + 1).min(MAX_CUTS);
        self.rebuild(&mut state);
    }

    /// The rate the bucket runs at now, per minute.
    pub fn effective_rate_per_minute(&self) -> u32 {
        // Ends an expired back-off first, so the answer is current.
        drop(self.current());
        self.lock().effective
    }

    /// The rate last set, per minute.
    pub fn configured_rate_per_minute(&self) -> u32 {
        self.lock().configured
    }
}

/// Shows the rate in force in `insights_rate_limit_per_minute{provider}`.
fn show_rate(metrics: &Metrics, provider: Provider, per_minute: u32) {
    metrics
        .rate_limit
        .with_label_values(&[provider.as_str()])
        .set(i64::from(per_minute));
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;
    use proptest::prelude::*;

    fn fake(per_minute: u32, burst: u32) -> (RateLimiter<FakeRelativeClock>, FakeRelativeClock) {
        let clock = FakeRelativeClock::default();
        (
            RateLimiter::with_clock(Provider::Credeau, per_minute, burst, clock.clone()),
            clock,
        )
    }

    fn now_ns(clock: &FakeRelativeClock) -> u64 {
        u64::from(clock.now())
    }

    /// Every window [t_i, t_j] holds at most `burst + rate * (t_j - t_i)`
    /// permits (checked exactly, in integer nanoseconds).
    fn assert_never_exceeds(granted: &[u64], burst: u32, per_minute: u32) {
        for i in 0..granted.len() {
            for j in i..granted.len() {
                let count = (j - i + 1) as u128;
                let window = u128::from(granted[j] - granted[i]);
                let allowed_extra = count.saturating_sub(u128::from(burst));
                assert!(
                    allowed_extra * 60_000_000_000 <= window * u128::from(per_minute),
                    "{count} permits in {window} ns at {per_minute}/min, burst {burst}"
                );
            }
        }
    }

    #[test]
    fn burst_one_lets_one_through_then_waits_a_period() {
        let (l, clock) = fake(60, 1);
        assert!(l.try_acquire().is_ok());
        let wait = l.try_acquire().unwrap_err();
        assert_eq!(wait, Duration::from_secs(1));
        clock.advance(Duration::from_millis(999));
        assert!(l.try_acquire().is_err());
        clock.advance(Duration::from_millis(1));
        assert!(l.try_acquire().is_ok());
    }

    #[test]
    fn a_429_halves_the_rate_then_the_configured_rate_returns() {
        let (l, clock) = fake(600, 1);
        l.note_rate_limited();
        assert_eq!(l.effective_rate_per_minute(), 300);
        // A second 429 right away is the same signal.
        l.note_rate_limited();
        assert_eq!(l.effective_rate_per_minute(), 300);
        clock.advance(CUT_SPACING);
        l.note_rate_limited();
        assert_eq!(l.effective_rate_per_minute(), 150);
        clock.advance(BACKOFF_WINDOW - Duration::from_millis(1));
        assert_eq!(l.effective_rate_per_minute(), 150);
        clock.advance(Duration::from_millis(1));
        assert_eq!(l.effective_rate_per_minute(), 600);
    }

    #[test]
    fn backoff_never_goes_below_a_sixteenth_of_the_configured_rate() {
        let (l, clock) = fake(1600, 1);
        for _ in 0..20 {
            l.note_rate_limited();
            clock.advance(CUT_SPACING);
        }
        assert_eq!(l.effective_rate_per_minute(), 100);
    }

    #[test]
    fn a_backoff_applies_to_a_new_share_as_a_factor() {
        let (l, clock) = fake(1000, 1);
        l.note_rate_limited();
        l.set_rate_per_minute(800);
        assert_eq!(l.effective_rate_per_minute(), 400);
        assert_eq!(l.configured_rate_per_minute(), 800);
        l.set_rate_per_minute(2000);
        assert_eq!(l.effective_rate_per_minute(), 1000);
        clock.advance(BACKOFF_WINDOW);
        assert_eq!(l.effective_rate_per_minute(), 2000);
    }

    /// A limiter on a fake clock that shows its rate in `metrics`.
    fn shown(per_minute: u32) -> (RateLimiter<FakeRelativeClock>, FakeRelativeClock) {
        let (mut l, clock) = fake(per_minute, 1);
        let metrics = Arc::new(Metrics::new());
        show_rate(&metrics, l.provider, per_minute);
        l.metrics = Some(metrics);
        (l, clock)
    }

    fn shown_rate(l: &RateLimiter<FakeRelativeClock>) -> i64 {
        let metrics = l.metrics.as_ref().expect("shown");
        metrics.rate_limit.with_label_values(&["credeau"]).get()
    }

    #[test]
    fn a_share_taken_away_and_given_back_during_a_backoff_is_the_share_times_the_backoff() {
        let (l, clock) = shown(1000);
        // 429s: two cuts, a quarter of the share.
        l.note_rate_limited();
        clock.advance(CUT_SPACING);
        l.note_rate_limited();
        assert_eq!((l.effective_rate_per_minute(), shown_rate(&l)), (250, 250));
        // A rebalance takes the share away ...
        l.set_rate_per_minute(0);
        assert_eq!((l.effective_rate_per_minute(), shown_rate(&l)), (0, 0));
        assert!(l.try_acquire().is_err());
        // ... and gives it back a moment later: the share's rate times the
        // back-off, not the lowest rate it passed through.
        clock.advance(Duration::from_secs(9));
        l.set_rate_per_minute(1000);
        assert_eq!((l.effective_rate_per_minute(), shown_rate(&l)), (250, 250));
        clock.advance(Duration::from_millis(240));
        assert!(l.try_acquire().is_ok(), "one permit per 240 ms at 250/min");
        // The back-off ends a window after the last 429, not later.
        clock.advance(BACKOFF_WINDOW - Duration::from_millis(9_240));
        assert_eq!(
            (l.effective_rate_per_minute(), shown_rate(&l)),
            (1000, 1000)
        );
    }

    #[test]
    fn a_rate_of_zero_hands_out_no_permit_and_a_429_meanwhile_still_counts() {
        let (l, clock) = shown(600);
        l.set_rate_per_minute(0);
        clock.advance(Duration::from_secs(120));
        assert_eq!(l.try_acquire(), Err(NO_RATE_RECHECK));
        l.note_rate_limited();
        assert_eq!((l.effective_rate_per_minute(), shown_rate(&l)), (0, 0));
        l.set_rate_per_minute(600);
        assert_eq!((l.effective_rate_per_minute(), shown_rate(&l)), (300, 300));
    }

    proptest! {
        #[test]
        fn never_more_than_burst_plus_rate_times_window(
            per_minute in 1u32..200_000,
            burst in 1u32..5,
            steps in proptest::collection::vec((0u64..2_000, 1u32..4), 1..300),
        ) {
            let (l, clock) = fake(per_minute, burst);
            let period_ns = 60_000_000_000u64.div_ceil(u64::from(per_minute));
            let mut granted = Vec::new();
            for (advance_permille, tries) in steps {
                // Advance by 0..2 periods, in thousandths of a period.
                clock.advance(Duration::from_nanos(period_ns / 1000 * advance_permille));
                for _ in 0..tries {
                    if l.try_acquire().is_ok() {
                        granted.push(now_ns(&clock));
                    }
                }
            }
            prop_assert!(!granted.is_empty());
            assert_never_exceeds(&granted, burst, per_minute);
        }

        #[test]
        fn production_bursts_never_let_more_through_than_burst_plus_rate(
            per_minute in 600u32..60_000,
            steps in proptest::collection::vec((0u64..3_000, 1u32..200), 1..100),
        ) {
            // The burst RateLimiter::new gives: 100 ms of permits.
            let burst = (per_minute / 600).max(1);
            let (l, clock) = fake(per_minute, burst);
            let period_ns = 60_000_000_000u64.div_ceil(u64::from(per_minute));
            let mut granted = Vec::new();
            for (advance_permille, tries) in steps {
                clock.advance(Duration::from_nanos(period_ns / 1000 * advance_permille));
                for _ in 0..tries {
                    if l.try_acquire().is_ok() {
                        granted.push(now_ns(&clock));
                    }
                }
            }
            prop_assert!(!granted.is_empty());
            assert_never_exceeds(&granted, burst, per_minute);
        }

        #[test]
        fn rate_changes_and_backoffs_never_exceed_the_highest_rate_set(
            rates in proptest::collection::vec(1u32..100_000, 1..6),
            steps in proptest::collection::vec((0u64..2_000, 0u8..10), 1..300),
        ) {
            let max_rate = *rates.iter().max().unwrap();
            let (l, clock) = fake(rates[0], 1);
            let step_ns = 60_000_000_000u64.div_ceil(u64::from(max_rate)) / 1000;
            let mut granted = Vec::new();
            for (i, (advance, action)) in steps.into_iter().enumerate() {
                clock.advance(Duration::from_nanos(step_ns * advance));
                match action {
                    0 => l.set_rate_per_minute(rates[i % rates.len()]),
                    1 => l.note_rate_limited(),
                    _ => {
                        if l.try_acquire().is_ok() {
                            granted.push(now_ns(&clock));
                        }
                    }
                }
            }
            assert_never_exceeds(&granted, 1, max_rate);
        }
    }

    #[tokio::test]
    async fn raising_the_rate_releases_tasks_already_waiting() {
        let limiter = Arc::new(RateLimiter::new(
            Provider::Credeau,
            1,
            Arc::new(Metrics::new()),
        ));
        limiter.acquire().await;
        let waiter = {
            let limiter = Arc::clone(&limiter);
            tokio::spawn(async move { limiter.acquire().await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !waiter.is_finished(),
            "at 1/min the second permit is a minute away"
        );
        limiter.set_rate_per_minute(60_000);
        let waited = tokio::time::timeout(Duration::from_secs(2), waiter)
            .await
            .expect("released after the rate change")
            .unwrap();
        assert!(waited < Duration::from_secs(2), "{waited:?}");
    }

    #[tokio::test]
    async fn a_share_given_back_releases_tasks_waiting_without_one() {
        let metrics = Arc::new(Metrics::new());
        let limiter = Arc::new(RateLimiter::new(Provider::Credeau, 60_000, metrics));
        limiter.set_rate_per_minute(0);
        let waiter = {
            let limiter = Arc::clone(&limiter);
            tokio::spawn(async move { limiter.acquire().await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "no share, no permit");
        limiter.set_rate_per_minute(60_000);
        let waited = tokio::time::timeout(Duration::from_secs(2), waiter)
            .await
            .expect("released when the share comes back")
            .unwrap();
        assert!(waited < Duration::from_secs(2), "{waited:?}");
    }

    #[test]
    fn the_first_share_set_is_shown() {
        let metrics = Arc::new(Metrics::new());
        let l = RateLimiter::new(Provider::Finbox, 600, metrics.clone());
        l.set_rate_per_minute(0);
        assert_eq!(metrics.rate_limit.with_label_values(&["finbox"]).get(), 0);
        l.set_rate_per_minute(300);
        assert_eq!(metrics.rate_limit.with_label_values(&["finbox"]).get(), 300);
        let other = RateLimiter::new(Provider::Credeau, 600, metrics.clone());
        other.set_rate_per_minute(600);
        assert_eq!(
            metrics.rate_limit.with_label_values(&["credeau"]).get(),
            600
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn real_time_limit_holds_across_concurrent_tasks() {
        let metrics = Arc::new(Metrics::new());
        let per_minute = 12_000; // 200/s: a 5 ms period
        let limiter = Arc::new(RateLimiter::new(
            Provider::Finbox,
            per_minute,
            metrics.clone(),
        ));
        let started = Instant::now();
        let run_for = Duration::from_millis(600);
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let limiter = Arc::clone(&limiter);
            tasks.push(tokio::spawn(async move {
                let mut times = Vec::new();
                while started.elapsed() < run_for {
                    limiter.acquire().await;
                    times.push(started.elapsed());
                }
                times
            }));
        }
        let mut times = Vec::new();
        for t in tasks {
            times.extend(t.await.unwrap());
        }
        times.sort();
        let elapsed = times.last().copied().unwrap_or_default().as_secs_f64();
        let count = times.len() as f64;
        // At most burst + rate * t (plus a 2 ms scheduling allowance); the
        // burst of `new` is 100 ms worth of the rate.
        let burst = f64::from((per_minute / 600).max(1));
        assert!(
            count <= burst + 200.0 * (elapsed + 0.002),
            "{count} permits in {elapsed}s"
        );
        // And the limiter is not merely slow: at least 70 % of the rate.
        assert!(
            count >= 0.7 * 200.0 * elapsed,
            "{count} permits in {elapsed}s"
        );
        let rendered = metrics.render();
        assert!(
            rendered.contains("insights_rate_limiter_wait_seconds_count{provider=\"finbox\"}"),
            "{rendered}"
        );
    }
}

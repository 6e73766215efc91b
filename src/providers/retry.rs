//! In-process retry policies of the two providers, as pure functions: which
//! delay comes before the n-th retry, and how a provider's `Retry-After`
//! overrides it. No clocks and no sleeping here, so every bound is property
//! tested; the clients do the waiting.

use std::time::Duration;

/// How many retries a call may make, and how long to wait before each.
#[derive(Debug, Clone, PartialEq)]
pub enum RetryPolicy {
    /// FinBox: a fixed list of waits ("retry after 2 seconds, then after 5
    /// seconds"); one retry per entry.
    Fixed {
        delays: Vec<Duration>,
        /// Upper bound on a provider's `Retry-After`.
        max_wait: Duration,
    },
    /// Credeau: `min(base * 2^n, cap)` before retry `n` (0-based), then
    /// +/-20 % jitter, as the provider's own example computes it.
    Exponential {
        max_retries: u32,
        base: Duration,
        cap: Duration,
    },
}

/// The jitter Credeau documents: the delay varies by up to this fraction
/// either way.
pub const JITTER_FRACTION: f64 = 0.2;

impl RetryPolicy {
    /// The number of retries after the first attempt.
    pub fn max_retries(&self) -> u32 {
        match self {
            RetryPolicy::Fixed { delays, .. } => u32::try_from(delays.len()).unwrap_or(u32::MAX),
            RetryPolicy::Exponential { max_retries, .. } => *max_retries,
        }
    }

    /// The largest wait a `Retry-After` may impose.
    pub fn retry_after_cap(&self) -> Duration {
        match self {
            RetryPolicy::Fixed { max_wait, .. } => *max_wait,
            RetryPolicy::Exponential { cap, .. } => *cap,
        }
    }

    /// The wait before retry `retry` (0 = the first retry), without any
    /// `Retry-After`. `jitter` is a number in [-1, 1] (the caller draws it at
    /// random; tests pass it explicitly); fixed policies ignore it. `None`
    /// once the retries are used up.
    pub fn delay(&self, retry: u32, jitter: f64) -> Option<Duration> {
        if retry >= self.max_retries() {
            return None;
        }
        match self {
            RetryPolicy::Fixed { delays, .. } => delays.get(retry as usize).copied(),
            RetryPolicy::Exponential { base, cap, .. } => {
                Some(apply_jitter(exponential_delay(retry, *base, *cap), jitter))
            }
        }
    }

    /// The wait before retry `retry`, where a provider's `Retry-After` wins
    /// over the computed delay, capped at [`RetryPolicy::retry_after_cap`].
    pub fn delay_with_retry_after(
        &self,
        retry: u32,
        jitter: f64,
        retry_after: Option<Duration>,
    ) -> Option<Duration> {
        let computed = self.delay(retry, jitter)?;
        Some(match retry_after {
            Some(wait) => wait.min(self.retry_after_cap()),
            None => computed,
        })
    }
}

/// `min(base * 2^retry, cap)`, saturating instead of overflowing.
pub fn exponential_delay(retry: u32, base: Duration, cap: Duration) -> Duration {
    let factor = 2u32.checked_pow(retry).unwrap_or(u32::MAX);
    base.checked_mul(factor).unwrap_or(Duration::MAX).min(cap)
}

/// `delay + delay * 0.2 * jitter`, with `jitter` clamped to [-1, 1].
pub fn apply_jitter(delay: Duration, jitter: f64) -> Duration {
    let jitter = if jitter.is_finite() {
        jitter.clamp(-1.0, 1.0)
    } else {
        0.0
    };
    let secs = delay.as_secs_f64() * (1.0 + JITTER_FRACTION * jitter);
    Duration::try_from_secs_f64(secs.max(0.0)).unwrap_or(delay)
}

/// A random jitter in [-1, 1] for [`RetryPolicy::delay`].
pub fn random_jitter() -> f64 {
    use rand::Rng as _;
    rand::rng().random_range(-1.0..=1.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn credeau(max_retries: u32, base_ms: u64, cap_ms: u64) -> RetryPolicy {
        RetryPolicy::Exponential {
            max_retries,
            base: Duration::from_millis(base_ms),
            cap: Duration::from_millis(cap_ms),
        }
    }

    #[test]
    fn credeau_defaults_double_from_one_second_up_to_the_cap() {
        let p = credeau(10, 1000, 60_000);
        let centre: Vec<u64> = (0..8)
            .map(|n| p.delay(n, 0.0).unwrap().as_millis() as u64)
            .collect();
        assert_eq!(centre, [1000, 2000, 4000, 8000, 16000, 32000, 60000, 60000]);
        assert_eq!(p.delay(10, 0.0), None);
    }

    #[test]
    fn finbox_documented_delays_are_two_then_five_seconds_then_none() {
        let p = RetryPolicy::Fixed {
            delays: vec![Duration::from_secs(2), Duration::from_secs(5)],
            max_wait: Duration::from_secs(60),
        };
        assert_eq!(p.delay(0, 0.7), Some(Duration::from_secs(2)));
        assert_eq!(p.delay(1, -0.7), Some(Duration::from_secs(5)));
        assert_eq!(p.delay(2, 0.0), None);
        assert_eq!(p.max_retries(), 2);
    }

    #[test]
    fn retry_after_is_ignored_once_retries_are_exhausted() {
        let p = credeau(1, 100, 1000);
        assert_eq!(
            p.delay_with_retry_after(1, 0.0, Some(Duration::from_secs(1))),
            None
        );
    }

    proptest! {
        #[test]
        fn credeau_delay_stays_within_twenty_percent_of_capped_exponential(
            retry in 0u32..40,
            base_ms in 1u64..5_000,
            cap_extra_ms in 0u64..120_000,
            jitter in -1.0f64..=1.0,
        ) {
            let cap_ms = base_ms + cap_extra_ms;
            let p = credeau(40, base_ms, cap_ms);
            let got = p.delay(retry, jitter).unwrap().as_secs_f64();
            let expected = (base_ms as f64 * 2f64.powi(retry as i32)).min(cap_ms as f64) / 1000.0;
            prop_assert!(got >= expected * 0.8 - 1e-9, "{got} < 0.8 * {expected}");
            prop_assert!(got <= expected * 1.2 + 1e-9, "{got} > 1.2 * {expected}");
        }

        #[test]
        fn random_jitter_is_always_within_bounds(_i in 0u8..50) {
            let j = random_jitter();
            prop_assert!((-1.0..=1.0).contains(&j));
        }

        #[test]
        fn finbox_delays_are_exactly_the_configured_list(
            delays_ms in proptest::collection::vec(1u64..100_000, 0..10),
            jitter in -1.0f64..=1.0,
        ) {
            let delays: Vec<Duration> = delays_ms.iter().map(|m| Duration::from_millis(*m)).collect();
            let p = RetryPolicy::Fixed { delays: delays.clone(), max_wait: Duration::from_secs(60) };
            let got: Vec<Duration> = (0..).map_while(|n| p.delay(n, jitter)).collect();
            prop_assert_eq!(got, delays);
        }

        #[test]
        fn retry_after_wins_but_never_exceeds_the_cap(
            retry_after_ms in 0u64..1_000_000,
            cap_ms in 1u64..120_000,
            jitter in -1.0f64..=1.0,
        ) {
            let retry_after = Duration::from_millis(retry_after_ms);
            let cap = Duration::from_millis(cap_ms);
            let fixed = RetryPolicy::Fixed { delays: vec![Duration::from_secs(2)], max_wait: cap };
            let expo = RetryPolicy::Exponential { max_retries: 1, base: Duration::from_millis(1).min(cap), cap };
            for p in [fixed, expo] {
                let got = p.delay_with_retry_after(0, jitter, Some(retry_after)).unwrap();
                prop_assert_eq!(got, retry_after.min(cap));
            }
        }
    }
}

//! In-process retry policies of the two providers, as pure functions: which
//! delay comes before the n-th retry, and how a provider's `Retry-After`
//! combines with it. No clocks and no sleeping here, so every bound is
//! property tested; the clients do the waiting.
//!
//! A `Retry-After` can only lengthen a wait, never shorten it: FinBox
//! documents 2 s then 5 s, and a `Retry-After: 0` from a proxy must not
//! turn that into an immediate retry. Credeau's +/-20 % jitter keeps
//! applying when a `Retry-After` sets the wait, shifted upwards (0 to +20 %)
//! so no client comes back before the time the provider asked for, and
//! clients told the same time do not all come back at once.

use std::future::Future;
use std::time::{Duration, Instant};

use super::budget;
use super::call;
use super::ratelimit::RateLimiter;
use super::{Provider, ProviderError, ProviderErrorKind};
use crate::metrics::Metrics;

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

    /// The wait before retry `retry` given a provider's `Retry-After`
    /// (capped at [`RetryPolicy::retry_after_cap`]): never shorter than the
    /// policy's own wait. Fixed policies wait `max(delay, Retry-After)`;
    /// exponential ones take `max(base * 2^n capped, Retry-After)` and add
    /// jitter: +/-20 % without a `Retry-After`, 0 to +20 % with one (so the
    /// provider's time is always honoured).
    pub fn delay_with_retry_after(
        &self,
        retry: u32,
        jitter: f64,
        retry_after: Option<Duration>,
    ) -> Option<Duration> {
        let computed = self.delay(retry, jitter)?;
        let Some(asked) = retry_after.map(|w| w.min(self.retry_after_cap())) else {
            return Some(computed);
        };
        Some(match self {
            RetryPolicy::Fixed { .. } => computed.max(asked),
            RetryPolicy::Exponential { base, cap, .. } => {
                let centre = exponential_delay(retry, *base, *cap).max(asked);
                apply_jitter(centre, clamp_jitter(jitter).abs())
            }
        })
    }
}

fn clamp_jitter(jitter: f64) -> f64 {
    if jitter.is_finite() {
        jitter.clamp(-1.0, 1.0)
    } else {
        0.0
    }
}

/// `min(base * 2^retry, cap)`, saturating instead of overflowing.
pub fn exponential_delay(retry: u32, base: Duration, cap: Duration) -> Duration {
    let factor = 2u32.checked_pow(retry).unwrap_or(u32::MAX);
    base.checked_mul(factor).unwrap_or(Duration::MAX).min(cap)
}

/// `delay + delay * 0.2 * jitter`, with `jitter` clamped to [-1, 1].
pub fn apply_jitter(delay: Duration, jitter: f64) -> Duration {
    let jitter = clamp_jitter(jitter);
    let secs = delay.as_secs_f64() * (1.0 + JITTER_FRACTION * jitter);
    Duration::try_from_secs_f64(secs.max(0.0)).unwrap_or(delay)
}

/// A random jitter in [-1, 1] for [`RetryPolicy::delay`].
pub fn random_jitter() -> f64 {
    use rand::Rng as _;
    rand::rng().random_range(-1.0..=1.0)
}

// ---- The retry loop: every attempt of one provider call

/// One HTTP attempt's result, with the status it came with (for metrics).
pub(crate) struct Attempt<T> {
    pub http_status: Option<u16>,
    pub result: Result<T, ProviderError>,
}

/// What the retry loop needs to label an answer in metrics.
pub(crate) trait AnswerOutcome {
    fn outcome(&self) -> &'static str;
}

/// The only place a retry waits, so the policy's delays are all there is.
pub(crate) async fn sleep_before_retry(delay: Duration) {
    tokio::time::sleep(delay).await;
}

/// The parts of a client the retry loop uses.
pub(crate) struct RetryContext<'a> {
    pub provider: Provider,
    pub policy: &'a RetryPolicy,
    pub limiter: &'a RateLimiter,
    pub metrics: &'a Metrics,
}

/// Runs `attempt` (numbered from 1) until it succeeds, fails for good, or
/// the policy's retries are used up. Every attempt takes a rate-limit
/// permit; a 429 also slows the limiter down.
pub(crate) async fn with_retries<T, F, Fut>(
    ctx: RetryContext<'_>,
    mut attempt: F,
) -> Result<T, ProviderError>
where
    T: AnswerOutcome,
    F: FnMut(u32) -> Fut,
    Fut: Future<Output = Attempt<T>>,
{
    let mut retry = 0u32;
    loop {
        let number = retry + 1;
        ctx.limiter.acquire().await;
        call::note_sent();
        // From here until the answer (or the end of a retry's sleep) the
        // record waits on the provider: the time a straggler is cut for.
        let clock = budget::current();
        let waiting = clock.as_ref().map(|c| c.waiting());
        let started = Instant::now();
        let Attempt {
            http_status,
            result,
        } = attempt(number).await;
        observe(&ctx, number, http_status, &result, started.elapsed());
        let mut err = match result {
            Ok(answer) => {
                ctx.metrics
                    .provider_healthy
                    .with_label_values(&[ctx.provider.as_str()])
                    .set(1);
                return Ok(answer);
            }
            Err(e) => e,
        };
        err.attempts = number;
        note_failure(&ctx, &err, http_status);
        let Some(delay) = retry_delay(&ctx, retry, &err) else {
            return Err(err);
        };
        // A record cut short meanwhile does not end the call: the call is
        // parked for the user's next poll (`pipeline::parked`), and its
        // retries go on as documented.
        sleep_before_retry(delay).await;
        drop(waiting);
        retry += 1;
    }
}

/// Counts and logs one attempt: `provider_requests` by outcome and status,
/// its latency.
fn observe<T: AnswerOutcome>(
    ctx: &RetryContext<'_>,
    number: u32,
    http_status: Option<u16>,
    result: &Result<T, ProviderError>,
    latency: Duration,
) {
    let provider = ctx.provider.as_str();
    let status_label = http_status.map_or_else(|| "none".to_string(), |s| s.to_string());
    let outcome = match result {
        Ok(answer) => answer.outcome(),
        Err(e) => e.kind.as_str(),
    };
    ctx.metrics
        .provider_requests
        .with_label_values(&[provider, outcome, &status_label])
        .inc();
    ctx.metrics
        .provider_request_duration
        .with_label_values(&[provider])
        .observe(latency.as_secs_f64());
    tracing::debug!(
        provider,
        status = %status_label,
        outcome,
        attempt = number,
        latency_ms = latency.as_millis() as u64,
        "provider request"
    );
}

/// What a failed attempt tells beyond itself: the call's last answer (for
/// a cut at the record budget), our credentials or address rejected (the
/// provider marked unhealthy), a 429 (the limiter slows down).
fn note_failure(ctx: &RetryContext<'_>, err: &ProviderError, http_status: Option<u16>) {
    let provider = ctx.provider.as_str();
    call::note_failed(err);
    if err.kind.is_credential_problem() {
        ctx.metrics
            .provider_healthy
            .with_label_values(&[provider])
            .set(0);
        tracing::warn!(
            provider,
            status = %http_status.map_or_else(|| "none".to_string(), |s| s.to_string()),
            provider_request_id = err.provider_request_id.as_deref().unwrap_or("none"),
            error = %err,
            "provider rejected our credentials or address"
        );
    }
    if err.kind == ProviderErrorKind::RateLimited {
        ctx.limiter.note_rate_limited();
    }
}

/// The wait before retry `retry` after `err`, when one is due and fits in
/// the record budget (counted in `provider_retries`); `None`: the call
/// ends with `err`.
fn retry_delay(ctx: &RetryContext<'_>, retry: u32, err: &ProviderError) -> Option<Duration> {
    let provider = ctx.provider.as_str();
    let reason = err.kind.as_str();
    if !err.is_retryable() {
        return None;
    }
    let delay = ctx
        .policy
        .delay_with_retry_after(retry, random_jitter(), err.retry_after)?;
    if !budget::retry_fits(delay) {
        tracing::debug!(
            provider,
            reason,
            attempt = err.attempts,
            "retry would pass the record budget; polled again when due"
        );
        return None;
    }
    ctx.metrics
        .provider_retries
        .with_label_values(&[provider, reason])
        .inc();
    tracing::debug!(
        provider,
        reason,
        attempt = err.attempts,
        delay_ms = delay.as_millis() as u64,
        "retrying provider request"
    );
    Some(delay)
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
        fn finbox_retry_after_lengthens_but_never_shortens_the_documented_wait(
            retry_after_ms in 0u64..1_000_000,
            cap_ms in 1u64..120_000,
            retry in 0u32..2,
            jitter in -1.0f64..=1.0,
        ) {
            let documented = [Duration::from_secs(2), Duration::from_secs(5)];
            let cap = Duration::from_millis(cap_ms);
            let p = RetryPolicy::Fixed { delays: documented.to_vec(), max_wait: cap };
            let retry_after = Duration::from_millis(retry_after_ms);
            let got = p.delay_with_retry_after(retry, jitter, Some(retry_after)).unwrap();
            prop_assert!(got >= documented[retry as usize], "{got:?} shortens the documented wait");
            prop_assert_eq!(got, documented[retry as usize].max(retry_after.min(cap)));
        }

        #[test]
        fn credeau_retry_after_is_honoured_and_still_jittered_upwards(
            retry_after_ms in 0u64..1_000_000,
            retry in 0u32..10,
            jitter in -1.0f64..=1.0,
        ) {
            let p = credeau(10, 1000, 60_000);
            let retry_after = Duration::from_millis(retry_after_ms);
            let got = p.delay_with_retry_after(retry, jitter, Some(retry_after)).unwrap().as_secs_f64();
            let asked = retry_after.min(Duration::from_secs(60)).as_secs_f64();
            let exponential = exponential_delay(retry, Duration::from_secs(1), Duration::from_secs(60)).as_secs_f64();
            let centre = asked.max(exponential);
            prop_assert!(got >= asked - 1e-9, "{got} before the provider's {asked}");
            prop_assert!(got >= centre - 1e-9, "{got} below the backoff {centre}");
            prop_assert!(got <= centre * 1.2 + 1e-9, "{got} > 1.2 * {centre}");
            let expected = centre * (1.0 + JITTER_FRACTION * jitter.abs());
            prop_assert!((got - expected).abs() < 1e-6, "{got} != {expected}");
        }
    }

    #[test]
    fn credeau_jitter_spreads_waits_that_share_one_retry_after() {
        let p = credeau(3, 20, 200);
        let waits: std::collections::BTreeSet<u128> = [-1.0, -0.5, 0.0, 0.5, 1.0]
            .into_iter()
            .map(|j| {
                p.delay_with_retry_after(0, j, Some(Duration::from_millis(100)))
                    .unwrap()
                    .as_micros()
            })
            .collect();
        assert_eq!(waits.first(), Some(&100_000));
        assert_eq!(waits.last(), Some(&120_000));
        assert_eq!(waits.len(), 3, "{waits:?}");
    }
}

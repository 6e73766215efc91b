//! The providers' global rate limits: one token bucket per provider (rate
//! per minute, burst max(1, rate/60)), replaceable at run time through the
//! admin API. A rate of 0 turns the limit off.

use std::num::NonZeroU32;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use governor::clock::Clock as _;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

/// One provider's limit.
#[derive(Debug)]
pub struct ProviderLimit {
    limiter: RwLock<(u32, Option<Arc<DefaultDirectRateLimiter>>)>,
}

fn build(per_minute: u32) -> Option<Arc<DefaultDirectRateLimiter>> {
    let rate = NonZeroU32::new(per_minute)?;
    let burst = NonZeroU32::new((per_minute / 60).max(1)).unwrap_or(NonZeroU32::MIN);
    Some(Arc::new(RateLimiter::direct(
        Quota::per_minute(rate).allow_burst(burst),
    )))
}

impl ProviderLimit {
    pub fn new(per_minute: u32) -> Self {
        Self {
            limiter: RwLock::new((per_minute, build(per_minute))),
        }
    }

    /// Takes a token, or says how long until one is free.
    pub fn check(&self) -> Result<(), Duration> {
        let limiter = match self.limiter.read() {
            Ok(guard) => guard.1.clone(),
            Err(poisoned) => poisoned.into_inner().1.clone(),
        };
        match limiter {
            None => Ok(()),
            Some(l) => l
                .check()
                .map_err(|not_until| not_until.wait_time_from(l.clock().now())),
        }
    }

    /// Replaces the bucket (a fresh, full one).
    pub fn set(&self, per_minute: u32) {
        let fresh = (per_minute, build(per_minute));
        match self.limiter.write() {
            Ok(mut guard) => *guard = fresh,
            Err(poisoned) => *poisoned.into_inner() = fresh,
        }
    }

    pub fn per_minute(&self) -> u32 {
        match self.limiter.read() {
            Ok(guard) => guard.0,
            Err(poisoned) => poisoned.into_inner().0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_is_a_sixtieth_of_the_rate_then_requests_wait() {
        let limit = ProviderLimit::new(600);
        for _ in 0..10 {
            assert!(limit.check().is_ok());
        }
        let wait = limit.check().unwrap_err();
        assert!(wait <= Duration::from_millis(100), "{wait:?}");
    }

    #[test]
    fn zero_disables_and_set_replaces_the_bucket() {
        let limit = ProviderLimit::new(60);
        assert!(limit.check().is_ok());
        assert!(limit.check().is_err());
        limit.set(0);
        for _ in 0..1000 {
            assert!(limit.check().is_ok());
        }
        assert_eq!(limit.per_minute(), 0);
    }
}

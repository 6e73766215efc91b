//! This instance's share of the provider rate limits. Every instance of the
//! group holds a share of the consumed partitions, and takes the same share
//! of each provider's limit, so that the instances together never call a
//! provider faster than its contract allows.

use std::sync::Arc;

/// Sets this instance's share (0..=1) of the provider rate limits.
pub type ShareFn = Arc<dyn Fn(f64) + Send + Sync>;

/// The share of the limits that holding some of `total` partitions gives,
/// and what applies it.
#[derive(Clone)]
pub struct RateShare {
    total: usize,
    set: ShareFn,
}

impl RateShare {
    /// `total` partitions are consumed by the whole group; `set` applies a
    /// share to this instance's limiters.
    pub fn new(total: usize, set: ShareFn) -> RateShare {
        RateShare { total, set }
    }

    /// No partition count known: the share is always all of the limits and
    /// nothing is applied (the loop tests, which run without providers'
    /// limits).
    pub fn unknown() -> RateShare {
        RateShare::new(0, Arc::new(|_| {}))
    }

    /// Whether the group's partition count is known.
    pub fn is_known(&self) -> bool {
        self.total > 0
    }

    /// The share (0..=1) that holding `held` partitions gives; all of it
    /// when the total is unknown.
    pub fn of(&self, held: usize) -> f64 {
        share_of(held, self.total)
    }

    /// Applies the share that holding `held` partitions gives, and returns
    /// it.
    pub fn hold(&self, held: usize) -> f64 {
        let share = self.of(held);
        (self.set)(share);
        share
    }
}

/// The share (0..=1) of the provider rate limits that `held` of `total`
/// consumed partitions give; all of it when the total is unknown (0).
pub fn share_of(held: usize, total: usize) -> f64 {
    if total == 0 {
        1.0
    } else {
        (held as f64 / total as f64).clamp(0.0, 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn a_share_is_the_partitions_held_out_of_all() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let share = RateShare::new(4, Arc::new(move |v| s.lock().unwrap().push(v)));
        assert!(share.is_known());
        assert_eq!(share.hold(1), 0.25);
        assert_eq!(share.hold(0), 0.0);
        assert_eq!(share.hold(9), 1.0);
        assert_eq!(*seen.lock().unwrap(), vec![0.25, 0.0, 1.0]);
    }

    #[test]
    fn an_unknown_total_gives_all_of_the_limits() {
        let share = RateShare::unknown();
        assert!(!share.is_known());
        assert_eq!(share.of(0), 1.0);
        assert_eq!(share_of(3, 0), 1.0);
    }
}

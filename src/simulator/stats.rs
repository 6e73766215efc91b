//! Request counters for `GET /admin/stats`: every answer, by provider and
//! HTTP status, plus connections dropped on purpose.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// Which counter set a request lands in. `Other` is every path that is
/// neither provider's API (answered with the 403 page).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    Finbox,
    Credeau,
    Other,
}

#[derive(Debug)]
struct Counters {
    requests: AtomicU64,
    dropped: AtomicU64,
    /// Bytes of the answers' bodies (as sent, before any compression).
    body_bytes: AtomicU64,
    /// Indexed by HTTP status; fixed-size so counting never allocates or locks.
    by_status: Box<[AtomicU64]>,
}

impl Default for Counters {
    fn default() -> Self {
        Self {
            requests: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            body_bytes: AtomicU64::new(0),
            by_status: (0..600).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl Counters {
    fn count(&self, status: u16, dropped: bool, body_bytes: u64) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.body_bytes.fetch_add(body_bytes, Ordering::Relaxed);
        if dropped {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(c) = self.by_status.get(usize::from(status)) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn snapshot(&self) -> ChannelStats {
        ChannelStats {
            requests: self.requests.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            body_bytes: self.body_bytes.load(Ordering::Relaxed),
            by_status: self
                .by_status
                .iter()
                .enumerate()
                .filter_map(|(status, c)| {
                    let n = c.load(Ordering::Relaxed);
                    (n > 0).then(|| (status.to_string(), n))
                })
                .collect(),
        }
    }

    fn reset(&self) {
        self.requests.store(0, Ordering::Relaxed);
        self.dropped.store(0, Ordering::Relaxed);
        self.body_bytes.store(0, Ordering::Relaxed);
        for c in self.by_status.iter() {
            c.store(0, Ordering::Relaxed);
        }
    }
}

#[derive(Debug, Default)]
pub struct Stats {
    finbox: Counters,
    credeau: Counters,
    other: Counters,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChannelStats {
    pub requests: u64,
    /// Keyed by status code as a string ("200", "429", ...).
    pub by_status: BTreeMap<String, u64>,
    /// Answers whose connection was closed mid-response on purpose (their
    /// status is counted too).
    pub dropped: u64,
    /// Bytes of the answers' bodies whose size was known when they were
    /// sent (every whole answer; not the streamed or cut ones).
    pub body_bytes: u64,
}

/// `GET /admin/stats`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StatsReport {
    pub finbox: ChannelStats,
    pub credeau: ChannelStats,
    pub other: ChannelStats,
    /// Users with any state.
    pub users: usize,
}

impl Stats {
    fn counters(&self, channel: Channel) -> &Counters {
        match channel {
            Channel::Finbox => &self.finbox,
            Channel::Credeau => &self.credeau,
            Channel::Other => &self.other,
        }
    }

    pub fn count(&self, channel: Channel, status: u16, dropped: bool, body_bytes: u64) {
        self.counters(channel).count(status, dropped, body_bytes);
    }

    pub fn report(&self, users: usize) -> StatsReport {
        StatsReport {
            finbox: self.finbox.snapshot(),
            credeau: self.credeau.snapshot(),
            other: self.other.snapshot(),
            users,
        }
    }

    pub fn reset(&self) {
        for c in [&self.finbox, &self.credeau, &self.other] {
            c.reset();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_status_and_resets() {
        let stats = Stats::default();
        stats.count(Channel::Finbox, 202, false, 10);
        stats.count(Channel::Finbox, 202, false, 10);
        stats.count(Channel::Finbox, 200, true, 0);
        let r = stats.report(3);
        assert_eq!(r.finbox.requests, 3);
        assert_eq!(r.finbox.by_status["202"], 2);
        assert_eq!(r.finbox.dropped, 1);
        assert_eq!(r.finbox.body_bytes, 20);
        assert_eq!(r.credeau.requests, 0);
        stats.reset();
        assert_eq!(stats.report(0).finbox.requests, 0);
    }
}

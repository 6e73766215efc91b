//! How the service runs: `[log]`, `[schedule]`, `[dead_letter]`,
//! `[server]` and `[shutdown]`.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::problem::{positive, Checks};
use super::values::humantime_list;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    pub format: LogFormat,
    pub level: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSettings {
    #[serde(with = "humantime_list")]
    pub delay_tiers: Vec<Duration>,
    pub max_in_flight: usize,
    /// Bytes of consumed records read and not yet committed, at most.
    pub max_in_flight_bytes: usize,
    pub max_batch: usize,
    #[serde(with = "humantime_serde")]
    pub batch_linger: Duration,
    #[serde(with = "humantime_serde")]
    pub record_budget: Duration,
    #[serde(with = "humantime_serde")]
    pub straggler_wait: Duration,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DeadLetterSettings {
    pub max_ratio: f64,
    pub window: usize,
    pub max_consecutive: usize,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSettings {
    pub listen: String,
    #[serde(with = "humantime_serde")]
    pub stall_timeout: Duration,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownSettings {
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl LogSettings {
    pub(super) fn validate(&self, errs: &mut Checks) {
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.level) {
            errs.fail("log.level", e.to_string());
        }
    }
}

impl ScheduleSettings {
    pub(super) fn validate(&self, errs: &mut Checks) {
        if self.delay_tiers.is_empty() {
            errs.fail("schedule.delay_tiers", "needs at least one tier");
        }
        if self.delay_tiers.windows(2).any(|w| w[0] >= w[1]) {
            errs.fail("schedule.delay_tiers", "must be strictly increasing");
        }
        if self.delay_tiers.iter().any(|d| d.as_millis() < 100) {
            errs.fail("schedule.delay_tiers", "each tier must be at least 100ms");
        }
        if self.max_in_flight == 0 {
            errs.fail("schedule.max_in_flight", "must be >= 1");
        }
        if self.max_batch == 0 {
            errs.fail("schedule.max_batch", "must be >= 1");
        }
        errs.check(positive("schedule.record_budget", self.record_budget));
    }
}

impl DeadLetterSettings {
    pub(super) fn validate(&self, errs: &mut Checks) {
        if !(self.max_ratio > 0.0 && self.max_ratio <= 1.0) {
            errs.fail("dead_letter.max_ratio", "must be in (0, 1]");
        }
        if self.window == 0 {
            errs.fail("dead_letter.window", "must be >= 1");
        }
        if self.max_consecutive == 0 {
            errs.fail("dead_letter.max_consecutive", "must be >= 1");
        }
    }
}

impl ServerSettings {
    pub(super) fn validate(&self, errs: &mut Checks) {
        if let Err(e) = self.listen.parse::<std::net::SocketAddr>() {
            errs.fail("server.listen", e.to_string());
        }
        errs.check(positive("server.stall_timeout", self.stall_timeout));
    }
}

impl ShutdownSettings {
    pub(super) fn validate(&self, errs: &mut Checks) {
        errs.check(positive("shutdown.timeout", self.timeout));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::test_env::*;
    use crate::config::Settings;

    #[test]
    fn delay_tiers_from_env_list() {
        let s = Settings::load_from(None, with(&[("INSIGHTS__SCHEDULE__DELAY_TIERS", "1s,5s")]))
            .unwrap();
        assert_eq!(
            s.schedule.delay_tiers,
            vec![Duration::from_secs(1), Duration::from_secs(5)]
        );
    }
}

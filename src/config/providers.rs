//! `[finbox]` and `[credeau]`: each provider's endpoint, credentials, HTTP
//! client and polling schedule (the last two shared, flattened into both).

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::problem::{must_exist, non_empty, positive, Checks};
use super::secret::secret_keys;
use super::values::{humantime_list, lenient, HttpUrl};
use super::SecretSource;

secret_keys!(api_key_keys, "api_key", "api_key_file");
secret_keys!(server_hash_keys, "server_hash", "server_hash_file");
secret_keys!(auth_token_keys, "auth_token", "auth_token_file");

/// FinBox asks clients to poll no more often than this.
pub const FINBOX_MIN_POLL_INTERVAL: Duration = Duration::from_secs(10);

/// How one provider is polled over time (the durable, Kafka-scheduled part).
#[derive(Debug, Clone, PartialEq)]
pub struct PollPolicy {
    pub initial_delay: Duration,
    pub poll_interval: Duration,
    pub max_poll_interval: Duration,
    pub backoff_multiplier: f64,
    pub deadline: Duration,
    /// FinBox only: how long `not_found` is retried before it is final.
    pub not_found_grace: Option<Duration>,
    /// After this many polls in a row end in a retryable error, the
    /// provider ends `failed`; `None` polls on until the deadline.
    pub max_failed_polls: Option<u32>,
    /// The longest wait a provider's `Retry-After` (or FinBox's suggested
    /// wait) is honoured for at the poll level, when longer than
    /// `max_poll_interval`: the same cap as its in-process retries
    /// (`finbox.retry_max_wait`, `credeau.retry_cap`), so no level shortens
    /// a wait the other would honour.
    pub max_retry_after: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinboxEnvironment {
    Production,
    Staging,
}

/// The HTTP client of one provider and its rate limit: the same keys in
/// `[finbox]` and `[credeau]` (flattened there).
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ProviderHttpSettings {
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// An answer's body that sends no byte for this long is cut.
    #[serde(with = "humantime_serde")]
    pub body_stall_timeout: Duration,
    /// An answer's body that brings fewer bytes than this per second,
    /// over any `body_stall_timeout`, is cut.
    pub min_body_bytes_per_second: u64,
    /// For the whole deployment; each instance takes its share.
    pub rate_limit_per_minute: u32,
    pub max_response_bytes: usize,
    /// Extra CAs to trust (PEM); unset = the system's roots only.
    #[serde(with = "lenient::opt_path")]
    pub ca_bundle: Option<PathBuf>,
}

impl ProviderHttpSettings {
    fn validate(&self, section: &str, errs: &mut Checks) {
        let key = |k: &str| format!("{section}.{k}");
        errs.check(positive(&key("request_timeout"), self.request_timeout));
        errs.check(positive(&key("connect_timeout"), self.connect_timeout));
        errs.check(positive(
            &key("body_stall_timeout"),
            self.body_stall_timeout,
        ));
        if self.rate_limit_per_minute == 0 {
            errs.fail(&key("rate_limit_per_minute"), "must be >= 1");
        }
        if self.max_response_bytes < 1024 {
            errs.fail(&key("max_response_bytes"), "must be at least 1024");
        }
        if let Some(path) = &self.ca_bundle {
            errs.check(must_exist(&key("ca_bundle"), path));
        }
    }
}

/// How one provider is polled over time: the same keys in `[finbox]` and
/// `[credeau]` (flattened there).
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct PollSettings {
    /// First poll this long after onboarding.
    #[serde(with = "humantime_serde")]
    pub initial_delay: Duration,
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub max_poll_interval: Duration,
    pub backoff_multiplier: f64,
    #[serde(with = "humantime_serde")]
    pub deadline: Duration,
    /// Consecutive failed polls before the provider ends `failed`; 0 = no
    /// limit.
    pub max_failed_polls: u32,
}

impl PollSettings {
    /// The policy the decision core follows; `not_found_grace` is FinBox's.
    pub fn policy(&self, not_found_grace: Option<Duration>) -> PollPolicy {
        PollPolicy {
            initial_delay: self.initial_delay,
            poll_interval: self.poll_interval,
            max_poll_interval: self.max_poll_interval,
            backoff_multiplier: self.backoff_multiplier,
            deadline: self.deadline,
            not_found_grace,
            max_failed_polls: (self.max_failed_polls > 0).then_some(self.max_failed_polls),
            max_retry_after: Duration::ZERO,
        }
    }

    fn validate(&self, section: &str, errs: &mut Checks) {
        let key = |k: &str| format!("{section}.{k}");
        errs.check(positive(&key("poll_interval"), self.poll_interval));
        errs.check(positive(&key("deadline"), self.deadline));
        if self.max_poll_interval < self.poll_interval {
            errs.fail(&key("max_poll_interval"), "must be >= poll_interval");
        }
        if !(self.backoff_multiplier >= 1.0 && self.backoff_multiplier <= 10.0) {
            errs.fail(&key("backoff_multiplier"), "must be between 1.0 and 10.0");
        }
        if self.initial_delay >= self.deadline {
            errs.fail(&key("initial_delay"), "must be shorter than the deadline");
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FinboxSettings {
    pub base_url: HttpUrl,
    pub environment: FinboxEnvironment,
    /// `api_key` / `api_key_file`.
    #[serde(flatten, with = "api_key_keys")]
    pub api_key: SecretSource,
    /// `server_hash` / `server_hash_file`.
    #[serde(flatten, with = "server_hash_keys")]
    pub server_hash: SecretSource,
    pub predictors_version: i64,
    #[serde(flatten)]
    pub http: ProviderHttpSettings,
    #[serde(with = "humantime_list")]
    pub retry_delays: Vec<Duration>,
    #[serde(with = "humantime_serde")]
    pub retry_max_wait: Duration,
    #[serde(flatten)]
    pub poll: PollSettings,
    #[serde(with = "humantime_serde")]
    pub not_found_grace: Duration,
}

impl FinboxSettings {
    pub fn poll_policy(&self) -> PollPolicy {
        PollPolicy {
            max_retry_after: self.retry_max_wait,
            ..self.poll.policy(Some(self.not_found_grace))
        }
    }
    /// The predictors endpoint for the configured environment.
    pub fn endpoint(&self) -> String {
        let path = match self.environment {
            FinboxEnvironment::Production => "/v2/risk/predictors",
            FinboxEnvironment::Staging => "/staging/risk/predictors",
        };
        format!("{}{}", self.base_url.as_str().trim_end_matches('/'), path)
    }

    pub(super) fn validate(&self, errs: &mut Checks) {
        if self.base_url.has_credentials() {
            errs.fail(
                "finbox.base_url",
                "must not hold credentials (user:password@); FinBox takes \
                 finbox.api_key (or finbox.api_key_file) and finbox.server_hash instead",
            );
        }
        // A finbox.api_key_file that could not be read is reported on its own.
        if !self.api_key.is_given() {
            errs.fail("finbox.api_key", "is required (or finbox.api_key_file)");
        }
        // A finbox.server_hash_file that could not be read is reported on its own.
        if !self.server_hash.is_given() {
            errs.fail(
                "finbox.server_hash",
                "is required (or finbox.server_hash_file)",
            );
        }
        if self.retry_delays.len() > 10 {
            errs.fail("finbox.retry_delays", "at most 10 retries");
        }
        if self.predictors_version < 1 {
            errs.fail("finbox.predictors_version", "must be >= 1");
        }
        if self.poll.poll_interval < FINBOX_MIN_POLL_INTERVAL {
            errs.fail(
                "finbox.poll_interval",
                "must be at least 10s (FinBox asks for polls at least 10 s apart)",
            );
        }
        self.http.validate("finbox", errs);
        self.poll.validate("finbox", errs);
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CredeauSettings {
    pub base_url: HttpUrl,
    #[serde(deserialize_with = "lenient::string")]
    pub client_id: String,
    /// `auth_token` / `auth_token_file`.
    #[serde(flatten, with = "auth_token_keys")]
    pub auth_token: SecretSource,
    pub cnt_sms_threshold: u32,
    #[serde(flatten)]
    pub http: ProviderHttpSettings,
    pub max_retries: u32,
    #[serde(with = "humantime_serde")]
    pub retry_base: Duration,
    #[serde(with = "humantime_serde")]
    pub retry_cap: Duration,
    #[serde(flatten)]
    pub poll: PollSettings,
    /// Sent as `groupings` in every request when set (a string, a list,
    /// any JSON value); an empty list or string (the default) is not sent.
    /// Read it through [`CredeauSettings::groupings`].
    #[serde(default = "no_groupings")]
    pub groupings: serde_json::Value,
}

fn no_groupings() -> serde_json::Value {
    serde_json::Value::Array(Vec::new())
}

impl CredeauSettings {
    pub fn poll_policy(&self) -> PollPolicy {
        PollPolicy {
            max_retry_after: self.retry_cap,
            ..self.poll.policy(None)
        }
    }
    /// The `groupings` to send, if any: an empty list, empty string or
    /// null means none.
    pub fn groupings(&self) -> Option<&serde_json::Value> {
        use serde_json::Value;
        match &self.groupings {
            Value::Null => None,
            Value::Array(a) if a.is_empty() => None,
            Value::String(s) if s.trim().is_empty() => None,
            g => Some(g),
        }
    }

    pub fn endpoint(&self) -> String {
        format!(
            "{}/api/fetch_extracted_data",
            self.base_url.as_str().trim_end_matches('/')
        )
    }

    pub(super) fn validate(&self, errs: &mut Checks) {
        if self.base_url.has_credentials() {
            errs.fail(
                "credeau.base_url",
                "must not hold credentials (user:password@); Credeau takes \
                 credeau.client_id and credeau.auth_token (or credeau.auth_token_file) instead",
            );
        }
        errs.check(non_empty("credeau.client_id", &self.client_id));
        // A credeau.auth_token_file that could not be read is reported on its own.
        if !self.auth_token.is_given() {
            errs.fail(
                "credeau.auth_token",
                "is required (or credeau.auth_token_file)",
            );
        }
        errs.check(positive("credeau.retry_base", self.retry_base));
        if self.retry_cap < self.retry_base {
            errs.fail("credeau.retry_cap", "must be >= credeau.retry_base");
        }
        if self.max_retries > 10 {
            errs.fail("credeau.max_retries", "must be <= 10");
        }
        if self.cnt_sms_threshold == 0 {
            errs.fail("credeau.cnt_sms_threshold", "must be >= 1");
        }
        if let serde_json::Value::Array(items) = &self.groupings {
            if items
                .iter()
                .any(|g| g.as_str().is_some_and(|s| s.trim().is_empty()))
            {
                errs.fail("credeau.groupings", "holds an empty name");
            }
        }
        self.http.validate("credeau", errs);
        self.poll.validate("credeau", errs);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::test_env::*;
    use crate::config::Settings;

    #[test]
    fn finbox_poll_interval_below_ten_seconds_is_rejected() {
        let t = err_text(with(&[("INSIGHTS__FINBOX__POLL_INTERVAL", "5s")]));
        assert!(t.contains("finbox.poll_interval"), "{t}");
    }

    #[test]
    fn bad_duration_names_the_key() {
        let t = err_text(with(&[("INSIGHTS__CREDEAU__DEADLINE", "-3m")]));
        assert!(t.contains("credeau.deadline"), "{t}");
    }

    #[test]
    fn unknown_key_is_rejected() {
        let t = err_text(with(&[("INSIGHTS__FINBOX__POLL_INTERVL", "10s")]));
        assert!(t.contains("poll_intervl"), "{t}");
        // The section's keys, flattened parts included, as a hint.
        assert!(t.contains("expected one of `api_key`"), "{t}");
        assert!(t.contains("`poll_interval`"), "{t}");
        let t = err_text(with(&[("INSIGHTS__KAFKA__SASL_PASWORD", "x")]));
        assert!(t.contains("`sasl_password_file`"), "{t}");
    }

    #[test]
    fn bad_url_names_the_key() {
        let t = err_text(with(&[("INSIGHTS__CREDEAU__BASE_URL", "ftp://x")]));
        assert!(t.contains("credeau.base_url"), "{t}");
        let t = err_text(with(&[("INSIGHTS__FINBOX__BASE_URL", "not a url")]));
        assert!(t.contains("finbox.base_url"), "{t}");
    }

    #[test]
    fn credeau_groupings_are_optional_and_taken_as_given() {
        let s = Settings::load_from(None, base_env()).unwrap();
        assert_eq!(s.credeau.groupings(), None);
        assert_eq!(s.finbox.poll_policy().max_failed_polls, Some(3));
        assert_eq!(s.credeau.poll_policy().max_failed_polls, None);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(
            &p,
            "[credeau]\ngroupings = [\"bank\", \"upi\"]\nmax_failed_polls = 5\n",
        )
        .unwrap();
        let s = Settings::load_from(Some(&p), base_env()).unwrap();
        assert_eq!(
            s.credeau.groupings(),
            Some(&serde_json::json!(["bank", "upi"]))
        );
        assert_eq!(s.credeau.poll_policy().max_failed_polls, Some(5));
        assert!(s.to_redacted_toml().contains("groupings"));
        let s =
            Settings::load_from(None, with(&[("INSIGHTS__CREDEAU__GROUPINGS", "bank")])).unwrap();
        assert_eq!(s.credeau.groupings(), Some(&serde_json::json!("bank")));
        std::fs::write(&p, "[credeau]\ngroupings = [\"bank\", \" \"]\n").unwrap();
        let t = Settings::load_from(Some(&p), base_env())
            .unwrap_err()
            .to_string();
        assert!(t.contains("credeau.groupings"), "{t}");
        let s = Settings::load_from(None, with(&[("INSIGHTS__FINBOX__MAX_FAILED_POLLS", "0")]))
            .unwrap();
        assert_eq!(s.finbox.poll_policy().max_failed_polls, None);
    }

    /// The keys both providers share (read into `ProviderHttpSettings` and
    /// `PollSettings`) keep their names, in TOML and in the environment.
    #[test]
    fn shared_provider_keys_load_from_toml_and_env_for_both_providers() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "pem").unwrap();
        let p = dir.path().join("c.toml");
        for section in ["finbox", "credeau"] {
            std::fs::write(
                &p,
                format!(
                    "[{section}]\nrequest_timeout = \"7s\"\nconnect_timeout = \"3s\"\n\
                     rate_limit_per_minute = 77\nmax_response_bytes = 4096\n\
                     ca_bundle = \"{}\"\ninitial_delay = \"40s\"\npoll_interval = \"20s\"\n\
                     max_poll_interval = \"3m\"\nbackoff_multiplier = 3.0\ndeadline = \"2h\"\n\
                     max_failed_polls = 4\n",
                    ca.display()
                ),
            )
            .unwrap();
            let s = Settings::load_from(Some(&p), base_env()).unwrap();
            let (http, poll) = match section {
                "finbox" => (&s.finbox.http, &s.finbox.poll),
                _ => (&s.credeau.http, &s.credeau.poll),
            };
            assert_eq!(http.request_timeout, Duration::from_secs(7), "{section}");
            assert_eq!(http.connect_timeout, Duration::from_secs(3), "{section}");
            assert_eq!(http.rate_limit_per_minute, 77, "{section}");
            assert_eq!(http.max_response_bytes, 4096, "{section}");
            assert_eq!(http.ca_bundle.as_deref(), Some(ca.as_path()), "{section}");
            assert_eq!(poll.initial_delay, Duration::from_secs(40), "{section}");
            assert_eq!(poll.poll_interval, Duration::from_secs(20), "{section}");
            assert_eq!(
                poll.max_poll_interval,
                Duration::from_secs(180),
                "{section}"
            );
            assert_eq!(poll.backoff_multiplier, 3.0, "{section}");
            assert_eq!(poll.deadline, Duration::from_secs(7200), "{section}");
            assert_eq!(poll.max_failed_polls, 4, "{section}");

            let var = |k: &str| format!("INSIGHTS__{}__{k}", section.to_uppercase());
            let env: Vec<(String, String)> = base_env()
                .into_iter()
                .chain(
                    [
                        ("REQUEST_TIMEOUT", "8s"),
                        ("CONNECT_TIMEOUT", "2s"),
                        ("RATE_LIMIT_PER_MINUTE", "88"),
                        ("MAX_RESPONSE_BYTES", "8192"),
                        ("CA_BUNDLE", ca.to_str().unwrap()),
                        ("INITIAL_DELAY", "50s"),
                        ("POLL_INTERVAL", "30s"),
                        ("MAX_POLL_INTERVAL", "4m"),
                        ("BACKOFF_MULTIPLIER", "2"),
                        ("DEADLINE", "3h"),
                        ("MAX_FAILED_POLLS", "6"),
                    ]
                    .iter()
                    .map(|(k, v)| (var(k), v.to_string())),
                )
                .collect();
            let s = Settings::load_from(None, env).unwrap();
            let (http, poll) = match section {
                "finbox" => (&s.finbox.http, &s.finbox.poll),
                _ => (&s.credeau.http, &s.credeau.poll),
            };
            assert_eq!(http.request_timeout, Duration::from_secs(8), "{section}");
            assert_eq!(http.connect_timeout, Duration::from_secs(2), "{section}");
            assert_eq!(http.rate_limit_per_minute, 88, "{section}");
            assert_eq!(http.max_response_bytes, 8192, "{section}");
            assert_eq!(http.ca_bundle.as_deref(), Some(ca.as_path()), "{section}");
            assert_eq!(poll.initial_delay, Duration::from_secs(50), "{section}");
            assert_eq!(poll.poll_interval, Duration::from_secs(30), "{section}");
            assert_eq!(
                poll.max_poll_interval,
                Duration::from_secs(240),
                "{section}"
            );
            assert_eq!(poll.backoff_multiplier, 2.0, "{section}");
            assert_eq!(poll.deadline, Duration::from_secs(3 * 3600), "{section}");
            assert_eq!(poll.max_failed_polls, 6, "{section}");
            // The redacted TOML keeps the flat keys.
            let shown: toml::Table = toml::from_str(&s.to_redacted_toml()).unwrap();
            let shown = shown[section].as_table().unwrap();
            for key in [
                "request_timeout",
                "ca_bundle",
                "poll_interval",
                "max_failed_polls",
            ] {
                assert!(shown.contains_key(key), "{section}.{key} in {shown:?}");
            }
            // A misspelt shared key is still refused.
            let t = err_text(with(&[(var("POLL_INTERVL").as_str(), "10s")]));
            assert!(t.contains(&format!("{section}.poll_intervl")), "{t}");
        }
    }
}

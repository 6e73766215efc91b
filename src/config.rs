//! Service configuration: built-in defaults (`config/default.toml`, compiled
//! in), then an optional TOML file, then `INSIGHTS__SECTION__KEY` environment
//! variables. Secrets may come from files and are held in `secrecy` types.
//! [`Settings::load`] validates everything and names the offending key.

use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize, Serializer};

/// The documented defaults, compiled into the binary so the file and the
/// behaviour can never disagree.
pub const DEFAULTS_TOML: &str = include_str!("../config/default.toml");

/// FinBox asks clients to poll no more often than this.
pub const FINBOX_MIN_POLL_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Load(#[from] config::ConfigError),
    #[error("configuration key `{key}`: {reason}")]
    Invalid { key: String, reason: String },
}

impl ConfigError {
    fn invalid(key: &str, reason: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.to_string(),
            reason: reason.into(),
        }
    }
}

/// A secret value. Serializes as `"<redacted>"` (or `""` when unset) so
/// printing a configuration can never leak it; `Debug` is redacted too.
#[derive(Clone, Default, Deserialize)]
#[serde(transparent)]
pub struct Secret(Option<SecretString>);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        let v: String = value.into();
        if v.is_empty() {
            Secret(None)
        } else {
            Secret(Some(SecretString::from(v)))
        }
    }
    pub fn is_set(&self) -> bool {
        self.0
            .as_ref()
            .is_some_and(|s| !s.expose_secret().is_empty())
    }
    /// The secret's value; call only where it is sent to its destination.
    pub fn expose(&self) -> &str {
        self.0.as_ref().map(|s| s.expose_secret()).unwrap_or("")
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.is_set() {
            "<redacted>"
        } else {
            "<unset>"
        })
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(if self.is_set() { "<redacted>" } else { "" })
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub log: LogSettings,
    pub kafka: KafkaSettings,
    pub topics: TopicSettings,
    pub encoding: EncodingSettings,
    pub schedule: ScheduleSettings,
    pub finbox: FinboxSettings,
    pub credeau: CredeauSettings,
    pub dead_letter: DeadLetterSettings,
    pub server: ServerSettings,
    pub shutdown: ShutdownSettings,
}

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

/// How the group spreads partitions over its members.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PartitionAssignment {
    /// Each topic's partitions split evenly over the members (eager
    /// rebalances): every instance gets its part of the input and of each
    /// delay tier, so its share of the provider rate limits follows its
    /// share of the work.
    Range,
    /// Incremental rebalances that move as few partitions as possible, but
    /// balance only the total count: one instance may hold every input
    /// partition while another holds only delay tiers.
    CooperativeSticky,
}

impl PartitionAssignment {
    pub fn as_librdkafka(self) -> &'static str {
        match self {
            PartitionAssignment::Range => "range",
            PartitionAssignment::CooperativeSticky => "cooperative-sticky",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SecurityProtocol {
    Plaintext,
    Ssl,
    SaslPlaintext,
    SaslSsl,
}

impl SecurityProtocol {
    pub fn as_librdkafka(self) -> &'static str {
        match self {
            SecurityProtocol::Plaintext => "plaintext",
            SecurityProtocol::Ssl => "ssl",
            SecurityProtocol::SaslPlaintext => "sasl_plaintext",
            SecurityProtocol::SaslSsl => "sasl_ssl",
        }
    }
    pub fn uses_sasl(self) -> bool {
        matches!(
            self,
            SecurityProtocol::SaslPlaintext | SecurityProtocol::SaslSsl
        )
    }
    pub fn uses_tls(self) -> bool {
        matches!(self, SecurityProtocol::Ssl | SecurityProtocol::SaslSsl)
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSettings {
    pub bootstrap_servers: String,
    pub group_id: String,
    pub transactional_id_prefix: String,
    pub security_protocol: SecurityProtocol,
    pub sasl_mechanism: String,
    pub sasl_username: String,
    pub sasl_password: Secret,
    pub sasl_password_file: String,
    pub ssl_ca_location: String,
    pub ssl_certificate_location: String,
    pub ssl_key_location: String,
    pub ssl_key_password: Secret,
    pub ssl_key_password_file: String,
    #[serde(with = "humantime_serde")]
    pub transaction_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub session_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub max_poll_interval: Duration,
    /// KIP-345 static membership: `group.instance.id` from the pod name,
    /// so a restarted pod of the same name takes its partitions back at
    /// once instead of after a rebalance.
    pub static_membership: bool,
    pub partition_assignment: PartitionAssignment,
    pub extra: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TopicSettings {
    pub input: String,
    pub finbox_predictors: String,
    pub sms_extraction: String,
    pub combined: String,
    pub dead_letter: String,
    pub delay_prefix: String,
    pub create: bool,
    pub partitions: i32,
    pub replication_factor: i32,
    pub max_message_bytes: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum InputEncoding {
    Auto,
    Json,
    Avro,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputEncoding {
    Json,
    Avro,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EncodingSettings {
    pub input: InputEncoding,
    pub output: OutputEncoding,
    pub schema_registry_url: String,
    /// Input records larger than this are dead-lettered unparsed.
    pub max_input_bytes: usize,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSettings {
    #[serde(with = "humantime_list")]
    pub delay_tiers: Vec<Duration>,
    pub max_in_flight: usize,
    pub max_batch: usize,
    #[serde(with = "humantime_serde")]
    pub batch_linger: Duration,
    #[serde(with = "humantime_serde")]
    pub record_budget: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinboxEnvironment {
    Production,
    Staging,
}

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
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FinboxSettings {
    pub base_url: String,
    pub environment: FinboxEnvironment,
    pub api_key: Secret,
    pub api_key_file: String,
    pub server_hash: Secret,
    pub server_hash_file: String,
    pub predictors_version: i64,
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    pub rate_limit_per_minute: u32,
    pub max_response_bytes: usize,
    pub ca_bundle: String,
    #[serde(with = "humantime_list")]
    pub retry_delays: Vec<Duration>,
    #[serde(with = "humantime_serde")]
    pub retry_max_wait: Duration,
    #[serde(with = "humantime_serde")]
    pub initial_delay: Duration,
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub max_poll_interval: Duration,
    pub backoff_multiplier: f64,
    #[serde(with = "humantime_serde")]
    pub not_found_grace: Duration,
    #[serde(with = "humantime_serde")]
    pub deadline: Duration,
    /// Consecutive failed polls before FinBox ends `failed`; 0 = no limit.
    pub max_failed_polls: u32,
}

impl FinboxSettings {
    pub fn poll_policy(&self) -> PollPolicy {
        PollPolicy {
            initial_delay: self.initial_delay,
            poll_interval: self.poll_interval,
            max_poll_interval: self.max_poll_interval,
            backoff_multiplier: self.backoff_multiplier,
            deadline: self.deadline,
            not_found_grace: Some(self.not_found_grace),
            max_failed_polls: (self.max_failed_polls > 0).then_some(self.max_failed_polls),
        }
    }
    /// The predictors endpoint for the configured environment.
    pub fn endpoint(&self) -> String {
        let path = match self.environment {
            FinboxEnvironment::Production => "/v2/risk/predictors",
            FinboxEnvironment::Staging => "/staging/risk/predictors",
        };
        format!("{}{}", self.base_url.trim_end_matches('/'), path)
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CredeauSettings {
    pub base_url: String,
    pub client_id: String,
    pub auth_token: Secret,
    pub auth_token_file: String,
    pub cnt_sms_threshold: u32,
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    pub rate_limit_per_minute: u32,
    pub max_response_bytes: usize,
    pub ca_bundle: String,
    pub max_retries: u32,
    #[serde(with = "humantime_serde")]
    pub retry_base: Duration,
    #[serde(with = "humantime_serde")]
    pub retry_cap: Duration,
    #[serde(with = "humantime_serde")]
    pub initial_delay: Duration,
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub max_poll_interval: Duration,
    pub backoff_multiplier: f64,
    #[serde(with = "humantime_serde")]
    pub deadline: Duration,
    /// Consecutive failed polls before Credeau ends `failed`; 0 = no limit.
    pub max_failed_polls: u32,
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
            initial_delay: self.initial_delay,
            poll_interval: self.poll_interval,
            max_poll_interval: self.max_poll_interval,
            backoff_multiplier: self.backoff_multiplier,
            deadline: self.deadline,
            not_found_grace: None,
            max_failed_polls: (self.max_failed_polls > 0).then_some(self.max_failed_polls),
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
            self.base_url.trim_end_matches('/')
        )
    }
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

/// A list of humantime durations, from TOML (`["10s", "1m"]`) or from one
/// environment variable (`"10s,1m"`).
mod humantime_list {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum ListOrString {
        List(Vec<String>),
        One(String),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
        let items = match ListOrString::deserialize(d)? {
            ListOrString::List(v) => v,
            ListOrString::One(s) => s
                .split(',')
                .map(|p| p.trim().to_string())
                .filter(|p| !p.is_empty())
                .collect(),
        };
        items
            .iter()
            .map(|s| humantime::parse_duration(s).map_err(serde::de::Error::custom))
            .collect()
    }

    pub fn serialize<S: Serializer>(v: &[Duration], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(|d| humantime::format_duration(*d).to_string()))
    }
}

impl Settings {
    /// Defaults, then `file`, then the process environment.
    pub fn load(file: Option<&Path>) -> Result<Settings, ConfigError> {
        Self::load_from(file, std::env::vars())
    }

    /// As [`Settings::load`], with the environment given explicitly (tests).
    pub fn load_from(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Settings, ConfigError> {
        let mut builder = config::Config::builder().add_source(config::File::from_str(
            DEFAULTS_TOML,
            config::FileFormat::Toml,
        ));
        if let Some(path) = file {
            if !path.exists() {
                return Err(ConfigError::invalid(
                    "--config",
                    format!("file {} does not exist", path.display()),
                ));
            }
            check_toml_syntax(path)?;
            builder = builder.add_source(
                config::File::from(path.to_path_buf())
                    .format(config::FileFormat::Toml)
                    .required(true),
            );
        }
        let env_map: config::Map<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("INSIGHTS__"))
            .collect();
        builder = builder.add_source(
            config::Environment::with_prefix("INSIGHTS")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true)
                .source(Some(env_map)),
        );
        let mut settings: Settings = builder.build()?.try_deserialize()?;
        settings.resolve_secret_files()?;
        settings.validate()?;
        Ok(settings)
    }

    fn resolve_secret_files(&mut self) -> Result<(), ConfigError> {
        read_secret_file(
            "finbox.api_key",
            &mut self.finbox.api_key,
            &self.finbox.api_key_file,
        )?;
        read_secret_file(
            "finbox.server_hash",
            &mut self.finbox.server_hash,
            &self.finbox.server_hash_file,
        )?;
        read_secret_file(
            "credeau.auth_token",
            &mut self.credeau.auth_token,
            &self.credeau.auth_token_file,
        )?;
        read_secret_file(
            "kafka.sasl_password",
            &mut self.kafka.sasl_password,
            &self.kafka.sasl_password_file,
        )?;
        read_secret_file(
            "kafka.ssl_key_password",
            &mut self.kafka.ssl_key_password,
            &self.kafka.ssl_key_password_file,
        )?;
        Ok(())
    }

    /// Rejects values that would only fail later (or silently misbehave).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let level = &self.log.level;
        tracing_subscriber::EnvFilter::try_new(level)
            .map_err(|e| ConfigError::invalid("log.level", e.to_string()))?;

        let k = &self.kafka;
        non_empty("kafka.bootstrap_servers", &k.bootstrap_servers)?;
        non_empty("kafka.group_id", &k.group_id)?;
        non_empty("kafka.transactional_id_prefix", &k.transactional_id_prefix)?;
        if k.security_protocol.uses_sasl() {
            match k.sasl_mechanism.as_str() {
                "PLAIN" | "SCRAM-SHA-256" | "SCRAM-SHA-512" => {}
                other => {
                    return Err(ConfigError::invalid(
                        "kafka.sasl_mechanism",
                        format!(
                        "must be PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 with SASL, got {other:?}"
                    ),
                    ))
                }
            }
            non_empty("kafka.sasl_username", &k.sasl_username)?;
            if !k.sasl_password.is_set() {
                return Err(ConfigError::invalid(
                    "kafka.sasl_password",
                    "is required with SASL (or kafka.sasl_password_file)",
                ));
            }
        } else if !k.sasl_mechanism.is_empty() {
            return Err(ConfigError::invalid(
                "kafka.sasl_mechanism",
                "is set but kafka.security_protocol does not use SASL",
            ));
        }
        for (key, path) in [
            ("kafka.ssl_ca_location", &k.ssl_ca_location),
            (
                "kafka.ssl_certificate_location",
                &k.ssl_certificate_location,
            ),
            ("kafka.ssl_key_location", &k.ssl_key_location),
        ] {
            if !path.is_empty() {
                if !k.security_protocol.uses_tls() {
                    return Err(ConfigError::invalid(
                        key,
                        "is set but kafka.security_protocol does not use TLS",
                    ));
                }
                must_exist(key, path)?;
            }
        }
        if k.ssl_certificate_location.is_empty() != k.ssl_key_location.is_empty() {
            return Err(ConfigError::invalid(
                "kafka.ssl_key_location",
                "a client certificate needs both ssl_certificate_location and ssl_key_location",
            ));
        }
        positive("kafka.transaction_timeout", k.transaction_timeout)?;
        positive("kafka.session_timeout", k.session_timeout)?;
        if k.max_poll_interval < k.session_timeout {
            return Err(ConfigError::invalid(
                "kafka.max_poll_interval",
                "must be at least kafka.session_timeout",
            ));
        }

        let t = &self.topics;
        let names = [
            ("topics.input", &t.input),
            ("topics.finbox_predictors", &t.finbox_predictors),
            ("topics.sms_extraction", &t.sms_extraction),
            ("topics.combined", &t.combined),
            ("topics.dead_letter", &t.dead_letter),
            ("topics.delay_prefix", &t.delay_prefix),
        ];
        for (i, (key, name)) in names.iter().enumerate() {
            topic_name(key, name)?;
            if names[..i].iter().any(|(_, other)| other == name) {
                return Err(ConfigError::invalid(
                    key,
                    format!("topic {name:?} is used twice"),
                ));
            }
        }
        if t.partitions < 1 {
            return Err(ConfigError::invalid("topics.partitions", "must be >= 1"));
        }
        if t.replication_factor < 1 {
            return Err(ConfigError::invalid(
                "topics.replication_factor",
                "must be >= 1",
            ));
        }
        if t.max_message_bytes < 1024 * 1024 {
            return Err(ConfigError::invalid(
                "topics.max_message_bytes",
                "must be at least 1048576",
            ));
        }

        let e = &self.encoding;
        let needs_registry = e.output == OutputEncoding::Avro || e.input != InputEncoding::Json;
        if !e.schema_registry_url.is_empty() {
            http_url("encoding.schema_registry_url", &e.schema_registry_url)?;
        } else if e.output == OutputEncoding::Avro || e.input == InputEncoding::Avro {
            return Err(ConfigError::invalid(
                "encoding.schema_registry_url",
                "is required when Avro is used",
            ));
        }
        let _ = needs_registry;
        if e.max_input_bytes < 1024 {
            return Err(ConfigError::invalid(
                "encoding.max_input_bytes",
                "must be at least 1024",
            ));
        }

        let s = &self.schedule;
        if s.delay_tiers.is_empty() {
            return Err(ConfigError::invalid(
                "schedule.delay_tiers",
                "needs at least one tier",
            ));
        }
        if s.delay_tiers.windows(2).any(|w| w[0] >= w[1]) {
            return Err(ConfigError::invalid(
                "schedule.delay_tiers",
                "must be strictly increasing",
            ));
        }
        if s.delay_tiers.iter().any(|d| d.as_millis() < 100) {
            return Err(ConfigError::invalid(
                "schedule.delay_tiers",
                "each tier must be at least 100ms",
            ));
        }
        if s.max_in_flight == 0 {
            return Err(ConfigError::invalid(
                "schedule.max_in_flight",
                "must be >= 1",
            ));
        }
        if s.max_batch == 0 {
            return Err(ConfigError::invalid("schedule.max_batch", "must be >= 1"));
        }
        positive("schedule.record_budget", s.record_budget)?;
        // A batch waits for its slowest record: the budget must leave room
        // for the transaction within the stall timeout, and keep a batch
        // far inside the group's poll interval.
        if s.record_budget * 2 > self.server.stall_timeout {
            return Err(ConfigError::invalid(
                "schedule.record_budget",
                format!(
                    "must be at most half of server.stall_timeout ({}), or a slow provider fails liveness",
                    humantime::format_duration(self.server.stall_timeout)
                ),
            ));
        }
        if s.record_budget * 2 > self.kafka.max_poll_interval {
            return Err(ConfigError::invalid(
                "schedule.record_budget",
                format!(
                    "must be at most half of kafka.max_poll_interval ({})",
                    humantime::format_duration(self.kafka.max_poll_interval)
                ),
            ));
        }

        let f = &self.finbox;
        http_url("finbox.base_url", &f.base_url)?;
        if !f.api_key.is_set() {
            return Err(ConfigError::invalid(
                "finbox.api_key",
                "is required (or finbox.api_key_file)",
            ));
        }
        if !f.server_hash.is_set() {
            return Err(ConfigError::invalid(
                "finbox.server_hash",
                "is required (or finbox.server_hash_file)",
            ));
        }
        if f.retry_delays.len() > 10 {
            return Err(ConfigError::invalid(
                "finbox.retry_delays",
                "at most 10 retries",
            ));
        }
        if f.predictors_version < 1 {
            return Err(ConfigError::invalid(
                "finbox.predictors_version",
                "must be >= 1",
            ));
        }
        if f.poll_interval < FINBOX_MIN_POLL_INTERVAL {
            return Err(ConfigError::invalid(
                "finbox.poll_interval",
                "must be at least 10s (FinBox asks for polls at least 10 s apart)",
            ));
        }
        self.common_provider_checks(
            "finbox",
            f.request_timeout,
            f.connect_timeout,
            f.rate_limit_per_minute,
            f.max_response_bytes,
            &f.ca_bundle,
            &f.poll_policy(),
        )?;

        let c = &self.credeau;
        http_url("credeau.base_url", &c.base_url)?;
        non_empty("credeau.client_id", &c.client_id)?;
        if !c.auth_token.is_set() {
            return Err(ConfigError::invalid(
                "credeau.auth_token",
                "is required (or credeau.auth_token_file)",
            ));
        }
        positive("credeau.retry_base", c.retry_base)?;
        if c.retry_cap < c.retry_base {
            return Err(ConfigError::invalid(
                "credeau.retry_cap",
                "must be >= credeau.retry_base",
            ));
        }
        if c.max_retries > 10 {
            return Err(ConfigError::invalid("credeau.max_retries", "must be <= 10"));
        }
        if c.cnt_sms_threshold == 0 {
            return Err(ConfigError::invalid(
                "credeau.cnt_sms_threshold",
                "must be >= 1",
            ));
        }
        if let serde_json::Value::Array(items) = &c.groupings {
            if items
                .iter()
                .any(|g| g.as_str().is_some_and(|s| s.trim().is_empty()))
            {
                return Err(ConfigError::invalid(
                    "credeau.groupings",
                    "holds an empty name",
                ));
            }
        }
        self.common_provider_checks(
            "credeau",
            c.request_timeout,
            c.connect_timeout,
            c.rate_limit_per_minute,
            c.max_response_bytes,
            &c.ca_bundle,
            &c.poll_policy(),
        )?;

        let d = &self.dead_letter;
        if !(d.max_ratio > 0.0 && d.max_ratio <= 1.0) {
            return Err(ConfigError::invalid(
                "dead_letter.max_ratio",
                "must be in (0, 1]",
            ));
        }
        if d.window == 0 {
            return Err(ConfigError::invalid("dead_letter.window", "must be >= 1"));
        }
        if d.max_consecutive == 0 {
            return Err(ConfigError::invalid(
                "dead_letter.max_consecutive",
                "must be >= 1",
            ));
        }

        self.server
            .listen
            .parse::<std::net::SocketAddr>()
            .map_err(|e| ConfigError::invalid("server.listen", e.to_string()))?;
        positive("server.stall_timeout", self.server.stall_timeout)?;
        positive("shutdown.timeout", self.shutdown.timeout)?;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn common_provider_checks(
        &self,
        section: &str,
        request_timeout: Duration,
        connect_timeout: Duration,
        rate_limit_per_minute: u32,
        max_response_bytes: usize,
        ca_bundle: &str,
        policy: &PollPolicy,
    ) -> Result<(), ConfigError> {
        let key = |k: &str| format!("{section}.{k}");
        positive(&key("request_timeout"), request_timeout)?;
        positive(&key("connect_timeout"), connect_timeout)?;
        if rate_limit_per_minute == 0 {
            return Err(ConfigError::invalid(
                &key("rate_limit_per_minute"),
                "must be >= 1",
            ));
        }
        if max_response_bytes < 1024 {
            return Err(ConfigError::invalid(
                &key("max_response_bytes"),
                "must be at least 1024",
            ));
        }
        if !ca_bundle.is_empty() {
            must_exist(&key("ca_bundle"), ca_bundle)?;
        }
        positive(&key("poll_interval"), policy.poll_interval)?;
        positive(&key("deadline"), policy.deadline)?;
        if policy.max_poll_interval < policy.poll_interval {
            return Err(ConfigError::invalid(
                &key("max_poll_interval"),
                "must be >= poll_interval",
            ));
        }
        if !(policy.backoff_multiplier >= 1.0 && policy.backoff_multiplier <= 10.0) {
            return Err(ConfigError::invalid(
                &key("backoff_multiplier"),
                "must be between 1.0 and 10.0",
            ));
        }
        if policy.initial_delay >= policy.deadline {
            return Err(ConfigError::invalid(
                &key("initial_delay"),
                "must be shorter than the deadline",
            ));
        }
        Ok(())
    }

    /// The longest a task may wait in Kafka: delay topics must retain
    /// records at least this long.
    pub fn longest_wait(&self) -> Duration {
        let tier = self
            .schedule
            .delay_tiers
            .last()
            .copied()
            .unwrap_or_default();
        self.finbox.deadline.max(self.credeau.deadline).max(tier)
    }

    /// The configuration as TOML, secrets redacted.
    pub fn to_redacted_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}

fn read_secret_file(key: &str, secret: &mut Secret, file: &str) -> Result<(), ConfigError> {
    if file.is_empty() {
        return Ok(());
    }
    let file_key = format!("{key}_file");
    if secret.is_set() {
        return Err(ConfigError::invalid(
            &file_key,
            format!("set both {key} and {key}_file; choose one"),
        ));
    }
    let text = std::fs::read_to_string(PathBuf::from(file))
        .map_err(|e| ConfigError::invalid(&file_key, format!("cannot read {file}: {e}")))?;
    let value = text.trim_end_matches(['\n', '\r']);
    if value.is_empty() {
        return Err(ConfigError::invalid(&file_key, format!("{file} is empty")));
    }
    *secret = Secret::new(value);
    Ok(())
}

/// Parses the file once on our side so a syntax error is reported by line
/// and column only: the TOML library's own report quotes the offending
/// line, which may hold a secret (`api_key = "abc` without its quote).
fn check_toml_syntax(path: &Path) -> Result<(), ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigError::invalid("--config", format!("cannot read {}: {e}", path.display()))
    })?;
    let Err(e) = toml::from_str::<toml::Table>(&text) else {
        return Ok(());
    };
    let at = e.span().map(|span| {
        let before = &text[..span.start.min(text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.chars().rev().take_while(|c| *c != '\n').count() + 1;
        format!(" at line {line}, column {column}")
    });
    Err(ConfigError::invalid(
        "--config",
        format!(
            "{} is not valid TOML{}: {}",
            path.display(),
            at.unwrap_or_default(),
            e.message()
        ),
    ))
}

fn non_empty(key: &str, value: &str) -> Result<(), ConfigError> {
    if value.trim().is_empty() {
        Err(ConfigError::invalid(key, "must not be empty"))
    } else {
        Ok(())
    }
}

fn positive(key: &str, d: Duration) -> Result<(), ConfigError> {
    if d.is_zero() {
        Err(ConfigError::invalid(key, "must be greater than zero"))
    } else {
        Ok(())
    }
}

fn must_exist(key: &str, path: &str) -> Result<(), ConfigError> {
    if Path::new(path).exists() {
        Ok(())
    } else {
        Err(ConfigError::invalid(
            key,
            format!("file {path} does not exist"),
        ))
    }
}

fn http_url(key: &str, value: &str) -> Result<(), ConfigError> {
    let url = url::Url::parse(value)
        .map_err(|e| ConfigError::invalid(key, format!("not a URL ({e})")))?;
    match url.scheme() {
        "https" | "http" => {}
        other => {
            return Err(ConfigError::invalid(
                key,
                format!("scheme must be https (or http for a local simulator), got {other}"),
            ))
        }
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(ConfigError::invalid(key, "has no host"));
    }
    Ok(())
}

fn topic_name(key: &str, name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 200
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(ConfigError::invalid(
            key,
            format!("{name:?} is not a valid Kafka topic name"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base_env() -> Vec<(String, String)> {
        vec![
            ("INSIGHTS__FINBOX__API_KEY".into(), "fb-key".into()),
            ("INSIGHTS__FINBOX__SERVER_HASH".into(), "fb-hash".into()),
            ("INSIGHTS__CREDEAU__CLIENT_ID".into(), "client".into()),
            ("INSIGHTS__CREDEAU__AUTH_TOKEN".into(), "tok".into()),
        ]
    }

    fn with(extra: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut env = base_env();
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        env
    }

    fn err_text(env: Vec<(String, String)>) -> String {
        Settings::load_from(None, env).unwrap_err().to_string()
    }

    #[test]
    fn defaults_with_required_secrets_load() {
        let s = Settings::load_from(None, base_env()).unwrap();
        assert_eq!(s.finbox.poll_interval, Duration::from_secs(10));
        assert_eq!(s.schedule.delay_tiers.len(), 9);
        assert_eq!(s.finbox.api_key.expose(), "fb-key");
        assert_eq!(
            s.finbox.endpoint(),
            "https://insights.finbox.in/v2/risk/predictors"
        );
    }

    #[test]
    fn missing_secret_names_the_key() {
        let t = err_text(vec![]);
        assert!(t.contains("finbox.api_key"), "{t}");
    }

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
    }

    #[test]
    fn bad_url_names_the_key() {
        let t = err_text(with(&[("INSIGHTS__CREDEAU__BASE_URL", "ftp://x")]));
        assert!(t.contains("credeau.base_url"), "{t}");
        let t = err_text(with(&[("INSIGHTS__FINBOX__BASE_URL", "not a url")]));
        assert!(t.contains("finbox.base_url"), "{t}");
    }

    #[test]
    fn delay_tiers_from_env_list() {
        let s = Settings::load_from(None, with(&[("INSIGHTS__SCHEDULE__DELAY_TIERS", "1s,5s")]))
            .unwrap();
        assert_eq!(
            s.schedule.delay_tiers,
            vec![Duration::from_secs(1), Duration::from_secs(5)]
        );
    }

    #[test]
    fn secrets_from_files_and_redacted_output() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("token");
        std::fs::write(&p, "file-token-value\n").unwrap();
        let mut env: Vec<_> = base_env()
            .into_iter()
            .filter(|(k, _)| k != "INSIGHTS__CREDEAU__AUTH_TOKEN")
            .collect();
        env.push((
            "INSIGHTS__CREDEAU__AUTH_TOKEN_FILE".into(),
            p.display().to_string(),
        ));
        let s = Settings::load_from(None, env).unwrap();
        assert_eq!(s.credeau.auth_token.expose(), "file-token-value");
        let shown = s.to_redacted_toml();
        assert!(!shown.contains("file-token-value"));
        assert!(!shown.contains("fb-key"));
        assert!(!shown.contains("fb-hash"));
        assert!(shown.contains("<redacted>"));
        assert!(!format!("{s:?}").contains("fb-key"));
    }

    #[test]
    fn sasl_without_password_names_the_key() {
        let t = err_text(with(&[
            ("INSIGHTS__KAFKA__SECURITY_PROTOCOL", "sasl_ssl"),
            ("INSIGHTS__KAFKA__SASL_MECHANISM", "SCRAM-SHA-512"),
            ("INSIGHTS__KAFKA__SASL_USERNAME", "svc"),
        ]));
        assert!(t.contains("kafka.sasl_password"), "{t}");
    }

    #[test]
    fn config_file_overrides_defaults_and_env_overrides_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(
            &p,
            "[topics]\ninput = \"from-file\"\ncombined = \"c-file\"\n",
        )
        .unwrap();
        let s = Settings::load_from(Some(&p), with(&[("INSIGHTS__TOPICS__COMBINED", "c-env")]))
            .unwrap();
        assert_eq!(s.topics.input, "from-file");
        assert_eq!(s.topics.combined, "c-env");
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
}

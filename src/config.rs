//! Service configuration: built-in defaults (`config/default.toml`, compiled
//! in), then an optional TOML file, then `INSIGHTS__SECTION__KEY` environment
//! variables. Secrets may come from files and are held in `secrecy` types.
//! [`Settings::load`] validates everything and names the offending key.

use std::collections::BTreeMap;
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
    /// Every bad value found, each with where it came from.
    #[error("{}", render_problems(.0))]
    Problems(Vec<Problem>),
}

impl ConfigError {
    fn invalid(key: &str, reason: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.to_string(),
            reason: reason.into(),
        }
    }
}

/// Where a configuration value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// The `--config` file.
    File(PathBuf),
    /// An `INSIGHTS__SECTION__KEY` variable.
    Env(String),
    /// Neither: the built-in default.
    Default,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::File(p) => write!(f, "set in {}", p.display()),
            Origin::Env(var) => write!(f, "set by environment variable {var}"),
            Origin::Default => f.write_str("not set: built-in default"),
        }
    }
}

/// One bad configuration value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    /// Unknown when the settings were checked without loading them.
    pub origin: Option<Origin>,
    pub reason: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "`{}`", self.key)?;
        if let Some(o) = &self.origin {
            write!(f, " ({o})")?;
        }
        write!(f, ": {}", self.reason)
    }
}

fn render_problems(problems: &[Problem]) -> String {
    match problems {
        [one] => format!("configuration key {one}"),
        many => {
            let mut out = format!("{} configuration problems:", many.len());
            for p in many {
                out.push_str(&format!("\n  - {p}"));
            }
            out
        }
    }
}

/// Problems found so far, in the order found.
#[derive(Debug, Default)]
struct Checks(Vec<(String, Option<Origin>, String)>);

impl Checks {
    fn fail(&mut self, key: &str, reason: impl Into<String>) {
        self.0.push((key.to_string(), None, reason.into()));
    }
    fn fail_from(&mut self, key: &str, origin: Origin, reason: String) {
        self.0.push((key.to_string(), Some(origin), reason));
    }
    fn check(&mut self, r: Result<(), ConfigError>) {
        match r {
            Ok(()) => {}
            Err(ConfigError::Invalid { key, reason }) => self.0.push((key, None, reason)),
            Err(ConfigError::Problems(ps)) => {
                self.0
                    .extend(ps.into_iter().map(|p| (p.key, p.origin, p.reason)));
            }
            Err(ConfigError::Load(e)) => {
                self.0
                    .push(("configuration".to_string(), None, load_reason(&e)));
            }
        }
    }
    fn into_error(self, origins: &Origins) -> ConfigError {
        ConfigError::Problems(
            self.0
                .into_iter()
                .map(|(key, origin, reason)| Problem {
                    origin: origin.or_else(|| origins.of(&key)),
                    key,
                    reason,
                })
                .collect(),
        )
    }
    fn into_result(self, origins: &Origins) -> Result<(), ConfigError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(self.into_error(origins))
        }
    }
}

/// Which keys the file and the environment set.
#[derive(Debug, Default)]
struct Origins {
    /// False when nothing is known (checks without loading).
    known: bool,
    set: BTreeMap<String, Origin>,
}

impl Origins {
    fn of(&self, key: &str) -> Option<Origin> {
        if !self.known || key.starts_with("--") {
            return None;
        }
        Some(self.set.get(key).cloned().unwrap_or(Origin::Default))
    }
}

const ENV_PREFIX: &str = "INSIGHTS__";

/// `INSIGHTS__KAFKA__BOOTSTRAP_SERVERS` -> `kafka.bootstrap_servers`, as the
/// `config` crate maps it.
fn env_key(var: &str) -> String {
    var[ENV_PREFIX.len()..].to_lowercase().replace("__", ".")
}

/// The defaults, then a TOML document, then environment variables.
fn with_defaults(
    file_toml: Option<&str>,
    env: BTreeMap<String, String>,
) -> Result<Settings, config::ConfigError> {
    let mut builder = config::Config::builder().add_source(config::File::from_str(
        DEFAULTS_TOML,
        config::FileFormat::Toml,
    ));
    if let Some(text) = file_toml {
        builder = builder.add_source(config::File::from_str(text, config::FileFormat::Toml));
    }
    builder = builder.add_source(
        config::Environment::with_prefix("INSIGHTS")
            .prefix_separator("__")
            .separator("__")
            .try_parsing(true)
            .source(Some(env.into_iter().collect())),
    );
    builder.build()?.try_deserialize()
}

/// The `config` crate's reason without the key and origin it appends (the
/// problem names both itself).
fn load_reason(e: &config::ConfigError) -> String {
    match e {
        config::ConfigError::Type {
            unexpected,
            expected,
            ..
        } => format!("invalid type: {unexpected}, expected {expected}"),
        config::ConfigError::At { error, .. } => load_reason(error),
        other => other.to_string(),
    }
}

/// The paths of every value in a TOML table (a nested table is a section,
/// not a value, unless it is empty).
fn flatten_keys(prefix: &mut Vec<String>, table: &toml::Table, out: &mut Vec<Vec<String>>) {
    for (k, v) in table {
        prefix.push(k.clone());
        match v {
            toml::Value::Table(t) if !t.is_empty() => flatten_keys(prefix, t, out),
            _ => out.push(prefix.clone()),
        }
        prefix.pop();
    }
}

/// A table holding only the value at `path`.
fn single_key_table(table: &toml::Table, path: &[String]) -> toml::Table {
    let mut value = None;
    let mut t = table;
    for (i, seg) in path.iter().enumerate() {
        match t.get(seg) {
            Some(toml::Value::Table(inner)) if i + 1 < path.len() => t = inner,
            Some(v) if i + 1 == path.len() => value = Some(v.clone()),
            _ => break,
        }
    }
    let mut out = toml::Table::new();
    if let (Some(v), Some((last, parents))) = (value, path.split_last()) {
        let mut leaf = toml::Table::new();
        leaf.insert(last.clone(), v);
        for seg in parents.iter().rev() {
            let mut up = toml::Table::new();
            up.insert(seg.clone(), toml::Value::Table(leaf));
            leaf = up;
        }
        out = leaf;
    }
    out
}

fn remove_key(table: &mut toml::Table, path: &[String]) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut t = table;
    for seg in parents {
        match t.get_mut(seg) {
            Some(toml::Value::Table(inner)) => t = inner,
            _ => return,
        }
    }
    t.remove(last);
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
    /// Bytes of consumed records read and not yet committed, at most.
    pub max_in_flight_bytes: usize,
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
    ///
    /// Every problem is reported at once, each naming its key and where
    /// the value came from, in a stable order: the file's keys (sorted),
    /// then the environment's (sorted by variable), then the checks of
    /// [`Settings::validate`] in their order. Each value given is first
    /// checked on its own over the defaults, so one wrong type cannot hide
    /// another; a value found wrong is left out (its default stands in) so
    /// the remaining checks still run.
    pub fn load_from(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Settings, ConfigError> {
        let mut file_table = match file {
            Some(path) => {
                if !path.exists() {
                    return Err(ConfigError::invalid(
                        "--config",
                        format!("file {} does not exist", path.display()),
                    ));
                }
                Some((path, check_toml_syntax(path)?))
            }
            None => None,
        };
        let mut env_vars: BTreeMap<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(ENV_PREFIX))
            .collect();

        let mut origins = Origins {
            known: true,
            ..Origins::default()
        };
        let mut errs = Checks::default();
        if let Some((path, table)) = &mut file_table {
            let mut paths = Vec::new();
            flatten_keys(&mut Vec::new(), table, &mut paths);
            let mut bad = Vec::new();
            for p in paths {
                let key = p.join(".");
                let origin = Origin::File(path.to_path_buf());
                let source = toml::to_string(&single_key_table(table, &p)).unwrap_or_default();
                if let Err(e) = with_defaults(Some(&source), BTreeMap::new()) {
                    errs.fail_from(&key, origin.clone(), load_reason(&e));
                    bad.push(p);
                }
                origins.set.insert(key, origin);
            }
            for p in &bad {
                remove_key(table, p);
            }
        }
        for (var, value) in env_vars.clone() {
            let key = env_key(&var);
            let origin = Origin::Env(var.clone());
            let single = BTreeMap::from([(var.clone(), value)]);
            if let Err(e) = with_defaults(None, single) {
                errs.fail_from(&key, origin.clone(), load_reason(&e));
                env_vars.remove(&var);
            }
            origins.set.insert(key, origin);
        }

        let file_source = file_table
            .as_ref()
            .map(|(_, t)| toml::to_string(t).unwrap_or_default());
        let mut settings = match with_defaults(file_source.as_deref(), env_vars) {
            Ok(s) => s,
            Err(e) => {
                // Each value passed on its own; together they did not.
                errs.check(Err(ConfigError::Load(e)));
                return Err(errs.into_error(&origins));
            }
        };
        settings.resolve_secret_files(&mut errs);
        settings.check_values(&mut errs);
        errs.into_result(&origins)?;
        Ok(settings)
    }

    /// `finbox.server_hash` alone, from the same layers (its `_file` read),
    /// without checking the rest: the `salt` debugging command needs only it.
    pub fn finbox_server_hash(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<String, ConfigError> {
        let file_toml = match file {
            Some(path) if !path.exists() => {
                return Err(ConfigError::invalid(
                    "--config",
                    format!("file {} does not exist", path.display()),
                ))
            }
            Some(path) => Some(toml::to_string(&check_toml_syntax(path)?).unwrap_or_default()),
            None => None,
        };
        let env = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(ENV_PREFIX))
            .collect();
        let mut s = with_defaults(file_toml.as_deref(), env)?;
        read_secret_file(
            "finbox.server_hash",
            &mut s.finbox.server_hash,
            &s.finbox.server_hash_file,
        )?;
        Ok(s.finbox.server_hash.expose().to_string())
    }

    fn resolve_secret_files(&mut self, errs: &mut Checks) {
        for (key, secret, file) in [
            (
                "finbox.api_key",
                &mut self.finbox.api_key,
                &self.finbox.api_key_file,
            ),
            (
                "finbox.server_hash",
                &mut self.finbox.server_hash,
                &self.finbox.server_hash_file,
            ),
            (
                "credeau.auth_token",
                &mut self.credeau.auth_token,
                &self.credeau.auth_token_file,
            ),
            (
                "kafka.sasl_password",
                &mut self.kafka.sasl_password,
                &self.kafka.sasl_password_file,
            ),
            (
                "kafka.ssl_key_password",
                &mut self.kafka.ssl_key_password,
                &self.kafka.ssl_key_password_file,
            ),
        ] {
            errs.check(read_secret_file(key, secret, file));
        }
    }

    /// Rejects values that would only fail later (or silently misbehave).
    /// Every problem is reported, in the order of the checks below.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut errs = Checks::default();
        self.check_values(&mut errs);
        errs.into_result(&Origins::default())
    }

    fn check_values(&self, errs: &mut Checks) {
        let level = &self.log.level;
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(level) {
            errs.fail("log.level", e.to_string());
        }

        let k = &self.kafka;
        for key in k.extra.keys() {
            if let Some(instead) = owned_kafka_property(key) {
                errs.fail(
                    &format!("kafka.extra.{key}"),
                    format!("is set by the service itself; {instead}"),
                );
            }
        }
        errs.check(non_empty("kafka.bootstrap_servers", &k.bootstrap_servers));
        errs.check(non_empty("kafka.group_id", &k.group_id));
        errs.check(non_empty(
            "kafka.transactional_id_prefix",
            &k.transactional_id_prefix,
        ));
        if k.security_protocol.uses_sasl() {
            match k.sasl_mechanism.as_str() {
                "PLAIN" | "SCRAM-SHA-256" | "SCRAM-SHA-512" => {}
                other => {
                    errs.fail(
                        "kafka.sasl_mechanism",
                        format!(
                        "must be PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 with SASL, got {other:?}"
                    ),
                    );
                }
            }
            errs.check(non_empty("kafka.sasl_username", &k.sasl_username));
            if !k.sasl_password.is_set() && k.sasl_password_file.is_empty() {
                errs.fail(
                    "kafka.sasl_password",
                    "is required with SASL (or kafka.sasl_password_file)",
                );
            }
        } else if !k.sasl_mechanism.is_empty() {
            errs.fail(
                "kafka.sasl_mechanism",
                "is set but kafka.security_protocol does not use SASL",
            );
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
                    errs.fail(key, "is set but kafka.security_protocol does not use TLS");
                } else {
                    errs.check(must_exist(key, path));
                }
            }
        }
        if k.ssl_certificate_location.is_empty() != k.ssl_key_location.is_empty() {
            errs.fail(
                "kafka.ssl_key_location",
                "a client certificate needs both ssl_certificate_location and ssl_key_location",
            );
        }
        errs.check(positive("kafka.transaction_timeout", k.transaction_timeout));
        errs.check(positive("kafka.session_timeout", k.session_timeout));
        if k.max_poll_interval < k.session_timeout {
            errs.fail(
                "kafka.max_poll_interval",
                "must be at least kafka.session_timeout",
            );
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
            errs.check(topic_name(key, name));
            if names[..i].iter().any(|(_, other)| other == name) {
                errs.fail(key, format!("topic {name:?} is used twice"));
            }
        }
        if t.partitions < 1 {
            errs.fail("topics.partitions", "must be >= 1");
        }
        if t.replication_factor < 1 {
            errs.fail("topics.replication_factor", "must be >= 1");
        }
        if t.max_message_bytes < 1024 * 1024 {
            errs.fail("topics.max_message_bytes", "must be at least 1048576");
        }

        let e = &self.encoding;
        let needs_registry = e.output == OutputEncoding::Avro || e.input != InputEncoding::Json;
        if !e.schema_registry_url.is_empty() {
            errs.check(http_url(
                "encoding.schema_registry_url",
                &e.schema_registry_url,
            ));
        } else if e.output == OutputEncoding::Avro || e.input == InputEncoding::Avro {
            errs.fail(
                "encoding.schema_registry_url",
                "is required when Avro is used",
            );
        }
        let _ = needs_registry;
        if e.max_input_bytes < 1024 {
            errs.fail("encoding.max_input_bytes", "must be at least 1024");
        }

        let s = &self.schedule;
        if s.delay_tiers.is_empty() {
            errs.fail("schedule.delay_tiers", "needs at least one tier");
        }
        if s.delay_tiers.windows(2).any(|w| w[0] >= w[1]) {
            errs.fail("schedule.delay_tiers", "must be strictly increasing");
        }
        if s.delay_tiers.iter().any(|d| d.as_millis() < 100) {
            errs.fail("schedule.delay_tiers", "each tier must be at least 100ms");
        }
        if s.max_in_flight == 0 {
            errs.fail("schedule.max_in_flight", "must be >= 1");
        }
        if s.max_in_flight_bytes < self.encoding.max_input_bytes {
            errs.fail(
                "schedule.max_in_flight_bytes",
                format!(
                    "must be at least encoding.max_input_bytes ({}), or one record of that size stops the reading",
                    self.encoding.max_input_bytes
                ),
            );
        }
        if s.max_batch == 0 {
            errs.fail("schedule.max_batch", "must be >= 1");
        }
        errs.check(positive("schedule.record_budget", s.record_budget));
        // A batch waits for its slowest record: the budget must leave room
        // for the transaction within the stall timeout, and keep a batch
        // far inside the group's poll interval.
        if s.record_budget * 2 > self.server.stall_timeout {
            errs.fail(
                "schedule.record_budget",
                format!(
                    "must be at most half of server.stall_timeout ({}), or a slow provider fails liveness",
                    humantime::format_duration(self.server.stall_timeout)
                ),
            );
        }
        if s.record_budget * 2 > self.kafka.max_poll_interval {
            errs.fail(
                "schedule.record_budget",
                format!(
                    "must be at most half of kafka.max_poll_interval ({})",
                    humantime::format_duration(self.kafka.max_poll_interval)
                ),
            );
        }

        let f = &self.finbox;
        errs.check(http_url("finbox.base_url", &f.base_url));
        // A finbox.api_key_file that could not be read is reported on its own.
        if !f.api_key.is_set() && f.api_key_file.is_empty() {
            errs.fail("finbox.api_key", "is required (or finbox.api_key_file)");
        }
        // A finbox.server_hash_file that could not be read is reported on its own.
        if !f.server_hash.is_set() && f.server_hash_file.is_empty() {
            errs.fail(
                "finbox.server_hash",
                "is required (or finbox.server_hash_file)",
            );
        }
        if f.retry_delays.len() > 10 {
            errs.fail("finbox.retry_delays", "at most 10 retries");
        }
        if f.predictors_version < 1 {
            errs.fail("finbox.predictors_version", "must be >= 1");
        }
        if f.poll_interval < FINBOX_MIN_POLL_INTERVAL {
            errs.fail(
                "finbox.poll_interval",
                "must be at least 10s (FinBox asks for polls at least 10 s apart)",
            );
        }
        Self::common_provider_checks(
            errs,
            "finbox",
            f.request_timeout,
            f.connect_timeout,
            f.rate_limit_per_minute,
            f.max_response_bytes,
            &f.ca_bundle,
            &f.poll_policy(),
        );

        let c = &self.credeau;
        errs.check(http_url("credeau.base_url", &c.base_url));
        errs.check(non_empty("credeau.client_id", &c.client_id));
        // A credeau.auth_token_file that could not be read is reported on its own.
        if !c.auth_token.is_set() && c.auth_token_file.is_empty() {
            errs.fail(
                "credeau.auth_token",
                "is required (or credeau.auth_token_file)",
            );
        }
        errs.check(positive("credeau.retry_base", c.retry_base));
        if c.retry_cap < c.retry_base {
            errs.fail("credeau.retry_cap", "must be >= credeau.retry_base");
        }
        if c.max_retries > 10 {
            errs.fail("credeau.max_retries", "must be <= 10");
        }
        if c.cnt_sms_threshold == 0 {
            errs.fail("credeau.cnt_sms_threshold", "must be >= 1");
        }
        if let serde_json::Value::Array(items) = &c.groupings {
            if items
                .iter()
                .any(|g| g.as_str().is_some_and(|s| s.trim().is_empty()))
            {
                errs.fail("credeau.groupings", "holds an empty name");
            }
        }
        Self::common_provider_checks(
            errs,
            "credeau",
            c.request_timeout,
            c.connect_timeout,
            c.rate_limit_per_minute,
            c.max_response_bytes,
            &c.ca_bundle,
            &c.poll_policy(),
        );

        let d = &self.dead_letter;
        if !(d.max_ratio > 0.0 && d.max_ratio <= 1.0) {
            errs.fail("dead_letter.max_ratio", "must be in (0, 1]");
        }
        if d.window == 0 {
            errs.fail("dead_letter.window", "must be >= 1");
        }
        if d.max_consecutive == 0 {
            errs.fail("dead_letter.max_consecutive", "must be >= 1");
        }

        if let Err(e) = self.server.listen.parse::<std::net::SocketAddr>() {
            errs.fail("server.listen", e.to_string());
        }
        errs.check(positive("server.stall_timeout", self.server.stall_timeout));
        errs.check(positive("shutdown.timeout", self.shutdown.timeout));
    }

    #[allow(clippy::too_many_arguments)]
    fn common_provider_checks(
        errs: &mut Checks,
        section: &str,
        request_timeout: Duration,
        connect_timeout: Duration,
        rate_limit_per_minute: u32,
        max_response_bytes: usize,
        ca_bundle: &str,
        policy: &PollPolicy,
    ) {
        let key = |k: &str| format!("{section}.{k}");
        errs.check(positive(&key("request_timeout"), request_timeout));
        errs.check(positive(&key("connect_timeout"), connect_timeout));
        if rate_limit_per_minute == 0 {
            errs.fail(&key("rate_limit_per_minute"), "must be >= 1");
        }
        if max_response_bytes < 1024 {
            errs.fail(&key("max_response_bytes"), "must be at least 1024");
        }
        if !ca_bundle.is_empty() {
            errs.check(must_exist(&key("ca_bundle"), ca_bundle));
        }
        errs.check(positive(&key("poll_interval"), policy.poll_interval));
        errs.check(positive(&key("deadline"), policy.deadline));
        if policy.max_poll_interval < policy.poll_interval {
            errs.fail(&key("max_poll_interval"), "must be >= poll_interval");
        }
        if !(policy.backoff_multiplier >= 1.0 && policy.backoff_multiplier <= 10.0) {
            errs.fail(&key("backoff_multiplier"), "must be between 1.0 and 10.0");
        }
        if policy.initial_delay >= policy.deadline {
            errs.fail(&key("initial_delay"), "must be shorter than the deadline");
        }
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

/// Parses the file on our side so a syntax error is reported by line
/// and column only: the TOML library's own report quotes the offending
/// line, which may hold a secret (`api_key = "abc` without its quote).
fn check_toml_syntax(path: &Path) -> Result<toml::Table, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigError::invalid("--config", format!("cannot read {}: {e}", path.display()))
    })?;
    let e = match toml::from_str::<toml::Table>(&text) {
        Ok(table) => return Ok(table),
        Err(e) => e,
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

/// librdkafka properties the service sets itself: exactly-once and the
/// loop depend on them, so `kafka.extra` may not override them. Returns
/// what to use instead.
fn owned_kafka_property(key: &str) -> Option<&'static str> {
    Some(match key {
        "bootstrap.servers" => "use kafka.bootstrap_servers",
        "group.id" => "use kafka.group_id",
        "group.instance.id" => "use kafka.static_membership",
        "transactional.id" => "use kafka.transactional_id_prefix",
        "transaction.timeout.ms" => "use kafka.transaction_timeout",
        "session.timeout.ms" => "use kafka.session_timeout",
        "max.poll.interval.ms" => "use kafka.max_poll_interval",
        "partition.assignment.strategy" => "use kafka.partition_assignment",
        "security.protocol" => "use kafka.security_protocol",
        "sasl.mechanism" | "sasl.mechanisms" => "use kafka.sasl_mechanism",
        "sasl.username" => "use kafka.sasl_username",
        "sasl.password" => "use kafka.sasl_password or kafka.sasl_password_file",
        "isolation.level"
        | "enable.auto.commit"
        | "enable.auto.offset.store"
        | "enable.idempotence"
        | "auto.offset.reset"
        | "enable.partition.eof" => "exactly-once depends on the service's own value",
        _ => return None,
    })
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
    fn every_bad_key_is_reported_at_once_in_a_stable_order_with_its_origin() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(
            &p,
            "[topics]\npartitions = 0\n[finbox]\npoll_intervl = \"10s\"\n\
             [kafka]\nsession_timeout = \"soon\"\n[kafka.extra]\n\"socket.keepalive.enable\" = \"true\"\n",
        )
        .unwrap();
        let env = || {
            let mut env: Vec<_> = with(&[
                ("INSIGHTS__CREDEAU__DEADLINE", "-3m"),
                ("INSIGHTS__LOG__FORMAT", "xml"),
                ("INSIGHTS__FINBOX__POLL_INTERVAL", "5s"),
            ]);
            env.retain(|(k, _)| k != "INSIGHTS__FINBOX__API_KEY");
            env
        };
        let problems = |e: ConfigError| match e {
            ConfigError::Problems(ps) => ps,
            other => panic!("not a list of problems: {other}"),
        };
        let first = problems(Settings::load_from(Some(&p), env()).unwrap_err());
        let keys: Vec<&str> = first.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                // the file's keys, sorted
                "finbox.poll_intervl",
                "kafka.session_timeout",
                // the environment's, by variable
                "credeau.deadline",
                "log.format",
                // the checks, in their order
                "topics.partitions",
                "finbox.api_key",
                "finbox.poll_interval",
            ],
            "{first:#?}"
        );
        let origin = |key: &str| first.iter().find(|p| p.key == key).unwrap().origin.clone();
        assert_eq!(origin("finbox.poll_intervl"), Some(Origin::File(p.clone())));
        assert_eq!(origin("topics.partitions"), Some(Origin::File(p.clone())));
        assert_eq!(
            origin("credeau.deadline"),
            Some(Origin::Env("INSIGHTS__CREDEAU__DEADLINE".into()))
        );
        assert_eq!(
            origin("finbox.poll_interval"),
            Some(Origin::Env("INSIGHTS__FINBOX__POLL_INTERVAL".into()))
        );
        assert_eq!(origin("finbox.api_key"), Some(Origin::Default));
        let text = ConfigError::Problems(first.clone()).to_string();
        assert!(text.starts_with("7 configuration problems:"), "{text}");
        assert!(
            text.contains(&format!("`kafka.session_timeout` (set in {})", p.display())),
            "{text}"
        );
        assert!(
            text.contains("`log.format` (set by environment variable INSIGHTS__LOG__FORMAT)"),
            "{text}"
        );
        // The same problems in the same order, run after run.
        for _ in 0..5 {
            assert_eq!(
                problems(Settings::load_from(Some(&p), env()).unwrap_err()),
                first
            );
        }
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

    #[test]
    fn kafka_extra_may_not_override_what_the_service_owns() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "[kafka.extra]\n\"isolation.level\" = \"read_uncommitted\"\n\"group.id\" = \"other\"\n\"socket.keepalive.enable\" = \"true\"\n",
        )
        .unwrap();
        let e = Settings::load_from(Some(&path), base_env())
            .unwrap_err()
            .to_string();
        assert!(e.contains("kafka.extra.isolation.level"), "{e}");
        assert!(e.contains("kafka.extra.group.id"), "{e}");
        assert!(e.contains("use kafka.group_id"), "{e}");
        assert!(!e.contains("socket.keepalive.enable"), "{e}");
        std::fs::write(
            &path,
            "[kafka.extra]\n\"socket.keepalive.enable\" = \"true\"\n",
        )
        .unwrap();
        let ok = Settings::load_from(Some(&path), base_env());
        assert!(ok.is_ok(), "{:?}", ok.err());
    }
}

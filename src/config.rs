//! Service configuration: built-in defaults (`config/default.toml`, compiled
//! in), then an optional TOML file, then `INSIGHTS__SECTION__KEY` environment
//! variables. Secrets may come from files and are held in `secrecy` types.
//! [`Settings::load`] validates everything and names the offending key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize, Serializer};

use crate::core::{PollPolicy, FINBOX_MIN_POLL_INTERVAL};

/// The documented defaults, compiled into the binary so the file and the
/// behaviour can never disagree.
pub const DEFAULTS_TOML: &str = include_str!("../config/default.toml");

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

/// An unknown key in a section with flattened parts is reported without
/// the list of the keys the section has: add them, from the defaults
/// (which name every key).
fn with_known_keys(key: &str, reason: String) -> String {
    let Some((section, _)) = key.split_once('.') else {
        return reason;
    };
    if !reason.starts_with("unknown field") || reason.contains("expected") {
        return reason;
    }
    let Ok(defaults) = toml::from_str::<toml::Table>(DEFAULTS_TOML) else {
        return reason;
    };
    let Some(toml::Value::Table(known)) = defaults.get(section) else {
        return reason;
    };
    let known: Vec<String> = known.keys().map(|k| format!("`{k}`")).collect();
    format!("{reason}, expected one of {}", known.join(", "))
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

/// A secret and the file it may be read from instead (`<key>` and
/// `<key>_file`, side by side in their section). The file is read once, at
/// load; the value is held in `secrecy` and never printed: `Debug` and the
/// redacted TOML show `<redacted>` (or nothing when unset), the file's path
/// is shown as given.
#[derive(Clone, Default)]
pub struct SecretSource {
    value: Option<SecretString>,
    file: Option<PathBuf>,
    /// The value came from `file` (already read).
    read: bool,
}

impl SecretSource {
    /// A secret given as a value (an empty one is unset).
    pub fn new(value: impl Into<String>) -> Self {
        let v: String = value.into();
        SecretSource {
            value: (!v.is_empty()).then(|| SecretString::from(v)),
            file: None,
            read: false,
        }
    }
    /// Whether there is a value (given, or read from the file).
    pub fn is_set(&self) -> bool {
        self.value
            .as_ref()
            .is_some_and(|s| !s.expose_secret().is_empty())
    }
    /// Whether a value or a file was given.
    fn is_given(&self) -> bool {
        self.is_set() || self.file.is_some()
    }
    /// The secret's value; call only where it is sent to its destination.
    pub fn expose(&self) -> &str {
        self.value.as_ref().map(|s| s.expose_secret()).unwrap_or("")
    }
    /// Reads the file, if one was given (once; `key` names the secret in
    /// errors, `<key>_file` the file).
    fn resolve(&mut self, key: &str) -> Result<(), ConfigError> {
        let Some(file) = self.file.as_ref().filter(|_| !self.read) else {
            return Ok(());
        };
        let file_key = format!("{key}_file");
        if self.is_set() {
            return Err(ConfigError::invalid(
                &file_key,
                format!("set both {key} and {key}_file; choose one"),
            ));
        }
        let shown = file.display();
        let text = std::fs::read_to_string(file)
            .map_err(|e| ConfigError::invalid(&file_key, format!("cannot read {shown}: {e}")))?;
        let value = text.trim_end_matches(['\n', '\r']);
        if value.is_empty() {
            return Err(ConfigError::invalid(&file_key, format!("{shown} is empty")));
        }
        self.value = Some(SecretString::from(value.to_string()));
        self.read = true;
        Ok(())
    }

    /// Reads the pair `keys` (`[<key>, <key>_file]`) from a section
    /// (through `#[serde(flatten)]`).
    fn deserialize_keys<'de, D: serde::Deserializer<'de>>(
        d: D,
        keys: &'static [&'static str; 2],
    ) -> Result<Self, D::Error> {
        struct Pair(&'static [&'static str; 2]);
        impl<'de> serde::de::Visitor<'de> for Pair {
            type Value = SecretSource;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "{} or {}", self.0[0], self.0[1])
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<SecretSource, A::Error> {
                let mut out = SecretSource::default();
                while let Some(key) = map.next_key::<String>()? {
                    if key == self.0[0] {
                        out.value = lenient::optional(map.next_value::<lenient::Scalar>()?.0)
                            .map(SecretString::from);
                    } else if key == self.0[1] {
                        out.file = lenient::optional(map.next_value::<lenient::Scalar>()?.0)
                            .map(PathBuf::from);
                    } else {
                        map.next_value::<serde::de::IgnoredAny>()?;
                    }
                }
                Ok(out)
            }
        }
        d.deserialize_struct("SecretSource", keys, Pair(keys))
    }

    fn serialize_keys<S: Serializer>(
        &self,
        s: S,
        keys: &'static [&'static str; 2],
    ) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("SecretSource", 2)?;
        st.serialize_field(keys[0], if self.is_set() { "<redacted>" } else { "" })?;
        st.serialize_field(keys[1], &show_path(&self.file))?;
        st.end()
    }
}

impl std::fmt::Debug for SecretSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.is_set() {
            "<redacted>"
        } else {
            "<unset>"
        })?;
        if let Some(file) = &self.file {
            write!(f, " (file {})", file.display())?;
        }
        Ok(())
    }
}

/// The (de)serialisation of one `<key>` / `<key>_file` pair, for
/// `#[serde(flatten, with = "...")]`.
macro_rules! secret_keys {
    ($module:ident, $value:literal, $file:literal) => {
        mod $module {
            const KEYS: &[&str; 2] = &[$value, $file];
            pub fn deserialize<'de, D: serde::Deserializer<'de>>(
                d: D,
            ) -> Result<super::SecretSource, D::Error> {
                super::SecretSource::deserialize_keys(d, KEYS)
            }
            pub fn serialize<S: serde::Serializer>(
                v: &super::SecretSource,
                s: S,
            ) -> Result<S::Ok, S::Error> {
                v.serialize_keys(s, KEYS)
            }
        }
    };
}
secret_keys!(api_key_keys, "api_key", "api_key_file");
secret_keys!(server_hash_keys, "server_hash", "server_hash_file");
secret_keys!(auth_token_keys, "auth_token", "auth_token_file");
secret_keys!(sasl_password_keys, "sasl_password", "sasl_password_file");
secret_keys!(
    ssl_key_password_keys,
    "ssl_key_password",
    "ssl_key_password_file"
);

/// An optional value as configured: unset is the empty string.
fn show_path(p: &Option<PathBuf>) -> String {
    p.as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

/// Scalars read as text whatever their type: a section with flattened
/// parts is read through a buffer, which keeps an environment variable
/// that looks like a number (`INSIGHTS__CREDEAU__CLIENT_ID=1234`) a number
/// where the `config` crate alone would have handed it over as text. And
/// the empty string, in TOML or the environment, means "unset".
mod lenient {
    use std::collections::BTreeMap;
    use std::path::PathBuf;

    use serde::{Deserialize, Deserializer, Serializer};

    /// Any scalar, as text.
    pub struct Scalar(pub String);

    impl<'de> Deserialize<'de> for Scalar {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl serde::de::Visitor<'_> for V {
                type Value = Scalar;
                fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    f.write_str("a string")
                }
                fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Scalar, E> {
                    Ok(Scalar(v.to_string()))
                }
                fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Scalar, E> {
                    Ok(Scalar(v.to_string()))
                }
                fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Scalar, E> {
                    Ok(Scalar(v.to_string()))
                }
                fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Scalar, E> {
                    Ok(Scalar(v.to_string()))
                }
                fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Scalar, E> {
                    Ok(Scalar(v.to_string()))
                }
                fn visit_unit<E: serde::de::Error>(self) -> Result<Scalar, E> {
                    Ok(Scalar(String::new()))
                }
                fn visit_none<E: serde::de::Error>(self) -> Result<Scalar, E> {
                    Ok(Scalar(String::new()))
                }
            }
            d.deserialize_any(V)
        }
    }

    /// `None` for the empty string.
    pub fn optional(s: String) -> Option<String> {
        (!s.is_empty()).then_some(s)
    }

    pub fn string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
        Scalar::deserialize(d).map(|s| s.0)
    }

    pub fn string_map<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<String, String>, D::Error> {
        let map = BTreeMap::<String, Scalar>::deserialize(d)?;
        Ok(map.into_iter().map(|(k, v)| (k, v.0)).collect())
    }

    /// An optional text: empty = unset.
    pub mod opt_string {
        use super::*;
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
            Ok(optional(Scalar::deserialize(d)?.0))
        }
        pub fn serialize<S: Serializer>(v: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_str(v.as_deref().unwrap_or(""))
        }
    }

    /// An optional file path: empty = unset.
    pub mod opt_path {
        use super::*;
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PathBuf>, D::Error> {
            Ok(optional(Scalar::deserialize(d)?.0).map(PathBuf::from))
        }
        pub fn serialize<S: Serializer>(v: &Option<PathBuf>, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_str(&super::super::show_path(v))
        }
    }

    /// An optional http(s) URL: empty = unset.
    pub mod opt_url {
        use super::*;
        use crate::config::HttpUrl;
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<HttpUrl>, D::Error> {
            optional(Scalar::deserialize(d)?.0)
                .map(|s| HttpUrl::parse(&s).map_err(serde::de::Error::custom))
                .transpose()
        }
        pub fn serialize<S: Serializer>(v: &Option<HttpUrl>, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_str(v.as_ref().map(HttpUrl::as_str).unwrap_or(""))
        }
    }
}

/// An absolute `https` URL (or `http`, for a local simulator) with a host,
/// checked when the configuration is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl(url::Url);

impl HttpUrl {
    pub fn parse(value: &str) -> Result<HttpUrl, String> {
        let url = url::Url::parse(value).map_err(|e| format!("not a URL ({e})"))?;
        match url.scheme() {
            "https" | "http" => {}
            other => {
                return Err(format!(
                    "scheme must be https (or http for a local simulator), got {other}"
                ))
            }
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err("has no host".to_string());
        }
        Ok(HttpUrl(url))
    }
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }
    pub fn url(&self) -> &url::Url {
        &self.0
    }
}

impl std::fmt::Display for HttpUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for HttpUrl {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        HttpUrl::parse(&lenient::string(d)?).map_err(serde::de::Error::custom)
    }
}

impl Serialize for HttpUrl {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
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
    #[serde(deserialize_with = "lenient::string")]
    pub bootstrap_servers: String,
    #[serde(deserialize_with = "lenient::string")]
    pub group_id: String,
    #[serde(deserialize_with = "lenient::string")]
    pub transactional_id_prefix: String,
    pub security_protocol: SecurityProtocol,
    /// Only with a `sasl_*` protocol.
    #[serde(with = "lenient::opt_string")]
    pub sasl_mechanism: Option<String>,
    #[serde(deserialize_with = "lenient::string")]
    pub sasl_username: String,
    /// `sasl_password` / `sasl_password_file`.
    #[serde(flatten, with = "sasl_password_keys")]
    pub sasl_password: SecretSource,
    /// Unset: the system's roots.
    #[serde(with = "lenient::opt_path")]
    pub ssl_ca_location: Option<PathBuf>,
    #[serde(with = "lenient::opt_path")]
    pub ssl_certificate_location: Option<PathBuf>,
    #[serde(with = "lenient::opt_path")]
    pub ssl_key_location: Option<PathBuf>,
    /// `ssl_key_password` / `ssl_key_password_file`.
    #[serde(flatten, with = "ssl_key_password_keys")]
    pub ssl_key_password: SecretSource,
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
    #[serde(deserialize_with = "lenient::string_map")]
    pub extra: BTreeMap<String, String>,
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
    /// Needed for Avro in or out.
    #[serde(with = "lenient::opt_url")]
    pub schema_registry_url: Option<HttpUrl>,
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
    #[serde(with = "humantime_serde")]
    pub straggler_wait: Duration,
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
        self.poll.policy(Some(self.not_found_grace))
    }
    /// The predictors endpoint for the configured environment.
    pub fn endpoint(&self) -> String {
        let path = match self.environment {
            FinboxEnvironment::Production => "/v2/risk/predictors",
            FinboxEnvironment::Staging => "/staging/risk/predictors",
        };
        format!("{}{}", self.base_url.as_str().trim_end_matches('/'), path)
    }

    fn validate(&self, errs: &mut Checks) {
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
        self.poll.policy(None)
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

    fn validate(&self, errs: &mut Checks) {
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

impl LogSettings {
    fn validate(&self, errs: &mut Checks) {
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.level) {
            errs.fail("log.level", e.to_string());
        }
    }
}

impl KafkaSettings {
    fn validate(&self, errs: &mut Checks) {
        for key in self.extra.keys() {
            if let Some(instead) = owned_kafka_property(key) {
                errs.fail(
                    &format!("kafka.extra.{key}"),
                    format!("is set by the service itself; {instead}"),
                );
            }
        }
        errs.check(non_empty(
            "kafka.bootstrap_servers",
            &self.bootstrap_servers,
        ));
        errs.check(non_empty("kafka.group_id", &self.group_id));
        errs.check(non_empty(
            "kafka.transactional_id_prefix",
            &self.transactional_id_prefix,
        ));
        if self.security_protocol.uses_sasl() {
            match self.sasl_mechanism.as_deref() {
                Some("PLAIN" | "SCRAM-SHA-256" | "SCRAM-SHA-512") => {}
                other => {
                    errs.fail(
                        "kafka.sasl_mechanism",
                        format!(
                            "must be PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 with SASL, got {:?}",
                            other.unwrap_or("")
                        ),
                    );
                }
            }
            errs.check(non_empty("kafka.sasl_username", &self.sasl_username));
            if !self.sasl_password.is_given() {
                errs.fail(
                    "kafka.sasl_password",
                    "is required with SASL (or kafka.sasl_password_file)",
                );
            }
        } else if self.sasl_mechanism.is_some() {
            errs.fail(
                "kafka.sasl_mechanism",
                "is set but kafka.security_protocol does not use SASL",
            );
        }
        for (key, path) in [
            ("kafka.ssl_ca_location", &self.ssl_ca_location),
            (
                "kafka.ssl_certificate_location",
                &self.ssl_certificate_location,
            ),
            ("kafka.ssl_key_location", &self.ssl_key_location),
        ] {
            if let Some(path) = path {
                if !self.security_protocol.uses_tls() {
                    errs.fail(key, "is set but kafka.security_protocol does not use TLS");
                } else {
                    errs.check(must_exist(key, path));
                }
            }
        }
        if self.ssl_certificate_location.is_none() != self.ssl_key_location.is_none() {
            errs.fail(
                "kafka.ssl_key_location",
                "a client certificate needs both ssl_certificate_location and ssl_key_location",
            );
        }
        errs.check(positive(
            "kafka.transaction_timeout",
            self.transaction_timeout,
        ));
        errs.check(positive("kafka.session_timeout", self.session_timeout));
        if self.max_poll_interval < self.session_timeout {
            errs.fail(
                "kafka.max_poll_interval",
                "must be at least kafka.session_timeout",
            );
        }
    }
}

impl TopicSettings {
    fn validate(&self, errs: &mut Checks) {
        let names = [
            ("topics.input", &self.input),
            ("topics.finbox_predictors", &self.finbox_predictors),
            ("topics.sms_extraction", &self.sms_extraction),
            ("topics.combined", &self.combined),
            ("topics.dead_letter", &self.dead_letter),
            ("topics.delay_prefix", &self.delay_prefix),
        ];
        for (i, (key, name)) in names.iter().enumerate() {
            errs.check(topic_name(key, name));
            if names[..i].iter().any(|(_, other)| other == name) {
                errs.fail(key, format!("topic {name:?} is used twice"));
            }
        }
        if self.partitions < 1 {
            errs.fail("topics.partitions", "must be >= 1");
        }
        if self.replication_factor < 1 {
            errs.fail("topics.replication_factor", "must be >= 1");
        }
        if self.max_message_bytes < 1024 * 1024 {
            errs.fail("topics.max_message_bytes", "must be at least 1048576");
        }
    }
}

impl EncodingSettings {
    fn validate(&self, errs: &mut Checks) {
        // The URL itself was checked when it was read.
        let avro = self.output == OutputEncoding::Avro || self.input == InputEncoding::Avro;
        if avro && self.schema_registry_url.is_none() {
            errs.fail(
                "encoding.schema_registry_url",
                "is required when Avro is used",
            );
        }
        if self.max_input_bytes < 1024 {
            errs.fail("encoding.max_input_bytes", "must be at least 1024");
        }
    }
}

impl ScheduleSettings {
    fn validate(&self, errs: &mut Checks) {
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
    fn validate(&self, errs: &mut Checks) {
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
    fn validate(&self, errs: &mut Checks) {
        if let Err(e) = self.listen.parse::<std::net::SocketAddr>() {
            errs.fail("server.listen", e.to_string());
        }
        errs.check(positive("server.stall_timeout", self.stall_timeout));
    }
}

impl ShutdownSettings {
    fn validate(&self, errs: &mut Checks) {
        errs.check(positive("shutdown.timeout", self.timeout));
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
                    errs.fail_from(&key, origin.clone(), with_known_keys(&key, load_reason(&e)));
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
                errs.fail_from(&key, origin.clone(), with_known_keys(&key, load_reason(&e)));
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
        s.finbox.server_hash.resolve("finbox.server_hash")?;
        Ok(s.finbox.server_hash.expose().to_string())
    }

    /// Reads every secret given as a file (once).
    fn resolve_secret_files(&mut self, errs: &mut Checks) {
        for (key, secret) in [
            ("finbox.api_key", &mut self.finbox.api_key),
            ("finbox.server_hash", &mut self.finbox.server_hash),
            ("credeau.auth_token", &mut self.credeau.auth_token),
            ("kafka.sasl_password", &mut self.kafka.sasl_password),
            ("kafka.ssl_key_password", &mut self.kafka.ssl_key_password),
        ] {
            errs.check(secret.resolve(key));
        }
    }

    /// Rejects values that would only fail later (or silently misbehave).
    /// Every problem is reported, in the order of the checks below.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut errs = Checks::default();
        self.check_values(&mut errs);
        errs.into_result(&Origins::default())
    }

    /// Each section's own checks, in the order of the file, then the
    /// checks that span sections.
    fn check_values(&self, errs: &mut Checks) {
        self.log.validate(errs);
        self.kafka.validate(errs);
        self.topics.validate(errs);
        self.encoding.validate(errs);
        self.schedule.validate(errs);
        self.finbox.validate(errs);
        self.credeau.validate(errs);
        self.dead_letter.validate(errs);
        self.server.validate(errs);
        self.shutdown.validate(errs);
        self.check_across_sections(errs);
    }

    fn check_across_sections(&self, errs: &mut Checks) {
        if self.schedule.max_in_flight_bytes < self.encoding.max_input_bytes {
            errs.fail(
                "schedule.max_in_flight_bytes",
                format!(
                    "must be at least encoding.max_input_bytes ({}), or one record of that size stops the reading",
                    self.encoding.max_input_bytes
                ),
            );
        }
        // A batch waits for its slowest record: the budget must leave room
        // for the transaction within the stall timeout, and keep a batch
        // far inside the group's poll interval.
        let budget = self.schedule.record_budget;
        if budget * 2 > self.server.stall_timeout {
            errs.fail(
                "schedule.record_budget",
                format!(
                    "must be at most half of server.stall_timeout ({}), or a slow provider fails liveness",
                    humantime::format_duration(self.server.stall_timeout)
                ),
            );
        }
        if budget * 2 > self.kafka.max_poll_interval {
            errs.fail(
                "schedule.record_budget",
                format!(
                    "must be at most half of kafka.max_poll_interval ({})",
                    humantime::format_duration(self.kafka.max_poll_interval)
                ),
            );
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
        self.finbox
            .poll
            .deadline
            .max(self.credeau.poll.deadline)
            .max(tier)
    }

    /// The configuration as TOML, secrets redacted.
    pub fn to_redacted_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
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

/// librdkafka properties the service sets itself (src/pipeline/kafka.rs):
/// exactly-once and the loop depend on them, so `kafka.extra` may not
/// override them. Returns what to use instead.
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
        "ssl.ca.location" => "use kafka.ssl_ca_location",
        "ssl.certificate.location" => "use kafka.ssl_certificate_location",
        "ssl.key.location" => "use kafka.ssl_key_location",
        "ssl.key.password" => "use kafka.ssl_key_password or kafka.ssl_key_password_file",
        "message.max.bytes" => "use topics.max_message_bytes",
        "isolation.level"
        | "enable.auto.commit"
        | "enable.auto.offset.store"
        | "enable.idempotence"
        | "auto.offset.reset"
        | "enable.partition.eof" => "exactly-once depends on the service's own value",
        "statistics.interval.ms" => {
            "the lag and readiness metrics depend on the service's own value"
        }
        "queued.max.messages.kbytes"
        | "queued.min.messages"
        | "fetch.queue.backoff.ms"
        | "fetch.message.max.bytes"
        | "fetch.wait.max.ms" => {
            "the consumer's read-ahead and delay-tier latency depend on the service's own value"
        }
        "compression.type" | "compression.codec" => {
            "the service chooses the codec of what it produces (lz4)"
        }
        "linger.ms" | "queue.buffering.max.ms" => {
            "the batch commit latency depends on the service's own value"
        }
        "reconnect.backoff.max.ms" => {
            "how soon the pipeline resumes after a broker outage depends on the service's own value"
        }
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

fn must_exist(key: &str, path: &Path) -> Result<(), ConfigError> {
    if path.exists() {
        Ok(())
    } else {
        Err(ConfigError::invalid(
            key,
            format!("file {} does not exist", path.display()),
        ))
    }
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
        assert_eq!(s.finbox.poll.poll_interval, Duration::from_secs(10));
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

    /// An empty string (the documented default) means unset; values that
    /// look like numbers stay text where text is expected.
    #[test]
    fn empty_strings_are_unset_and_numeric_looking_text_stays_text() {
        let s = Settings::load_from(None, base_env()).unwrap();
        assert_eq!(s.kafka.sasl_mechanism, None);
        assert_eq!(s.kafka.ssl_ca_location, None);
        assert_eq!(s.encoding.schema_registry_url, None);
        assert_eq!(s.finbox.http.ca_bundle, None);
        assert!(s.to_redacted_toml().contains("schema_registry_url = \"\""));
        let s = Settings::load_from(
            None,
            with(&[
                ("INSIGHTS__CREDEAU__CLIENT_ID", "12345"),
                ("INSIGHTS__KAFKA__GROUP_ID", "42"),
                ("INSIGHTS__KAFKA__EXTRA__LINGER_MS", "5"),
                ("INSIGHTS__FINBOX__API_KEY", "987654"),
                (
                    "INSIGHTS__ENCODING__SCHEMA_REGISTRY_URL",
                    "http://registry:8081",
                ),
            ]),
        )
        .unwrap();
        assert_eq!(s.credeau.client_id, "12345");
        assert_eq!(s.kafka.group_id, "42");
        assert_eq!(s.finbox.api_key.expose(), "987654");
        assert_eq!(
            s.encoding.schema_registry_url.as_ref().map(HttpUrl::as_str),
            Some("http://registry:8081/")
        );
        let t = err_text(with(&[(
            "INSIGHTS__ENCODING__SCHEMA_REGISTRY_URL",
            "ftp://r",
        )]));
        assert!(t.contains("encoding.schema_registry_url"), "{t}");
        assert!(t.contains("scheme must be https"), "{t}");
    }

    /// A secret file is read once, at load; the value is never shown.
    #[test]
    fn a_secret_source_reads_its_file_once_and_never_shows_the_value() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("hash");
        std::fs::write(&p, "hash-from-file\n").unwrap();
        let env: Vec<_> = base_env()
            .into_iter()
            .filter(|(k, _)| k != "INSIGHTS__FINBOX__SERVER_HASH")
            .chain([(
                "INSIGHTS__FINBOX__SERVER_HASH_FILE".to_string(),
                p.display().to_string(),
            )])
            .collect();
        let s = Settings::load_from(None, env).unwrap();
        std::fs::remove_file(&p).unwrap();
        let mut again = s.finbox.server_hash.clone();
        again.resolve("finbox.server_hash").unwrap();
        assert_eq!(again.expose(), "hash-from-file");
        let shown = format!("{:?}", s.finbox.server_hash);
        assert!(!shown.contains("hash-from-file"), "{shown}");
        assert!(shown.contains(&p.display().to_string()), "{shown}");
        s.validate().unwrap();
    }
}

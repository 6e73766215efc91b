//! Service configuration: built-in defaults (`config/default.toml`, compiled
//! in), then an optional TOML file, then `INSIGHTS__SECTION__KEY` environment
//! variables. Secrets may come from files and are held in `secrecy` types.
//! [`Settings::load`] validates everything and names the offending key.
//!
//! One file per group of sections (`kafka`, `topics`, `encoding`,
//! `providers`, `runtime`), each with its checks and tests; the layering
//! of defaults, file and environment in `layers`, the report of bad values
//! in `problem`, secrets in `secret`, shared value types in `values`.

mod encoding;
mod kafka;
mod layers;
mod problem;
mod providers;
mod reasons;
mod runtime;
mod secret;
mod topics;
mod values;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use encoding::{EncodingSettings, InputEncoding, OutputEncoding};
pub use kafka::{GroupProtocol, KafkaSettings, PartitionAssignment, SecurityProtocol};
use layers::{
    check_toml_syntax, env_key, flatten_keys, remove_key, single_key_table, toml_strings,
    unknown_section, with_defaults, with_known_keys, ENV_PREFIX,
};
use problem::{Checks, Origins};
pub use problem::{ConfigError, Origin, Problem};
pub use providers::{
    CredeauSettings, FinboxEnvironment, FinboxSettings, PollPolicy, PollSettings,
    ProviderHttpSettings, FINBOX_MIN_POLL_INTERVAL,
};
use reasons::{hide_values, load_key, load_reason};
pub use runtime::{
    DeadLetterSettings, LogFormat, LogSettings, ScheduleSettings, ServerSettings, ShutdownSettings,
};
pub use secret::SecretSource;
pub use topics::TopicSettings;
pub use values::HttpUrl;

/// The documented defaults, compiled into the binary so the file and the
/// behaviour can never disagree.
pub const DEFAULTS_TOML: &str = include_str!("../../config/default.toml");

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
                // An unknown section is one problem, however many keys it has.
                if let Some(reason) = p.first().and_then(|s| unknown_section(s)) {
                    let section = p[..1].to_vec();
                    if !bad.contains(&section) {
                        errs.fail_from(&section[0], origin.clone(), reason);
                        origins.set.insert(section[0].clone(), origin);
                        bad.push(section);
                    }
                    continue;
                }
                let single = single_key_table(table, &p);
                let source = toml::to_string(&single).unwrap_or_default();
                if let Err(e) = with_defaults(Some(&source), BTreeMap::new()) {
                    let given = toml_strings(&toml::Value::Table(single));
                    let reason = hide_values(load_reason(&e), given.iter().map(String::as_str));
                    errs.fail_from(&key, origin.clone(), with_known_keys(&key, reason));
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
            if let Some(reason) = key.split('.').next().and_then(unknown_section) {
                let section = key.split('.').next().unwrap_or_default();
                errs.fail_from(section, origin.clone(), reason);
                env_vars.remove(&var);
                origins.set.insert(key, origin);
                continue;
            }
            let single = BTreeMap::from([(var.clone(), value.clone())]);
            if let Err(e) = with_defaults(None, single) {
                let reason = hide_values(load_reason(&e), value.split(','));
                errs.fail_from(&key, origin.clone(), with_known_keys(&key, reason));
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
                errs.fail(load_key(&e).unwrap_or("configuration"), load_reason(&e));
                return Err(errs.into_error(&origins));
            }
        };
        let parsed = errs.len();
        settings.resolve_secret_files(&mut errs);
        settings.check_values(&mut errs);
        errs.drop_stand_ins(parsed);
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
        let mut s = with_defaults(file_toml.as_deref(), env).map_err(|e| {
            ConfigError::invalid(load_key(&e).unwrap_or("configuration"), load_reason(&e))
        })?;
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
            (
                "encoding.schema_registry_password",
                &mut self.encoding.schema_registry_password,
            ),
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

/// The environments the tests of every section start from.
#[cfg(test)]
mod test_env {
    use super::Settings;

    pub(crate) fn base_env() -> Vec<(String, String)> {
        vec![
            ("INSIGHTS__FINBOX__API_KEY".into(), "fb-key".into()),
            ("INSIGHTS__FINBOX__SERVER_HASH".into(), "fb-hash".into()),
            ("INSIGHTS__CREDEAU__CLIENT_ID".into(), "client".into()),
            ("INSIGHTS__CREDEAU__AUTH_TOKEN".into(), "tok".into()),
        ]
    }

    pub(crate) fn with(extra: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut env = base_env();
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        env
    }

    pub(crate) fn err_text(env: Vec<(String, String)>) -> String {
        Settings::load_from(None, env).unwrap_err().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use test_env::*;

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

    /// A value that cannot be read, a value out of range, two values that
    /// contradict each other and an unknown section: all in one run, each
    /// once, in a stable order; a check of a value that could not be read
    /// (its default stood in) is left out.
    #[test]
    fn every_kind_of_problem_is_listed_in_one_run_each_once() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(
            &p,
            "[metrics]\nlisten = \"0.0.0.0:9464\"\nport = 9464\n\
             [finbox]\npoll_interval = \"5s\"\nmax_poll_interval = \"soon\"\n\
             [server]\nlisten = 9464\n[schedule]\nmax_in_flight_bytes = 1000\n",
        )
        .unwrap();
        let env = with(&[("INSIGHTS__OTHER__KEY", "1")]);
        let e = Settings::load_from(Some(&p), env.clone()).unwrap_err();
        let ConfigError::Problems(problems) = &e else {
            panic!("{e}");
        };
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "finbox.max_poll_interval",
                "metrics",
                "other",
                "finbox.poll_interval",
                "server.listen",
                "schedule.max_in_flight_bytes",
            ],
            "{e}"
        );
        let text = e.to_string();
        assert!(!text.contains("`configuration`"), "{text}");
        assert!(!text.contains("not set: built-in default"), "{text}");
        for _ in 0..3 {
            let again = Settings::load_from(Some(&p), env.clone()).unwrap_err();
            assert_eq!(again.to_string(), text);
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
}

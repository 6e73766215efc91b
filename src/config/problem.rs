//! The problem report: every bad value found while loading, each with its
//! key and where it came from, and the small checks the sections share.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::reasons::load_reason;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {}", load_reason(.0))]
    Load(#[from] config::ConfigError),
    #[error("configuration key `{key}`: {reason}")]
    Invalid { key: String, reason: String },
    /// Every bad value found, each with where it came from.
    #[error("{}", render_problems(.0))]
    Problems(Vec<Problem>),
}

impl ConfigError {
    pub(super) fn invalid(key: &str, reason: impl Into<String>) -> Self {
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
pub(super) struct Checks(Vec<(String, Option<Origin>, String)>);

impl Checks {
    /// How many problems so far.
    pub(super) fn len(&self) -> usize {
        self.0.len()
    }
    /// Leaves out, among the problems after the first `parsed`, each one
    /// about a key one of those already names (its value could not be
    /// read, so a default stood in: a check of it says nothing about what
    /// was given), and each one listed before.
    pub(super) fn drop_stand_ins(&mut self, parsed: usize) {
        let (first, rest) = self.0.split_at(parsed.min(self.0.len()));
        let mut kept: Vec<(String, Option<Origin>, String)> = first.to_vec();
        for p in rest {
            let stood_in = first.iter().any(|(key, _, _)| {
                p.0 == *key
                    || p.0
                        .strip_prefix(key.as_str())
                        .is_some_and(|r| r.starts_with('.'))
            });
            let again = kept.iter().any(|k| k.0 == p.0 && k.2 == p.2);
            if !stood_in && !again {
                kept.push(p.clone());
            }
        }
        self.0 = kept;
    }
    pub(super) fn fail(&mut self, key: &str, reason: impl Into<String>) {
        self.0.push((key.to_string(), None, reason.into()));
    }
    pub(super) fn fail_from(&mut self, key: &str, origin: Origin, reason: String) {
        self.0.push((key.to_string(), Some(origin), reason));
    }
    pub(super) fn check(&mut self, r: Result<(), ConfigError>) {
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
    pub(super) fn into_error(self, origins: &Origins) -> ConfigError {
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
    pub(super) fn into_result(self, origins: &Origins) -> Result<(), ConfigError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(self.into_error(origins))
        }
    }
}

/// Which keys the file and the environment set.
#[derive(Debug, Default)]
pub(super) struct Origins {
    /// False when nothing is known (checks without loading).
    pub(super) known: bool,
    pub(super) set: BTreeMap<String, Origin>,
}

impl Origins {
    pub(super) fn of(&self, key: &str) -> Option<Origin> {
        if !self.known || key.starts_with("--") {
            return None;
        }
        Some(self.set.get(key).cloned().unwrap_or(Origin::Default))
    }
}

pub(super) fn non_empty(key: &str, value: &str) -> Result<(), ConfigError> {
    if value.trim().is_empty() {
        Err(ConfigError::invalid(key, "must not be empty"))
    } else {
        Ok(())
    }
}

pub(super) fn positive(key: &str, d: Duration) -> Result<(), ConfigError> {
    if d.is_zero() {
        Err(ConfigError::invalid(key, "must be greater than zero"))
    } else {
        Ok(())
    }
}

pub(super) fn must_exist(key: &str, path: &Path) -> Result<(), ConfigError> {
    if path.exists() {
        Ok(())
    } else {
        Err(ConfigError::invalid(
            key,
            format!("file {} does not exist", path.display()),
        ))
    }
}

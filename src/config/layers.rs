//! The layers a configuration is read from: the built-in defaults, the
//! `--config` file, then `INSIGHTS__SECTION__KEY` variables; and the TOML
//! plumbing that checks each value given on its own.

use std::collections::BTreeMap;
use std::path::Path;

use super::problem::ConfigError;
use super::{Settings, DEFAULTS_TOML};

pub(super) const ENV_PREFIX: &str = "INSIGHTS__";

/// `INSIGHTS__KAFKA__BOOTSTRAP_SERVERS` -> `kafka.bootstrap_servers`, as the
/// `config` crate maps it.
pub(super) fn env_key(var: &str) -> String {
    var[ENV_PREFIX.len()..].to_lowercase().replace("__", ".")
}

/// The defaults, then a TOML document, then environment variables.
pub(super) fn with_defaults(
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
pub(super) fn load_reason(e: &config::ConfigError) -> String {
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
pub(super) fn with_known_keys(key: &str, reason: String) -> String {
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
pub(super) fn flatten_keys(
    prefix: &mut Vec<String>,
    table: &toml::Table,
    out: &mut Vec<Vec<String>>,
) {
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
pub(super) fn single_key_table(table: &toml::Table, path: &[String]) -> toml::Table {
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

pub(super) fn remove_key(table: &mut toml::Table, path: &[String]) {
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

/// Parses the file on our side so a syntax error is reported by line
/// and column only: the TOML library's own report quotes the offending
/// line, which may hold a secret (`api_key = "abc` without its quote).
pub(super) fn check_toml_syntax(path: &Path) -> Result<toml::Table, ConfigError> {
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

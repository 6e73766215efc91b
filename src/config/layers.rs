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

/// The string values in a TOML value (a list's items included).
pub(super) fn toml_strings(v: &toml::Value) -> Vec<String> {
    match v {
        toml::Value::String(s) => vec![s.clone()],
        toml::Value::Array(items) => items.iter().flat_map(toml_strings).collect(),
        toml::Value::Table(t) => t.values().flat_map(toml_strings).collect(),
        other => vec![other.to_string()],
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

/// Removes the value at `path`, and each table it leaves empty (an empty
/// table left behind would be read as a value of its own).
pub(super) fn remove_key(table: &mut toml::Table, path: &[String]) {
    let Some((first, rest)) = path.split_first() else {
        return;
    };
    if rest.is_empty() {
        table.remove(first);
        return;
    }
    if let Some(toml::Value::Table(inner)) = table.get_mut(first) {
        remove_key(inner, rest);
        if inner.is_empty() {
            table.remove(first);
        }
    }
}

/// The sections of the defaults, as "`log`, `kafka`, ...", when `section`
/// is not one of them.
pub(super) fn unknown_section(section: &str) -> Option<String> {
    let defaults = toml::from_str::<toml::Table>(DEFAULTS_TOML).ok()?;
    if defaults.contains_key(section) {
        return None;
    }
    let known: Vec<String> = defaults.keys().map(|k| format!("`{k}`")).collect();
    Some(format!(
        "unknown section, expected one of {}",
        known.join(", ")
    ))
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

#[cfg(test)]
mod tests {
    use crate::config::test_env::*;
    use crate::config::{ConfigError, Origin, Settings};

    /// An API key pasted into the wrong key.
    const PLANTED: &str = "sk_live_PLANTED7f3a";

    /// Keys of every kind of value, each with what its problem must say.
    const KEYS: &[(&str, &str)] = &[
        ("finbox.rate_limit_per_minute", "expected u32"),
        ("topics.partitions", "expected"),
        ("encoding.max_input_bytes", "expected"),
        ("topics.create", "expected a boolean"),
        ("dead_letter.max_ratio", "expected"),
        ("finbox.backoff_multiplier", "expected f64"),
        ("credeau.deadline", "expected a duration"),
        ("shutdown.timeout", "expected a duration"),
        ("schedule.delay_tiers", "durations"),
        ("finbox.retry_delays", "durations"),
        ("kafka.security_protocol", "`sasl_ssl`"),
        ("log.format", "`json`"),
        ("encoding.output", "`avro`"),
        ("finbox.environment", "`staging`"),
        ("kafka.partition_assignment", "`range`"),
        ("kafka.static_membership", "expected a boolean"),
        // "not a URL (...)" or "scheme must be https (...)"
        ("finbox.base_url", ""),
        ("encoding.schema_registry_url", ""),
    ];

    fn problems(e: ConfigError) -> Vec<crate::config::Problem> {
        match e {
            ConfigError::Problems(ps) => ps,
            other => panic!("not a list of problems: {other}"),
        }
    }

    #[test]
    fn a_wrong_value_is_named_by_key_origin_and_type_never_quoted() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        for value in [
            PLANTED.to_string(),
            format!("5{PLANTED}"),
            format!("1s,{PLANTED}"),
        ] {
            for (key, expected) in KEYS {
                let (section, name) = key.split_once('.').unwrap();
                let var = format!("INSIGHTS__{}", key.to_uppercase().replace('.', "__"));
                let from_env = Settings::load_from(None, with(&[(var.as_str(), value.as_str())]));
                std::fs::write(&file, format!("[{section}]\n{name} = {value:?}\n")).unwrap();
                let from_file = Settings::load_from(Some(&file), base_env());
                for (result, origin) in [
                    (from_env, Origin::Env(var.clone())),
                    (from_file, Origin::File(file.clone())),
                ] {
                    let e = result.expect_err(key);
                    let text = format!("{e} {e:?}");
                    assert!(!text.contains("PLANTED"), "{key} = {value}: {text}");
                    let ps = problems(e);
                    let p = ps.iter().find(|p| p.key == *key).expect(key);
                    assert_eq!(p.origin.as_ref(), Some(&origin), "{p}");
                    assert!(p.reason.contains(expected), "{key} = {value}: {p}");
                }
            }
        }
    }

    #[test]
    fn a_wrong_type_in_a_list_or_a_number_in_place_of_text_is_not_quoted_either() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            format!(
                "[finbox]\nretry_delays = [\"1s\", \"{PLANTED}\"]\nrate_limit_per_minute = [\"{PLANTED}\"]\n\
                 [encoding]\noutput = 5\n[topics]\ncreate = {{ x = \"{PLANTED}\" }}\n"
            ),
        )
        .unwrap();
        let e = Settings::load_from(Some(&file), base_env()).unwrap_err();
        let text = e.to_string();
        assert!(!text.contains("PLANTED"), "{text}");
        for key in [
            "finbox.retry_delays",
            "finbox.rate_limit_per_minute",
            "encoding.output",
            // A table where a value belongs: named by the table's key.
            "topics.create.x",
        ] {
            assert!(text.contains(&format!("`{key}`")), "{key}: {text}");
        }
        // Checks after reading quote no value either.
        let t = err_text(with(&[
            ("INSIGHTS__KAFKA__SECURITY_PROTOCOL", "sasl_ssl"),
            ("INSIGHTS__KAFKA__SASL_MECHANISM", PLANTED),
            ("INSIGHTS__KAFKA__SASL_USERNAME", "svc"),
            ("INSIGHTS__KAFKA__SASL_PASSWORD", "pw"),
            ("INSIGHTS__TOPICS__INPUT", &format!("{PLANTED}!")),
            ("INSIGHTS__TOPICS__COMBINED", PLANTED),
            ("INSIGHTS__TOPICS__DEAD_LETTER", PLANTED),
        ]));
        assert!(!t.contains("PLANTED"), "{t}");
        assert!(t.contains("`kafka.sasl_mechanism`"), "{t}");
        assert!(t.contains("`topics.input`"), "{t}");
        assert!(t.contains("names the same topic as topics.combined"), "{t}");
        // `salt` reads the layers without the per-key pass.
        let e = Settings::finbox_server_hash(
            None,
            [(
                "INSIGHTS__FINBOX__RATE_LIMIT_PER_MINUTE".to_string(),
                PLANTED.to_string(),
            )],
        )
        .unwrap_err();
        assert!(!format!("{e} {e:?}").contains("PLANTED"), "{e}");
        assert!(e.to_string().contains("expected u32"), "{e}");
    }
}

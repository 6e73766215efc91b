//! What a bad value is said with: the `config` crate's reasons reworded to
//! name the key, the kind of value found and the type expected, never the
//! value itself (a value of the wrong type may be a secret pasted into the
//! wrong key).

/// The `config` crate's reason without the key and origin it appends (the
/// problem names both itself), and without the value: a value of the
/// wrong type may be a secret pasted into the wrong key, so a reason names
/// the kind of value found and the type expected, never the value.
pub(super) fn load_reason(e: &config::ConfigError) -> String {
    match e {
        config::ConfigError::Type {
            unexpected,
            expected,
            ..
        } => format!(
            "invalid type: {}, expected {expected}",
            kind_of(&unexpected.to_string())
        ),
        config::ConfigError::At { error, .. } => load_reason(error),
        config::ConfigError::Message(m) => without_value(m),
        other => without_value(&other.to_string()),
    }
}

/// The key a `config` error names, when it names one.
pub(super) fn load_key(e: &config::ConfigError) -> Option<&str> {
    match e {
        config::ConfigError::Type { key, .. } => key.as_deref(),
        config::ConfigError::At { error, key, .. } => load_key(error).or(key.as_deref()),
        _ => None,
    }
}

/// "string" of `string "…"`, "integer" of `integer `5``: the kind of a
/// value as serde and the `config` crate quote it, without the value.
fn kind_of(found: &str) -> &str {
    [found.find(" \""), found.find(" `")]
        .into_iter()
        .flatten()
        .min()
        .map_or(found, |end| &found[..end])
}

/// A serde (or `config`) reason with the value it quotes left out. serde
/// quotes it as `string "…"`, `integer `5``, `unknown variant `…``; the
/// `config` crate as `enum E does not have variant constructor …`. The
/// expected part is the program's own text and stays.
fn without_value(reason: &str) -> String {
    for prefix in ["invalid type: ", "invalid value: "] {
        if let Some((found, expected)) = reason
            .strip_prefix(prefix)
            .and_then(|rest| rest.rsplit_once(", expected "))
        {
            return format!("{prefix}{}, expected {expected}", kind_of(found));
        }
    }
    if let Some(rest) = reason.strip_prefix("unknown variant ") {
        return match rest.rsplit_once(", expected ") {
            Some((_, expected)) => format!("unknown value, expected {expected}"),
            None => "unknown value".to_string(),
        };
    }
    if let Some((name, _)) = reason
        .strip_prefix("value of enum ")
        .and_then(|rest| rest.split_once(" should be represented by either string or table"))
    {
        return match enum_values(name) {
            Some(expected) => format!("invalid type, expected {expected}"),
            None => "invalid type, expected a string".to_string(),
        };
    }
    if let Some((name, _)) = reason
        .strip_prefix("enum ")
        .and_then(|rest| rest.split_once(" does not have variant constructor "))
    {
        return match enum_values(name) {
            Some(expected) => format!("unknown value, expected {expected}"),
            None => "unknown value".to_string(),
        };
    }
    reason.to_string()
}

/// "one of `a`, `b`" for a configuration enum, by its type name, as serde
/// itself lists the variants (the `config` crate's own message does not).
fn enum_values(name: &str) -> Option<String> {
    fn one_of<T: serde::de::DeserializeOwned>() -> Option<String> {
        let e = serde_json::from_value::<T>(serde_json::Value::String(String::new())).err()?;
        let text = e.to_string();
        let (_, expected) = text.rsplit_once(", expected ")?;
        Some(expected.to_string())
    }
    use super::*;
    match name {
        "LogFormat" => one_of::<LogFormat>(),
        "PartitionAssignment" => one_of::<PartitionAssignment>(),
        "SecurityProtocol" => one_of::<SecurityProtocol>(),
        "InputEncoding" => one_of::<InputEncoding>(),
        "OutputEncoding" => one_of::<OutputEncoding>(),
        "FinboxEnvironment" => one_of::<FinboxEnvironment>(),
        _ => None,
    }
}

/// Last guard for a reason about a value given as `values`: any of them
/// still quoted (a message format [`without_value`] does not know) is
/// left out.
pub(super) fn hide_values<'a>(
    mut reason: String,
    values: impl IntoIterator<Item = &'a str>,
) -> String {
    for v in values {
        let v = v.trim();
        // Shorter values cannot be told from the words around them.
        if v.len() >= 4 && reason.contains(v) {
            reason = reason.replace(v, "<value not shown>");
        }
    }
    reason
}

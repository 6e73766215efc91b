//! Decoding and validating "user onboarded" input events, in JSON or in Avro
//! (Confluent wire format, writer schema from the registry, resolved against
//! `schemas/user_onboarded.avsc`). Every way a record can be wrong maps to
//! one [`DecodeError`] variant with a stable label, so the pipeline can
//! dead-letter it (or, for a registry outage, retry it) and never stall.

use std::sync::Arc;

use apache_avro::types::Value as AvroValue;
use serde::{Deserialize, Serialize};

use super::avro::{self, EventSchema};
use super::registry::{RegistryClient, RegistryError};
use super::{escaped_prefix, truncate_message};
use crate::config::InputEncoding;
use crate::core::dead_letter::Reason;
use crate::task::{Millis, OnboardedUser};

/// Default cap on an input record's size.
pub const DEFAULT_MAX_INPUT_BYTES: usize = 1024 * 1024;

/// Longest FinBox CUSTOMER_ID: the document types `customer_id` as
/// `STRING [260]`. Also the longest `user_id` (our key, and the FinBox id
/// unless overridden).
pub const MAX_FINBOX_ID_CHARS: usize = 260;
/// Longest Credeau `user_id`: "Alphanumeric string, max 64 chars, non-PII".
pub const MAX_CREDEAU_ID_CHARS: usize = 64;
pub const MAX_EVENT_ID_CHARS: usize = 128;

/// 2000-01-01T00:00:00Z. Earlier onboarding times are rejected: they are
/// almost always epoch seconds sent where milliseconds were meant, and would
/// make every deadline look long past.
pub const MIN_ONBOARDED_AT: Millis = 946_684_800_000;
/// 9999-12-31T23:59:59.999Z, the last instant RFC 3339 can write.
pub const MAX_ONBOARDED_AT: Millis = 253_402_300_799_999;

/// A valid "user onboarded" event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UserOnboarded {
    pub event_id: String,
    pub user_id: String,
    /// Unix epoch milliseconds.
    pub onboarded_at: Millis,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finbox_customer_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credeau_user_id: Option<String>,
}

impl UserOnboarded {
    /// The task identity: each provider id defaults to `user_id`.
    pub fn into_user(self) -> OnboardedUser {
        OnboardedUser {
            finbox_customer_id: self
                .finbox_customer_id
                .unwrap_or_else(|| self.user_id.clone()),
            credeau_user_id: self.credeau_user_id.unwrap_or_else(|| self.user_id.clone()),
            event_id: self.event_id,
            user_id: self.user_id,
            onboarded_at: self.onboarded_at,
        }
    }

    /// The event as JSON input (onboarded_at as epoch milliseconds), for
    /// producers and tests.
    pub fn to_json(&self) -> Vec<u8> {
        // A struct of strings and integers always serializes.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("the record has no value")]
    Empty,
    #[error("the value is not valid UTF-8 (starts with \"{0}\")")]
    NotUtf8(String),
    #[error("the value is not valid JSON: {0}")]
    MalformedJson(String),
    #[error("the value is not a valid Avro event: {0}")]
    InvalidAvro(String),
    #[error("schema id {0} is not known to the schema registry")]
    UnknownSchemaId(u32),
    #[error("field {field} is invalid: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("the schema registry is unavailable: {0}")]
    RegistryUnavailable(String),
}

impl DecodeError {
    /// The reason an input event that failed to decode is dead-lettered
    /// with, or `None` when it must not be: a registry outage is not the
    /// record's fault, and the batch is retried instead.
    pub fn dead_letter_reason(&self) -> Option<Reason> {
        match self {
            DecodeError::Empty => Some(Reason::Empty),
            DecodeError::NotUtf8(_) => Some(Reason::NotUtf8),
            DecodeError::MalformedJson(_) => Some(Reason::MalformedJson),
            DecodeError::InvalidAvro(_) => Some(Reason::InvalidAvro),
            DecodeError::UnknownSchemaId(_) => Some(Reason::UnknownSchemaId),
            DecodeError::Invalid { .. } => Some(Reason::InvalidField),
            DecodeError::RegistryUnavailable(_) => None,
        }
    }

    /// Stable snake_case label for metrics and dead-letter headers.
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::Empty => "empty",
            DecodeError::NotUtf8(_) => "not_utf8",
            DecodeError::MalformedJson(_) => "malformed_json",
            DecodeError::InvalidAvro(_) => "invalid_avro",
            DecodeError::UnknownSchemaId(_) => "unknown_schema_id",
            DecodeError::Invalid { .. } => "invalid_field",
            DecodeError::RegistryUnavailable(_) => "registry_unavailable",
        }
    }

    /// Only a registry outage: the record itself may be fine, so the caller
    /// retries instead of dead-lettering.
    pub fn is_transient(&self) -> bool {
        matches!(self, DecodeError::RegistryUnavailable(_))
    }

    fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        DecodeError::Invalid {
            field,
            reason: reason.into(),
        }
    }
}

/// Decodes input records. Holds no per-record state, so one instance is
/// shared (in an `Arc`) by every task.
#[derive(Debug)]
pub struct InputDecoder {
    encoding: InputEncoding,
    registry: Option<Arc<RegistryClient>>,
    max_input_bytes: usize,
}

impl InputDecoder {
    pub fn new(encoding: InputEncoding, registry: Option<Arc<RegistryClient>>) -> InputDecoder {
        avro::limit_avro_allocations();
        InputDecoder {
            encoding,
            registry,
            max_input_bytes: DEFAULT_MAX_INPUT_BYTES,
        }
    }

    /// Records larger than this are rejected (`Invalid { field: "value" }`)
    /// before any parsing.
    pub fn with_max_input_bytes(mut self, max: usize) -> InputDecoder {
        self.max_input_bytes = max;
        self
    }

    pub async fn decode(&self, value: Option<&[u8]>) -> Result<UserOnboarded, DecodeError> {
        let value = match value {
            Some(v) if !v.is_empty() => v,
            _ => return Err(DecodeError::Empty),
        };
        if value.len() > self.max_input_bytes {
            return Err(DecodeError::invalid(
                "value",
                format!(
                    "{} bytes exceeds the {}-byte limit (encoding.max_input_bytes)",
                    value.len(),
                    self.max_input_bytes
                ),
            ));
        }
        let avro = match self.encoding {
            InputEncoding::Json => false,
            InputEncoding::Avro => true,
            InputEncoding::Auto => value[0] == avro::MAGIC_BYTE,
        };
        if avro {
            self.decode_avro(value).await
        } else {
            decode_json(value)
        }
    }

    async fn decode_avro(&self, value: &[u8]) -> Result<UserOnboarded, DecodeError> {
        let (id, mut datum) = avro::split_wire(value).ok_or_else(|| {
            DecodeError::InvalidAvro(format!(
                "no Confluent header (magic byte 0 and a 4-byte schema id); starts with \"{}\"",
                escaped_prefix(value)
            ))
        })?;
        let registry = self.registry.as_ref().ok_or_else(|| {
            DecodeError::InvalidAvro(
                "an Avro record arrived but no schema registry is configured".into(),
            )
        })?;
        let writer = registry.schema_by_id(id).await.map_err(|e| match e {
            RegistryError::UnknownId(id) => DecodeError::UnknownSchemaId(id),
            e if e.is_transient() => DecodeError::RegistryUnavailable(e.to_string()),
            e => DecodeError::InvalidAvro(e.to_string()),
        })?;
        let reader = EventSchema::UserOnboarded
            .schema()
            .map_err(|e| DecodeError::InvalidAvro(e.to_string()))?;
        let decoded = apache_avro::from_avro_datum(&writer, &mut datum, Some(reader))
            .map_err(|e| DecodeError::InvalidAvro(truncate_message(&e.to_string())))?;
        if !datum.is_empty() {
            return Err(DecodeError::InvalidAvro(format!(
                "{} bytes left over after the datum (schema id {id})",
                datum.len()
            )));
        }
        from_avro_value(decoded)
    }
}

fn from_avro_value(value: AvroValue) -> Result<UserOnboarded, DecodeError> {
    let AvroValue::Record(fields) = value else {
        return Err(DecodeError::InvalidAvro("datum is not a record".into()));
    };
    let mut event_id = None;
    let mut user_id = None;
    let mut onboarded_at = None;
    let mut finbox_customer_id = None;
    let mut credeau_user_id = None;
    for (name, v) in fields {
        let v = match v {
            AvroValue::Union(_, inner) => *inner,
            v => v,
        };
        match (name.as_str(), v) {
            (_, AvroValue::Null) => {}
            ("event_id", AvroValue::String(s)) => event_id = Some(s),
            ("user_id", AvroValue::String(s)) => user_id = Some(s),
            ("onboarded_at", AvroValue::TimestampMillis(ms) | AvroValue::Long(ms)) => {
                onboarded_at = Some(ms)
            }
            ("finbox_customer_id", AvroValue::String(s)) => finbox_customer_id = Some(s),
            ("credeau_user_id", AvroValue::String(s)) => credeau_user_id = Some(s),
            (other, _) => {
                return Err(DecodeError::InvalidAvro(format!(
                    "field {} has an unexpected type after resolution",
                    escaped_prefix(other.as_bytes())
                )))
            }
        }
    }
    let onboarded_at =
        onboarded_at.ok_or_else(|| DecodeError::invalid("onboarded_at", "missing"))?;
    validated(
        event_id,
        user_id,
        check_millis(onboarded_at)?,
        finbox_customer_id,
        credeau_user_id,
    )
}

/// Every field as whatever JSON it holds: a wrong type then names the field
/// instead of failing the whole parse with serde's text (which can quote
/// the offending value).
#[derive(Deserialize)]
struct RawJsonEvent {
    #[serde(default)]
    event_id: serde_json::Value,
    #[serde(default)]
    user_id: serde_json::Value,
    #[serde(default)]
    onboarded_at: serde_json::Value,
    #[serde(default)]
    finbox_customer_id: serde_json::Value,
    #[serde(default)]
    credeau_user_id: serde_json::Value,
}

fn decode_json(value: &[u8]) -> Result<UserOnboarded, DecodeError> {
    let text =
        std::str::from_utf8(value).map_err(|_| DecodeError::NotUtf8(escaped_prefix(value)))?;
    // Anything but an object would make serde describe (and quote) the value.
    if !text.trim_start().starts_with('{') {
        return Err(DecodeError::MalformedJson(format!(
            "expected a JSON object; starts with \"{}\"",
            escaped_prefix(value)
        )));
    }
    let raw: RawJsonEvent = serde_json::from_str(text).map_err(|e| {
        DecodeError::MalformedJson(format!(
            "{}; starts with \"{}\"",
            truncate_message(&e.to_string()),
            escaped_prefix(value)
        ))
    })?;
    let onboarded_at = json_millis(&raw.onboarded_at)?;
    validated(
        json_string("event_id", raw.event_id)?,
        json_string("user_id", raw.user_id)?,
        onboarded_at,
        json_string("finbox_customer_id", raw.finbox_customer_id)?,
        json_string("credeau_user_id", raw.credeau_user_id)?,
    )
}

/// `null` and absent are the same; any other non-string is an error.
fn json_string(field: &'static str, v: serde_json::Value) -> Result<Option<String>, DecodeError> {
    match v {
        serde_json::Value::Null => Ok(None),
        serde_json::Value::String(s) => Ok(Some(s)),
        other => Err(DecodeError::invalid(
            field,
            format!("must be a string, got {}", json_kind(&other)),
        )),
    }
}

fn json_millis(v: &serde_json::Value) -> Result<Millis, DecodeError> {
    const FIELD: &str = "onboarded_at";
    let ms = match v {
        serde_json::Value::Null => return Err(DecodeError::invalid(FIELD, "missing")),
        serde_json::Value::Number(n) => n.as_i64().ok_or_else(|| {
            DecodeError::invalid(FIELD, "must be an integer number of epoch milliseconds")
        })?,
        serde_json::Value::String(s) => chrono::DateTime::parse_from_rfc3339(s)
            .map_err(|e| {
                DecodeError::invalid(
                    FIELD,
                    format!(
                        "not an RFC 3339 timestamp ({e}): \"{}\"",
                        escaped_prefix(s.as_bytes())
                    ),
                )
            })?
            .timestamp_millis(),
        other => {
            return Err(DecodeError::invalid(
                FIELD,
                format!(
                    "must be an RFC 3339 string or epoch milliseconds, got {}",
                    json_kind(other)
                ),
            ))
        }
    };
    check_millis(ms)
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

fn check_millis(ms: Millis) -> Result<Millis, DecodeError> {
    if ms < MIN_ONBOARDED_AT {
        return Err(DecodeError::invalid(
            "onboarded_at",
            format!("{ms} is before 2000-01-01 (epoch seconds instead of milliseconds?)"),
        ));
    }
    if ms > MAX_ONBOARDED_AT {
        return Err(DecodeError::invalid(
            "onboarded_at",
            format!("{ms} is after 9999-12-31"),
        ));
    }
    Ok(ms)
}

fn validated(
    event_id: Option<String>,
    user_id: Option<String>,
    onboarded_at: Millis,
    finbox_customer_id: Option<String>,
    credeau_user_id: Option<String>,
) -> Result<UserOnboarded, DecodeError> {
    let event_id = event_id.ok_or_else(|| DecodeError::invalid("event_id", "missing"))?;
    let chars = event_id.chars().count();
    if chars == 0 || chars > MAX_EVENT_ID_CHARS {
        return Err(DecodeError::invalid(
            "event_id",
            format!("is {chars} characters; must be 1 to {MAX_EVENT_ID_CHARS}"),
        ));
    }
    let user_id = user_id.ok_or_else(|| DecodeError::invalid("user_id", "missing"))?;
    // Each provider's id is checked by that provider's rule: the override
    // when given, else user_id (which must then suit that provider too).
    check_finbox_id("user_id", &user_id)?;
    if let Some(id) = &finbox_customer_id {
        check_finbox_id("finbox_customer_id", id)?;
    }
    match &credeau_user_id {
        Some(id) => check_credeau_id("credeau_user_id", id)?,
        None => check_credeau_id("user_id", &user_id).map_err(|e| match e {
            DecodeError::Invalid { field, reason } => DecodeError::Invalid {
                field,
                reason: format!(
                    "{reason} (it is also the Credeau user_id unless credeau_user_id is given)"
                ),
            },
            other => other,
        })?,
    }
    Ok(UserOnboarded {
        event_id,
        user_id,
        onboarded_at,
        finbox_customer_id,
        credeau_user_id,
    })
}

/// A FinBox CUSTOMER_ID (and our `user_id`): 1 to 260 characters, none of
/// them a control character. The document gives only the length; control
/// characters are refused because the id travels in logs and Kafka headers.
fn check_finbox_id(field: &'static str, id: &str) -> Result<(), DecodeError> {
    let chars = id.chars().count();
    if chars == 0 || chars > MAX_FINBOX_ID_CHARS {
        return Err(DecodeError::invalid(
            field,
            format!("is {chars} characters; must be 1 to {MAX_FINBOX_ID_CHARS}"),
        ));
    }
    if let Some(pos) = id.chars().position(char::is_control) {
        return Err(DecodeError::invalid(
            field,
            format!(
                "character {pos} is a control character (value \"{}\")",
                escaped_prefix(id.as_bytes())
            ),
        ));
    }
    Ok(())
}

/// A Credeau `user_id`: 1 to 64 ASCII letters and digits (the document's
/// "alphanumeric string, max 64 chars"), plus `-` `_` `.` `:` so UUIDs and
/// prefixed ids pass.
fn check_credeau_id(field: &'static str, id: &str) -> Result<(), DecodeError> {
    let chars = id.chars().count();
    if chars == 0 || chars > MAX_CREDEAU_ID_CHARS {
        return Err(DecodeError::invalid(
            field,
            format!("is {chars} characters; Credeau accepts 1 to {MAX_CREDEAU_ID_CHARS}"),
        ));
    }
    if let Some(pos) = id
        .bytes()
        .position(|b| !(b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':')))
    {
        return Err(DecodeError::invalid(
            field,
            format!(
                "byte {pos} is not an ASCII letter, digit or one of - _ . : (value \"{}\")",
                escaped_prefix(id.as_bytes())
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_decode_failure_keeps_the_decoders_label_and_a_registry_outage_is_not_dead_lettered() {
        let errors = [
            DecodeError::Empty,
            DecodeError::NotUtf8("x".into()),
            DecodeError::MalformedJson("x".into()),
            DecodeError::InvalidAvro("x".into()),
            DecodeError::UnknownSchemaId(7),
            DecodeError::Invalid {
                field: "user_id",
                reason: "x".into(),
            },
        ];
        for e in &errors {
            let r = e.dead_letter_reason().expect("dead-lettered");
            assert_eq!(r.as_str(), e.reason(), "{e:?}");
        }
        assert_eq!(
            DecodeError::RegistryUnavailable("down".into()).dead_letter_reason(),
            None
        );
    }
}

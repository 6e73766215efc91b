//! Why an output event could not be built: shared by the output encoder
//! and the SMS extraction event's encoder (its own module, so neither of
//! them imports the other for it).

use super::avro::SchemaError;
use super::registry::RegistryError;
use crate::providers::Provider;

#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("Avro output needs a schema registry, and none is configured")]
    NoRegistry,
    #[error("cannot register the schema for subject {subject}: {source}")]
    Registry {
        subject: String,
        #[source]
        source: RegistryError,
    },
    /// The registry did not answer (connection refused, timeouts, 5xx)
    /// for as long as start-up waits for it.
    #[error("schema registry {url} did not answer for {}s: {source}", .waited.as_secs())]
    RegistryUnavailable {
        url: String,
        waited: std::time::Duration,
        #[source]
        source: RegistryError,
    },
    /// Schemas the registry would refuse, each with its subject and the
    /// registry's reasons, whole. Nothing was registered.
    #[error("the schema registry {url} refuses the output schemas as incompatible; nothing was registered: {}", .subjects.iter().map(|(s, why)| format!("subject {s}: {why}")).collect::<Vec<_>>().join("; "))]
    Incompatible {
        url: String,
        subjects: Vec<(String, String)>,
    },
    #[error(transparent)]
    Schema(#[from] SchemaError),
    /// A single SMS entry (`entry`), or the event's fixed fields alone
    /// (`entry: None`), do not fit in `max` bytes.
    #[error("{} is {size} bytes encoded; a value may be at most {max} bytes", .entry.map(|i| format!("SMS entry {i}")).unwrap_or_else(|| "the event without entries".into()))]
    TooLarge {
        entry: Option<usize>,
        size: usize,
        max: usize,
    },
    #[error("{0} has not finished yet; insights ready needs both providers final")]
    NotFinal(Provider),
    #[error("JSON serialization failed: {0}")]
    Json(String),
}

impl From<serde_json::Error> for EncodeError {
    fn from(e: serde_json::Error) -> Self {
        EncodeError::Json(e.to_string())
    }
}

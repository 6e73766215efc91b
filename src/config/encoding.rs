//! `[encoding]`: the record formats in and out, and the schema registry.

use serde::{Deserialize, Serialize};

use super::problem::Checks;
use super::values::{lenient, HttpUrl};

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

impl EncodingSettings {
    pub(super) fn validate(&self, errs: &mut Checks) {
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

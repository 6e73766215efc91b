//! `[topics]`: the names of the topics the service reads and writes.

use serde::{Deserialize, Serialize};

use super::problem::{Checks, ConfigError};

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

impl TopicSettings {
    pub(super) fn validate(&self, errs: &mut Checks) {
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
            if let Some((first, _)) = names[..i].iter().find(|(_, other)| other == name) {
                errs.fail(key, format!("names the same topic as {first}"));
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
            // The name is not quoted: it may be a secret pasted into the
            // wrong key.
            "is not a valid Kafka topic name (1 to 200 of a-z, A-Z, 0-9, '.', '_', '-')",
        ))
    }
}

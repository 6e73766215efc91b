//! `[kafka]`: the brokers, the group and the client's security.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::problem::{must_exist, non_empty, positive, Checks};
use super::secret::secret_keys;
use super::values::lenient;
use super::SecretSource;

secret_keys!(sasl_password_keys, "sasl_password", "sasl_password_file");
secret_keys!(
    ssl_key_password_keys,
    "ssl_key_password",
    "ssl_key_password_file"
);

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

    /// The brokers' assignor of the same intent under KIP-848.
    pub fn as_remote_assignor(self) -> &'static str {
        match self {
            PartitionAssignment::Range => "range",
            PartitionAssignment::CooperativeSticky => "uniform",
        }
    }
}

/// The consumer group protocol: `classic` (the member-side assignment of
/// every Kafka release) or `consumer` (KIP-848, Kafka 4: the broker assigns,
/// and owns the session timeout, `group.consumer.session.timeout.ms`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GroupProtocol {
    Classic,
    Consumer,
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
    pub group_protocol: GroupProtocol,
    #[serde(deserialize_with = "lenient::string_map")]
    pub extra: BTreeMap<String, String>,
}

impl KafkaSettings {
    pub(super) fn validate(&self, errs: &mut Checks) {
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
                // The value is not quoted: it may be a secret pasted into
                // the wrong key.
                None => errs.fail(
                    "kafka.sasl_mechanism",
                    "is required with SASL: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512",
                ),
                Some(_) => errs.fail(
                    "kafka.sasl_mechanism",
                    "unknown value, expected PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512",
                ),
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
        "partition.assignment.strategy" | "group.remote.assignor" => {
            "use kafka.partition_assignment"
        }
        "group.protocol" => "use kafka.group_protocol",
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

#[cfg(test)]
mod tests {
    use crate::config::test_env::*;
    use crate::config::Settings;

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
}

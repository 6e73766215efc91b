//! librdkafka client settings, from the service's configuration: the base
//! every client shares (brokers, security, `kafka.extra`), then the
//! consumer, the transactional producer, the start-up probe and the `dlq`
//! tools' clients; and the ids a pipeline instance goes by
//! (`transactional.id`, `group.instance.id`).

use rdkafka::config::{ClientConfig, RDKafkaLogLevel};

use crate::config::KafkaSettings;

/// The codec of everything the service produces, and of the topics it
/// creates for itself. lz4 rather than zstd: librdkafka builds a zstd
/// context of a megabyte or more for every batch it compresses, which cost
/// 6-9 % of the service's CPU (and as many page faults) on the small
/// records of a backlog; lz4 costs about 1 %. The record size limit is
/// checked before compression either way, so the codec changes what the
/// brokers store, not what fits in a record (docs/benchmarks.md). Records
/// compressed otherwise (the lender's input, an older version's delay
/// records) are still read.
pub const COMPRESSION: &str = "lz4";

/// The longest wait between attempts to reach a broker that is down.
pub const RECONNECT_BACKOFF_MAX_MS: &str = "1000";

/// Settings shared by every client (the admin client, the start-up probe,
/// the DLQ tools, and the base of the consumer and the producer): brokers
/// and security, then `kafka.extra`. Secrets are set here and nowhere else.
pub fn base_config(k: &KafkaSettings) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &k.bootstrap_servers)
        .set("security.protocol", k.security_protocol.as_librdkafka())
        // librdkafka backs off reconnecting up to 10 s by default: after a
        // minute without brokers a client tries again only every 10 s, so
        // the pipeline resumed up to 10 s after they were back. One client
        // per broker a second is no load on a broker that is up.
        .set("reconnect.backoff.max.ms", RECONNECT_BACKOFF_MAX_MS)
        .set_log_level(RDKafkaLogLevel::Warning);
    if k.security_protocol.uses_sasl() {
        c.set("sasl.mechanism", k.sasl_mechanism.as_deref().unwrap_or(""))
            .set("sasl.username", &k.sasl_username)
            .set("sasl.password", k.sasl_password.expose());
    }
    if k.security_protocol.uses_tls() {
        if let Some(ca) = &k.ssl_ca_location {
            c.set("ssl.ca.location", ca.display().to_string());
        }
        if let (Some(cert), Some(key)) = (&k.ssl_certificate_location, &k.ssl_key_location) {
            c.set("ssl.certificate.location", cert.display().to_string())
                .set("ssl.key.location", key.display().to_string());
        }
        if k.ssl_key_password.is_set() {
            c.set("ssl.key.password", k.ssl_key_password.expose());
        }
    }
    for (key, value) in &k.extra {
        c.set(key, value);
    }
    if k.extra.contains_key("debug") {
        // librdkafka's debug contexts are only logged at debug level.
        c.set_log_level(RDKafkaLogLevel::Debug);
    }
    c
}

/// The start-up probe of [`check_connection`]: a consumer needs a group id
/// to be created; the probe never joins it.
pub fn probe_config(k: &KafkaSettings) -> ClientConfig {
    let mut c = base_config(k);
    c.set("group.id", format!("{}-probe", k.group_id));
    c
}

/// The pipeline's consumer: the group, exactly-once reading, and read-ahead
/// kept small. `group_instance_id` is the KIP-345 static member id
/// ([`static_member_id`]).
pub fn consumer_config(k: &KafkaSettings, group_instance_id: Option<&str>) -> ClientConfig {
    let mut c = base_config(k);
    if let Some(id) = group_instance_id {
        c.set("group.instance.id", id);
    }
    match k.group_protocol {
        crate::config::GroupProtocol::Classic => c
            .set(
                "partition.assignment.strategy",
                k.partition_assignment.as_librdkafka(),
            )
            .set(
                "session.timeout.ms",
                k.session_timeout.as_millis().to_string(),
            ),
        // KIP-848: librdkafka refuses both properties above; the brokers
        // assign and own the session timeout.
        crate::config::GroupProtocol::Consumer => c.set("group.protocol", "consumer").set(
            "group.remote.assignor",
            k.partition_assignment.as_remote_assignor(),
        ),
    };
    c.set("group.id", &k.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("isolation.level", "read_committed")
        .set("auto.offset.reset", "earliest")
        .set(
            "max.poll.interval.ms",
            k.max_poll_interval.as_millis().to_string(),
        )
        .set("statistics.interval.ms", "5000")
        .set("enable.partition.eof", "false")
        // librdkafka reads ahead per partition (by default up to 64 MB and
        // 100k records); waiting users must cost Kafka storage, not memory.
        // A delay tier's head is read and then held until due, so whatever
        // was read ahead behind it sits in memory: 100 records a partition
        // (a fifth of a batch) keep that small while a backlog still fills
        // a batch from the partitions that have one.
        .set("queued.max.messages.kbytes", "8192")
        .set("queued.min.messages", "100")
        // With read-ahead that small the per-partition threshold is often
        // reached, and librdkafka then postpones that partition's next
        // fetch by fetch.queue.backoff.ms (1 s by default): a tier record
        // due now would wait for it. A resumed partition also waits for the
        // fetch in flight, which the broker may hold for fetch.wait.max.ms.
        .set("fetch.queue.backoff.ms", "50")
        .set("fetch.message.max.bytes", "65536")
        .set("fetch.wait.max.ms", "100");
    c
}

/// The pipeline's transactional producer. `max_message_bytes` is
/// `topics.max_message_bytes`; the producer's own limit leaves room for the
/// record's headers and framing.
pub fn producer_config(
    k: &KafkaSettings,
    transactional_id: &str,
    max_message_bytes: usize,
) -> ClientConfig {
    let mut c = base_config(k);
    c.set("transactional.id", transactional_id)
        .set(
            "transaction.timeout.ms",
            k.transaction_timeout.as_millis().to_string(),
        )
        .set("enable.idempotence", "true")
        .set("compression.type", COMPRESSION)
        .set("linger.ms", "5")
        .set(
            "message.max.bytes",
            (max_message_bytes + 64 * 1024).to_string(),
        );
    c
}

/// The `dlq` tools' reader: reads a whole topic without joining a group
/// (it assigns partitions itself), committed records only, and learns
/// where each partition ends.
pub fn dlq_reader_config(k: &KafkaSettings) -> ClientConfig {
    let mut c = base_config(k);
    c.set("group.id", "insights-enricher-dlq-tool")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true");
    c
}

/// The `dlq replay` producer: one transaction for the replayed records and
/// their ledger entries, under an id of its own that no pipeline instance
/// uses.
pub fn dlq_replay_config(k: &KafkaSettings, max_message_bytes: usize) -> ClientConfig {
    let mut c = base_config(k);
    c.set(
        "transactional.id",
        format!("{}-dlq-replay", k.transactional_id_prefix),
    )
    .set("compression.type", COMPRESSION)
    .set(
        "message.max.bytes",
        (max_message_bytes + 64 * 1024).to_string(),
    );
    c
}

/// The transactional.id of this instance: the prefix plus the pod (or host)
/// name. KIP-447 fences zombies through the consumer group generation, so
/// the id need not follow partitions; keeping it stable across restarts of
/// the same pod lets a restarted process abort its predecessor's open
/// transaction at once (init_transactions) instead of every read_committed
/// consumer waiting for the transaction timeout. Two live processes must
/// never share an id: pod names are unique; on one host, give each process
/// its own `kafka.transactional_id_prefix`.
/// Without a pod or host name, a random suffix keeps two processes apart
/// (a restart then waits for the transaction timeout instead).
pub fn transactional_id(prefix: &str) -> String {
    let instance = instance_name()
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string()[..12].to_string());
    format!("{prefix}-{instance}")
}

/// The KIP-345 `group.instance.id` when `kafka.static_membership` is on:
/// the prefix plus the pod name, so a restarted pod of the same name takes
/// its partitions back at once. An error when there is no pod name.
pub fn static_member_id(k: &KafkaSettings) -> Result<Option<String>, MissingPodName> {
    if !k.static_membership {
        return Ok(None);
    }
    let instance = instance_name().ok_or(MissingPodName)?;
    Ok(Some(format!("{}-{instance}", k.transactional_id_prefix)))
}

/// `kafka.static_membership` without a pod name to derive the id from.
#[derive(Debug, thiserror::Error)]
#[error(
    "kafka.static_membership needs the pod name in POD_NAME (or HOSTNAME) for group.instance.id"
)]
pub struct MissingPodName;

/// The pod (or host) name this process runs as, if it has one.
fn instance_name() -> Option<String> {
    std::env::var("POD_NAME")
        .or_else(|_| std::env::var("HOSTNAME"))
        .ok()
        .filter(|s| !s.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Settings with every optional property in use: SASL over TLS with a
    /// client certificate, static membership.
    fn everything_on() -> crate::config::Settings {
        let env = [
            ("INSIGHTS__FINBOX__API_KEY", "k"),
            ("INSIGHTS__FINBOX__SERVER_HASH", "h"),
            ("INSIGHTS__CREDEAU__CLIENT_ID", "c"),
            ("INSIGHTS__CREDEAU__AUTH_TOKEN", "t"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        let mut s = crate::config::Settings::load_from(None, env).unwrap();
        // Any file that exists: validate checks that they do.
        let file = std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"));
        let k = &mut s.kafka;
        k.security_protocol = crate::config::SecurityProtocol::SaslSsl;
        k.sasl_mechanism = Some("SCRAM-SHA-512".into());
        k.sasl_username = "svc".into();
        k.sasl_password = crate::config::SecretSource::new("pw");
        k.ssl_ca_location = Some(file.clone());
        k.ssl_certificate_location = Some(file.clone());
        k.ssl_key_location = Some(file);
        k.ssl_key_password = crate::config::SecretSource::new("kpw");
        k.static_membership = true;
        s
    }

    /// Every librdkafka property the service sets, on any of its clients,
    /// is refused in `kafka.extra` (where it would be overridden without a
    /// word, or override what exactly-once depends on).
    #[test]
    fn every_property_the_service_sets_is_refused_in_kafka_extra() {
        let s = everything_on();
        let k = &s.kafka;
        let mut kip848 = k.clone();
        kip848.group_protocol = crate::config::GroupProtocol::Consumer;
        let configs = [
            base_config(k),
            probe_config(k),
            consumer_config(k, Some("member-1")),
            consumer_config(&kip848, Some("member-1")),
            producer_config(k, "tx-1", s.topics.max_message_bytes),
            dlq_reader_config(k),
            dlq_replay_config(k, s.topics.max_message_bytes),
        ];
        let keys: std::collections::BTreeSet<String> = configs
            .iter()
            .flat_map(|c| c.config_map().into_keys().map(str::to_string))
            .collect();
        assert!(keys.len() >= 32, "{keys:?}");
        for key in &keys {
            let mut bad = s.clone();
            bad.kafka.extra.insert(key.clone(), "1".into());
            let e = bad
                .validate()
                .expect_err(&format!("kafka.extra.{key} accepted"))
                .to_string();
            assert!(e.contains(&format!("`kafka.extra.{key}`")), "{e}");
            assert!(e.contains("is set by the service itself"), "{e}");
        }
        // What the service leaves alone still passes through.
        let mut ok = s.clone();
        ok.kafka
            .extra
            .insert("socket.keepalive.enable".into(), "true".into());
        ok.validate().unwrap();
        assert_eq!(
            base_config(&ok.kafka).get("socket.keepalive.enable"),
            Some("true")
        );
    }

    /// KIP-848: librdkafka refuses a consumer with `group.protocol=consumer`
    /// and either classic-only property, so neither is set then.
    #[test]
    fn the_consumer_group_protocol_leaves_out_the_classic_only_properties() {
        let s = everything_on();
        let classic = consumer_config(&s.kafka, None);
        assert!(classic.get("session.timeout.ms").is_some());
        assert!(classic.get("partition.assignment.strategy").is_some());
        assert_eq!(classic.get("group.protocol"), None);
        let mut k = s.kafka.clone();
        k.group_protocol = crate::config::GroupProtocol::Consumer;
        let c = consumer_config(&k, Some("member-1"));
        assert_eq!(c.get("group.protocol"), Some("consumer"));
        assert_eq!(c.get("group.remote.assignor"), Some("range"));
        assert_eq!(c.get("session.timeout.ms"), None);
        assert_eq!(c.get("partition.assignment.strategy"), None);
        assert_eq!(c.get("group.instance.id"), Some("member-1"));
        // librdkafka itself accepts what is left (plaintext: no key files
        // to load).
        let mut plain = k.clone();
        plain.security_protocol = crate::config::SecurityProtocol::Plaintext;
        plain.ssl_ca_location = None;
        plain.ssl_certificate_location = None;
        plain.ssl_key_location = None;
        plain.sasl_mechanism = None;
        consumer_config(&plain, None)
            .create::<rdkafka::consumer::BaseConsumer>()
            .expect("librdkafka accepts the config");
    }
}

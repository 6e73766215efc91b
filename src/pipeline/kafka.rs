//! Kafka clients for the pipeline: librdkafka configuration from settings
//! (security included), the consumer context that tracks assignment and
//! statistics, and the transactional producer.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientContext;
use rdkafka::{Offset, TopicPartitionList};

use crate::config::KafkaSettings;
use crate::metrics::Metrics;
use crate::pipeline::ports::{GroupToken, LoopConsumer, Membership, Polled};
use crate::pipeline::record::{BatchOffsets, Epoch, TopicPartition};
use crate::pipeline::worker::{Incoming, SourceKind};

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

/// Why the brokers could not be reached with the configured security
/// settings. The texts are librdkafka's reasons, which name the mechanism
/// and the user at most, never a password.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("kafka SASL authentication failed (kafka.sasl_mechanism, kafka.sasl_username, kafka.sasl_password): {0}")]
    Authentication(String),
    #[error("kafka TLS handshake failed (kafka.ssl_ca_location, kafka.security_protocol): {0}")]
    Tls(String),
    #[error(
        "kafka.bootstrap_servers = {servers:?}: no broker answered within {timeout:?} ({reason})"
    )]
    Unreachable {
        servers: String,
        timeout: Duration,
        reason: String,
    },
    #[error("kafka client: {0}")]
    Client(#[from] KafkaError),
}

/// Records the first authentication or TLS failure librdkafka reports while
/// the probe is polled.
#[derive(Default)]
struct ProbeContext {
    failure: Mutex<Option<(RDKafkaErrorCode, String)>>,
    last: Mutex<Option<String>>,
}

impl ClientContext for ProbeContext {
    // librdkafka's own log lines repeat what `error` receives.
    fn log(&self, _level: RDKafkaLogLevel, _fac: &str, _message: &str) {}

    fn error(&self, error: KafkaError, reason: &str) {
        let code = error.rdkafka_error_code();
        if let Ok(mut last) = self.last.lock() {
            *last = Some(reason.to_string());
        }
        if let Some(code @ (RDKafkaErrorCode::Authentication | RDKafkaErrorCode::SSL)) = code {
            if let Ok(mut failure) = self.failure.lock() {
                failure.get_or_insert((code, reason.to_string()));
            }
        }
    }
}

impl ConsumerContext for ProbeContext {}

/// Connects once with the configured brokers and security settings before
/// anything else uses them, so wrong credentials or an untrusted broker
/// certificate stop the service at start with a message that says so,
/// instead of a generic metadata timeout. Blocking: call it off the async
/// runtime.
pub fn check_connection(k: &KafkaSettings, timeout: Duration) -> Result<(), ConnectError> {
    let probe: BaseConsumer<ProbeContext> =
        probe_config(k).create_with_context(ProbeContext::default())?;
    let started = Instant::now();
    loop {
        // Metadata first: a healthy cluster answers at once and start-up
        // is not delayed. Polling then serves the error events that say
        // why it did not.
        if probe
            .fetch_metadata(None, Duration::from_millis(500))
            .is_ok()
        {
            return Ok(());
        }
        let _ = probe.poll(Duration::from_millis(100));
        if let Ok(failure) = probe.context().failure.lock() {
            match failure.as_ref() {
                Some((RDKafkaErrorCode::Authentication, reason)) => {
                    return Err(ConnectError::Authentication(reason.clone()))
                }
                Some((_, reason)) => return Err(ConnectError::Tls(reason.clone())),
                None => {}
            }
        }
        if started.elapsed() >= timeout {
            let reason = probe
                .context()
                .last
                .lock()
                .ok()
                .and_then(|l| l.clone())
                .unwrap_or_else(|| "no answer".to_string());
            return Err(ConnectError::Unreachable {
                servers: k.bootstrap_servers.clone(),
                timeout,
                reason,
            });
        }
    }
}

/// What the consumer context learned during the last poll: partitions
/// revoked (the loop drops their records and pause state) and the current
/// assignment with each partition's epoch.
#[derive(Default)]
pub struct AssignmentState {
    pub revoked: Vec<TopicPartition>,
    pub assigned: HashMap<TopicPartition, Epoch>,
    /// Bumped on every assignment change, so the loop can react once.
    pub generation: u64,
    /// The last epoch handed out.
    epochs: Epoch,
}

/// Consumer context: rebalance bookkeeping, statistics to metrics, broker
/// reachability for readiness.
pub struct PipelineContext {
    pub metrics: Arc<Metrics>,
    pub assignment: Mutex<AssignmentState>,
    pub broker_up: AtomicBool,
    pub joined: AtomicBool,
    /// Topics whose lag counts as "users waiting" (the delay tiers).
    pub delay_topics: HashSet<String>,
    /// The next offset this process committed per partition (transactional
    /// commits bypass the consumer, so its own statistics do not know them).
    committed: Mutex<HashMap<TopicPartition, i64>>,
    /// Unread records per partition, from the last statistics.
    lag: Mutex<HashMap<TopicPartition, i64>>,
    /// The broker leading each partition, from the last statistics.
    leaders: Mutex<HashMap<TopicPartition, i32>>,
    /// Whether a transaction carrying consumed offsets is open.
    pub transaction: TransactionGate,
    /// Lowers this instance's share of the provider rate limits as soon as
    /// partitions are revoked (see [`PipelineContext::set_share_hook`]).
    share_hook: OnceLock<ShareHook>,
}

/// This instance's share of the provider rate limits, set from the
/// partitions it holds out of `total`.
pub type ShareFn = Arc<dyn Fn(f64) + Send + Sync>;

/// The share (0..=1) of the provider rate limits that `held` of `total`
/// consumed partitions give; all of it when the total is unknown (0).
pub fn share_of(held: usize, total: usize) -> f64 {
    if total == 0 {
        1.0
    } else {
        (held as f64 / total as f64).clamp(0.0, 1.0)
    }
}

struct ShareHook {
    total: usize,
    set: ShareFn,
}

/// Marks the time a transaction with consumed offsets is open, so that a
/// revocation waits for it: the loop commits one batch while it already
/// reads the next, and a partition must not move to another consumer while
/// offsets of it are still in an open transaction (the new owner would read
/// from the old committed offset and process those records a second time).
/// Rebalance callbacks run on the loop's thread inside its poll; the
/// transaction runs on blocking threads of its own, so waiting here cannot
/// hold up what it waits for.
pub struct TransactionGate {
    open: Mutex<bool>,
    closed: Condvar,
    /// The longest a revocation waits (beyond it the transaction times out
    /// on the broker anyway).
    patience: Duration,
}

/// An open transaction; dropping it closes the gate.
pub struct OpenTransaction<'a>(&'a TransactionGate);

impl TransactionGate {
    pub fn new(patience: Duration) -> TransactionGate {
        TransactionGate {
            open: Mutex::new(false),
            closed: Condvar::new(),
            patience,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, bool> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn open(&self) -> OpenTransaction<'_> {
        *self.lock() = true;
        OpenTransaction(self)
    }

    pub fn is_open(&self) -> bool {
        *self.lock()
    }

    /// Blocks until no transaction is open, or `patience` has passed;
    /// returns whether it closed in time.
    pub fn wait_closed(&self) -> bool {
        let guard = self.lock();
        let (guard, _) = self
            .closed
            .wait_timeout_while(guard, self.patience, |open| *open)
            .unwrap_or_else(|p| p.into_inner());
        !*guard
    }
}

impl Drop for OpenTransaction<'_> {
    fn drop(&mut self) {
        *self.0.lock() = false;
        self.0.closed.notify_all();
    }
}

impl PipelineContext {
    /// `transaction_timeout` bounds how long a revocation waits for an
    /// open transaction.
    pub fn new(
        metrics: Arc<Metrics>,
        delay_topics: HashSet<String>,
        transaction_timeout: Duration,
    ) -> PipelineContext {
        PipelineContext {
            metrics,
            assignment: Mutex::new(AssignmentState::default()),
            broker_up: AtomicBool::new(false),
            joined: AtomicBool::new(false),
            delay_topics,
            committed: Mutex::new(HashMap::new()),
            lag: Mutex::new(HashMap::new()),
            leaders: Mutex::new(HashMap::new()),
            transaction: TransactionGate::new(transaction_timeout + Duration::from_secs(5)),
            share_hook: OnceLock::new(),
        }
    }

    /// Has revocations lower the share at once, inside the rebalance
    /// callback: before this member rejoins, so before any other member is
    /// handed the partitions. The loop raises it again when it sees the new
    /// assignment, which can come within the same poll; lowered only there,
    /// the old and the new owner would hold a share of the same partitions
    /// at once and the shares could add up to more than the limit.
    pub fn set_share_hook(&self, total: usize, set: ShareFn) {
        if total > 0 {
            let _ = self.share_hook.set(ShareHook { total, set });
        }
    }

    /// Records offsets committed in a transaction (next offset to read).
    pub fn record_committed(&self, offsets: impl IntoIterator<Item = (TopicPartition, i64)>) {
        let mut c = self.committed.lock().unwrap_or_else(|p| p.into_inner());
        c.extend(offsets);
    }

    fn with_assignment<R>(&self, f: impl FnOnce(&mut AssignmentState) -> R) -> R {
        let mut guard = self
            .assignment
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        f(&mut guard)
    }

    /// Takes the partitions revoked since the last call.
    pub fn take_revoked(&self) -> Vec<TopicPartition> {
        self.with_assignment(|a| std::mem::take(&mut a.revoked))
    }

    pub fn assigned(&self) -> (u64, HashMap<TopicPartition, Epoch>) {
        self.with_assignment(|a| (a.generation, a.assigned.clone()))
    }

    /// Whether every partition of a batch is still assigned under the
    /// epoch the batch read it with.
    pub fn still_owned(&self, offsets: &BatchOffsets) -> Result<(), TopicPartition> {
        self.with_assignment(|a| crate::pipeline::record::still_owned(&a.assigned, offsets))
    }

    pub fn lag(&self) -> Vec<(TopicPartition, i64)> {
        let lag = self.lag.lock().unwrap_or_else(|p| p.into_inner());
        lag.iter().map(|(tp, l)| (tp.clone(), *l)).collect()
    }
}

impl ClientContext for PipelineContext {
    fn stats(&self, stats: Statistics) {
        let up = stats.brokers.values().any(|b| b.state == "UP");
        self.broker_up.store(up, Ordering::Relaxed);
        let committed = self
            .committed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut waiting = 0i64;
        let mut lags = HashMap::new();
        let mut leaders = HashMap::new();
        for (topic, t) in &stats.topics {
            for (id, p) in &t.partitions {
                if *id < 0 || !p.desired {
                    continue;
                }
                let end = if p.ls_offset >= 0 {
                    p.ls_offset
                } else {
                    p.hi_offset
                };
                let tp = TopicPartition::new(topic.as_str(), *id);
                leaders.insert(tp.clone(), p.leader);
                let ours = committed.get(&tp).copied();
                let position = [ours.unwrap_or(-1), p.committed_offset, p.lo_offset]
                    .into_iter()
                    .find(|o| *o >= 0)
                    .unwrap_or(end);
                let lag = (end - position).max(0);
                lags.insert(tp, lag);
                self.metrics
                    .consumer_lag
                    .with_label_values(&[topic.as_str(), &id.to_string()])
                    .set(lag);
                if self.delay_topics.contains(topic) {
                    waiting += lag;
                }
            }
        }
        self.metrics.users_waiting.set(waiting);
        *self.lag.lock().unwrap_or_else(|p| p.into_inner()) = lags;
        *self.leaders.lock().unwrap_or_else(|p| p.into_inner()) = leaders;
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if matches!(
            error.rdkafka_error_code(),
            Some(rdkafka::types::RDKafkaErrorCode::AllBrokersDown)
        ) {
            self.broker_up.store(false, Ordering::Relaxed);
        }
        tracing::warn!(error = %error, reason, "kafka client error");
    }
}

impl ConsumerContext for PipelineContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let revoked: Vec<TopicPartition> = tpl
                .elements()
                .iter()
                .map(|e| TopicPartition::new(e.topic(), e.partition()))
                .collect();
            tracing::info!(partitions = revoked.len(), "partitions revoked");
            // A lost assignment (the session expired, e.g. in a broker
            // outage longer than the session timeout) is no longer ours to
            // hold: the group already moved on, and the open transaction's
            // offsets are refused under the old generation. Waiting here
            // would only keep librdkafka from rejoining; held across the
            // brokers' return it heartbeats with an empty member id, which
            // fences a static member fatally.
            if consumer.assignment_lost() {
                tracing::warn!(
                    partitions = revoked.len(),
                    "assignment lost (session expired); rejoining the group"
                );
            } else if self.transaction.is_open() && !self.transaction.wait_closed() {
                tracing::warn!("a transaction was still open when partitions were revoked");
            }
            {
                let mut c = self.committed.lock().unwrap_or_else(|p| p.into_inner());
                for tp in &revoked {
                    c.remove(tp);
                }
            }
            {
                let mut lag = self.lag.lock().unwrap_or_else(|p| p.into_inner());
                for tp in &revoked {
                    lag.remove(tp);
                }
            }
            for tp in &revoked {
                let _ = self
                    .metrics
                    .consumer_lag
                    .remove_label_values(&[tp.topic.as_str(), &tp.partition.to_string()]);
            }
            let left = self.with_assignment(|a| {
                for tp in &revoked {
                    a.assigned.remove(tp);
                }
                a.revoked.extend(revoked);
                a.generation += 1;
                a.assigned.len()
            });
            if let Some(hook) = self.share_hook.get() {
                (hook.set)(share_of(left, hook.total));
            }
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                // A partition this process paused (holding a record not yet
                // due) and that comes back to it in a later rebalance must
                // not stay paused: the loop forgot it when it was revoked.
                if let Err(e) = consumer.resume(tpl) {
                    tracing::debug!(error = %e, "resume of newly assigned partitions failed");
                }
                let added: Vec<TopicPartition> = tpl
                    .elements()
                    .iter()
                    .map(|e| TopicPartition::new(e.topic(), e.partition()))
                    .collect();
                tracing::info!(partitions = added.len(), "partitions assigned");
                self.with_assignment(|a| {
                    for tp in added {
                        a.epochs += 1;
                        a.assigned.insert(tp, a.epochs);
                    }
                    a.generation += 1;
                });
                self.joined.store(true, Ordering::Relaxed);
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
        }
    }
}

/// The pipeline's consumer over librdkafka.
pub struct KafkaConsumer {
    pub consumer: Arc<StreamConsumer<PipelineContext>>,
    pub topic_kinds: HashMap<String, SourceKind>,
}

impl KafkaConsumer {
    /// librdkafka takes a resume in on its broker thread's next wake-up,
    /// and a broker thread whose partitions were all paused sleeps up to a
    /// second: a backlog read in bursts then waited most of a second after
    /// every resume (docs/benchmarks.md). Any request to that broker wakes
    /// its thread, so one watermark query per leading broker (one unknown
    /// leader stands for all before the first statistics) goes out on a
    /// blocking thread; its answer is not used.
    fn wake_fetchers(&self, partitions: &[TopicPartition]) {
        if partitions.is_empty() {
            return;
        }
        let one_per_leader: Vec<TopicPartition> = {
            let leaders = self
                .consumer
                .context()
                .leaders
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let mut seen = HashSet::new();
            partitions
                .iter()
                .filter(|tp| seen.insert(leaders.get(*tp).copied().unwrap_or(-1)))
                .cloned()
                .collect()
        };
        let consumer = self.consumer.clone();
        let wake = move || {
            for tp in one_per_leader {
                let _ = consumer.fetch_watermarks(&tp.topic, tp.partition, Duration::from_secs(1));
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(wake)),
            Err(_) => drop(std::thread::spawn(wake)),
        }
    }

    /// The generation and member id librdkafka holds now.
    fn membership(&self) -> Option<Membership> {
        use rdkafka::bindings as rd;
        let rk = self.consumer.client().native_ptr();
        // SAFETY: `rk` is a live consumer handle owned by `self.consumer`.
        // librdkafka returns a new metadata object (or null) that we own:
        // it is read with its own accessors, whose member id string lives
        // as long as the object, copied, and destroyed exactly once here.
        unsafe {
            let cgm = rd::rd_kafka_consumer_group_metadata(rk);
            if cgm.is_null() {
                return None;
            }
            let generation = rd::rd_kafka_consumer_group_metadata_generation_id(cgm);
            let member = rd::rd_kafka_consumer_group_metadata_member_id(cgm);
            let member_id = if member.is_null() {
                String::new()
            } else {
                std::ffi::CStr::from_ptr(member)
                    .to_string_lossy()
                    .into_owned()
            };
            rd::rd_kafka_consumer_group_metadata_destroy(cgm);
            Some(Membership {
                generation,
                member_id,
            })
        }
    }

    fn tpl(partitions: &[TopicPartition]) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        for tp in partitions {
            tpl.add_partition(&tp.topic, tp.partition);
        }
        tpl
    }
}

fn detach(msg: &rdkafka::message::BorrowedMessage<'_>, kind: SourceKind) -> Incoming {
    let headers = msg
        .headers()
        .map(|h| {
            h.iter()
                .map(|hdr| {
                    (
                        hdr.key.to_string(),
                        hdr.value.map(<[u8]>::to_vec).unwrap_or_default(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    Incoming {
        kind,
        topic: msg.topic().to_string(),
        partition: msg.partition(),
        offset: msg.offset(),
        timestamp: msg.timestamp().to_millis(),
        key: msg.key().map(<[u8]>::to_vec),
        value: msg.payload().map(<[u8]>::to_vec),
        headers,
    }
}

#[async_trait::async_trait]
impl LoopConsumer for KafkaConsumer {
    async fn poll(&self, wait: Duration) -> Polled {
        match tokio::time::timeout(wait, self.consumer.recv()).await {
            Err(_elapsed) => Polled::Idle,
            Ok(Err(e @ KafkaError::MessageConsumptionFatal(_))) => Polled::Fatal(e.to_string()),
            Ok(Err(e)) => Polled::Error(e.to_string()),
            Ok(Ok(msg)) => match self.topic_kinds.get(msg.topic()) {
                Some(kind) => Polled::Record(detach(&msg, *kind)),
                None => Polled::Idle,
            },
        }
    }

    fn pause(&self, partitions: &[TopicPartition]) {
        if let Err(e) = self.consumer.pause(&Self::tpl(partitions)) {
            tracing::debug!(error = %e, "pause failed");
        }
    }

    fn resume(&self, partitions: &[TopicPartition]) {
        // A partition revoked meanwhile cannot be resumed: benign.
        if let Err(e) = self.consumer.resume(&Self::tpl(partitions)) {
            tracing::debug!(error = %e, "resume failed");
        }
        self.wake_fetchers(partitions);
    }

    fn seek(&self, tp: &TopicPartition, offset: i64) {
        // Synchronous, bounded: a seek must take effect before the
        // partition is resumed. An asynchronous one (timeout 0) could be
        // overtaken by the resume, which then fetched from after the last
        // record delivered, and a held record was skipped.
        if let Err(e) = self.consumer.seek(
            &tp.topic,
            tp.partition,
            Offset::Offset(offset),
            Duration::from_secs(2),
        ) {
            tracing::warn!(error = %e, partition = %tp, offset, "seek failed");
        }
    }

    fn take_revoked(&self) -> Vec<TopicPartition> {
        self.consumer.context().take_revoked()
    }

    fn assignment(&self) -> (u64, HashMap<TopicPartition, Epoch>) {
        self.consumer.context().assigned()
    }

    fn assignment_changes(&self) -> u64 {
        self.consumer.context().with_assignment(|a| a.generation)
    }

    fn connection(&self) -> (bool, bool) {
        let ctx = self.consumer.context();
        (
            ctx.joined.load(Ordering::Relaxed),
            ctx.broker_up.load(Ordering::Relaxed),
        )
    }

    fn lag(&self) -> Vec<(TopicPartition, i64)> {
        self.consumer.context().lag()
    }

    fn record_committed(&self, offsets: &BatchOffsets) {
        self.consumer
            .context()
            .record_committed(offsets.iter().map(|(tp, r)| (tp.clone(), r.range.next())));
    }

    fn group_token(&self) -> Option<GroupToken> {
        // The membership is read before and after the metadata object is
        // taken: equal both times means the object carries exactly it (a
        // consumer that left and joined again has a new member id).
        let before = self.membership()?;
        let metadata = self.consumer.group_metadata()?;
        let after = self.membership()?;
        let membership = if before == after {
            after
        } else {
            Membership {
                generation: -1,
                member_id: String::new(),
            }
        };
        Some(GroupToken {
            membership,
            metadata: Some(Arc::new(metadata)),
        })
    }

    fn still_owned(&self, offsets: &BatchOffsets) -> Result<(), TopicPartition> {
        self.consumer.context().still_owned(offsets)
    }

    fn transaction_gate(&self) -> &TransactionGate {
        &self.consumer.context().transaction
    }
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
            .create::<BaseConsumer>()
            .expect("librdkafka accepts the config");
    }

    #[test]
    fn a_revocation_waits_until_the_open_transaction_ends() {
        let gate = Arc::new(TransactionGate::new(Duration::from_secs(10)));
        let open = gate.open();
        assert!(gate.is_open());
        let waiter = {
            let gate = gate.clone();
            std::thread::spawn(move || {
                let began = Instant::now();
                (gate.wait_closed(), began.elapsed())
            })
        };
        std::thread::sleep(Duration::from_millis(200));
        drop(open);
        let (closed, waited) = waiter.join().unwrap();
        assert!(closed);
        assert!(
            waited >= Duration::from_millis(150),
            "waited only {waited:?}"
        );
        assert!(!gate.is_open());
    }

    #[test]
    fn a_revocation_stops_waiting_after_the_patience() {
        let gate = TransactionGate::new(Duration::from_millis(100));
        let _open = gate.open();
        let began = Instant::now();
        assert!(!gate.wait_closed());
        assert!(began.elapsed() >= Duration::from_millis(100));
    }

    #[test]
    fn with_no_transaction_open_nothing_waits() {
        let gate = TransactionGate::new(Duration::from_secs(60));
        let began = Instant::now();
        assert!(gate.wait_closed());
        assert!(began.elapsed() < Duration::from_secs(1));
    }
}

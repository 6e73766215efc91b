//! Kafka clients for the pipeline: librdkafka configuration from settings
//! (security included), the consumer context that tracks assignment and
//! statistics, and the transactional producer.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientContext;

use crate::config::KafkaSettings;
use crate::metrics::Metrics;

/// Settings shared by every client: brokers and security. Secrets are set
/// here and nowhere else.
pub fn base_config(k: &KafkaSettings) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &k.bootstrap_servers)
        .set("security.protocol", k.security_protocol.as_librdkafka())
        .set_log_level(RDKafkaLogLevel::Warning);
    if k.security_protocol.uses_sasl() {
        c.set("sasl.mechanism", &k.sasl_mechanism)
            .set("sasl.username", &k.sasl_username)
            .set("sasl.password", k.sasl_password.expose());
    }
    if k.security_protocol.uses_tls() {
        if !k.ssl_ca_location.is_empty() {
            c.set("ssl.ca.location", &k.ssl_ca_location);
        }
        if !k.ssl_certificate_location.is_empty() {
            c.set("ssl.certificate.location", &k.ssl_certificate_location)
                .set("ssl.key.location", &k.ssl_key_location);
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
    let mut config = base_config(k);
    // A consumer needs a group id to be created; the probe never joins it.
    config.set("group.id", format!("{}-probe", k.group_id));
    let probe: BaseConsumer<ProbeContext> = config.create_with_context(ProbeContext::default())?;
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
/// assignment.
#[derive(Default)]
pub struct AssignmentState {
    pub revoked: Vec<(String, i32)>,
    pub assigned: HashSet<(String, i32)>,
    /// Bumped on every assignment change, so the loop can react once.
    pub generation: u64,
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
    committed: Mutex<HashMap<(String, i32), i64>>,
    /// Whether a transaction carrying consumed offsets is open.
    pub transaction: TransactionGate,
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
            transaction: TransactionGate::new(transaction_timeout + Duration::from_secs(5)),
        }
    }

    /// Records offsets committed in a transaction (next offset to read).
    pub fn record_committed(&self, offsets: impl IntoIterator<Item = ((String, i32), i64)>) {
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
    pub fn take_revoked(&self) -> Vec<(String, i32)> {
        self.with_assignment(|a| std::mem::take(&mut a.revoked))
    }

    pub fn assigned(&self) -> (u64, HashSet<(String, i32)>) {
        self.with_assignment(|a| (a.generation, a.assigned.clone()))
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
                let ours = committed.get(&(topic.clone(), *id)).copied();
                let position = [ours.unwrap_or(-1), p.committed_offset, p.lo_offset]
                    .into_iter()
                    .find(|o| *o >= 0)
                    .unwrap_or(end);
                let lag = (end - position).max(0);
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
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let revoked: Vec<(String, i32)> = tpl
                .elements()
                .iter()
                .map(|e| (e.topic().to_string(), e.partition()))
                .collect();
            tracing::info!(partitions = revoked.len(), "partitions revoked");
            if self.transaction.is_open() && !self.transaction.wait_closed() {
                tracing::warn!("a transaction was still open when partitions were revoked");
            }
            {
                let mut c = self.committed.lock().unwrap_or_else(|p| p.into_inner());
                for tp in &revoked {
                    c.remove(tp);
                }
            }
            for (t, p) in &revoked {
                let _ = self
                    .metrics
                    .consumer_lag
                    .remove_label_values(&[t.as_str(), &p.to_string()]);
            }
            self.with_assignment(|a| {
                for tp in &revoked {
                    a.assigned.remove(tp);
                }
                a.revoked.extend(revoked);
                a.generation += 1;
            });
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
                let added: Vec<(String, i32)> = tpl
                    .elements()
                    .iter()
                    .map(|e| (e.topic().to_string(), e.partition()))
                    .collect();
                tracing::info!(partitions = added.len(), "partitions assigned");
                self.with_assignment(|a| {
                    a.assigned.extend(added);
                    a.generation += 1;
                });
                self.joined.store(true, Ordering::Relaxed);
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

//! The start-up connection probe: connects once with the configured
//! brokers and security settings, so that wrong credentials or an untrusted
//! certificate stop start-up with a message that says so.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientContext;

use crate::config::KafkaSettings;
use crate::kafka::settings::probe_config;

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

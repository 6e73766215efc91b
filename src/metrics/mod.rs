//! Prometheus metrics: one registry per process, every metric the service
//! exports, named after Prometheus conventions (base units, `_total` for
//! counters, bounded label values only: never a user id). The metrics are
//! one table ([`metrics!`] below): field, type, name (under the
//! `insights_` prefix), help, labels and, for histograms, buckets.

use prometheus::core::Collector;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

pub mod events;

/// A metric built from one row of the table and registered.
trait Define: Collector + Clone + Sized + 'static {
    fn make(name: &str, help: &str, labels: &[&str], buckets: &[f64]) -> prometheus::Result<Self>;

    /// The `expect`s only fire on a malformed static definition or a
    /// duplicate registration, both programming errors caught by any test
    /// that builds a `Metrics`.
    fn define(
        registry: &Registry,
        name: &str,
        help: &str,
        labels: &[&str],
        buckets: &[f64],
    ) -> Self {
        let m = Self::make(name, help, labels, buckets).expect("static metric definition");
        registry
            .register(Box::new(m.clone()))
            .expect("metric registered once");
        m
    }
}

impl Define for IntCounterVec {
    fn make(name: &str, help: &str, labels: &[&str], _: &[f64]) -> prometheus::Result<Self> {
        IntCounterVec::new(Opts::new(name, help), labels)
    }
}

impl Define for IntGaugeVec {
    fn make(name: &str, help: &str, labels: &[&str], _: &[f64]) -> prometheus::Result<Self> {
        IntGaugeVec::new(Opts::new(name, help), labels)
    }
}

impl Define for IntCounter {
    fn make(name: &str, help: &str, _: &[&str], _: &[f64]) -> prometheus::Result<Self> {
        IntCounter::new(name, help)
    }
}

impl Define for IntGauge {
    fn make(name: &str, help: &str, _: &[&str], _: &[f64]) -> prometheus::Result<Self> {
        IntGauge::new(name, help)
    }
}

impl Define for Histogram {
    fn make(name: &str, help: &str, _: &[&str], buckets: &[f64]) -> prometheus::Result<Self> {
        Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
    }
}

impl Define for HistogramVec {
    fn make(name: &str, help: &str, labels: &[&str], buckets: &[f64]) -> prometheus::Result<Self> {
        HistogramVec::new(
            HistogramOpts::new(name, help).buckets(buckets.to_vec()),
            labels,
        )
    }
}

/// Latency buckets of a provider request, in seconds.
const LATENCY: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// The table: each row a field of [`Metrics`], its type and its
/// definition `(name, help, labels[, buckets])`.
macro_rules! metrics {
    ($($field:ident : $ty:ty = ($name:literal, $help:literal, [$($label:literal),*] $(, $buckets:expr)?);)*) => {
        /// All metrics of one process. Cheap to clone handles out of; share
        /// it in an `Arc`.
        pub struct Metrics {
            /// The service's own metrics, each named `insights_*`.
            pub registry: Registry,
            /// The standard process metrics (`process_cpu_seconds_total`,
            /// `process_resident_memory_bytes`, ...), unprefixed as
            /// dashboards and the Prometheus conventions expect them.
            pub process_registry: Registry,
            $(#[doc = $help] pub $field: $ty,)*
        }

        impl Metrics {
            fn define_all(registry: Registry, process_registry: Registry) -> Metrics {
                Metrics {
                    $($field: <$ty as Define>::define(
                        &registry,
                        $name,
                        $help,
                        &[$($label),*],
                        metrics!(@buckets $($buckets)?),
                    ),)*
                    registry,
                    process_registry,
                }
            }
        }
    };
    (@buckets) => { &[] };
    (@buckets $buckets:expr) => { $buckets };
}

metrics! {
    // providers
    provider_requests: IntCounterVec = ("provider_requests_total",
        "HTTP requests to a provider, by outcome and HTTP status (\"none\" when no response).",
        ["provider", "outcome", "http_status"]);
    provider_request_duration: HistogramVec = ("provider_request_duration_seconds",
        "Latency of one HTTP request to a provider.",
        ["provider"], LATENCY);
    provider_retries: IntCounterVec = ("provider_retries_total",
        "In-process retries of a provider call, by reason.",
        ["provider", "reason"]);
    stragglers_cut: IntCounterVec = ("stragglers_cut_total",
        "Provider polls cut short because their record was holding its batch (schedule.straggler_wait, or four times what answers take now); the call goes on, parked, and the user's next poll takes its answer.",
        ["provider"]);
    rate_limiter_wait: HistogramVec = ("rate_limiter_wait_seconds",
        "Time a request waited for the client-side rate limiter.",
        ["provider"], &[0.0, 0.001, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0]);
    provider_healthy: IntGaugeVec = ("provider_healthy",
        "0 after the provider rejected our credentials or IP (401/403), 1 otherwise.",
        ["provider"]);
    rate_limit: IntGaugeVec = ("rate_limit_per_minute",
        "Requests per minute this instance may send the provider now: its share of the deployment's limit (its share of all partitions), lower during a back-off after a 429.",
        ["provider"]);
    provider_unexpected_data: IntCounterVec = ("provider_unexpected_data_total",
        "Final provider answers whose data is not in the documented shape (FinBox `data` not a list of {name, value} objects); published with the raw data, not retried.",
        ["provider"]);
    provider_identity_mismatch: IntCounterVec = ("provider_identity_mismatch_total",
        "Provider answers about another user than the one asked for (FinBox echoed another customer_id, a Credeau SMS entry names another user_id); the provider ends failed with identity_mismatch and nothing is published.",
        ["provider"]);
    provider_partial_answers: IntCounterVec = ("provider_partial_answers_total",
        "Final provider answers that say the provider holds more than it sent (Credeau has_more true, a next_cursor, or a total above the entries sent); published, flagged partial in the combined event.",
        ["provider"]);
    // pipeline
    events_consumed: IntCounterVec = ("events_consumed_total",
        "Records consumed, by topic kind (input, delay) and result.",
        ["topic", "result"]);
    tasks_scheduled: IntCounterVec = ("tasks_scheduled_total",
        "Task records written to a delay tier.",
        ["tier"]);
    tasks_due: IntCounterVec = ("tasks_due_total",
        "Task records read back from a delay tier at or after their due time.",
        ["tier"]);
    tasks_forwarded: IntCounterVec = ("tasks_forwarded_total",
        "Task records read back before their due time and sent on to a shorter tier.",
        ["tier"]);
    poll_lateness: HistogramVec = ("poll_lateness_seconds",
        "How long after its due time a task was processed, by the delay tier it was read from.",
        ["tier"], &[0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 15.0, 60.0]);
    users_waiting: IntGauge = ("users_waiting",
        "Users waiting for their next poll: task records in the delay-tier partitions this process holds that the group has not committed past (refreshed every 5 s; exact while at most 2,000 wait there, beyond that over by at most one transaction marker per batch written).",
        []);
    published: IntCounterVec = ("published_total",
        "Records published (committed in a transaction), by topic kind.",
        ["topic"]);
    dead_letters: IntCounterVec = ("dead_letters_total",
        "Records sent to the dead-letter topic, by stage and reason.",
        ["stage", "reason"]);
    transactions: IntCounterVec = ("transactions_total",
        "Kafka transactions, by result (committed, aborted).",
        ["result"]);
    batch_size: Histogram = ("batch_records",
        "Records consumed per transaction.",
        [], &[1.0, 5.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0]);
    transaction_duration: Histogram = ("transaction_duration_seconds",
        "Time from a batch's transaction begin to its commit or abort (batches commit one at a time, in order).",
        [], &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]);
    onboarding_to_combined: Histogram = ("onboarding_to_combined_seconds",
        "Time from the onboarding timestamp to the combined insights event.",
        [], &[1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 900.0, 1800.0, 3600.0, 10800.0, 21600.0, 86400.0]);
    large_answers: IntCounterVec = ("large_answers_total",
        "Provider answers that announced over a quarter of schedule.max_in_flight_bytes (at twice their size), by whether they waited unread for the budget to have room (true) or had it at once (false).",
        ["waited"]);
    assigned_partitions: IntGauge = ("assigned_partitions",
        "Partitions of the input topic assigned to this process.",
        []);
    consumer_lag: IntGaugeVec = ("consumer_lag_records",
        "Consumer lag per topic and partition, from librdkafka statistics.",
        ["topic", "partition"]);
    loop_iterations: IntCounter = ("consume_loop_iterations_total",
        "Iterations of the consume loop (liveness follows this).",
        []);
    build_info: IntGaugeVec = ("build_info",
        "Build information; the value is always 1.",
        ["version"]);
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry =
            Registry::new_custom(Some("insights".into()), None).expect("static registry prefix");
        let process_registry = Registry::new();
        #[cfg(target_os = "linux")]
        {
            let pc = prometheus::process_collector::ProcessCollector::for_self();
            let _ = process_registry.register(Box::new(pc));
        }
        let m = Metrics::define_all(registry, process_registry);
        m.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        for p in ["finbox", "credeau"] {
            m.provider_healthy.with_label_values(&[p]).set(1);
            // Exported at 0 from the start, so the first such answer is an
            // increase the alerts on them can see.
            m.provider_unexpected_data.with_label_values(&[p]);
            m.provider_identity_mismatch.with_label_values(&[p]);
            m.provider_partial_answers.with_label_values(&[p]);
            // The answers the auth alert divides by.
            m.provider_requests
                .with_label_values(&[p, "unauthorized", "401"]);
            m.provider_requests
                .with_label_values(&[p, "forbidden", "403"]);
        }
        for result in ["committed", "aborted"] {
            m.transactions.with_label_values(&[result]);
        }
        m
    }

    /// Exports `insights_dead_letters_total` at 0 for each (stage, reason)
    /// pair, so the first dead letter of a kind is an increase that
    /// `rate()` and `increase()` see (a series that first appears at 1
    /// shows none).
    pub fn export_dead_letter_labels<'a>(
        &self,
        pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) {
        for (stage, reason) in pairs {
            self.dead_letters.with_label_values(&[stage, reason]);
        }
    }

    /// The registry in Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let encoder = TextEncoder::new();
        let mut families = self.registry.gather();
        families.extend(self.process_registry.gather());
        if let Err(e) = encoder.encode(&families, &mut buf) {
            return format!("# encoding failed: {e}\n");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_series_alerts_watch_are_exported_at_zero_from_the_start() {
        let m = Metrics::new();
        m.export_dead_letter_labels([("poll_credeau", "forbidden"), ("decode", "empty")]);
        let text = m.render();
        for line in [
            "insights_dead_letters_total{reason=\"forbidden\",stage=\"poll_credeau\"} 0",
            "insights_dead_letters_total{reason=\"empty\",stage=\"decode\"} 0",
            "insights_provider_requests_total{http_status=\"403\",outcome=\"forbidden\",provider=\"finbox\"} 0",
            "insights_provider_requests_total{http_status=\"401\",outcome=\"unauthorized\",provider=\"credeau\"} 0",
            "insights_transactions_total{result=\"aborted\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
        }
    }

    #[test]
    fn renders_prefixed_metrics() {
        let m = Metrics::new();
        m.provider_requests
            .with_label_values(&["finbox", "complete", "200"])
            .inc();
        let text = m.render();
        assert!(text.contains("insights_provider_requests_total{http_status=\"200\",outcome=\"complete\",provider=\"finbox\"} 1"), "{text}");
        assert!(text.contains("insights_build_info"));
    }

    #[test]
    fn the_provider_answer_counters_the_alerts_watch_start_at_zero() {
        let text = Metrics::new().render();
        for name in [
            "insights_provider_unexpected_data_total",
            "insights_provider_identity_mismatch_total",
            "insights_provider_partial_answers_total",
        ] {
            for p in ["finbox", "credeau"] {
                let line = format!("{name}{{provider=\"{p}\"}} 0");
                assert!(text.contains(&line), "{line} in\n{text}");
            }
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn process_metrics_carry_their_standard_unprefixed_names() {
        let text = Metrics::new().render();
        for name in [
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_open_fds",
            "process_start_time_seconds",
        ] {
            assert!(
                text.lines().any(|l| l.starts_with(&format!("{name} "))),
                "{name} missing:\n{text}"
            );
        }
        assert!(!text.contains("insights_process_"), "{text}");
    }
}

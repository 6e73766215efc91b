//! The pipeline consumer's librdkafka context: rebalance bookkeeping
//! (assignment epochs, revocations that wait for an open transaction, the
//! rate-limit share lowered before this member rejoins), statistics to
//! metrics, and broker reachability for readiness.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::statistics::Statistics;
use rdkafka::ClientContext;

use crate::metrics::Metrics;
use crate::pipeline::ports::TransactionGate;
use crate::pipeline::record::{BatchOffsets, Epoch, TopicPartition};
use crate::pipeline::share::RateShare;

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
    pub(crate) leaders: Mutex<HashMap<TopicPartition, i32>>,
    /// Whether a transaction carrying consumed offsets is open.
    pub transaction: TransactionGate,
    /// Lowers this instance's share of the provider rate limits as soon as
    /// partitions are revoked (see [`PipelineContext::set_rate_share`]).
    rate_share: OnceLock<RateShare>,
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
            rate_share: OnceLock::new(),
        }
    }

    /// Has revocations lower the share at once, inside the rebalance
    /// callback: before this member rejoins, so before any other member is
    /// handed the partitions. The loop raises it again when it sees the new
    /// assignment, which can come within the same poll; lowered only there,
    /// the old and the new owner would hold a share of the same partitions
    /// at once and the shares could add up to more than the limit.
    pub fn set_rate_share(&self, share: RateShare) {
        if share.is_known() {
            let _ = self.rate_share.set(share);
        }
    }

    /// Records offsets committed in a transaction (next offset to read).
    pub fn record_committed(&self, offsets: impl IntoIterator<Item = (TopicPartition, i64)>) {
        let mut c = self.committed.lock().unwrap_or_else(|p| p.into_inner());
        c.extend(offsets);
    }

    pub(crate) fn with_assignment<R>(&self, f: impl FnOnce(&mut AssignmentState) -> R) -> R {
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
            }
        }
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
            if let Some(share) = self.rate_share.get() {
                share.hold(left);
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

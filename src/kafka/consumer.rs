//! The pipeline's consumer over librdkafka: the loop's [`LoopConsumer`]
//! port, reading the input and delay topics with the
//! [`PipelineContext`]'s rebalance bookkeeping.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

use anyhow::Context as _;

use crate::config::Settings;
use crate::core::tiers::DelayTiers;
use crate::kafka::context::PipelineContext;
use crate::kafka::settings::{consumer_config, static_member_id};
use crate::metrics::Metrics;
use crate::pipeline::ports::{GroupToken, LoopConsumer, Membership, Polled, TransactionGate};
use crate::pipeline::record::{BatchOffsets, Epoch, Incoming, SourceKind, TopicPartition};
use crate::pipeline::share::RateShare;

/// The pipeline's consumer over librdkafka.
pub struct KafkaConsumer {
    consumer: Arc<StreamConsumer<PipelineContext>>,
    topic_kinds: HashMap<String, SourceKind>,
}

impl KafkaConsumer {
    /// Creates the consumer (a static member when `kafka.static_membership`
    /// is on) and subscribes it to the input and every delay tier of
    /// `topic_kinds`.
    pub fn subscribe(
        settings: &Settings,
        metrics: &Arc<Metrics>,
        tiers: &DelayTiers,
        topic_kinds: HashMap<String, SourceKind>,
    ) -> anyhow::Result<KafkaConsumer> {
        let k = &settings.kafka;
        let ctx = PipelineContext::new(
            metrics.clone(),
            tiers
                .topics(&settings.topics.delay_prefix)
                .into_iter()
                .collect::<HashSet<_>>(),
            k.transaction_timeout,
        );
        let member_id = static_member_id(k)?;
        if let Some(id) = &member_id {
            tracing::info!(group_instance_id = %id, "static group membership");
        }
        let consumer: StreamConsumer<PipelineContext> = consumer_config(k, member_id.as_deref())
            .create_with_context(ctx)
            .context("kafka: cannot create consumer")?;
        let subscribe: Vec<&str> = topic_kinds.keys().map(String::as_str).collect();
        consumer
            .subscribe(&subscribe)
            .context("kafka: cannot subscribe")?;
        let consumer = Arc::new(consumer);
        crate::kafka::users_waiting::spawn(k, metrics.clone(), Arc::downgrade(&consumer));
        Ok(KafkaConsumer {
            consumer,
            topic_kinds,
        })
    }

    /// Has revocations lower this instance's rate-limit share at once
    /// ([`PipelineContext::set_rate_share`]).
    pub fn set_rate_share(&self, share: RateShare) {
        self.consumer.context().set_rate_share(share);
    }

    /// Leaves the group. Blocking (up to the session timeout): call it off
    /// the async runtime.
    pub fn leave(&self) {
        self.consumer.unsubscribe();
    }

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
            handle: Some(Arc::new(metadata)),
        })
    }

    fn still_owned(&self, offsets: &BatchOffsets) -> Result<(), TopicPartition> {
        self.consumer.context().still_owned(offsets)
    }

    fn transaction_gate(&self) -> &TransactionGate {
        &self.consumer.context().transaction
    }

    async fn committed(
        &self,
        partitions: &[TopicPartition],
    ) -> Result<HashMap<TopicPartition, i64>, String> {
        let tpl = Self::tpl(partitions);
        let consumer = self.consumer.clone();
        // A read_committed consumer asks for stable offsets (KIP-447): the
        // coordinator answers once no transaction's offsets are pending.
        let got = tokio::task::spawn_blocking(move || {
            consumer.committed_offsets(tpl, Duration::from_secs(30))
        })
        .await
        .map_err(|e| format!("committed offsets task failed: {e}"))?
        .map_err(|e| format!("committed offsets: {e}"))?;
        Ok(got
            .elements()
            .iter()
            .filter_map(|e| match e.offset() {
                Offset::Offset(n) => Some((TopicPartition::new(e.topic(), e.partition()), n)),
                _ => None,
            })
            .collect())
    }
}

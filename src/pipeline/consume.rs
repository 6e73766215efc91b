//! The consume loop: collect a batch, hold partitions whose head is not yet
//! due, process the batch concurrently, then produce everything and commit
//! the consumed offsets in one Kafka transaction. A crash anywhere before
//! the commit means the batch is processed again; after it, never again.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::pipeline::deadletter::{DeadLetterGuard, GuardTripped};
use crate::pipeline::health::Health;
use crate::pipeline::kafka::PipelineContext;
use crate::pipeline::worker::{
    classify_tier_record, now_ms, Incoming, Job, OutKind, OutRecord, Processed, SourceKind,
    TierDecision, Transient, Worker,
};
use crate::task::Millis;

type Tp = (String, i32);

#[derive(Debug, thiserror::Error)]
pub enum LoopError {
    #[error(transparent)]
    Guard(#[from] GuardTripped),
    #[error("kafka transaction failed fatally (fenced or invalid state): {0}")]
    Fatal(String),
    #[error("kafka transaction did not finish within {0:?}")]
    TransactionTimeout(Duration),
}

/// Settings of the loop itself.
#[derive(Debug, Clone)]
pub struct LoopSettings {
    pub max_batch: usize,
    pub batch_linger: Duration,
    pub max_in_flight: usize,
    pub transaction_timeout: Duration,
    /// How long in-flight work may continue after SIGTERM before it is
    /// abandoned (handed back uncommitted).
    pub drain_timeout: Duration,
}

pub struct ConsumeLoop {
    pub consumer: Arc<StreamConsumer<PipelineContext>>,
    pub producer: FutureProducer,
    pub worker: Arc<Worker>,
    pub settings: LoopSettings,
    pub topic_kinds: HashMap<String, SourceKind>,
    pub guard: DeadLetterGuard,
    pub health: Arc<Health>,
    pub metrics: Arc<Metrics>,
    /// Called with this instance's share (0..=1) of all consumed partitions
    /// whenever the assignment changes (provider rate limits follow it).
    pub on_share: Box<dyn Fn(f64) + Send + Sync>,
    pub total_partitions: usize,
    paused: HashMap<Tp, Millis>,
    generation_seen: u64,
}

/// One collected batch.
#[derive(Default)]
struct Batch {
    jobs: Vec<(Tp, Job)>,
    /// First and last offset taken per partition (a contiguous run).
    offsets: BTreeMap<Tp, (i64, i64)>,
}

impl Batch {
    fn take(&mut self, tp: &Tp, offset: i64) {
        self.offsets
            .entry(tp.clone())
            .and_modify(|e| e.1 = offset)
            .or_insert((offset, offset));
    }
    fn drop_partitions(&mut self, gone: &HashSet<Tp>) {
        self.jobs.retain(|(tp, _)| !gone.contains(tp));
        self.offsets.retain(|tp, _| !gone.contains(tp));
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

impl ConsumeLoop {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        consumer: Arc<StreamConsumer<PipelineContext>>,
        producer: FutureProducer,
        worker: Arc<Worker>,
        settings: LoopSettings,
        topic_kinds: HashMap<String, SourceKind>,
        guard: DeadLetterGuard,
        health: Arc<Health>,
        metrics: Arc<Metrics>,
        on_share: Box<dyn Fn(f64) + Send + Sync>,
        total_partitions: usize,
    ) -> ConsumeLoop {
        ConsumeLoop {
            consumer,
            producer,
            worker,
            settings,
            topic_kinds,
            guard,
            health,
            metrics,
            on_share,
            total_partitions,
            paused: HashMap::new(),
            generation_seen: 0,
        }
    }

    /// Runs until `shutdown`, then finishes (or hands back) the batch in
    /// hand. Returns an error only for what must stop the process.
    pub async fn run(&mut self, shutdown: CancellationToken) -> Result<(), LoopError> {
        while !shutdown.is_cancelled() {
            self.metrics.loop_iterations.inc();
            self.health.progress();
            self.resume_due_partitions();
            let mut batch = self.collect(&shutdown).await;
            self.after_poll(&mut batch);
            if batch.jobs.is_empty() {
                continue;
            }
            self.run_batch(batch, &shutdown).await?;
        }
        tracing::info!("consume loop stopped");
        Ok(())
    }

    /// Reacts to what the consumer context saw during the poll: revoked
    /// partitions leave the batch and the pause table; a changed assignment
    /// changes this instance's share of the provider rate limits.
    fn after_poll(&mut self, batch: &mut Batch) {
        let ctx = self.consumer.context();
        let revoked: HashSet<Tp> = ctx.take_revoked().into_iter().collect();
        if !revoked.is_empty() {
            batch.drop_partitions(&revoked);
            self.paused.retain(|tp, _| !revoked.contains(tp));
        }
        let (generation, assigned) = ctx.assigned();
        if generation != self.generation_seen {
            self.generation_seen = generation;
            let share = if self.total_partitions == 0 {
                1.0
            } else {
                (assigned.len() as f64 / self.total_partitions as f64).clamp(0.0, 1.0)
            };
            let inputs = assigned
                .iter()
                .filter(|(t, _)| self.topic_kinds.get(t) == Some(&SourceKind::Input))
                .count();
            self.metrics.assigned_partitions.set(inputs as i64);
            tracing::info!(assigned = assigned.len(), share, "assignment changed");
            (self.on_share)(share);
        }
        self.health.set_connection(
            ctx.joined.load(std::sync::atomic::Ordering::Relaxed),
            ctx.broker_up.load(std::sync::atomic::Ordering::Relaxed),
        );
    }

    fn resume_due_partitions(&mut self) {
        let now = now_ms();
        let due: Vec<Tp> = self
            .paused
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(tp, _)| tp.clone())
            .collect();
        if due.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for tp in &due {
            self.paused.remove(tp);
            tpl.add_partition(&tp.0, tp.1);
        }
        if let Err(e) = self.consumer.resume(&tpl) {
            // A partition revoked meanwhile cannot be resumed: benign.
            tracing::debug!(error = %e, "resume failed");
        }
    }

    /// How long the loop may block waiting for records before a paused
    /// partition is due again.
    fn idle_wait(&self) -> Duration {
        let base = Duration::from_millis(200);
        match self.paused.values().min() {
            Some(at) => {
                let ms = (*at - now_ms()).clamp(0, base.as_millis() as i64);
                Duration::from_millis(ms as u64)
            }
            None => base,
        }
    }

    async fn collect(&mut self, shutdown: &CancellationToken) -> Batch {
        let mut batch = Batch::default();
        let mut held: HashSet<Tp> = HashSet::new();
        let linger_end = Instant::now() + self.settings.batch_linger;
        while batch.jobs.len() < self.settings.max_batch {
            let wait = if batch.jobs.is_empty() {
                self.idle_wait()
            } else {
                linger_end.saturating_duration_since(Instant::now())
            };
            let received = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                r = tokio::time::timeout(wait, self.consumer.recv()) => r,
            };
            let msg = match received {
                Err(_elapsed) => break,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "consumer error");
                    break;
                }
                Ok(Ok(m)) => m,
            };
            let tp: Tp = (msg.topic().to_string(), msg.partition());
            if held.contains(&tp) || self.paused.contains_key(&tp) {
                // Fetched before the partition was paused; it will be read
                // again from the held offset.
                continue;
            }
            let Some(kind) = self.topic_kinds.get(&tp.0).copied() else {
                continue;
            };
            let rec = detach(&msg, kind);
            drop(msg);
            let offset = rec.offset;
            let job = match kind {
                SourceKind::Input => Job::Input(rec),
                SourceKind::Tier(tier) => {
                    match classify_tier_record(&self.worker.tiers, tier, rec, now_ms()) {
                        TierDecision::Job(job) => *job,
                        TierDecision::Hold { resume_at } => {
                            self.hold(&tp, offset, resume_at);
                            held.insert(tp);
                            continue;
                        }
                    }
                }
            };
            batch.take(&tp, offset);
            batch.jobs.push((tp, job));
        }
        batch
    }

    /// Pauses a partition and rewinds it to `offset`, to be resumed at
    /// `resume_at`.
    fn hold(&mut self, tp: &Tp, offset: i64, resume_at: Millis) {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&tp.0, tp.1);
        if let Err(e) = self.consumer.pause(&tpl) {
            tracing::debug!(error = %e, "pause failed");
        }
        if let Err(e) =
            self.consumer
                .seek(&tp.0, tp.1, Offset::Offset(offset), Duration::from_secs(5))
        {
            tracing::warn!(error = %e, topic = %tp.0, partition = tp.1, "seek failed");
        }
        self.paused.insert(tp.clone(), resume_at);
    }

    async fn run_batch(
        &mut self,
        batch: Batch,
        shutdown: &CancellationToken,
    ) -> Result<(), LoopError> {
        let Batch { jobs, offsets } = batch;
        let count = jobs.len();
        let worker = self.worker.clone();
        let health = self.health.clone();
        let processing = futures::stream::iter(jobs.into_iter().map(|(_, job)| {
            let worker = worker.clone();
            let health = health.clone();
            async move {
                let r = worker.process(job).await;
                health.progress();
                r
            }
        }))
        .buffered(self.settings.max_in_flight)
        .collect::<Vec<Result<Processed, Transient>>>();
        tokio::pin!(processing);
        let drain = self.settings.drain_timeout;
        let results = tokio::select! {
            r = &mut processing => r,
            _ = async { shutdown.cancelled().await; tokio::time::sleep(drain).await } => {
                tracing::warn!(records = count, "shutdown bound reached; handing the batch back uncommitted");
                self.rewind(&offsets);
                return Ok(());
            }
        };

        let mut processed = Vec::with_capacity(results.len());
        for r in results {
            match r {
                Ok(p) => processed.push(p),
                Err(e) => {
                    tracing::warn!(error = %e, "batch will be retried");
                    self.rewind(&offsets);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    return Ok(());
                }
            }
        }

        let snapshot = self.guard.snapshot();
        for p in &processed {
            let reason = p
                .dead_letters
                .iter()
                .chain(&p.failures)
                .map(|(_, r)| r.as_str())
                .next()
                .unwrap_or("");
            let dead = !p.dead_letters.is_empty() || !p.failures.is_empty();
            if let Err(tripped) = self.guard.observe(dead, reason) {
                self.guard.restore(snapshot);
                tracing::error!(error = %tripped, "dead-letter guard tripped; stopping without committing the batch");
                self.rewind(&offsets);
                return Err(tripped.into());
            }
        }

        match self.commit(&processed, &offsets).await {
            Ok(()) => {
                self.metrics
                    .transactions
                    .with_label_values(&["committed"])
                    .inc();
                self.metrics.batch_size.observe(count as f64);
                for p in &processed {
                    for o in &p.outputs {
                        match o.kind {
                            OutKind::Delay(_) => {}
                            OutKind::DeadLetter => {}
                            k => self.metrics.published.with_label_values(&[k.label()]).inc(),
                        }
                    }
                    for (stage, reason) in &p.dead_letters {
                        self.metrics
                            .dead_letters
                            .with_label_values(&[stage.as_str(), reason])
                            .inc();
                    }
                    if let Some(s) = p.combined_latency {
                        self.metrics.onboarding_to_combined.observe(s);
                    }
                }
                Ok(())
            }
            Err(CommitError::Abortable(e)) => {
                self.metrics
                    .transactions
                    .with_label_values(&["aborted"])
                    .inc();
                self.guard.restore(snapshot);
                tracing::warn!(error = %e, "transaction aborted; the batch will be processed again");
                self.abort().await?;
                self.rewind(&offsets);
                Ok(())
            }
            Err(CommitError::Fatal(e)) => Err(LoopError::Fatal(e)),
            Err(CommitError::Timeout(d)) => Err(LoopError::TransactionTimeout(d)),
        }
    }

    /// Seeks every partition of a batch back to its first record so the
    /// batch is read again.
    fn rewind(&mut self, offsets: &BTreeMap<Tp, (i64, i64)>) {
        for (tp, (first, _)) in offsets {
            if let Err(e) =
                self.consumer
                    .seek(&tp.0, tp.1, Offset::Offset(*first), Duration::from_secs(5))
            {
                tracing::warn!(error = %e, topic = %tp.0, partition = tp.1, "rewind failed");
            }
        }
    }

    async fn abort(&self) -> Result<(), LoopError> {
        let producer = self.producer.clone();
        let timeout = self.settings.transaction_timeout;
        match blocking(timeout, move || producer.abort_transaction(timeout)).await {
            Ok(()) => Ok(()),
            Err(CommitError::Timeout(d)) => Err(LoopError::TransactionTimeout(d)),
            Err(CommitError::Abortable(e)) | Err(CommitError::Fatal(e)) => {
                Err(LoopError::Fatal(format!("abort failed: {e}")))
            }
        }
    }

    async fn commit(
        &self,
        processed: &[Processed],
        offsets: &BTreeMap<Tp, (i64, i64)>,
    ) -> Result<(), CommitError> {
        let producer = self.producer.clone();
        blocking(self.settings.transaction_timeout, move || {
            producer.begin_transaction()
        })
        .await?;
        for p in processed {
            for o in &p.outputs {
                self.send(o).await?;
            }
        }
        let mut tpl = TopicPartitionList::new();
        for (tp, (_, last)) in offsets {
            tpl.add_partition_offset(&tp.0, tp.1, Offset::Offset(last + 1))
                .map_err(|e| CommitError::Fatal(e.to_string()))?;
        }
        let Some(cgm) = self.consumer.group_metadata() else {
            return Err(CommitError::Abortable("no consumer group metadata".into()));
        };
        let producer = self.producer.clone();
        let timeout = self.settings.transaction_timeout;
        blocking(timeout, move || {
            producer.send_offsets_to_transaction(&tpl, &cgm, timeout)
        })
        .await?;
        let producer = self.producer.clone();
        blocking(timeout, move || producer.commit_transaction(timeout)).await
    }

    async fn send(&self, o: &OutRecord) -> Result<(), CommitError> {
        let mut headers = OwnedHeaders::new_with_capacity(o.headers.len());
        for (k, v) in &o.headers {
            headers = headers.insert(Header {
                key: k,
                value: Some(v.as_slice()),
            });
        }
        loop {
            let mut record: FutureRecord<'_, [u8], [u8]> =
                FutureRecord::to(&o.topic).headers(headers.clone());
            if let Some(k) = &o.key {
                record = record.key(k.as_slice());
            }
            if let Some(v) = &o.value {
                record = record.payload(v.as_slice());
            }
            match self.producer.send_result(record) {
                // Delivery is confirmed by commit_transaction, which fails if
                // any record of the transaction failed.
                Ok(_delivery) => return Ok(()),
                Err((
                    KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull),
                    _,
                )) => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((e, _)) => {
                    return Err(CommitError::Abortable(format!(
                        "produce to {}: {e}",
                        o.topic
                    )))
                }
            }
        }
    }
}

#[derive(Debug)]
enum CommitError {
    Abortable(String),
    Fatal(String),
    Timeout(Duration),
}

/// Runs a blocking transactional call off the runtime, with our own
/// deadline (some librdkafka versions ignore the call's timeout), and
/// classifies its error.
async fn blocking<F>(timeout: Duration, f: F) -> Result<(), CommitError>
where
    F: FnOnce() -> Result<(), KafkaError> + Send + 'static,
{
    let guard = timeout + Duration::from_secs(5);
    match tokio::time::timeout(guard, tokio::task::spawn_blocking(f)).await {
        Err(_) => Err(CommitError::Timeout(guard)),
        Ok(Err(join)) => Err(CommitError::Fatal(format!(
            "transaction task failed: {join}"
        ))),
        Ok(Ok(Ok(()))) => Ok(()),
        Ok(Ok(Err(e))) => Err(classify(e)),
    }
}

fn classify(e: KafkaError) -> CommitError {
    if let KafkaError::Transaction(rd) = &e {
        if rd.is_fatal() {
            return CommitError::Fatal(e.to_string());
        }
        if rd.txn_requires_abort() || rd.is_retriable() {
            return CommitError::Abortable(e.to_string());
        }
    }
    match e.rdkafka_error_code() {
        Some(rdkafka::types::RDKafkaErrorCode::Fenced)
        | Some(rdkafka::types::RDKafkaErrorCode::ProducerFenced)
        | Some(rdkafka::types::RDKafkaErrorCode::InvalidTransactionalState)
        | Some(rdkafka::types::RDKafkaErrorCode::InvalidProducerEpoch) => {
            CommitError::Fatal(e.to_string())
        }
        _ => CommitError::Abortable(e.to_string()),
    }
}

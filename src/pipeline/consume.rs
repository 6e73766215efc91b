//! The consume loop: collect a batch, hold partitions whose head is not yet
//! due, process the batch concurrently, then produce everything and commit
//! the consumed offsets in one Kafka transaction. A crash anywhere before
//! the commit means the batch is processed again; after it, never again.
//!
//! Two overlaps keep the loop from waiting in series. Each record's work
//! (its provider calls) starts as soon as the record is collected, so the
//! linger that fills a batch overlaps its HTTP calls; and a batch's
//! transaction runs while the next batch is collected and processed. A
//! batch is committed only after the one before it committed; when one is
//! aborted, the batch read after it is handed back too, and both are read
//! again. Results are taken in the order records were read, nothing is
//! produced outside a transaction, and a revocation waits for the open
//! transaction (see `TransactionGate`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::FutureProducer;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::pipeline::deadletter::{DeadLetterGuard, GuardSnapshot, GuardTripped};
use crate::pipeline::health::Health;
use crate::pipeline::kafka::PipelineContext;
use crate::pipeline::transaction::{abort, commit, CommitError};
use crate::pipeline::worker::{
    classify_tier_record, now_ms, Incoming, Job, OutKind, Processed, SourceKind, TierDecision,
    Transient, Worker,
};
use crate::task::Millis;

type Tp = (String, i32);
/// First and last offset taken per partition (a contiguous run).
pub(crate) type Offsets = BTreeMap<Tp, (i64, i64)>;

#[derive(Debug, thiserror::Error)]
pub enum LoopError {
    #[error(transparent)]
    Guard(#[from] GuardTripped),
    #[error("kafka transaction failed fatally (fenced or invalid state): {0}")]
    Fatal(String),
    #[error("kafka transaction did not finish within {0:?}")]
    TransactionTimeout(Duration),
    #[error("processing a record panicked: {0}")]
    WorkerPanicked(String),
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
    /// Bounds the records being processed at once (`max_in_flight`).
    in_flight: Arc<Semaphore>,
}

type Running = JoinHandle<Result<Processed, Transient>>;

/// One collected batch: its records already being processed, in the order
/// they were read.
#[derive(Default)]
struct Batch {
    jobs: Vec<(Tp, Running)>,
    offsets: Offsets,
}

impl Batch {
    fn take(&mut self, tp: &Tp, offset: i64) {
        self.offsets
            .entry(tp.clone())
            .and_modify(|e| e.1 = offset)
            .or_insert((offset, offset));
    }
    /// Forgets revoked partitions: their records' work is cancelled (the
    /// new owner reads them again from the committed offset).
    fn drop_partitions(&mut self, gone: &HashSet<Tp>) {
        self.jobs.retain(|(tp, running)| {
            let keep = !gone.contains(tp);
            if !keep {
                running.abort();
            }
            keep
        });
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
        let in_flight = Arc::new(Semaphore::new(settings.max_in_flight.max(1)));
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
            in_flight,
        }
    }

    /// Runs until `shutdown`, then finishes (or hands back) the batch in
    /// hand. Returns an error only for what must stop the process.
    pub async fn run(&mut self, shutdown: CancellationToken) -> Result<(), LoopError> {
        let mut committing: Option<Committing> = None;
        while !shutdown.is_cancelled() {
            self.metrics.loop_iterations.inc();
            self.health.progress();
            self.resume_due_partitions();
            let mut batch = self.collect(&shutdown).await;
            self.after_poll(&mut batch);
            if batch.jobs.is_empty() {
                if committing.as_ref().is_some_and(|c| c.is_finished()) {
                    if let Some(c) = committing.take() {
                        self.finish_commit(c).await?;
                    }
                }
                continue;
            }
            let prepared = match self.prepare(batch, &shutdown).await {
                Ok(p) => p,
                Err(e) => {
                    if let Some(c) = committing.take() {
                        let _ = self.finish_commit(c).await;
                    }
                    return Err(e);
                }
            };
            if let Some(c) = committing.take() {
                if let Some(aborted) = self.finish_commit(c).await? {
                    // Read after the aborted batch: hand it back too.
                    if let Some(p) = prepared {
                        self.rewind_except(&p.offsets, &aborted);
                    }
                    continue;
                }
            }
            if let Some(p) = prepared {
                committing = Some(self.start_commit(p));
            }
        }
        if let Some(c) = committing.take() {
            self.finish_commit(c).await?;
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
            batch.jobs.push((tp, self.start(job)));
        }
        batch
    }

    /// Starts a record's work on the runtime, at most `max_in_flight` at a
    /// time.
    fn start(&self, job: Job) -> Running {
        let worker = self.worker.clone();
        let health = self.health.clone();
        let in_flight = self.in_flight.clone();
        tokio::spawn(async move {
            // The semaphore is never closed, so acquiring only waits.
            let _permit = in_flight.acquire_owned().await;
            let r = worker.process(job).await;
            health.progress();
            r
        })
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

    /// Waits for a batch's records, then checks the dead-letter guard.
    /// Returns what to commit, or `None` when the batch was handed back
    /// (shutdown bound reached, or a transient failure: it will be read
    /// again).
    async fn prepare(
        &mut self,
        batch: Batch,
        shutdown: &CancellationToken,
    ) -> Result<Option<Prepared>, LoopError> {
        let count = batch.jobs.len();
        let aborts: Vec<_> = batch.jobs.iter().map(|(_, r)| r.abort_handle()).collect();
        let Batch { jobs, offsets } = batch;
        let processing = async move {
            let mut results = Vec::with_capacity(jobs.len());
            for (_, running) in jobs {
                results.push(running.await);
            }
            results
        };
        tokio::pin!(processing);
        let drain = self.settings.drain_timeout;
        let joined = tokio::select! {
            r = &mut processing => r,
            _ = async { shutdown.cancelled().await; tokio::time::sleep(drain).await } => {
                tracing::warn!(records = count, "shutdown bound reached; handing the batch back uncommitted");
                for a in &aborts {
                    a.abort();
                }
                self.rewind(&offsets);
                return Ok(None);
            }
        };
        let mut processed = Vec::with_capacity(joined.len());
        for j in joined {
            match j {
                Ok(Ok(p)) => processed.push(p),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "batch will be retried");
                    self.rewind(&offsets);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    return Ok(None);
                }
                Err(e) => {
                    for a in &aborts {
                        a.abort();
                    }
                    self.rewind(&offsets);
                    return Err(LoopError::WorkerPanicked(e.to_string()));
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
        Ok(Some(Prepared {
            processed,
            offsets,
            snapshot,
        }))
    }

    /// Starts the transaction of a prepared batch; an abortable failure is
    /// aborted there too, so the gate closes without the loop's help.
    fn start_commit(&self, prepared: Prepared) -> Committing {
        let producer = self.producer.clone();
        let consumer = self.consumer.clone();
        let timeout = self.settings.transaction_timeout;
        tokio::spawn(async move {
            let open = consumer.context().transaction.open();
            let mut result = commit(
                &producer,
                &consumer,
                &prepared.processed,
                &prepared.offsets,
                timeout,
            )
            .await;
            if let Err(CommitError::Abortable(reason)) = &result {
                result = match abort(&producer, timeout).await {
                    Ok(()) => Err(CommitError::Abortable(reason.clone())),
                    Err(e) => Err(e),
                };
            }
            drop(open);
            (prepared, result)
        })
    }

    /// Waits for a batch's transaction. Returns the offsets of the batch
    /// when it was aborted (and rewound), `None` when it committed.
    async fn finish_commit(
        &mut self,
        committing: Committing,
    ) -> Result<Option<Offsets>, LoopError> {
        let (prepared, result) = committing
            .await
            .map_err(|e| LoopError::Fatal(format!("transaction task failed: {e}")))?;
        let Prepared {
            processed,
            offsets,
            snapshot,
        } = prepared;
        match result {
            Ok(()) => {
                self.consumer
                    .context()
                    .record_committed(offsets.iter().map(|(tp, (_, last))| (tp.clone(), last + 1)));
                self.metrics
                    .transactions
                    .with_label_values(&["committed"])
                    .inc();
                self.metrics.batch_size.observe(processed.len() as f64);
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
                Ok(None)
            }
            Err(CommitError::Abortable(e)) => {
                self.metrics
                    .transactions
                    .with_label_values(&["aborted"])
                    .inc();
                // Also undoes what the batch read after it observed: that
                // batch is handed back as well.
                self.guard.restore(snapshot);
                tracing::warn!(error = %e, "transaction aborted; the batch will be processed again");
                self.rewind(&offsets);
                Ok(Some(offsets))
            }
            Err(CommitError::Fatal(e)) => Err(LoopError::Fatal(e)),
            Err(CommitError::Timeout(d)) => Err(LoopError::TransactionTimeout(d)),
        }
    }

    /// Seeks every partition of a batch back to its first record so the
    /// batch is read again.
    fn rewind(&mut self, offsets: &Offsets) {
        for (tp, (first, _)) in offsets {
            if let Err(e) =
                self.consumer
                    .seek(&tp.0, tp.1, Offset::Offset(*first), Duration::from_secs(5))
            {
                tracing::warn!(error = %e, topic = %tp.0, partition = tp.1, "rewind failed");
            }
        }
    }

    /// Rewinds the partitions of `offsets` that are not in `skip` (those
    /// were rewound further back already).
    fn rewind_except(&mut self, offsets: &Offsets, skip: &Offsets) {
        let rest: Offsets = offsets
            .iter()
            .filter(|(tp, _)| !skip.contains_key(*tp))
            .map(|(tp, o)| (tp.clone(), *o))
            .collect();
        self.rewind(&rest);
    }
}

/// A batch whose records are processed and which waits for its
/// transaction.
struct Prepared {
    processed: Vec<Processed>,
    offsets: Offsets,
    snapshot: GuardSnapshot,
}

type Committing = JoinHandle<(Prepared, Result<(), CommitError>)>;

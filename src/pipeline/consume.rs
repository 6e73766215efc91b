//! The consume loop: read records, start each one's work at once, cut the
//! records into batches, and commit each batch (its outputs and consumed
//! offsets) in one Kafka transaction, strictly in the order the batches
//! were read. A crash anywhere before a commit means the batch is processed
//! again; after it, never again.
//!
//! The loop never waits on anything but the consumer: it polls at least
//! every 200 ms whatever the providers do, so the group's
//! `max.poll.interval` cannot run out because of slow providers or rate
//! limits. Back-pressure is pausing, not blocking: when the records read
//! but not yet committed reach what the provider rate limits serve within
//! half of `schedule.record_budget` (or `schedule.max_in_flight`, or
//! `schedule.max_in_flight_bytes` of consumed records), every partition is
//! paused until they drain, and polling goes on.
//!
//! Since batches commit in read order, a record still waiting on a slow
//! provider would hold every record read after it. A record that has
//! waited on a provider past its leash (`schedule.straggler_wait`, or four
//! times what answers take now) is cut short: its call is parked, still
//! running, and the user's next poll, through a delay tier like any
//! repoll, takes its answer (`pipeline::parked`).
//!
//! Exactly once rests on four rules:
//! - batches commit one at a time, in read order; when one is aborted,
//!   every batch read after it is dropped too and all of them are read
//!   again from the aborted batch's first offsets;
//! - a revoked partition's records leave every batch not yet committing;
//!   the transaction in flight holds the revocation (`TransactionGate`);
//! - a batch commits only while the consumer is a group member and every
//!   partition is still assigned under the epoch the batch read it with
//!   (`TxnProducer::commit`), so a batch read before a lost assignment can
//!   never commit over the records' next reader;
//! - offsets are rewound (after an abort) only in the epoch they were read
//!   in, so a rewind can never move a partition's new owner backwards.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::pipeline::batch::{Batch, RunningGuard, Work};
use crate::pipeline::gate::StartGate;
use crate::pipeline::guard::{DeadLetterGuard, GuardTripped};
use crate::pipeline::health::Health;
use crate::pipeline::ports::{LoopConsumer, Polled, TxnProducer};
use crate::pipeline::record::{record_size, Epoch, Job, SourceKind, TopicPartition};
use crate::pipeline::share::RateShare;
use crate::pipeline::waiting::{Entry, Waiting, WAIT_AHEAD_MS};
use crate::pipeline::worker::{classify_tier_record, now_ms, TierDecision, Worker};
use crate::task::Millis;

mod commit;

use commit::{commit_end, CommitEnd, Committing};

#[derive(Debug, thiserror::Error)]
pub enum LoopError {
    #[error(transparent)]
    Guard(#[from] GuardTripped),
    #[error("kafka transaction failed fatally (fenced or invalid state): {0}")]
    Fatal(String),
    #[error("processing a record panicked: {0}")]
    WorkerPanicked(String),
    #[error("the kafka consumer failed fatally and cannot go on (a restart joins the group afresh): {0}")]
    ConsumerFatal(String),
}

/// Settings of the loop itself.
#[derive(Debug, Clone)]
pub struct LoopSettings {
    pub max_batch: usize,
    pub batch_linger: Duration,
    /// Records processed at once, and the most read but not yet committed.
    pub max_in_flight: usize,
    /// The most bytes of consumed records read but not yet handed to a
    /// transaction (`schedule.max_in_flight_bytes`).
    pub max_in_flight_bytes: usize,
    /// How long one record's provider calls may take (`schedule.record_budget`).
    pub record_budget: Duration,
    /// How long in-flight work may continue after SIGTERM before it is
    /// abandoned (handed back uncommitted).
    pub drain_timeout: Duration,
}

impl From<&crate::config::Settings> for LoopSettings {
    /// The loop's settings from `schedule` and `shutdown`: the drain gets
    /// 60 % of `shutdown.timeout` (closing the Kafka clients gets 30 %).
    fn from(s: &crate::config::Settings) -> LoopSettings {
        LoopSettings {
            max_batch: s.schedule.max_batch,
            batch_linger: s.schedule.batch_linger,
            max_in_flight: s.schedule.max_in_flight,
            max_in_flight_bytes: s.schedule.max_in_flight_bytes,
            record_budget: s.schedule.record_budget,
            drain_timeout: s.shutdown.timeout.mul_f64(0.6),
        }
    }
}

/// How many of the last records' waits for an answer the straggler cut
/// measures what answers take now by.
const RECENT_ANSWERS: usize = 256;

/// The longest the loop waits in one poll.
const POLL_WAIT: Duration = Duration::from_millis(200);
/// How long the loop reads nothing after a transient failure (the schema
/// registry is down) before the batch is read again.
const TRANSIENT_COOLDOWN: Duration = Duration::from_secs(1);

/// How often the loop cuts stragglers and reports liveness.
const HOUSEKEEPING: Duration = Duration::from_millis(100);

/// How long past the drain bound a transaction in flight is still waited
/// for (a commit takes milliseconds when the brokers are up).
const COMMIT_GRACE: Duration = Duration::from_secs(1);

/// How often the loop's state is logged (at debug level).
const STATE_LOG_EVERY: Duration = Duration::from_secs(5);

/// How soon a tier partition is read again, at the earliest, after it was
/// paused because what waits in memory reached its bound.
const FULL_RETRY_MS: Millis = 50;

/// How many batches' worth of records may be read and not yet committed.
const READ_AHEAD_BATCHES: usize = 6;

/// What a record is assumed to output, for the read-ahead, before any
/// record has finished (the start gate assumes more: `pipeline::gate`).
const READ_AHEAD_PRIOR: f64 = 65_536.0;

/// The most batches one transaction takes (finished ones waiting behind
/// the transaction before it).
const MERGED_BATCHES: usize = 4;

/// The parts the loop is built from (see `ConsumeLoop::new`).
pub struct LoopParts {
    pub consumer: Arc<dyn LoopConsumer>,
    pub producer: Arc<dyn TxnProducer>,
    pub worker: Arc<Worker>,
    pub settings: LoopSettings,
    pub topic_kinds: HashMap<String, SourceKind>,
    pub guard: DeadLetterGuard,
    pub health: Arc<Health>,
    pub metrics: Arc<Metrics>,
    /// This instance's share of the provider rate limits, applied
    /// whenever the assignment changes (the limits follow the partitions
    /// held).
    pub share: RateShare,
    /// Records per second the provider rate limits serve now (the lower of
    /// the two), for admission.
    pub admission_rate: Box<dyn Fn() -> f64 + Send + Sync>,
}

pub struct ConsumeLoop {
    parts: LoopParts,
    assigned: HashMap<TopicPartition, Epoch>,
    generation_seen: u64,
    /// Partitions paused because their head record is not due yet, until
    /// when.
    held: HashMap<TopicPartition, Millis>,
    /// Tier records read shortly before they are due, in read order.
    waiting: Waiting<Work>,
    /// Partitions paused for back-pressure.
    throttled: HashSet<TopicPartition>,
    collecting: Batch,
    queued: VecDeque<Batch>,
    /// The waits for an answer of the records committed last (at most
    /// [`RECENT_ANSWERS`]): what answers take now, for the straggler cut.
    recent_answers: VecDeque<Duration>,
    committing: Option<Committing>,
    in_flight: Arc<Semaphore>,
    /// Records whose work has not ended (started, not finished).
    running: Arc<AtomicUsize>,
    /// Woken whenever a record's work ends.
    job_done: Arc<Notify>,
    /// The byte budget at a record's start; it also counts the outputs of
    /// records done and not yet handed to the producer
    /// (`Processed::held`).
    gate: Arc<StartGate>,
    cooldown_until: Option<Instant>,
    /// When the straggler cut and the liveness report last ran: they look
    /// at every record and partition, so they run at most every
    /// [`HOUSEKEEPING`], not on every record's completion.
    housekeeping_at: Option<Instant>,
    state_logged_at: Option<Instant>,
}

impl ConsumeLoop {
    pub fn new(parts: LoopParts) -> ConsumeLoop {
        let in_flight = Arc::new(Semaphore::new(parts.settings.max_in_flight.max(1)));
        let gate = StartGate::new(parts.settings.max_in_flight_bytes);
        gate.count_large_answers(parts.metrics.large_answers.clone());
        ConsumeLoop {
            parts,
            assigned: HashMap::new(),
            generation_seen: 0,
            held: HashMap::new(),
            waiting: Waiting::default(),
            throttled: HashSet::new(),
            collecting: Batch::default(),
            queued: VecDeque::new(),
            recent_answers: VecDeque::with_capacity(RECENT_ANSWERS),
            committing: None,
            in_flight,
            running: Arc::new(AtomicUsize::new(0)),
            job_done: Arc::new(Notify::new()),
            gate,
            cooldown_until: None,
            housekeeping_at: None,
            state_logged_at: None,
        }
    }

    /// Runs until `shutdown`, then commits what is done within the drain
    /// bound and hands the rest back. Returns an error only for what must
    /// stop the process.
    pub async fn run(&mut self, shutdown: CancellationToken) -> Result<(), LoopError> {
        // No share of the provider limits before partitions are assigned.
        if self.parts.share.is_known() {
            self.parts.share.hold(0);
        }
        let result = self.work(&shutdown).await;
        let drained = self.drain(result.is_ok()).await;
        tracing::info!("consume loop stopped");
        result.and(drained)
    }

    async fn work(&mut self, shutdown: &CancellationToken) -> Result<(), LoopError> {
        while !shutdown.is_cancelled() {
            self.parts.metrics.loop_iterations.inc();
            self.sync_assignment();
            self.resume_due_partitions();
            self.start_waiting();
            self.cut_batch(false);
            let housekeeping = self
                .housekeeping_at
                .is_none_or(|at| at.elapsed() >= HOUSEKEEPING);
            if housekeeping {
                self.housekeeping_at = Some(Instant::now());
                self.cut_stragglers();
            }
            self.start_next_commit().await?;
            self.apply_backpressure();
            if housekeeping {
                self.report_liveness();
                if self
                    .state_logged_at
                    .is_none_or(|at| at.elapsed() >= STATE_LOG_EVERY)
                {
                    self.state_logged_at = Some(Instant::now());
                    self.log_state();
                }
            }
            let wait = self.poll_wait();
            match self.next_event(wait, shutdown.cancelled()).await {
                Event::Stop | Event::Nothing => {}
                Event::Committed(r) => self.finish_commit(r)?,
                Event::Polled(Polled::Fatal(e)) => return Err(LoopError::ConsumerFatal(e)),
                Event::Polled(polled) => self.on_polled(polled),
            }
        }
        Ok(())
    }

    /// After SIGTERM (or a fatal error, `keep_going` false): nothing more
    /// is read; batches whose work ends within the drain bound commit, the
    /// rest is handed back uncommitted for the next owner.
    async fn drain(&mut self, keep_going: bool) -> Result<(), LoopError> {
        self.cut_batch(true);
        let all: Vec<TopicPartition> = self.assigned.keys().cloned().collect();
        self.parts.consumer.pause(&all);
        let deadline = Instant::now() + self.parts.settings.drain_timeout;
        let mut result = Ok(());
        while keep_going && result.is_ok() && (!self.queued.is_empty() || self.committing.is_some())
        {
            self.sync_assignment();
            if let Err(e) = self.start_next_commit().await {
                result = Err(e);
                break;
            }
            // Polling keeps the group membership alive; records that still
            // arrive lie after every batch and are left for the next owner.
            match self
                .next_event(POLL_WAIT, tokio::time::sleep_until(deadline))
                .await
            {
                Event::Stop => {
                    let left: usize = self.queued.iter().map(Batch::len).sum();
                    tracing::warn!(
                        records = left,
                        "shutdown bound reached; handing the rest back uncommitted"
                    );
                    break;
                }
                Event::Committed(r) => {
                    if let Err(e) = self.finish_commit(r) {
                        result = Err(e);
                    }
                }
                Event::Polled(Polled::Fatal(e)) => {
                    result = Err(LoopError::ConsumerFatal(e));
                    break;
                }
                Event::Nothing | Event::Polled(_) => {}
            }
        }
        for b in self.queued.drain(..) {
            b.cancel();
        }
        if let Some(c) = self.committing.take() {
            // A transaction in flight ends either way, but during a broker
            // outage not soon: it is waited for within the drain bound only.
            // Left open, it is aborted by the next process with the same
            // transactional.id (or by the coordinator's timeout), and its
            // batch is read again.
            match tokio::time::timeout_at(deadline + COMMIT_GRACE, c).await {
                Ok(Ok(r)) => {
                    if let Err(e) = self.finish_commit(Ok(r)) {
                        result = result.and(Err(e));
                    }
                }
                Ok(Err(_)) => {}
                Err(_) => tracing::warn!(
                    "the transaction in flight did not end within the shutdown bound; left to be aborted"
                ),
            }
        }
        result
    }

    /// Reacts to what the consumer saw during the last poll: revoked
    /// partitions leave the batches and the pause tables; a changed
    /// assignment changes this instance's share of the provider rate limits.
    fn sync_assignment(&mut self) {
        let revoked: HashSet<TopicPartition> =
            self.parts.consumer.take_revoked().into_iter().collect();
        if !revoked.is_empty() {
            self.collecting.drop_partitions(&revoked);
            for b in &mut self.queued {
                b.drop_partitions(&revoked);
            }
            self.queued.retain(|b| !b.jobs.is_empty());
            self.held.retain(|tp, _| !revoked.contains(tp));
            self.throttled.retain(|tp| !revoked.contains(tp));
            self.waiting
                .retain(|tp, _| !revoked.contains(tp), |w| w.running.abort());
        }
        if self.parts.consumer.assignment_changes() != self.generation_seen {
            let (generation, assigned) = self.parts.consumer.assignment();
            self.generation_seen = generation;
            self.assigned = assigned;
            let share = self.parts.share.hold(self.assigned.len());
            let inputs = self
                .assigned
                .keys()
                .filter(|tp| self.parts.topic_kinds.get(&tp.topic) == Some(&SourceKind::Input))
                .count();
            self.parts.metrics.assigned_partitions.set(inputs as i64);
            tracing::info!(assigned = self.assigned.len(), share, "assignment changed");
            // Partitions assigned anew arrive resumed; the pause tables
            // only hold partitions still assigned.
            self.held.retain(|tp, _| self.assigned.contains_key(tp));
            self.throttled.retain(|tp| self.assigned.contains_key(tp));
            // Records read under an earlier assignment of a partition are
            // read again from its committed offset.
            let assigned = &self.assigned;
            self.waiting.retain(
                |tp, epoch| assigned.get(tp) == Some(&epoch),
                |w| w.running.abort(),
            );
        }
        let (joined, broker_up) = self.parts.consumer.connection();
        self.parts.health.set_connection(joined, broker_up);
    }

    fn resume_due_partitions(&mut self) {
        let now = now_ms();
        let due: Vec<TopicPartition> = self
            .held
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(tp, _)| tp.clone())
            .collect();
        if due.is_empty() {
            return;
        }
        for tp in &due {
            self.held.remove(tp);
        }
        // A partition held back for pressure stays paused until it ends.
        let resume: Vec<TopicPartition> = due
            .into_iter()
            .filter(|tp| !self.throttled.contains(tp))
            .collect();
        self.parts.consumer.resume(&resume);
    }

    /// How many records may be running at once: what the rate limits
    /// serve in half the record budget, within the records read ahead of
    /// a commit. Not `max_in_flight`: that bounds the provider calls in
    /// flight (records beyond it wait for a permit, cheaply), and pausing
    /// the partitions at it left a fast run waiting on fetches.
    fn admission_limit(&self) -> usize {
        let rate = (self.parts.admission_rate)();
        let by_rate = if rate.is_finite() {
            (rate * self.parts.settings.record_budget.as_secs_f64() / 2.0).floor() as usize
        } else {
            usize::MAX
        };
        by_rate.clamp(1, self.max_outstanding())
    }

    fn outstanding(&self) -> usize {
        self.collecting.len() + self.queued.iter().map(Batch::len).sum::<usize>()
    }

    /// Bytes of the records counted by `outstanding`, and of the outputs
    /// of those done (until they are handed to the producer).
    fn outstanding_bytes(&self) -> usize {
        self.collecting.bytes
            + self.queued.iter().map(|b| b.bytes).sum::<usize>()
            + self.gate.held()
    }

    /// The most records read and not yet committed, finished or not: a
    /// slow record holds the batches behind it (they commit in order), so
    /// their finished records wait in memory (their outputs count against
    /// the byte budget). [`READ_AHEAD_BATCHES`] batches: a straggler is cut
    /// within its leash, and reading on meanwhile keeps the records behind
    /// it flowing (with two, a brown-out of 5 % hanging users cost the
    /// others one leash per two batches of backlog); and a backlog keeps
    /// the providers busy while a transaction of up to
    /// [`MERGED_BATCHES`] batches commits.
    ///
    /// Fewer when records output more: as many as `max_in_flight_bytes`
    /// holds at what records output lately (at least one). Pausing at the
    /// byte budget alone came too late: every record read before it was
    /// started, and with answers of a megabyte a read-ahead of 2,400
    /// records held gigabytes of outputs.
    fn max_outstanding(&self) -> usize {
        let by_count = self.parts.settings.max_batch.max(1) * READ_AHEAD_BATCHES;
        let budget = self.parts.settings.max_in_flight_bytes.max(1) as f64;
        let mean = self.gate.mean_output_or(READ_AHEAD_PRIOR).max(1.0);
        let by_bytes = (budget / mean).floor() as usize;
        by_count.min(by_bytes.max(1))
    }

    /// Pauses every partition when as many records are being worked on as
    /// the rate limits admit, when too many finished ones (or too many
    /// bytes of records) wait for an earlier batch, or during a cool-down;
    /// resumes them once half of it is done. Only records still running count against the rate: one
    /// that hangs until its budget runs out does not stop the others from
    /// being read and answered meanwhile.
    fn apply_backpressure(&mut self) {
        let limit = self.admission_limit();
        let running = self.running.load(Ordering::Relaxed);
        let outstanding = self.outstanding();
        let max_outstanding = self.max_outstanding();
        let bytes = self.outstanding_bytes();
        let max_bytes = self.parts.settings.max_in_flight_bytes.max(1);
        let cooling = self.cooldown_until.is_some_and(|t| Instant::now() < t);
        if running >= limit || outstanding >= max_outstanding || bytes >= max_bytes || cooling {
            let pause: Vec<TopicPartition> = self
                .assigned
                .keys()
                .filter(|tp| !self.throttled.contains(*tp) && !self.held.contains_key(*tp))
                .cloned()
                .collect();
            if !pause.is_empty() {
                tracing::debug!(
                    running,
                    outstanding,
                    bytes,
                    limit,
                    "pausing for back-pressure"
                );
                self.parts.consumer.pause(&pause);
                self.throttled.extend(pause);
            }
        } else if !self.throttled.is_empty()
            && running <= limit / 2
            && outstanding <= max_outstanding / 2
            && bytes <= max_bytes / 2
        {
            self.cooldown_until = None;
            let resume: Vec<TopicPartition> = self
                .throttled
                .drain()
                .filter(|tp| !self.held.contains_key(tp))
                .collect();
            self.parts.consumer.resume(&resume);
        }
    }

    /// What the loop holds, for a debug log every few seconds.
    fn log_state(&self) {
        tracing::debug!(
            assigned = self.assigned.len(),
            held = self.held.len(),
            throttled = self.throttled.len(),
            running = self.running.load(Ordering::Relaxed),
            outstanding = self.outstanding(),
            queued = self.queued.len(),
            committing = self.committing.is_some(),
            limit = self.admission_limit(),
            "loop state"
        );
    }

    /// Liveness follows commits. With nothing read and not committed the
    /// loop is idle, which is progress unless a partition it is free to read
    /// has records waiting: a consumer that reads nothing then is stuck.
    fn report_liveness(&self) {
        // With every broker down nothing can commit, and a restart would not
        // help: readiness reports it, liveness waits for the brokers.
        if !self.parts.consumer.connection().1 {
            self.parts.health.progress();
            return;
        }
        // An answer's body arriving is progress: it is cut when it stalls
        // (<provider>.body_stall_timeout), not held to server.stall_timeout.
        if std::iter::once(&self.collecting)
            .chain(self.queued.iter())
            .any(Batch::receiving_body)
        {
            self.parts.health.progress();
            return;
        }
        if self.outstanding() > 0 || self.committing.is_some() {
            return;
        }
        let backlog: i64 = self
            .parts
            .consumer
            .lag()
            .into_iter()
            .filter(|(tp, _)| !self.held.contains_key(tp) && !self.throttled.contains(tp))
            // A transaction's commit marker trails the last record of
            // every partition written transactionally.
            .map(|(_, lag)| (lag - 1).max(0))
            .sum();
        if backlog == 0 {
            self.parts.health.progress();
        }
    }

    /// How long the next poll may wait: until the batch being collected
    /// is due to be cut, or a held partition is due again.
    fn poll_wait(&self) -> Duration {
        let mut wait = POLL_WAIT;
        if let Some(started) = self.collecting.started {
            let end = started + self.parts.settings.batch_linger;
            wait = wait.min(end.saturating_duration_since(Instant::now()));
        }
        let next = self
            .held
            .values()
            .copied()
            .chain(self.waiting.next_at())
            .min();
        if let Some(at) = next {
            let ms = at
                .saturating_sub(now_ms())
                .clamp(0, POLL_WAIT.as_millis() as i64);
            wait = wait.min(Duration::from_millis(ms as u64));
        }
        wait
    }

    fn on_polled(&mut self, polled: Polled) {
        // The poll that returned this may also have revoked and assigned
        // partitions (one librdkafka poll serves rebalance events before it
        // returns a record): learn of that first, so a record of a new
        // assignment is never handled as one of the old (taken under a
        // stale epoch, or dropped as held, and then skipped for good).
        self.sync_assignment();
        let rec = match polled {
            Polled::Idle => return,
            Polled::Error(e) | Polled::Fatal(e) => {
                tracing::warn!(error = %e, "consumer error");
                return;
            }
            Polled::Record(rec) => rec,
        };
        let tp = TopicPartition::new(rec.topic.as_str(), rec.partition);
        if self.held.contains_key(&tp) {
            // Fetched before the partition was paused; it is read again
            // from the held offset.
            return;
        }
        let Some(epoch) = self.assigned.get(&tp).copied() else {
            // Not ours (any more): never take it, and never let a later
            // record of it commit past it.
            self.parts.consumer.seek(&tp, rec.offset);
            return;
        };
        let offset = rec.offset;
        let bytes = record_bytes(&rec);
        let job = match rec.kind {
            SourceKind::Input => Job::Input(rec),
            SourceKind::Tier(tier) => {
                match classify_tier_record(&self.parts.worker.tiers, tier, rec, now_ms()) {
                    TierDecision::Job(job) if self.waiting.has(&tp) => {
                        // Due behind records that are not: it starts now
                        // and joins a batch behind them.
                        let running = self.start(*job, offset, bytes);
                        self.waiting
                            .push(&tp, epoch, offset, bytes, Entry::Started(running));
                        return;
                    }
                    TierDecision::Job(job) => *job,
                    TierDecision::Hold { rec, resume_at } => {
                        let entry = Entry::Waiting {
                            rec,
                            tier,
                            at: resume_at,
                        };
                        self.wait_or_hold(&tp, epoch, offset, bytes, entry, resume_at);
                        return;
                    }
                }
            }
        };
        let running = self.start(job, offset, bytes);
        self.collecting.take(&tp, epoch, running);
        self.cut_batch(false);
    }

    /// Starts a record's work on the runtime, at most `max_in_flight` at a
    /// time.
    fn start(&self, job: Job, offset: i64, bytes: usize) -> Work {
        let worker = self.parts.worker.clone();
        let mut ticket = self.gate.ticket();
        let (clock, answers) = self.gate.record_clock(&ticket);
        let record_clock = clock.clone();
        let in_flight = self.in_flight.clone();
        let done = self.job_done.clone();
        let gate = self.gate.clone();
        let running = RunningGuard::new(self.running.clone());
        let running = tokio::spawn(async move {
            // Counted until the work ends or is cancelled.
            let _running = running;
            // The byte budget first: a record waiting for it holds no
            // permit. Then the call permit (the semaphore is never closed,
            // so acquiring only waits).
            ticket.pass().await;
            let _permit = in_flight.acquire_owned().await;
            // Boxed: a task's size is its future's largest state, and the
            // provider calls' state is several kilobytes, which every record
            // read ahead would take while it only waits for a permit.
            let mut r = Box::pin(worker.process(job, record_clock)).await;
            if let Ok(p) = &mut r {
                p.held = Some(gate.hold(p.output_bytes()));
            }
            drop(answers);
            drop(ticket);
            done.notify_one();
            r
        });
        Work {
            running,
            clock,
            offset,
            bytes,
        }
    }

    /// A tier record that is not due yet waits in memory when it is due
    /// within [`WAIT_AHEAD_MS`] and what waits there fits its bound (an
    /// eighth of `max_in_flight_bytes`); otherwise its partition is paused
    /// and rewound to it, and read again [`WAIT_AHEAD_MS`] before it is due
    /// (or, when the bound is full, once the first record waiting is due).
    fn wait_or_hold(
        &mut self,
        tp: &TopicPartition,
        epoch: Epoch,
        offset: i64,
        bytes: usize,
        entry: Entry<Work>,
        at: Millis,
    ) {
        let now = now_ms();
        let bound = self.parts.settings.max_in_flight_bytes / 8;
        let soon = at <= now.saturating_add(WAIT_AHEAD_MS);
        if soon && self.waiting.bytes() + bytes <= bound.max(bytes) {
            self.waiting.push(tp, epoch, offset, bytes, entry);
            return;
        }
        let resume_at = if soon {
            self.waiting.next_at().unwrap_or(at).min(at)
        } else {
            at.saturating_sub(WAIT_AHEAD_MS)
        };
        // Never read it again at once while the bound is full.
        self.hold(tp, offset, resume_at.max(now + FULL_RETRY_MS));
    }

    /// Starts the records waiting in memory that are due now, whatever
    /// waits ahead of them; one that turns out not to be due yet (its
    /// tier's time has come, the task's own due time not) waits on. Work
    /// started joins the batch being collected in read order, once every
    /// record ahead of it in its partition has started. Nothing starts
    /// while the partitions are paused for back-pressure.
    fn start_waiting(&mut self) {
        if self.waiting.is_empty() || !self.throttled.is_empty() {
            return;
        }
        let now = now_ms();
        let mut touched: Vec<TopicPartition> = Vec::new();
        for d in self.waiting.take_due(now) {
            let entry = match classify_tier_record(&self.parts.worker.tiers, d.tier, d.rec, now) {
                TierDecision::Job(job) => Entry::Started(self.start(*job, d.offset, d.bytes)),
                TierDecision::Hold { rec, resume_at } => Entry::Waiting {
                    rec,
                    tier: d.tier,
                    at: resume_at,
                },
            };
            self.waiting.put(&d.tp, d.offset, entry);
            if !touched.contains(&d.tp) {
                touched.push(d.tp);
            }
        }
        for tp in touched {
            for (epoch, work) in self.waiting.pop_started(&tp) {
                self.collecting.take(&tp, epoch, work);
            }
        }
    }

    /// Pauses a partition and rewinds it to `offset`, to be resumed at
    /// `resume_at`.
    fn hold(&mut self, tp: &TopicPartition, offset: i64, resume_at: Millis) {
        self.parts.consumer.pause(std::slice::from_ref(tp));
        self.parts.consumer.seek(tp, offset);
        self.held.insert(tp.clone(), resume_at);
    }

    /// Waits for whichever comes first: `stop`, the end of the transaction
    /// in flight, the end of a record's work, or a poll (at most `wait`).
    async fn next_event(&mut self, wait: Duration, stop: impl Future<Output = ()>) -> Event {
        let consumer = self.parts.consumer.clone();
        let job_done = self.job_done.clone();
        let mut committing = self.committing.take();
        let event = tokio::select! {
            biased;
            _ = stop => Event::Stop,
            r = commit_end(&mut committing) => Event::Committed(r),
            _ = job_done.notified() => Event::Nothing,
            polled = consumer.poll(wait) => Event::Polled(polled),
        };
        if !matches!(event, Event::Committed(_)) {
            self.committing = committing;
        }
        event
    }
}

/// What a consumed record weighs against `max_in_flight_bytes`.
fn record_bytes(rec: &crate::pipeline::record::Incoming) -> usize {
    record_size(&rec.key, &rec.value, &rec.headers)
}

/// What woke the loop.
enum Event {
    /// The stop condition it was given.
    Stop,
    Nothing,
    Committed(CommitEnd),
    Polled(Polled),
}

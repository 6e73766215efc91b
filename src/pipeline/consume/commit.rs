//! Batches and their transactions: cutting the records read into
//! batches, cutting stragglers short, starting the oldest finished
//! batch's transaction (merging the finished batches behind it), and
//! handling its end: counting what committed, or handing the batch back
//! with every batch read after it. The rules of exactly once this keeps
//! are in `pipeline::consume`.

use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::{ConsumeLoop, LoopError, MERGED_BATCHES, RECENT_ANSWERS, TRANSIENT_COOLDOWN};
use crate::pipeline::batch::{peer_leash, rewind_points, settled_as, Batch, Work};
use crate::pipeline::gate::InTransaction;
use crate::pipeline::guard::GuardSnapshot;
use crate::pipeline::ports::CommitError;
use crate::pipeline::record::{BatchOffsets, Processed};
use crate::pipeline::transaction;

/// A batch whose records are processed and which waits for its
/// transaction.
pub(super) struct Prepared {
    processed: Vec<Processed>,
    offsets: BatchOffsets,
    snapshot: GuardSnapshot,
    /// Tells the gate a transaction is in flight until it ends (dropped
    /// with the rest when the loop has handled its end).
    _in_flight: InTransaction,
}

pub(super) type Committing = JoinHandle<(Prepared, Result<(), CommitError>)>;

pub(super) type CommitEnd = Result<(Prepared, Result<(), CommitError>), tokio::task::JoinError>;

/// The end of the transaction in flight; never, when there is none.
pub(super) async fn commit_end(committing: &mut Option<Committing>) -> CommitEnd {
    match committing.as_mut() {
        Some(c) => c.await,
        None => std::future::pending().await,
    }
}

impl ConsumeLoop {
    /// Moves the records collected so far into the queue of batches when
    /// the batch is full, has lingered long enough, or `force`.
    pub(super) fn cut_batch(&mut self, force: bool) {
        let Some(started) = self.collecting.started else {
            return;
        };
        let s = &self.parts.settings;
        if force
            || self.collecting.len() >= s.max_batch
            || started.elapsed() >= s.batch_linger
            || !self.throttled.is_empty()
        {
            let batch = std::mem::take(&mut self.collecting);
            self.queued.push_back(batch);
        }
    }

    /// Batches commit in read order: a record that waits on a slow
    /// provider past its leash is cut short (its call parked, the user
    /// polled again when due) rather than holding its batch and every
    /// batch read after it.
    pub(super) fn cut_stragglers(&mut self) {
        let batches = || std::iter::once(&self.collecting).chain(self.queued.iter());
        let answers: Vec<Duration> = batches()
            .flat_map(Batch::answer_waits)
            .chain(self.recent_answers.iter().copied())
            .collect();
        let leash = peer_leash(answers);
        let cut: usize = batches().map(|b| b.cut_stragglers(leash)).sum();
        if cut > 0 {
            tracing::debug!(records = cut, "stragglers cut short; polled again when due");
        }
    }

    /// Starts the transaction of the oldest batch once its work is done
    /// and no other transaction is in flight.
    pub(super) async fn start_next_commit(&mut self) -> Result<(), LoopError> {
        if self.committing.is_some() {
            return Ok(());
        }
        self.split_when_held_outgrows_budget();
        while self.queued.front().is_some_and(Batch::is_finished) {
            let Some(mut batch) = self.queued.pop_front() else {
                break;
            };
            if batch.jobs.is_empty() {
                continue;
            }
            self.take_finished_behind(&mut batch);
            for wait in batch.answer_waits() {
                if self.recent_answers.len() == RECENT_ANSWERS {
                    self.recent_answers.pop_front();
                }
                self.recent_answers.push_back(wait);
            }
            if let Some(prepared) = self.prepare(batch).await? {
                self.committing = Some(self.start_commit(prepared));
                break;
            }
        }
        Ok(())
    }

    /// When the outputs held for transactions reach half the byte budget
    /// and the oldest batch is not done, its records done so far (at its
    /// head, in read order) commit on their own. Over the budget only the
    /// oldest unfinished record starts (`pipeline::gate`), one after
    /// another: without this split each would add its outputs to a batch
    /// that cannot commit until its last record is done, and a batch read
    /// before the records' sizes were known (hundreds of records, each
    /// answered with megabytes) held its whole output at once.
    fn split_when_held_outgrows_budget(&mut self) {
        let budget = self.parts.settings.max_in_flight_bytes.max(1);
        if self.gate.held().saturating_mul(2) < budget {
            return;
        }
        if self.queued.is_empty() && !self.collecting.is_finished() {
            // The batch being read is the oldest: cut it, so its head can
            // split off below.
            self.cut_batch(true);
        }
        let Some(front) = self.queued.front_mut() else {
            return;
        };
        if front.is_finished() {
            return;
        }
        if let Some(head) = front.split_done_head() {
            self.queued.push_front(head);
        }
    }

    /// A transaction's cost is mostly fixed (the commit's round trips to
    /// the coordinator): when batches finished while the one before them
    /// committed, they go into one transaction with `batch`, up to
    /// [`MERGED_BATCHES`] batches' worth of records. Commits stay in read
    /// order; only fewer of them.
    fn take_finished_behind(&mut self, batch: &mut Batch) {
        let most = self.parts.settings.max_batch.max(1) * MERGED_BATCHES;
        while self
            .queued
            .front()
            .is_some_and(|b| b.is_finished() && batch.len() + b.len() <= most)
        {
            let Some(next) = self.queued.pop_front() else {
                break;
            };
            if let Err(next) = batch.absorb(next) {
                self.queued.push_front(next);
                break;
            }
        }
    }

    /// Takes a finished batch's results and checks the dead-letter guard.
    /// Returns `None` when the batch was handed back (a transient failure:
    /// it is read again after a cool-down).
    async fn prepare(&mut self, batch: Batch) -> Result<Option<Prepared>, LoopError> {
        let Batch { jobs, offsets, .. } = batch;
        let mut processed = Vec::with_capacity(jobs.len());
        for (_, Work { running, .. }) in jobs {
            match running.await {
                Ok(Ok(p)) => processed.push(p),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "batch will be retried");
                    self.hand_back(&offsets);
                    self.cooldown_until = Some(Instant::now() + TRANSIENT_COOLDOWN);
                    return Ok(None);
                }
                Err(e) => {
                    self.hand_back(&offsets);
                    return Err(LoopError::WorkerPanicked(e.to_string()));
                }
            }
        }
        let snapshot = self.parts.guard.snapshot();
        for p in &processed {
            let counted = p
                .dead_letters
                .iter()
                .chain(&p.failures)
                .find(|(_, r)| r.counts_for_guard())
                .copied();
            if let Err(tripped) = self.parts.guard.observe(counted) {
                self.parts.guard.restore(snapshot);
                tracing::error!(error = %tripped, "dead-letter guard tripped; stopping without committing the batch");
                self.hand_back(&offsets);
                return Err(tripped.into());
            }
        }
        Ok(Some(Prepared {
            _in_flight: self.gate.transaction(),
            processed,
            offsets,
            snapshot,
        }))
    }

    fn start_commit(&self, mut prepared: Prepared) -> Committing {
        tracing::debug!(
            records = prepared.processed.len(),
            partitions = prepared.offsets.len(),
            "committing a batch"
        );
        let producer = self.parts.producer.clone();
        let consumer = self.parts.consumer.clone();
        let metrics = self.parts.metrics.clone();
        tokio::spawn(async move {
            let began = Instant::now();
            let result = transaction::run(
                producer.as_ref(),
                consumer.as_ref(),
                &mut prepared.processed,
                &prepared.offsets,
            )
            .await;
            metrics
                .transaction_duration
                .observe(began.elapsed().as_secs_f64());
            (prepared, result)
        })
    }

    /// Handles the end of a batch's transaction.
    pub(super) fn finish_commit(&mut self, joined: CommitEnd) -> Result<(), LoopError> {
        let (prepared, result) =
            joined.map_err(|e| LoopError::Fatal(format!("transaction task failed: {e}")))?;
        let Prepared {
            processed,
            offsets,
            snapshot,
            _in_flight,
        } = prepared;
        // A transaction settled by a new producer after a call was given
        // up on: the committed offsets say whether it had committed.
        let result = match result {
            Err(CommitError::Settled { reason, committed }) => {
                match settled_as(&offsets, &committed) {
                    Some(true) => {
                        tracing::warn!(error = %reason, "a transaction call was given up on, and the transaction had committed");
                        Ok(())
                    }
                    Some(false) => Err(CommitError::Abortable(reason)),
                    None => {
                        return Err(LoopError::Fatal(format!(
                            "{reason}; the group's committed offsets {committed:?} match neither the start nor the end of the batch"
                        )))
                    }
                }
            }
            other => other,
        };
        let m = &self.parts.metrics;
        match result {
            Ok(()) => {
                self.parts.consumer.record_committed(&offsets);
                m.transactions.with_label_values(&["committed"]).inc();
                m.batch_size.observe(processed.len() as f64);
                // Counted once, now that it is committed (metrics::events).
                for event in processed.iter().flat_map(Processed::committed) {
                    event.emit(m);
                }
                self.parts.health.progress();
                Ok(())
            }
            Err(CommitError::Abortable(e)) => {
                m.transactions.with_label_values(&["aborted"]).inc();
                self.parts.guard.restore(snapshot);
                tracing::warn!(error = %e, "transaction aborted; the batch will be processed again");
                self.hand_back(&offsets);
                Ok(())
            }
            Err(
                CommitError::Fatal(e)
                | CommitError::Abandoned(e)
                | CommitError::Settled { reason: e, .. },
            ) => Err(LoopError::Fatal(e)),
        }
    }

    /// Hands a batch back, with every batch read after it: their work is
    /// cancelled and each partition is rewound to the first offset any of
    /// them took under its current assignment (`rewind_points`).
    pub(super) fn hand_back(&mut self, offsets: &BatchOffsets) {
        // Rewinds follow the assignment as it is now (a poll dropped for
        // this commit's end may have served a rebalance).
        self.sync_assignment();
        let later: Vec<Batch> = self
            .queued
            .drain(..)
            .chain(std::iter::once(std::mem::take(&mut self.collecting)))
            .collect();
        for b in &later {
            b.cancel();
        }
        let rewind = rewind_points(
            std::iter::once(offsets.clone()).chain(later.into_iter().map(|b| b.offsets)),
            &self.assigned,
        );
        let mut resume = Vec::new();
        for (tp, first) in rewind {
            tracing::debug!(partition = %tp, offset = first, "reading again from");
            self.parts.consumer.seek(&tp, first);
            // Records waiting in memory were read after `first`.
            self.waiting.retain(|t, _| t != &tp, |w| w.running.abort());
            if self.held.remove(&tp).is_some() && !self.throttled.contains(&tp) {
                resume.push(tp);
            }
        }
        self.parts.consumer.resume(&resume);
    }
}

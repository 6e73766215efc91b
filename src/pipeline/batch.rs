//! A batch of records the loop read in one stretch, their work already
//! running, and where to read again when batches are handed back.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::pipeline::record::{BatchOffsets, Epoch, OffsetRange, PartitionRead, TopicPartition};
use crate::pipeline::worker::{Processed, Transient};
use crate::providers::budget::RecordClock;

pub(super) type Running = JoinHandle<Result<Processed, Transient>>;

/// A record's work: the task running it and the clock of its provider
/// calls.
pub(super) struct Work {
    pub(super) running: Running,
    pub(super) clock: Arc<RecordClock>,
}

/// Records read in one stretch, their work already running, in read order.
#[derive(Default)]
pub(super) struct Batch {
    pub(super) jobs: Vec<(TopicPartition, Work)>,
    pub(super) offsets: BatchOffsets,
    pub(super) started: Option<Instant>,
    /// Bytes of the consumed records (key, value, headers) it took; records
    /// of revoked partitions stay counted (an overcount until it commits).
    pub(super) bytes: usize,
}

impl Batch {
    pub(super) fn take(
        &mut self,
        tp: &TopicPartition,
        offset: i64,
        epoch: Epoch,
        job: Work,
        bytes: usize,
    ) {
        self.bytes += bytes;
        self.offsets
            .entry(tp.clone())
            .and_modify(|r| r.range.last = offset)
            .or_insert(PartitionRead {
                range: OffsetRange {
                    first: offset,
                    last: offset,
                },
                epoch,
            });
        self.jobs.push((tp.clone(), job));
        self.started.get_or_insert_with(Instant::now);
    }

    pub(super) fn len(&self) -> usize {
        self.jobs.len()
    }

    pub(super) fn is_finished(&self) -> bool {
        self.jobs.iter().all(|(_, w)| w.running.is_finished())
    }

    /// Forgets revoked partitions: their records' work is cancelled (the
    /// next owner reads them again from the committed offset).
    pub(super) fn drop_partitions(&mut self, gone: &HashSet<TopicPartition>) {
        self.jobs.retain(|(tp, work)| {
            let keep = !gone.contains(tp);
            if !keep {
                work.running.abort();
            }
            keep
        });
        self.offsets.retain(|tp, _| !gone.contains(tp));
    }

    pub(super) fn cancel(&self) {
        for (_, w) in &self.jobs {
            w.running.abort();
        }
    }

    /// Cuts short the records that have waited on a provider for their
    /// leash (`schedule.straggler_wait`, doubled per cut in a row): each
    /// holds this batch, and every batch after it, while it waits.
    /// Returns how many were cut.
    pub(super) fn cut_stragglers(&self) -> usize {
        let mut cut = 0;
        for (_, w) in &self.jobs {
            if !w.running.is_finished() && !w.clock.is_cut() && w.clock.is_straggling() {
                w.clock.cut();
                cut += 1;
            }
        }
        cut
    }
}

/// Where to read again when batches are handed back: per partition, the
/// first offset any of them took in the epoch the first of them read it in
/// (a read under another epoch belongs to another assignment).
pub(super) fn rewind_points(
    batches: impl IntoIterator<Item = BatchOffsets>,
) -> HashMap<TopicPartition, PartitionRead> {
    let mut rewind: HashMap<TopicPartition, PartitionRead> = HashMap::new();
    for offsets in batches {
        for (tp, read) in offsets {
            rewind
                .entry(tp)
                .and_modify(|r| {
                    if read.epoch == r.epoch {
                        r.range.first = r.range.first.min(read.range.first);
                    }
                })
                .or_insert(read);
        }
    }
    rewind
}

/// Counts a record as running until dropped (its task ended or was
/// cancelled).
pub(super) struct RunningGuard(Arc<AtomicUsize>);

impl RunningGuard {
    pub(super) fn new(count: Arc<AtomicUsize>) -> RunningGuard {
        count.fetch_add(1, Ordering::Relaxed);
        RunningGuard(count)
    }
}

impl Drop for RunningGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

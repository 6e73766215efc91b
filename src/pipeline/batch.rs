//! A batch of records the loop read in one stretch, their work already
//! running, and where to read again when batches are handed back.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::pipeline::record::{
    BatchOffsets, Epoch, OffsetRange, PartitionRead, Processed, TopicPartition, Transient,
};
use crate::providers::budget::RecordClock;

pub(super) type Running = JoinHandle<Result<Processed, Transient>>;

/// A request is cut once it has awaited its answer (status and headers)
/// this many times as long as what answers take now ...
const PEER_FACTOR: u32 = 4;
/// ... but never before this.
const PEER_FLOOR: std::time::Duration = std::time::Duration::from_millis(500);
/// What answers take now: this high a share of the waits for an answer of
/// the records done recently (one slow answer does not raise the leash).
const PEER_PERCENTILE: f64 = 0.9;

/// A record's work: the task running it and the clock of its provider
/// calls.
pub(super) struct Work {
    pub(super) running: Running,
    pub(super) clock: Arc<RecordClock>,
    /// The consumed record's offset, and its bytes (key, value, headers).
    pub(super) offset: i64,
    pub(super) bytes: usize,
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
    pub(super) fn take(&mut self, tp: &TopicPartition, epoch: Epoch, job: Work) {
        let offset = job.offset;
        self.bytes += job.bytes;
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

    /// Takes `next`, read after this batch, into this one, so both commit
    /// in one transaction; gives it back untouched when a partition of
    /// both was read under another epoch or out of order (a rewind in
    /// between): those stay separate transactions.
    pub(super) fn absorb(&mut self, next: Batch) -> Result<(), Batch> {
        let fits = next.offsets.iter().all(|(tp, read)| {
            self.offsets
                .get(tp)
                .is_none_or(|mine| mine.epoch == read.epoch && mine.range.last < read.range.first)
        });
        if !fits {
            return Err(next);
        }
        for (tp, read) in next.offsets {
            self.offsets
                .entry(tp)
                .and_modify(|mine| mine.range.last = read.range.last)
                .or_insert(read);
        }
        self.jobs.extend(next.jobs);
        self.bytes += next.bytes;
        self.started = match (self.started, next.started) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        Ok(())
    }

    /// Splits off the records done at the head of the batch, in read
    /// order, as a batch of their own that can commit now; `None` when the
    /// first record is still running or every record is done. Each
    /// partition's records are taken in offset order, so the head holds
    /// the first records of every partition it touches: committing it
    /// commits each of those partitions up to its last record there, and
    /// the rest of the batch reads on from the next offset.
    pub(super) fn split_done_head(&mut self) -> Option<Batch> {
        let done = self
            .jobs
            .iter()
            .take_while(|(_, w)| w.running.is_finished())
            .count();
        if done == 0 || done == self.jobs.len() {
            return None;
        }
        let jobs: Vec<(TopicPartition, Work)> = self.jobs.drain(..done).collect();
        let mut head = Batch {
            started: self.started,
            ..Batch::default()
        };
        for (tp, work) in &jobs {
            let Some(read) = self.offsets.get(tp) else {
                continue;
            };
            head.offsets
                .entry(tp.clone())
                .and_modify(|r| r.range.last = work.offset)
                .or_insert(PartitionRead {
                    range: OffsetRange {
                        first: read.range.first,
                        last: work.offset,
                    },
                    epoch: read.epoch,
                });
            head.bytes += work.bytes;
        }
        self.bytes = self.bytes.saturating_sub(head.bytes);
        for (tp, read) in &head.offsets {
            if self.jobs.iter().any(|(t, _)| t == tp) {
                if let Some(rest) = self.offsets.get_mut(tp) {
                    rest.range.first = read.range.last + 1;
                }
            } else {
                self.offsets.remove(tp);
            }
        }
        head.jobs = jobs;
        Some(head)
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

    /// Whether a record still running is receiving an answer's body.
    pub(super) fn receiving_body(&self) -> bool {
        self.jobs
            .iter()
            .any(|(_, w)| !w.running.is_finished() && w.clock.is_receiving_body())
    }

    pub(super) fn cancel(&self) {
        for (_, w) in &self.jobs {
            w.running.abort();
        }
    }

    /// Cuts short the records that have waited on a provider for their
    /// leash (`schedule.straggler_wait`), or have awaited an answer for
    /// `peer_leash` (what answers take now, see [`peer_leash`]): each holds
    /// this batch, and every batch after it, while it waits. A record cut
    /// short loses nothing: its call is parked for the user's next poll
    /// (`pipeline::parked`). Returns how many were cut.
    pub(super) fn cut_stragglers(&self, peer_leash: Option<std::time::Duration>) -> usize {
        let mut cut = 0;
        for (_, w) in &self.jobs {
            if w.running.is_finished() || w.clock.is_cut() {
                continue;
            }
            let outlasted = peer_leash.filter(|l| w.clock.outlasts(*l));
            if let Some(leash) = outlasted {
                tracing::debug!(
                    leash_ms = leash.as_millis() as u64,
                    records = self.jobs.len(),
                    "request cut short: its answer took four times what answers take now"
                );
            }
            if outlasted.is_some() || w.clock.is_straggling() {
                w.clock.cut();
                cut += 1;
            }
        }
        cut
    }

    /// The waits for an answer of the batch's records that are done (none
    /// for a record that asked no provider).
    pub(super) fn answer_waits(&self) -> impl Iterator<Item = std::time::Duration> + '_ {
        self.jobs
            .iter()
            .filter(|(_, w)| w.running.is_finished())
            .map(|(_, w)| w.clock.longest_await())
            .filter(|d| !d.is_zero())
    }
}

/// How long a request may await its answer before it is cut short, from
/// what answers take now: [`PEER_FACTOR`] times the 90th percentile of
/// `answers` (the waits for an answer of the records done lately, in every
/// batch), at least [`PEER_FLOOR`]; `None` before any record was answered.
/// The others' answers are the measure of what is slow, on this machine
/// and under this load.
pub(super) fn peer_leash(mut answers: Vec<std::time::Duration>) -> Option<std::time::Duration> {
    if answers.is_empty() {
        return None;
    }
    answers.sort_unstable();
    let at = ((answers.len() - 1) as f64 * PEER_PERCENTILE).round() as usize;
    Some((answers[at] * PEER_FACTOR).max(PEER_FLOOR))
}

/// Where to read again when batches are handed back: per partition, the
/// first offset any of them took under the assignment current now
/// (`assigned`). Reads under an older epoch are not rewound: that
/// assignment ended, and the partition's current assignment started from
/// the committed offset. A partition read under both (the member rejoined
/// while an old batch's transaction was still out) goes back to the first
/// offset of its current reads; rewinding by the old read alone would skip
/// what the current assignment has read since.
pub(super) fn rewind_points(
    batches: impl IntoIterator<Item = BatchOffsets>,
    assigned: &HashMap<TopicPartition, Epoch>,
) -> HashMap<TopicPartition, i64> {
    let mut rewind: HashMap<TopicPartition, i64> = HashMap::new();
    for offsets in batches {
        for (tp, read) in offsets {
            if assigned.get(&tp) != Some(&read.epoch) {
                continue;
            }
            rewind
                .entry(tp)
                .and_modify(|first| *first = (*first).min(read.range.first))
                .or_insert(read.range.first);
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

/// Whether a batch whose transaction was settled by a new producer had
/// committed (`Some(true)`: the group's offsets are at the batch's end on
/// every partition), had not (`Some(false)`: at its start, or none), or
/// neither (`None`: nothing this side can tell).
pub(super) fn settled_as(
    offsets: &BatchOffsets,
    committed: &HashMap<TopicPartition, i64>,
) -> Option<bool> {
    let at = |tp: &TopicPartition| committed.get(tp).copied();
    if offsets
        .iter()
        .all(|(tp, read)| at(tp) == Some(read.range.next()))
    {
        Some(true)
    } else if offsets
        .iter()
        .all(|(tp, read)| at(tp).is_none_or(|c| c <= read.range.first))
    {
        Some(false)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(tp: &TopicPartition, first: i64, last: i64, epoch: Epoch) -> BatchOffsets {
        let mut o = BatchOffsets::new();
        o.insert(
            tp.clone(),
            PartitionRead {
                range: OffsetRange { first, last },
                epoch,
            },
        );
        o
    }

    #[test]
    fn a_partition_read_under_an_old_and_the_current_epoch_rewinds_to_its_current_reads() {
        let tp = TopicPartition::new("in", 0);
        let assigned = HashMap::from([(tp.clone(), 7)]);
        // The doomed batch read 300..=399 under epoch 3; after the rejoin
        // the partition was read again from the committed offset (300)
        // under epoch 7, into two later batches.
        let batches = [
            read(&tp, 300, 399, 3),
            read(&tp, 300, 349, 7),
            read(&tp, 350, 420, 7),
        ];
        assert_eq!(
            rewind_points(batches, &assigned),
            HashMap::from([(tp, 300)])
        );
    }

    #[test]
    fn reads_under_an_ended_assignment_alone_are_not_rewound() {
        let tp = TopicPartition::new("in", 1);
        let assigned = HashMap::from([(tp.clone(), 8)]);
        assert!(rewind_points([read(&tp, 10, 20, 2)], &assigned).is_empty());
        assert!(rewind_points([read(&tp, 10, 20, 8)], &HashMap::new()).is_empty());
    }

    #[test]
    fn the_earliest_current_read_wins_whatever_the_batch_order() {
        let tp = TopicPartition::new("in", 2);
        let assigned = HashMap::from([(tp.clone(), 4)]);
        let batches = [
            read(&tp, 50, 60, 4),
            read(&tp, 40, 45, 4),
            read(&tp, 5, 9, 1),
        ];
        assert_eq!(rewind_points(batches, &assigned), HashMap::from([(tp, 40)]));
    }

    fn work(offset: i64, done: bool) -> Work {
        let running = if done {
            tokio::spawn(async { Ok(Processed::default()) })
        } else {
            tokio::spawn(std::future::pending())
        };
        Work {
            running,
            clock: RecordClock::new(),
            offset,
            bytes: 10,
        }
    }

    #[tokio::test]
    async fn the_done_head_of_a_batch_splits_off_with_offsets_that_commit_only_it() {
        let a = TopicPartition::new("in", 0);
        let b = TopicPartition::new("in", 1);
        let mut batch = Batch::default();
        // Read order: a@5 (done), b@7 (done), a@6 (done), a@8 (running),
        // b@9 (done, behind the running one).
        for (tp, offset, done) in [
            (&a, 5, true),
            (&b, 7, true),
            (&a, 6, true),
            (&a, 8, false),
            (&b, 9, true),
        ] {
            batch.take(tp, 3, work(offset, done));
        }
        for _ in 0..100 {
            if batch
                .jobs
                .iter()
                .filter(|(_, w)| w.running.is_finished())
                .count()
                == 4
            {
                break;
            }
            tokio::task::yield_now().await;
        }
        let head = batch.split_done_head().expect("a done head");
        assert_eq!(head.len(), 3);
        assert_eq!(head.bytes, 30);
        assert_eq!(head.offsets[&a].range, OffsetRange { first: 5, last: 6 });
        assert_eq!(head.offsets[&b].range, OffsetRange { first: 7, last: 7 });
        assert!(head.offsets.values().all(|r| r.epoch == 3));
        // The rest reads on from the next offset of each partition.
        assert_eq!(batch.len(), 2);
        assert_eq!(batch.bytes, 20);
        assert_eq!(batch.offsets[&a].range, OffsetRange { first: 7, last: 8 });
        assert_eq!(batch.offsets[&b].range, OffsetRange { first: 8, last: 9 });
        // Its head is running: nothing more splits off.
        assert!(batch.split_done_head().is_none());
        batch.cancel();
    }

    #[tokio::test]
    async fn a_partition_done_in_the_head_leaves_the_rest_of_the_batch() {
        let a = TopicPartition::new("in", 0);
        let b = TopicPartition::new("in", 1);
        let mut batch = Batch::default();
        batch.take(&a, 1, work(40, true));
        batch.take(&b, 1, work(3, false));
        for _ in 0..100 {
            if batch.jobs[0].1.running.is_finished() {
                break;
            }
            tokio::task::yield_now().await;
        }
        let head = batch.split_done_head().expect("a done head");
        assert_eq!(head.offsets.len(), 1);
        assert_eq!(head.offsets[&a].range.next(), 41);
        assert!(!batch.offsets.contains_key(&a));
        assert_eq!(batch.offsets[&b].range, OffsetRange { first: 3, last: 3 });
        batch.cancel();
    }
}

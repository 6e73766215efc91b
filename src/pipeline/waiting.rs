//! Delay-tier records read shortly before they are due, kept in memory in
//! read order per partition until they are.
//!
//! Without this, a tier partition whose head is not due is paused and
//! rewound, and read again from the broker when the head is due: one
//! fetch's round trip per record whose due time has not quite come. When
//! thousands of users fall due within seconds, the records of a tier
//! partition come due a millisecond or less apart, so nearly every one
//! cost a pause, a rewind and a fetch, and the partition fell behind by
//! seconds. Records due within [`WAIT_AHEAD_MS`] are instead kept here and
//! started the moment they are due; a partition is paused and rewound only
//! for a record due later than that (and read again that long before it is
//! due), or when what waits here reaches its byte bound.
//!
//! A record's work starts when the record is due, even behind a record of
//! its partition that is not due yet (a tier's records are not written in
//! due order: a task record's wait is counted from when it began, so one
//! written later may be due sooner, by up to the smallest tier). Started
//! work stays here in read order and leaves for a batch only behind every
//! record read before it, so each batch still takes a contiguous run of
//! offsets per partition and commits in read order: a provider is polled
//! on time, and what the poll yields is committed once the records ahead of
//! it are. Nothing here is committed: a record dropped from here (its
//! partition revoked or rewound) is read again, and work started for it is
//! cancelled by the caller.

use std::collections::{BTreeSet, HashMap, VecDeque};

use crate::pipeline::record::{Epoch, Incoming, TopicPartition};
use crate::task::Millis;

/// How long before it is due a tier record is read and kept in memory.
/// More than the smallest tier a deployment would use (1 s), so a record
/// that is held rather than forwarded (its rest shorter than that tier)
/// always waits here.
pub const WAIT_AHEAD_MS: i64 = 2_000;

/// A record waiting here: not due yet, or its work `W` started.
#[derive(Debug)]
pub enum Entry<W> {
    /// Due at `at` (its tier's time, or the task's own due time).
    Waiting {
        rec: Incoming,
        tier: usize,
        at: Millis,
    },
    Started(W),
    /// Taken out to be looked at (never seen outside [`Waiting::take`]
    /// and the put that follows it).
    Taken,
}

/// A record due, taken out of its place by [`Waiting::take_due`].
#[derive(Debug)]
pub struct Due {
    pub tp: TopicPartition,
    /// The epoch its partition was read under.
    pub epoch: Epoch,
    pub offset: i64,
    pub bytes: usize,
    pub rec: Incoming,
    pub tier: usize,
}

#[derive(Debug)]
struct Slot<W> {
    offset: i64,
    /// What the record weighs (key, value, headers).
    bytes: usize,
    entry: Entry<W>,
}

#[derive(Debug)]
struct Queue<W> {
    epoch: Epoch,
    slots: VecDeque<Slot<W>>,
}

impl<W> Queue<W> {
    fn index(&self, offset: i64) -> Option<usize> {
        self.slots.binary_search_by_key(&offset, |s| s.offset).ok()
    }
}

/// The records waiting in memory, per partition, and when each not yet
/// started is due.
#[derive(Debug)]
pub struct Waiting<W> {
    queues: HashMap<TopicPartition, Queue<W>>,
    timers: BTreeSet<(Millis, TopicPartition, i64)>,
    bytes: usize,
    count: usize,
}

impl<W> Default for Waiting<W> {
    fn default() -> Self {
        Waiting {
            queues: HashMap::new(),
            timers: BTreeSet::new(),
            bytes: 0,
            count: 0,
        }
    }
}

impl<W> Waiting<W> {
    /// Whether records of `tp` wait here (a record read next must then
    /// wait behind them).
    pub fn has(&self, tp: &TopicPartition) -> bool {
        self.queues.contains_key(tp)
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Adds a record behind those of its partition read before it.
    pub fn push(
        &mut self,
        tp: &TopicPartition,
        epoch: Epoch,
        offset: i64,
        bytes: usize,
        entry: Entry<W>,
    ) {
        self.bytes += bytes;
        self.count += 1;
        if let Entry::Waiting { at, .. } = &entry {
            self.timers.insert((*at, tp.clone(), offset));
        }
        let q = self.queues.entry(tp.clone()).or_insert_with(|| Queue {
            epoch,
            slots: VecDeque::new(),
        });
        debug_assert!(q.slots.back().is_none_or(|s| s.offset < offset));
        q.slots.push_back(Slot {
            offset,
            bytes,
            entry,
        });
    }

    /// The earliest time a record not yet started is due.
    pub fn next_at(&self) -> Option<Millis> {
        self.timers.first().map(|(at, _, _)| *at)
    }

    /// The records due by `now`, earliest first, each taken out of its
    /// place (which the caller fills again with [`Waiting::put`]).
    pub fn take_due(&mut self, now: Millis) -> Vec<Due> {
        let mut out = Vec::new();
        while let Some((at, tp, offset)) = self.timers.first().cloned() {
            if at > now {
                break;
            }
            self.timers.pop_first();
            let Some(q) = self.queues.get_mut(&tp) else {
                continue;
            };
            let Some(i) = q.index(offset) else {
                continue;
            };
            if let Entry::Waiting { rec, tier, .. } =
                std::mem::replace(&mut q.slots[i].entry, Entry::Taken)
            {
                out.push(Due {
                    epoch: q.epoch,
                    offset,
                    bytes: q.slots[i].bytes,
                    rec,
                    tier,
                    tp,
                });
            }
        }
        out
    }

    /// Fills the place of a record taken out by [`Waiting::take_due`]: its
    /// work started, or due again at a later time.
    pub fn put(&mut self, tp: &TopicPartition, offset: i64, entry: Entry<W>) {
        let Some(q) = self.queues.get_mut(tp) else {
            return;
        };
        let Some(i) = q.index(offset) else {
            return;
        };
        if let Entry::Waiting { at, .. } = &entry {
            self.timers.insert((*at, tp.clone(), offset));
        }
        q.slots[i].entry = entry;
    }

    /// Takes the started work at the head of `tp`, in read order, up to
    /// the first record not started; with the epoch it was read under.
    pub fn pop_started(&mut self, tp: &TopicPartition) -> Vec<(Epoch, W)> {
        let mut out = Vec::new();
        let Some(q) = self.queues.get_mut(tp) else {
            return out;
        };
        while q
            .slots
            .front()
            .is_some_and(|s| matches!(s.entry, Entry::Started(_)))
        {
            let Some(slot) = q.slots.pop_front() else {
                break;
            };
            self.bytes -= slot.bytes;
            self.count -= 1;
            if let Entry::Started(w) = slot.entry {
                out.push((q.epoch, w));
            }
        }
        if q.slots.is_empty() {
            self.queues.remove(tp);
        }
        out
    }

    /// Drops the records of every partition `keep` refuses (given each
    /// partition and the epoch its records were read under), handing the
    /// work started for them to `cancel`; they are read again by whoever
    /// reads the partition from its committed offset. Returns how many
    /// were dropped.
    pub fn retain(
        &mut self,
        mut keep: impl FnMut(&TopicPartition, Epoch) -> bool,
        mut cancel: impl FnMut(W),
    ) -> usize {
        let mut dropped = 0;
        let mut gone = Vec::new();
        self.queues.retain(|tp, q| {
            if keep(tp, q.epoch) {
                return true;
            }
            gone.push(tp.clone());
            dropped += q.slots.len();
            for slot in q.slots.drain(..) {
                self.bytes -= slot.bytes;
                if let Entry::Started(w) = slot.entry {
                    cancel(w);
                }
            }
            false
        });
        if !gone.is_empty() {
            self.timers.retain(|(_, tp, _)| !gone.contains(tp));
        }
        self.count -= dropped;
        dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::record::SourceKind;

    fn waiting(offset: i64, at: Millis) -> Entry<i64> {
        Entry::Waiting {
            rec: Incoming {
                kind: SourceKind::Tier(0),
                topic: "d.1s".into(),
                partition: 0,
                offset,
                timestamp: None,
                key: None,
                value: Some(vec![0; 10]),
                headers: vec![],
            },
            tier: 0,
            at,
        }
    }

    /// Starts every record due by `now` (its work: its offset).
    fn start_due(w: &mut Waiting<i64>, now: Millis) -> Vec<i64> {
        let due = w.take_due(now);
        let offsets: Vec<i64> = due.iter().map(|d| d.offset).collect();
        for d in due {
            w.put(&d.tp, d.offset, Entry::Started(d.offset));
        }
        offsets
    }

    fn leave(w: &mut Waiting<i64>, tp: &TopicPartition) -> Vec<i64> {
        w.pop_started(tp).into_iter().map(|(_, o)| o).collect()
    }

    #[test]
    fn records_start_when_due_but_leave_in_read_order() {
        let tp = TopicPartition::new("d.1s", 0);
        let mut w = Waiting::default();
        w.push(&tp, 1, 5, 10, waiting(5, 1_000));
        w.push(&tp, 1, 6, 10, waiting(6, 400));
        w.push(&tp, 1, 7, 10, waiting(7, 700));
        assert_eq!((w.len(), w.bytes()), (3, 30));
        assert_eq!(w.next_at(), Some(400));
        assert!(start_due(&mut w, 399).is_empty());
        // The second and third start on time, behind a head not yet due,
        // and wait there.
        assert_eq!(start_due(&mut w, 700), vec![6, 7]);
        assert!(leave(&mut w, &tp).is_empty());
        assert_eq!(w.next_at(), Some(1_000));
        assert_eq!(start_due(&mut w, 1_000), vec![5]);
        assert_eq!(leave(&mut w, &tp), vec![5, 6, 7]);
        assert!(!w.has(&tp));
        assert!(w.is_empty());
        assert_eq!((w.bytes(), w.next_at()), (0, None));
    }

    #[test]
    fn a_record_put_back_is_due_again_at_its_new_time_and_holds_those_behind() {
        let tp = TopicPartition::new("d.1s", 0);
        let mut w = Waiting::default();
        w.push(&tp, 1, 5, 10, waiting(5, 0));
        w.push(&tp, 1, 6, 10, Entry::Started(6));
        let due = w.take_due(10);
        assert_eq!(due.len(), 1);
        let d = due.into_iter().next().expect("due");
        assert_eq!((d.epoch, d.offset, d.bytes), (1, 5, 10));
        w.put(
            &tp,
            5,
            Entry::Waiting {
                rec: d.rec,
                tier: d.tier,
                at: 900,
            },
        );
        assert_eq!(w.next_at(), Some(900));
        assert!(leave(&mut w, &tp).is_empty());
        assert!(start_due(&mut w, 899).is_empty());
        assert_eq!(start_due(&mut w, 900), vec![5]);
        assert_eq!(leave(&mut w, &tp), vec![5, 6]);
    }

    #[test]
    fn retain_drops_whole_partitions_cancels_their_work_and_forgets_their_times() {
        let (a, b) = (
            TopicPartition::new("d.1s", 0),
            TopicPartition::new("d.1s", 1),
        );
        let mut w = Waiting::default();
        w.push(&a, 1, 1, 10, waiting(1, 0));
        w.push(&a, 1, 2, 10, waiting(2, 0));
        w.push(&b, 2, 1, 10, Entry::Started(1));
        w.push(&b, 2, 2, 10, waiting(2, 50));
        // b was read under epoch 2; now assigned under 3: read again.
        let mut cancelled = Vec::new();
        let dropped = w.retain(|tp, epoch| tp == &a || epoch == 3, |o| cancelled.push(o));
        assert_eq!((dropped, cancelled), (2, vec![1]));
        assert_eq!((w.len(), w.bytes()), (2, 20));
        assert!(w.has(&a) && !w.has(&b));
        assert_eq!(start_due(&mut w, 100), vec![1, 2]);
        assert_eq!(leave(&mut w, &a), vec![1, 2]);
    }
}

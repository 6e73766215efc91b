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
//! Records wait in read order: a record is started only after every record
//! read before it in its partition, so each batch still takes a contiguous
//! run of offsets per partition. Nothing here is committed: a record
//! dropped from here (its partition revoked or rewound) is read again.

use std::collections::{HashMap, VecDeque};

use crate::pipeline::record::{Epoch, Incoming, TopicPartition};
use crate::task::Millis;

/// How long before it is due a tier record is read and kept in memory.
/// More than the smallest tier a deployment would use (1 s), so a record
/// that is held rather than forwarded (its rest shorter than that tier)
/// always waits here.
pub const WAIT_AHEAD_MS: i64 = 2_000;

/// One record read before it is due.
#[derive(Debug)]
pub struct Waiter {
    pub rec: Incoming,
    pub tier: usize,
    pub offset: i64,
    /// What it weighs (key, value, headers).
    pub bytes: usize,
    /// When to look at it again: its due time, or [`Millis::MIN`] for a
    /// record taken in behind another (looked at once it is the head).
    pub at: Millis,
}

#[derive(Debug)]
struct Queue {
    epoch: Epoch,
    records: VecDeque<Waiter>,
}

/// The records waiting in memory, per partition.
#[derive(Debug, Default)]
pub struct Waiting {
    queues: HashMap<TopicPartition, Queue>,
    bytes: usize,
    count: usize,
}

impl Waiting {
    /// Whether records of `tp` wait here (a record read next must then
    /// wait behind them).
    pub fn has(&self, tp: &TopicPartition) -> bool {
        self.queues.contains_key(tp)
    }

    /// When the head of `tp` is to be looked at again.
    pub fn head_at(&self, tp: &TopicPartition) -> Option<Millis> {
        self.queues
            .get(tp)
            .and_then(|q| q.records.front())
            .map(|w| w.at)
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
    pub fn push(&mut self, tp: &TopicPartition, epoch: Epoch, w: Waiter) {
        self.bytes += w.bytes;
        self.count += 1;
        self.queues
            .entry(tp.clone())
            .or_insert_with(|| Queue {
                epoch,
                records: VecDeque::new(),
            })
            .records
            .push_back(w);
    }

    /// Puts a record looked at too soon back at the head of its partition.
    pub fn push_front(&mut self, tp: &TopicPartition, epoch: Epoch, w: Waiter) {
        self.bytes += w.bytes;
        self.count += 1;
        self.queues
            .entry(tp.clone())
            .or_insert_with(|| Queue {
                epoch,
                records: VecDeque::new(),
            })
            .records
            .push_front(w);
    }

    /// The earliest time any head is to be looked at.
    pub fn next_at(&self) -> Option<Millis> {
        self.queues
            .values()
            .filter_map(|q| q.records.front().map(|w| w.at))
            .min()
    }

    /// The partitions whose head is to be looked at by `now`, with the
    /// epoch their records were read under.
    pub fn due(&self, now: Millis) -> Vec<(TopicPartition, Epoch)> {
        self.queues
            .iter()
            .filter(|(_, q)| q.records.front().is_some_and(|w| w.at <= now))
            .map(|(tp, q)| (tp.clone(), q.epoch))
            .collect()
    }

    /// Takes the head of `tp` if it is to be looked at by `now`.
    pub fn pop_due(&mut self, tp: &TopicPartition, now: Millis) -> Option<Waiter> {
        let q = self.queues.get_mut(tp)?;
        if q.records.front().is_none_or(|w| w.at > now) {
            return None;
        }
        let w = q.records.pop_front()?;
        if q.records.is_empty() {
            self.queues.remove(tp);
        }
        self.bytes -= w.bytes;
        self.count -= 1;
        Some(w)
    }

    /// Drops the records of every partition `keep` refuses (given each
    /// partition and the epoch its records were read under); they are
    /// read again by whoever reads the partition from its committed
    /// offset. Returns how many were dropped.
    pub fn retain(&mut self, mut keep: impl FnMut(&TopicPartition, Epoch) -> bool) -> usize {
        let mut dropped = 0;
        self.queues.retain(|tp, q| {
            let k = keep(tp, q.epoch);
            if !k {
                dropped += q.records.len();
                self.bytes -= q.records.iter().map(|w| w.bytes).sum::<usize>();
            }
            k
        });
        self.count -= dropped;
        dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::record::SourceKind;

    fn waiter(offset: i64, at: Millis) -> Waiter {
        Waiter {
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
            offset,
            bytes: 10,
            at,
        }
    }

    #[test]
    fn records_leave_in_read_order_and_only_when_their_head_is_due() {
        let tp = TopicPartition::new("d.1s", 0);
        let mut w = Waiting::default();
        w.push(&tp, 1, waiter(5, 1_000));
        w.push(&tp, 1, waiter(6, Millis::MIN));
        w.push(&tp, 1, waiter(7, 500));
        assert_eq!((w.len(), w.bytes()), (3, 30));
        assert_eq!(w.next_at(), Some(1_000));
        // The second record is due at once, the third sooner than the head:
        // neither leaves before the head.
        assert!(w.due(999).is_empty());
        assert!(w.pop_due(&tp, 999).is_none());
        assert_eq!(w.due(1_000), vec![(tp.clone(), 1)]);
        let offsets: Vec<i64> = std::iter::from_fn(|| w.pop_due(&tp, 1_000))
            .map(|x| x.offset)
            .collect();
        assert_eq!(offsets, vec![5, 6, 7]);
        assert!(!w.has(&tp));
        assert!(w.is_empty());
        assert_eq!(w.bytes(), 0);
    }

    #[test]
    fn a_record_put_back_stays_ahead_of_the_rest() {
        let tp = TopicPartition::new("d.1s", 0);
        let mut w = Waiting::default();
        w.push(&tp, 1, waiter(5, 0));
        w.push(&tp, 1, waiter(6, Millis::MIN));
        let head = w.pop_due(&tp, 10).expect("due");
        w.push_front(&tp, 1, Waiter { at: 900, ..head });
        assert_eq!(w.head_at(&tp), Some(900));
        assert!(w.pop_due(&tp, 899).is_none());
        assert_eq!(w.pop_due(&tp, 900).map(|x| x.offset), Some(5));
        assert_eq!(w.pop_due(&tp, 900).map(|x| x.offset), Some(6));
    }

    #[test]
    fn retain_drops_whole_partitions_and_their_weight() {
        let (a, b) = (
            TopicPartition::new("d.1s", 0),
            TopicPartition::new("d.1s", 1),
        );
        let mut w = Waiting::default();
        w.push(&a, 1, waiter(1, 0));
        w.push(&a, 1, waiter(2, 0));
        w.push(&b, 2, waiter(1, 0));
        // b was read under epoch 2; now assigned under 3: read again.
        let dropped = w.retain(|tp, epoch| tp == &a || epoch == 3);
        assert_eq!(dropped, 1);
        assert_eq!((w.len(), w.bytes()), (2, 20));
        assert!(w.has(&a) && !w.has(&b));
    }
}

//! The vocabulary of the consume loop: which partition a record came from,
//! which offsets a batch took, and under which assignment it read them.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

/// One partition of one topic.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicPartition {
    pub topic: String,
    pub partition: i32,
}

impl TopicPartition {
    pub fn new(topic: impl Into<String>, partition: i32) -> TopicPartition {
        TopicPartition {
            topic: topic.into(),
            partition,
        }
    }
}

impl fmt::Display for TopicPartition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[{}]", self.topic, self.partition)
    }
}

/// The first and last offset a batch took from one partition (a contiguous
/// run, both inclusive).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OffsetRange {
    pub first: i64,
    pub last: i64,
}

impl OffsetRange {
    /// The offset to commit: the next one to read.
    pub fn next(&self) -> i64 {
        self.last + 1
    }
}

/// Counts the times a partition was assigned to this consumer. A batch
/// remembers the epoch it read each partition under; when the partition was
/// revoked (or lost) and assigned again since, its records may already be
/// another batch's, so the older batch must neither commit nor rewind it.
pub type Epoch = u64;

/// What a batch read from each partition, and under which epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionRead {
    pub range: OffsetRange,
    pub epoch: Epoch,
}

/// Offsets taken by one batch, per partition.
pub type BatchOffsets = BTreeMap<TopicPartition, PartitionRead>;

/// Whether every partition a batch read is still assigned under the epoch
/// it was read in; the first one that is not, if any.
pub fn still_owned(
    assigned: &HashMap<TopicPartition, Epoch>,
    offsets: &BatchOffsets,
) -> Result<(), TopicPartition> {
    match offsets
        .iter()
        .find(|(tp, read)| assigned.get(*tp) != Some(&read.epoch))
    {
        Some((tp, _)) => Err(tp.clone()),
        None => Ok(()),
    }
}

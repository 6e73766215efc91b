//! The vocabulary of the consume loop: the records it reads and produces,
//! the work it decides for each, what processing one leads to, which
//! partition a record came from, which offsets a batch took, and under
//! which assignment it read them.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use crate::core::dead_letter::{Reason, Stage};
use crate::metrics::events::Committed;
use crate::pipeline::gate::HeldBytes;
use crate::task::{Millis, Task, TaskDecodeError};

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

/// Where a consumed record came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    Input,
    Tier(usize),
}

/// A consumed record, detached from the consumer.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub kind: SourceKind,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub timestamp: Option<Millis>,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
}

/// What kind of record an output is, for metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutKind {
    FinboxPredictors,
    SmsExtraction,
    InsightsReady,
    Delay(usize),
    DeadLetter,
}

impl OutKind {
    pub fn label(self) -> &'static str {
        match self {
            OutKind::FinboxPredictors => "finbox_predictors",
            OutKind::SmsExtraction => "sms_extraction",
            OutKind::InsightsReady => "insights_ready",
            OutKind::Delay(_) => "delay",
            OutKind::DeadLetter => "dead_letter",
        }
    }
}

/// A record to produce.
#[derive(Debug, Clone)]
pub struct OutRecord {
    pub kind: OutKind,
    pub topic: String,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
    /// The record's timestamp: for a task record, when its wait began (a
    /// delay tier counts its wait from the timestamp), so that the time
    /// it then waits for its transaction is not added to the wait; `None`
    /// for the producer's clock.
    pub timestamp: Option<Millis>,
}

impl OutRecord {
    /// Drops the key, value and headers once they were handed to the
    /// producer; the kind and topic stay for what is counted on commit.
    pub fn release_payload(&mut self) {
        self.key = None;
        self.value = None;
        self.headers = Vec::new();
    }
}

/// Everything one consumed record leads to.
#[derive(Debug, Default)]
pub struct Processed {
    pub outputs: Vec<OutRecord>,
    /// The dead-letter reasons among the outputs (for the guard).
    pub dead_letters: Vec<(Stage, Reason)>,
    /// Providers that ended `failed` while processing this record. Their
    /// dead letter is written when the user's task finishes (so it holds the
    /// final state and a replay re-asks only the failed provider), but the
    /// guard counts them at once.
    pub failures: Vec<(Stage, Reason)>,
    /// What to count once the batch commits (`metrics::events`).
    pub counted: Vec<Committed>,
    /// The outputs' bytes, counted against `schedule.max_in_flight_bytes`
    /// while they wait for their transaction.
    pub held: Option<HeldBytes>,
}

impl Processed {
    /// Bytes of the outputs (key, value, headers).
    pub fn output_bytes(&self) -> usize {
        self.outputs
            .iter()
            .map(|o| record_size(&o.key, &o.value, &o.headers))
            .sum()
    }
}

/// What a record weighs in memory against `schedule.max_in_flight_bytes`:
/// its key, value and headers.
pub fn record_size(
    key: &Option<Vec<u8>>,
    value: &Option<Vec<u8>>,
    headers: &[(String, Vec<u8>)],
) -> usize {
    key.as_ref().map_or(0, Vec::len)
        + value.as_ref().map_or(0, Vec::len)
        + headers
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum::<usize>()
}

impl Processed {
    pub(crate) fn count(&mut self, event: Committed) {
        self.counted.push(event);
    }

    /// Every event this record's processing leads to once committed: its
    /// own, one per event published, one per dead letter.
    pub fn committed(&self) -> impl Iterator<Item = Committed> + '_ {
        let published = self.outputs.iter().filter_map(|o| match o.kind {
            OutKind::Delay(_) | OutKind::DeadLetter => None,
            k => Some(Committed::Published { kind: k.label() }),
        });
        let dead = self
            .dead_letters
            .iter()
            .map(|(stage, reason)| Committed::DeadLettered {
                stage: stage.as_str(),
                reason: reason.as_str(),
            });
        self.counted.iter().cloned().chain(published).chain(dead)
    }
}

/// A failure that is not the record's fault (the schema registry is down):
/// the batch is retried instead of dead-lettering anything.
#[derive(Debug, thiserror::Error)]
#[error("transient failure: {0}")]
pub struct Transient(pub String);

/// The work to do for one consumed record, decided by the loop.
#[derive(Debug)]
pub enum Job {
    /// An onboarded event from the input topic.
    Input(Incoming),
    /// A task that is due now.
    Due(Incoming, Task),
    /// A task that came back before its due time: send it on.
    Forward(Incoming, Task, usize),
    /// A delay-topic record that is not a task.
    PoisonTask(Incoming, TaskDecodeError),
}

//! The two Kafka clients as the consume loop sees them. The loop owns the
//! exactly-once logic (batches, commit order, aborts, rewinds, holds); these
//! traits are the thin edges it drives, implemented over librdkafka in
//! `kafka.rs` and `transaction.rs`, and in memory by the tests' fakes so the
//! loop can be tried without a broker.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;

use crate::pipeline::kafka::TransactionGate;
use crate::pipeline::record::{BatchOffsets, Epoch, TopicPartition};
use crate::pipeline::worker::{Incoming, OutRecord};

/// What one poll of the consumer gave.
#[derive(Debug)]
pub enum Polled {
    Record(Incoming),
    /// Nothing arrived within the wait (rebalance callbacks may have run).
    Idle,
    /// A consumer error that is not fatal (logged; the loop goes on).
    Error(String),
    /// A fatal consumer error (librdkafka's consumer is unusable from now
    /// on, e.g. a static member fenced by its own instance id): the loop
    /// stops, so the process exits and its replacement joins afresh.
    Fatal(String),
}

/// The consumer of the input and delay topics.
#[async_trait]
pub trait LoopConsumer: Send + Sync + 'static {
    /// Waits up to `wait` for the next record. Every call counts as a poll
    /// for the group (max.poll.interval) and serves rebalance callbacks.
    async fn poll(&self, wait: Duration) -> Polled;
    fn pause(&self, partitions: &[TopicPartition]);
    fn resume(&self, partitions: &[TopicPartition]);
    /// Makes `offset` the next record read from the partition. A partition
    /// no longer assigned is ignored.
    fn seek(&self, tp: &TopicPartition, offset: i64);
    /// Partitions revoked or lost since the last call.
    fn take_revoked(&self) -> Vec<TopicPartition>;
    /// A counter that changes with every assignment change, and the
    /// partitions assigned now with their epochs.
    fn assignment(&self) -> (u64, HashMap<TopicPartition, Epoch>);
    /// The counter alone (cheap: the loop asks after every poll).
    fn assignment_changes(&self) -> u64;
    /// Whether the consumer is in the group and a broker is reachable.
    fn connection(&self) -> (bool, bool);
    /// Unread records per assigned partition, as last reported (statistics).
    fn lag(&self) -> Vec<(TopicPartition, i64)>;
    /// Remembers offsets committed by a transaction (for the lag metrics).
    fn record_committed(&self, offsets: &BatchOffsets);
    /// The group membership to send with a transaction's offsets, taken
    /// now. `None` when the consumer has none at all.
    fn group_token(&self) -> Option<GroupToken>;
    /// Whether every partition of a batch is still assigned under the
    /// epoch the batch read it with; the first one that is not, if any.
    fn still_owned(&self, offsets: &BatchOffsets) -> Result<(), TopicPartition>;
    /// Open while a transaction with consumed offsets is; a revocation
    /// waits for it.
    fn transaction_gate(&self) -> &TransactionGate;
}

/// The consumer's group membership at one moment, as it is sent with a
/// transaction's offsets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Membership {
    pub generation: i32,
    pub member_id: String,
}

impl Membership {
    /// A consumer that left the group (max.poll.interval exceeded, session
    /// lost) has generation -1 and no member id. The broker accepts
    /// transactional offsets with exactly that metadata without any fencing
    /// (it is what clients without group metadata send), so a batch read
    /// before the consumer left would be committed over whatever the
    /// partitions' next reader does: offsets are never sent then.
    pub fn is_member(&self) -> bool {
        self.generation >= 0 && !self.member_id.is_empty()
    }
}

/// What a transaction's offsets are sent with: the membership, and the
/// client's own metadata object carrying exactly it (none in the fakes).
pub struct GroupToken {
    pub membership: Membership,
    pub metadata: Option<std::sync::Arc<rdkafka::consumer::ConsumerGroupMetadata>>,
}

/// Why a transaction did not commit.
#[derive(Debug, Clone, PartialEq)]
pub enum CommitError {
    /// Aborted (or to be aborted): the batch is read and processed again.
    Abortable(String),
    /// The producer cannot go on (fenced, invalid state): stop the process.
    Fatal(String),
}

/// The transactional producer: the steps of one transaction. The protocol
/// (the order of the steps, the fence, the abort) is `transaction::run`,
/// the same for every implementation.
#[async_trait]
pub trait TxnProducer: Send + Sync + 'static {
    async fn begin(&self) -> Result<(), CommitError>;
    /// Queues one record in the open transaction.
    async fn send(&self, record: &OutRecord) -> Result<(), CommitError>;
    /// Adds the consumed offsets to the open transaction; the broker
    /// rejects them when `group` is not the group's current membership.
    async fn send_offsets(
        &self,
        offsets: &BatchOffsets,
        group: &GroupToken,
    ) -> Result<(), CommitError>;
    async fn commit(&self) -> Result<(), CommitError>;
    async fn abort(&self) -> Result<(), CommitError>;
    /// Replaces a producer that failed fatally (after a broker outage the
    /// coordinator may have aborted its transaction and refuse its next
    /// call) with a new one under the same transactional id, whose start
    /// aborts whatever the old one left open. `Fatal` when that fails, or
    /// when renewals come too often to be anything but a lasting problem.
    async fn renew(&self, reason: &str) -> Result<(), CommitError>;
}

//! The two Kafka clients as the consume loop sees them. The loop owns the
//! exactly-once logic (batches, commit order, aborts, rewinds, holds); these
//! traits are the thin edges it drives, implemented over librdkafka in the
//! Kafka wing (`crate::kafka`), and in memory by the tests' fakes
//! (`testing`) so the loop can be tried without a broker.

use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use crate::pipeline::record::{BatchOffsets, Epoch, Incoming, OutRecord, TopicPartition};

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
    /// The group's committed offsets of `partitions` (the next offset to
    /// read), as the coordinator has them now, stable (no transaction's
    /// offsets pending); a partition without any is left out.
    async fn committed(
        &self,
        partitions: &[TopicPartition],
    ) -> Result<HashMap<TopicPartition, i64>, String>;
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
/// client's own handle carrying exactly it, opaque to the loop: the
/// consumer that made it and the producer that sends it agree on its type
/// (none in the fakes).
pub struct GroupToken {
    pub membership: Membership,
    pub handle: Option<Arc<dyn Any + Send + Sync>>,
}

/// Marks the time a transaction with consumed offsets is open, so that a
/// revocation waits for it: the loop commits one batch while it already
/// reads the next, and a partition must not move to another consumer while
/// offsets of it are still in an open transaction (the new owner would read
/// from the old committed offset and process those records a second time).
/// Rebalance callbacks run on the loop's thread inside its poll; the
/// transaction runs on blocking threads of its own, so waiting here cannot
/// hold up what it waits for.
pub struct TransactionGate {
    open: Mutex<bool>,
    closed: Condvar,
    /// The longest a revocation waits (beyond it the transaction times out
    /// on the broker anyway).
    patience: Duration,
}

/// An open transaction; dropping it closes the gate.
pub struct OpenTransaction<'a>(&'a TransactionGate);

impl TransactionGate {
    pub fn new(patience: Duration) -> TransactionGate {
        TransactionGate {
            open: Mutex::new(false),
            closed: Condvar::new(),
            patience,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, bool> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn open(&self) -> OpenTransaction<'_> {
        *self.lock() = true;
        OpenTransaction(self)
    }

    pub fn is_open(&self) -> bool {
        *self.lock()
    }

    /// Blocks until no transaction is open, or `patience` has passed;
    /// returns whether it closed in time.
    pub fn wait_closed(&self) -> bool {
        let guard = self.lock();
        let (guard, _) = self
            .closed
            .wait_timeout_while(guard, self.patience, |open| *open)
            .unwrap_or_else(|p| p.into_inner());
        !*guard
    }
}

impl Drop for OpenTransaction<'_> {
    fn drop(&mut self) {
        *self.0.lock() = false;
        self.0.closed.notify_all();
    }
}

/// Why a transaction did not commit.
#[derive(Debug, Clone, PartialEq)]
pub enum CommitError {
    /// Aborted (or to be aborted): the batch is read and processed again.
    Abortable(String),
    /// The producer cannot go on (fenced, invalid state): stop the process.
    Fatal(String),
    /// A call was given up on: it hung while the brokers answered (a
    /// librdkafka transaction call can wait on a coordinator that is gone
    /// after a broker restart). Whether the transaction committed is not
    /// known until the producer is replaced.
    Abandoned(String),
    /// After `Abandoned`: the producer was replaced, which settled the
    /// transaction one way or the other, and these are the group's
    /// committed offsets of the batch's partitions now (the next offset to
    /// read), which tell which.
    Settled {
        reason: String,
        committed: HashMap<TopicPartition, i64>,
    },
}

impl CommitError {
    /// What went wrong, whatever the kind.
    pub fn reason(&self) -> &str {
        match self {
            CommitError::Abortable(r) | CommitError::Fatal(r) | CommitError::Abandoned(r) => r,
            CommitError::Settled { reason, .. } => reason,
        }
    }
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

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    #[test]
    fn a_revocation_waits_until_the_open_transaction_ends() {
        let gate = Arc::new(TransactionGate::new(Duration::from_secs(10)));
        let open = gate.open();
        assert!(gate.is_open());
        let waiter = {
            let gate = gate.clone();
            std::thread::spawn(move || {
                let began = Instant::now();
                (gate.wait_closed(), began.elapsed())
            })
        };
        std::thread::sleep(Duration::from_millis(200));
        drop(open);
        let (closed, waited) = waiter.join().unwrap();
        assert!(closed);
        assert!(
            waited >= Duration::from_millis(150),
            "waited only {waited:?}"
        );
        assert!(!gate.is_open());
    }

    #[test]
    fn a_revocation_stops_waiting_after_the_patience() {
        let gate = TransactionGate::new(Duration::from_millis(100));
        let _open = gate.open();
        let began = Instant::now();
        assert!(!gate.wait_closed());
        assert!(began.elapsed() >= Duration::from_millis(100));
    }

    #[test]
    fn with_no_transaction_open_nothing_waits() {
        let gate = TransactionGate::new(Duration::from_secs(60));
        let began = Instant::now();
        assert!(gate.wait_closed());
        assert!(began.elapsed() < Duration::from_secs(1));
    }
}

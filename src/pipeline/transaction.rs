//! One batch's Kafka transaction: the protocol (begin, produce every
//! output, check that the consumer still owns what the batch read, send the
//! consumed offsets, commit; or abort), the same over every implementation
//! of the ports.

use crate::pipeline::ports::{CommitError, LoopConsumer, TxnProducer};
use crate::pipeline::record::{BatchOffsets, Processed};

/// Commits one batch exactly once, or not at all: every output of
/// `processed` and the consumed `offsets` in one transaction. The offsets
/// are sent only while the consumer is a group member and still owns every
/// partition under the epoch the batch read it with; otherwise, and on any
/// abortable error, the transaction is aborted and `Abortable` returned.
pub async fn run(
    producer: &dyn TxnProducer,
    consumer: &dyn LoopConsumer,
    processed: &mut [Processed],
    offsets: &BatchOffsets,
) -> Result<(), CommitError> {
    let gate = consumer.transaction_gate();
    let _open = gate.open();
    match steps(producer, consumer, processed, offsets).await {
        Err(CommitError::Abortable(reason)) => match producer.abort().await {
            Ok(()) => Err(CommitError::Abortable(reason)),
            // Aborting, the transaction cannot have committed.
            Err(e) => renewed(producer, format!("abort failed: {}", e.reason())).await,
        },
        Err(CommitError::Fatal(e)) => renewed(producer, e).await,
        Err(CommitError::Abandoned(e)) => settled(producer, consumer, offsets, e).await,
        other => other,
    }
}

/// After a call was given up on: a new producer under the same
/// transactional id settles the old one's transaction (its start waits
/// until the coordinator has committed or aborted it), and the group's
/// committed offsets then say which (`Settled`). `Fatal` when either
/// fails: a restart reads from the committed offsets too.
async fn settled(
    producer: &dyn TxnProducer,
    consumer: &dyn LoopConsumer,
    offsets: &BatchOffsets,
    reason: String,
) -> Result<(), CommitError> {
    if let Err(e) = producer.renew(&reason).await {
        return Err(CommitError::Fatal(format!(
            "{reason}; replacing the producer failed: {}",
            e.reason()
        )));
    }
    let partitions: Vec<_> = offsets.keys().cloned().collect();
    match consumer.committed(&partitions).await {
        Ok(committed) => Err(CommitError::Settled {
            reason: format!("{reason} (the transactional producer was replaced)"),
            committed,
        }),
        Err(e) => Err(CommitError::Fatal(format!(
            "{reason}; the producer was replaced, but the committed offsets could not be read: {e}"
        ))),
    }
}

/// After a fatal producer error: the batch is not committed either way;
/// with a new producer it is read again (`Abortable`), without one the
/// process stops (`Fatal`).
async fn renewed(producer: &dyn TxnProducer, reason: String) -> Result<(), CommitError> {
    match producer.renew(&reason).await {
        Ok(()) => Err(CommitError::Abortable(format!(
            "{reason} (the transactional producer was replaced)"
        ))),
        Err(e) => Err(CommitError::Fatal(format!(
            "{reason}; replacing the producer failed: {}",
            e.reason()
        ))),
    }
}

async fn steps(
    producer: &dyn TxnProducer,
    consumer: &dyn LoopConsumer,
    processed: &mut [Processed],
    offsets: &BatchOffsets,
) -> Result<(), CommitError> {
    producer.begin().await?;
    for p in processed {
        for o in &mut p.outputs {
            producer.send(o).await?;
            // The producer holds its own copy now; ours would double what a
            // transaction in flight keeps in memory.
            o.release_payload();
        }
        // `p.held` stays counted until the transaction ends: the
        // producer's copy is in memory until then.
    }
    let Some(group) = consumer.group_token() else {
        return Err(CommitError::Abortable("no consumer group metadata".into()));
    };
    if !group.membership.is_member() {
        return Err(CommitError::Abortable(
            "the consumer is not a member of its group (it left or was removed); \
             the batch will be read again"
                .into(),
        ));
    }
    if let Err(tp) = consumer.still_owned(offsets) {
        return Err(CommitError::Abortable(format!(
            "{tp} was revoked since the batch read it"
        )));
    }
    producer.send_offsets(offsets, &group).await?;
    producer.commit().await
}

//! One batch's Kafka transaction: the protocol (begin, produce every
//! output, check that the consumer still owns what the batch read, send the
//! consumed offsets, commit; or abort), and its implementation over
//! librdkafka, where each blocking call runs off the runtime under a
//! deadline of our own and its error is sorted into what can be aborted and
//! retried and what must stop the process.

use std::time::Duration;

use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};

use crate::pipeline::ports::{CommitError, GroupToken, LoopConsumer, TxnProducer};
use crate::pipeline::record::BatchOffsets;
use crate::pipeline::worker::{OutRecord, Processed};

/// Commits one batch exactly once, or not at all: every output of
/// `processed` and the consumed `offsets` in one transaction. The offsets
/// are sent only while the consumer is a group member and still owns every
/// partition under the epoch the batch read it with; otherwise, and on any
/// abortable error, the transaction is aborted and `Abortable` returned.
pub async fn run(
    producer: &dyn TxnProducer,
    consumer: &dyn LoopConsumer,
    processed: &[Processed],
    offsets: &BatchOffsets,
) -> Result<(), CommitError> {
    let gate = consumer.transaction_gate();
    let _open = gate.open();
    match steps(producer, consumer, processed, offsets).await {
        Err(CommitError::Abortable(reason)) => match producer.abort().await {
            Ok(()) => Err(CommitError::Abortable(reason)),
            Err(CommitError::Abortable(e)) | Err(CommitError::Fatal(e)) => {
                Err(CommitError::Fatal(format!("abort failed: {e}")))
            }
            Err(timeout) => Err(timeout),
        },
        other => other,
    }
}

async fn steps(
    producer: &dyn TxnProducer,
    consumer: &dyn LoopConsumer,
    processed: &[Processed],
    offsets: &BatchOffsets,
) -> Result<(), CommitError> {
    producer.begin().await?;
    for p in processed {
        for o in &p.outputs {
            producer.send(o).await?;
        }
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

/// The transactional producer over librdkafka.
pub struct KafkaTransactions {
    pub producer: FutureProducer,
    pub timeout: Duration,
}

#[async_trait::async_trait]
impl TxnProducer for KafkaTransactions {
    async fn begin(&self) -> Result<(), CommitError> {
        let p = self.producer.clone();
        blocking(self.timeout, move || p.begin_transaction()).await
    }

    async fn send(&self, o: &OutRecord) -> Result<(), CommitError> {
        let mut headers = OwnedHeaders::new_with_capacity(o.headers.len());
        for (k, v) in &o.headers {
            headers = headers.insert(Header {
                key: k,
                value: Some(v.as_slice()),
            });
        }
        loop {
            let mut record: FutureRecord<'_, [u8], [u8]> =
                FutureRecord::to(&o.topic).headers(headers.clone());
            if let Some(k) = &o.key {
                record = record.key(k.as_slice());
            }
            if let Some(v) = &o.value {
                record = record.payload(v.as_slice());
            }
            match self.producer.send_result(record) {
                // Delivery is confirmed by commit_transaction, which fails if
                // any record of the transaction failed.
                Ok(_delivery) => return Ok(()),
                Err((
                    KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull),
                    _,
                )) => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((e, _)) => {
                    return Err(CommitError::Abortable(format!(
                        "produce to {}: {e}",
                        o.topic
                    )))
                }
            }
        }
    }

    async fn send_offsets(
        &self,
        offsets: &BatchOffsets,
        group: &GroupToken,
    ) -> Result<(), CommitError> {
        let mut tpl = TopicPartitionList::new();
        for (tp, read) in offsets {
            tpl.add_partition_offset(&tp.topic, tp.partition, Offset::Offset(read.range.next()))
                .map_err(|e| CommitError::Fatal(e.to_string()))?;
        }
        let Some(cgm) = group.metadata.clone() else {
            return Err(CommitError::Abortable("no consumer group metadata".into()));
        };
        let p = self.producer.clone();
        let timeout = self.timeout;
        blocking(timeout, move || {
            p.send_offsets_to_transaction(&tpl, &cgm, timeout)
        })
        .await
    }

    async fn commit(&self) -> Result<(), CommitError> {
        let p = self.producer.clone();
        let timeout = self.timeout;
        blocking(timeout, move || p.commit_transaction(timeout)).await
    }

    async fn abort(&self) -> Result<(), CommitError> {
        let p = self.producer.clone();
        let timeout = self.timeout;
        blocking(timeout, move || p.abort_transaction(timeout)).await
    }
}

/// Runs a blocking transactional call off the runtime, with our own
/// deadline (some librdkafka versions ignore the call's timeout), and
/// classifies its error.
async fn blocking<F>(timeout: Duration, f: F) -> Result<(), CommitError>
where
    F: FnOnce() -> Result<(), KafkaError> + Send + 'static,
{
    let guard = timeout + Duration::from_secs(5);
    match tokio::time::timeout(guard, tokio::task::spawn_blocking(f)).await {
        Err(_) => Err(CommitError::Timeout(guard)),
        Ok(Err(join)) => Err(CommitError::Fatal(format!(
            "transaction task failed: {join}"
        ))),
        Ok(Ok(Ok(()))) => Ok(()),
        Ok(Ok(Err(e))) => Err(classify(e)),
    }
}

fn classify(e: KafkaError) -> CommitError {
    if let KafkaError::Transaction(rd) = &e {
        if rd.is_fatal() {
            return CommitError::Fatal(e.to_string());
        }
        if rd.txn_requires_abort() || rd.is_retriable() {
            return CommitError::Abortable(e.to_string());
        }
    }
    match e.rdkafka_error_code() {
        Some(rdkafka::types::RDKafkaErrorCode::Fenced)
        | Some(rdkafka::types::RDKafkaErrorCode::ProducerFenced)
        | Some(rdkafka::types::RDKafkaErrorCode::InvalidTransactionalState)
        | Some(rdkafka::types::RDKafkaErrorCode::InvalidProducerEpoch) => {
            CommitError::Fatal(e.to_string())
        }
        _ => CommitError::Abortable(e.to_string()),
    }
}

//! One batch's Kafka transaction: begin, produce every output, send the
//! consumed offsets, commit; or abort. Each blocking librdkafka call runs
//! off the runtime under a deadline of our own, and its error is sorted
//! into what can be aborted and retried and what must stop the process.

use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};

use crate::pipeline::consume::Offsets;
use crate::pipeline::kafka::PipelineContext;
use crate::pipeline::worker::{OutRecord, Processed};

pub(super) async fn abort(producer: &FutureProducer, timeout: Duration) -> Result<(), CommitError> {
    let producer = producer.clone();
    match blocking(timeout, move || producer.abort_transaction(timeout)).await {
        Ok(()) => Ok(()),
        Err(CommitError::Abortable(e)) | Err(CommitError::Fatal(e)) => {
            Err(CommitError::Fatal(format!("abort failed: {e}")))
        }
        Err(timeout) => Err(timeout),
    }
}

/// One transaction: every output of the batch, then its consumed offsets.
pub(super) async fn commit(
    producer: &FutureProducer,
    consumer: &StreamConsumer<PipelineContext>,
    processed: &[Processed],
    offsets: &Offsets,
    timeout: Duration,
) -> Result<(), CommitError> {
    let p = producer.clone();
    blocking(timeout, move || p.begin_transaction()).await?;
    for p in processed {
        for o in &p.outputs {
            send(producer, o).await?;
        }
    }
    let mut tpl = TopicPartitionList::new();
    for (tp, (_, last)) in offsets {
        tpl.add_partition_offset(&tp.0, tp.1, Offset::Offset(last + 1))
            .map_err(|e| CommitError::Fatal(e.to_string()))?;
    }
    let Some(cgm) = consumer.group_metadata() else {
        return Err(CommitError::Abortable("no consumer group metadata".into()));
    };
    let p = producer.clone();
    blocking(timeout, move || {
        p.send_offsets_to_transaction(&tpl, &cgm, timeout)
    })
    .await?;
    let p = producer.clone();
    blocking(timeout, move || p.commit_transaction(timeout)).await
}

async fn send(producer: &FutureProducer, o: &OutRecord) -> Result<(), CommitError> {
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
        match producer.send_result(record) {
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

#[derive(Debug)]
pub(super) enum CommitError {
    Abortable(String),
    Fatal(String),
    Timeout(Duration),
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

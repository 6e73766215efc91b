//! The transactional producer over librdkafka: the loop's [`TxnProducer`]
//! port. Each blocking call runs off the runtime under a deadline of our
//! own, and its error is sorted into what can be aborted and retried and
//! what must stop the process; a producer that failed fatally is replaced
//! by a new one under the same transactional id.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};

use crate::config::KafkaSettings;
use crate::kafka::settings::{producer_config, transactional_id};
use crate::pipeline::ports::{CommitError, GroupToken, TxnProducer};
use crate::pipeline::record::{BatchOffsets, OutRecord};

/// Builds a transactional producer (not yet initialised).
pub type MakeProducer = Box<dyn Fn() -> Result<FutureProducer, KafkaError> + Send + Sync>;

/// The transactional producer over librdkafka, replaced by a new one with
/// the same transactional id when it fails fatally.
pub struct KafkaTransactions {
    producer: std::sync::RwLock<FutureProducer>,
    make: MakeProducer,
    timeout: Duration,
    /// When the producer was last replaced, newest last.
    renewals: std::sync::Mutex<Vec<std::time::Instant>>,
    /// Set when records of the open transaction failed delivery (timed out
    /// in a broker outage, sequence numbers skipped): librdkafka's
    /// idempotence state then needs a new epoch, which a new producer gets
    /// at once, so the producer is replaced after the abort.
    delivery_failed: std::sync::atomic::AtomicBool,
}

/// More renewals than this within [`RENEWAL_WINDOW`] stop the process: a
/// producer failing fatally again at once (fenced by a live twin with the
/// same transactional id, missing ACLs) is no outage to ride out.
const MAX_RENEWALS: usize = 3;
const RENEWAL_WINDOW: Duration = Duration::from_secs(600);

impl KafkaTransactions {
    /// Builds the producer with `make` and initialises its transactions
    /// (which aborts whatever a predecessor with the same transactional id
    /// left open).
    pub async fn start(make: MakeProducer, timeout: Duration) -> Result<Self, KafkaError> {
        let producer = make()?;
        let p = producer.clone();
        tokio::task::spawn_blocking(move || p.init_transactions(timeout))
            .await
            .map_err(|_| KafkaError::Canceled)??;
        Ok(KafkaTransactions {
            producer: std::sync::RwLock::new(producer),
            make,
            timeout,
            renewals: std::sync::Mutex::new(Vec::new()),
            delivery_failed: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Builds a new producer, initialises it (retried while the brokers
    /// are unreachable, as every call) and puts it in place of the old one.
    async fn replace(&self) -> Result<(), CommitError> {
        let fresh = (self.make)().map_err(|e| CommitError::Fatal(e.to_string()))?;
        let p = fresh.clone();
        let timeout = self.timeout;
        blocking(timeout, fresh.clone(), move || p.init_transactions(timeout)).await?;
        let old = std::mem::replace(
            &mut *self.producer.write().unwrap_or_else(|p| p.into_inner()),
            fresh,
        );
        // The old producer's records belong to a transaction the new one's
        // start aborted; dropping it may wait for its queue, off the runtime.
        tokio::task::spawn_blocking(move || drop(old));
        Ok(())
    }

    /// Builds producers with the pipeline's settings: this instance's
    /// transactional id, the record size limit of `max_message_bytes`.
    pub fn maker(k: &KafkaSettings, max_message_bytes: usize) -> MakeProducer {
        let config = producer_config(
            k,
            &transactional_id(&k.transactional_id_prefix),
            max_message_bytes,
        );
        Box::new(move || config.create())
    }

    /// Flushes what the producer still holds, within `timeout`, and drops
    /// it. Blocking: call it off the async runtime.
    pub fn close(self: Arc<Self>, timeout: Duration) {
        let p = self.producer();
        drop(self);
        let _ = p.flush(timeout);
    }

    /// The producer in use now.
    fn producer(&self) -> FutureProducer {
        self.producer
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

#[async_trait::async_trait]
impl TxnProducer for KafkaTransactions {
    async fn begin(&self) -> Result<(), CommitError> {
        let p = self.producer();
        blocking(self.timeout, p.clone(), move || p.begin_transaction()).await
    }

    async fn send(&self, o: &OutRecord) -> Result<(), CommitError> {
        let mut headers = OwnedHeaders::new_with_capacity(o.headers.len());
        for (k, v) in &o.headers {
            headers = headers.insert(Header {
                key: k,
                value: Some(v.as_slice()),
            });
        }
        let producer = self.producer();
        loop {
            let mut record: FutureRecord<'_, [u8], [u8]> =
                FutureRecord::to(&o.topic).headers(headers.clone());
            if let Some(k) = &o.key {
                record = record.key(k.as_slice());
            }
            if let Some(v) = &o.value {
                record = record.payload(v.as_slice());
            }
            if let Some(ts) = o.timestamp {
                record = record.timestamp(ts);
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
        let Some(cgm) = group
            .handle
            .clone()
            .and_then(|h| h.downcast::<ConsumerGroupMetadata>().ok())
        else {
            return Err(CommitError::Abortable("no consumer group metadata".into()));
        };
        let p = self.producer();
        let timeout = self.timeout;
        blocking(timeout, p.clone(), move || {
            p.send_offsets_to_transaction(&tpl, &cgm, timeout)
        })
        .await
    }

    async fn commit(&self) -> Result<(), CommitError> {
        let p = self.producer();
        let timeout = self.timeout;
        let r = blocking(timeout, p.clone(), move || p.commit_transaction(timeout)).await;
        // A commit fails abortably when records failed delivery.
        if matches!(r, Err(CommitError::Abortable(_))) {
            self.delivery_failed
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        r
    }

    async fn abort(&self) -> Result<(), CommitError> {
        let p = self.producer();
        let timeout = self.timeout;
        blocking(timeout, p.clone(), move || p.abort_transaction(timeout)).await?;
        if self
            .delivery_failed
            .swap(false, std::sync::atomic::Ordering::Relaxed)
        {
            tracing::info!("records of the aborted transaction failed delivery; replacing the producer for a clean start");
            self.replace().await?;
        }
        Ok(())
    }

    async fn renew(&self, reason: &str) -> Result<(), CommitError> {
        {
            let mut renewals = self.renewals.lock().unwrap_or_else(|p| p.into_inner());
            renewals.retain(|at| at.elapsed() < RENEWAL_WINDOW);
            if renewals.len() >= MAX_RENEWALS {
                return Err(CommitError::Fatal(format!(
                    "the transactional producer failed fatally {} times within {}",
                    renewals.len() + 1,
                    humantime::format_duration(RENEWAL_WINDOW)
                )));
            }
            renewals.push(std::time::Instant::now());
        }
        tracing::warn!(error = %reason, "transactional producer failed fatally; replacing it");
        self.delivery_failed
            .store(false, std::sync::atomic::Ordering::Relaxed);
        self.replace().await?;
        tracing::info!("new transactional producer ready; the batch will be read again");
        Ok(())
    }
}

/// Runs a blocking transactional call off the runtime, with our own
/// deadline (some librdkafka versions ignore the call's timeout), and
/// classifies its error. An error librdkafka calls retriable (the call
/// timed out while the brokers were unreachable, the coordinator is
/// moving) is not the transaction's end: the same call is made again, as
/// librdkafka documents, so a broker outage is ridden out however long it
/// lasts. The loop goes on polling meanwhile; once the brokers are back
/// the call completes, or fails abortably if the coordinator aborted the
/// transaction after `transaction.timeout.ms`, and the batch is read again.
///
/// A call still running past its timeout is waited for while the brokers
/// are unreachable (`probe`'s metadata request fails). Once they answer,
/// it gets [`HUNG_GRACE`] more; a call still running then is given up on
/// (`Abandoned`): after a broker restart a call can wait for good on a
/// coordinator that is gone (librdkafka issue 5511), and only a new
/// producer settles its transaction.
async fn blocking<F>(timeout: Duration, probe: FutureProducer, f: F) -> Result<(), CommitError>
where
    F: Fn() -> Result<(), KafkaError> + Send + Sync + 'static,
{
    let f = Arc::new(f);
    let patience = timeout + Duration::from_secs(5);
    let mut retries = 0u32;
    loop {
        let call = f.clone();
        let mut handle = tokio::task::spawn_blocking(move || call());
        let started = std::time::Instant::now();
        let mut brokers_back: Option<Duration> = None;
        let mut warned = false;
        let result = loop {
            let wait = patience.saturating_sub(started.elapsed()).max(PROBE_EVERY);
            if let Ok(r) = tokio::time::timeout(wait, &mut handle).await {
                break r;
            }
            if !warned {
                warned = true;
                tracing::warn!(
                    waited_s = started.elapsed().as_secs(),
                    "kafka transaction call still running (brokers unreachable?); waiting for it"
                );
            }
            if !brokers_answer(&probe).await {
                brokers_back = None;
                continue;
            }
            let waited = started.elapsed();
            let back = *brokers_back.get_or_insert(waited);
            if waited >= back + HUNG_GRACE {
                return Err(CommitError::Abandoned(format!(
                    "a kafka transaction call still running after {} s, {} s of them with the brokers answering",
                    waited.as_secs(),
                    (waited - back).as_secs()
                )));
            }
        };
        let e = match result {
            Err(join) => {
                return Err(CommitError::Fatal(format!(
                    "transaction task failed: {join}"
                )))
            }
            Ok(Ok(())) => {
                if retries > 0 {
                    tracing::info!(retries, "kafka transaction call went through after retries");
                }
                return Ok(());
            }
            Ok(Err(e)) => e,
        };
        if !is_retriable(&e) {
            return Err(classify(e));
        }
        retries += 1;
        tracing::warn!(
            error = %e,
            retries,
            "kafka transaction call failed retriably (brokers unreachable?); calling it again"
        );
        tokio::time::sleep(RETRY_PAUSE).await;
    }
}

/// How often the brokers are asked for metadata while a transactional
/// call runs past its timeout.
const PROBE_EVERY: Duration = Duration::from_secs(5);
/// How long a transactional call may still run once the brokers answer
/// again before it is given up on.
const HUNG_GRACE: Duration = Duration::from_secs(10);

/// Whether a broker answers a metadata request of `producer`'s client
/// within a few seconds.
async fn brokers_answer(producer: &FutureProducer) -> bool {
    let p = producer.clone();
    tokio::task::spawn_blocking(move || {
        p.client()
            .fetch_metadata(None, Duration::from_secs(3))
            .is_ok()
    })
    .await
    .unwrap_or(false)
}

/// Between two tries of a transactional call that failed retriably.
const RETRY_PAUSE: Duration = Duration::from_millis(500);

/// Whether librdkafka says the same transactional call may be made again.
fn is_retriable(e: &KafkaError) -> bool {
    matches!(e, KafkaError::Transaction(rd)
        if rd.is_retriable() && !rd.is_fatal() && !rd.txn_requires_abort())
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

//! `insights-enricher run`: wires configuration, the provider clients, the
//! event codecs, the Kafka clients, the health server and the consume loop,
//! and shuts them down in order.

mod batch;
pub mod consume;
pub mod deadletter;
#[cfg(test)]
mod fake;
pub mod health;
pub mod kafka;
#[cfg(test)]
mod loop_tests;
pub mod ports;
pub mod record;
pub mod topics;
mod transaction;
pub mod worker;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use rdkafka::admin::AdminClient;
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, Producer};
use tokio_util::sync::CancellationToken;

use crate::config::{OutputEncoding, Settings};
use crate::core::tiers::DelayTiers;
use crate::core::Policies;
use crate::events::{InputDecoder, OutputEncoder, RegistryClient};
use crate::metrics::Metrics;
use crate::providers::credeau::CredeauClient;
use crate::providers::finbox::FinboxClient;
use crate::providers::ratelimit::RateLimiter;
use crate::providers::Provider;

use self::consume::{ConsumeLoop, LoopParts, LoopSettings};
use self::deadletter::DeadLetterGuard;
use self::health::Health;
use self::kafka::{base_config, KafkaConsumer, PipelineContext};
use self::transaction::KafkaTransactions;
use self::worker::{OutputTopics, SourceKind, Worker};

/// The codec of everything the service produces, and of the topics it
/// creates for itself. zstd because SMS extraction events are megabytes of
/// text (5,000 SMS a request), where its ratio decides how many fit in one
/// record; on the small records it costs about 4 % of the service's CPU
/// (docs/benchmarks.md, profile).
pub const COMPRESSION: &str = "zstd";

/// The transactional.id of this instance: the prefix plus the pod (or host)
/// name. KIP-447 fences zombies through the consumer group generation, so
/// the id need not follow partitions; keeping it stable across restarts of
/// the same pod lets a restarted process abort its predecessor's open
/// transaction at once (init_transactions) instead of every read_committed
/// consumer waiting for the transaction timeout. Two live processes must
/// never share an id: pod names are unique; on one host, give each process
/// its own `kafka.transactional_id_prefix`.
/// Without a pod or host name, a random suffix keeps two processes apart
/// (a restart then waits for the transaction timeout instead).
fn transactional_id(prefix: &str) -> String {
    let instance = instance_name()
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string()[..12].to_string());
    format!("{prefix}-{instance}")
}

/// The pod (or host) name this process runs as, if it has one.
fn instance_name() -> Option<String> {
    std::env::var("POD_NAME")
        .or_else(|_| std::env::var("HOSTNAME"))
        .ok()
        .filter(|s| !s.is_empty())
}

/// Runs a start-up step, or gives up on it when SIGTERM comes first
/// (`None`): the blocking steps of start-up hold nothing that needs closing,
/// and their threads end by themselves within their own timeouts.
async fn unless_stopped<T>(
    shutdown: &CancellationToken,
    step: &str,
    fut: impl std::future::Future<Output = T>,
) -> Option<T> {
    tokio::select! {
        r = fut => Some(r),
        _ = shutdown.cancelled() => {
            tracing::info!(step, "stopped during start-up");
            None
        }
    }
}

/// Runs the service until `shutdown` is cancelled (SIGTERM) or a fatal
/// error. Returns an error naming what failed.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::new(settings.server.stall_timeout));
    let server_stop = CancellationToken::new();
    let (server, server_addr) = health::serve(
        &settings.server.listen,
        metrics.clone(),
        health.clone(),
        server_stop.clone(),
    )
    .await
    .with_context(|| format!("server.listen: cannot listen on {}", settings.server.listen))?;
    tracing::info!(listen = %server_addr, "metrics and health server up");

    let tiers = DelayTiers::new(&settings.schedule.delay_tiers);
    let k = &settings.kafka;

    let probe_settings = k.clone();
    let check = tokio::task::spawn_blocking(move || {
        kafka::check_connection(&probe_settings, Duration::from_secs(30))
    });
    let Some(checked) = unless_stopped(&shutdown, "the start-up connection check", check).await
    else {
        server_stop.cancel();
        return Ok(());
    };
    checked.context("kafka connection check task")??;

    if settings.topics.create {
        let admin: AdminClient<DefaultClientContext> = base_config(k)
            .create()
            .context("kafka: cannot create admin client")?;
        topics::create_topics(&admin, &settings, &tiers)
            .await
            .context("topics.create")?;
    }
    let probe: BaseConsumer = base_config(k)
        .create()
        .context("kafka: cannot create client")?;
    let total_partitions = {
        let s = settings.clone();
        let t = tiers.clone();
        // Right after creating topics a broker's metadata may not list them
        // yet: retry briefly before calling a topic missing.
        let patience = if settings.topics.create {
            Duration::from_secs(20)
        } else {
            Duration::ZERO
        };
        tokio::task::spawn_blocking(move || {
            let started = std::time::Instant::now();
            loop {
                match topics::check_topics(&probe, &s, &t, Duration::from_secs(30)) {
                    Err(topics::TopicError::Missing(_)) if started.elapsed() < patience => {
                        std::thread::sleep(Duration::from_millis(250));
                    }
                    other => return other,
                }
            }
        })
        .await
        .context("topic check task")?
        .context("kafka topics")?
    };

    let registry = if settings.encoding.schema_registry_url.is_empty() {
        None
    } else {
        Some(Arc::new(
            RegistryClient::new(&settings.encoding.schema_registry_url)
                .context("encoding.schema_registry_url")?,
        ))
    };
    let decoder = Arc::new(
        InputDecoder::new(settings.encoding.input, registry.clone())
            .with_max_input_bytes(settings.encoding.max_input_bytes),
    );
    let encoder = Arc::new(
        OutputEncoder::new(
            settings.encoding.output,
            if settings.encoding.output == OutputEncoding::Avro {
                registry.clone()
            } else {
                None
            },
            &settings.topics,
        )
        .await
        .context("output schemas")?,
    );

    let finbox_limit = Arc::new(RateLimiter::new(
        Provider::Finbox,
        settings.finbox.rate_limit_per_minute,
        metrics.clone(),
    ));
    let credeau_limit = Arc::new(RateLimiter::new(
        Provider::Credeau,
        settings.credeau.rate_limit_per_minute,
        metrics.clone(),
    ));
    let finbox = Arc::new(
        FinboxClient::new(&settings.finbox, finbox_limit.clone(), metrics.clone())
            .context("finbox client")?,
    );
    let credeau = Arc::new(
        CredeauClient::new(&settings.credeau, credeau_limit.clone(), metrics.clone())
            .context("credeau client")?,
    );

    let tier_topics = tiers.topics(&settings.topics.delay_prefix);
    let mut topic_kinds: HashMap<String, SourceKind> = HashMap::new();
    topic_kinds.insert(settings.topics.input.clone(), SourceKind::Input);
    for (i, t) in tier_topics.iter().enumerate() {
        topic_kinds.insert(t.clone(), SourceKind::Tier(i));
    }

    let ctx = PipelineContext::new(
        metrics.clone(),
        tier_topics.iter().cloned().collect::<HashSet<_>>(),
        k.transaction_timeout,
    );
    let mut consumer_config = base_config(k);
    if k.static_membership {
        let instance = instance_name().context(
            "kafka.static_membership needs the pod name in POD_NAME (or HOSTNAME) for group.instance.id",
        )?;
        let id = format!("{}-{instance}", k.transactional_id_prefix);
        tracing::info!(group_instance_id = %id, "static group membership");
        consumer_config.set("group.instance.id", id);
    }
    let consumer: StreamConsumer<PipelineContext> = consumer_config
        .set("group.id", &k.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("isolation.level", "read_committed")
        .set("auto.offset.reset", "earliest")
        .set(
            "partition.assignment.strategy",
            k.partition_assignment.as_librdkafka(),
        )
        .set(
            "session.timeout.ms",
            k.session_timeout.as_millis().to_string(),
        )
        .set(
            "max.poll.interval.ms",
            k.max_poll_interval.as_millis().to_string(),
        )
        .set("statistics.interval.ms", "5000")
        .set("enable.partition.eof", "false")
        // librdkafka reads ahead per partition (by default up to 64 MB and
        // 100k records); waiting users must cost Kafka storage, not memory.
        // A delay tier's head is read and then held until due, so whatever
        // was read ahead behind it sits in memory: 100 records a partition
        // (a fifth of a batch) keep that small while a backlog still fills
        // a batch from the partitions that have one.
        .set("queued.max.messages.kbytes", "8192")
        .set("queued.min.messages", "100")
        // With read-ahead that small the per-partition threshold is often
        // reached, and librdkafka then postpones that partition's next
        // fetch by fetch.queue.backoff.ms (1 s by default): a tier record
        // due now would wait for it. A resumed partition also waits for the
        // fetch in flight, which the broker may hold for fetch.wait.max.ms.
        .set("fetch.queue.backoff.ms", "50")
        .set("fetch.message.max.bytes", "65536")
        .set("fetch.wait.max.ms", "100")
        .create_with_context(ctx)
        .context("kafka: cannot create consumer")?;
    let consumer = Arc::new(consumer);
    let subscribe: Vec<&str> = topic_kinds.keys().map(String::as_str).collect();
    consumer
        .subscribe(&subscribe)
        .context("kafka: cannot subscribe")?;

    let producer: FutureProducer = base_config(k)
        .set(
            "transactional.id",
            transactional_id(&k.transactional_id_prefix),
        )
        .set(
            "transaction.timeout.ms",
            k.transaction_timeout.as_millis().to_string(),
        )
        .set("enable.idempotence", "true")
        .set("compression.type", COMPRESSION)
        .set("linger.ms", "5")
        .set(
            "message.max.bytes",
            (settings.topics.max_message_bytes + 64 * 1024).to_string(),
        )
        .create()
        .context("kafka: cannot create producer")?;
    {
        let p = producer.clone();
        let timeout = k.transaction_timeout;
        let init = tokio::task::spawn_blocking(move || p.init_transactions(timeout));
        let Some(initialised) = unless_stopped(&shutdown, "init_transactions", init).await else {
            server_stop.cancel();
            return Ok(());
        };
        initialised.context("init_transactions task")?.context(
            "kafka: init_transactions (is the broker reachable and are the credentials right?)",
        )?;
    }

    let worker = Arc::new(Worker {
        finbox,
        credeau,
        decoder,
        encoder,
        policies: Policies {
            finbox: settings.finbox.poll_policy(),
            credeau: settings.credeau.poll_policy(),
        },
        tiers: tiers.clone(),
        topics: OutputTopics {
            finbox_predictors: settings.topics.finbox_predictors.clone(),
            sms_extraction: settings.topics.sms_extraction.clone(),
            combined: settings.topics.combined.clone(),
            dead_letter: settings.topics.dead_letter.clone(),
            tiers: tier_topics.clone(),
        },
        max_message_bytes: settings.topics.max_message_bytes,
        record_budget: settings.schedule.record_budget,
        metrics: metrics.clone(),
    });

    let finbox_total = settings.finbox.rate_limit_per_minute;
    let credeau_total = settings.credeau.rate_limit_per_minute;
    let (finbox_share, credeau_share) = (finbox_limit.clone(), credeau_limit.clone());
    let on_share = Box::new(move |share: f64| {
        let part = |total: u32| ((total as f64 * share).floor() as u32).max(1);
        finbox_share.set_rate_per_minute(part(finbox_total));
        credeau_share.set_rate_per_minute(part(credeau_total));
    });
    // A record may need both providers: admit what the slower one serves.
    let admission_rate = Box::new(move || {
        let per_minute = finbox_limit
            .effective_rate_per_minute()
            .min(credeau_limit.effective_rate_per_minute());
        per_minute as f64 / 60.0
    });

    let shutdown_timeout = settings.shutdown.timeout;
    let kafka_consumer = Arc::new(KafkaConsumer {
        consumer: consumer.clone(),
        topic_kinds: topic_kinds.clone(),
    });
    let transactions = Arc::new(KafkaTransactions {
        producer: producer.clone(),
        timeout: k.transaction_timeout,
    });
    let mut consume_loop = ConsumeLoop::new(LoopParts {
        consumer: kafka_consumer,
        producer: transactions,
        worker,
        settings: LoopSettings {
            max_batch: settings.schedule.max_batch,
            batch_linger: settings.schedule.batch_linger,
            max_in_flight: settings.schedule.max_in_flight,
            max_in_flight_bytes: settings.schedule.max_in_flight_bytes,
            record_budget: settings.schedule.record_budget,
            drain_timeout: shutdown_timeout.mul_f64(0.6),
        },
        topic_kinds,
        guard: DeadLetterGuard::new(settings.dead_letter.clone()),
        health: health.clone(),
        metrics: metrics.clone(),
        on_share,
        admission_rate,
        total_partitions,
    });
    tracing::info!(
        input = %settings.topics.input,
        tiers = tier_topics.len(),
        total_partitions,
        "pipeline started"
    );

    let result = consume_loop.run(shutdown.clone()).await;
    health.set_stopping();
    drop(consume_loop);

    // Leaving the group can block for up to session.timeout.ms: do it off
    // the runtime, within the shutdown bound.
    let close = tokio::task::spawn_blocking(move || {
        consumer.unsubscribe();
        drop(consumer);
        let _ = producer.flush(Duration::from_secs(5));
        drop(producer);
    });
    if tokio::time::timeout(shutdown_timeout.mul_f64(0.3), close)
        .await
        .is_err()
    {
        tracing::warn!("closing the Kafka clients took too long; exiting anyway");
    }
    server_stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
    result.map_err(anyhow::Error::from)
}

//! `insights-enricher run`: the [`Pipeline`], which wires configuration,
//! the provider clients, the event codecs, the Kafka clients, the health
//! server and the consume loop, and shuts them down in order.
//!
//! Its lifecycle has three steps:
//!
//! 1. [`Pipeline::build`] starts the metrics and health server, checks that
//!    the brokers answer with the configured security settings, creates
//!    (when asked) and checks the topics, builds the codecs, the rate
//!    limiters and the provider clients, creates and subscribes the
//!    consumer, and creates the transactional producer and initialises its
//!    transactions. Every librdkafka property comes from [`kafka`]. A
//!    SIGTERM during the blocking steps (the connection check,
//!    `init_transactions`) ends start-up cleanly: `build` then returns
//!    `None`. Any error stops the health server and names what failed.
//! 2. [`Pipeline::run`] runs the consume loop until SIGTERM or a fatal
//!    error, then shuts down.
//! 3. The shut-down step (part of `run`) marks the instance not ready,
//!    leaves the group and flushes the producer off the runtime within
//!    part of `shutdown.timeout`, then stops the health server.
//!
//! [`run`] does all three.

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
use rdkafka::producer::Producer;
use tokio::task::JoinHandle;
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
use self::kafka::{KafkaConsumer, PipelineContext};
use self::transaction::{KafkaTransactions, MakeProducer};
use self::worker::{OutputTopics, SourceKind, Worker};

pub use self::kafka::COMPRESSION;

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
/// error: [`Pipeline::build`], then [`Pipeline::run`]. Returns an error
/// naming what failed.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    match Pipeline::build(settings, shutdown).await? {
        Some(pipeline) => pipeline.run().await,
        None => Ok(()),
    }
}

/// The metrics and health server; dropping it stops it (so a start-up
/// step that fails takes it down on the way out).
struct Server {
    task: Option<JoinHandle<()>>,
    stop: CancellationToken,
}

impl Server {
    async fn start(
        settings: &Settings,
        metrics: &Arc<Metrics>,
        health: &Arc<Health>,
    ) -> anyhow::Result<Server> {
        let stop = CancellationToken::new();
        let (task, addr) = health::serve(
            &settings.server.listen,
            metrics.clone(),
            health.clone(),
            stop.clone(),
        )
        .await
        .with_context(|| format!("server.listen: cannot listen on {}", settings.server.listen))?;
        tracing::info!(listen = %addr, "metrics and health server up");
        Ok(Server {
            task: Some(task),
            stop,
        })
    }

    /// Stops the server and waits (briefly) for it to finish.
    async fn stop(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The service, built and ready to consume. See the module docs for its
/// lifecycle.
pub struct Pipeline {
    consume_loop: ConsumeLoop,
    consumer: Arc<StreamConsumer<PipelineContext>>,
    producer: Arc<KafkaTransactions>,
    health: Arc<Health>,
    server: Server,
    shutdown: CancellationToken,
    shutdown_timeout: Duration,
}

/// What the start-up checks of the brokers found.
struct Brokers {
    /// Partitions of every topic the loop consumes.
    total_partitions: usize,
}

impl Pipeline {
    /// Step 1: starts the health server and builds everything the loop
    /// needs (see the module docs). `None` when `shutdown` was cancelled
    /// during start-up; nothing is left running then.
    pub async fn build(
        settings: Settings,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Option<Pipeline>> {
        let metrics = Arc::new(Metrics::new());
        let health = Arc::new(Health::new(settings.server.stall_timeout));
        let server = Server::start(&settings, &metrics, &health).await?;
        let tiers = DelayTiers::new(&settings.schedule.delay_tiers);

        let Some(brokers) = Self::check_brokers(&settings, &tiers, &shutdown).await? else {
            server.stop().await;
            return Ok(None);
        };
        let worker = Self::worker(&settings, &tiers, &metrics).await?;
        let tier_topics = tiers.topics(&settings.topics.delay_prefix);
        let mut topic_kinds: HashMap<String, SourceKind> = HashMap::new();
        topic_kinds.insert(settings.topics.input.clone(), SourceKind::Input);
        for (i, t) in tier_topics.iter().enumerate() {
            topic_kinds.insert(t.clone(), SourceKind::Tier(i));
        }

        let consumer = Self::consumer(&settings, &metrics, &tier_topics, &topic_kinds)?;
        let Some(producer) = Self::transactions(&settings, &shutdown).await? else {
            server.stop().await;
            return Ok(None);
        };

        let shutdown_timeout = settings.shutdown.timeout;
        let (finbox_limit, credeau_limit) = (worker.limits.0.clone(), worker.limits.1.clone());
        let finbox_total = settings.finbox.http.rate_limit_per_minute;
        let credeau_total = settings.credeau.http.rate_limit_per_minute;
        let (finbox_share, credeau_share) = (finbox_limit.clone(), credeau_limit.clone());
        let share_metrics = metrics.clone();
        let on_share: kafka::ShareFn = Arc::new(move |share: f64| {
            // Shares are rounded down, so they never add up to more than
            // the limit. An instance without partitions has no share (its
            // limiter keeps the 1/min floor; it has nothing to call for).
            let part = |total: u32| (total as f64 * share).floor() as u32;
            for (provider, limiter, total) in [
                (Provider::Finbox, &finbox_share, finbox_total),
                (Provider::Credeau, &credeau_share, credeau_total),
            ] {
                limiter.set_rate_per_minute(part(total).max(1));
                share_metrics
                    .rate_limit
                    .with_label_values(&[provider.as_str()])
                    .set(i64::from(part(total)));
            }
        });
        // A record may need both providers: admit what the slower one serves.
        let admission_rate = Box::new(move || {
            let per_minute = finbox_limit
                .effective_rate_per_minute()
                .min(credeau_limit.effective_rate_per_minute());
            per_minute as f64 / 60.0
        });
        consumer
            .context()
            .set_share_hook(brokers.total_partitions, on_share.clone());
        let consume_loop = ConsumeLoop::new(LoopParts {
            consumer: Arc::new(KafkaConsumer {
                consumer: consumer.clone(),
                topic_kinds: topic_kinds.clone(),
            }),
            producer: producer.clone(),
            worker: worker.worker,
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
            total_partitions: brokers.total_partitions,
        });
        tracing::info!(
            input = %settings.topics.input,
            tiers = tier_topics.len(),
            total_partitions = brokers.total_partitions,
            "pipeline started"
        );
        Ok(Some(Pipeline {
            consume_loop,
            consumer,
            producer,
            health,
            server,
            shutdown,
            shutdown_timeout,
        }))
    }

    /// Step 2: consumes until SIGTERM or a fatal error, then shuts down
    /// (step 3). Returns the loop's error, if any.
    pub async fn run(mut self) -> anyhow::Result<()> {
        let result = self.consume_loop.run(self.shutdown.clone()).await;
        self.shut_down().await;
        result.map_err(anyhow::Error::from)
    }

    /// Step 3: not ready any more, leave the group, flush the producer,
    /// stop the health server. Leaving the group can block for up to
    /// session.timeout.ms, so it runs off the runtime, within 30 % of
    /// `shutdown.timeout` (the loop's drain had 60 %).
    async fn shut_down(self) {
        let Pipeline {
            consume_loop,
            consumer,
            producer,
            health,
            server,
            shutdown_timeout,
            ..
        } = self;
        health.set_stopping();
        drop(consume_loop);
        let close = tokio::task::spawn_blocking(move || {
            consumer.unsubscribe();
            drop(consumer);
            let p = producer.producer();
            drop(producer);
            let _ = p.flush(Duration::from_secs(5));
            drop(p);
        });
        if tokio::time::timeout(shutdown_timeout.mul_f64(0.3), close)
            .await
            .is_err()
        {
            tracing::warn!("closing the Kafka clients took too long; exiting anyway");
        }
        server.stop().await;
    }

    /// Connects once (wrong credentials or an untrusted certificate stop
    /// start-up with a message that says so), creates the topics when
    /// `topics.create` is on, and checks that every topic exists. `None`
    /// when SIGTERM came during the connection check.
    async fn check_brokers(
        settings: &Settings,
        tiers: &DelayTiers,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Option<Brokers>> {
        let k = &settings.kafka;
        let probe_settings = k.clone();
        let check = tokio::task::spawn_blocking(move || {
            kafka::check_connection(&probe_settings, Duration::from_secs(30))
        });
        let Some(checked) = unless_stopped(shutdown, "the start-up connection check", check).await
        else {
            return Ok(None);
        };
        checked.context("kafka connection check task")??;

        if settings.topics.create {
            let admin: AdminClient<DefaultClientContext> = kafka::base_config(k)
                .create()
                .context("kafka: cannot create admin client")?;
            topics::create_topics(&admin, settings, tiers)
                .await
                .context("topics.create")?;
        }
        let probe: BaseConsumer = kafka::base_config(k)
            .create()
            .context("kafka: cannot create client")?;
        let s = settings.clone();
        let t = tiers.clone();
        // Right after creating topics a broker's metadata may not list them
        // yet: retry briefly before calling a topic missing.
        let patience = if settings.topics.create {
            Duration::from_secs(20)
        } else {
            Duration::ZERO
        };
        let total_partitions = tokio::task::spawn_blocking(move || {
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
        .context("kafka topics")?;
        Ok(Some(Brokers { total_partitions }))
    }

    /// The codecs, the rate limiters and the provider clients, in the
    /// worker that handles one record.
    async fn worker(
        settings: &Settings,
        tiers: &DelayTiers,
        metrics: &Arc<Metrics>,
    ) -> anyhow::Result<BuiltWorker> {
        let registry = match &settings.encoding.schema_registry_url {
            None => None,
            Some(url) => Some(Arc::new(
                RegistryClient::new(url.as_str()).context("encoding.schema_registry_url")?,
            )),
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
            settings.finbox.http.rate_limit_per_minute,
            metrics.clone(),
        ));
        let credeau_limit = Arc::new(RateLimiter::new(
            Provider::Credeau,
            settings.credeau.http.rate_limit_per_minute,
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
        let t = &settings.topics;
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
                finbox_predictors: t.finbox_predictors.clone(),
                sms_extraction: t.sms_extraction.clone(),
                combined: t.combined.clone(),
                dead_letter: t.dead_letter.clone(),
                tiers: tiers.topics(&t.delay_prefix),
            },
            max_message_bytes: t.max_message_bytes,
            record_budget: settings.schedule.record_budget,
            straggler_wait: settings.schedule.straggler_wait,
            metrics: metrics.clone(),
        });
        Ok(BuiltWorker {
            worker,
            limits: (finbox_limit, credeau_limit),
        })
    }

    /// The consumer, subscribed to the input and every delay tier.
    fn consumer(
        settings: &Settings,
        metrics: &Arc<Metrics>,
        tier_topics: &[String],
        topic_kinds: &HashMap<String, SourceKind>,
    ) -> anyhow::Result<Arc<StreamConsumer<PipelineContext>>> {
        let k = &settings.kafka;
        let ctx = PipelineContext::new(
            metrics.clone(),
            tier_topics.iter().cloned().collect::<HashSet<_>>(),
            k.transaction_timeout,
        );
        let member_id = kafka::static_member_id(k)?;
        if let Some(id) = &member_id {
            tracing::info!(group_instance_id = %id, "static group membership");
        }
        let consumer: StreamConsumer<PipelineContext> =
            kafka::consumer_config(k, member_id.as_deref())
                .create_with_context(ctx)
                .context("kafka: cannot create consumer")?;
        let subscribe: Vec<&str> = topic_kinds.keys().map(String::as_str).collect();
        consumer
            .subscribe(&subscribe)
            .context("kafka: cannot subscribe")?;
        let consumer = Arc::new(consumer);
        crate::users_waiting::spawn(k, metrics.clone(), Arc::downgrade(&consumer));
        Ok(consumer)
    }

    /// The transactional producer, its transactions initialised (which
    /// aborts what a predecessor with the same transactional.id left
    /// open), and able to replace itself with a new one under the same id
    /// after a fatal error. `None` when SIGTERM came first.
    async fn transactions(
        settings: &Settings,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Option<Arc<KafkaTransactions>>> {
        let k = &settings.kafka;
        let config = kafka::producer_config(
            k,
            &kafka::transactional_id(&k.transactional_id_prefix),
            settings.topics.max_message_bytes,
        );
        let make: MakeProducer = Box::new(move || config.create());
        let start = KafkaTransactions::start(make, k.transaction_timeout);
        let Some(started) = unless_stopped(shutdown, "init_transactions", start).await else {
            return Ok(None);
        };
        let transactions = started.context(
            "kafka: init_transactions (is the broker reachable and are the credentials right?)",
        )?;
        Ok(Some(Arc::new(transactions)))
    }
}

/// The worker and the two providers' rate limiters, which the loop
/// resizes to this instance's share of the partitions.
struct BuiltWorker {
    worker: Arc<Worker>,
    limits: (Arc<RateLimiter>, Arc<RateLimiter>),
}

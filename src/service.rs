//! The composition root of `insights-enricher run`: the [`Service`], which
//! wires configuration, the provider clients, the event codecs, the Kafka
//! wing's clients, the health server and the broker-free consume loop of
//! [`crate::pipeline`], and shuts them down in order.
//!
//! Its lifecycle has three steps:
//!
//! 1. [`Service::build`] starts the metrics and health server, checks that
//!    the brokers answer with the configured security settings, creates
//!    (when asked) and checks the topics, builds the codecs, the rate
//!    limiters and the provider clients, creates and subscribes the
//!    consumer, and creates the transactional producer and initialises its
//!    transactions, all through the Kafka wing ([`crate::kafka`]), where
//!    every librdkafka property is set. A SIGTERM during the blocking steps (the
//!    connection check, `init_transactions`) ends start-up cleanly: `build`
//!    then returns `None`. Any error stops the health server and names what
//!    failed.
//! 2. [`Service::run`] runs the consume loop until SIGTERM or a fatal
//!    error, then shuts down.
//! 3. The shut-down step (part of `run`) marks the instance not ready,
//!    leaves the group and flushes the producer off the runtime within
//!    part of `shutdown.timeout`, then stops the health server.
//!
//! [`run`] does all three.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{OutputEncoding, Settings};
use crate::core::tiers::DelayTiers;
use crate::core::Policies;
use crate::events::{InputDecoder, OutputEncoder, RegistryClient};
use crate::kafka::{self, topics, KafkaConsumer, KafkaTransactions};
use crate::metrics::Metrics;
use crate::pipeline::consume::{ConsumeLoop, LoopParts, LoopSettings};
use crate::pipeline::guard::DeadLetterGuard;
use crate::pipeline::health::{self, Health};
use crate::pipeline::parked::ParkedCalls;
use crate::pipeline::record::SourceKind;
use crate::pipeline::share::RateShare;
use crate::pipeline::worker::{OutputTopics, Worker};
use crate::providers::credeau::CredeauClient;
use crate::providers::finbox::FinboxClient;
use crate::providers::ratelimit::RateLimiter;
use crate::providers::Provider;

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
/// error: [`Service::build`], then [`Service::run`]. Returns an error
/// naming what failed.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    match Service::build(settings, shutdown).await? {
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
pub struct Service {
    consume_loop: ConsumeLoop,
    consumer: Arc<KafkaConsumer>,
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

impl Service {
    /// Step 1: starts the health server and builds everything the loop
    /// needs (see the module docs). `None` when `shutdown` was cancelled
    /// during start-up; nothing is left running then.
    pub async fn build(
        settings: Settings,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Option<Service>> {
        let metrics = Arc::new(Metrics::new());
        metrics.export_dead_letter_labels(
            crate::core::dead_letter::label_pairs()
                .into_iter()
                .map(|(stage, reason)| (stage.as_str(), reason.as_str())),
        );
        let health = Arc::new(Health::new(settings.server.stall_timeout));
        let server = Server::start(&settings, &metrics, &health).await?;
        let tiers = DelayTiers::new(&settings.schedule.delay_tiers)
            .holding(crate::pipeline::waiting::WAIT_AHEAD_MS);

        let Some(brokers) = Self::check_brokers(&settings, &tiers, &shutdown).await? else {
            server.stop().await;
            return Ok(None);
        };
        let worker = Self::worker(&settings, &tiers, &metrics).await?;
        let topic_kinds = Self::topic_kinds(&settings, &tiers);
        let consumer = Arc::new(KafkaConsumer::subscribe(
            &settings,
            &metrics,
            &tiers,
            topic_kinds.clone(),
        )?);
        let Some(producer) = Self::transactions(&settings, &shutdown).await? else {
            server.stop().await;
            return Ok(None);
        };

        let share = Self::rate_share(&settings, &worker.limits, brokers.total_partitions);
        consumer.set_rate_share(share.clone());
        let consume_loop = ConsumeLoop::new(LoopParts {
            consumer: consumer.clone(),
            producer: producer.clone(),
            worker: worker.worker,
            settings: LoopSettings::from(&settings),
            topic_kinds,
            guard: DeadLetterGuard::new(settings.dead_letter.clone()),
            health: health.clone(),
            metrics: metrics.clone(),
            share,
            admission_rate: Self::admission_rate(&worker.limits),
        });
        tracing::info!(
            input = %settings.topics.input,
            tiers = tiers.len(),
            total_partitions = brokers.total_partitions,
            "pipeline started"
        );
        Ok(Some(Service {
            consume_loop,
            consumer,
            producer,
            health,
            server,
            shutdown,
            shutdown_timeout: settings.shutdown.timeout,
        }))
    }

    /// Which kind of source each consumed topic is: the input, or a delay
    /// tier by its index.
    fn topic_kinds(settings: &Settings, tiers: &DelayTiers) -> HashMap<String, SourceKind> {
        let mut kinds = HashMap::new();
        kinds.insert(settings.topics.input.clone(), SourceKind::Input);
        for (i, t) in tiers
            .topics(&settings.topics.delay_prefix)
            .into_iter()
            .enumerate()
        {
            kinds.insert(t, SourceKind::Tier(i));
        }
        kinds
    }

    /// This instance's share of the provider rate limits: it resizes both
    /// providers' limiters to the share of `total_partitions` held (each
    /// limiter shows the rate it puts in force, back-off included, in
    /// `insights_rate_limit_per_minute`).
    fn rate_share(
        settings: &Settings,
        limits: &(Arc<RateLimiter>, Arc<RateLimiter>),
        total_partitions: usize,
    ) -> RateShare {
        let (finbox, credeau) = (limits.0.clone(), limits.1.clone());
        let finbox_total = settings.finbox.http.rate_limit_per_minute;
        let credeau_total = settings.credeau.http.rate_limit_per_minute;
        RateShare::new(
            total_partitions,
            Arc::new(move |share: f64| {
                // Shares are rounded down, so they never add up to more than
                // the limit. An instance without partitions has no share: its
                // limiters hand out no permits until it has some again.
                let part = |total: u32| (total as f64 * share).floor() as u32;
                finbox.set_rate_per_minute(part(finbox_total));
                credeau.set_rate_per_minute(part(credeau_total));
            }),
        )
    }

    /// Records per second the provider rate limits serve now, for
    /// admission: a record may need both providers, so the slower one's.
    fn admission_rate(
        limits: &(Arc<RateLimiter>, Arc<RateLimiter>),
    ) -> Box<dyn Fn() -> f64 + Send + Sync> {
        let (finbox, credeau) = (limits.0.clone(), limits.1.clone());
        Box::new(move || {
            let per_minute = finbox
                .effective_rate_per_minute()
                .min(credeau.effective_rate_per_minute());
            per_minute as f64 / 60.0
        })
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
        let Service {
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
            consumer.leave();
            drop(consumer);
            producer.close(Duration::from_secs(5));
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
        let probe_settings = settings.kafka.clone();
        let check = tokio::task::spawn_blocking(move || {
            kafka::check_connection(&probe_settings, Duration::from_secs(30))
        });
        let Some(checked) = unless_stopped(shutdown, "the start-up connection check", check).await
        else {
            return Ok(None);
        };
        checked.context("kafka connection check task")??;

        let total_partitions = topics::prepare(settings, tiers).await?;
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
            Some(url) => {
                let client =
                    RegistryClient::new(url.as_str()).context("encoding.schema_registry_url")?;
                Some(Arc::new(
                    match settings.encoding.schema_registry_credentials() {
                        Some((user, password)) => client.with_basic_auth(user, password),
                        None => client,
                    },
                ))
            }
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
            parked: ParkedCalls::new(settings.schedule.max_in_flight),
            metrics: metrics.clone(),
        });
        Ok(BuiltWorker {
            worker,
            limits: (finbox_limit, credeau_limit),
        })
    }

    /// The transactional producer, its transactions initialised (which
    /// aborts what a predecessor with the same transactional.id left
    /// open), and able to replace itself with a new one under the same id
    /// after a fatal error. `None` when SIGTERM came first.
    async fn transactions(
        settings: &Settings,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Option<Arc<KafkaTransactions>>> {
        let make = KafkaTransactions::maker(&settings.kafka, settings.topics.max_message_bytes);
        let start = KafkaTransactions::start(make, settings.kafka.transaction_timeout);
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

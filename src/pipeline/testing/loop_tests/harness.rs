//! The loop tests' harness: the in-memory broker with the input topic and
//! the delay tiers, the loop over the fake providers, onboarding events,
//! and what the broker holds afterwards.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{InputEncoding, OutputEncoding, Settings};
use crate::core::tiers::DelayTiers;
use crate::core::Policies;
use crate::events::{InputDecoder, OutputEncoder};
use crate::metrics::Metrics;
use crate::pipeline::consume::{ConsumeLoop, LoopError, LoopParts, LoopSettings};
use crate::pipeline::guard::DeadLetterGuard;
use crate::pipeline::health::Health;
use crate::pipeline::parked::ParkedCalls;
use crate::pipeline::record::{SourceKind, TopicPartition};
use crate::pipeline::share::RateShare;
use crate::pipeline::testing::fake::{FakeBroker, FakeProvider};
use crate::pipeline::worker::{now_ms, OutputTopics, Worker};

pub(super) const INPUT: &str = "users.onboarded";
pub(super) const COMBINED: &str = "insights.ready";
pub(super) const INPUT_PARTITIONS: i32 = 4;

pub(super) fn settings() -> Settings {
    let env = [
        ("INSIGHTS__FINBOX__API_KEY", "k"),
        ("INSIGHTS__FINBOX__SERVER_HASH", "h"),
        ("INSIGHTS__CREDEAU__CLIENT_ID", "c"),
        ("INSIGHTS__CREDEAU__AUTH_TOKEN", "t"),
    ];
    Settings::load_from(
        None,
        env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
    )
    .expect("the defaults with the secrets set are valid")
}

pub(super) fn loop_settings() -> LoopSettings {
    LoopSettings {
        max_batch: 500,
        batch_linger: Duration::from_millis(100),
        max_in_flight: 256,
        max_in_flight_bytes: 16 << 20,
        record_budget: Duration::from_secs(15),
        drain_timeout: Duration::from_secs(18),
    }
}

pub(super) struct Harness {
    pub(super) broker: Arc<FakeBroker>,
    pub(super) finbox: Arc<FakeProvider>,
    pub(super) credeau: Arc<FakeProvider>,
    pub(super) shutdown: CancellationToken,
    pub(super) running: JoinHandle<Result<(), LoopError>>,
    pub(super) metrics: Arc<Metrics>,
}

/// The broker with the input topic and the default delay tiers.
pub(super) fn broker(max_poll_interval: Duration) -> Arc<FakeBroker> {
    let s = settings();
    let tiers = DelayTiers::new(&s.schedule.delay_tiers).topics(&s.topics.delay_prefix);
    let mut topics: Vec<(&str, i32, Option<SourceKind>)> =
        vec![(INPUT, INPUT_PARTITIONS, Some(SourceKind::Input))];
    let leaked: Vec<&'static str> = tiers
        .into_iter()
        .map(|t| &*Box::leak(t.into_boxed_str()))
        .collect();
    for (i, t) in leaked.iter().enumerate() {
        topics.push((t, 2, Some(SourceKind::Tier(i))));
    }
    Arc::new(FakeBroker::new(&topics, max_poll_interval))
}

pub(super) async fn start(
    broker: Arc<FakeBroker>,
    finbox: Arc<FakeProvider>,
    credeau: Arc<FakeProvider>,
    ls: LoopSettings,
) -> Harness {
    let s = settings();
    let max = s.topics.max_message_bytes;
    start_with(broker, finbox, credeau, ls, max, s.schedule.straggler_wait).await
}

/// The worker the loop tests run, over the fake providers.
pub(super) async fn worker_for(
    finbox: Arc<FakeProvider>,
    credeau: Arc<FakeProvider>,
    record_budget: Duration,
    max_message_bytes: usize,
    straggler_wait: Duration,
    metrics: Arc<Metrics>,
) -> Worker {
    let s = settings();
    let tiers = DelayTiers::new(&s.schedule.delay_tiers);
    let tier_topics = tiers.topics(&s.topics.delay_prefix);
    let mut topics = s.topics.clone();
    topics.combined = COMBINED.into();
    Worker {
        finbox,
        credeau,
        decoder: Arc::new(InputDecoder::new(InputEncoding::Json, None)),
        encoder: Arc::new(
            OutputEncoder::new(OutputEncoding::Json, None, &topics)
                .await
                .expect("JSON needs no registry"),
        ),
        policies: Policies {
            finbox: s.finbox.poll_policy(),
            credeau: s.credeau.poll_policy(),
        },
        tiers,
        topics: OutputTopics {
            finbox_predictors: topics.finbox_predictors.clone(),
            sms_extraction: topics.sms_extraction.clone(),
            combined: COMBINED.into(),
            dead_letter: topics.dead_letter.clone(),
            tiers: tier_topics,
        },
        max_message_bytes,
        record_budget,
        straggler_wait,
        parked: ParkedCalls::new(64),
        metrics,
    }
}

pub(super) async fn start_with(
    broker: Arc<FakeBroker>,
    finbox: Arc<FakeProvider>,
    credeau: Arc<FakeProvider>,
    ls: LoopSettings,
    max_message_bytes: usize,
    straggler_wait: Duration,
) -> Harness {
    let rate = finbox
        .limiter
        .per_second()
        .min(credeau.limiter.per_second());
    start_admitting(
        broker,
        finbox,
        credeau,
        ls,
        max_message_bytes,
        straggler_wait,
        rate,
    )
    .await
}

/// As [`start_with`], admitting records as if the rate limits served
/// `admission_per_second`.
pub(super) async fn start_admitting(
    broker: Arc<FakeBroker>,
    finbox: Arc<FakeProvider>,
    credeau: Arc<FakeProvider>,
    ls: LoopSettings,
    max_message_bytes: usize,
    straggler_wait: Duration,
    admission_per_second: f64,
) -> Harness {
    let providers = (finbox, credeau);
    let limits = (max_message_bytes, straggler_wait);
    launch(
        broker,
        providers,
        ls,
        limits,
        admission_per_second,
        RateShare::unknown(),
    )
    .await
}

/// `start_with` whose loop applies `share` as it gains and loses
/// partitions.
pub(super) async fn start_sharing(
    broker: Arc<FakeBroker>,
    providers: (Arc<FakeProvider>, Arc<FakeProvider>),
    ls: LoopSettings,
    limits: (usize, Duration),
    share: RateShare,
) -> Harness {
    let rate = providers
        .0
        .limiter
        .per_second()
        .min(providers.1.limiter.per_second());
    launch(broker, providers, ls, limits, rate, share).await
}

/// The loop over the fake broker and providers, admitting records as if
/// the rate limits served `admission_per_second`, applying `share`.
pub(super) async fn launch(
    broker: Arc<FakeBroker>,
    (finbox, credeau): (Arc<FakeProvider>, Arc<FakeProvider>),
    ls: LoopSettings,
    (max_message_bytes, straggler_wait): (usize, Duration),
    admission_per_second: f64,
    share: RateShare,
) -> Harness {
    let s = settings();
    let metrics = Arc::new(Metrics::new());
    let tiers = DelayTiers::new(&s.schedule.delay_tiers);
    let tier_topics = tiers.topics(&s.topics.delay_prefix);
    let mut topic_kinds = HashMap::new();
    topic_kinds.insert(INPUT.to_string(), SourceKind::Input);
    for (i, t) in tier_topics.iter().enumerate() {
        topic_kinds.insert(t.clone(), SourceKind::Tier(i));
    }
    let worker = Arc::new(
        worker_for(
            finbox.clone(),
            credeau.clone(),
            ls.record_budget,
            max_message_bytes,
            straggler_wait,
            metrics.clone(),
        )
        .await,
    );
    let health = Arc::new(Health::new(Duration::from_secs(60)));
    let rate = admission_per_second;
    let mut consume = ConsumeLoop::new(LoopParts {
        consumer: broker.clone(),
        producer: broker.clone(),
        worker,
        settings: ls,
        topic_kinds,
        guard: DeadLetterGuard::new(s.dead_letter.clone()),
        health,
        metrics: metrics.clone(),
        share,
        admission_rate: Box::new(move || rate),
    });
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    let running = tokio::spawn(async move { consume.run(stop).await });
    Harness {
        broker,
        finbox,
        credeau,
        shutdown,
        running,
        metrics,
    }
}

/// Onboarding events for `n` users, spread over the input partitions,
/// onboarded an hour ago (so both providers are due at once).
pub(super) fn onboard(broker: &FakeBroker, prefix: &str, n: usize) -> Vec<String> {
    onboarded_ago(broker, prefix, n, Duration::from_secs(3_600))
}

/// Onboarding events for `n` users onboarded `ago` (in wall-clock time,
/// which paused tests do not advance).
pub(super) fn onboarded_ago(
    broker: &FakeBroker,
    prefix: &str,
    n: usize,
    ago: Duration,
) -> Vec<String> {
    let at = now_ms() - ago.as_millis() as i64;
    (0..n)
        .map(|i| {
            let user = format!("{prefix}-{i}");
            let value = serde_json::json!({
                "event_id": format!("ev-{user}"),
                "user_id": user,
                "onboarded_at": at,
            });
            broker.produce(
                INPUT,
                (i as i32) % INPUT_PARTITIONS,
                &user,
                value.to_string().into_bytes(),
            );
            user
        })
        .collect()
}

/// Combined events per user id.
pub(super) fn combined(broker: &FakeBroker) -> HashMap<String, usize> {
    let mut by_user = HashMap::new();
    for r in broker.read_topic(COMBINED) {
        let user = String::from_utf8(r.key.unwrap_or_default()).unwrap_or_default();
        *by_user.entry(user).or_insert(0) += 1;
    }
    by_user
}

/// Waits (in paused time) until `done`, at most `limit`.
pub(super) async fn wait_for(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let until = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < until {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    done()
}

pub(super) fn input_partitions() -> impl Iterator<Item = TopicPartition> {
    (0..INPUT_PARTITIONS).map(|p| TopicPartition::new(INPUT, p))
}

/// Every user has exactly one combined event, no transaction overlapped
/// another, and the input is committed to its end.
pub(super) fn assert_exactly_once(h: &Harness, users: &[String]) {
    let by_user = combined(&h.broker);
    let missing: Vec<_> = users.iter().filter(|u| !by_user.contains_key(*u)).collect();
    let twice: Vec<_> = by_user.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        missing.is_empty(),
        "{} users without a combined event, e.g. {:?}",
        missing.len(),
        missing.first()
    );
    assert!(
        twice.is_empty(),
        "{} users with more than one, e.g. {:?}",
        twice.len(),
        twice.first()
    );
    assert_eq!(by_user.len(), users.len());
    assert_eq!(h.broker.violations(), Vec::<String>::new());
    for tp in input_partitions() {
        assert_eq!(h.broker.committed(&tp), h.broker.log_end(&tp), "{tp}");
    }
}

pub(super) async fn stop(h: &Harness) {
    h.shutdown.cancel();
}

/// Waits (at most `limit`) until every user has a combined event, then
/// stops the loop; fails naming how many were done.
pub(super) async fn finish(h: &Harness, users: &[String], limit: Duration) {
    let done = wait_for(limit, || combined(&h.broker).len() == users.len()).await;
    stop(h).await;
    assert!(
        done,
        "only {} of {} users done",
        combined(&h.broker).len(),
        users.len()
    );
}

/// The dead letters' stage and error class headers, per user.
pub(super) fn dead_letters(broker: &FakeBroker) -> HashMap<String, (String, String)> {
    let header = |r: &crate::pipeline::testing::fake::Stored, k: &str| {
        r.headers
            .iter()
            .find(|(name, _)| name == k)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default()
    };
    broker
        .read_topic(&settings().topics.dead_letter)
        .iter()
        .map(|r| {
            let user = String::from_utf8(r.key.clone().unwrap_or_default()).unwrap_or_default();
            (user, (header(r, "dlq.stage"), header(r, "dlq.error.class")))
        })
        .collect()
}

/// A provider without a rate limit worth the name, answering after `ms`.
pub(super) fn quick(ms: u64) -> Arc<FakeProvider> {
    Arc::new(FakeProvider::new(60_000, Duration::from_millis(ms)))
}

//! Kafka side of the bench: per-run topic names and service settings, a bulk
//! producer of onboarding events, a read_committed reader that counts what
//! the service publishes, group progress from committed offsets, and the
//! baseline (a bare transactional consume-then-produce loop).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};

/// Partitions of every topic of the bench (input, outputs, delay tiers).
pub const PARTITIONS: i32 = 6;

pub fn bootstrap() -> Result<String> {
    std::env::var("KAFKA_BOOTSTRAP")
        .context("KAFKA_BOOTSTRAP is not set: run scripts/bench.sh, or start a broker with scripts/kafka.sh and export it")
}

pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    )
}

/// Topic and group names of one scenario run.
#[derive(Debug, Clone)]
pub struct Names {
    pub prefix: String,
    pub input: String,
    pub combined: String,
    pub group: String,
}

impl Names {
    pub fn new(scenario: &str) -> Names {
        let prefix = unique(&format!("bench-{scenario}"));
        Names {
            input: format!("{prefix}.onboarded"),
            combined: format!("{prefix}.ready"),
            group: format!("{prefix}.group"),
            prefix,
        }
    }

    pub fn delay_topic(&self, tier: &str) -> String {
        format!("{}.delay.{tier}", self.prefix)
    }

    /// Service settings for this run: production defaults except topic names,
    /// creation of topics, fast group membership and high provider limits
    /// (scenarios override what they measure).
    pub fn service_env(&self, sim_url: &str) -> Result<Vec<(String, String)>> {
        let p = &self.prefix;
        let kv = |k: &str, v: &str| (k.to_string(), v.to_string());
        Ok(vec![
            kv("INSIGHTS__KAFKA__BOOTSTRAP_SERVERS", &bootstrap()?),
            kv("INSIGHTS__KAFKA__GROUP_ID", &self.group),
            kv(
                "INSIGHTS__KAFKA__TRANSACTIONAL_ID_PREFIX",
                &format!("{p}-a"),
            ),
            // The instance name the transactional.id ends with, as a pod's
            // would be: a restarted instance keeps its id and so aborts its
            // predecessor's open transaction at once. Without it the id
            // would end in a random suffix (no POD_NAME or HOSTNAME in the
            // environment) and readers would wait out the transaction
            // timeout after a crash.
            kv("POD_NAME", "bench-0"),
            kv("INSIGHTS__KAFKA__SESSION_TIMEOUT", "6s"),
            kv("INSIGHTS__KAFKA__MAX_POLL_INTERVAL", "30s"),
            kv("INSIGHTS__TOPICS__INPUT", &self.input),
            kv(
                "INSIGHTS__TOPICS__FINBOX_PREDICTORS",
                &format!("{p}.finbox"),
            ),
            kv("INSIGHTS__TOPICS__SMS_EXTRACTION", &format!("{p}.sms")),
            kv("INSIGHTS__TOPICS__COMBINED", &self.combined),
            kv("INSIGHTS__TOPICS__DEAD_LETTER", &format!("{p}.dlq")),
            kv("INSIGHTS__TOPICS__DELAY_PREFIX", &format!("{p}.delay")),
            kv("INSIGHTS__TOPICS__CREATE", "true"),
            kv("INSIGHTS__TOPICS__PARTITIONS", &PARTITIONS.to_string()),
            kv("INSIGHTS__FINBOX__BASE_URL", sim_url),
            kv("INSIGHTS__FINBOX__API_KEY", "sim-finbox-key"),
            kv("INSIGHTS__FINBOX__SERVER_HASH", "sim-server-hash"),
            kv("INSIGHTS__FINBOX__INITIAL_DELAY", "0s"),
            kv("INSIGHTS__FINBOX__RATE_LIMIT_PER_MINUTE", "6000000"),
            kv("INSIGHTS__CREDEAU__BASE_URL", sim_url),
            kv("INSIGHTS__CREDEAU__CLIENT_ID", "sim-client"),
            kv("INSIGHTS__CREDEAU__AUTH_TOKEN", "sim-token"),
            kv("INSIGHTS__CREDEAU__INITIAL_DELAY", "0s"),
            kv("INSIGHTS__CREDEAU__RATE_LIMIT_PER_MINUTE", "6000000"),
            kv("INSIGHTS__SHUTDOWN__TIMEOUT", "10s"),
            kv("INSIGHTS__LOG__LEVEL", "info"),
        ])
    }
}

/// Sets `key` in `env`, replacing an earlier value.
pub fn set_env(env: &mut Vec<(String, String)>, key: &str, value: &str) {
    env.retain(|(k, _)| k != key);
    env.push((key.to_string(), value.to_string()));
}

fn client(extra: &[(&str, &str)]) -> Result<ClientConfig> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap()?);
    for (k, v) in extra {
        c.set(*k, *v);
    }
    Ok(c)
}

/// The delay tiers the bench leaves in force (the defaults).
pub const TIERS: [&str; 9] = ["1s", "5s", "10s", "30s", "1m", "5m", "10m", "30m", "1h"];

/// Creates every topic of a run before the service starts, as production
/// provisions them; the service's own creation then finds them there.
pub async fn create_run_topics(names: &Names) -> Result<()> {
    let p = &names.prefix;
    let mut all = vec![
        names.input.clone(),
        names.combined.clone(),
        format!("{p}.finbox"),
        format!("{p}.sms"),
        format!("{p}.dlq"),
    ];
    all.extend(TIERS.iter().map(|t| names.delay_topic(t)));
    create_topics(&all.iter().map(String::as_str).collect::<Vec<_>>()).await
}

pub async fn create_topics(names: &[&str]) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> = client(&[])?.create()?;
    let topics: Vec<NewTopic<'_>> = names
        .iter()
        .map(|n| NewTopic::new(n, PARTITIONS, TopicReplication::Fixed(1)))
        .collect();
    for r in admin
        .create_topics(topics.iter(), &AdminOptions::new())
        .await?
    {
        if let Err((n, code)) = r {
            if code != RDKafkaErrorCode::TopicAlreadyExists {
                bail!("create topic {n}: {code}");
            }
        }
    }
    Ok(())
}

/// Produces `n` users onboarded now (ids `{prefix}-0`, `{prefix}-1`, ...,
/// with the answer mix's class in front: `super::answers`)
/// to `topic`, off the runtime, and waits until all are acknowledged.
pub async fn produce_users(topic: &str, prefix: &'static str, n: u64) -> Result<u64> {
    let topic = topic.to_string();
    let at = now_ms();
    tokio::task::spawn_blocking(move || {
        produce_all(
            &topic,
            (0..n).map(|i| {
                let id = super::answers::answers().user_id(prefix, i);
                let v = onboarded(&id, at);
                (id, v)
            }),
        )
    })
    .await?
}

/// Produces `values` (keyed by user id) as fast as the broker takes them and
/// waits until all are acknowledged.
pub fn produce_all(topic: &str, records: impl Iterator<Item = (String, Vec<u8>)>) -> Result<u64> {
    let producer: ThreadedProducer<DefaultProducerContext> = client(&[
        ("linger.ms", "5"),
        ("batch.num.messages", "10000"),
        ("queue.buffering.max.messages", "200000"),
        ("compression.type", "lz4"),
    ])?
    .create()?;
    let mut n = 0u64;
    for (key, value) in records {
        let mut rec = BaseRecord::to(topic).key(&key).payload(&value);
        loop {
            match producer.send(rec) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    rec = r;
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err((e, _)) => bail!("produce to {topic}: {e}"),
            }
        }
        n += 1;
    }
    producer.flush(Duration::from_secs(120))?;
    Ok(n)
}

/// An onboarding event as the producing platform sends it.
/// Produces `records` one at a time, `every` apart (a steady arrival
/// rate), each flushed as it goes; returns when each was produced.
pub fn produce_paced(
    topic: &str,
    records: Vec<(String, Vec<u8>)>,
    every: Duration,
) -> Result<HashMap<String, Instant>> {
    let producer: ThreadedProducer<DefaultProducerContext> =
        client(&[("linger.ms", "0"), ("compression.type", "lz4")])?.create()?;
    let began = Instant::now();
    let mut produced = HashMap::new();
    for (i, (key, value)) in records.into_iter().enumerate() {
        let at = began + every * i as u32;
        if let Some(wait) = at.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        producer
            .send(BaseRecord::to(topic).key(&key).payload(&value))
            .map_err(|(e, _)| anyhow::anyhow!("produce: {e}"))?;
        produced.insert(key, Instant::now());
    }
    producer.flush(Duration::from_secs(30))?;
    Ok(produced)
}

pub fn onboarded(user_id: &str, onboarded_at_ms: i64) -> Vec<u8> {
    serde_json::json!({
        "event_id": format!("ev-{user_id}"),
        "user_id": user_id,
        "onboarded_at": onboarded_at_ms,
    })
    .to_string()
    .into_bytes()
}

pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// What a [`Reader`] has seen so far.
#[derive(Debug, Default)]
pub struct Seen {
    pub records: u64,
    pub keys: HashSet<String>,
    /// When each key was first read.
    pub first_seen: HashMap<String, Instant>,
    pub first_at: Option<Instant>,
    pub last_new_key_at: Option<Instant>,
    /// Offsets per partition from which a record counts as "after the mark",
    /// and when the first such record arrived.
    pub mark: Option<(HashMap<i32, i64>, Option<Instant>)>,
}

/// Reads one topic from the beginning, read_committed, in a thread.
pub struct Reader {
    pub seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Reader {
    pub fn start(topic: &str) -> Result<Reader> {
        let consumer: BaseConsumer = client(&[
            ("group.id", &unique("bench-reader")),
            ("isolation.level", "read_committed"),
            ("enable.auto.commit", "false"),
            ("enable.partition.eof", "false"),
        ])?
        .create()?;
        let mut tpl = TopicPartitionList::new();
        for p in 0..PARTITIONS {
            tpl.add_partition_offset(topic, p, Offset::Beginning)?;
        }
        consumer.assign(&tpl)?;
        let seen = Arc::new(Mutex::new(Seen::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (seen.clone(), stop.clone());
        let handle = std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) else {
                    continue;
                };
                let now = Instant::now();
                let key = m
                    .key()
                    .map(|k| String::from_utf8_lossy(k).into_owned())
                    .unwrap_or_default();
                let Ok(mut g) = s.lock() else { return };
                g.records += 1;
                g.first_at.get_or_insert(now);
                if g.keys.insert(key.clone()) {
                    g.last_new_key_at = Some(now);
                    g.first_seen.insert(key, now);
                }
                let (p, o) = (m.partition(), m.offset());
                if let Some((marks, first)) = g.mark.as_mut() {
                    if first.is_none() && marks.get(&p).is_some_and(|m| o >= *m) {
                        *first = Some(now);
                    }
                }
            }
        });
        Ok(Reader {
            seen,
            stop,
            handle: Some(handle),
        })
    }

    pub fn distinct(&self) -> usize {
        self.seen.lock().map(|g| g.keys.len()).unwrap_or(0)
    }

    pub fn records(&self) -> u64 {
        self.seen.lock().map(|g| g.records).unwrap_or(0)
    }

    /// Waits until `n` distinct keys were read; fails after `idle` without a
    /// new one, or when `alive` fails.
    pub async fn wait_distinct(
        &self,
        n: usize,
        idle: Duration,
        mut alive: impl FnMut() -> Result<()>,
    ) -> Result<()> {
        let mut last = (self.distinct(), Instant::now());
        loop {
            let d = self.distinct();
            if d >= n {
                return Ok(());
            }
            if d != last.0 {
                last = (d, Instant::now());
            } else if last.1.elapsed() > idle {
                bail!("only {d} of {n} distinct records after {idle:?} without progress");
            }
            alive()?;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// High watermarks of every partition of `topic`.
pub fn end_offsets(topic: &str) -> Result<HashMap<i32, i64>> {
    let consumer: BaseConsumer = client(&[("group.id", &unique("bench-meta"))])?.create()?;
    let mut out = HashMap::new();
    for p in 0..PARTITIONS {
        let (_, hi) = consumer.fetch_watermarks(topic, p, Duration::from_secs(30))?;
        out.insert(p, hi);
    }
    Ok(out)
}

/// [`end_offsets`], retried a few times: a busy broker may time out.
pub fn end_offsets_retrying(topic: &str) -> Result<HashMap<i32, i64>> {
    let mut last = None;
    for _ in 0..5 {
        match end_offsets(topic) {
            Ok(o) => return Ok(o),
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("end offsets of {topic}")))
}

/// Records of `topic` the group has committed past (sum over partitions).
pub fn committed_total(topic: &str, group: &str) -> Result<i64> {
    let consumer: BaseConsumer = client(&[("group.id", group)])?.create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition(topic, p);
    }
    let got = consumer.committed_offsets(tpl, Duration::from_secs(30))?;
    Ok(got
        .elements()
        .iter()
        .map(|e| match e.offset() {
            Offset::Offset(o) => o,
            _ => 0,
        })
        .sum())
}

/// The baseline: consume `input` in a group, and per batch (up to
/// `max_batch` records or `linger`) produce three records per input record
/// and commit them with the consumed offsets in one transaction, like the
/// service does, without any HTTP. Runs until `stop`.
pub fn baseline_loop(
    input: &str,
    outputs: [String; 3],
    group: &str,
    max_batch: usize,
    linger: Duration,
    stop: Arc<AtomicBool>,
    joined: Arc<AtomicBool>,
) -> Result<u64> {
    let consumer: BaseConsumer = client(&[
        ("group.id", group),
        ("isolation.level", "read_committed"),
        ("enable.auto.commit", "false"),
        ("auto.offset.reset", "earliest"),
    ])?
    .create()?;
    // A broker started moments ago may not have its transaction coordinator
    // loaded yet ("not coordinator"): retry with a fresh producer.
    let mut attempt = 0;
    let producer: ThreadedProducer<DefaultProducerContext> = loop {
        let p: ThreadedProducer<DefaultProducerContext> = client(&[
            ("transactional.id", &unique("bench-baseline")),
            ("linger.ms", "5"),
        ])?
        .create()?;
        match p.init_transactions(Duration::from_secs(30)) {
            Ok(()) => break p,
            Err(e) if attempt < 10 => {
                attempt += 1;
                eprintln!("baseline: init_transactions failed ({e}), retrying");
                std::thread::sleep(Duration::from_secs(2));
            }
            Err(e) => return Err(e.into()),
        }
    };
    consumer.subscribe(&[input])?;
    let mut processed = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let mut batch = Vec::new();
        let mut linger_end: Option<Instant> = None;
        while batch.len() < max_batch {
            let wait = match linger_end {
                None => Duration::from_millis(100),
                Some(end) => end.saturating_duration_since(Instant::now()),
            };
            if linger_end.is_some() && wait.is_zero() {
                break;
            }
            match consumer.poll(wait) {
                Some(Ok(m)) => {
                    batch.push((
                        m.partition(),
                        m.offset(),
                        m.key().map(<[u8]>::to_vec),
                        m.payload().map(<[u8]>::to_vec),
                    ));
                    linger_end.get_or_insert(Instant::now() + linger);
                }
                Some(Err(e)) => bail!("baseline consumer: {e}"),
                None => {
                    if !consumer.assignment()?.elements().is_empty() {
                        joined.store(true, Ordering::Relaxed);
                    }
                    if linger_end.is_none() {
                        break;
                    }
                }
            }
        }
        if batch.is_empty() {
            continue;
        }
        producer.begin_transaction()?;
        let mut next: HashMap<i32, i64> = HashMap::new();
        for (p, o, key, value) in &batch {
            for topic in &outputs {
                let mut rec: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(topic);
                if let Some(k) = key {
                    rec = rec.key(k.as_slice());
                }
                if let Some(v) = value {
                    rec = rec.payload(v.as_slice());
                }
                loop {
                    match producer.send(rec) {
                        Ok(()) => break,
                        Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                            rec = r;
                            std::thread::sleep(Duration::from_millis(2));
                        }
                        Err((e, _)) => bail!("baseline produce: {e}"),
                    }
                }
            }
            let e = next.entry(*p).or_insert(0);
            *e = (*e).max(o + 1);
        }
        let mut tpl = TopicPartitionList::new();
        for (p, o) in &next {
            tpl.add_partition_offset(input, *p, Offset::Offset(*o))?;
        }
        let cgm = consumer
            .group_metadata()
            .context("baseline: no group metadata")?;
        producer.send_offsets_to_transaction(&tpl, &cgm, Duration::from_secs(30))?;
        producer.commit_transaction(Duration::from_secs(30))?;
        processed += batch.len() as u64;
    }
    Ok(processed)
}

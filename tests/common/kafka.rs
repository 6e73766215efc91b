//! The test run's broker: unique topic names, an admin client, producing
//! onboarding events, and reading topics back independently (Python's
//! confluent-kafka, read_committed) or checking a group's commits.

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use super::{bootstrap, python, repo_root, unique};

/// The topic names of one test's pipeline.
#[derive(Debug, Clone)]
pub struct Topics {
    pub prefix: String,
    pub input: String,
    pub finbox: String,
    pub sms: String,
    pub combined: String,
    pub dlq: String,
    pub delay_prefix: String,
}

impl Topics {
    pub fn new(test: &str) -> Topics {
        let p = unique(test);
        Topics {
            input: format!("{p}.onboarded"),
            finbox: format!("{p}.finbox"),
            sms: format!("{p}.sms"),
            combined: format!("{p}.ready"),
            dlq: format!("{p}.dlq"),
            delay_prefix: format!("{p}.delay"),
            prefix: p,
        }
    }

    /// Environment for the service using these topics.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("INSIGHTS__TOPICS__INPUT".into(), self.input.clone()),
            (
                "INSIGHTS__TOPICS__FINBOX_PREDICTORS".into(),
                self.finbox.clone(),
            ),
            ("INSIGHTS__TOPICS__SMS_EXTRACTION".into(), self.sms.clone()),
            ("INSIGHTS__TOPICS__COMBINED".into(), self.combined.clone()),
            ("INSIGHTS__TOPICS__DEAD_LETTER".into(), self.dlq.clone()),
            (
                "INSIGHTS__TOPICS__DELAY_PREFIX".into(),
                self.delay_prefix.clone(),
            ),
        ]
    }
}

pub fn admin() -> AdminClient<DefaultClientContext> {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .create()
        .expect("admin client")
}

pub async fn create_topic(name: &str, partitions: i32) {
    let t = NewTopic::new(name, partitions, TopicReplication::Fixed(1))
        .set("max.message.bytes", "16777216");
    let r = admin()
        .create_topics([&t], &AdminOptions::new())
        .await
        .expect("create topics");
    for x in r {
        if let Err((n, code)) = x {
            if code != rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists {
                panic!("create {n}: {code}");
            }
        }
    }
}

pub fn producer() -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .set("message.max.bytes", "16777216")
        .set("compression.type", "zstd")
        .create()
        .expect("producer")
}

pub async fn produce(p: &FutureProducer, topic: &str, key: Option<&[u8]>, value: Option<&[u8]>) {
    produce_with_headers(p, topic, key, value, &[]).await
}

pub async fn produce_with_headers(
    p: &FutureProducer,
    topic: &str,
    key: Option<&[u8]>,
    value: Option<&[u8]>,
    headers: &[(&str, &str)],
) {
    let headers: Vec<(String, Vec<u8>)> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
        .collect();
    produce_at(p, topic, None, None, key, value, &headers).await;
}

/// Produces one record to an explicit partition (else the partitioner's
/// choice) with an explicit timestamp (else now); returns (partition, offset).
pub async fn produce_at(
    p: &FutureProducer,
    topic: &str,
    partition: Option<i32>,
    timestamp_ms: Option<i64>,
    key: Option<&[u8]>,
    value: Option<&[u8]>,
    headers: &[(String, Vec<u8>)],
) -> (i32, i64) {
    let mut h = OwnedHeaders::new();
    for (k, v) in headers {
        h = h.insert(Header {
            key: k,
            value: Some(v.as_slice()),
        });
    }
    let mut rec: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).headers(h);
    if let Some(n) = partition {
        rec = rec.partition(n);
    }
    if let Some(ts) = timestamp_ms {
        rec = rec.timestamp(ts);
    }
    if let Some(k) = key {
        rec = rec.key(k);
    }
    if let Some(v) = value {
        rec = rec.payload(v);
    }
    let d = p
        .send(rec, Duration::from_secs(30))
        .await
        .map_err(|(e, _)| e)
        .expect("produce");
    (d.partition, d.offset)
}

/// Produces `n` onboarding events for new users named `<prefix><i>-...`
/// (event id `ev-<user>`, keyed by user); returns the user ids.
pub async fn produce_users(topic: &str, prefix: &str, n: usize) -> Vec<String> {
    let p = producer();
    let mut users = Vec::new();
    for i in 0..n {
        let user = format!("{prefix}{i}-{}", unique("u"));
        produce(
            &p,
            topic,
            Some(user.as_bytes()),
            Some(&onboarded_json(&format!("ev-{user}"), &user)),
        )
        .await;
        users.push(user);
    }
    users
}

/// A JSON onboarding event.
pub fn onboarded_json(event_id: &str, user_id: &str) -> Vec<u8> {
    serde_json::json!({
        "event_id": event_id,
        "user_id": user_id,
        "onboarded_at": chrono::Utc::now().timestamp_millis(),
    })
    .to_string()
    .into_bytes()
}

/// One record as read by the independent reader.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct ReadRecord {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    #[serde(default)]
    pub headers: HashMap<String, Option<String>>,
    pub value: serde_json::Value,
    /// The record's timestamp (epoch milliseconds), when it has one.
    #[serde(default)]
    pub timestamp: Option<i64>,
}

/// Reads a whole topic with Python's confluent-kafka (read_committed),
/// waiting until `expect` records are there or `idle` passes with none new.
pub fn read_topic(topic: &str, expect: Option<usize>, idle: Duration) -> Vec<ReadRecord> {
    let mut cmd = Command::new(python());
    cmd.arg(repo_root().join("tests/python/read_topic.py"))
        .arg("--bootstrap")
        .arg(bootstrap())
        .arg("--topic")
        .arg(topic)
        .arg("--idle")
        .arg(format!("{}", idle.as_secs_f64()));
    if let Some(n) = expect {
        cmd.arg("--expect").arg(n.to_string());
    }
    if let Ok(url) = std::env::var("TEST_SCHEMA_REGISTRY") {
        cmd.arg("--registry").arg(url);
    }
    let out = cmd.output().expect("run read_topic.py");
    assert!(
        out.status.success(),
        "read_topic.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad line {l}: {e}")))
        .collect()
}

/// The offset `group` has committed on each partition `0..partitions` of
/// `topic` (None where it has committed none).
pub fn committed_offsets(group: &str, topic: &str, partitions: i32) -> Vec<Option<i64>> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let committed = consumer
        .committed_offsets(tpl, Duration::from_secs(30))
        .expect("committed offsets");
    (0..partitions)
        .map(|p| {
            match committed
                .find_partition(topic, p)
                .expect("partition")
                .offset()
            {
                rdkafka::Offset::Offset(o) => Some(o),
                _ => None,
            }
        })
        .collect()
}

//! Reading the dead-letter topic for the operator tools: a consumer outside
//! any group, read_committed, from a time or offset range to the end as it
//! was when the read started, with filters on the dead-letter headers.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

use crate::config::Settings;
use crate::pipeline::deadletter::headers as h;
use crate::pipeline::kafka::base_config;

/// One dead-letter record as read back.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DlqRecord {
    pub partition: i32,
    pub offset: i64,
    pub timestamp: Option<i64>,
    pub key: Option<String>,
    pub headers: BTreeMap<String, String>,
    #[serde(skip)]
    pub raw_key: Option<Vec<u8>>,
    #[serde(skip)]
    pub value: Option<Vec<u8>>,
}

impl DlqRecord {
    pub fn header(&self, k: &str) -> Option<&str> {
        self.headers.get(k).map(String::as_str)
    }
    pub fn reason(&self) -> &str {
        self.header(h::ERROR_CLASS).unwrap_or("unknown")
    }
    pub fn id(&self, topic: &str) -> String {
        format!("{topic}/{}/{}", self.partition, self.offset)
    }
}

/// Which dead letters to look at.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Filter {
    /// Only this error class (dlq.error.class), e.g. forbidden, unauthorized, malformed_json.
    #[arg(long)]
    pub reason: Option<String>,
    /// Only this provider (finbox or credeau).
    #[arg(long)]
    pub provider: Option<String>,
    /// Only this stage (decode, task_decode, poll_finbox, poll_credeau, publish).
    #[arg(long)]
    pub stage: Option<String>,
    /// Only records dead-lettered at or after this time (RFC 3339, or a
    /// duration ago such as "2h").
    #[arg(long)]
    pub since: Option<String>,
    /// Only records dead-lettered before this time (RFC 3339, or a duration ago).
    #[arg(long)]
    pub until: Option<String>,
    /// Only this partition of the dead-letter topic.
    #[arg(long)]
    pub partition: Option<i32>,
    /// First offset to read (inclusive; with --partition).
    #[arg(long)]
    pub start_offset: Option<i64>,
    /// Last offset to read (inclusive; with --partition).
    #[arg(long)]
    pub end_offset: Option<i64>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("--{flag}: {reason}")]
    BadFlag { flag: &'static str, reason: String },
    #[error("topic {0} does not exist")]
    NoTopic(String),
}

pub fn parse_time(flag: &'static str, s: &str, now_ms: i64) -> Result<i64, ReadError> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(t.timestamp_millis());
    }
    match humantime::parse_duration(s) {
        Ok(d) => Ok(now_ms - d.as_millis() as i64),
        Err(_) => Err(ReadError::BadFlag {
            flag,
            reason: format!("{s:?} is neither an RFC 3339 time nor a duration like 2h"),
        }),
    }
}

impl Filter {
    fn bounds(&self, now_ms: i64) -> Result<(Option<i64>, Option<i64>), ReadError> {
        let since = self
            .since
            .as_deref()
            .map(|s| parse_time("since", s, now_ms))
            .transpose()?;
        let until = self
            .until
            .as_deref()
            .map(|s| parse_time("until", s, now_ms))
            .transpose()?;
        if (self.start_offset.is_some() || self.end_offset.is_some()) && self.partition.is_none() {
            return Err(ReadError::BadFlag {
                flag: "start-offset",
                reason: "offsets need --partition".into(),
            });
        }
        Ok((since, until))
    }

    pub fn matches(&self, r: &DlqRecord, since: Option<i64>, until: Option<i64>) -> bool {
        let eq = |want: &Option<String>, header: &str| {
            want.as_deref().is_none_or(|w| r.header(header) == Some(w))
        };
        let at = r
            .header(h::FAILED_AT)
            .and_then(|v| v.parse::<i64>().ok())
            .or(r.timestamp)
            .unwrap_or(0);
        eq(&self.reason, h::ERROR_CLASS)
            && eq(&self.provider, h::PROVIDER)
            && eq(&self.stage, h::STAGE)
            && since.is_none_or(|s| at >= s)
            && until.is_none_or(|u| at < u)
            && self.end_offset.is_none_or(|e| r.offset <= e)
    }
}

/// A client context that keeps librdkafka's end-of-partition notices (which
/// this reader asks for to know when it is done) out of the log.
struct QuietEof;

impl rdkafka::ClientContext for QuietEof {
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        if !matches!(error, rdkafka::error::KafkaError::PartitionEOF(_)) {
            tracing::warn!(error = %error, reason, "kafka client error");
        }
    }
}

impl rdkafka::consumer::ConsumerContext for QuietEof {}

/// Reads a whole topic (to its end as of now) without a consumer group.
pub fn read_all(
    settings: &Settings,
    topic: &str,
    partition: Option<i32>,
    start_offset: Option<i64>,
    since: Option<i64>,
) -> Result<Vec<DlqRecord>, ReadError> {
    let consumer: BaseConsumer<QuietEof> = base_config(&settings.kafka)
        .set("group.id", "insights-enricher-dlq-tool")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true")
        .create_with_context(QuietEof)?;
    let timeout = Duration::from_secs(15);
    let md = consumer.fetch_metadata(Some(topic), timeout)?;
    let partitions: Vec<i32> = md
        .topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none())
        .map(|t| t.partitions().iter().map(|p| p.id()).collect())
        .unwrap_or_default();
    if partitions.is_empty() {
        return Err(ReadError::NoTopic(topic.to_string()));
    }
    let mut tpl = TopicPartitionList::new();
    let mut ends: HashMap<i32, i64> = HashMap::new();
    for p in partitions
        .into_iter()
        .filter(|p| partition.is_none_or(|w| w == *p))
    {
        let (low, high) = consumer.fetch_watermarks(topic, p, timeout)?;
        if high <= low {
            continue;
        }
        ends.insert(p, high);
        let start = match (start_offset, since) {
            (Some(o), _) => Offset::Offset(o.max(low)),
            (None, Some(ts)) => {
                let mut q = TopicPartitionList::new();
                q.add_partition_offset(topic, p, Offset::Offset(ts))?;
                let found = consumer.offsets_for_times(q, timeout)?;
                found
                    .find_partition(topic, p)
                    .map(|e| e.offset())
                    .filter(|o| matches!(o, Offset::Offset(_)))
                    .unwrap_or(Offset::End)
            }
            (None, None) => Offset::Beginning,
        };
        tpl.add_partition_offset(topic, p, start)?;
    }
    if ends.is_empty() {
        return Ok(vec![]);
    }
    consumer.assign(&tpl)?;
    let mut out = Vec::new();
    let mut done: HashMap<i32, bool> = ends.keys().map(|p| (*p, false)).collect();
    let mut idle_polls = 0;
    while done.values().any(|d| !d) && idle_polls < 20 {
        match consumer.poll(Duration::from_millis(500)) {
            None => idle_polls += 1,
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                done.insert(p, true);
            }
            Some(Err(e)) => return Err(e.into()),
            Some(Ok(m)) => {
                idle_polls = 0;
                let end = ends.get(&m.partition()).copied().unwrap_or(i64::MAX);
                if m.offset() >= end {
                    done.insert(m.partition(), true);
                    continue;
                }
                if m.offset() + 1 >= end {
                    done.insert(m.partition(), true);
                }
                let headers = m
                    .headers()
                    .map(|hs| {
                        hs.iter()
                            .map(|x| {
                                (
                                    x.key.to_string(),
                                    String::from_utf8_lossy(x.value.unwrap_or_default())
                                        .into_owned(),
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                out.push(DlqRecord {
                    partition: m.partition(),
                    offset: m.offset(),
                    timestamp: m.timestamp().to_millis(),
                    key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                    headers,
                    raw_key: m.key().map(<[u8]>::to_vec),
                    value: m.payload().map(<[u8]>::to_vec),
                });
            }
        }
    }
    out.sort_by_key(|r| (r.partition, r.offset));
    Ok(out)
}

/// Reads the dead-letter topic and applies the filter.
pub fn read_filtered(settings: &Settings, filter: &Filter) -> Result<Vec<DlqRecord>, ReadError> {
    let now = chrono::Utc::now().timestamp_millis();
    let (since, until) = filter.bounds(now)?;
    let all = read_all(
        settings,
        &settings.topics.dead_letter,
        filter.partition,
        filter.start_offset,
        since,
    )?;
    Ok(all
        .into_iter()
        .filter(|r| filter.matches(r, since, until))
        .collect())
}

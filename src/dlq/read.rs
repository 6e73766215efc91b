//! Reading the dead-letter topic for the operator tools: a consumer outside
//! any group, read_committed, from a time or offset range to the end as it
//! was when the read started, with filters on the dead-letter headers.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

use crate::config::Settings;
use crate::events::dead_letter::{headers as h, Reason, ReplayTarget, Stage};
use crate::kafka::dlq_reader_config;
use crate::printable::lossless_text;
use crate::providers::Provider;

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
    /// How `dlq replay` may send it back; `None` when the header is missing
    /// or holds a value this version does not know (not replayable).
    pub fn replay_target(&self) -> Option<ReplayTarget> {
        self.header(h::REPLAY_TARGET)?.parse().ok()
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
    pub reason: Option<Reason>,
    /// Only this provider (finbox or credeau).
    #[arg(long, value_parser = parse_provider)]
    pub provider: Option<Provider>,
    /// Only this stage (decode, task_decode, poll_finbox, poll_credeau, publish).
    #[arg(long)]
    pub stage: Option<Stage>,
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

/// `--provider`: one of the providers' names.
fn parse_provider(s: &str) -> Result<Provider, String> {
    Provider::ALL
        .into_iter()
        .find(|p| p.as_str() == s)
        .ok_or_else(|| {
            let known: Vec<&str> = Provider::ALL.iter().map(|p| p.as_str()).collect();
            format!(
                "unknown provider {:?}: expected one of {}",
                s.chars().take(64).collect::<String>(),
                known.join(", ")
            )
        })
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
                flag: if self.start_offset.is_some() {
                    "start-offset"
                } else {
                    "end-offset"
                },
                reason: "offsets need --partition".into(),
            });
        }
        Ok((since, until))
    }

    pub fn matches(&self, r: &DlqRecord, since: Option<i64>, until: Option<i64>) -> bool {
        let at = r
            .header(h::FAILED_AT)
            .and_then(|v| v.parse::<i64>().ok())
            .or(r.timestamp)
            .unwrap_or(0);
        let is = |want: Option<&'static str>, header: &str| {
            want.is_none_or(|w| r.header(header) == Some(w))
        };
        is(self.reason.map(Reason::as_str), h::ERROR_CLASS)
            && is(self.provider.map(Provider::as_str), h::PROVIDER)
            && is(self.stage.map(Stage::as_str), h::STAGE)
            && since.is_none_or(|s| at >= s)
            && until.is_none_or(|u| at < u)
            && self.end_offset.is_none_or(|e| r.offset <= e)
    }
}

/// A client context that keeps librdkafka's end-of-partition notices (which
/// this reader asks for to know when it is done) out of the log.
pub(crate) struct QuietEof;

impl rdkafka::ClientContext for QuietEof {
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        // librdkafka reports them both per partition and, through the error
        // callback, as a global error with the same code.
        let eof = matches!(error, rdkafka::error::KafkaError::PartitionEOF(_))
            || error.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::PartitionEOF);
        if !eof {
            tracing::warn!(error = %error, reason, "kafka client error");
        }
    }
}

impl rdkafka::consumer::ConsumerContext for QuietEof {}

/// The tools' reader: outside any group, read_committed, quiet about the
/// ends of partitions.
pub(crate) type Reader = BaseConsumer<QuietEof>;

/// A reader configured like the service's clients.
pub(crate) fn reader(settings: &Settings) -> Result<Reader, ReadError> {
    Ok(dlq_reader_config(&settings.kafka).create_with_context(QuietEof)?)
}

/// How long one metadata, watermark or offset query may take.
const QUERY_TIMEOUT: Duration = Duration::from_secs(15);

/// The partition ids of `topic`; an error when it does not exist.
pub(crate) fn partitions_of(consumer: &Reader, topic: &str) -> Result<Vec<i32>, ReadError> {
    let md = consumer.fetch_metadata(Some(topic), QUERY_TIMEOUT)?;
    let partitions: Vec<i32> = md
        .topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none())
        .map(|t| t.partitions().iter().map(|p| p.id()).collect())
        .unwrap_or_default();
    if partitions.is_empty() {
        return Err(ReadError::NoTopic(topic.to_string()));
    }
    Ok(partitions)
}

/// Where a read starts in each partition and where it ends (the high
/// watermark when the read began); partitions with nothing in them are
/// left out.
#[derive(Default)]
pub(crate) struct ReadPlan {
    assignment: TopicPartitionList,
    ends: HashMap<i32, i64>,
}

/// The first offset at or after `since` (epoch ms) in one partition; the
/// end when no record is that recent.
fn offset_at_time(
    consumer: &Reader,
    topic: &str,
    partition: i32,
    since: i64,
) -> Result<Offset, ReadError> {
    let mut q = TopicPartitionList::new();
    q.add_partition_offset(topic, partition, Offset::Offset(since))?;
    let found = consumer.offsets_for_times(q, QUERY_TIMEOUT)?;
    Ok(found
        .find_partition(topic, partition)
        .map(|e| e.offset())
        .filter(|o| matches!(o, Offset::Offset(_)))
        .unwrap_or(Offset::End))
}

/// Plans reading `partitions` of `topic` from `start_offset` (clamped to
/// the low watermark), else from the first record at or after `since`,
/// else from the beginning, to each partition's end as of now.
pub(crate) fn plan_read(
    consumer: &Reader,
    topic: &str,
    partitions: &[i32],
    start_offset: Option<i64>,
    since: Option<i64>,
) -> Result<ReadPlan, ReadError> {
    let mut plan = ReadPlan::default();
    for &p in partitions {
        let (low, high) = consumer.fetch_watermarks(topic, p, QUERY_TIMEOUT)?;
        if high <= low {
            continue;
        }
        plan.ends.insert(p, high);
        let start = match (start_offset, since) {
            (Some(o), _) => Offset::Offset(o.max(low)),
            (None, Some(ts)) => offset_at_time(consumer, topic, p, ts)?,
            (None, None) => Offset::Beginning,
        };
        plan.assignment.add_partition_offset(topic, p, start)?;
    }
    Ok(plan)
}

/// One consumed record as the tools keep it: header values and the key as
/// text, bytes that are not UTF-8 as `\xNN`.
fn to_record(m: &BorrowedMessage<'_>) -> DlqRecord {
    let headers = m
        .headers()
        .map(|hs| {
            hs.iter()
                .map(|x| {
                    (
                        x.key.to_string(),
                        lossless_text(x.value.unwrap_or_default()),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    DlqRecord {
        partition: m.partition(),
        offset: m.offset(),
        timestamp: m.timestamp().to_millis(),
        key: m.key().map(lossless_text),
        headers,
        raw_key: m.key().map(<[u8]>::to_vec),
        value: m.payload().map(<[u8]>::to_vec),
    }
}

/// Carries out a plan: reads every planned partition to its end (or until
/// ten seconds pass with nothing new), in partition and offset order.
pub(crate) fn read_planned(
    consumer: &Reader,
    plan: &ReadPlan,
) -> Result<Vec<DlqRecord>, ReadError> {
    if plan.ends.is_empty() {
        return Ok(vec![]);
    }
    consumer.assign(&plan.assignment)?;
    let mut out = Vec::new();
    let mut done: HashMap<i32, bool> = plan.ends.keys().map(|p| (*p, false)).collect();
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
                let end = plan.ends.get(&m.partition()).copied().unwrap_or(i64::MAX);
                if m.offset() + 1 >= end {
                    done.insert(m.partition(), true);
                }
                if m.offset() < end {
                    out.push(to_record(&m));
                }
            }
        }
    }
    out.sort_by_key(|r| (r.partition, r.offset));
    Ok(out)
}

/// Reads a whole topic (to its end as of now) without a consumer group.
pub fn read_all(
    settings: &Settings,
    topic: &str,
    partition: Option<i32>,
    start_offset: Option<i64>,
    since: Option<i64>,
) -> Result<Vec<DlqRecord>, ReadError> {
    let consumer = reader(settings)?;
    let partitions: Vec<i32> = partitions_of(&consumer, topic)?
        .into_iter()
        .filter(|p| partition.is_none_or(|w| w == *p))
        .collect();
    let plan = plan_read(&consumer, topic, &partitions, start_offset, since)?;
    read_planned(&consumer, &plan)
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        filter: Filter,
    }

    fn parse(args: &[&str]) -> Result<Filter, clap::Error> {
        Cli::try_parse_from(std::iter::once("dlq").chain(args.iter().copied())).map(|c| c.filter)
    }

    fn record(offset: i64, timestamp: Option<i64>, headers: &[(&str, &str)]) -> DlqRecord {
        DlqRecord {
            partition: 0,
            offset,
            timestamp,
            key: None,
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            raw_key: None,
            value: None,
        }
    }

    fn failed_at(ms: i64) -> DlqRecord {
        record(0, Some(1), &[(h::FAILED_AT, &ms.to_string())])
    }

    const NOW: i64 = 1_700_000_000_000;

    #[test]
    fn an_unknown_reason_stage_or_provider_is_refused_naming_the_known_ones() {
        let e = parse(&["--reason", "forbid"]).unwrap_err().to_string();
        assert!(e.contains("--reason"), "{e}");
        assert!(
            e.contains("unknown reason \"forbid\": expected one of empty,")
                && e.contains("forbidden"),
            "{e}"
        );
        let e = parse(&["--provider", "experian"]).unwrap_err().to_string();
        assert!(e.contains("--provider"), "{e}");
        assert!(
            e.contains("unknown provider \"experian\": expected one of finbox, credeau"),
            "{e}"
        );
        let e = parse(&["--stage", "poll"]).unwrap_err().to_string();
        assert!(e.contains("--stage"), "{e}");
        assert!(
            e.contains("expected one of decode, task_decode, poll_finbox, poll_credeau, publish"),
            "{e}"
        );
    }

    #[test]
    fn the_replay_target_header_is_read_as_a_target() {
        let r = |v: &str| record(0, None, &[(h::REPLAY_TARGET, v)]).replay_target();
        assert_eq!(r("input"), Some(ReplayTarget::Input));
        assert_eq!(r("task"), Some(ReplayTarget::Task));
        assert_eq!(r("none"), Some(ReplayTarget::None));
        assert_eq!(r("Task"), None);
        assert_eq!(record(0, None, &[]).replay_target(), None);
    }

    #[test]
    fn every_filter_flag_parses_into_its_field() {
        let f = parse(&[
            "--reason",
            "forbidden",
            "--provider",
            "finbox",
            "--stage",
            "poll_finbox",
            "--since",
            "2h",
            "--until",
            "2023-11-14T22:13:20Z",
            "--partition",
            "2",
            "--start-offset",
            "10",
            "--end-offset",
            "20",
        ])
        .unwrap();
        assert_eq!(f.reason, Some(Reason::Forbidden));
        assert_eq!(f.provider, Some(Provider::Finbox));
        assert_eq!(f.stage, Some(Stage::Poll(Provider::Finbox)));
        assert_eq!(f.since.as_deref(), Some("2h"));
        assert_eq!(f.until.as_deref(), Some("2023-11-14T22:13:20Z"));
        assert_eq!(
            (f.partition, f.start_offset, f.end_offset),
            (Some(2), Some(10), Some(20))
        );
        let none = parse(&[]).unwrap();
        assert_eq!(
            (none.since, none.until, none.partition, none.start_offset),
            (None, None, None, None)
        );
        for bad in [
            &["--partition", "one"][..],
            &["--start-offset", "1.5"],
            &["--end-offset", "x"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn times_are_rfc3339_or_a_duration_ago_in_epoch_millis() {
        let t = |s: &str| parse_time("since", s, NOW).unwrap();
        assert_eq!(t("2023-11-14T22:13:20Z"), NOW);
        assert_eq!(t("2023-11-14T23:13:20.250+01:00"), NOW + 250);
        assert_eq!(t("2h"), NOW - 7_200_000);
        assert_eq!(t("90s"), NOW - 90_000);
        assert_eq!(t("1h 30m"), NOW - 5_400_000);
        for bad in ["last tuesday", "2023-11-14", "", "-2h"] {
            match parse_time("until", bad, NOW) {
                Err(ReadError::BadFlag { flag, reason }) => {
                    assert_eq!(flag, "until");
                    assert!(reason.contains(&format!("{bad:?}")), "{reason}");
                }
                other => panic!("{bad:?} gave {other:?}"),
            }
        }
    }

    #[test]
    fn bounds_resolve_since_and_until_against_now() {
        let f = Filter {
            since: Some("2h".into()),
            until: Some("2023-11-14T22:13:20Z".into()),
            ..Filter::default()
        };
        assert_eq!(f.bounds(NOW).unwrap(), (Some(NOW - 7_200_000), Some(NOW)));
        assert_eq!(Filter::default().bounds(NOW).unwrap(), (None, None));
    }

    #[test]
    fn offsets_without_a_partition_are_refused_naming_the_flag_given() {
        for (f, flag) in [
            (
                Filter {
                    start_offset: Some(3),
                    ..Filter::default()
                },
                "start-offset",
            ),
            (
                Filter {
                    end_offset: Some(3),
                    ..Filter::default()
                },
                "end-offset",
            ),
            (
                Filter {
                    start_offset: Some(1),
                    end_offset: Some(3),
                    ..Filter::default()
                },
                "start-offset",
            ),
        ] {
            match f.bounds(NOW) {
                Err(e @ ReadError::BadFlag { .. }) => {
                    let text = e.to_string();
                    assert!(text.starts_with(&format!("--{flag}:")), "{text}");
                    assert!(text.contains("--partition"), "{text}");
                }
                other => panic!("{f:?} gave {other:?}"),
            }
        }
        let with_partition = Filter {
            partition: Some(0),
            start_offset: Some(1),
            end_offset: Some(3),
            ..Filter::default()
        };
        assert!(with_partition.bounds(NOW).is_ok());
    }

    #[test]
    fn since_is_inclusive_and_until_exclusive_on_the_failure_time() {
        let f = Filter::default();
        let (s, u) = (Some(1_000), Some(2_000));
        assert!(!f.matches(&failed_at(999), s, u));
        assert!(f.matches(&failed_at(1_000), s, u));
        assert!(f.matches(&failed_at(1_999), s, u));
        assert!(!f.matches(&failed_at(2_000), s, u));
        assert!(f.matches(&failed_at(5), None, u));
        assert!(f.matches(&failed_at(5_000), s, None));
    }

    #[test]
    fn the_record_timestamp_stands_in_for_a_missing_or_unreadable_failure_time() {
        let f = Filter::default();
        let s = Some(1_000);
        // dlq.failed_at wins over the Kafka timestamp.
        assert!(!f.matches(&record(0, Some(5_000), &[(h::FAILED_AT, "10")]), s, None));
        assert!(f.matches(&record(0, Some(5_000), &[]), s, None));
        assert!(!f.matches(&record(0, Some(500), &[]), s, None));
        assert!(f.matches(&record(0, Some(5_000), &[(h::FAILED_AT, "soon")]), s, None));
        // Neither: time 0, before any --since, within any --until.
        assert!(!f.matches(&record(0, None, &[]), s, None));
        assert!(f.matches(&record(0, None, &[]), None, Some(1)));
    }

    #[test]
    fn end_offset_is_inclusive() {
        let f = Filter {
            partition: Some(0),
            end_offset: Some(4),
            ..Filter::default()
        };
        assert!(f.matches(&record(3, None, &[]), None, None));
        assert!(f.matches(&record(4, None, &[]), None, None));
        assert!(!f.matches(&record(5, None, &[]), None, None));
    }

    #[test]
    fn header_filters_match_exactly_and_never_a_missing_header() {
        let r = record(
            0,
            None,
            &[
                (h::ERROR_CLASS, "forbidden"),
                (h::PROVIDER, "finbox"),
                (h::STAGE, "poll_finbox"),
            ],
        );
        let f = |reason: Option<&str>, provider: Option<&str>, stage: Option<&str>| Filter {
            reason: reason.map(|s| s.parse().unwrap()),
            provider: provider.map(|s| parse_provider(s).unwrap()),
            stage: stage.map(|s| s.parse().unwrap()),
            ..Filter::default()
        };
        assert!(f(Some("forbidden"), Some("finbox"), Some("poll_finbox")).matches(&r, None, None));
        assert!(!f(Some("unauthorized"), None, None).matches(&r, None, None));
        assert!(!f(None, Some("credeau"), None).matches(&r, None, None));
        assert!(!f(None, None, Some("decode")).matches(&r, None, None));
        let bare = record(0, None, &[]);
        assert!(!f(None, Some("finbox"), None).matches(&bare, None, None));
        assert!(f(None, None, None).matches(&bare, None, None));
    }
}

//! `insights-enricher dlq replay`: sends selected dead letters back into the
//! pipeline once their cause is fixed. An input event goes back to the input
//! topic; a task goes back to the shortest delay tier with its failed
//! providers reopened (providers that completed are not asked again, so no
//! provider event is published twice). Each replay is recorded in a ledger
//! topic (`<dead letter topic>.replayed`, compacted, keyed by the dead
//! letter's topic/partition/offset) in the same transaction as the replayed
//! records, so running the same replay twice sends nothing the second time.

use std::collections::HashSet;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use serde::Serialize;

use crate::config::Settings;
use crate::core::tiers::DelayTiers;
use crate::dlq::read::{read_all, read_filtered, DlqRecord, Filter, ReadError};
use crate::events::dead_letter::{headers as h, ReplayTarget};
use crate::kafka::{base_config, dlq_replay_config};
use crate::providers::Provider;
use crate::task::{Outcome, Task};

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("cannot create the replay ledger topic {topic}: {reason}")]
    Ledger { topic: String, reason: String },
}

#[derive(Debug, Clone, Serialize)]
pub struct ReplayItem {
    pub dead_letter: String,
    pub reason: String,
    pub destination: String,
    pub key: Option<String>,
}

#[derive(Debug, Default, Serialize)]
pub struct ReplayReport {
    pub dry_run: bool,
    pub selected: usize,
    pub sent: usize,
    pub already_replayed: usize,
    pub not_replayable: usize,
    pub items: Vec<ReplayItem>,
}

pub fn ledger_topic(settings: &Settings) -> String {
    format!("{}.replayed", settings.topics.dead_letter)
}

async fn ensure_ledger(settings: &Settings) -> Result<(), ReplayError> {
    let topic = ledger_topic(settings);
    let admin: AdminClient<DefaultClientContext> = base_config(&settings.kafka).create()?;
    let nt = NewTopic::new(
        &topic,
        1,
        TopicReplication::Fixed(settings.topics.replication_factor),
    )
    .set("cleanup.policy", "compact");
    let r = admin
        .create_topics(
            [&nt],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
        )
        .await?;
    for x in r {
        match x {
            Ok(_) | Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((_, code)) => {
                return Err(ReplayError::Ledger {
                    topic: topic.clone(),
                    reason: code.to_string(),
                })
            }
        }
    }
    Ok(())
}

/// Reopens the providers that failed, due now; returns false when none had
/// failed (nothing to replay).
pub fn reopen(task: &mut Task, now: i64, replay_of: String) -> bool {
    let mut reopened = false;
    for p in Provider::ALL {
        let t = task.track_mut(p);
        if t.outcome() == Some(Outcome::Failed) {
            t.done = None;
            t.last_error = None;
            t.not_found_since = None;
            // A provider that spent its retry budget gets a full one again.
            t.failed_polls = 0;
            t.next_poll_at = now;
            reopened = true;
        }
    }
    if reopened {
        task.replay_of = Some(replay_of);
        task.refresh_due();
    }
    reopened
}

struct Planned {
    item: ReplayItem,
    ledger_key: String,
    topic: String,
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
    headers: Vec<(String, Vec<u8>)>,
}

fn plan(settings: &Settings, r: &DlqRecord, now: i64) -> Option<Planned> {
    let dlq = &settings.topics.dead_letter;
    let id = r.id(dlq);
    let mut headers: Vec<(String, Vec<u8>)> = r
        .headers
        .iter()
        .filter(|(k, _)| !k.starts_with("dlq."))
        .map(|(k, v)| (k.clone(), v.clone().into_bytes()))
        .collect();
    headers.push((h::REPLAYED_FROM.to_string(), id.clone().into_bytes()));
    let (topic, value) = match r.replay_target()? {
        ReplayTarget::Input => (settings.topics.input.clone(), r.value.clone()),
        ReplayTarget::Task => {
            let mut task = Task::decode(r.value.as_deref()?).ok()?;
            if !reopen(&mut task, now, id.clone()) {
                return None;
            }
            let tiers = DelayTiers::new(&settings.schedule.delay_tiers);
            (
                tiers.topic(&settings.topics.delay_prefix, 0),
                Some(task.encode()),
            )
        }
        ReplayTarget::None => return None,
    };
    Some(Planned {
        item: ReplayItem {
            dead_letter: id.clone(),
            reason: r.reason().to_string(),
            destination: topic.clone(),
            key: r.key.clone(),
        },
        ledger_key: id,
        topic,
        key: r.raw_key.clone(),
        value,
        headers,
    })
}

/// Selects, plans and (unless `dry_run`) sends the replays in one
/// transaction together with their ledger entries.
pub async fn replay(
    settings: &Settings,
    filter: &Filter,
    dry_run: bool,
    limit: Option<usize>,
) -> Result<ReplayReport, ReplayError> {
    ensure_ledger(settings).await?;
    let s = settings.clone();
    let f = filter.clone();
    let (records, done) = tokio::task::spawn_blocking(move || -> Result<_, ReplayError> {
        let records = read_filtered(&s, &f)?;
        let ledger = read_all(&s, &ledger_topic(&s), None, None, None)?;
        let done: HashSet<String> = ledger.into_iter().filter_map(|r| r.key).collect();
        Ok((records, done))
    })
    .await
    .map_err(|e| ReplayError::Ledger {
        topic: ledger_topic(settings),
        reason: e.to_string(),
    })??;

    let now = chrono::Utc::now().timestamp_millis();
    let mut report = ReplayReport {
        dry_run,
        selected: records.len(),
        ..Default::default()
    };
    let mut planned = Vec::new();
    for r in &records {
        if done.contains(&r.id(&settings.topics.dead_letter)) {
            report.already_replayed += 1;
            continue;
        }
        if limit.is_some_and(|l| planned.len() >= l) {
            break;
        }
        match plan(settings, r, now) {
            Some(p) => planned.push(p),
            None => report.not_replayable += 1,
        }
    }
    report.items = planned.iter().map(|p| p.item.clone()).collect();
    if dry_run || planned.is_empty() {
        return Ok(report);
    }
    let s = settings.clone();
    let sent = tokio::task::spawn_blocking(move || send(&s, &planned, now))
        .await
        .map_err(|e| ReplayError::Ledger {
            topic: ledger_topic(settings),
            reason: e.to_string(),
        })??;
    report.sent = sent;
    Ok(report)
}

fn send(settings: &Settings, planned: &[Planned], now: i64) -> Result<usize, ReplayError> {
    let timeout = settings.kafka.transaction_timeout;
    let producer: ThreadedProducer<DefaultProducerContext> =
        dlq_replay_config(&settings.kafka, settings.topics.max_message_bytes).create()?;
    producer.init_transactions(timeout)?;
    producer.begin_transaction()?;
    let ledger = ledger_topic(settings);
    for p in planned {
        let mut hs = OwnedHeaders::new();
        for (k, v) in &p.headers {
            hs = hs.insert(Header {
                key: k,
                value: Some(v.as_slice()),
            });
        }
        let mut rec: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(&p.topic).headers(hs);
        if let Some(k) = &p.key {
            rec = rec.key(k.as_slice());
        }
        if let Some(v) = &p.value {
            rec = rec.payload(v.as_slice());
        }
        producer.send(rec).map_err(|(e, _)| e)?;
        let entry = serde_json::json!({ "replayed_at": now, "destination": p.topic }).to_string();
        producer
            .send(
                BaseRecord::<str, str>::to(&ledger)
                    .key(p.ledger_key.as_str())
                    .payload(entry.as_str()),
            )
            .map_err(|(e, _)| e)?;
    }
    if let Err(e) = producer.commit_transaction(timeout) {
        let _ = producer.abort_transaction(timeout);
        return Err(e.into());
    }
    Ok(planned.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::{Done, OnboardedUser, ProviderTrack, SourceRef, TASK_VERSION};

    #[test]
    fn reopening_a_provider_that_spent_its_retry_budget_gives_it_a_new_one() {
        let mut failed = ProviderTrack::pending(0, 10_000);
        failed.failed_polls = 3;
        failed.done = Some(Done {
            outcome: Outcome::Failed,
            at: 5,
            items: None,
        });
        let mut complete = ProviderTrack::pending(0, 15_000);
        complete.done = Some(Done {
            outcome: Outcome::Complete,
            at: 5,
            items: Some(2),
        });
        let mut task = Task {
            v: TASK_VERSION,
            user: OnboardedUser {
                event_id: "e".into(),
                user_id: "u".into(),
                finbox_customer_id: "u".into(),
                credeau_user_id: "u".into(),
                onboarded_at: 0,
            },
            origin: SourceRef {
                topic: "in".into(),
                partition: 0,
                offset: 0,
            },
            created_at: 0,
            due_at: 0,
            finbox: failed,
            credeau: complete.clone(),
            replay_of: None,
        };
        assert!(reopen(&mut task, 99, "dlq/0/1".into()));
        assert_eq!(task.finbox.failed_polls, 0);
        assert!(!task.finbox.is_done());
        assert_eq!(task.finbox.next_poll_at, 99);
        assert_eq!(task.credeau, complete);
    }
}

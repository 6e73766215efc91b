//! The topics the pipeline uses: their names, optional creation at start
//! (partitions, replication, retention, compression, message size), and the check that
//! they exist before the loop starts.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::types::RDKafkaErrorCode;

use crate::config::Settings;
use crate::core::tiers::DelayTiers;
use crate::kafka::settings::{base_config, COMPRESSION};

/// What a topic is for, which decides how it is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicRole {
    Input,
    Delay,
    Output,
    DeadLetter,
}

#[derive(Debug, thiserror::Error)]
pub enum TopicError {
    #[error("kafka admin: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("cannot create topic {topic}: {reason}")]
    Create { topic: String, reason: String },
    #[error("topic {0} does not exist (create it, or set topics.create = true to let the service create its topics)")]
    Missing(String),
}

/// Every topic with its role.
pub fn all_topics(s: &Settings, tiers: &DelayTiers) -> Vec<(String, TopicRole)> {
    let t = &s.topics;
    let mut v = vec![(t.input.clone(), TopicRole::Input)];
    v.extend(
        tiers
            .topics(&t.delay_prefix)
            .into_iter()
            .map(|n| (n, TopicRole::Delay)),
    );
    v.push((t.finbox_predictors.clone(), TopicRole::Output));
    v.push((t.sms_extraction.clone(), TopicRole::Output));
    v.push((t.combined.clone(), TopicRole::Output));
    v.push((t.dead_letter.clone(), TopicRole::DeadLetter));
    v
}

/// Creates missing topics. Existing ones are left as they are.
pub async fn create_topics(
    admin: &AdminClient<DefaultClientContext>,
    s: &Settings,
    tiers: &DelayTiers,
) -> Result<(), TopicError> {
    let topics = all_topics(s, tiers);
    // Delay topics must keep a task record at least as long as it may wait
    // there, with room for an outage: twice the longest wait, at least 7 days.
    let week = Duration::from_secs(7 * 24 * 3600);
    let delay_retention = (s.longest_wait() * 2).max(week).as_millis().to_string();
    let max_bytes = s.topics.max_message_bytes.to_string();
    let dlq_retention = Duration::from_secs(30 * 24 * 3600).as_millis().to_string();
    let mut new_topics = Vec::new();
    for (name, role) in &topics {
        let mut nt = NewTopic::new(
            name,
            s.topics.partitions,
            TopicReplication::Fixed(s.topics.replication_factor),
        );
        nt = nt.set("max.message.bytes", &max_bytes);
        if *role != TopicRole::Input {
            // The codec our producer uses, so the broker stores our batches
            // as they come instead of recompressing them. The input topic
            // is written by the lender's producers: theirs to choose.
            nt = nt.set("compression.type", COMPRESSION);
        }
        match role {
            TopicRole::Delay => {
                nt = nt
                    .set("retention.ms", &delay_retention)
                    .set("cleanup.policy", "delete");
            }
            TopicRole::DeadLetter => nt = nt.set("retention.ms", &dlq_retention),
            TopicRole::Input | TopicRole::Output => {}
        }
        new_topics.push(nt);
    }
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin.create_topics(new_topics.iter(), &opts).await?;
    for r in results {
        match r {
            Ok(name) => tracing::info!(topic = %name, "topic created"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => {
                return Err(TopicError::Create {
                    topic: name,
                    reason: code.to_string(),
                })
            }
        }
    }
    Ok(())
}

/// Checks that every topic exists and returns the total partition count of
/// the topics this service consumes (input and delay tiers).
pub fn check_topics(
    consumer: &BaseConsumer,
    s: &Settings,
    tiers: &DelayTiers,
    timeout: Duration,
) -> Result<usize, TopicError> {
    let md = consumer.fetch_metadata(None, timeout)?;
    let mut consumed = 0usize;
    for (name, role) in all_topics(s, tiers) {
        let found = md
            .topics()
            .iter()
            .find(|t| t.name() == name && t.error().is_none() && !t.partitions().is_empty());
        let Some(t) = found else {
            return Err(TopicError::Missing(name));
        };
        if matches!(role, TopicRole::Input | TopicRole::Delay) {
            consumed += t.partitions().len();
        }
    }
    Ok(consumed)
}

/// Creates the topics when `topics.create` is on, then checks that every
/// topic exists with the partitions the service needs, and returns the
/// partitions of every topic the loop consumes. Right after creating
/// topics a broker's metadata may not list them yet: a missing topic is
/// then looked up again for up to 20 s before it counts as missing.
pub async fn prepare(settings: &Settings, tiers: &DelayTiers) -> anyhow::Result<usize> {
    use anyhow::Context as _;
    let k = &settings.kafka;
    if settings.topics.create {
        let admin: AdminClient<DefaultClientContext> = base_config(k)
            .create()
            .context("kafka: cannot create admin client")?;
        create_topics(&admin, settings, tiers)
            .await
            .context("topics.create")?;
    }
    let probe: BaseConsumer = base_config(k)
        .create()
        .context("kafka: cannot create client")?;
    let s = settings.clone();
    let t = tiers.clone();
    let patience = if settings.topics.create {
        Duration::from_secs(20)
    } else {
        Duration::ZERO
    };
    tokio::task::spawn_blocking(move || {
        let started = std::time::Instant::now();
        loop {
            match check_topics(&probe, &s, &t, Duration::from_secs(30)) {
                Err(TopicError::Missing(_)) if started.elapsed() < patience => {
                    std::thread::sleep(Duration::from_millis(250));
                }
                other => return other,
            }
        }
    })
    .await
    .context("topic check task")?
    .context("kafka topics")
}

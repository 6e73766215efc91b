//! The `insights_users_waiting` gauge: task records in the delay-tier
//! partitions this instance holds that the group has not yet committed
//! past, refreshed every few seconds by queries of their own.
//!
//! librdkafka's statistics cannot give it: a paused partition (a tier
//! waiting for its head to be due) is not fetched, so its end offset in the
//! statistics goes stale, and each transaction leaves a marker after its
//! records that an offset difference counts as a record. Here the end is
//! asked for (the last stable offset, `read_committed`), the start is the
//! group's committed offset, and while the ranges hold at most
//! [`EXACT_UP_TO`] offsets in all they are read to count their records
//! exactly (markers are not records). Beyond that, reading them every few
//! seconds would cost more than the figure is worth: the offsets are
//! counted, over by at most one marker per transaction that wrote to a
//! range (a transaction carries up to `schedule.max_batch` records).

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use crate::config::KafkaSettings;
use crate::kafka::{base_config, PipelineContext};
use crate::metrics::Metrics;

/// How often the gauge is refreshed.
pub const REFRESH: Duration = Duration::from_secs(5);
/// While the ranges hold at most this many offsets in all, they are read
/// and their records counted.
pub const EXACT_UP_TO: i64 = 2_000;
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

/// Starts the refresher on a thread of its own; it ends with the consumer.
pub fn spawn(
    k: &KafkaSettings,
    metrics: Arc<Metrics>,
    consumer: Weak<StreamConsumer<PipelineContext>>,
) {
    let mut c = base_config(k);
    c.set("group.id", &k.group_id)
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true");
    let counter: BaseConsumer = match c.create() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "users_waiting: cannot create its client; the gauge stays at 0");
            return;
        }
    };
    let spawned = std::thread::Builder::new()
        .name("users-waiting".into())
        .spawn(move || loop {
            std::thread::sleep(REFRESH);
            let Some(consumer) = consumer.upgrade() else {
                return;
            };
            let ctx = consumer.context();
            let held: Vec<(String, i32)> = {
                let a = ctx.assignment.lock().unwrap_or_else(|p| p.into_inner());
                a.assigned
                    .keys()
                    .filter(|tp| ctx.delay_topics.contains(&tp.topic))
                    .map(|tp| (tp.topic.clone(), tp.partition))
                    .collect()
            };
            drop(consumer);
            match count(&counter, &held) {
                Ok(n) => metrics.users_waiting.set(n),
                Err(e) => tracing::debug!(error = %e, "users_waiting: refresh failed; kept the last value"),
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "users_waiting: cannot start its thread");
    }
}

/// Records after the group's committed offset in `partitions`.
pub fn count(c: &BaseConsumer, partitions: &[(String, i32)]) -> Result<i64, KafkaError> {
    if partitions.is_empty() {
        return Ok(0);
    }
    let mut tpl = TopicPartitionList::new();
    for (t, p) in partitions {
        tpl.add_partition(t, *p);
    }
    let committed = c.committed_offsets(tpl, QUERY_TIMEOUT)?;
    let mut offsets = 0;
    let mut exact = TopicPartitionList::new();
    let mut ends = HashMap::new();
    for (t, p) in partitions {
        let (low, high) = c.fetch_watermarks(t, *p, QUERY_TIMEOUT)?;
        let start = match committed.find_partition(t, *p).map(|e| e.offset()) {
            Some(Offset::Offset(o)) => o.max(low),
            _ => low,
        };
        let range = (high - start).max(0);
        if range == 0 {
            continue;
        }
        offsets += range;
        exact.add_partition_offset(t, *p, Offset::Offset(start))?;
        ends.insert((t.clone(), *p), (high, range));
    }
    if offsets > EXACT_UP_TO {
        return Ok(offsets);
    }
    let mut total = 0;
    // One topic at a time: the end-of-partition notice names only the
    // partition, and the tiers share partition ids.
    let mut topics: Vec<&String> = ends.keys().map(|(t, _)| t).collect();
    topics.sort();
    topics.dedup();
    for topic in topics {
        let mut tpl = TopicPartitionList::new();
        let mut mine = HashMap::new();
        for e in exact.elements_for_topic(topic) {
            tpl.add_partition_offset(topic, e.partition(), e.offset())?;
            if let Some(end) = ends.get(&(topic.clone(), e.partition())) {
                mine.insert(e.partition(), *end);
            }
        }
        total += read_count(c, &tpl, topic, mine)?;
    }
    Ok(total)
}

/// Reads each partition of one topic from its start to its end (the end of
/// partition notice, which comes after any trailing marker), counting
/// records; a partition not read to its end in time counts the offsets it
/// did not read.
fn read_count(
    c: &BaseConsumer,
    assignment: &TopicPartitionList,
    topic: &str,
    mut ends: HashMap<i32, (i64, i64)>,
) -> Result<i64, KafkaError> {
    c.assign(assignment)?;
    let mut counted: HashMap<i32, i64> = HashMap::new();
    let until = Instant::now() + QUERY_TIMEOUT;
    while !ends.is_empty() && Instant::now() < until {
        match c.poll(Duration::from_millis(200)) {
            None => {}
            Some(Err(KafkaError::PartitionEOF(p))) => {
                ends.remove(&p);
            }
            Some(Err(e)) => {
                let _ = c.unassign();
                return Err(e);
            }
            Some(Ok(m)) if m.topic() == topic => {
                let p = m.partition();
                if let Some((high, _)) = ends.get(&p).copied() {
                    if m.offset() < high {
                        *counted.entry(p).or_default() += 1;
                    }
                    if m.offset() + 1 >= high {
                        ends.remove(&p);
                    }
                }
            }
            Some(Ok(_)) => {}
        }
    }
    let mut total: i64 = counted.values().sum();
    for (p, (_, range)) in ends {
        total += (range - counted.get(&p).copied().unwrap_or(0)).max(0);
    }
    let _ = c.unassign();
    Ok(total)
}

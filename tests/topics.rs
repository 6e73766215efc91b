//! `topics.create = true` against the real broker: every topic the service
//! uses is created with the partitions, retention, compression and message
//! size its role needs, as read back through the admin API.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{admin, service_addr, service_env, Service, Topics};
use rdkafka::admin::{AdminOptions, ResourceSpecifier};

/// The topic-level settings the broker reports for `topic`.
async fn topic_config(topic: &str) -> HashMap<String, String> {
    let results = admin()
        .describe_configs(
            &[ResourceSpecifier::Topic(topic)],
            &AdminOptions::new().request_timeout(Some(Duration::from_secs(30))),
        )
        .await
        .expect("describe configs");
    let resource = results
        .into_iter()
        .next()
        .expect("one resource")
        .unwrap_or_else(|e| panic!("describe {topic}: {e}"));
    resource
        .entries
        .into_iter()
        .filter_map(|e| e.value.map(|v| (e.name, v)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn created_topics_get_the_partitions_retention_compression_and_size_of_their_role() {
    let topics = Topics::new("topics");
    let mut env = service_env(&topics, &common::unique("g"), "http://127.0.0.1:9");
    env.push(("INSIGHTS__LOG__FORMAT".into(), "json".into()));
    env.push((
        "INSIGHTS__TOPICS__MAX_MESSAGE_BYTES".into(),
        "9437184".into(),
    ));
    let dir = tempfile::tempdir().unwrap();
    let service = Service::start(&env, &dir.path().join("service.log"));
    let addr = service_addr(&service, Duration::from_secs(60))
        .await
        .unwrap_or_else(|| panic!("service never came up:\n{}", service.log_text()));
    // Ready means the topics exist and the group is joined.
    let until = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let ok = reqwest::get(format!("http://{addr}/readyz"))
            .await
            .is_ok_and(|r| r.status().is_success());
        if ok {
            break;
        }
        assert!(
            std::time::Instant::now() < until,
            "never ready:\n{}",
            service.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let metadata = admin()
        .inner()
        .fetch_metadata(None, Duration::from_secs(30))
        .expect("metadata");
    let partitions: HashMap<&str, usize> = metadata
        .topics()
        .iter()
        .map(|t| (t.name(), t.partitions().len()))
        .collect();

    // service_env: tiers 1s,2s,5s,10s; deadlines 25 s and 20 s, so the
    // longest wait is far below the 7-day floor of the delay retention.
    let week_ms = (7 * 24 * 3600 * 1000u64).to_string();
    let month_ms = (30 * 24 * 3600 * 1000u64).to_string();
    let delays: Vec<String> = ["1s", "2s", "5s", "10s"]
        .iter()
        .map(|t| format!("{}.{t}", topics.delay_prefix))
        .collect();
    for topic in delays
        .iter()
        .chain([&topics.finbox, &topics.sms, &topics.combined, &topics.dlq])
        .chain([&topics.input])
    {
        assert_eq!(
            partitions.get(topic.as_str()),
            Some(&3),
            "partitions of {topic}"
        );
        let c = topic_config(topic).await;
        assert_eq!(c["max.message.bytes"], "9437184", "{topic}");
        let compression = if *topic == topics.input {
            "producer"
        } else {
            "lz4"
        };
        assert_eq!(c["compression.type"], compression, "{topic}");
    }
    for topic in &delays {
        let c = topic_config(topic).await;
        assert_eq!(c["retention.ms"], week_ms, "{topic}");
        assert_eq!(c["cleanup.policy"], "delete", "{topic}");
    }
    assert_eq!(topic_config(&topics.dlq).await["retention.ms"], month_ms);
    drop(service);
}

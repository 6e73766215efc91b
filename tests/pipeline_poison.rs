//! Poison records: each lands in the dead-letter topic with its reason and
//! the records after it are processed.

mod common;

use std::time::Duration;

use common::*;
use insights_enricher::simulator::{self, SimulatorConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_poison_record_is_dead_lettered_with_its_reason_and_the_pipeline_moves_on() {
    let registry = Registry::start();
    let topics = Topics::new("poison");
    let id = register_schema(
        &registry.url,
        &format!("{}-value", topics.input),
        &onboarded_schema_text(),
    )
    .await;

    let sim = simulator::spawn(SimulatorConfig::default())
        .await
        .expect("simulator");
    // One partition, so "the records after it" is well defined.
    create_topic(&topics.input, 1).await;
    let dir = tempfile::tempdir().unwrap();
    let mut env = service_env(&topics, &unique("g"), &sim.base_url());
    env.push((
        "INSIGHTS__ENCODING__SCHEMA_REGISTRY_URL".into(),
        registry.url.clone(),
    ));
    let service = Service::start(&env, &dir.path().join("service.log"));

    let p = producer();
    let good = |n: &str| {
        let user = format!("good-{n}-{}", unique("u"));
        (user.clone(), onboarded_json(&format!("ev-{user}"), &user))
    };
    let (u1, g1) = good("1");
    produce(&p, &topics.input, Some(u1.as_bytes()), Some(&g1)).await;
    let long_user = "x".repeat(65);
    let poisons: Vec<(&str, Option<Vec<u8>>)> = vec![
        (
            "malformed_json",
            Some(b"{\"event_id\": \"e\", \"user_id\": ".to_vec()),
        ),
        (
            "invalid_avro",
            Some(confluent_wire(id, &[0xff, 0xff, 0xff, 0xff, 0x01])),
        ),
        (
            "unknown_schema_id",
            Some(confluent_wire(987_654, &[2, b'a'])),
        ),
        (
            "invalid_field",
            Some(br#"{"event_id":"e-missing","onboarded_at":1}"#.to_vec()),
        ),
        (
            "invalid_field",
            Some(
                format!(r#"{{"event_id":"e-long","user_id":"{long_user}","onboarded_at":1}}"#)
                    .into_bytes(),
            ),
        ),
        ("not_utf8", Some(vec![b'{', 0xc3, 0x28, b'}'])),
        ("empty", None),
        ("invalid_field", Some(vec![b'a'; 2 * 1024 * 1024])),
    ];
    for (_, value) in &poisons {
        produce(&p, &topics.input, Some(b"poison"), value.as_deref()).await;
    }
    let (u2, g2) = good("2");
    produce(&p, &topics.input, Some(u2.as_bytes()), Some(&g2)).await;

    let dlq = read_topic(&topics.dlq, Some(poisons.len()), Duration::from_secs(60));
    assert_eq!(dlq.len(), poisons.len(), "log:\n{}", service.log_text());
    let mut sorted = dlq.clone();
    sorted.sort_by_key(|r| r.offset);
    for (r, (reason, _)) in sorted.iter().zip(&poisons) {
        let h = |k: &str| r.headers.get(k).cloned().flatten().unwrap_or_default();
        assert_eq!(h("dlq.error.class"), *reason, "headers {:?}", r.headers);
        assert_eq!(h("dlq.stage"), "decode");
        assert_eq!(h("dlq.original.topic"), topics.input);
        assert!(!h("dlq.original.offset").is_empty());
        assert!(!h("dlq.original.timestamp").is_empty());
        assert!(!h("dlq.error.message").is_empty());
        assert_eq!(h("dlq.replay.target"), "input");
    }
    let combined = read_topic(&topics.combined, Some(2), Duration::from_secs(60));
    let users: Vec<_> = combined
        .iter()
        .filter_map(|r| r.value["user_id"].as_str())
        .collect();
    assert!(
        users.contains(&u1.as_str()) && users.contains(&u2.as_str()),
        "{users:?}"
    );
    let _ = sim.shutdown().await;
}

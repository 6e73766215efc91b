//! Poison records: each lands in the dead-letter topic with its reason and
//! the records after it are processed; when nearly everything would be
//! dead-lettered, the guard stops the service instead.

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dead_letter_guard_stops_the_service_loudly_and_the_batch_that_tripped_it_is_processed_after_the_fix(
) {
    let sim = simulator::spawn(SimulatorConfig::default())
        .await
        .expect("simulator");
    let topics = Topics::new("guard");
    create_topic(&topics.input, 1).await;
    let group = unique("g");
    // Every user is in the topic before the service starts, so the first
    // batch holds them all.
    let n = 6;
    let p = producer();
    let mut events = Vec::new();
    for i in 0..n {
        let user = format!("guard-{i}-{}", unique("u"));
        let event = format!("ev-{user}");
        produce(
            &p,
            &topics.input,
            Some(user.as_bytes()),
            Some(&onboarded_json(&event, &user)),
        )
        .await;
        events.push(event);
    }
    events.sort();

    let dir = tempfile::tempdir().unwrap();
    let mut env = service_env(&topics, &group, &sim.base_url());
    let kv = |k: &str, v: &str| (k.to_string(), v.to_string());
    // A revoked FinBox key: the simulator answers 403 to every user.
    let mut bad = env.clone();
    bad.extend([
        kv("INSIGHTS__FINBOX__API_KEY", "revoked-finbox-key"),
        kv("INSIGHTS__DEAD_LETTER__MAX_CONSECUTIVE", "3"),
    ]);
    let mut service = Service::start(&bad, &dir.path().join("bad.log"));
    let (status, took) = service
        .wait_exit(Duration::from_secs(60))
        .unwrap_or_else(|| panic!("still running after 60 s; log:\n{}", service.log_text()));
    let log = service.log_text();
    eprintln!("guard stopped the service after {took:?} ({status})");
    assert!(!status.success(), "exit status {status}; log:\n{log}");
    assert!(
        log.contains("dead-letter guard tripped; stopping without committing the batch"),
        "log:\n{log}"
    );
    assert!(
        log.contains(
            "error: 3 consecutive records were dead-lettered (dead_letter.max_consecutive = 3)"
        ) && log.contains("Last dead letter: stage poll_finbox, reason forbidden"),
        "no error line naming the guard; log:\n{log}"
    );
    assert!(!log.contains("revoked-finbox-key"), "key in the log");

    // Nothing of the batch was committed: no offsets, no outputs.
    assert_eq!(committed_offsets(&group, &topics.input, 1), vec![None]);
    for topic in [&topics.combined, &topics.finbox, &topics.sms, &topics.dlq] {
        let recs = read_topic(topic, None, Duration::from_secs(2));
        assert!(recs.is_empty(), "{topic}: {recs:?}");
    }

    // With the key fixed, the same group processes every one of those users.
    env.push(kv("INSIGHTS__DEAD_LETTER__MAX_CONSECUTIVE", "3"));
    let mut service = Service::start(&env, &dir.path().join("fixed.log"));
    let first = read_topic(&topics.combined, Some(n), Duration::from_secs(60));
    assert_eq!(first.len(), n, "log:\n{}", service.log_text());
    let combined = read_topic(&topics.combined, None, Duration::from_secs(3));
    let mut got: Vec<String> = combined
        .iter()
        .map(|r| {
            assert_eq!(r.value["finbox"]["outcome"], "complete", "{r:?}");
            assert_eq!(r.value["credeau"]["outcome"], "complete", "{r:?}");
            r.value["event_id"].as_str().unwrap().to_string()
        })
        .collect();
    got.sort();
    assert_eq!(got, events);
    let dlq = read_topic(&topics.dlq, None, Duration::from_secs(2));
    assert!(dlq.is_empty(), "dead letters after the fix: {dlq:?}");
    assert_eq!(
        committed_offsets(&group, &topics.input, 1),
        vec![Some(n as i64)]
    );
    assert!(service.terminate(Duration::from_secs(15)).is_some());
    let _ = sim.shutdown().await;
}

//! End to end against the real broker and the simulator over HTTP: users
//! with mixed scenarios each yield exactly the expected records, read back
//! by an independent client (Python's confluent-kafka, read_committed);
//! Avro input in the Confluent wire format is read through the registry.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use insights_enricher::simulator::{self, SimulatorConfig};
use serde_json::json;

/// Scenario prefixes, and what each user of that prefix must end with:
/// (finbox outcome, credeau outcome, finbox records, sms records).
const CASES: &[(&str, &str, &str, usize, usize)] = &[
    ("now-", "complete", "complete", 1, 1),
    ("later-", "complete", "complete", 1, 1),
    ("nodata-", "no_data", "timed_out", 0, 0),
    ("nf-", "complete", "complete", 1, 1),
    ("never-", "not_found", "timed_out", 0, 0),
    ("storm-", "complete", "complete", 1, 1),
    ("burst-", "complete", "complete", 1, 1),
    ("stuck-", "timed_out", "complete", 0, 1),
];

/// The FinBox deadline of the mixed test: "stuck-" users are still
/// in_progress when it passes.
const FINBOX_DEADLINE_MS: i64 = 25_000;

fn scenarios() -> serde_json::Value {
    json!({
        "default": {},
        "prefixes": {
            "now-": {"finbox": {"ready_after": "0s", "predictors": 12}, "credeau": {"ready_after": "0s", "sms_count": 5}},
            "later-": {"finbox": {"ready_after": "8s"}, "credeau": {"ready_after": "3s", "sms_count": 3}},
            "nodata-": {"finbox": {"outcome": "no_data"}, "credeau": {"sms_count": 0}},
            "nf-": {"finbox": {"not_found_for": "4s", "ready_after": "5s"}, "credeau": {"sms_count": 2, "ready_after": "0s"}},
            "never-": {"finbox": {"outcome": "not_found"}, "credeau": {"sms_count": 0}},
            "storm-": {"finbox": {"faults": {"server_error_first": 4}}, "credeau": {"sms_count": 2, "faults": {"server_error_first": 2}}},
            "burst-": {"finbox": {"faults": {"rate_limit_first": 3}}, "credeau": {"sms_count": 2, "faults": {"rate_limit_first": 3, "retry_after_secs": 1}}},
            // FinBox answers 202 in_progress far beyond the deadline.
            "stuck-": {"finbox": {"ready_after": "1h"}, "credeau": {"sms_count": 2}}
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_scenarios_each_yield_exactly_the_expected_records() {
    let sim = simulator::spawn(SimulatorConfig::default())
        .await
        .expect("simulator");
    sim_admin(&sim.base_url(), "/admin/scenarios", &scenarios()).await;

    let topics = Topics::new("e2e");
    create_topic(&topics.input, 3).await;
    let dir = tempfile::tempdir().unwrap();
    let mut env = service_env(&topics, &unique("g"), &sim.base_url());
    // "nf-" users: FinBox answers not_found for 4 s, inside the 15 s grace.
    env.push(("INSIGHTS__CREDEAU__DEADLINE".into(), "12s".into()));
    env.push((
        "INSIGHTS__FINBOX__DEADLINE".into(),
        format!("{}ms", FINBOX_DEADLINE_MS),
    ));
    let mut service = Service::start(&env, &dir.path().join("service.log"));

    let p = producer();
    let per_case = 4;
    let mut expected: HashMap<String, (&str, &str, usize, usize)> = HashMap::new();
    for (prefix, fo, co, nf, ns) in CASES {
        for i in 0..per_case {
            let user = format!("{prefix}{i}-{}", unique("u"));
            let event = format!("ev-{user}");
            produce(
                &p,
                &topics.input,
                Some(user.as_bytes()),
                Some(&onboarded_json(&event, &user)),
            )
            .await;
            expected.insert(event, (*fo, *co, *nf, *ns));
        }
    }
    let users = expected.len();

    let combined = read_topic(&topics.combined, Some(users), Duration::from_secs(90));
    // Wait a little longer for anything that should not be there.
    let combined_again = read_topic(&topics.combined, None, Duration::from_secs(3));
    assert_eq!(
        combined_again.len(),
        users,
        "combined events: {} for {users} users; log:\n{}",
        combined_again.len(),
        service.log_text()
    );
    let mut seen = HashMap::new();
    for r in &combined {
        let ev = r.value["event_id"].as_str().expect("event_id").to_string();
        let (fo, co, _, _) = expected
            .get(&ev)
            .unwrap_or_else(|| panic!("unexpected event {ev}"));
        assert_eq!(r.value["finbox"]["outcome"], *fo, "{ev}: {}", r.value);
        assert_eq!(r.value["credeau"]["outcome"], *co, "{ev}: {}", r.value);
        assert_eq!(r.key.as_deref(), r.value["user_id"].as_str());
        if *fo == "timed_out" {
            // Still waiting when the deadline passed: no error, no items,
            // and not given up before the deadline.
            let f = &r.value["finbox"];
            for k in ["items", "error_kind", "http_status", "error_message"] {
                assert!(f[k].is_null(), "{ev}: finbox.{k} set: {f}");
            }
            let onboarded = r.value["onboarded_at"].as_i64().expect("onboarded_at");
            let finished = f["finished_at"].as_i64().expect("finished_at");
            assert!(
                finished >= onboarded + FINBOX_DEADLINE_MS,
                "{ev}: timed out {} ms after onboarding",
                finished - onboarded
            );
            assert!(f["polls"].as_u64().is_some_and(|n| n >= 2), "{ev}: {f}");
        }
        *seen.entry(ev).or_insert(0) += 1;
    }
    assert!(seen.values().all(|n| *n == 1), "duplicate combined events");
    assert_eq!(seen.len(), users);

    let want_finbox: usize = expected.values().map(|e| e.2).sum();
    let want_sms: usize = expected.values().map(|e| e.3).sum();
    // A user's provider events are committed no later than its combined
    // event, so both topics are complete now: read them whole.
    let finbox = read_topic(&topics.finbox, None, Duration::from_secs(3));
    let sms = read_topic(&topics.sms, None, Duration::from_secs(3));
    assert_eq!(finbox.len(), want_finbox, "finbox predictor events");
    assert_eq!(sms.len(), want_sms, "sms events");
    for r in &finbox {
        let ev = r.value["event_id"].as_str().unwrap();
        assert_eq!(expected[ev].2, 1, "finbox event for {ev}");
        assert!(r.value["predictors"]
            .as_array()
            .is_some_and(|a| !a.is_empty()));
    }
    for r in &sms {
        let ev = r.value["event_id"].as_str().unwrap();
        assert_eq!(expected[ev].3, 1, "sms event for {ev}");
        assert!(r.value["entries"].as_array().is_some_and(|a| !a.is_empty()));
    }
    let events_of = |recs: &[ReadRecord]| {
        let mut v: Vec<String> = recs
            .iter()
            .map(|r| r.value["event_id"].as_str().unwrap().to_string())
            .collect();
        v.sort();
        v
    };
    let expected_with = |has: fn(&(&str, &str, usize, usize)) -> bool| {
        let mut v: Vec<String> = expected
            .iter()
            .filter(|(_, e)| has(e))
            .map(|(ev, _)| ev.clone())
            .collect();
        v.sort();
        v
    };
    assert_eq!(events_of(&finbox), expected_with(|e| e.2 == 1));
    assert_eq!(events_of(&sms), expected_with(|e| e.3 == 1));
    let dlq = read_topic(&topics.dlq, None, Duration::from_secs(2));
    assert!(dlq.is_empty(), "unexpected dead letters: {dlq:?}");

    let took = service.terminate(Duration::from_secs(15));
    assert!(took.is_some(), "service did not stop on SIGTERM");
    let _ = sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_dead_letter_the_provider_and_still_give_a_final_answer() {
    let sim = simulator::spawn(SimulatorConfig::default())
        .await
        .expect("simulator");
    let topics = Topics::new("badcred");
    create_topic(&topics.input, 2).await;
    let dir = tempfile::tempdir().unwrap();
    let mut env = service_env(&topics, &unique("g"), &sim.base_url());
    env.push(("INSIGHTS__CREDEAU__AUTH_TOKEN".into(), "wrong-token".into()));
    let _service = Service::start(&env, &dir.path().join("service.log"));
    let p = producer();
    let n = 5;
    for i in 0..n {
        let user = format!("cred-{i}-{}", unique("u"));
        produce(
            &p,
            &topics.input,
            Some(user.as_bytes()),
            Some(&onboarded_json(&format!("ev-{user}"), &user)),
        )
        .await;
    }
    let dlq = read_topic(&topics.dlq, Some(n), Duration::from_secs(60));
    assert_eq!(dlq.len(), n);
    for r in &dlq {
        let h = |k: &str| r.headers.get(k).cloned().flatten().unwrap_or_default();
        assert_eq!(h("dlq.stage"), "poll_credeau");
        assert_eq!(h("dlq.error.class"), "unauthorized");
        assert_eq!(h("dlq.http.status"), "401");
        assert_eq!(h("dlq.provider"), "credeau");
        assert!(!h("dlq.provider.request_id").is_empty());
        assert!(!h("dlq.original.topic").is_empty());
        assert!(!format!("{r:?}").contains("wrong-token"));
    }
    let combined = read_topic(&topics.combined, Some(n), Duration::from_secs(60));
    assert_eq!(combined.len(), n);
    for r in &combined {
        assert_eq!(r.value["credeau"]["outcome"], "failed");
        assert_eq!(r.value["credeau"]["http_status"], 401);
        assert_eq!(r.value["finbox"]["outcome"], "complete");
    }
    let _ = sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn avro_onboarded_events_each_yield_their_combined_event_and_a_non_avro_record_between_them_is_dead_lettered(
) {
    let registry = Registry::start();
    let topics = Topics::new("avroin");
    let schema_id = register_schema(
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
    env.extend([
        ("INSIGHTS__ENCODING__INPUT".to_string(), "avro".to_string()),
        (
            "INSIGHTS__ENCODING__SCHEMA_REGISTRY_URL".to_string(),
            registry.url.clone(),
        ),
    ]);
    let service = Service::start(&env, &dir.path().join("service.log"));

    // (event_id, user_id, onboarded_at, finbox_customer_id override)
    let mut avro_users = Vec::new();
    let onboarded_at = chrono::Utc::now().timestamp_millis() - 1_000;
    let mut avro = |n: usize, customer: Option<String>| {
        let user = format!("avro-{n}-{}", unique("u"));
        let event = format!("ev-{user}");
        let at = onboarded_at + n as i64;
        let value = onboarded_avro(schema_id, &event, &user, at, customer.as_deref());
        avro_users.push((event, user.clone(), at, customer));
        (user.into_bytes(), value)
    };
    // Not Avro: a valid JSON onboarding event, and plain text.
    let json_user = format!("json-{}", unique("u"));
    let json_value = onboarded_json(&format!("ev-{json_user}"), &json_user);
    let garbage = b"user onboarded: nobody".to_vec();
    let records = vec![
        avro(0, Some(format!("FB-{}", unique("c")))),
        avro(1, None),
        (json_user.clone().into_bytes(), json_value.clone()),
        (b"garbage".to_vec(), garbage.clone()),
        avro(4, None),
        avro(5, Some(format!("FB-{}", unique("c")))),
    ];
    let p = producer();
    for (key, value) in &records {
        produce(&p, &topics.input, Some(key), Some(value)).await;
    }

    let n = avro_users.len();
    let first = read_topic(&topics.combined, Some(n), Duration::from_secs(60));
    assert_eq!(first.len(), n, "log:\n{}", service.log_text());
    let combined = read_topic(&topics.combined, None, Duration::from_secs(3));
    let mut got: Vec<(String, String, i64, String, String)> = combined
        .iter()
        .map(|r| {
            assert_eq!(r.key.as_deref(), r.value["user_id"].as_str());
            (
                r.value["event_id"].as_str().unwrap().to_string(),
                r.value["user_id"].as_str().unwrap().to_string(),
                r.value["onboarded_at"].as_i64().unwrap(),
                r.value["finbox"]["outcome"].as_str().unwrap().to_string(),
                r.value["credeau"]["outcome"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    got.sort();
    let mut want: Vec<(String, String, i64, String, String)> = avro_users
        .iter()
        .map(|(ev, user, at, _)| {
            (
                ev.clone(),
                user.clone(),
                *at,
                "complete".to_string(),
                "complete".to_string(),
            )
        })
        .collect();
    want.sort();
    assert_eq!(got, want, "combined events");

    // The Avro field finbox_customer_id reached FinBox.
    let finbox = read_topic(&topics.finbox, None, Duration::from_secs(3));
    let mut got: Vec<(String, String)> = finbox
        .iter()
        .map(|r| {
            (
                r.value["event_id"].as_str().unwrap().to_string(),
                r.value["finbox_customer_id"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    got.sort();
    let mut want: Vec<(String, String)> = avro_users
        .iter()
        .map(|(ev, user, _, customer)| (ev.clone(), customer.clone().unwrap_or(user.clone())))
        .collect();
    want.sort();
    assert_eq!(got, want, "finbox predictor events");

    let dlq = read_topic(&topics.dlq, None, Duration::from_secs(3));
    let mut dead: Vec<_> = dlq
        .iter()
        .map(|r| {
            let h = |k: &str| r.headers.get(k).cloned().flatten().unwrap_or_default();
            assert_eq!(h("dlq.stage"), "decode", "{r:?}");
            assert_eq!(h("dlq.original.topic"), topics.input, "{r:?}");
            assert!(
                h("dlq.error.message").contains("no Confluent header"),
                "{r:?}"
            );
            assert_eq!(h("dlq.replay.target"), "input", "{r:?}");
            (
                h("dlq.original.offset").parse::<i64>().unwrap(),
                h("dlq.error.class"),
                r.key.clone(),
                r.value.clone(),
            )
        })
        .collect();
    // Dead letters are keyed like their originals, so they may sit in
    // different partitions: order them by their input offset.
    dead.sort_by_key(|d| d.0);
    let json_event: serde_json::Value = serde_json::from_slice(&json_value).unwrap();
    assert_eq!(
        dead,
        vec![
            (
                2,
                "invalid_avro".to_string(),
                Some(json_user.clone()),
                json_event
            ),
            (
                3,
                "invalid_avro".to_string(),
                Some("garbage".to_string()),
                json!(String::from_utf8(garbage).unwrap())
            ),
        ],
        "dead letters"
    );
    let _ = sim.shutdown().await;
}

//! Faults injected during end-to-end runs: a provider outage longer than the
//! in-process retries, a provider slower than the request timeout,
//! connections dropped mid-response, non-JSON answers, and partition
//! reassignment by scaling from one instance to three and back to one. In
//! each case every user ends with exactly one combined event (and a dead
//! letter with its reason where the provider never answered), nothing is
//! duplicated, and the provider calls per user stay within the retry policy.
//! (The broker restart is in tests/pipeline_crash.rs.)

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use insights_enricher::simulator::{self, RunningSimulator, SimulatorConfig};
use serde_json::json;

async fn sim_with(scenarios: serde_json::Value) -> RunningSimulator {
    let sim = simulator::spawn(SimulatorConfig::default())
        .await
        .expect("simulator");
    sim_admin(&sim.base_url(), "/admin/scenarios", &scenarios).await;
    sim_admin(
        &sim.base_url(),
        "/admin/limits",
        &json!({"finbox_per_minute": 0, "credeau_per_minute": 0}),
    )
    .await;
    sim
}

async fn send_users(topic: &str, prefixes: &[&str], per_prefix: usize) -> HashMap<String, String> {
    let p = producer();
    let mut users = HashMap::new();
    for prefix in prefixes {
        for i in 0..per_prefix {
            let user = format!("{prefix}{i}-{}", unique("u"));
            let ev = format!("ev-{user}");
            produce(
                &p,
                topic,
                Some(user.as_bytes()),
                Some(&onboarded_json(&ev, &user)),
            )
            .await;
            users.insert(ev, user);
        }
    }
    users
}

/// Exactly one combined event per user; returns them by event id.
fn combined_once(
    topics: &Topics,
    users: &HashMap<String, String>,
) -> HashMap<String, serde_json::Value> {
    let n = users.len();
    let first = read_topic(&topics.combined, Some(n), Duration::from_secs(120));
    let recs = if first.len() >= n {
        read_topic(&topics.combined, None, Duration::from_secs(3))
    } else {
        first
    };
    let mut by_event: HashMap<String, serde_json::Value> = HashMap::new();
    for r in recs {
        let ev = r.value["event_id"].as_str().unwrap_or_default().to_string();
        assert!(users.contains_key(&ev), "unexpected event {ev}");
        assert!(
            by_event.insert(ev.clone(), r.value).is_none(),
            "duplicate combined event for {ev}"
        );
    }
    assert_eq!(by_event.len(), n, "users without a combined event");
    by_event
}

async fn requests_of(sim: &RunningSimulator, user: &str, provider: &str) -> u64 {
    let v: serde_json::Value = reqwest::get(format!("{}/admin/users/{user}", sim.base_url()))
        .await
        .expect("admin")
        .json()
        .await
        .expect("json");
    v[provider]["requests"].as_u64().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_faults_end_in_exactly_one_final_answer_within_the_retry_policy() {
    let sim = sim_with(json!({
        "default": {"finbox": {"predictors": 3}, "credeau": {"sms_count": 2}},
        "prefixes": {
            // 7 failures: more than one poll's in-process retries (1 + 2).
            "outage-": {"finbox": {"faults": {"server_error_first": 7}}, "credeau": {"sms_count": 2, "faults": {"server_error_first": 5}}},
            "drop-": {"finbox": {"faults": {"drop_first": 2}}, "credeau": {"sms_count": 2, "faults": {"drop_first": 2}}},
            "garbled-": {"finbox": {"faults": {"non_json_first": 1, "truncated_json_first": 2}}, "credeau": {"sms_count": 2, "faults": {"non_json_first": 2, "proxy_html_first": 1}}},
            // Slower than the request timeout, always: ends failed at the deadline.
            "slow-": {"finbox": {"faults": {"latency": "3s"}}, "credeau": {"sms_count": 2}}
        }
    }))
    .await;
    let topics = Topics::new("faults");
    create_topic(&topics.input, 3).await;
    let dir = tempfile::tempdir().unwrap();
    let mut env = service_env(&topics, &unique("g"), &sim.base_url());
    env.push(("INSIGHTS__FINBOX__REQUEST_TIMEOUT".into(), "1s".into()));
    let _service = Service::start(&env, &dir.path().join("service.log"));
    let users = send_users(&topics.input, &["outage-", "drop-", "garbled-", "slow-"], 4).await;

    let combined = combined_once(&topics, &users);
    let dlq = read_topic(&topics.dlq, None, Duration::from_secs(3));
    for (ev, user) in &users {
        let c = &combined[ev];
        let finbox_requests = requests_of(&sim, user, "finbox").await;
        let polls = c["finbox"]["polls"].as_u64().unwrap_or(0);
        // Policy: each poll makes at most 1 + 2 in-process retries.
        assert!(
            finbox_requests <= polls * 3,
            "{user}: {finbox_requests} requests in {polls} polls"
        );
        if user.starts_with("slow-") {
            assert_eq!(c["finbox"]["outcome"], "failed", "{user}: {c}");
            assert_eq!(c["finbox"]["error_kind"], "timeout", "{user}: {c}");
            let dead: Vec<_> = dlq
                .iter()
                .filter(|r| r.key.as_deref() == Some(user.as_str()))
                .collect();
            assert_eq!(dead.len(), 1, "{user}: one dead letter");
            let h = |k: &str| {
                dead[0]
                    .headers
                    .get(k)
                    .cloned()
                    .flatten()
                    .unwrap_or_default()
            };
            assert_eq!(h("dlq.error.class"), "exhausted");
            assert_eq!(h("dlq.provider"), "finbox");
        } else {
            assert_eq!(c["finbox"]["outcome"], "complete", "{user}: {c}");
            assert_eq!(c["credeau"]["outcome"], "complete", "{user}: {c}");
        }
        if user.starts_with("outage-") {
            // 7 failures then success: three polls (3 + 3 + 2 requests).
            assert_eq!(finbox_requests, 8, "{user}");
            assert_eq!(polls, 3, "{user}");
        }
    }
    assert_eq!(dlq.len(), 4, "only the slow users are dead-lettered");
    let finbox = read_topic(&topics.finbox, Some(12), Duration::from_secs(5));
    assert_eq!(finbox.len(), 12, "one predictors event per completed user");
    let _ = sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaling_from_one_to_three_instances_and_back_loses_and_duplicates_nothing() {
    let sim = sim_with(json!({
        "default": {"finbox": {"ready_after": "6s", "predictors": 3}, "credeau": {"ready_after": "3s", "sms_count": 2}}
    }))
    .await;
    let topics = Topics::new("scale");
    create_topic(&topics.input, 6).await;
    let dir = tempfile::tempdir().unwrap();
    let group = unique("g");
    let env_for = |name: &str| {
        let mut env = service_env(&topics, &group, &sim.base_url());
        env.push((
            "INSIGHTS__KAFKA__TRANSACTIONAL_ID_PREFIX".into(),
            format!("{}-{name}", topics.prefix),
        ));
        env.push(("INSIGHTS__TOPICS__PARTITIONS".into(), "6".into()));
        env.push(("INSIGHTS__FINBOX__DEADLINE".into(), "10m".into()));
        env.push(("INSIGHTS__CREDEAU__DEADLINE".into(), "10m".into()));
        env
    };
    let _a = Service::start(&env_for("a"), &dir.path().join("a.log"));
    let users = send_users(&topics.input, &["scale-"], 600).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut b = Service::start(&env_for("b"), &dir.path().join("b.log"));
    let mut c = Service::start(&env_for("c"), &dir.path().join("c.log"));
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert!(
        b.terminate(Duration::from_secs(15)).is_some(),
        "b did not stop"
    );
    assert!(
        c.terminate(Duration::from_secs(15)).is_some(),
        "c did not stop"
    );
    let combined = combined_once(&topics, &users);
    assert!(combined
        .values()
        .all(|c| c["finbox"]["outcome"] == "complete" && c["credeau"]["outcome"] == "complete"));
    for (topic, what) in [(&topics.finbox, "finbox"), (&topics.sms, "sms")] {
        let recs = read_topic(topic, Some(users.len()), Duration::from_secs(5));
        let mut seen: HashMap<String, usize> = HashMap::new();
        for r in &recs {
            *seen
                .entry(r.value["event_id"].as_str().unwrap_or_default().to_string())
                .or_default() += 1;
        }
        assert!(seen.values().all(|n| *n == 1), "duplicate {what} events");
        assert_eq!(recs.len(), users.len(), "{what} events");
    }
    let _ = sim.shutdown().await;
}

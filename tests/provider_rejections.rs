//! A provider rejecting many users at once, against the real broker and
//! the simulator: 150 users whose Credeau answers 422 in one burst (it
//! started to require `groupings`, which this deployment does not send).
//! That is the provider's answer about those users, not a bad deploy of
//! ours, so the dead-letter guard does not count it (docs/runbook.md, the
//! dead-letter guard): the service keeps running, each of those users is
//! dead-lettered exactly once with the stage and reason, gets its combined
//! event with Credeau `failed`, and the other users are served as usual.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use insights_enricher::simulator::{self, SimulatorConfig};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credeau_rejecting_150_users_in_one_burst_dead_letters_each_once_and_keeps_running() {
    let sim = simulator::spawn(SimulatorConfig::default())
        .await
        .expect("simulator");
    sim_admin(
        &sim.base_url(),
        "/admin/scenarios",
        &json!({
            "default": {"finbox": {"predictors": 3}, "credeau": {"sms_count": 2}},
            "prefixes": {
                "rejected-": {"credeau": {"sms_count": 2, "require_groupings": true}}
            }
        }),
    )
    .await;
    sim_admin(
        &sim.base_url(),
        "/admin/limits",
        &json!({"finbox_per_minute": 0, "credeau_per_minute": 0}),
    )
    .await;
    let topics = Topics::new("rejections");
    // One partition: the 150 rejections are consecutive records, more
    // than dead_letter.max_consecutive (100) in a row.
    create_topic(&topics.input, 1).await;
    let rejected = produce_users(&topics.input, "rejected-", 150).await;
    let accepted = produce_users(&topics.input, "ok-", 50).await;

    let dir = tempfile::tempdir().unwrap();
    let group = unique("g");
    let env = service_env(&topics, &group, &sim.base_url());
    let mut service = Service::start(&env, &dir.path().join("service.log"));

    let n = rejected.len() + accepted.len();
    let combined = read_topic(&topics.combined, Some(n), Duration::from_secs(90));
    let log = service.log_text();
    assert_eq!(combined.len(), n, "log:\n{log}");
    let mut by_user: HashMap<String, Vec<serde_json::Value>> = HashMap::new();
    for r in read_topic(&topics.combined, None, Duration::from_secs(3)) {
        let user = r.value["user_id"].as_str().unwrap_or("?").to_string();
        by_user.entry(user).or_default().push(r.value);
    }
    for user in rejected.iter().chain(&accepted) {
        let events = by_user.get(user).map_or(0, Vec::len);
        assert_eq!(events, 1, "{user}: {events} combined events");
        let c = &by_user[user][0];
        let credeau = if user.starts_with("rejected-") {
            "failed"
        } else {
            "complete"
        };
        assert_eq!(c["credeau"]["outcome"], credeau, "{user}: {c}");
        assert_eq!(c["finbox"]["outcome"], "complete", "{user}: {c}");
    }

    let dlq = read_topic(&topics.dlq, None, Duration::from_secs(3));
    let mut dead: HashMap<String, usize> = HashMap::new();
    for r in &dlq {
        let user = r.key.clone().unwrap_or_default();
        *dead.entry(user.clone()).or_default() += 1;
        let h = |k: &str| r.headers.get(k).cloned().flatten().unwrap_or_default();
        assert!(user.starts_with("rejected-"), "{user} dead-lettered");
        assert_eq!(h("dlq.stage"), "poll_credeau", "{user}");
        assert_eq!(h("dlq.error.class"), "unprocessable", "{user}");
        assert_eq!(h("dlq.http.status"), "422", "{user}");
    }
    assert_eq!(dead.len(), rejected.len(), "users dead-lettered");
    assert!(dead.values().all(|n| *n == 1), "{dead:?}");

    assert!(
        service.wait_exit(Duration::from_secs(2)).is_none(),
        "the service stopped; log:\n{}",
        service.log_text()
    );
    let log = service.log_text();
    assert!(!log.contains("dead-letter guard tripped"), "log:\n{log}");
    service.terminate(Duration::from_secs(15));
    let _ = sim.shutdown().await;
}

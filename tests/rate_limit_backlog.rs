//! A backlog at each provider's documented limit, the service and the
//! simulator both limited to it, against the real broker: three times what
//! the limit serves within one record budget (5 s here) arrive at once.
//! Time spent waiting for the service's own rate-limit permit must never
//! count against a user: nobody fails, and each user is asked exactly
//! twice (the first answer pending, the second ready), as the simulator
//! counts the requests it received.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use insights_enricher::simulator::{self, RunningSimulator, SimulatorConfig};
use serde_json::json;

async fn produce_users(topic: &str, users: &[String]) {
    let p = producer();
    let futures = users.iter().map(|user| {
        let p = p.clone();
        let value = onboarded_json(&format!("ev-{user}"), user);
        async move { produce(&p, topic, Some(user.as_bytes()), Some(&value)).await }
    });
    futures::future::join_all(futures).await;
}

/// Requests of `user` the simulator received at `provider` (past its
/// rate-limit gate).
async fn received(sim: &RunningSimulator, user: &str, provider: &str) -> u64 {
    let url = format!("{}/admin/users/{user}", sim.base_url());
    let report: serde_json::Value = reqwest::get(url).await.unwrap().json().await.unwrap();
    report[provider]["requests"].as_u64().unwrap_or(0)
}

/// Runs `users` users through a service limited like the simulator, and
/// checks the outcome of `provider` for each.
async fn backlog_at_the_limit(provider: &str, per_minute: u32, users: usize) {
    let (finbox_limit, credeau_limit) = match provider {
        "finbox" => (per_minute, 0),
        _ => (0, per_minute),
    };
    let sim = simulator::spawn(SimulatorConfig {
        finbox_rate_limit_per_minute: finbox_limit,
        credeau_rate_limit_per_minute: credeau_limit,
        ..SimulatorConfig::default()
    })
    .await
    .expect("simulator");
    // The first answer is pending, the second (a poll interval later:
    // 10 s for FinBox, 2 s for Credeau) ready.
    let scenarios = match provider {
        "finbox" => json!({"default": {
            "finbox": {"ready_after": "5s", "predictors": 3},
            "credeau": {"sms_count": 2}
        }}),
        _ => json!({"default": {
            "finbox": {"predictors": 3},
            "credeau": {"ready_after": "1s", "sms_count": 2}
        }}),
    };
    sim_admin(&sim.base_url(), "/admin/scenarios", &scenarios).await;
    let topics = Topics::new(&format!("limit-{provider}"));
    create_topic(&topics.input, 3).await;
    let names: Vec<String> = (0..users)
        .map(|i| format!("l{i}-{}", unique("u")))
        .collect();
    produce_users(&topics.input, &names).await;

    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("service.log");
    let mut env = service_env(&topics, &unique("g"), &sim.base_url());
    let limit = per_minute.to_string();
    let (finbox_rate, credeau_rate) = match provider {
        "finbox" => (limit.as_str(), "60000"),
        _ => ("60000", limit.as_str()),
    };
    env.extend(
        [
            ("INSIGHTS__FINBOX__RATE_LIMIT_PER_MINUTE", finbox_rate),
            ("INSIGHTS__CREDEAU__RATE_LIMIT_PER_MINUTE", credeau_rate),
            ("INSIGHTS__FINBOX__DEADLINE", "5m"),
            ("INSIGHTS__CREDEAU__DEADLINE", "5m"),
            // FinBox's shipped retry budget: three failed polls end it.
            ("INSIGHTS__FINBOX__MAX_FAILED_POLLS", "3"),
            ("INSIGHTS__CREDEAU__MAX_FAILED_POLLS", "3"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    let service = Service::start(&env, &log);
    let combined = read_topic(&topics.combined, Some(users), Duration::from_secs(60));
    let dead = read_topic(&topics.dlq, None, Duration::from_secs(2));
    let text = service.log_text();
    drop(service);

    let mut by_user: HashMap<String, serde_json::Value> = HashMap::new();
    for r in combined {
        let user = r.value["user_id"].as_str().unwrap_or("?").to_string();
        assert!(
            by_user.insert(user.clone(), r.value).is_none(),
            "{user} twice"
        );
    }
    let tail: Vec<&str> = text.lines().rev().take(30).collect();
    assert_eq!(
        by_user.len(),
        users,
        "combined events; log tail:\n{}",
        tail.join("\n")
    );
    assert!(
        dead.is_empty(),
        "{} dead letters: {:?}",
        dead.len(),
        dead.first()
    );
    let mut calls: HashMap<u64, usize> = HashMap::new();
    for user in &names {
        let event = &by_user[user];
        assert_eq!(
            event[provider]["outcome"].as_str(),
            Some("complete"),
            "{user}: {event}"
        );
        assert_eq!(
            event[provider]["polls"].as_u64(),
            Some(2),
            "{user}: {event}"
        );
        *calls
            .entry(received(&sim, user, provider).await)
            .or_default() += 1;
    }
    assert_eq!(
        calls,
        HashMap::from([(2, users)]),
        "users by requests received"
    );
    let stats: serde_json::Value = reqwest::get(format!("{}/admin/stats", sim.base_url()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    eprintln!("{provider} at {per_minute}/min, {users} users: {stats}");
    let _ = sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_at_finboxs_limit_fails_nobody_and_asks_each_user_twice() {
    // 600/min serve 50 calls in the 5 s record budget: 150 users.
    backlog_at_the_limit("finbox", 600, 150).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_at_credeaus_limit_fails_nobody_and_asks_each_user_twice() {
    // 1,000/min serve 83 calls in the 5 s record budget: 250 users.
    backlog_at_the_limit("credeau", 1000, 250).await;
}

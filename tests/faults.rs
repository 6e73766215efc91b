//! Faults injected during end-to-end runs: a provider outage longer than the
//! in-process retries, a provider slower than the request timeout,
//! connections dropped mid-response, non-JSON answers, and partition
//! reassignment by scaling from one instance to three and back to one. In
//! each case every user ends with exactly one combined event (and a dead
//! letter with its reason where the provider never answered), nothing is
//! duplicated, and the provider calls per user stay within the retry policy:
//! FinBox's and Credeau's request counts per poll, and Credeau's retry
//! delays (exponential, capped, jittered) timed from the simulator's request
//! log.
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
        let credeau_requests = requests_of(&sim, user, "credeau").await;
        let credeau_polls = c["credeau"]["polls"].as_u64().unwrap_or(0);
        // Policy: each poll makes at most 1 + 3 in-process retries
        // (credeau.max_retries).
        assert!(
            credeau_requests <= credeau_polls * 4,
            "{user}: {credeau_requests} Credeau requests in {credeau_polls} polls"
        );
        let (want_requests, want_polls) = match user.split('-').next() {
            // 5 failures then data: two polls (4 + 2 requests).
            Some("outage") => (6, 2),
            // 2 dropped connections, or a proxy page and a non-JSON body,
            // then data: all within the first poll's retries.
            Some("drop") | Some("garbled") => (3, 1),
            _ => (1, 1),
        };
        assert_eq!(
            (credeau_requests, credeau_polls),
            (want_requests, want_polls),
            "{user}: Credeau (requests, polls)"
        );
    }
    assert_eq!(dlq.len(), 4, "only the slow users are dead-lettered");
    let finbox = read_topic(&topics.finbox, Some(12), Duration::from_secs(5));
    assert_eq!(finbox.len(), 12, "one predictors event per completed user");
    let _ = sim.shutdown().await;
}

/// One answer in the simulator's log of a user: (ms since first contact,
/// HTTP status).
async fn credeau_log(sim: &RunningSimulator, user: &str) -> Vec<(u64, u64)> {
    let v: serde_json::Value = reqwest::get(format!("{}/admin/users/{user}", sim.base_url()))
        .await
        .expect("admin")
        .json()
        .await
        .expect("json");
    let first = v["credeau"]["first_contact"]
        .as_u64()
        .expect("first contact");
    v["credeau"]["last_requests"]
        .as_array()
        .expect("request log")
        .iter()
        .map(|r| {
            let at = r["at_ms"].as_u64().expect("at_ms");
            (at - first, r["status"].as_u64().expect("status"))
        })
        .collect()
}

/// What separates two consecutive Credeau requests of one user.
#[derive(Debug, Clone, Copy)]
enum Gap {
    /// In-process retry `n` (0-based): the policy's delay, +/-20 % jitter.
    Retry(u32),
    /// A Retry-After of this many seconds, capped at credeau.retry_cap.
    RetryAfter(u64),
    /// Back to the scheduler: the next poll, at least poll_interval later.
    NextPoll,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credeau_retries_under_5xx_and_429_outages_double_from_one_second_to_the_cap_with_jitter() {
    // The documented policy: 3 retries (credeau.max_retries), from 1 s
    // (credeau.retry_base), doubling, +/-20 % jitter; the built-in defaults
    // of both are used. The cap (60 s by default) is lowered to 2 s so it
    // binds within three retries: 1 s, 2 s, then 2 s rather than 4 s.
    let base_ms = 1_000u64;
    let cap_ms = 2_000u64;
    let poll_interval_ms = 2_000u64;
    let sim = sim_with(json!({
        "default": {"finbox": {"predictors": 3}, "credeau": {"sms_count": 2}},
        "prefixes": {
            "c5xx-": {"credeau": {"sms_count": 2, "faults": {"server_error_first": 5}}},
            "c429-": {"credeau": {"sms_count": 2, "faults": {"rate_limit_first": 5}}},
            "c429ra-": {"credeau": {"sms_count": 2, "faults": {"rate_limit_first": 2, "retry_after_secs": 5}}}
        }
    }))
    .await;
    let topics = Topics::new("credeau-retry");
    create_topic(&topics.input, 3).await;
    let dir = tempfile::tempdir().unwrap();
    let mut env = service_env(&topics, &unique("g"), &sim.base_url());
    env.retain(|(k, _)| {
        !matches!(
            k.as_str(),
            "INSIGHTS__CREDEAU__RETRY_BASE" | "INSIGHTS__CREDEAU__RETRY_CAP"
        )
    });
    env.extend([
        (
            "INSIGHTS__CREDEAU__RETRY_CAP".to_string(),
            format!("{cap_ms}ms"),
        ),
        (
            "INSIGHTS__CREDEAU__POLL_INTERVAL".to_string(),
            format!("{poll_interval_ms}ms"),
        ),
        ("INSIGHTS__CREDEAU__DEADLINE".to_string(), "60s".to_string()),
        // The three in-process retries (1 + 2 + 2 s) fit in one record's
        // budget; with less, the last would be a scheduled poll instead.
        (
            "INSIGHTS__SCHEDULE__RECORD_BUDGET".to_string(),
            "7s".to_string(),
        ),
        // The documented schedule itself, not cut short when a record has
        // waited on Credeau (its retries' sleeps included) past the
        // straggler wait: that cut ends the poll with the attempt's error.
        (
            "INSIGHTS__SCHEDULE__STRAGGLER_WAIT".to_string(),
            "0s".to_string(),
        ),
    ]);
    let _service = Service::start(&env, &dir.path().join("service.log"));
    let users = send_users(&topics.input, &["c5xx-", "c429-", "c429ra-"], 2).await;
    let combined = combined_once(&topics, &users);

    use Gap::*;
    // 5 failures: a first poll of 1 + 3 retries, then a second poll that
    // fails once more and succeeds on its first retry.
    let outage = [Retry(0), Retry(1), Retry(2), NextPoll, Retry(0)];
    // Scheduling and request time on a busy machine, on top of a delay.
    let slack_ms = 400;
    let mut stats_want: HashMap<String, u64> = HashMap::new();
    let mut early = 0;
    let mut retries = 0;
    for (ev, user) in &users {
        let c = &combined[ev];
        assert_eq!(c["credeau"]["outcome"], "complete", "{user}: {c}");
        assert_eq!(c["finbox"]["outcome"], "complete", "{user}: {c}");
        let (statuses, gaps, polls): (Vec<u64>, &[Gap], u64) = if user.starts_with("c5xx-") {
            (vec![503, 503, 503, 503, 503, 200], &outage, 2)
        } else if user.starts_with("c429ra-") {
            (vec![429, 429, 200], &[RetryAfter(5), RetryAfter(5)], 1)
        } else {
            (vec![429, 429, 429, 429, 429, 200], &outage, 2)
        };
        for s in &statuses {
            *stats_want.entry(s.to_string()).or_default() += 1;
        }
        let log = credeau_log(&sim, user).await;
        let got: Vec<u64> = log.iter().map(|(_, s)| *s).collect();
        assert_eq!(got, statuses, "{user}: Credeau answers {log:?}");
        assert_eq!(c["credeau"]["polls"], polls, "{user}: {c}");
        assert_eq!(
            requests_of(&sim, user, "credeau").await,
            statuses.len() as u64
        );
        for (i, gap) in gaps.iter().enumerate() {
            let took = log[i + 1].0 - log[i].0;
            let (low, high) = match *gap {
                Retry(n) => {
                    let d = (base_ms << n).min(cap_ms);
                    retries += 1;
                    if took * 100 < d * 99 {
                        early += 1;
                    }
                    (d * 8 / 10, d * 12 / 10 + slack_ms)
                }
                RetryAfter(secs) => {
                    // Never shorter than asked; the jitter only lengthens
                    // it, by up to 20 %.
                    let d = (secs * 1_000).min(cap_ms);
                    (d, d * 12 / 10 + slack_ms)
                }
                NextPoll => (poll_interval_ms, u64::MAX),
            };
            assert!(
                (low..=high).contains(&took),
                "{user}: {gap:?} took {took} ms, not within [{low}, {high}]: {log:?}"
            );
        }
    }
    // The jitter goes both ways: some retries came before their nominal
    // delay (none would without jitter; all 16 at or above it by chance is
    // about 1 in 30,000).
    assert!(early > 0, "no retry before its nominal delay of {retries}");
    // The simulator's own counters agree: nothing else reached Credeau.
    let stats: serde_json::Value = reqwest::get(format!("{}/admin/stats", sim.base_url()))
        .await
        .expect("stats")
        .json()
        .await
        .expect("stats json");
    let by_status: HashMap<String, u64> = stats["credeau"]["by_status"]
        .as_object()
        .expect("by_status")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_u64().expect("count")))
        .collect();
    assert_eq!(by_status, stats_want, "{stats}");
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

//! A rebalance that follows a 429, against the real broker and the
//! simulator. Credeau's real limit is below the configured one, so the
//! first instance backs off after 429s; then the provider recovers and a
//! second instance joins (a rebalance takes the first one's share away and
//! gives part of it back). Users onboarded after the rebalance are served
//! within seconds by both instances, and each instance's
//! `insights_rate_limit_per_minute{provider="credeau"}` is the rate in
//! force: its share of the limit times the back-off, never the 1/min an
//! instance without partitions passes through.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;
use insights_enricher::simulator::{self, RunningSimulator, SimulatorConfig};
use serde_json::json;

/// The limit configured for Credeau, per minute.
const CREDEAU_LIMIT: u32 = 1000;

async fn stats(sim: &RunningSimulator) -> serde_json::Value {
    reqwest::get(format!("{}/admin/stats", sim.base_url()))
        .await
        .expect("stats")
        .json()
        .await
        .expect("stats json")
}

/// One instance's `insights_rate_limit_per_minute{provider="credeau"}`.
async fn credeau_rate(service: &Service) -> Option<u32> {
    metric(
        service,
        r#"insights_rate_limit_per_minute{provider="credeau"}"#,
    )
    .await
    .map(|v| v as u32)
}

/// The share the loop logged with its last "assignment changed" line.
fn last_share(log: &str) -> Option<f64> {
    let line = log.lines().rfind(|l| l.contains("assignment changed"))?;
    let after = &line[line.find("share=")? + "share=".len()..];
    let number: String = after
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    number.parse().ok()
}

/// The rates an instance holding `share` may be at: the share of the limit
/// halved 0..=4 times by a 429 back-off (never below 1/min).
fn rates_for(share: f64) -> Vec<u32> {
    let part = (f64::from(CREDEAU_LIMIT) * share).floor() as u32;
    (0..=4).map(|cuts| (part >> cuts).max(1)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_resumes_within_seconds_after_a_rebalance_that_follows_429s() {
    let sim = simulator::spawn(SimulatorConfig::default())
        .await
        .expect("simulator");
    sim_admin(
        &sim.base_url(),
        "/admin/scenarios",
        &json!({"default": {"finbox": {"predictors": 3}, "credeau": {"sms_count": 2}}}),
    )
    .await;
    // Credeau's real limit, far below the configured 1,000/min: 429s.
    sim_admin(
        &sim.base_url(),
        "/admin/limits",
        &json!({"finbox_per_minute": 0, "credeau_per_minute": 120}),
    )
    .await;
    let topics = Topics::new("backoff");
    create_topic(&topics.input, 2).await;
    let dir = tempfile::tempdir().unwrap();
    let group = unique("g");
    let env = |name: &str| {
        let mut env = service_env(&topics, &group, &sim.base_url());
        env.extend(
            [
                ("INSIGHTS__CREDEAU__RATE_LIMIT_PER_MINUTE", "1000"),
                ("INSIGHTS__CREDEAU__DEADLINE", "5m"),
                ("INSIGHTS__FINBOX__DEADLINE", "5m"),
                ("INSIGHTS__KAFKA__TRANSACTIONAL_ID_PREFIX", &unique(name)),
            ]
            .map(|(k, v)| (k.to_string(), v.to_string())),
        );
        env
    };
    let a = Service::start(&env("a"), &dir.path().join("a.log"));
    wait_ready(&a).await;
    let early = produce_users(&topics.input, "early-", 40).await;

    // A backs off: its rate in force, and the metric, drop below its share.
    let until = Instant::now() + Duration::from_secs(30);
    while stats(&sim).await["credeau"]["by_status"]
        .get("429")
        .is_none()
    {
        assert!(
            Instant::now() < until,
            "no 429 seen; log:\n{}",
            a.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rate_a = credeau_rate(&a).await.expect("A's rate");
    assert!(
        rate_a < CREDEAU_LIMIT && rates_for(1.0).contains(&rate_a),
        "A after 429s shows {rate_a}/min"
    );

    // The provider recovers; a second instance joins (a rebalance while
    // A's back-off still runs: its last 429 was a moment ago).
    sim_admin(
        &sim.base_url(),
        "/admin/limits",
        &json!({"finbox_per_minute": 0, "credeau_per_minute": 0}),
    )
    .await;
    let lifted = Instant::now();
    let b = Service::start(&env("b"), &dir.path().join("b.log"));
    wait_ready(&b).await;
    // Both members have their new assignment once each logged a share
    // below all of it.
    let rebalanced = eventually(Duration::from_secs(30), || {
        let (sa, sb) = (last_share(&a.log_text())?, last_share(&b.log_text())?);
        (sa > 0.0 && sa < 1.0 && sb > 0.0 && sb < 1.0).then_some(())
    })
    .await;
    assert!(
        rebalanced.is_some(),
        "no rebalance; A:\n{}\nB:\n{}",
        a.log_text(),
        b.log_text()
    );

    let late = produce_users(&topics.input, "late-", 20).await;
    let produced = Instant::now();
    let late_set: std::collections::HashSet<&String> = late.iter().collect();
    let mut late_done = 0;
    let mut took = Duration::ZERO;
    let mut first = None;
    while produced.elapsed() < Duration::from_secs(90) {
        let recs = read_topic(&topics.combined, None, Duration::from_secs(1));
        late_done = recs
            .iter()
            .filter_map(|r| r.value["user_id"].as_str())
            .filter(|u| late_set.contains(&u.to_string()))
            .count();
        took = produced.elapsed();
        if late_done > 0 && first.is_none() {
            first = Some(took);
        }
        if late_done >= late.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The rate each instance shows is its share times a back-off, never
    // the 1/min it had without partitions.
    let mut shown = HashMap::new();
    for (name, s) in [("a", &a), ("b", &b)] {
        let share = last_share(&s.log_text()).expect("a share");
        let rate = credeau_rate(s).await.expect("a rate");
        assert!(
            rates_for(share).contains(&rate) && rate > 1,
            "{name}: {rate}/min at share {share}"
        );
        shown.insert(name, (share, rate));
    }
    eprintln!(
        "late users done: {late_done}/{} in {took:?} after they were produced, \
         the first seen after {first:?} ({:?} after the 429s stopped); rates \
         shown: {shown:?}",
        late.len(),
        lifted.elapsed()
    );
    assert_eq!(late_done, late.len(), "A:\n{}", a.log_text());
    assert!(
        took < Duration::from_secs(20),
        "late users took {took:?}; A:\n{}",
        a.log_text()
    );

    // Exactly once, for everyone.
    let n = early.len() + late.len();
    let recs = read_topic(&topics.combined, Some(n), Duration::from_secs(120));
    let mut by_user: HashMap<String, usize> = HashMap::new();
    for r in &recs {
        *by_user
            .entry(r.value["user_id"].as_str().unwrap_or("?").to_string())
            .or_default() += 1;
    }
    for u in early.iter().chain(&late) {
        assert_eq!(by_user.get(u), Some(&1), "{u}");
    }
    drop((a, b));
    let _ = sim.shutdown().await;
}

//! The KIP-848 consumer group protocol (`kafka.group_protocol =
//! "consumer"`) against the run's Kafka 4 broker: the brokers assign the
//! partitions and own the session timeout, and the service still delivers
//! every user exactly once across a SIGKILL, a restart and a second member
//! joining the group. Needs a broker on Kafka 4.0 or newer (scripts/test.sh
//! starts one); the Kafka 3.9 stage does not run this file.

mod common;

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use common::*;
use insights_enricher::simulator::{self, SimulatorConfig};
use serde_json::json;

/// The group's protocol type and member count as the brokers report them
/// (Python's confluent-kafka AdminClient, DescribeConsumerGroups).
fn describe_group(group: &str) -> (String, usize) {
    let script = r#"
import sys
from confluent_kafka.admin import AdminClient
a = AdminClient({"bootstrap.servers": sys.argv[1]})
d = a.describe_consumer_groups([sys.argv[2]])[sys.argv[2]].result(timeout=20)
print(d.type.name, len(d.members))
"#;
    let out = Command::new(python())
        .args(["-c", script, &bootstrap(), group])
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "describe_consumer_groups failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let mut it = text.split_whitespace();
    let kind = it.next().unwrap_or_default().to_string();
    let members = it.next().and_then(|n| n.parse().ok()).unwrap_or(0);
    (kind, members)
}

/// Exactly one combined, one FinBox and one SMS event per user.
fn assert_exactly_once(topics: &Topics, users: &[String], services: &[&Service]) {
    let n = users.len();
    let combined = read_topic(&topics.combined, Some(n), Duration::from_secs(120));
    let combined = read_topic(
        &topics.combined,
        Some(combined.len() + 1),
        Duration::from_secs(3),
    );
    let mut by_user: HashMap<String, usize> = HashMap::new();
    for r in &combined {
        *by_user
            .entry(r.value["user_id"].as_str().unwrap_or("?").to_string())
            .or_default() += 1;
    }
    let missing: Vec<_> = users
        .iter()
        .filter(|u| !by_user.contains_key(*u))
        .take(5)
        .collect();
    let dups: Vec<_> = by_user.iter().filter(|(_, c)| **c > 1).take(5).collect();
    if !missing.is_empty() || !dups.is_empty() || combined.len() != n {
        for s in services {
            eprintln!("---- {}:\n{}", s.log.display(), s.log_excerpt(80));
        }
    }
    assert!(
        missing.is_empty(),
        "users without a combined event: {missing:?}"
    );
    assert!(dups.is_empty(), "duplicate combined events: {dups:?}");
    assert_eq!(combined.len(), n, "combined events");
    for topic in [&topics.finbox, &topics.sms] {
        let recs = read_topic(topic, Some(n), Duration::from_secs(5));
        assert_eq!(recs.len(), n, "{topic}: one event per user");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_consumer_group_protocol_is_exactly_once_across_a_kill_a_restart_and_a_second_member() {
    let sim = simulator::spawn(SimulatorConfig::default())
        .await
        .expect("simulator");
    sim_admin(
        &sim.base_url(),
        "/admin/scenarios",
        &json!({"default": {"finbox": {"predictors": 4}, "credeau": {"sms_count": 2}}}),
    )
    .await;
    sim_admin(
        &sim.base_url(),
        "/admin/limits",
        &json!({"finbox_per_minute": 0, "credeau_per_minute": 0}),
    )
    .await;
    let topics = Topics::new("kip848");
    create_topic(&topics.input, 3).await;
    let dir = tempfile::tempdir().unwrap();
    let group = unique("g");
    let mut env = service_env(&topics, &group, &sim.base_url());
    env.push(("INSIGHTS__KAFKA__GROUP_PROTOCOL".into(), "consumer".into()));
    env.push(("INSIGHTS__FINBOX__DEADLINE".into(), "10m".into()));
    env.push(("INSIGHTS__CREDEAU__DEADLINE".into(), "10m".into()));
    let mut a = Service::start(&env, &dir.path().join("a.log"));
    let mut users = produce_users(&topics.input, "first-", 400).await;
    eventually(Duration::from_secs(60), || {
        (read_topic(&topics.combined, Some(20), Duration::from_secs(2)).len() >= 20).then_some(())
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "no output with group.protocol=consumer:\n{}",
            a.log_excerpt(60)
        )
    });
    let (kind, members) = describe_group(&group);
    assert_eq!(kind, "CONSUMER", "the group's protocol");
    assert_eq!(members, 1);

    // SIGKILL mid-run and a restart under the same transactional id: the
    // new member gets the partitions once the brokers expire the old one's
    // session (group.consumer.session.timeout.ms).
    a.kill();
    a = Service::start(&env, &dir.path().join("a.log"));
    users.extend(produce_users(&topics.input, "second-", 200).await);

    // A second member: the brokers split the partitions between the two.
    let mut env_b = env.clone();
    env_b.push((
        "INSIGHTS__KAFKA__TRANSACTIONAL_ID_PREFIX".into(),
        unique("b"),
    ));
    let b = Service::start(&env_b, &dir.path().join("b.log"));
    let both = eventually(Duration::from_secs(60), || {
        let (_, m) = describe_group(&group);
        (m == 2).then_some(())
    })
    .await;
    assert!(
        both.is_some(),
        "the second member never joined: {:?}",
        describe_group(&group)
    );
    users.extend(produce_users(&topics.input, "third-", 200).await);
    assert_exactly_once(&topics, &users, &[&a, &b]);
    for s in [&a, &b] {
        let log = s.log_text();
        assert!(!log.contains("session.timeout.ms"), "{}", s.log_excerpt(40));
        assert!(!log.contains("rebalance error"), "{}", s.log_excerpt(40));
    }
    drop((a, b));
    let _ = sim.shutdown().await;
}

/// Both group protocols, without and with static membership.
const PROTOCOLS: [(&str, bool); 4] = [
    ("classic", false),
    ("classic", true),
    ("consumer", false),
    ("consumer", true),
];

/// The settings of one member for the measurements: the protocol, 10 s
/// sessions for the classic one (as the test broker's
/// group.consumer.session.timeout.ms for the other), and its pod name.
fn membership_env(protocol: &str, static_membership: bool, pod: &str) -> Vec<(String, String)> {
    [
        ("INSIGHTS__KAFKA__GROUP_PROTOCOL", protocol),
        ("INSIGHTS__KAFKA__SESSION_TIMEOUT", "10s"),
        ("INSIGHTS__KAFKA__MAX_POLL_INTERVAL", "15s"),
        (
            "INSIGHTS__KAFKA__STATIC_MEMBERSHIP",
            if static_membership { "true" } else { "false" },
        ),
        ("POD_NAME", pod),
    ]
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .to_vec()
}

/// A simulator whose users are all ready at once with tiny answers.
async fn tiny_answers_simulator() -> simulator::RunningSimulator {
    let sim = simulator::spawn(SimulatorConfig::default())
        .await
        .expect("simulator");
    sim_admin(
        &sim.base_url(),
        "/admin/scenarios",
        &json!({"default": {"finbox": {"predictors": 2}, "credeau": {"sms_count": 1}}}),
    )
    .await;
    sim
}

/// Restart-to-first-output after a SIGKILL, for both group protocols with
/// and without static membership (the figures in docs/benchmarks.md). The
/// classic protocol runs with a 10 s session timeout, the same as the test
/// broker's group.consumer.session.timeout.ms for the consumer protocol.
/// Not part of the suite: `cargo test --test group_protocol -- --ignored
/// --nocapture` against a Kafka 4 broker from scripts/kafka.sh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement for docs/benchmarks.md, not a check"]
async fn restart_to_first_output_by_protocol_and_membership() {
    let sim = tiny_answers_simulator().await;
    let mut figures = Vec::new();
    for (protocol, static_membership) in PROTOCOLS {
        let topics = Topics::new("restart");
        create_topic(&topics.input, 3).await;
        let dir = tempfile::tempdir().unwrap();
        let mut env = service_env(&topics, &unique("g"), &sim.base_url());
        env.extend(membership_env(protocol, static_membership, "bench-0"));
        let log = dir.path().join("service.log");
        let mut service = Service::start(&env, &log);
        produce_users(&topics.input, "before-", 20).await;
        eventually(Duration::from_secs(60), || {
            (!read_topic(&topics.combined, Some(1), Duration::from_secs(1)).is_empty())
                .then_some(())
        })
        .await
        .expect("first output");
        service.kill();
        let restarted = std::time::Instant::now();
        service = Service::start(&env, &log);
        let after = produce_users(&topics.input, "after-", 5).await;
        // A process that exits is started again at once, as Kubernetes
        // would (without its back-off).
        let mut restarts = 0;
        let back = eventually(Duration::from_secs(120), || {
            if matches!(service.child.try_wait(), Ok(Some(_))) {
                restarts += 1;
                service = Service::start(&env, &log);
            }
            read_topic(&topics.combined, None, Duration::from_millis(500))
                .iter()
                .any(|r| after.iter().any(|u| r.value["user_id"] == u.as_str()))
                .then(|| restarted.elapsed())
        })
        .await
        .expect("output after the restart");
        figures.push(format!(
            "{protocol:<8} static={static_membership:<5} restart to first output {:.1} s \
             ({restarts} more exits and starts)",
            back.as_secs_f64()
        ));
        drop(service);
    }
    eprintln!("{}", figures.join("\n"));
    let _ = sim.shutdown().await;
}

/// Waits until each service holds exactly the partitions in `want`;
/// returns how long that took.
async fn until_assigned(services: &[&Service], want: &[i64]) -> Option<Duration> {
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(120) {
        let mut held = Vec::new();
        for s in services {
            held.push(
                metric(s, "insights_assigned_partitions")
                    .await
                    .map_or(-1, |v| v as i64),
            );
        }
        if held == want {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

/// Onboards one user every `every` until `stop` is set; returns the users.
fn trickle(
    topic: String,
    every: Duration,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<Vec<String>> {
    tokio::spawn(async move {
        let p = producer();
        let mut users = Vec::new();
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let user = unique("t");
            produce(
                &p,
                &topic,
                Some(user.as_bytes()),
                Some(&onboarded_json(&format!("ev-{user}"), &user)),
            )
            .await;
            users.push(user);
            tokio::time::sleep(every).await;
        }
        users
    })
}

/// Percentile `q` of sorted `xs` (nearest rank).
fn percentile(xs: &[f64], q: f64) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    let i = ((q * xs.len() as f64).ceil() as usize).clamp(1, xs.len()) - 1;
    xs[i]
}

/// Rebalance times when scaling 1 → 3 → 1 instances, for both group
/// protocols with and without static membership (the figures in
/// docs/benchmarks.md). Users are onboarded at 10/s throughout; the three
/// instances run on 6 input partitions. Scale-out starts two processes,
/// scale-in stops them with SIGTERM (as Kubernetes does); each figure is
/// the time from that step until every instance's
/// `insights_assigned_partitions` shows the new split, and the onboarding
/// to combined-event latency of the users onboarded from 2 s before the
/// step to 2 s before the next (their worst and p95) against the steady
/// state before the first.
/// Every user must come out exactly once. Not part of the suite: `cargo
/// test --test group_protocol -- --ignored --nocapture` against a Kafka 4
/// broker from scripts/kafka.sh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement for docs/benchmarks.md, not a check"]
async fn scale_one_to_three_to_one_by_protocol_and_membership() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let sim = tiny_answers_simulator().await;
    let mut figures = Vec::new();
    for (protocol, static_membership) in PROTOCOLS {
        let name = format!(
            "{protocol}{}",
            if static_membership { "-static" } else { "" }
        );
        let topics = Topics::new("scale");
        create_topic(&topics.input, 6).await;
        let dir = tempfile::tempdir().unwrap();
        let env = service_env(&topics, &unique("g"), &sim.base_url());
        let member = |pod: &str| {
            let mut env = env.clone();
            env.extend(membership_env(protocol, static_membership, pod));
            env.push(("INSIGHTS__TOPICS__PARTITIONS".into(), "6".into()));
            Service::start(&env, &dir.path().join(format!("{pod}.log")))
        };
        let a = member("scale-0");
        until_assigned(&[&a], &[6]).await.expect("first member");
        let stop = Arc::new(AtomicBool::new(false));
        let producing = trickle(
            topics.input.clone(),
            Duration::from_millis(100),
            stop.clone(),
        );
        tokio::time::sleep(Duration::from_secs(10)).await;

        let out_at = chrono::Utc::now().timestamp_millis();
        let mut b = member("scale-1");
        let mut c = member("scale-2");
        let out = until_assigned(&[&a, &b, &c], &[2, 2, 2]).await;
        tokio::time::sleep(Duration::from_secs(20)).await;

        let in_at = chrono::Utc::now().timestamp_millis();
        let (tb, tc) = tokio::join!(
            tokio::task::spawn_blocking(move || {
                let t = b.terminate(Duration::from_secs(60));
                (b, t)
            }),
            tokio::task::spawn_blocking(move || {
                let t = c.terminate(Duration::from_secs(60));
                (c, t)
            }),
        );
        let ((b, b_stop), (c, c_stop)) = (tb.unwrap(), tc.unwrap());
        let back = until_assigned(&[&a], &[6]).await;
        tokio::time::sleep(Duration::from_secs(20)).await;
        stop.store(true, Ordering::Relaxed);
        let users = producing.await.unwrap();

        let combined = read_topic(&topics.combined, Some(users.len()), Duration::from_secs(60));
        let mut seen: HashMap<String, usize> = HashMap::new();
        let mut latency: Vec<(i64, f64)> = Vec::new();
        for r in &combined {
            let user = r.value["user_id"].as_str().unwrap_or("?").to_string();
            *seen.entry(user).or_default() += 1;
            let onboarded = r.value["onboarded_at"].as_i64().unwrap_or(0);
            let at = r.timestamp.unwrap_or(0);
            latency.push((onboarded, (at - onboarded) as f64 / 1000.0));
        }
        let dups = seen.values().filter(|n| **n > 1).count();
        let missing = users.iter().filter(|u| !seen.contains_key(*u)).count();
        let window = |from: i64, to: i64| {
            let mut xs: Vec<f64> = latency
                .iter()
                .filter(|(o, _)| *o >= from - 2_000 && *o < to - 2_000)
                .map(|(_, l)| *l)
                .collect();
            xs.sort_by(f64::total_cmp);
            (
                percentile(&xs, 0.95),
                xs.last().copied().unwrap_or(f64::NAN),
            )
        };
        let mut steady: Vec<f64> = latency
            .iter()
            .filter(|(o, _)| *o < out_at - 2_000)
            .map(|(_, l)| *l)
            .collect();
        steady.sort_by(f64::total_cmp);
        let secs =
            |d: Option<Duration>| d.map_or("never".into(), |d| format!("{:.1} s", d.as_secs_f64()));
        let (out_p95, out_max) = window(out_at, in_at);
        let (in_p95, in_max) = window(in_at, i64::MAX);
        figures.push(format!(
            "{name:<16} 1→3 split {:>7}, users p95/max {out_p95:.1}/{out_max:.1} s | \
             3→1 SIGTERM took {}/{}, all back {:>7}, users p95/max {in_p95:.1}/{in_max:.1} s | \
             steady p50/p95 {:.1}/{:.1} s | {} users, {missing} missing, {dups} duplicated",
            secs(out),
            secs(b_stop),
            secs(c_stop),
            secs(back),
            percentile(&steady, 0.5),
            percentile(&steady, 0.95),
            users.len(),
        ));
        eprintln!("{}", figures.last().unwrap());
        if missing > 0 || dups > 0 || out.is_none() || back.is_none() {
            for s in [&a, &b, &c] {
                eprintln!("---- {}:\n{}", s.log.display(), s.log_excerpt(60));
            }
        }
        drop((a, b, c));
    }
    eprintln!("{}", figures.join("\n"));
    let _ = sim.shutdown().await;
}

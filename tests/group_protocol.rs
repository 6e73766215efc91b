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

/// Restart-to-first-output after a SIGKILL, for both group protocols with
/// and without static membership (the figures in docs/benchmarks.md). The
/// classic protocol runs with a 10 s session timeout, the same as the test
/// broker's group.consumer.session.timeout.ms for the consumer protocol.
/// Not part of the suite: `cargo test --test group_protocol -- --ignored
/// --nocapture` against a Kafka 4 broker from scripts/kafka.sh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement for docs/benchmarks.md, not a check"]
async fn restart_to_first_output_by_protocol_and_membership() {
    let sim = simulator::spawn(SimulatorConfig::default())
        .await
        .expect("simulator");
    sim_admin(
        &sim.base_url(),
        "/admin/scenarios",
        &json!({"default": {"finbox": {"predictors": 2}, "credeau": {"sms_count": 1}}}),
    )
    .await;
    let mut figures = Vec::new();
    for (protocol, static_membership) in [
        ("classic", false),
        ("classic", true),
        ("consumer", false),
        ("consumer", true),
    ] {
        let topics = Topics::new("restart");
        create_topic(&topics.input, 3).await;
        let dir = tempfile::tempdir().unwrap();
        let mut env = service_env(&topics, &unique("g"), &sim.base_url());
        env.extend(
            [
                ("INSIGHTS__KAFKA__GROUP_PROTOCOL", protocol),
                ("INSIGHTS__KAFKA__SESSION_TIMEOUT", "10s"),
                ("INSIGHTS__KAFKA__MAX_POLL_INTERVAL", "15s"),
                (
                    "INSIGHTS__KAFKA__STATIC_MEMBERSHIP",
                    if static_membership { "true" } else { "false" },
                ),
                ("POD_NAME", "bench-0"),
            ]
            .map(|(k, v)| (k.to_string(), v.to_string())),
        );
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

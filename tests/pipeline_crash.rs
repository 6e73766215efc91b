//! Crash safety against the real broker: the service is SIGKILLed at random
//! moments during a run of 2,000 users and restarted each time; a broker is
//! restarted mid-run; two instances share a group and one is killed. In
//! every case each user ends with exactly one combined event and no
//! provider event is duplicated.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;
use insights_enricher::simulator::{self, RunningSimulator, SimulatorConfig};
use rand::Rng;
use serde_json::json;

async fn simulator_with_mix() -> RunningSimulator {
    let sim = simulator::spawn(SimulatorConfig::default())
        .await
        .expect("simulator");
    let scenarios = json!({
        "default": {"finbox": {"predictors": 8}, "credeau": {"sms_count": 3}},
        "prefixes": {
            "slow-": {"finbox": {"ready_after": "10s", "predictors": 8}, "credeau": {"ready_after": "4s", "sms_count": 3}}
        }
    });
    sim_admin(&sim.base_url(), "/admin/scenarios", &scenarios).await;
    // Throughput, not the providers' limits, is under test here.
    sim_admin(
        &sim.base_url(),
        "/admin/limits",
        &json!({"finbox_per_minute": 0, "credeau_per_minute": 0}),
    )
    .await;
    sim
}

/// The service settings for these tests: long deadlines, since a backlog
/// of thousands of users outlives the short ones the other tests use.
fn crash_env(topics: &Topics, group: &str, sim: &RunningSimulator) -> Vec<(String, String)> {
    let mut env = service_env(topics, group, &sim.base_url());
    env.push(("INSIGHTS__FINBOX__DEADLINE".into(), "10m".into()));
    env.push(("INSIGHTS__CREDEAU__DEADLINE".into(), "10m".into()));
    env
}

async fn produce_users(topic: &str, n: usize) -> Vec<String> {
    let p = producer();
    let mut events = Vec::with_capacity(n);
    let mut futures = Vec::new();
    for i in 0..n {
        let prefix = if i % 4 == 0 { "slow-" } else { "fast-" };
        let user = format!("{prefix}{i}-{}", unique("u"));
        let ev = format!("ev-{user}");
        let value = onboarded_json(&ev, &user);
        events.push(ev);
        let p = p.clone();
        let topic = topic.to_string();
        futures.push(async move { produce(&p, &topic, Some(user.as_bytes()), Some(&value)).await });
    }
    futures::future::join_all(futures).await;
    events
}

/// `assert_exactly_once`, and on failure the tail of each service's log.
fn assert_exactly_once_or_show(
    topics: &Topics,
    events: &[String],
    context: &str,
    services: &[&Service],
) {
    let check = std::panic::catch_unwind(|| assert_exactly_once(topics, events, context));
    if let Err(e) = check {
        for s in services {
            let log = s.log_text();
            let tail: Vec<&str> = log.lines().rev().take(80).collect();
            eprintln!(
                "---- tail of {}:\n{}",
                s.log.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        std::panic::resume_unwind(e);
    }
}

/// Checks the three output topics: exactly one combined event per user,
/// one FinBox and one SMS event per user (all scenarios complete).
fn assert_exactly_once(topics: &Topics, events: &[String], context: &str) {
    let n = events.len();
    let combined = read_topic(&topics.combined, Some(n), Duration::from_secs(120));
    let combined = if combined.len() >= n {
        read_topic(&topics.combined, None, Duration::from_secs(3))
    } else {
        combined
    };
    let count = |recs: &[ReadRecord]| {
        let mut m: HashMap<String, usize> = HashMap::new();
        for r in recs {
            *m.entry(r.value["event_id"].as_str().unwrap_or("?").to_string())
                .or_default() += 1;
        }
        m
    };
    let c = count(&combined);
    let missing: Vec<_> = events
        .iter()
        .filter(|e| !c.contains_key(*e))
        .take(5)
        .collect();
    let dups: Vec<_> = c.iter().filter(|(_, n)| **n > 1).take(5).collect();
    assert!(
        missing.is_empty(),
        "{context}: users without a combined event (first 5): {missing:?}"
    );
    assert!(
        dups.is_empty(),
        "{context}: duplicate combined events: {dups:?}"
    );
    assert_eq!(combined.len(), n, "{context}: combined events");
    for r in &combined {
        assert_eq!(
            r.value["finbox"]["outcome"], "complete",
            "{context}: {}",
            r.value
        );
        assert_eq!(
            r.value["credeau"]["outcome"], "complete",
            "{context}: {}",
            r.value
        );
    }
    for (topic, what) in [(&topics.finbox, "finbox"), (&topics.sms, "sms")] {
        // The combined events are all there, so these are committed too: a
        // long idle costs nothing, and on a loaded machine the reader can
        // wait seconds between fetches.
        let recs = read_topic(topic, Some(n), Duration::from_secs(30));
        let m = count(&recs);
        let dups: Vec<_> = m.iter().filter(|(_, n)| **n > 1).take(5).collect();
        assert!(
            dups.is_empty(),
            "{context}: duplicate {what} events: {dups:?}"
        );
        assert_eq!(recs.len(), n, "{context}: {what} events");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_loses_and_duplicates_nothing() {
    let sim = simulator_with_mix().await;
    let topics = Topics::new("crash");
    create_topic(&topics.input, 3).await;
    let dir = tempfile::tempdir().unwrap();
    let mut env = crash_env(&topics, &unique("g"), &sim);
    if let Ok(d) = std::env::var("TEST_KAFKA_DEBUG") {
        env.push(("INSIGHTS__KAFKA__EXTRA__DEBUG".into(), d));
    }
    let log = std::env::var("TEST_SERVICE_LOG")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| dir.path().join("service.log"));
    let mut service = Service::start(&env, &log);
    let events = produce_users(&topics.input, 2000).await;
    let mut rng = rand::rng();
    for kill in 0..4 {
        let wait = rng.random_range(1_500..5_000);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        service.kill();
        eprintln!("kill {kill} after {wait} ms");
        service = Service::start(&env, &log);
    }
    assert_exactly_once_or_show(&topics, &events, "after 4 SIGKILLs", &[&service]);
    drop(service);
    let _ = sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_in_one_group_survive_one_being_killed() {
    let sim = simulator_with_mix().await;
    let topics = Topics::new("pair");
    create_topic(&topics.input, 4).await;
    let dir = tempfile::tempdir().unwrap();
    let group = unique("g");
    let mut env_a = crash_env(&topics, &group, &sim);
    env_a.push((
        "INSIGHTS__KAFKA__TRANSACTIONAL_ID_PREFIX".into(),
        unique("a"),
    ));
    let mut env_b = crash_env(&topics, &group, &sim);
    env_b.push((
        "INSIGHTS__KAFKA__TRANSACTIONAL_ID_PREFIX".into(),
        unique("b"),
    ));
    let mut a = Service::start(&env_a, &dir.path().join("a.log"));
    let b = Service::start(&env_b, &dir.path().join("b.log"));
    let events = produce_users(&topics.input, 2000).await;
    tokio::time::sleep(Duration::from_millis(3_000)).await;
    a.kill();
    assert_exactly_once_or_show(&topics, &events, "one of two instances killed", &[&a, &b]);
    let _ = sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_within_the_bound_and_the_next_start_resumes() {
    let sim = simulator_with_mix().await;
    let topics = Topics::new("term");
    create_topic(&topics.input, 3).await;
    let dir = tempfile::tempdir().unwrap();
    let env = crash_env(&topics, &unique("g"), &sim);
    let log = dir.path().join("service.log");
    let mut service = Service::start(&env, &log);
    let events = produce_users(&topics.input, 500).await;
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let started = Instant::now();
    let took = service.terminate(Duration::from_secs(20));
    let took = took.unwrap_or_else(|| panic!("no exit within 20 s; log:\n{}", service.log_text()));
    // The configured bound is 10 s (INSIGHTS__SHUTDOWN__TIMEOUT).
    assert!(took <= Duration::from_secs(10), "shutdown took {took:?}");
    eprintln!("SIGTERM to exit: {:?}", started.elapsed());
    let _service = Service::start(&env, &log);
    assert_exactly_once(&topics, &events, "after SIGTERM and restart");
    let _ = sim.shutdown().await;
}

/// The chart's `terminationGracePeriodSeconds` and the shipped
/// `shutdown.timeout`, read from the files that ship them.
fn shipped_shutdown_bounds() -> (Duration, Duration) {
    let values = std::fs::read_to_string(repo_root().join("helm/insights-enricher/values.yaml"))
        .expect("values.yaml");
    let grace: u64 = values
        .lines()
        .find_map(|l| l.strip_prefix("terminationGracePeriodSeconds:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("terminationGracePeriodSeconds in values.yaml");
    let defaults: toml::Value = insights_enricher::config::DEFAULTS_TOML
        .parse()
        .expect("default.toml");
    let timeout = humantime::parse_duration(
        defaults["shutdown"]["timeout"]
            .as_str()
            .expect("shutdown.timeout"),
    )
    .expect("a duration");
    (Duration::from_secs(grace), timeout)
}

/// SIGTERM with the shipped shutdown timeout while users' Credeau calls
/// hang and batches wait behind them: the process ends, its last commit
/// included, within the timeout and so within the chart's grace period,
/// and the next process finishes the rest exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_hanging_calls_exits_within_the_charts_grace_period() {
    let (grace, timeout) = shipped_shutdown_bounds();
    assert!(
        timeout < grace,
        "shutdown.timeout {timeout:?} vs grace {grace:?}"
    );
    let sim = simulator::spawn(SimulatorConfig::default())
        .await
        .expect("simulator");
    sim_admin(
        &sim.base_url(),
        "/admin/scenarios",
        &json!({
            "default": {"finbox": {"predictors": 3}, "credeau": {"sms_count": 2}},
            "prefixes": {"slow-": {"finbox": {"predictors": 3}, "credeau": {"sms_count": 2, "faults": {"latency": "65s"}}}}
        }),
    )
    .await;
    let topics = Topics::new("grace");
    create_topic(&topics.input, 3).await;
    let dir = tempfile::tempdir().unwrap();
    let mut env: Vec<(String, String)> = crash_env(&topics, &unique("g"), &sim)
        .into_iter()
        .filter(|(k, _)| k != "INSIGHTS__SHUTDOWN__TIMEOUT")
        .collect();
    env.extend(
        [
            // Never cut short: the hanging calls run until SIGTERM.
            ("INSIGHTS__SCHEDULE__STRAGGLER_WAIT", "0s"),
            ("INSIGHTS__SCHEDULE__RECORD_BUDGET", "15s"),
            ("INSIGHTS__KAFKA__MAX_POLL_INTERVAL", "60s"),
            ("INSIGHTS__SERVER__STALL_TIMEOUT", "60s"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    let log = dir.path().join("service.log");
    let mut service = Service::start(&env, &log);
    wait_ready(&service).await;
    let mut events = Vec::new();
    let p = producer();
    for i in 0..400 {
        let user = format!(
            "{}{i}-{}",
            if i % 40 == 0 { "slow-" } else { "fast-" },
            unique("u")
        );
        let ev = format!("ev-{user}");
        produce(
            &p,
            &topics.input,
            Some(user.as_bytes()),
            Some(&onboarded_json(&ev, &user)),
        )
        .await;
        events.push(ev);
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let took = service.terminate(grace).unwrap_or_else(|| {
        panic!(
            "no exit within the grace period {grace:?}:\n{}",
            service.log_text()
        )
    });
    eprintln!("SIGTERM to exit with hanging calls: {took:?} (shutdown.timeout {timeout:?}, grace {grace:?})");
    assert!(
        took <= timeout,
        "exit took {took:?}, above shutdown.timeout {timeout:?}"
    );
    // The calls still hanging were handed back: the next process (with the
    // providers well again) finishes every user exactly once.
    sim_admin(
        &sim.base_url(),
        "/admin/scenarios",
        &json!({"default": {"finbox": {"predictors": 3}, "credeau": {"sms_count": 2}}}),
    )
    .await;
    let next = Service::start(&env, &log);
    let combined = read_topic(
        &topics.combined,
        Some(events.len()),
        Duration::from_secs(60),
    );
    let again = read_topic(&topics.combined, None, Duration::from_secs(3));
    let mut seen: HashMap<String, usize> = HashMap::new();
    for r in &combined {
        *seen
            .entry(r.value["event_id"].as_str().unwrap_or("?").to_string())
            .or_default() += 1;
    }
    let missing = events.iter().filter(|e| !seen.contains_key(*e)).count();
    let twice = seen.values().filter(|n| **n > 1).count();
    assert_eq!(
        (missing, twice, again.len()),
        (0, 0, events.len()),
        "{}",
        next.log_text()
    );
    drop(next);
    let _ = sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "restarts its broker: scripts/test.sh runs it with --ignored against a broker of its own"]
async fn a_broker_restart_mid_run_loses_and_duplicates_nothing() {
    let Ok(kafka_dir) = std::env::var("KAFKA_DIR") else {
        panic!("KAFKA_DIR is not set: run the tests with ./scripts/test.sh");
    };
    let sim = simulator_with_mix().await;
    let topics = Topics::new("brk");
    create_topic(&topics.input, 3).await;
    let dir = tempfile::tempdir().unwrap();
    let env = crash_env(&topics, &unique("g"), &sim);
    let service = Service::start(&env, &dir.path().join("service.log"));
    let events = produce_users(&topics.input, 2000).await;
    tokio::time::sleep(Duration::from_millis(3_000)).await;
    let status = std::process::Command::new(repo_root().join("scripts/kafka.sh"))
        .args(["restart", "--dir", &kafka_dir])
        .status()
        .expect("kafka.sh restart");
    assert!(status.success(), "broker restart failed");
    assert_exactly_once_or_show(&topics, &events, "after a broker restart", &[&service]);
    let _ = sim.shutdown().await;
}

/// Stops the shared broker for `down`, starts it again, and returns the
/// wall-clock time (ms) it was back.
fn broker_outage(kafka_dir: &str, down: Duration) -> i64 {
    let kafka = |cmd: &str| {
        let status = std::process::Command::new(repo_root().join("scripts/kafka.sh"))
            .args([cmd, "--dir", kafka_dir])
            .stdout(std::process::Stdio::null())
            .status()
            .expect("kafka.sh");
        assert!(status.success(), "kafka.sh {cmd} failed");
    };
    kafka("stop");
    std::thread::sleep(down);
    kafka("start");
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// Seconds from the broker's return until a combined event completed after
/// it can be read.
async fn resumed_after(topics: &Topics, back_ms: i64, service: &Service) -> f64 {
    let began = Instant::now();
    let resumed = eventually(Duration::from_secs(120), || {
        read_topic(&topics.combined, None, Duration::from_millis(500))
            .iter()
            .any(|r| r.value["completed_at"].as_i64().unwrap_or(0) >= back_ms)
            .then_some(())
    })
    .await;
    if resumed.is_none() {
        let kept = service.keep_log(&topics.input);
        panic!(
            "no combined event completed within 120 s of the broker's return; \
             whole log in {}; its last lines that say something:\n{}",
            kept.display(),
            service.log_excerpt(80)
        );
    }
    began.elapsed().as_secs_f64()
}

/// A 9 s broker restart and a 60 s outage (the transaction timeout) while
/// transactions are in flight: the service stays up, keeps its group, and
/// resumes within seconds of each return, losing and duplicating nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "stops its broker: scripts/test.sh runs it with --ignored against a broker of its own"]
async fn broker_outages_of_9_s_and_60_s_are_ridden_out() {
    let Ok(kafka_dir) = std::env::var("KAFKA_DIR") else {
        panic!("KAFKA_DIR is not set: run the tests with ./scripts/test.sh");
    };
    let sim = simulator_with_mix().await;
    let topics = Topics::new("outage");
    create_topic(&topics.input, 3).await;
    let dir = tempfile::tempdir().unwrap();
    let mut env = crash_env(&topics, &unique("g"), &sim);
    // The shipped transaction timeout, session timeout and poll interval,
    // as the chart's StatefulSet mode runs them: a static member, which
    // takes its partitions back at once after an outage that outlived its
    // session (a dynamic member waits for its old membership to expire).
    env.extend(
        [
            ("INSIGHTS__KAFKA__TRANSACTION_TIMEOUT", "60s"),
            ("INSIGHTS__KAFKA__SESSION_TIMEOUT", "45s"),
            ("INSIGHTS__KAFKA__MAX_POLL_INTERVAL", "60s"),
            ("INSIGHTS__KAFKA__STATIC_MEMBERSHIP", "true"),
            ("POD_NAME", "insights-enricher-0"),
            // What the loop did around each outage, kept on failure.
            (
                "INSIGHTS__LOG__LEVEL",
                "info,insights_enricher::pipeline=debug",
            ),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    let log = dir.path().join("service.log");
    let mut service = Service::start(&env, &log);
    wait_ready(&service).await;
    let mut events = Vec::new();
    let mut figures = Vec::new();
    for down in [Duration::from_secs(9), Duration::from_secs(60)] {
        events.extend(produce_users(&topics.input, 1000).await);
        // Transactions in flight, a quarter of the users waiting in tiers.
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        let back_ms = broker_outage(&kafka_dir, down);
        // A few users onboarded after the return: the service may have
        // finished every earlier user before the broker was declared ready
        // (it reconnects before kafka.sh's own check ends), and then only
        // new work can show it resumed.
        events.extend(produce_users(&topics.input, 20).await);
        let resumed = resumed_after(&topics, back_ms, &service).await;
        eprintln!("broker down {down:?}: output resumed {resumed:.1} s after its return");
        figures.push((down, resumed));
        if let Some((status, _)) = service.wait_exit(Duration::ZERO) {
            panic!(
                "the service exited ({status}) during a {down:?} outage; log:\n{}",
                service.log_text()
            );
        }
    }
    assert_exactly_once_or_show(&topics, &events, "after broker outages", &[&service]);
    let text = service.log_text();
    for (down, resumed) in figures {
        let events: Vec<&str> = text
            .lines()
            .filter(|l| !l.contains("DEBUG") && (l.contains("WARN") || l.contains("INFO")))
            .collect();
        assert!(
            resumed <= 20.0,
            "output resumed {resumed:.1} s after a {down:?} outage; log:\n{}",
            events.join("\n")
        );
    }
    assert!(
        !text.contains("kafka transaction failed fatally"),
        "a transaction failed fatally"
    );
    // The 60 s outage outlived the session (45 s): the assignment was lost
    // and given up at once, not held for the open transaction (held across
    // the brokers' return, librdkafka fences the static member fatally).
    assert!(
        text.contains("assignment lost (session expired)"),
        "the 60 s outage did not expire the session; log:\n{}",
        service.log_excerpt(80)
    );
    assert!(
        !text.contains("FencedInstanceId"),
        "the consumer was fenced"
    );
    drop(service);
    let _ = sim.shutdown().await;
}

/// With the production session timeout (45 s), a pod restarted under the
/// same name is a static member (KIP-345): it takes its partitions back at
/// once, without waiting for the session to expire or a rebalance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_static_member_is_back_in_seconds_with_the_production_session_timeout() {
    let sim = simulator_with_mix().await;
    let topics = Topics::new("static");
    create_topic(&topics.input, 3).await;
    let dir = tempfile::tempdir().unwrap();
    let mut env = crash_env(&topics, &unique("g"), &sim);
    env.extend(
        [
            ("INSIGHTS__KAFKA__SESSION_TIMEOUT", "45s"),
            ("INSIGHTS__KAFKA__MAX_POLL_INTERVAL", "60s"),
            ("INSIGHTS__KAFKA__STATIC_MEMBERSHIP", "true"),
            ("POD_NAME", "insights-enricher-0"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    let log = dir.path().join("service.log");
    let mut service = Service::start(&env, &log);
    let mut events = produce_users(&topics.input, 300).await;
    eventually(Duration::from_secs(60), || {
        (read_topic(&topics.combined, Some(50), Duration::from_secs(2)).len() >= 50).then_some(())
    })
    .await
    .expect("first combined events");
    service.kill();
    let restarted = Instant::now();
    service = Service::start(&env, &log);
    // Users onboarded after the restart: the first of their combined
    // events says when the service was back.
    let after = produce_users(&topics.input, 30).await;
    let back = eventually(Duration::from_secs(60), || {
        let recs = read_topic(&topics.combined, None, Duration::from_millis(500));
        recs.iter()
            .any(|r| after.iter().any(|e| r.value["event_id"] == e.as_str()))
            .then(|| restarted.elapsed())
    })
    .await
    .expect("a combined event for a user onboarded after the restart");
    eprintln!("restart to the first new combined event: {back:?}");
    assert!(
        back < Duration::from_secs(10),
        "back after {back:?} (session timeout 45 s)"
    );
    events.extend(after);
    assert_exactly_once_or_show(&topics, &events, "static member restarted", &[&service]);
    drop(service);
    let _ = sim.shutdown().await;
}

//! Production's bad days against the real broker and the simulator: a
//! backlog several times what the documented Credeau limit serves within
//! `max.poll.interval`, and a provider brown-out where some users' calls
//! hang. The service must keep its group membership (no MAXPOLL), ask each
//! provider once per ready user, and publish exactly one combined event
//! per user.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;
use insights_enricher::simulator::{self, RunningSimulator, SimulatorConfig};
use serde_json::json;

async fn simulator_with(scenarios: serde_json::Value) -> RunningSimulator {
    // The documented limits: FinBox 6,000/min, Credeau 1,000/min.
    let sim = simulator::spawn(SimulatorConfig::default())
        .await
        .expect("simulator");
    sim_admin(&sim.base_url(), "/admin/scenarios", &scenarios).await;
    sim
}

async fn stats(sim: &RunningSimulator) -> serde_json::Value {
    reqwest::get(format!("{}/admin/stats", sim.base_url()))
        .await
        .expect("stats")
        .json()
        .await
        .expect("stats json")
}

async fn produce_users(topic: &str, users: &[String]) {
    let p = producer();
    let futures = users.iter().map(|user| {
        let p = p.clone();
        let value = onboarded_json(&format!("ev-{user}"), user);
        async move { produce(&p, topic, Some(user.as_bytes()), Some(&value)).await }
    });
    futures::future::join_all(futures).await;
}

/// Combined events per user id, read by the independent read_committed
/// reader once `n` are there (or nothing new came for `idle`).
fn combined_by_user(topics: &Topics, n: usize, idle: Duration) -> HashMap<String, Vec<ReadRecord>> {
    let mut by_user: HashMap<String, Vec<ReadRecord>> = HashMap::new();
    for r in read_topic(&topics.combined, Some(n), idle) {
        let user = r.value["user_id"].as_str().unwrap_or("?").to_string();
        by_user.entry(user).or_default().push(r);
    }
    by_user
}

fn assert_each_once(by_user: &HashMap<String, Vec<ReadRecord>>, users: &[String], log: &str) {
    let missing: Vec<_> = users.iter().filter(|u| !by_user.contains_key(*u)).collect();
    let twice: Vec<_> = by_user
        .iter()
        .filter(|(_, v)| v.len() > 1)
        .map(|(u, _)| u)
        .collect();
    let tail: Vec<&str> = log.lines().rev().take(40).collect();
    assert!(
        missing.is_empty() && twice.is_empty(),
        "{} missing (e.g. {:?}), {} twice (e.g. {:?}); log tail:\n{}",
        missing.len(),
        missing.first(),
        twice.len(),
        twice.first(),
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    );
}

/// librdkafka's words for a member that stopped polling, and for what
/// follows it.
fn assert_no_poll_interval_trouble(log: &str) {
    for needle in ["MAXPOLL", "maximum poll interval", "Unknown member"] {
        let hits: Vec<&str> = log.lines().filter(|l| l.contains(needle)).take(3).collect();
        assert!(hits.is_empty(), "{needle} in the service log: {hits:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_beyond_the_credeau_limit_is_worked_off_once_without_a_missed_poll() {
    let sim = simulator_with(json!({
        "default": {"finbox": {"predictors": 3}, "credeau": {"sms_count": 2}}
    }))
    .await;
    let topics = Topics::new("backlog");
    create_topic(&topics.input, 3).await;
    // 2,000 users need 120 s of Credeau's 1,000/min: four times the
    // poll interval below.
    let users: Vec<String> = (0..2000).map(|i| format!("b{i}-{}", unique("u"))).collect();
    produce_users(&topics.input, &users).await;

    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("service.log");
    let mut env = service_env(&topics, &unique("g"), &sim.base_url());
    env.extend(
        [
            ("INSIGHTS__FINBOX__RATE_LIMIT_PER_MINUTE", "6000"),
            ("INSIGHTS__CREDEAU__RATE_LIMIT_PER_MINUTE", "1000"),
            ("INSIGHTS__KAFKA__MAX_POLL_INTERVAL", "30s"),
            ("INSIGHTS__KAFKA__SESSION_TIMEOUT", "10s"),
            ("INSIGHTS__FINBOX__DEADLINE", "30m"),
            ("INSIGHTS__CREDEAU__DEADLINE", "30m"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    let service = Service::start(&env, &log);
    let by_user = combined_by_user(&topics, users.len(), Duration::from_secs(200));
    // Anything sent twice would be there a moment later.
    let again = read_topic(&topics.combined, None, Duration::from_secs(3));
    let text = service.log_text();
    drop(service);
    assert_each_once(&by_user, &users, &text);
    assert_eq!(again.len(), users.len(), "combined events after a pause");
    assert_no_poll_interval_trouble(&text);
    let s = stats(&sim).await;
    assert_eq!(s["finbox"]["requests"], users.len(), "{s}");
    assert_eq!(s["credeau"]["requests"], users.len(), "{s}");
    assert_eq!(s["credeau"]["by_status"].get("429"), None, "{s}");
    let _ = sim.shutdown().await;
}

/// A budget of 4 MiB with answers of 2,000 SMS (about 1.8 MB) every tenth
/// user: each such answer is over a quarter of the budget, so it waits
/// unread until the budget has room or its record is the oldest
/// unfinished. None may be lost, held for good or published twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_large_against_the_byte_budget_wait_their_turn_and_every_user_is_published_once() {
    let sim = simulator_with(json!({
        "default": {"finbox": {"predictors": 3}, "credeau": {"sms_count": 2}},
        "prefixes": {"big-": {"finbox": {"predictors": 3}, "credeau": {"sms_count": 2000}}}
    }))
    .await;
    let topics = Topics::new("large");
    create_topic(&topics.input, 3).await;
    let users: Vec<String> = (0..200)
        .map(|i| {
            let kind = if i % 10 == 3 { "big" } else { "small" };
            format!("{kind}-{i}-{}", unique("u"))
        })
        .collect();
    produce_users(&topics.input, &users).await;

    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("service.log");
    let mut env = service_env(&topics, &unique("g"), &sim.base_url());
    env.extend(
        [
            ("INSIGHTS__SCHEDULE__MAX_IN_FLIGHT_BYTES", "4194304"),
            ("INSIGHTS__CREDEAU__CNT_SMS_THRESHOLD", "2000"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    let service = Service::start(&env, &log);
    let by_user = combined_by_user(&topics, users.len(), Duration::from_secs(60));
    let sms = read_topic(&topics.sms, None, Duration::from_secs(3));
    let text = service.log_text();
    let port = metrics_port(&text).expect("metrics port");
    let page = try_metrics_page(port).await.expect("/metrics");
    drop(service);
    assert_each_once(&by_user, &users, &text);
    // Every big answer went through the wait for room, and no other did.
    let scrape = prometheus_parse::Scrape::parse(page.lines().map(|l| Ok(l.to_string())))
        .expect("prometheus text");
    let large: f64 = scrape
        .samples
        .iter()
        .filter(|s| s.metric == "insights_large_answers_total")
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum();
    let big = users.iter().filter(|u| u.starts_with("big-")).count();
    assert_eq!(large, big as f64, "large answers counted:\n{page}");
    let mut entries: HashMap<String, (usize, Vec<i64>)> = HashMap::new();
    for r in &sms {
        let user = r.value["user_id"].as_str().unwrap_or("?").to_string();
        assert_eq!(
            r.value["total_sms"],
            if user.starts_with("big-") { 2000 } else { 2 }
        );
        let e = entries.entry(user).or_default();
        e.0 += r.value["entries"].as_array().map_or(0, Vec::len);
        e.1.push(r.value["part"].as_i64().unwrap_or(0));
    }
    for u in &users {
        let (n, mut parts) = entries.get(u).cloned().unwrap_or_default();
        let want = if u.starts_with("big-") { 2000 } else { 2 };
        assert_eq!(n, want, "{u}: SMS entries published across its parts");
        parts.sort_unstable();
        let expected: Vec<i64> = (1..=parts.len() as i64).collect();
        assert_eq!(parts, expected, "{u}: each part once");
    }
    let _ = sim.shutdown().await;
}

/// Which users misbehave in a brown-out run.
#[derive(Clone, Copy)]
enum Brownout {
    /// Nobody: the baseline.
    None,
    /// Credeau answers these users after 65 s (above its 30 s timeout).
    CredeauHangs,
    /// FinBox answers these users with 503, every time.
    FinboxStorm,
}

/// What one brown-out run saw.
struct BrownoutRun {
    /// Seconds from producing the users until every well-behaved one had
    /// its combined event.
    fast_done: f64,
    /// The misbehaving users' combined events (each exactly once).
    slow: HashMap<String, serde_json::Value>,
    log: String,
    /// /healthz answers other than 200 seen while the run went on.
    unhealthy: usize,
}

/// One run of the brown-out: `n` users, every 20th of them misbehaving as
/// `kind` says. The providers' deadlines are 1 minute so the misbehaving
/// users end within the test.
async fn brownout_run(n: usize, kind: Brownout) -> BrownoutRun {
    let slow_faults = match kind {
        Brownout::None | Brownout::CredeauHangs => json!({
            "finbox": {"predictors": 3},
            "credeau": {"sms_count": 2, "faults": {"latency": "65s"}}
        }),
        Brownout::FinboxStorm => json!({
            "finbox": {"predictors": 3, "faults": {"server_error_ratio": 1.0}},
            "credeau": {"sms_count": 2}
        }),
    };
    let sim = simulator_with(json!({
        "default": {"finbox": {"predictors": 3}, "credeau": {"sms_count": 2}},
        "prefixes": {"slow-": slow_faults}
    }))
    .await;
    sim_admin(
        &sim.base_url(),
        "/admin/limits",
        &json!({"finbox_per_minute": 0, "credeau_per_minute": 0}),
    )
    .await;
    let topics = Topics::new("brownout");
    create_topic(&topics.input, 3).await;
    let users: Vec<String> = (0..n)
        .map(|i| {
            let prefix = match kind {
                Brownout::None => "fast-",
                _ if i % 20 == 0 => "slow-",
                _ => "fast-",
            };
            format!("{prefix}{i}-{}", unique("u"))
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("service.log");
    let mut env = service_env(&topics, &unique("g"), &sim.base_url());
    env.extend(
        [
            // The shipped poll interval, stall timeout, record budget and
            // straggler wait.
            ("INSIGHTS__KAFKA__MAX_POLL_INTERVAL", "60s"),
            ("INSIGHTS__SERVER__STALL_TIMEOUT", "60s"),
            ("INSIGHTS__SCHEDULE__RECORD_BUDGET", "15s"),
            ("INSIGHTS__CREDEAU__REQUEST_TIMEOUT", "30s"),
            ("INSIGHTS__CREDEAU__DEADLINE", "1m"),
            ("INSIGHTS__FINBOX__DEADLINE", "1m"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    let service = Service::start(&env, &log);
    wait_ready(&service).await;
    let port = metrics_port(&service.log_text()).expect("metrics port");
    let watching = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let health = {
        let watching = watching.clone();
        tokio::spawn(async move {
            let mut unhealthy = 0;
            while watching.load(std::sync::atomic::Ordering::Relaxed) {
                let url = format!("http://127.0.0.1:{port}/healthz");
                match reqwest::get(url).await {
                    Ok(r) if r.status().is_success() => {}
                    _ => unhealthy += 1,
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            unhealthy
        })
    };
    let started = Instant::now();
    produce_users(&topics.input, &users).await;
    let (fast, slow): (Vec<String>, Vec<String>) =
        users.iter().cloned().partition(|u| u.starts_with("fast-"));
    let by_user = combined_by_user(&topics, fast.len(), Duration::from_secs(120));
    let fast_done = started.elapsed().as_secs_f64();
    let text = service.log_text();
    let fast_seen: HashMap<String, Vec<ReadRecord>> = by_user
        .iter()
        .filter(|(u, _)| u.starts_with("fast-"))
        .map(|(u, v)| (u.clone(), v.clone()))
        .collect();
    assert_each_once(&fast_seen, &fast, &text);
    // Then every user, the misbehaving ones past their 1-minute deadline.
    let all = combined_by_user(&topics, users.len(), Duration::from_secs(150));
    let text = service.log_text();
    assert_each_once(&all, &users, &text);
    let again = read_topic(&topics.combined, None, Duration::from_secs(3));
    assert_eq!(again.len(), users.len(), "combined events after a pause");
    watching.store(false, std::sync::atomic::Ordering::Relaxed);
    let unhealthy = health.await.expect("health watcher");
    drop(service);
    let _ = sim.shutdown().await;
    BrownoutRun {
        fast_done,
        slow: slow
            .iter()
            .map(|u| (u.clone(), all[u][0].value.clone()))
            .collect(),
        log: text,
        unhealthy,
    }
}

fn assert_rode_it_out(run: &BrownoutRun) {
    assert_no_poll_interval_trouble(&run.log);
    assert!(
        !run.log.contains("transaction aborted"),
        "a transaction was aborted"
    );
    assert_eq!(run.unhealthy, 0, "/healthz failed during the brown-out");
}

/// The run rode the brown-out out, and its well-behaved users were done
/// within a few seconds of the baseline's. A hanging call is cut once it
/// has awaited its answer four times as long as its batch's others: in
/// this debug build on a busy machine answers take 0.3-1.2 s, so that is
/// about the straggler wait; the release bench (`brownout`) measures it.
fn assert_others_not_held(run: &BrownoutRun, baseline: &BrownoutRun, slow: &str) {
    eprintln!(
        "brown-out: 950 fast users done in {:.1} s with {slow}, {:.1} s without",
        run.fast_done, baseline.fast_done
    );
    assert_rode_it_out(run);
    assert!(
        run.fast_done <= baseline.fast_done + 6.0,
        "950 fast users took {:.1} s (baseline {:.1} s)",
        run.fast_done,
        baseline.fast_done
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_whose_credeau_calls_hang_do_not_hold_the_others_or_the_group() {
    let baseline = brownout_run(1000, Brownout::None).await;
    assert_rode_it_out(&baseline);
    let run = brownout_run(1000, Brownout::CredeauHangs).await;
    // A hanging call is cut short once the rest of its batch is done and it
    // has awaited its answer four times as long as theirs (at the latest
    // after the 5 s straggler wait): the others wait for that, not for the
    // 15 s record budget or the 30 s request timeout.
    assert_others_not_held(&run, &baseline, "50 hanging Credeau users");
    // Credeau never answered them: cut short on a leash doubled per cut
    // until it reaches the record budget, then a timed-out poll; still
    // failing at the deadline, so `failed` with the timeout, FinBox
    // complete, each exactly once.
    assert_eq!(run.slow.len(), 50);
    for (user, event) in &run.slow {
        assert_eq!(event["credeau"]["outcome"], "failed", "{user}: {event}");
        assert_eq!(event["credeau"]["error_kind"], "timeout", "{user}: {event}");
        assert_eq!(event["finbox"]["outcome"], "complete", "{user}: {event}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_whose_finbox_calls_fail_do_not_hold_the_others_or_the_group() {
    let baseline = brownout_run(1000, Brownout::None).await;
    let run = brownout_run(1000, Brownout::FinboxStorm).await;
    assert_others_not_held(&run, &baseline, "50 users in a FinBox 5xx storm");
    // FinBox kept failing: `failed` after max_failed_polls (3) polls,
    // Credeau complete, each exactly once.
    assert_eq!(run.slow.len(), 50);
    for (user, event) in &run.slow {
        assert_eq!(event["finbox"]["outcome"], "failed", "{user}: {event}");
        assert_eq!(event["credeau"]["outcome"], "complete", "{user}: {event}");
    }
}

/// One instance's `insights_rate_limit_per_minute{provider="finbox"}`;
/// `None` before it has one (no share yet) or when it cannot be read.
async fn finbox_share(service: &Service) -> Option<u64> {
    metric(
        service,
        r#"insights_rate_limit_per_minute{provider="finbox"}"#,
    )
    .await
    .map(|v| v as u64)
}

/// The live instances' FinBox shares added up, as at one instant.
///
/// The instances are read one after the other, so a plain sum could pair
/// one instance's share from before a rebalance with another's from after
/// it. They are read in order and then in reverse, and each counts with
/// the lower of its two readings. A rebalance lowers the shares of the
/// partitions it moves before any member gets them back (the barrier), so
/// with the readings nested this way every instance counts with at most
/// its share before the barrier, or every one with at most its share after
/// it: either way a sum one assignment allowed. An instance without a
/// reading counts as 0.
async fn finbox_shares(services: &[&Service]) -> u64 {
    let mut first = Vec::with_capacity(services.len());
    for s in services {
        first.push(finbox_share(s).await);
    }
    let mut sum = 0;
    for (s, before) in services.iter().zip(first).rev() {
        let after = finbox_share(s).await;
        sum += before.unwrap_or(0).min(after.unwrap_or(0));
    }
    sum
}

/// Three instances share FinBox's limit while a backlog is worked off: a
/// second and a third join (rebalances), then one is killed (its
/// partitions are reassigned once its session expires). Sampled every
/// 100 ms throughout, the live instances' shares never add up to more than
/// the limit, and the provider never answers 429.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_shares_never_add_up_to_more_than_the_limit_as_instances_join_and_die() {
    let sim = simulator_with(json!({
        "default": {"finbox": {"predictors": 3}, "credeau": {"sms_count": 2}}
    }))
    .await;
    sim_admin(
        &sim.base_url(),
        "/admin/limits",
        &json!({"finbox_per_minute": 600, "credeau_per_minute": 0}),
    )
    .await;
    let topics = Topics::new("shares");
    create_topic(&topics.input, 6).await;
    let users: Vec<String> = (0..400).map(|i| format!("s{i}-{}", unique("u"))).collect();
    produce_users(&topics.input, &users).await;
    let dir = tempfile::tempdir().unwrap();
    let group = unique("g");
    let env = |name: &str| {
        let mut env = service_env(&topics, &group, &sim.base_url());
        env.extend(
            [
                ("INSIGHTS__FINBOX__RATE_LIMIT_PER_MINUTE", "600"),
                ("INSIGHTS__FINBOX__DEADLINE", "10m"),
                ("INSIGHTS__CREDEAU__DEADLINE", "10m"),
                ("INSIGHTS__KAFKA__TRANSACTIONAL_ID_PREFIX", &unique(name)),
            ]
            .map(|(k, v)| (k.to_string(), v.to_string())),
        );
        env
    };
    let a = Service::start(&env("a"), &dir.path().join("a.log"));
    let mut b: Option<Service> = None;
    let mut c: Option<Service> = None;
    let started = Instant::now();
    let mut max_sum = 0;
    let mut killed = false;
    let mut samples = 0;
    while started.elapsed() < Duration::from_secs(45) {
        let t = started.elapsed();
        if b.is_none() && t > Duration::from_secs(6) {
            b = Some(Service::start(&env("b"), &dir.path().join("b.log")));
        }
        if c.is_none() && t > Duration::from_secs(12) {
            c = Some(Service::start(&env("c"), &dir.path().join("c.log")));
        }
        if !killed && t > Duration::from_secs(22) {
            if let Some(b) = b.as_mut() {
                b.kill();
            }
            killed = true;
        }
        let mut live: Vec<&Service> = vec![&a];
        if !killed {
            live.extend(b.as_ref());
        }
        live.extend(c.as_ref());
        let sum = finbox_shares(&live).await;
        max_sum = max_sum.max(sum);
        samples += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("rate-limit shares: at most {max_sum}/min in all over {samples} samples");
    assert!(max_sum > 0, "no share was ever read");
    assert!(
        max_sum <= 600,
        "the instances' FinBox shares added up to {max_sum}/min, above the limit of 600"
    );
    let by_user = combined_by_user(&topics, users.len(), Duration::from_secs(120));
    let text = a.log_text();
    assert_each_once(&by_user, &users, &text);
    let s = stats(&sim).await;
    assert_eq!(s["finbox"]["by_status"].get("429"), None, "{s}");
    let _ = sim.shutdown().await;
}

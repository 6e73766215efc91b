//! Metrics and health of a running service: `/metrics` after an end-to-end
//! run passes `promtool check metrics` and its counters moved as the run
//! implies (read with a Prometheus text-format parser); `/healthz` fails
//! when the consume loop stalls; `/readyz` stays up while the providers
//! fail.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;
use insights_enricher::simulator::{self, SimulatorConfig};
use serde_json::json;

async fn put_scenarios(base: &str, scenarios: serde_json::Value) {
    sim_admin(base, "/admin/scenarios", &scenarios).await;
}

fn json_logs(env: &mut Vec<(String, String)>) {
    env.push(("INSIGHTS__LOG__FORMAT".into(), "json".into()));
}

/// Sums the samples of a metric whose labels include all of `labels`.
fn sum(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            prometheus_parse::Value::Histogram(ref h) => h.last().map(|b| b.count).unwrap_or(0.0),
            prometheus_parse::Value::Summary(_) => 0.0,
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_after_a_run_pass_promtool_and_counters_match_the_run() {
    let sim = simulator::spawn(SimulatorConfig::default())
        .await
        .expect("simulator");
    put_scenarios(
        &sim.base_url(),
        json!({"default": {"finbox": {"predictors": 5}, "credeau": {"sms_count": 2}},
               "prefixes": {"bad-": {"credeau": {"sms_count": 2, "faults": {"server_error_first": 1}}},
                            "late-": {"finbox": {"predictors": 5, "ready_after": "3s"}, "credeau": {"sms_count": 2}}}}),
    )
    .await;
    let topics = Topics::new("metrics");
    create_topic(&topics.input, 2).await;
    let dir = tempfile::tempdir().unwrap();
    let mut env = service_env(&topics, &unique("g"), &sim.base_url());
    json_logs(&mut env);
    // Counters are checked against the run exactly: no poll may be cut
    // short because a loaded machine answered one request slowly (a cut
    // poll is asked again through a delay tier, and would count twice).
    env.push((
        "INSIGHTS__SCHEDULE__STRAGGLER_WAIT".to_string(),
        "0s".to_string(),
    ));
    let service = Service::start(&env, &dir.path().join("service.log"));
    let addr = service_addr(&service, Duration::from_secs(30))
        .await
        .expect("service address");

    let p = producer();
    let n = 12;
    for i in 0..n {
        let user = format!(
            "{}{i}-{}",
            if i % 3 == 0 { "bad-" } else { "ok-" },
            unique("u")
        );
        produce(
            &p,
            &topics.input,
            Some(user.as_bytes()),
            Some(&onboarded_json(&format!("ev-{user}"), &user)),
        )
        .await;
    }
    // FinBox is not ready at their first poll: each waits once in the 10s
    // tier (service_env polls FinBox every 10 s).
    let late = 2;
    produce_users(&topics.input, "late-", late).await;
    produce(&p, &topics.input, Some(b"poison"), Some(b"not json")).await;
    let combined = read_topic(&topics.combined, Some(n + late), Duration::from_secs(60));
    assert_eq!(combined.len(), n + late);
    let _ = read_topic(&topics.dlq, Some(1), Duration::from_secs(30));

    // Counters are updated after the commit that made the records visible;
    // give the loop a moment, then scrape.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let text = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .expect("scrape")
        .text()
        .await
        .unwrap();

    let file = dir.path().join("metrics.txt");
    std::fs::write(&file, &text).unwrap();
    let promtool = std::env::var("PROMTOOL").unwrap_or_else(|_| "promtool".into());
    let out = std::process::Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(&file).unwrap())
        .output()
        .unwrap_or_else(|e| {
            panic!("run {promtool}: {e} (set PROMTOOL; scripts/tools.sh promtool)")
        });
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .expect("prometheus text format");
    let m = |name: &str, labels: &[(&str, &str)]| sum(&scrape, name, labels);
    let late = late as f64;
    let bad = 4.0;
    let n = n as f64 + late;
    assert_eq!(
        m(
            "insights_events_consumed_total",
            &[("topic", "input"), ("result", "accepted")]
        ),
        n
    );
    assert_eq!(
        m(
            "insights_events_consumed_total",
            &[("topic", "input"), ("result", "dead_lettered")]
        ),
        1.0
    );
    assert_eq!(
        m("insights_published_total", &[("topic", "insights_ready")]),
        n
    );
    assert_eq!(
        m(
            "insights_published_total",
            &[("topic", "finbox_predictors")]
        ),
        n
    );
    assert_eq!(
        m("insights_published_total", &[("topic", "sms_extraction")]),
        n
    );
    assert_eq!(
        m(
            "insights_dead_letters_total",
            &[("stage", "decode"), ("reason", "malformed_json")]
        ),
        1.0
    );
    // Every user: one FinBox 200 (the late ones a 202 before it); Credeau:
    // one answer, plus one 5xx for the "bad-" third of them, retried in
    // process.
    assert_eq!(
        m(
            "insights_provider_requests_total",
            &[("provider", "finbox"), ("http_status", "200")]
        ),
        n
    );
    assert_eq!(
        m(
            "insights_provider_requests_total",
            &[("provider", "credeau"), ("http_status", "200")]
        ),
        n
    );
    assert_eq!(
        m(
            "insights_provider_requests_total",
            &[("provider", "finbox"), ("http_status", "202")]
        ),
        late
    );
    assert_eq!(
        m(
            "insights_provider_requests_total",
            &[("provider", "credeau"), ("http_status", "503")]
        ),
        bad
    );
    // One in-process retry per 5xx (a timeout on a loaded machine may add
    // retries of its own, counted under their reason).
    assert_eq!(
        m(
            "insights_provider_retries_total",
            &[("provider", "credeau"), ("reason", "server_error")]
        ),
        bad
    );
    // Every HTTP attempt takes a permit, and its wait is observed. Nothing
    // is cut short here (straggler_wait 0s), so each permit is one request
    // counted with its answer; a timeout on a loaded machine adds one of
    // each, under its own outcome.
    for (provider, least) in [("finbox", n + late), ("credeau", n + bad)] {
        let requests = m(
            "insights_provider_requests_total",
            &[("provider", provider)],
        );
        assert!(requests >= least, "{provider}: {requests} requests");
        assert_eq!(
            m(
                "insights_rate_limiter_wait_seconds_count",
                &[("provider", provider)]
            ),
            requests,
            "{provider}: a permit per request"
        );
        assert_eq!(
            m(
                "insights_provider_request_duration_seconds_count",
                &[("provider", provider)]
            ),
            requests,
            "{provider}: a latency per request"
        );
    }
    assert_eq!(m("insights_stragglers_cut_total", &[]), 0.0);
    // The late users' one wait each, in the 10s tier, then due from it.
    assert_eq!(
        m("insights_tasks_scheduled_total", &[("tier", "10s")]),
        late
    );
    assert_eq!(m("insights_tasks_scheduled_total", &[]), late);
    assert_eq!(m("insights_tasks_due_total", &[("tier", "10s")]), late);
    assert_eq!(m("insights_poll_lateness_seconds_count", &[]), late);
    assert!(m("insights_transactions_total", &[("result", "committed")]) >= 1.0);
    assert_eq!(
        m("insights_transactions_total", &[("result", "aborted")]),
        0.0
    );
    assert_eq!(m("insights_onboarding_to_combined_seconds_count", &[]), n);
    assert_eq!(
        m("insights_provider_healthy", &[("provider", "finbox")]),
        1.0
    );
    assert_eq!(m("insights_build_info", &[]), 1.0);
    assert!(m("insights_consume_loop_iterations_total", &[]) > 0.0);
    // No user id ever becomes a label value.
    assert!(!text.contains("ok-0-"), "a user id leaked into a label");

    // Lag comes from librdkafka's statistics (every 5 s) against the
    // offsets this process committed in its transactions: once everything
    // is committed, every input partition shows 0. Delay partitions keep
    // one transaction marker after their last record, so users_waiting
    // ends at most at the number of tier partitions the late users went
    // through (and never at the whole delay topics' length).
    let until = Instant::now() + Duration::from_secs(20);
    let mut last = String::new();
    let settled = loop {
        let text = reqwest::get(format!("http://{addr}/metrics"))
            .await
            .expect("scrape")
            .text()
            .await
            .unwrap();
        let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
            .expect("prometheus text format");
        let lag = |p: &str| {
            scrape
                .samples
                .iter()
                .find(|s| {
                    s.metric == "insights_consumer_lag_records"
                        && s.labels.get("topic") == Some(topics.input.as_str())
                        && s.labels.get("partition") == Some(p)
                })
                .map(|s| match s.value {
                    prometheus_parse::Value::Gauge(v) => v,
                    _ => f64::NAN,
                })
        };
        let waiting = sum(&scrape, "insights_users_waiting", &[]);
        if lag("0") == Some(0.0) && lag("1") == Some(0.0) && waiting <= late {
            break true;
        }
        last = format!("lag {:?} {:?}, waiting {waiting}", lag("0"), lag("1"));
        if Instant::now() > until {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(
        settled,
        "input lag never reached 0, or users still waiting: {last}"
    );
    let _ = sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_provider_holds_a_batch_no_longer_than_the_record_budget_and_liveness_stays_up() {
    let sim = simulator::spawn(SimulatorConfig::default())
        .await
        .expect("simulator");
    // FinBox answers the slow user after 12 s, longer than the stall
    // timeout; the request timeout is longer still.
    put_scenarios(
        &sim.base_url(),
        json!({
            "default": {"finbox": {"predictors": 2}, "credeau": {"sms_count": 1}},
            "prefixes": {"stall-": {"finbox": {"faults": {"latency": "12s"}}, "credeau": {"sms_count": 1}}}
        }),
    )
    .await;
    let topics = Topics::new("stall");
    create_topic(&topics.input, 1).await;
    let dir = tempfile::tempdir().unwrap();
    let mut env = service_env(&topics, &unique("g"), &sim.base_url());
    json_logs(&mut env);
    env.push(("INSIGHTS__SERVER__STALL_TIMEOUT".into(), "4s".into()));
    env.push(("INSIGHTS__SCHEDULE__RECORD_BUDGET".into(), "2s".into()));
    env.push(("INSIGHTS__FINBOX__REQUEST_TIMEOUT".into(), "30s".into()));
    env.push(("INSIGHTS__KAFKA__MAX_POLL_INTERVAL".into(), "60s".into()));
    let service = Service::start(&env, &dir.path().join("service.log"));
    let addr = service_addr(&service, Duration::from_secs(30))
        .await
        .expect("address");
    let http = reqwest::Client::new();
    let healthz = move |addr: String| {
        let http = http.clone();
        async move {
            http.get(format!("http://{addr}/healthz"))
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0)
        }
    };
    wait_ready(&service).await;
    // The slow user first, then a fast one behind it in the same partition.
    let (slow, fast) = (unique("stall-"), unique("fast-"));
    let p = producer();
    for user in [&slow, &fast] {
        produce(
            &p,
            &topics.input,
            Some(user.as_bytes()),
            Some(&onboarded_json(&format!("ev-{user}"), user)),
        )
        .await;
    }
    let produced = Instant::now();
    // Liveness stays up the whole time: a slow provider is not a stuck loop.
    let watch = tokio::spawn(async move {
        let mut failures = vec![];
        while produced.elapsed() < Duration::from_secs(12) {
            let status = healthz(addr.clone()).await;
            if status != 200 {
                failures.push((produced.elapsed(), status));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        failures
    });
    let combined = topics.combined.clone();
    let first = tokio::task::spawn_blocking(move || {
        read_topic(&combined, Some(1), Duration::from_secs(10))
    })
    .await
    .expect("reader");
    let fast_done = produced.elapsed();
    assert!(
        first.iter().any(|r| r.value["user_id"] == fast.as_str()),
        "no combined event for the fast user: {first:?}"
    );
    // The fast user behind the slow one waited for the record budget (2 s)
    // at most, not for the 12 s answer (the reader's own start included).
    assert!(
        fast_done <= Duration::from_secs(7),
        "the fast user took {fast_done:?}"
    );
    let failures = watch.await.expect("watcher");
    assert!(
        failures.is_empty(),
        "/healthz failed: {failures:?}; log:\n{}",
        service.log_text()
    );
    let _ = sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_stays_up_while_the_providers_fail() {
    let sim = simulator::spawn(SimulatorConfig::default())
        .await
        .expect("simulator");
    put_scenarios(
        &sim.base_url(),
        json!({"default": {"finbox": {"faults": {"server_error_ratio": 1.0}}, "credeau": {"faults": {"server_error_ratio": 1.0}}}}),
    )
    .await;
    let topics = Topics::new("ready");
    create_topic(&topics.input, 2).await;
    let dir = tempfile::tempdir().unwrap();
    let mut env = service_env(&topics, &unique("g"), &sim.base_url());
    json_logs(&mut env);
    let service = Service::start(&env, &dir.path().join("service.log"));
    let addr = service_addr(&service, Duration::from_secs(30))
        .await
        .expect("address");
    let http = reqwest::Client::new();
    let status = |path: &'static str| {
        let http = http.clone();
        let addr = addr.clone();
        async move {
            http.get(format!("http://{addr}{path}"))
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0)
        }
    };
    let start = Instant::now();
    while status("/readyz").await != 200 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "never ready; log:\n{}",
            service.log_text()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let p = producer();
    for i in 0..5 {
        let user = format!("fail-{i}-{}", unique("u"));
        produce(
            &p,
            &topics.input,
            Some(user.as_bytes()),
            Some(&onboarded_json(&format!("ev-{user}"), &user)),
        )
        .await;
    }
    let mut seen: HashMap<u16, usize> = HashMap::new();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(8) {
        *seen.entry(status("/readyz").await).or_default() += 1;
        assert_eq!(status("/healthz").await, 200);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(
        seen.keys().copied().collect::<Vec<_>>(),
        vec![200],
        "readyz answers: {seen:?}"
    );
    // The providers really were failing meanwhile.
    let stats: serde_json::Value = reqwest::get(format!("{}/admin/stats", sim.base_url()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let fives: u64 = ["500", "502", "503"]
        .iter()
        .filter_map(|s| stats["finbox"]["by_status"][s].as_u64())
        .sum();
    assert!(fives > 0, "no 5xx served: {stats}");
    let _ = sim.shutdown().await;
}

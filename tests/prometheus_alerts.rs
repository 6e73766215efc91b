//! A real Prometheus (the server from Debian's prometheus package,
//! `scripts/tools.sh prometheus`, in PROMETHEUS) scrapes the service with
//! the chart's alert rules loaded, rendered by helm with short `for:`
//! durations. Real faults are caused, the first three together: a burst of dead
//! letters (malformed input), a provider answering unreadable data (cut
//! JSON, retried until exhausted), provider 403s (Credeau refusing our IP)
//! and the service killed. Each matching alert must fire within
//! its `for:` plus two scrape intervals (and two evaluations) of the fault
//! showing in the service's own metrics, and resolve once the fault is over.
//! Then every PromQL expression of the chart's Grafana dashboard must
//! return at least one series.
//!
//! Thresholds: the dead-letter ratio is rendered at 0.05 instead of 0.01, so
//! that the good traffic after the faults brings it back under within the
//! test (the chart's 10 m rate window is unchanged).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use insights_enricher::simulator::{self, RunningSimulator, SimulatorConfig};
use serde_json::{json, Value};

const SCRAPE: Duration = Duration::from_secs(1);
const EVAL: Duration = Duration::from_secs(1);
const FOR: Duration = Duration::from_secs(10);
/// The dead-letter share rendered into the rule (the chart's default is
/// 0.01).
const DEAD_LETTER_RATIO: f64 = 0.05;
const NAMESPACE: &str = "lending";
const JOB: &str = "insights-enricher";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The chart's PrometheusRule, rendered by helm, as a Prometheus rule file.
fn render_rules(dir: &Path) -> PathBuf {
    let helm = std::env::var("HELM").unwrap_or_else(|_| "helm".into());
    let for_ = format!("{}s", FOR.as_secs());
    let mut cmd = Command::new(helm);
    cmd.args(["template", JOB])
        .arg(repo_root().join("helm/insights-enricher"))
        .args(["--namespace", NAMESPACE, "-f"])
        .arg(repo_root().join("tests/helm/minimal.yaml"))
        .args(["--set", "prometheusRule.enabled=true"])
        .args([
            "--set-json",
            &format!("prometheusRule.alerts.deadLetterRate.ratio={DEAD_LETTER_RATIO}"),
        ]);
    for alert in ["down", "deadLetterRate", "providerAuthFailing"] {
        cmd.args([
            "--set",
            &format!("prometheusRule.alerts.{alert}.for={for_}"),
        ]);
    }
    let out = cmd.output().expect("run helm");
    assert!(
        out.status.success(),
        "helm template: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rendered = dir.join("rendered.yaml");
    std::fs::write(&rendered, &out.stdout).unwrap();
    let rules = dir.join("rules.yaml");
    let status = Command::new(python())
        .args([
            "-c",
            "import sys, yaml\n\
             docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d and d['kind'] == 'PrometheusRule']\n\
             yaml.safe_dump(docs[0]['spec'], open(sys.argv[2], 'w'))",
        ])
        .arg(&rendered)
        .arg(&rules)
        .status()
        .expect("python");
    assert!(status.success(), "extracting the rules failed");
    rules
}

struct Prometheus {
    child: Child,
    url: String,
    log: PathBuf,
}

impl Prometheus {
    fn start(dir: &Path, rules: &Path, target: &str) -> Prometheus {
        let bin = std::env::var("PROMETHEUS").unwrap_or_else(|_| {
            panic!("PROMETHEUS is not set: run ./scripts/test.sh (scripts/tools.sh prometheus)")
        });
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: {}s\n  evaluation_interval: {}s\n\
                 rule_files:\n  - {}\n\
                 scrape_configs:\n  - job_name: {JOB}\n    static_configs:\n      - targets: ['{target}']\n        labels:\n          namespace: {NAMESPACE}\n          pod: {JOB}-0\n",
                SCRAPE.as_secs(),
                EVAL.as_secs(),
                rules.display()
            ),
        )
        .unwrap();
        let port = free_port();
        let log = dir.join("prometheus.log");
        let child = Command::new(bin)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(dir.join("prometheus.err")).unwrap())
            .spawn()
            .expect("start prometheus");
        Prometheus {
            child,
            url: format!("http://127.0.0.1:{port}"),
            log,
        }
    }

    async fn ready(&self) {
        for _ in 0..150 {
            if let Ok(r) = reqwest::get(format!("{}/-/ready", self.url)).await {
                if r.status().is_success() {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!("prometheus not ready: {}", self.log.display());
    }

    async fn alerts(&self) -> Vec<Value> {
        let v: Value = reqwest::get(format!("{}/api/v1/alerts", self.url))
            .await
            .expect("alerts")
            .json()
            .await
            .expect("alerts json");
        v["data"]["alerts"].as_array().cloned().unwrap_or_default()
    }

    /// Whether an alert named `name` whose labels include `labels` is in
    /// `state` ("firing", or "inactive" for none pending or firing).
    async fn in_state(&self, name: &str, labels: &[(&str, &str)], state: &str) -> bool {
        let matching: Vec<Value> = self
            .alerts()
            .await
            .into_iter()
            .filter(|a| {
                a["labels"]["alertname"] == name
                    && labels.iter().all(|(k, v)| a["labels"][*k] == *v)
            })
            .collect();
        match state {
            "inactive" => matching.is_empty(),
            s => matching.iter().any(|a| a["state"] == s),
        }
    }

    async fn query(&self, expr: &str) -> Vec<Value> {
        let v: Value = reqwest::Client::new()
            .get(format!("{}/api/v1/query", self.url))
            .query(&[("query", expr)])
            .send()
            .await
            .expect("query")
            .json()
            .await
            .expect("query json");
        assert_eq!(v["status"], "success", "{expr}: {v}");
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The service's own counter, summed over the label sets that contain
/// `labels`, read from its /metrics page.
async fn counter(metrics: &str, name: &str, labels: &[&str]) -> f64 {
    let page = match reqwest::get(metrics).await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => return 0.0,
    };
    page.lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|x| l.contains(x)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The sum of the counter `name` over the label sets containing every one
/// of `with` and none of `without`, from a /metrics page.
fn total(page: &str, name: &str, with: &[&str], without: &[&str]) -> f64 {
    page.lines()
        .filter(|l| {
            l.starts_with(name)
                && with.iter().all(|x| l.contains(x))
                && !without.iter().any(|x| l.contains(x))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Whether the service's own counters (since its start, within every
/// alert's rate window here) put check `i` over its alert's threshold: the
/// moment the fault shows at the alert's own measure.
fn over_threshold(i: usize, page: &str) -> bool {
    let dl = "insights_dead_letters_total";
    let consumed = total(
        page,
        "insights_events_consumed_total",
        &[],
        &["result=\"forwarded\""],
    );
    let req = "insights_provider_requests_total";
    match i {
        0 => total(page, dl, &["reason=\"malformed_json\""], &[]) > DEAD_LETTER_RATIO * consumed,
        1 => {
            total(
                page,
                dl,
                &["stage=\"poll_finbox\"", "reason=\"exhausted\""],
                &[],
            ) > DEAD_LETTER_RATIO * consumed
        }
        _ => {
            let refused = total(
                page,
                req,
                &["provider=\"credeau\"", "http_status=\"403\""],
                &[],
            );
            let all = total(page, req, &["provider=\"credeau\""], &[]);
            refused > 0.1 * all && refused >= 5.0
        }
    }
}

/// Waits for `alert` to reach `state`; returns how long it took.
async fn wait_alert(
    prom: &Prometheus,
    alert: &str,
    labels: &[(&str, &str)],
    state: &str,
    bound: Duration,
) -> Duration {
    let began = Instant::now();
    while began.elapsed() < bound {
        if prom.in_state(alert, labels, state).await {
            return began.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!(
        "{alert} {labels:?} not {state} within {bound:?}; alerts: {:#?}",
        prom.alerts().await
    );
}

async fn produce_good(topic: &str, n: usize) {
    produce_users(topic, "good-", n).await;
}

/// Credeau refusing this machine's IP (403) or not.
async fn credeau_blocks_us(sim: &RunningSimulator, blocked: bool) {
    let r = reqwest::Client::new()
        .put(format!("{}/admin/credentials", sim.base_url()))
        .json(&json!({ "credeau_ip_blocked": blocked }))
        .send()
        .await
        .expect("admin credentials");
    assert!(r.status().is_success(), "{}", r.status());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_real_fault_fires_its_alert_in_time_and_it_resolves_and_every_dashboard_query_has_data(
) {
    let dir = tempfile::tempdir().unwrap();
    let rules = render_rules(dir.path());
    let sim = simulator::spawn(SimulatorConfig::default())
        .await
        .expect("simulator");
    sim_admin(
        &sim.base_url(),
        "/admin/scenarios",
        &json!({
            "default": {"finbox": {"predictors": 3}, "credeau": {"sms_count": 2}},
            "prefixes": {
                "cut-": {"finbox": {"predictors": 3, "faults": {"truncated_json_ratio": 1.0}}, "credeau": {"sms_count": 2}}
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
    let topics = Topics::new("prom");
    create_topic(&topics.input, 3).await;
    let metrics_port = free_port();
    let target = format!("127.0.0.1:{metrics_port}");
    let metrics = format!("http://{target}/metrics");
    let mut env = service_env(&topics, &unique("g"), &sim.base_url());
    env.push(("INSIGHTS__SERVER__LISTEN".into(), target.clone()));
    // The faults below dead-letter more than the guard lets through (it
    // would stop the service, which is not under test here).
    env.push(("INSIGHTS__DEAD_LETTER__MAX_RATIO".into(), "1".into()));
    env.push((
        "INSIGHTS__DEAD_LETTER__MAX_CONSECUTIVE".into(),
        "100000".into(),
    ));
    let log = dir.path().join("service.log");
    let mut service = Service::start(&env, &log);
    wait_ready(&service).await;

    let prom = Prometheus::start(dir.path(), &rules, &target);
    prom.ready().await;
    // A new series needs two scrapes before rate() sees it rise; the alert
    // is pending from the next evaluation and firing at the first one at
    // least `for:` later; plus the 100 ms polling here.
    let fire_bound = FOR + 2 * SCRAPE + 2 * EVAL + Duration::from_millis(500);
    let resolve_bound = Duration::from_secs(240);
    produce_good(&topics.input, 80).await;
    // The series the faults raise are exported at 0 from the start (a
    // series that first appears at 1 is no increase to rate()), so the
    // first burst of each fault is seen without any earlier fault.
    let page = reqwest::get(&metrics).await.unwrap().text().await.unwrap();
    for series in [
        "insights_dead_letters_total{reason=\"malformed_json\",stage=\"decode\"} 0",
        "insights_dead_letters_total{reason=\"exhausted\",stage=\"poll_finbox\"} 0",
        "insights_provider_requests_total{http_status=\"403\",outcome=\"forbidden\",provider=\"credeau\"} 0",
    ] {
        assert!(page.lines().any(|l| l == series), "{series} missing:\n{page}");
    }
    produce_good(&topics.input, 20).await;
    tokio::time::sleep(3 * SCRAPE).await;
    // Nothing is wrong yet: once the service is scraped, no alert of its
    // is pending or firing (Down is pending only until the first scrape).
    for alert in [
        "InsightsEnricherDown",
        "InsightsEnricherDeadLetterRate",
        "InsightsEnricherProviderAuthFailing",
    ] {
        wait_alert(&prom, alert, &[], "inactive", Duration::from_secs(30)).await;
    }
    let mut report = Vec::new();

    // 1-3. Three faults at once, for 30 s, next to a trickle of good users:
    // malformed input records (a burst of dead letters), FinBox answering
    // JSON cut in half (unreadable; retried until exhausted, then
    // dead-lettered) and Credeau answering 403 to everyone (our egress IP
    // no longer whitelisted). Together, because each alert is a share over a 5 or 10
    // minute window: traffic from an earlier phase would dilute a later
    // one. Each alert is timed from its own first symptom in the service's
    // metrics.
    let poison = ["malformed_json"];
    let cut = ["poll_finbox", "exhausted"];
    let forbidden = ["credeau", "http_status=\"403\""];
    let dl = "insights_dead_letters_total";
    let req = "insights_provider_requests_total";
    let (p0, c0, f0) = (
        counter(&metrics, dl, &poison).await,
        counter(&metrics, dl, &cut).await,
        counter(&metrics, req, &forbidden).await,
    );
    credeau_blocks_us(&sim, true).await;
    let input = topics.input.clone();
    let faults = tokio::spawn(async move {
        let p = producer();
        for tick in 0..60 {
            let key = format!("broken-{tick}");
            produce(&p, &input, Some(key.as_bytes()), Some(b"{\"event_id\": ")).await;
            produce_users(&input, "cut-", 1).await;
            if tick % 2 == 0 {
                produce_users(&input, "good-", 1).await;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    let checks = [
        (
            "InsightsEnricherDeadLetterRate",
            vec![("stage", "decode"), ("reason", "malformed_json")],
            dl,
            &poison[..],
            p0,
            "dead-letter burst",
        ),
        (
            "InsightsEnricherDeadLetterRate",
            vec![("stage", "poll_finbox"), ("reason", "exhausted")],
            dl,
            &cut[..],
            c0,
            "unreadable provider data",
        ),
        (
            "InsightsEnricherProviderAuthFailing",
            vec![("provider", "credeau")],
            req,
            &forbidden[..],
            f0,
            "provider 403s",
        ),
    ];
    // One loop watches the service's own metrics and the alerts in
    // Prometheus, so each alert is timed from the moment its fault shows
    // in the service's counters at the alert's threshold.
    let mut seen: Vec<Option<Instant>> = vec![None; checks.len()];
    let mut fired: Vec<Option<Instant>> = vec![None; checks.len()];
    let watching = Instant::now();
    while fired.iter().any(Option::is_none) && watching.elapsed() < Duration::from_secs(60) {
        for (i, (alert, labels, _, _, _, _)) in checks.iter().enumerate() {
            if seen[i].is_none() {
                let page = match reqwest::get(&metrics).await {
                    Ok(r) => r.text().await.unwrap_or_default(),
                    Err(_) => String::new(),
                };
                if over_threshold(i, &page) {
                    seen[i] = Some(Instant::now());
                }
            }
            if seen[i].is_some()
                && fired[i].is_none()
                && prom.in_state(alert, labels, "firing").await
            {
                fired[i] = Some(Instant::now());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut firing = Vec::new();
    for (i, (alert, labels, _, _, _, what)) in checks.iter().enumerate() {
        let (Some(s), Some(f)) = (seen[i], fired[i]) else {
            panic!(
                "{what}: symptom {:?}, {alert} {labels:?} never fired; alerts: {:#?}",
                seen[i].map(|s| s.elapsed()),
                prom.alerts().await
            );
        };
        let after = f - s;
        let active_at: Vec<String> = prom
            .alerts()
            .await
            .iter()
            .filter(|a| {
                a["labels"]["alertname"] == *alert
                    && labels.iter().all(|(k, v)| a["labels"][*k] == *v)
            })
            .map(|a| a["activeAt"].to_string())
            .collect();
        let symptom_at = chrono::Utc::now() - chrono::Duration::from_std(s.elapsed()).unwrap();
        report.push(format!(
            "{what}: {alert} firing {after:?} after the first symptom (symptom at {symptom_at}, pending since {active_at:?})"
        ));
        firing.push((what, after));
    }
    faults.await.unwrap();
    credeau_blocks_us(&sim, false).await;
    for (what, after) in &firing {
        // Checked after all three are seen: they overlap in time.
        assert!(
            *after <= fire_bound,
            "{what}: firing {after:?} after its first symptom, more than {fire_bound:?}:\n{}",
            report.join("\n")
        );
    }
    // The faults are over: good traffic brings each share back under.
    let resolving = Instant::now();
    produce_good(&topics.input, 1200).await;
    for (alert, labels, _, _, _, what) in &checks {
        wait_alert(&prom, alert, labels, "inactive", resolve_bound).await;
        report.push(format!(
            "{what}: {alert} resolved {:?} after the faults ended",
            resolving.elapsed()
        ));
    }

    // Every dashboard query, while the service runs with all of the above
    // behind it.
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(repo_root().join("helm/insights-enricher/files/dashboard.json"))
            .unwrap(),
    )
    .unwrap();
    let mut exprs = Vec::new();
    collect_exprs(&dashboard, &mut exprs);
    assert!(exprs.len() >= 10, "{exprs:?}");
    let mut empty = Vec::new();
    for e in &exprs {
        let q = e
            .replace("$namespace", NAMESPACE)
            .replace("$job", JOB)
            .replace("$__rate_interval", "5m");
        if prom.query(&q).await.is_empty() {
            empty.push(q);
        }
    }
    assert!(
        empty.is_empty(),
        "dashboard queries without a series: {empty:#?}"
    );

    // 4. The service killed: no target answers.
    service.kill();
    let killed = Instant::now();
    let took = wait_alert(
        &prom,
        "InsightsEnricherDown",
        &[],
        "firing",
        fire_bound + SCRAPE,
    )
    .await;
    report.push(format!(
        "service killed: firing {:?} after the kill",
        killed.elapsed()
    ));
    assert!(took <= fire_bound + SCRAPE, "{took:?}");
    service = Service::start(&env, &log);
    wait_ready(&service).await;
    let took = wait_alert(
        &prom,
        "InsightsEnricherDown",
        &[],
        "inactive",
        resolve_bound,
    )
    .await;
    report.push(format!(
        "service killed: resolved {took:?} after it was ready again"
    ));
    eprintln!("{}", report.join("\n"));
    drop(service);
    let _ = sim.shutdown().await;
}

fn collect_exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                if k == "expr" {
                    if let Some(s) = x.as_str() {
                        out.push(s.to_string());
                    }
                } else {
                    collect_exprs(x, out);
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| collect_exprs(x, out)),
        _ => {}
    }
}

//! The service binary as a child process: its settings for tests, its log,
//! its metrics and readiness, and the searches the hygiene tests run on
//! what it writes.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::{bootstrap, eventually, Topics};

/// Settings common to service processes in tests: fast polling, small tiers.
pub fn service_env(topics: &Topics, group: &str, sim_url: &str) -> Vec<(String, String)> {
    let mut env = topics.env();
    let kv = |k: &str, v: &str| (k.to_string(), v.to_string());
    env.extend([
        // Services of different tests must never share a transactional.id
        // (they would fence each other); a restarted service of one test
        // must keep its own (so it aborts its predecessor's transaction).
        kv("INSIGHTS__KAFKA__TRANSACTIONAL_ID_PREFIX", &topics.prefix),
        kv("HOSTNAME", "test"),
        kv("INSIGHTS__KAFKA__BOOTSTRAP_SERVERS", &bootstrap()),
        kv("INSIGHTS__KAFKA__GROUP_ID", group),
        kv("INSIGHTS__KAFKA__SESSION_TIMEOUT", "6s"),
        kv("INSIGHTS__KAFKA__MAX_POLL_INTERVAL", "15s"),
        kv("INSIGHTS__SCHEDULE__RECORD_BUDGET", "5s"),
        kv("INSIGHTS__TOPICS__CREATE", "true"),
        kv("INSIGHTS__TOPICS__PARTITIONS", "3"),
        kv("INSIGHTS__SCHEDULE__DELAY_TIERS", "1s,2s,5s,10s"),
        kv("INSIGHTS__SCHEDULE__BATCH_LINGER", "50ms"),
        kv("INSIGHTS__FINBOX__BASE_URL", sim_url),
        kv("INSIGHTS__FINBOX__API_KEY", "sim-finbox-key"),
        kv("INSIGHTS__FINBOX__SERVER_HASH", "sim-server-hash"),
        kv("INSIGHTS__FINBOX__INITIAL_DELAY", "0s"),
        kv("INSIGHTS__FINBOX__POLL_INTERVAL", "10s"),
        kv("INSIGHTS__FINBOX__MAX_POLL_INTERVAL", "10s"),
        kv("INSIGHTS__FINBOX__NOT_FOUND_GRACE", "15s"),
        kv("INSIGHTS__FINBOX__DEADLINE", "25s"),
        kv("INSIGHTS__FINBOX__RETRY_DELAYS", "100ms,200ms"),
        kv("INSIGHTS__FINBOX__RATE_LIMIT_PER_MINUTE", "60000"),
        kv("INSIGHTS__CREDEAU__BASE_URL", sim_url),
        kv("INSIGHTS__CREDEAU__CLIENT_ID", "sim-client"),
        kv("INSIGHTS__CREDEAU__AUTH_TOKEN", "sim-token"),
        kv("INSIGHTS__CREDEAU__INITIAL_DELAY", "0s"),
        kv("INSIGHTS__CREDEAU__POLL_INTERVAL", "2s"),
        kv("INSIGHTS__CREDEAU__MAX_POLL_INTERVAL", "4s"),
        kv("INSIGHTS__CREDEAU__DEADLINE", "20s"),
        kv("INSIGHTS__CREDEAU__RETRY_BASE", "100ms"),
        kv("INSIGHTS__CREDEAU__RETRY_CAP", "400ms"),
        kv("INSIGHTS__CREDEAU__RATE_LIMIT_PER_MINUTE", "60000"),
        kv("INSIGHTS__SERVER__LISTEN", "127.0.0.1:0"),
        kv("INSIGHTS__SHUTDOWN__TIMEOUT", "10s"),
        kv("INSIGHTS__LOG__LEVEL", "info"),
    ]);
    env
}

/// A service process started from the built binary.
pub struct Service {
    pub child: Child,
    pub log: PathBuf,
}

impl Service {
    pub fn start(env: &[(String, String)], log: &Path) -> Service {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_insights-enricher"));
        cmd.arg("run")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log"))
            .stderr(file);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Service {
            child: cmd.spawn().expect("spawn service"),
            log: log.to_path_buf(),
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits up to `bound` for the process to exit on its own; returns its
    /// exit status and how long the wait took.
    pub fn wait_exit(&mut self, bound: Duration) -> Option<(ExitStatus, Duration)> {
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some((status, started.elapsed()));
            }
            if started.elapsed() >= bound {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, then wait up to `bound`; returns how long it took.
    pub fn terminate(&mut self, bound: Duration) -> Option<Duration> {
        let started = Instant::now();
        let pid = self.child.id() as i32;
        // SAFETY-free: `kill` the command, not libc.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status();
        self.wait_exit(bound).map(|_| started.elapsed())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Copies the whole log to `target/test-logs/<name>.log` (it outlives
    /// the test's temporary directory) and returns its path.
    pub fn keep_log(&self, name: &str) -> PathBuf {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-logs");
        let _ = std::fs::create_dir_all(&dir);
        let kept = dir.join(format!("{name}.log"));
        let _ = std::fs::copy(&self.log, &kept);
        kept
    }

    /// The last `n` lines of the log that say something: no DEBUG lines,
    /// and none of the connection errors librdkafka repeats while a
    /// broker is down.
    pub fn log_excerpt(&self, n: usize) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| {
                !l.contains("DEBUG")
                    && !l.contains("Connect to ipv4")
                    && !l.contains("brokers are down")
                    && !l.contains("AllBrokersDown")
                    && !l.contains("BrokerTransportFailure")
            })
            .collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            let kept = self.keep_log(&format!("service-{}", self.child.id()));
            eprintln!("---- whole log kept in {}", kept.display());
            let text = self.log_text();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(60)..];
            eprintln!(
                "---- last lines of {} ----\n{}",
                self.log.display(),
                tail.join("\n")
            );
        }
    }
}

/// The metrics/health address a service logged at start (JSON log format).
pub async fn service_addr(service: &Service, timeout: Duration) -> Option<String> {
    eventually(timeout, || {
        service.log_text().lines().find_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            if v["message"] == "metrics and health server up" {
                v["listen"].as_str().map(str::to_string)
            } else {
                None
            }
        })
    })
    .await
}

/// Settings for the most verbose logs the service can write: every tracing
/// event (trace) plus librdkafka's debug output for every context.
pub fn most_verbose_log_env() -> Vec<(String, String)> {
    vec![
        ("INSIGHTS__LOG__LEVEL".into(), "trace".into()),
        ("INSIGHTS__KAFKA__EXTRA__DEBUG".into(), "all".into()),
    ]
}

/// Every `(what, needle)` found in `haystack`, named by `place`: how the
/// hygiene tests search logs, metrics and dead letters for secrets.
pub fn leaks(place: &str, haystack: &str, needles: &[(String, String)]) -> Vec<String> {
    needles
        .iter()
        .filter(|(_, n)| haystack.contains(n.as_str()))
        .map(|(what, _)| format!("{what} in {place}"))
        .collect()
}

/// The port of the metrics server, from the line the service logs at start
/// (text or JSON log format).
pub fn metrics_port(log: &str) -> Option<u16> {
    let line = log
        .lines()
        .find(|l| l.contains("metrics and health server up"))?;
    let after = &line[line.rfind("127.0.0.1:")? + "127.0.0.1:".len()..];
    let digits: String = after.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Waits until the service answers /readyz (its topics exist and it has
/// joined its group), so readers never look for a topic not yet created.
pub async fn wait_ready(service: &Service) {
    let until = Instant::now() + Duration::from_secs(60);
    while Instant::now() < until {
        if let Some(port) = metrics_port(&service.log_text()) {
            let url = format!("http://127.0.0.1:{port}/readyz");
            if let Ok(r) = reqwest::get(url).await {
                if r.status().is_success() {
                    return;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("service not ready:\n{}", service.log_text());
}

/// The /metrics page served on `port`; `None` while nothing answers.
pub async fn try_metrics_page(port: u16) -> Option<String> {
    reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()
}

/// The whole /metrics page of the service that wrote `log`.
pub async fn metrics_page(log: &str) -> String {
    let port = metrics_port(log).expect("metrics port in the log");
    reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .expect("metrics answers")
        .text()
        .await
        .expect("metrics text")
}

/// The value of one series on the /metrics page of `service`, written as
/// the page writes it (`insights_assigned_partitions`, or with its labels:
/// `insights_rate_limit_per_minute{provider="finbox"}`); `None` while the
/// service has no metrics server, does not answer, or has no such series.
pub async fn metric(service: &Service, series: &str) -> Option<f64> {
    let port = metrics_port(&service.log_text())?;
    let page = try_metrics_page(port).await?;
    page.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

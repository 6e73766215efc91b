//! Child processes of the bench (the provider simulator and service
//! instances, both from the built binary) and what the bench reads about
//! them: CPU time and resident memory from /proc, the simulator's admin API.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// The service binary: `BENCH_SERVICE_BIN`, else the one cargo built with
/// this bench (target/release under `cargo bench`, target/debug under
/// `cargo test --bench`).
pub fn service_bin() -> PathBuf {
    std::env::var_os("BENCH_SERVICE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_insights-enricher")))
}

/// A free local port. The listener is dropped before the child binds it; the
/// race with other processes is harmless on a bench machine.
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn spawn(args: &[&str], env: &[(String, String)], log: &Path) -> Result<Child> {
    spawn_program(&service_bin(), args, env, log)
}

/// Starts `program` with `args`, an environment of only PATH, NO_COLOR and
/// `env`, and its output appended to `log`.
pub fn spawn_program(
    program: &Path,
    args: &[&str],
    env: &[(String, String)],
    log: &Path,
) -> Result<Child> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("open {}", log.display()))?;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn()
        .with_context(|| format!("spawn {}", program.display()))
}

/// A child process that is SIGKILLed when dropped.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Fails when the process has already exited (with the log's tail).
    pub fn check_alive(&mut self) -> Result<()> {
        if let Ok(Some(status)) = self.child.try_wait() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            bail!(
                "{} exited ({status}); log tail:\n{}",
                self.log.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        Ok(())
    }

    /// User + system CPU time so far.
    pub fn cpu(&self) -> Result<Duration> {
        cpu_of(self.pid())
    }

    /// (VmRSS, VmHWM) in bytes.
    pub fn memory(&self) -> Result<(u64, u64)> {
        memory_of(self.pid())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

fn clock_ticks() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100)
}

pub fn cpu_of(pid: u32) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name may contain spaces; fields are counted after its ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("bad /proc stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after ')'.
    let utime: u64 = fields.get(11).context("utime")?.parse()?;
    let stime: u64 = fields.get(12).context("stime")?.parse()?;
    Ok(Duration::from_millis(
        (utime + stime) * 1000 / clock_ticks(),
    ))
}

pub fn memory_of(pid: u32) -> Result<(u64, u64)> {
    let [rss, hwm] = status_bytes(pid, ["VmRSS:", "VmHWM:"])?;
    Ok((rss, hwm))
}

/// The resident size split into private memory (heap, stacks: `RssAnon`)
/// and mapped files (the binary's and libraries' pages: `RssFile`).
pub fn resident_split_of(pid: u32) -> Result<(u64, u64)> {
    let [anon, file] = status_bytes(pid, ["RssAnon:", "RssFile:"])?;
    Ok((anon, file))
}

/// Fields of `/proc/<pid>/status` given in kB, in bytes.
fn status_bytes<const N: usize>(pid: u32, names: [&str; N]) -> Result<[u64; N]> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let mut out = [0u64; N];
    for (slot, name) in out.iter_mut().zip(names) {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .with_context(|| format!("{name} missing"))?;
        let kb: u64 = line.split_whitespace().nth(1).context("value")?.parse()?;
        *slot = kb * 1024;
    }
    Ok(out)
}

/// A service instance (`insights-enricher run`) with its health server on a
/// known port.
pub struct Service {
    pub proc: Proc,
    pub health_url: String,
}

impl Service {
    pub fn start(env: &[(String, String)], log: &Path) -> Result<Service> {
        let port = free_port()?;
        let mut env = env.to_vec();
        env.push((
            "INSIGHTS__SERVER__LISTEN".into(),
            format!("127.0.0.1:{port}"),
        ));
        let child = spawn(&["run"], &env, log)?;
        Ok(Service {
            proc: Proc {
                child,
                log: log.to_path_buf(),
            },
            health_url: format!("http://127.0.0.1:{port}"),
        })
    }

    /// Waits until /readyz answers 200 (joined the group, broker up).
    pub async fn wait_ready(&mut self, http: &reqwest::Client, timeout: Duration) -> Result<()> {
        let end = Instant::now() + timeout;
        loop {
            self.proc.check_alive()?;
            if let Ok(r) = http.get(format!("{}/readyz", self.health_url)).send().await {
                if r.status().is_success() {
                    return Ok(());
                }
            }
            if Instant::now() > end {
                bail!("service not ready after {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Service {
    /// The text of /metrics now.
    pub async fn metrics(&self, http: &reqwest::Client) -> Result<String> {
        Ok(http
            .get(format!("{}/metrics", self.health_url))
            .send()
            .await?
            .text()
            .await?)
    }

    /// Sum of the samples of one Prometheus series whose line contains
    /// every comma-separated part of `label` (e.g. `provider="finbox"`;
    /// `""` matches every line), from /metrics.
    pub async fn counter(&self, http: &reqwest::Client, name: &str, label: &str) -> Result<f64> {
        Ok(series_sum(&self.metrics(http).await?, name, label))
    }
}

/// Sum of the samples of series `name` in a /metrics text whose line
/// contains every comma-separated part of `label` (`""` matches all).
pub fn series_sum(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(['{', ' ']))
                && label.split(',').all(|part| l.contains(part))
        })
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum()
}

/// The provider simulator as a child process, so its CPU is not the bench's.
pub struct Simulator {
    pub proc: Proc,
    pub url: String,
    http: reqwest::Client,
}

impl Simulator {
    /// Starts with both limits off and the given scenario set.
    pub async fn start(scenarios: &Value, dir: &Path) -> Result<Simulator> {
        let port = free_port()?;
        let listen = format!("127.0.0.1:{port}");
        let child = spawn(
            &[
                "simulate",
                "--listen",
                &listen,
                "--finbox-rate-limit-per-minute",
                "0",
                "--credeau-rate-limit-per-minute",
                "0",
            ],
            &[],
            &dir.join("simulator.log"),
        )?;
        let mut sim = Simulator {
            proc: Proc {
                child,
                log: dir.join("simulator.log"),
            },
            url: format!("http://{listen}"),
            http: reqwest::Client::new(),
        };
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            sim.proc.check_alive()?;
            if let Ok(r) = sim.http.get(format!("{}/healthz", sim.url)).send().await {
                if r.status().is_success() {
                    break;
                }
            }
            if Instant::now() > end {
                bail!("simulator not up after 30s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        sim.put("/admin/scenarios", scenarios).await?;
        Ok(sim)
    }

    pub async fn put(&self, path: &str, body: &Value) -> Result<Value> {
        let r = self
            .http
            .put(format!("{}{path}", self.url))
            .json(body)
            .send()
            .await?;
        let status = r.status();
        let v: Value = r.json().await?;
        if !status.is_success() {
            bail!("PUT {path}: {status} {v}");
        }
        Ok(v)
    }

    pub async fn limits(&self, finbox: u32, credeau: u32) -> Result<()> {
        self.put(
            "/admin/limits",
            &serde_json::json!({"finbox_per_minute": finbox, "credeau_per_minute": credeau}),
        )
        .await
        .map(|_| ())
    }

    pub async fn stats(&self) -> Result<Stats> {
        let v: Value = self
            .http
            .get(format!("{}/admin/stats", self.url))
            .send()
            .await?
            .json()
            .await?;
        Ok(Stats(v))
    }

    /// One user's history, or None when the simulator never saw the user.
    pub async fn user(&self, id: &str) -> Result<Option<Value>> {
        let r = self
            .http
            .get(format!("{}/admin/users/{id}", self.url))
            .send()
            .await?;
        if r.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        Ok(Some(r.json().await?))
    }
}

/// The arrival times (ms) of the requests a user's history (from
/// [`Simulator::user`]) logged for `provider` ("finbox", "credeau"), all of
/// them: an error when the log kept fewer than the simulator counted.
pub fn request_times(history: &Value, provider: &str, id: &str) -> Result<Vec<i64>> {
    let p = &history[provider];
    let polls: Vec<i64> = p["last_requests"]
        .as_array()
        .with_context(|| format!("{id}: no {provider} requests"))?
        .iter()
        .filter_map(|x| x["at_ms"].as_i64())
        .collect();
    let count = p["requests"].as_i64().unwrap_or(0);
    if polls.is_empty() || polls.len() as i64 != count {
        bail!("{id}: {count} {provider} requests, {} logged", polls.len());
    }
    Ok(polls)
}

/// The simulator's counters (GET /admin/stats).
#[derive(Debug, Clone)]
pub struct Stats(pub Value);

impl Stats {
    pub fn requests(&self, provider: &str) -> u64 {
        self.0[provider]["requests"].as_u64().unwrap_or(0)
    }

    /// Bytes of the provider's answer bodies, as sent.
    pub fn body_bytes(&self, provider: &str) -> u64 {
        self.0[provider]["body_bytes"].as_u64().unwrap_or(0)
    }

    pub fn status(&self, provider: &str, status: &str) -> u64 {
        self.0[provider]["by_status"][status].as_u64().unwrap_or(0)
    }
}

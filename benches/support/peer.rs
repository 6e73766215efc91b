//! Scenario `peer`: the service against a Python program doing the same
//! work (issue 23: "CPU on the realistic mix: at least 20x less than the
//! Python peer on the same mix, in the same run").
//!
//! The peer is `benches/peer/peer.py` (asyncio, httpx, confluent-kafka and
//! the json module): it consumes the onboarding events in a group, calls
//! both providers for each user, many users at a time, checks the answers
//! name the user, and publishes the same three JSON outputs in
//! transactions with the consumed offsets. Each pair runs the service
//! exactly as the backlog scenario does (a fresh simulator with the mix's
//! answers, fresh topics, N ready users produced, the process spawned on
//! them), then the peer on the same setup and the same user ids (so the
//! same answers, byte for byte), and measures both alike: CPU (user +
//! system, all threads) from the spawn to the last combined event, peak
//! resident size, and wall time.
//!
//! The peer runs under the test venv's Python (`BENCH_PEER_PYTHON`, else
//! `INSIGHTS_PYTHON`, else `~/.cache/insights-enricher/venv/bin/python`;
//! `scripts/tools.sh python` builds it). Without one that imports
//! confluent_kafka and httpx, the smoke run skips the scenario and says why;
//! a full run fails.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::answers::answers;
use super::backlog::{self, Run};
use super::kafka::{self, Names, Reader};
use super::procs::{spawn_program, Proc, Simulator};
use super::{round, secs, Ctx, Report};

/// What issue 23 asks of the service against the peer.
const RATIO_GOAL: f64 = 20.0;

/// The peer program, in the source tree.
fn peer_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/peer/peer.py")
}

pub async fn run(ctx: &Ctx) -> Result<Report> {
    let mut r = Report::default();
    let python = match python() {
        Ok(p) => p,
        Err(why) if ctx.smoke => {
            println!("   peer skipped: {why}");
            r.fig("skipped", why);
            return Ok(r);
        }
        Err(why) => bail!("no Python for the peer: {why}"),
    };
    let n = ctx.size("PEER_USERS", 100, 10_000);
    let pairs = ctx.size("PEER_PAIRS", 1, 3);
    let concurrency = ctx.size("PEER_CONCURRENCY", 64, 64);
    r.fig("users", n);
    r.fig("pairs", pairs);
    r.fig("peer_concurrency", concurrency);
    r.fig("peer_python", python.display().to_string());
    // As in the backlog scenario: a broker minutes old slows whatever runs
    // first, and the service runs first in each pair.
    let warm_up = ctx.size("PEER_WARMUP_USERS", 0, 2_000);
    if warm_up > 0 {
        let w = backlog::one(ctx, warm_up, "peer-warm-up").await?;
        r.fig("warm_up_users", warm_up);
        r.fig(
            "warm_up_service_cpu_ms_per_user",
            round(w.cpu.as_secs_f64() * 1000.0 / warm_up as f64, 3),
        );
    }
    let mut ratios = Vec::new();
    for i in 1..=pairs {
        let svc = backlog::one(ctx, n, &format!("peer-service-{i}")).await?;
        let peer = peer_one(ctx, &python, n, concurrency, &format!("peer-python-{i}")).await?;
        for (who, run) in [("service", &svc), ("peer", &peer)] {
            let p = format!("pair_{i}_{who}");
            r.fig(&format!("{p}_cpu_ms_per_user"), cpu_ms_per_user(run, n));
            r.fig(
                &format!("{p}_startup_cpu_ms"),
                round(run.cpu_at_first.as_secs_f64() * 1000.0, 0),
            );
            r.fig(&format!("{p}_hwm_mb"), mb(run.hwm));
            r.fig(
                &format!("{p}_answer_mb_per_cpu_s"),
                round(mb(run.answer_bytes) / run.cpu.as_secs_f64().max(1e-9), 1),
            );
            r.fig(&format!("{p}_spawn_to_last_combined_s"), secs(run.whole));
        }
        let ratio = peer.cpu.as_secs_f64() / svc.cpu.as_secs_f64().max(1e-9);
        r.fig(&format!("pair_{i}_peer_to_service_cpu"), round(ratio, 2));
        if i == 1 {
            r.fig("answers_mb_per_run", mb(svc.answer_bytes));
        }
        ratios.push(ratio);
    }
    let min = ratios.iter().copied().fold(f64::INFINITY, f64::min);
    let max = ratios.iter().copied().fold(0.0, f64::max);
    r.fig("peer_to_service_cpu_min", round(min, 2));
    r.fig("peer_to_service_cpu_max", round(max, 2));
    if !ctx.smoke {
        r.goal(
            "service CPU per user at least 20x less than the Python peer",
            min >= RATIO_GOAL,
        );
    }
    Ok(r)
}

fn cpu_ms_per_user(run: &Run, n: u64) -> f64 {
    round(run.cpu.as_secs_f64() * 1000.0 / n as f64, 3)
}

fn mb(bytes: u64) -> f64 {
    round(bytes as f64 / 1048576.0, 1)
}

/// The first Python that imports the peer's packages, or why there is none.
fn python() -> std::result::Result<PathBuf, String> {
    let from_env = |name: &str| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    let candidates: Vec<PathBuf> = match from_env("BENCH_PEER_PYTHON") {
        Some(p) => vec![p],
        None => {
            let cache = from_env("INSIGHTS_CACHE")
                .or_else(|| from_env("HOME").map(|h| h.join(".cache/insights-enricher")));
            from_env("INSIGHTS_PYTHON")
                .into_iter()
                .chain(cache.map(|c| c.join("venv/bin/python")))
                .collect()
        }
    };
    let mut why = Vec::new();
    for c in candidates {
        match Command::new(&c)
            .args(["-c", "import confluent_kafka, httpx"])
            .output()
        {
            Ok(o) if o.status.success() => return Ok(c),
            Ok(o) => {
                let err = String::from_utf8_lossy(&o.stderr);
                let last = err.lines().last().unwrap_or("").trim().to_string();
                why.push(format!("{}: {last}", c.display()));
            }
            Err(e) => why.push(format!("{}: {e}", c.display())),
        }
    }
    if why.is_empty() {
        return Err("no Python named (BENCH_PEER_PYTHON, INSIGHTS_PYTHON) and no HOME".into());
    }
    Err(format!(
        "no Python with confluent_kafka and httpx ({}); `scripts/tools.sh python` builds the venv",
        why.join("; ")
    ))
}

/// The peer's options for one run: the run's topics and group, and the
/// simulator and credentials the service gets.
fn peer_args(names: &Names, sim_url: &str, concurrency: u64) -> Result<Vec<String>> {
    let env = names.service_env(sim_url)?;
    let get = |key: &str| -> Result<String> {
        env.iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
            .with_context(|| format!("{key} not in the service's settings"))
    };
    let p = &names.prefix;
    let pairs = [
        ("bootstrap", kafka::bootstrap()?),
        ("input", names.input.clone()),
        ("group", names.group.clone()),
        ("transactional-id", format!("{p}-peer")),
        ("finbox-topic", get("INSIGHTS__TOPICS__FINBOX_PREDICTORS")?),
        ("sms-topic", get("INSIGHTS__TOPICS__SMS_EXTRACTION")?),
        ("combined-topic", names.combined.clone()),
        ("dead-letter", get("INSIGHTS__TOPICS__DEAD_LETTER")?),
        ("finbox-url", get("INSIGHTS__FINBOX__BASE_URL")?),
        ("credeau-url", get("INSIGHTS__CREDEAU__BASE_URL")?),
        ("finbox-api-key", get("INSIGHTS__FINBOX__API_KEY")?),
        ("finbox-server-hash", get("INSIGHTS__FINBOX__SERVER_HASH")?),
        ("credeau-client-id", get("INSIGHTS__CREDEAU__CLIENT_ID")?),
        ("credeau-auth-token", get("INSIGHTS__CREDEAU__AUTH_TOKEN")?),
        ("concurrency", concurrency.to_string()),
    ];
    let mut args = vec![peer_script().display().to_string()];
    for (k, v) in pairs {
        args.push(format!("--{k}"));
        args.push(v);
    }
    Ok(args)
}

/// The backlog run of [`backlog::one`], with the peer in the service's
/// place: `n` ready users produced, the peer spawned on them and measured
/// until each has its one combined event (and each provider one call).
async fn peer_one(
    ctx: &Ctx,
    python: &Path,
    n: u64,
    concurrency: u64,
    log_name: &str,
) -> Result<Run> {
    let sim = Simulator::start(&answers().ready_scenarios(), &ctx.logs).await?;
    sim.limits(0, 0).await?;
    let names = Names::new("peer");
    kafka::create_run_topics(&names).await?;
    // The service's user ids: the same answers, byte for byte.
    kafka::produce_users(&names.input, "b", n).await?;
    let reader = Reader::start(&names.combined)?;
    let args = peer_args(&names, &sim.url, concurrency)?;
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let env = [
        ("PYTHONUNBUFFERED".to_string(), "1".to_string()),
        ("PYTHONDONTWRITEBYTECODE".to_string(), "1".to_string()),
    ];
    let log = ctx.log(log_name);
    let spawned = Instant::now();
    let mut peer = Proc {
        child: spawn_program(python, &args, &env, &log)?,
        log,
    };
    let (first, cpu_at_first) = loop {
        peer.check_alive()?;
        let first = reader.seen.lock().ok().and_then(|g| g.first_at);
        if let Some(at) = first {
            break (at, peer.cpu()?);
        }
        if spawned.elapsed() > Duration::from_secs(60) {
            bail!("peer {n}: no combined event within 60 s of the spawn");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    reader
        .wait_distinct(n as usize, Duration::from_secs(60), || peer.check_alive())
        .await?;
    let cpu = peer.cpu()?;
    let (_, hwm) = peer.memory()?;
    let last = reader
        .seen
        .lock()
        .ok()
        .and_then(|g| g.last_new_key_at)
        .context("no output read")?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let records = reader.records();
    if records != n {
        bail!("peer {n}: {records} combined events (exactly one per user expected)");
    }
    let stats = sim.stats().await?;
    let (fb, cr) = (stats.requests("finbox"), stats.requests("credeau"));
    if fb != n || cr != n {
        bail!("peer {n}: provider calls finbox={fb} credeau={cr} (one each expected)");
    }
    let answer_bytes = stats.body_bytes("finbox") + stats.body_bytes("credeau");
    peer.kill();
    if ctx.smoke {
        // The peer's other two outputs, one per user: re-reading them all
        // would take minutes at full size, so only the smoke run checks.
        for topic in [
            format!("{}.finbox", names.prefix),
            format!("{}.sms", names.prefix),
        ] {
            let r = Reader::start(&topic)?;
            r.wait_distinct(n as usize, Duration::from_secs(30), || Ok(()))
                .await
                .with_context(|| format!("the peer's {topic}"))?;
        }
    }
    Ok(Run {
        first: first.saturating_duration_since(spawned),
        whole: last.saturating_duration_since(spawned),
        cpu_at_first,
        cpu,
        hwm,
        answer_bytes,
    })
}

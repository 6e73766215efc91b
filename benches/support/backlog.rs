//! Scenario 6, backlog: N users all in the input topic, ready at once,
//! before the service starts; then the service is started with its default
//! settings (only the bench's topic names, rate limits out of the way and
//! initial delays 0, as in the throughput run) and works the backlog off.
//!
//! What it costs as a bill counts it: the service's CPU from its spawn to
//! the last combined event (start-up and the group join included), per
//! user, next to the start-up alone (spawn to the first combined event),
//! and the peak resident size of the whole run (VmHWM).

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::answers::answers;
use super::kafka::{self, Names, Reader};
use super::procs::{Service, Simulator};
use super::{round, secs, Ctx, Report};

/// The peak the issue allows while a backlog is worked off.
const PEAK_GOAL_BYTES: u64 = 64 * 1048576;
/// Whole-run CPU per user the issue allows (ms).
const CPU_GOAL_MS: f64 = 0.15;

/// One service process working off one backlog, as measured.
pub(crate) struct Run {
    /// Spawn to the first combined event.
    pub(crate) first: Duration,
    /// Spawn to the last combined event.
    pub(crate) whole: Duration,
    /// Service CPU at the first combined event, and at the last.
    pub(crate) cpu_at_first: Duration,
    pub(crate) cpu: Duration,
    pub(crate) hwm: u64,
    /// Bytes of the providers' answer bodies (both providers).
    pub(crate) answer_bytes: u64,
}

pub async fn run(ctx: &Ctx) -> Result<Report> {
    let sizes = ctx.sizes("BACKLOG_USERS", &[300], &[10_000, 100_000]);
    let mut r = Report::default();
    // The broker of a bench run is minutes old, and its first transactions
    // and JIT compilation slow whatever runs first: a cold first run cost
    // the service about 35 % more CPU per user (2026-12-03). A production
    // broker is warm, so one unmeasured service first works off a small
    // backlog of its own; its figures are printed as such.
    let warm_up = ctx.size("BACKLOG_WARMUP_USERS", 0, 2_000);
    if warm_up > 0 {
        let w = one(ctx, warm_up, "backlog-warm-up").await?;
        r.fig("warm_up_users", warm_up as f64);
        r.fig(
            "warm_up_cpu_ms_per_user_whole_run",
            round(w.cpu.as_secs_f64() * 1000.0 / warm_up as f64, 3),
        );
        r.fig("warm_up_spawn_to_last_combined_s", secs(w.whole));
    }
    let mut peaks = Vec::new();
    let mut cpus = Vec::new();
    for n in sizes {
        let Run {
            first,
            whole,
            cpu_at_first,
            cpu,
            hwm,
            answer_bytes,
        } = one(ctx, n, &format!("backlog-{n}")).await?;
        let per_user = |d: Duration| round(d.as_secs_f64() * 1000.0 / n as f64, 3);
        let mb = |b: u64| round(b as f64 / 1048576.0, 1);
        r.fig(&format!("users_{n}_spawn_to_first_combined_s"), secs(first));
        r.fig(&format!("users_{n}_spawn_to_last_combined_s"), secs(whole));
        r.fig(
            &format!("users_{n}_users_per_s_from_spawn"),
            round(n as f64 / whole.as_secs_f64(), 0),
        );
        r.fig(
            &format!("users_{n}_startup_cpu_ms"),
            round(cpu_at_first.as_secs_f64() * 1000.0, 0),
        );
        r.fig(
            &format!("users_{n}_cpu_ms_per_user_whole_run"),
            per_user(cpu),
        );
        r.fig(
            &format!("users_{n}_cpu_ms_per_user_after_first"),
            per_user(cpu.saturating_sub(cpu_at_first)),
        );
        r.fig(&format!("users_{n}_hwm_mb"), mb(hwm));
        r.fig(&format!("users_{n}_answers_mb"), mb(answer_bytes));
        r.fig(
            &format!("users_{n}_answer_mb_per_cpu_s"),
            round(mb(answer_bytes) / cpu.as_secs_f64().max(1e-9), 1),
        );
        peaks.push(hwm);
        cpus.push(cpu.as_secs_f64() * 1000.0 / n as f64);
    }
    if !ctx.smoke {
        r.goal(
            "peak RSS under 64 MB working off the backlog",
            peaks.iter().all(|p| *p < PEAK_GOAL_BYTES),
        );
        r.goal(
            "whole-run CPU per user <= 0.15 ms",
            cpus.iter().all(|c| *c <= CPU_GOAL_MS),
        );
    }
    Ok(r)
}

/// Produces `n` ready users, starts the service on them and measures it
/// until each has its one combined event (and each provider one call).
pub(crate) async fn one(ctx: &Ctx, n: u64, log_name: &str) -> Result<Run> {
    let sim = Simulator::start(&answers().ready_scenarios(), &ctx.logs).await?;
    sim.limits(0, 0).await?;
    let names = Names::new("backlog");
    kafka::create_run_topics(&names).await?;
    kafka::produce_users(&names.input, "b", n).await?;
    let reader = Reader::start(&names.combined)?;
    let mut env = names.service_env(&sim.url)?;
    if let Some(threshold) = answers().sms_threshold() {
        super::kafka::set_env(
            &mut env,
            "INSIGHTS__CREDEAU__CNT_SMS_THRESHOLD",
            &threshold.to_string(),
        );
    }
    let spawned = Instant::now();
    let mut svc = Service::start(&env, &ctx.log(log_name))?;
    // Start-up ends with the first combined event: everything before it
    // is the process start, the clients, the topic check and the group
    // join (readiness waits for the first statistics, 5 s, so it would
    // include part of the backlog).
    let (first, cpu_at_first) = loop {
        svc.proc.check_alive()?;
        let first = reader.seen.lock().ok().and_then(|g| g.first_at);
        if let Some(at) = first {
            break (at, svc.proc.cpu()?);
        }
        if spawned.elapsed() > Duration::from_secs(60) {
            bail!("backlog {n}: no combined event within 60 s of the spawn");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    reader
        .wait_distinct(n as usize, Duration::from_secs(60), || {
            svc.proc.check_alive()
        })
        .await?;
    // Everything since the spawn: start-up, group join, the backlog.
    let cpu = svc.proc.cpu()?;
    let (_, hwm) = svc.proc.memory()?;
    let last = reader
        .seen
        .lock()
        .ok()
        .and_then(|g| g.last_new_key_at)
        .context("no output read")?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let records = reader.records();
    if records != n {
        bail!("backlog {n}: {records} combined events (exactly one per user expected)");
    }
    let stats = sim.stats().await?;
    let (fb, cr) = (stats.requests("finbox"), stats.requests("credeau"));
    if fb != n || cr != n {
        bail!("backlog {n}: provider calls finbox={fb} credeau={cr} (one each expected)");
    }
    let answer_bytes = stats.body_bytes("finbox") + stats.body_bytes("credeau");
    svc.proc.kill();
    Ok(Run {
        first: first.saturating_duration_since(spawned),
        whole: last.saturating_duration_since(spawned),
        cpu_at_first,
        cpu,
        hwm,
        answer_bytes,
    })
}

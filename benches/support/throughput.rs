//! Scenario 1, throughput: users whose data is ready at once, through the
//! service, against a bare transactional consume-produce loop on the same
//! broker; CPU per user of the service; optionally a `perf record` of it.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::answers::answers;
use super::kafka::{self, Names, Reader};
use super::procs::{series_sum, Service, Simulator};
use super::{round, secs, Ctx, Report};

const MAX_BATCH: usize = 500;
const LINGER: Duration = Duration::from_millis(100);

/// Everyone ready at once, small answers (the scenarios that measure
/// something other than the cost of an answer).
pub fn small_ready_scenarios() -> serde_json::Value {
    super::answers::Answers::Small.ready_scenarios()
}

pub async fn run(ctx: &Ctx) -> Result<Report> {
    let n = ctx.size("THROUGHPUT_USERS", 300, 20_000);
    let mut r = Report::default();
    r.fig("users", n);

    let base = baseline(n).await?;
    r.fig(
        "baseline_users_per_s",
        round(n as f64 / base.as_secs_f64(), 1),
    );
    r.fig("baseline_s", secs(base));

    let sim = Simulator::start(&answers().ready_scenarios(), &ctx.logs).await?;
    sim.limits(0, 0).await?;
    let names = Names::new("tput");
    kafka::create_run_topics(&names).await?;
    let env = names.service_env(&sim.url)?;
    let mut svc = Service::start(&env, &ctx.log("throughput-service"))?;
    svc.wait_ready(&ctx.http, Duration::from_secs(60)).await?;
    let reader = Reader::start(&names.combined)?;
    let mut perf = match &ctx.perf_data {
        Some(path) => Some(start_perf(svc.proc.pid(), path)?),
        None => None,
    };
    let cpu0 = svc.proc.cpu()?;
    let sim_cpu0 = sim.proc.cpu()?;
    let start = Instant::now();
    kafka::produce_users(&names.input, "tp", n).await?;
    let produced = start.elapsed();
    let idle = Duration::from_secs(60);
    reader
        .wait_distinct(n as usize, idle, || svc.proc.check_alive())
        .await?;
    let elapsed = reader
        .seen
        .lock()
        .ok()
        .and_then(|g| g.last_new_key_at)
        .context("no output read")?
        - start;
    // As a bill counts it: everything since the spawn (start-up, the group
    // join, the idle wait for the input), read right after the last event.
    let cpu_whole = svc.proc.cpu()?;
    let cpu = cpu_whole.saturating_sub(cpu0);
    let sim_cpu = sim.proc.cpu()? - sim_cpu0;
    if let Some(p) = perf.as_mut() {
        stop_perf(p)?;
    }
    // Late duplicates would show up within a moment of the last new key.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let records = reader.records();
    if records != n {
        bail!("{records} combined events for {n} users (exactly one each expected)");
    }
    let stats = sim.stats().await?;
    let (fb, cr) = (stats.requests("finbox"), stats.requests("credeau"));
    if fb != n || cr != n {
        bail!("provider calls finbox={fb} credeau={cr} for {n} users ready at once (one each expected)");
    }
    let tput = n as f64 / elapsed.as_secs_f64();
    let ratio = elapsed_ratio(base, elapsed);
    r.fig("produce_s", secs(produced));
    r.fig("service_s", secs(elapsed));
    r.fig("service_users_per_s", round(tput, 1));
    r.fig("ratio_to_baseline", round(ratio, 3));
    r.fig(
        "service_cpu_ms_per_user",
        round(cpu.as_secs_f64() * 1000.0 / n as f64, 3),
    );
    r.fig(
        "service_cpu_ms_per_user_whole_run",
        round(cpu_whole.as_secs_f64() * 1000.0 / n as f64, 3),
    );
    r.fig(
        "simulator_cpu_ms_per_user",
        round(sim_cpu.as_secs_f64() * 1000.0 / n as f64, 3),
    );
    r.fig(
        "service_cpu_share_of_one_core",
        round(cpu.as_secs_f64() / elapsed.as_secs_f64(), 2),
    );
    r.fig(
        "provider_calls_per_user",
        round((fb + cr) as f64 / n as f64, 3),
    );
    // How the records were cut into transactions (each costs broker
    // round trips whatever its size) and where the time went.
    let metrics = svc.metrics(&ctx.http).await?;
    let sum = |name: &str, label: &str| series_sum(&metrics, name, label);
    let txns = sum("insights_transactions_total", "committed");
    let batched = sum("insights_batch_records_sum", "");
    let txn_s = sum("insights_transaction_duration_seconds_sum", "");
    let requests = sum("insights_provider_request_duration_seconds_count", "").max(1.0);
    r.fig("transactions", txns);
    r.fig(
        "transaction_ms_mean",
        round(txn_s * 1000.0 / txns.max(1.0), 1),
    );
    r.fig("transaction_s_total", round(txn_s, 2));
    r.fig(
        "provider_request_ms_mean",
        round(
            sum("insights_provider_request_duration_seconds_sum", "") * 1000.0 / requests,
            1,
        ),
    );
    r.fig("records_per_transaction", round(batched / txns.max(1.0), 1));
    r.fig(
        "loop_iterations_per_record",
        round(
            sum("insights_consume_loop_iterations_total", "") / batched.max(1.0),
            2,
        ),
    );
    let (rss, hwm) = svc.proc.memory()?;
    r.fig("service_rss_mb", round(rss as f64 / 1048576.0, 1));
    r.fig("service_hwm_mb", round(hwm as f64 / 1048576.0, 1));
    if !ctx.smoke {
        r.goal("throughput >= 1.0 x baseline", ratio >= 1.0);
    }
    Ok(r)
}

fn elapsed_ratio(baseline: Duration, service: Duration) -> f64 {
    baseline.as_secs_f64() / service.as_secs_f64()
}

/// The same work without HTTP or decisions: time from the first input
/// produced to the last of its outputs read.
async fn baseline(n: u64) -> Result<Duration> {
    let names = Names::new("base");
    let outputs = [
        format!("{}.finbox", names.prefix),
        format!("{}.sms", names.prefix),
        names.combined.clone(),
    ];
    kafka::create_topics(&[&names.input, &outputs[0], &outputs[1], &outputs[2]]).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let joined = Arc::new(AtomicBool::new(false));
    let (input, group) = (names.input.clone(), names.group.clone());
    let (st, jo) = (stop.clone(), joined.clone());
    let outs = outputs.clone();
    let handle = std::thread::spawn(move || {
        kafka::baseline_loop(&input, outs, &group, MAX_BATCH, LINGER, st, jo)
    });
    let wait_join = Instant::now();
    while !joined.load(Ordering::Relaxed) {
        if handle.is_finished() || wait_join.elapsed() > Duration::from_secs(60) {
            stop.store(true, Ordering::Relaxed);
            let res = handle.join();
            bail!("baseline loop did not join its group: {res:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let reader = Reader::start(&outputs[2])?;
    let start = Instant::now();
    kafka::produce_users(&names.input, "bl", n).await?;
    let finished = || -> Result<()> {
        if handle.is_finished() {
            bail!("baseline loop stopped early");
        }
        Ok(())
    };
    let waited = reader
        .wait_distinct(n as usize, Duration::from_secs(60), finished)
        .await;
    stop.store(true, Ordering::Relaxed);
    let result = handle
        .join()
        .map_err(|_| anyhow::anyhow!("baseline thread panicked"))?;
    waited?;
    let processed = result?;
    if processed != n {
        bail!("baseline processed {processed} of {n}");
    }
    let last = reader
        .seen
        .lock()
        .ok()
        .and_then(|g| g.last_new_key_at)
        .context("baseline: nothing read")?;
    Ok(last - start)
}

fn start_perf(pid: u32, out: &std::path::Path) -> Result<Child> {
    Command::new("perf")
        .args(["record", "-F", "499", "-g", "-o"])
        .arg(out)
        .args(["-p", &pid.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("spawn perf record")
}

fn stop_perf(child: &mut Child) -> Result<()> {
    // perf writes its data file on SIGINT.
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()?;
    child.wait()?;
    Ok(())
}

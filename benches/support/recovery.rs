//! Scenario 5, recovery: SIGKILL the service mid-run and start it again;
//! time until it publishes again, and provider calls repeated because of the
//! crash (users are ready at once, so without a crash each user costs
//! exactly one call per provider, as the throughput scenario checks).

use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use super::kafka::{self, Names, Reader};
use super::procs::{Service, Simulator};
use super::throughput::small_ready_scenarios;
use super::{secs, Ctx, Report};

pub async fn run(ctx: &Ctx) -> Result<Report> {
    // Smoke size: a transaction takes up to four batches (1,600 records),
    // so with 1,000 users a fast run could commit them all before the kill.
    let n = ctx.size("RECOVERY_USERS", 5_000, 20_000);
    let sim = Simulator::start(&small_ready_scenarios(), &ctx.logs).await?;
    sim.limits(0, 0).await?;
    let names = Names::new("recov");
    kafka::create_run_topics(&names).await?;
    // The production session timeout: a restarted pod keeps its name
    // (POD_NAME, a StatefulSet's) and is a static member, so it takes its
    // partitions back without waiting the session out.
    let mut env = names.service_env(&sim.url)?;
    kafka::set_env(&mut env, "INSIGHTS__KAFKA__SESSION_TIMEOUT", "45s");
    kafka::set_env(&mut env, "INSIGHTS__KAFKA__MAX_POLL_INTERVAL", "60s");
    kafka::set_env(&mut env, "INSIGHTS__KAFKA__STATIC_MEMBERSHIP", "true");
    let mut svc = Service::start(&env, &ctx.log("recovery-service-1"))?;
    svc.wait_ready(&ctx.http, Duration::from_secs(60)).await?;
    let reader = Reader::start(&names.combined)?;
    kafka::produce_users(&names.input, "r", n).await?;
    reader
        .wait_distinct((n / 5) as usize, Duration::from_secs(60), || {
            svc.proc.check_alive()
        })
        .await?;
    svc.proc.kill();
    let killed = Instant::now();
    let done_at_kill = reader.distinct();
    if done_at_kill as u64 >= n {
        bail!("all {n} users were done before the kill: use more users");
    }
    let marks = kafka::end_offsets_retrying(&names.combined)?;
    if let Ok(mut g) = reader.seen.lock() {
        g.mark = Some((marks, None));
    }
    let mut svc = Service::start(&env, &ctx.log("recovery-service-2"))?;
    let restarted = Instant::now();
    svc.wait_ready(&ctx.http, Duration::from_secs(60)).await?;
    let ready = restarted.elapsed();
    let first_new = loop {
        if let Some(t) = reader
            .seen
            .lock()
            .ok()
            .and_then(|g| g.mark.as_ref().and_then(|m| m.1))
        {
            break t;
        }
        svc.proc.check_alive()?;
        if restarted.elapsed() > Duration::from_secs(120) {
            bail!("no new output within 120 s of the restart");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    reader
        .wait_distinct(n as usize, Duration::from_secs(60), || {
            svc.proc.check_alive()
        })
        .await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let records = reader.records();
    if records != n {
        bail!(
            "{records} combined events for {n} users after the crash (exactly one each expected)"
        );
    }
    let stats = sim.stats().await?;
    let calls = stats.requests("finbox") + stats.requests("credeau");
    if calls < 2 * n {
        bail!("{calls} provider calls for {n} users (at least one per provider each expected)");
    }
    let mut r = Report::default();
    r.fig("users", n);
    r.fig("session_timeout_s", 45);
    r.fig("done_at_kill", done_at_kill);
    r.fig("restart_to_ready_s", secs(ready));
    r.fig("restart_to_first_new_output_s", secs(first_new - restarted));
    r.fig("kill_to_first_new_output_s", secs(first_new - killed));
    r.fig("provider_calls", calls);
    r.fig("provider_calls_repeated", calls.saturating_sub(2 * n));
    if !ctx.smoke {
        r.goal(
            "restart to first new combined event under 10 s with the production session timeout",
            first_new - restarted < Duration::from_secs(10),
        );
    }
    Ok(r)
}

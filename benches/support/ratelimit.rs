//! Scenario 3, rate limit: a FinBox backlog larger than the limit serves in
//! the window; the share of the limit used over a steady window and the
//! 429s, with one service instance, then two and three sharing the limit.

use std::time::Duration;

use anyhow::{bail, Result};

use super::kafka::{self, set_env, Names};
use super::procs::{Service, Simulator};
use super::throughput::small_ready_scenarios;
use super::{round, Ctx, Report};

const LIMIT_PER_MINUTE: u64 = 6_000;

pub async fn run(ctx: &Ctx) -> Result<Report> {
    let warmup = Duration::from_secs(ctx.size("RATELIMIT_WARMUP_S", 2, 10));
    let window = Duration::from_secs(ctx.size("RATELIMIT_WINDOW_S", 4, 60));
    let per_s = LIMIT_PER_MINUTE as f64 / 60.0;
    // 30 % more than the limit can serve before the window ends.
    let backlog = ((warmup + window).as_secs_f64() * per_s * 1.3) as u64;
    let mut r = Report::default();
    r.fig("limit_per_minute", LIMIT_PER_MINUTE);
    r.fig("backlog_users", backlog);
    r.fig("window_s", window.as_secs());
    for instances in [1usize, 2, 3] {
        let (share, r429, served, per) = phase(ctx, instances, backlog, warmup, window).await?;
        r.fig(
            &format!("instances_{instances}_finbox_calls_per_instance"),
            per,
        );
        r.fig(
            &format!("instances_{instances}_share_of_limit"),
            round(share, 3),
        );
        r.fig(&format!("instances_{instances}_served_in_window"), served);
        r.fig(&format!("instances_{instances}_finbox_429s"), r429);
        if !ctx.smoke {
            r.goal(
                format!("{instances} instance(s): >= 95 % of the limit used"),
                share >= 0.95,
            );
        }
        r.goal(format!("{instances} instance(s): zero 429s"), r429 == 0);
    }
    Ok(r)
}

async fn phase(
    ctx: &Ctx,
    instances: usize,
    backlog: u64,
    warmup: Duration,
    window: Duration,
) -> Result<(f64, u64, u64, Vec<f64>)> {
    let sim = Simulator::start(&small_ready_scenarios(), &ctx.logs).await?;
    sim.limits(LIMIT_PER_MINUTE as u32, 0).await?;
    let names = Names::new(&format!("rl{instances}"));
    kafka::create_run_topics(&names).await?;
    let mut services = Vec::new();
    for i in 0..instances {
        let mut env = names.service_env(&sim.url)?;
        set_env(
            &mut env,
            "INSIGHTS__FINBOX__RATE_LIMIT_PER_MINUTE",
            &LIMIT_PER_MINUTE.to_string(),
        );
        set_env(
            &mut env,
            "INSIGHTS__KAFKA__TRANSACTIONAL_ID_PREFIX",
            &format!("{}-{i}", names.prefix),
        );
        services.push(Service::start(
            &env,
            &ctx.log(&format!("ratelimit-{instances}-{i}")),
        )?);
    }
    for s in services.iter_mut() {
        s.wait_ready(&ctx.http, Duration::from_secs(60)).await?;
    }
    // A second member joining makes the group rebalance; let it settle.
    if instances > 1 {
        tokio::time::sleep(Duration::from_secs(3)).await;
        for s in services.iter_mut() {
            s.wait_ready(&ctx.http, Duration::from_secs(60)).await?;
        }
    }
    kafka::produce_users(&names.input, "rl", backlog).await?;
    tokio::time::sleep(warmup).await;
    let s1 = sim.stats().await?;
    tokio::time::sleep(window).await;
    let s2 = sim.stats().await?;
    for s in services.iter_mut() {
        s.proc.check_alive()?;
    }
    let ok = |s: &super::procs::Stats| s.requests("finbox") - s.status("finbox", "429");
    let served = ok(&s2) - ok(&s1);
    if ok(&s2) >= backlog {
        bail!(
            "backlog of {backlog} fully served before the window ended: the limit was not binding"
        );
    }
    let share = served as f64 / (window.as_secs_f64() * LIMIT_PER_MINUTE as f64 / 60.0);
    let mut per = Vec::new();
    for s in &services {
        per.push(
            s.counter(
                &ctx.http,
                "insights_provider_requests_total",
                "provider=\"finbox\"",
            )
            .await?,
        );
    }
    Ok((share, s2.status("finbox", "429"), served, per))
}

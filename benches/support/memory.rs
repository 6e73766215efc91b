//! Scenario 2, memory: resident memory of the service holding 1k, 100k and
//! 1M users that wait on providers not due for an hour, so each user is one
//! task record in a long delay tier and no HTTP call is made.
//!
//! Three figures per size: the resident size right after the intake (the
//! backlog just worked off), the resident size once the users merely wait
//! (`BENCH_MEMORY_SETTLE_S` later: what "N users waiting" costs, and what
//! the 10 % goal compares), and the peak of the whole run (VmHWM, the
//! intake of the backlog included, which the 150 MB goal bounds).

use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use super::kafka::{self, set_env, Names};
use super::procs::Service;
use super::{round, secs, Ctx, Report};

pub async fn run(ctx: &Ctx) -> Result<Report> {
    let sizes = ctx.sizes("MEMORY_USERS", &[200, 1_000], &[1_000, 100_000, 1_000_000]);
    let settle = Duration::from_secs(ctx.size("MEMORY_SETTLE_S", 3, 15));
    let mut r = Report::default();
    let mut rss_all = Vec::new();
    for n in sizes {
        let names = Names::new("mem");
        kafka::create_run_topics(&names).await?;
        kafka::produce_users(&names.input, "m", n).await?;
        // No provider is called: nothing listens here.
        let mut env = names.service_env("http://127.0.0.1:9")?;
        set_env(&mut env, "INSIGHTS__FINBOX__INITIAL_DELAY", "1h");
        set_env(&mut env, "INSIGHTS__CREDEAU__INITIAL_DELAY", "1h");
        let mut svc = Service::start(&env, &ctx.log(&format!("memory-{n}")))?;
        svc.wait_ready(&ctx.http, Duration::from_secs(60)).await?;
        let start = Instant::now();
        let mut last = (0i64, Instant::now());
        loop {
            svc.proc.check_alive()?;
            // A loaded broker may time a metadata request out: that is
            // "no news", not a failure (the idle bound below still holds).
            let Ok(done) = kafka::committed_total(&names.input, &names.group) else {
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            };
            if done >= n as i64 {
                break;
            }
            if done != last.0 {
                last = (done, Instant::now());
            } else if last.1.elapsed() > Duration::from_secs(90) {
                bail!("memory {n}: input stuck at {done} of {n}");
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let intake = start.elapsed();
        let (rss_intake, _) = svc.proc.memory()?;
        // Let the tiers be read back and held, and freed memory be returned.
        tokio::time::sleep(settle).await;
        let (rss, hwm) = svc.proc.memory()?;
        let (anon, file) = super::procs::resident_split_of(svc.proc.pid())?;
        // A wait a little under 1h lands in the 30m tier.
        let mut tasks = 0i64;
        for tier in kafka::TIERS {
            tasks += kafka::end_offsets_retrying(&names.delay_topic(tier))?
                .values()
                .sum::<i64>();
        }
        // Every user waits as one task record; offsets also count one
        // transaction marker per partition written and transaction.
        if tasks < n as i64 {
            bail!("memory {n}: {tasks} delay-tier offsets for {n} users");
        }
        svc.proc.kill();
        let mb = |b: u64| round(b as f64 / 1048576.0, 1);
        r.fig(&format!("users_{n}_rss_after_intake_mb"), mb(rss_intake));
        r.fig(&format!("users_{n}_rss_mb"), mb(rss));
        r.fig(&format!("users_{n}_rss_anon_mb"), mb(anon));
        r.fig(&format!("users_{n}_rss_file_mb"), mb(file));
        r.fig(&format!("users_{n}_hwm_mb"), mb(hwm));
        r.fig(&format!("users_{n}_intake_s"), secs(intake));
        r.fig(
            &format!("users_{n}_intake_users_per_s"),
            round(n as f64 / intake.as_secs_f64(), 0),
        );
        r.fig(&format!("users_{n}_delay_offsets"), tasks);
        rss_all.push((rss, hwm));
    }
    let spread = |pick: fn(&(u64, u64)) -> u64| {
        let max = rss_all.iter().map(pick).max().unwrap_or(0) as f64;
        let min = rss_all.iter().map(|x| x.0).min().unwrap_or(0) as f64;
        if min > 0.0 {
            max / min - 1.0
        } else {
            0.0
        }
    };
    let waiting = spread(|x| x.0);
    r.fig("spread_max_rss_over_min_rss", round(waiting, 3));
    r.fig("spread_max_hwm_over_min_rss", round(spread(|x| x.1), 3));
    if !ctx.smoke {
        r.goal(
            "memory while waiting within 10 % across sizes",
            waiting <= 0.10,
        );
        r.goal(
            "memory under 150 MB (peak, intake included)",
            rss_all.iter().all(|x| x.1 < 150 * 1048576),
        );
    }
    Ok(r)
}

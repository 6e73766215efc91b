//! Scenario 7, brown-out, in two modes.
//!
//! Backlog: N users ready at once, and in a second run the same number with
//! every 20th user's Credeau calls hanging 65 s (above Credeau's 30 s
//! request timeout). The well-behaved users' time from the first input
//! produced to their last combined event, with and without the hanging
//! users; the hanging users each end exactly once, `failed` with a timeout
//! at their (1 minute) Credeau deadline.
//!
//! Trickle: M users arriving at 50 a second, in three runs: none faulty,
//! every 20th one's Credeau hanging 65 s, every 20th one's Credeau
//! answering 503 forever. Each well-behaved user's latency, from its input
//! record produced to its combined event read; the goal (issue 24) is the
//! others' p50 within +0.5 s and p95 within +1.5 s of the run without
//! faulty users.
//!
//! Production settings for the record budget (15 s) and the straggler wait
//! (5 s).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde_json::json;

use super::kafka::{self, Names, Reader};
use super::procs::{Service, Simulator};
use super::{round, secs, Ctx, Report};

/// One run: seconds until every well-behaved user had its combined event,
/// the hanging users' count, and each well-behaved user's latency from the
/// input produced to its combined event read, sorted.
async fn run_once(ctx: &Ctx, n: u64, hanging: bool, tag: &str) -> Result<(f64, u64, Vec<f64>)> {
    let slow = json!({
        "finbox": {"ready_after": "0s", "predictors": 5},
        "credeau": {"ready_after": "0s", "sms_count": 2, "faults": {"latency": "65s"}}
    });
    let sim = Simulator::start(
        &json!({
            "default": {
                "finbox": {"ready_after": "0s", "predictors": 5},
                "credeau": {"ready_after": "0s", "sms_count": 2}
            },
            "prefixes": {"hang-": slow}
        }),
        &ctx.logs,
    )
    .await?;
    sim.limits(0, 0).await?;
    let names = Names::new(&format!("brown{tag}"));
    kafka::create_run_topics(&names).await?;
    let mut env = names.service_env(&sim.url)?;
    kafka::set_env(&mut env, "INSIGHTS__CREDEAU__DEADLINE", "1m");
    kafka::set_env(&mut env, "INSIGHTS__FINBOX__DEADLINE", "1m");
    let mut svc = Service::start(&env, &ctx.log(&format!("brownout-{tag}-service")))?;
    svc.wait_ready(&ctx.http, Duration::from_secs(60)).await?;
    let reader = Reader::start(&names.combined)?;
    let ids: Vec<String> = (0..n)
        .map(|i| {
            if hanging && i % 20 == 0 {
                format!("hang-{i}")
            } else {
                format!("fast-{i}")
            }
        })
        .collect();
    let fast: HashSet<String> = ids
        .iter()
        .filter(|u| u.starts_with("fast-"))
        .cloned()
        .collect();
    let slow_count = n - fast.len() as u64;
    let input = names.input.clone();
    let at = kafka::now_ms();
    let records: Vec<(String, Vec<u8>)> = ids
        .iter()
        .map(|id| (id.clone(), kafka::onboarded(id, at)))
        .collect();
    let started = Instant::now();
    tokio::task::spawn_blocking(move || kafka::produce_all(&input, records.into_iter())).await??;
    let fast_done = loop {
        let done = reader
            .seen
            .lock()
            .map(|g| fast.iter().all(|u| g.keys.contains(u)))
            .unwrap_or(false);
        if done {
            break started.elapsed();
        }
        svc.proc.check_alive()?;
        if started.elapsed() > Duration::from_secs(300) {
            bail!("the well-behaved users were not done within 300 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // The hanging users end at their deadline.
    reader
        .wait_distinct(n as usize, Duration::from_secs(120), || {
            svc.proc.check_alive()
        })
        .await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    if reader.records() != n {
        bail!(
            "{} combined events for {n} users (exactly one each expected)",
            reader.records()
        );
    }
    let cut = svc
        .counter(
            &ctx.http,
            "insights_stragglers_cut_total",
            "provider=\"credeau\"",
        )
        .await
        .unwrap_or(0.0);
    if hanging && cut < slow_count as f64 {
        bail!("{cut} Credeau polls cut short for {slow_count} hanging users");
    }
    let mut latencies: Vec<f64> = {
        let seen = reader
            .seen
            .lock()
            .map_err(|_| anyhow::anyhow!("reader poisoned"))?;
        fast.iter()
            .map(|u| secs(seen.first_seen[u].saturating_duration_since(started)))
            .collect()
    };
    latencies.sort_by(f64::total_cmp);
    Ok((secs(fast_done), slow_count, latencies))
}

/// What every 20th user's Credeau does in a trickle run.
#[derive(Clone, Copy)]
enum Fault {
    None,
    Hang,
    Unavailable,
}

/// One trickle run: the well-behaved users' latencies (input produced to
/// combined event read), sorted.
async fn trickle_once(ctx: &Ctx, m: u64, fault: Fault, tag: &str) -> Result<Vec<f64>> {
    let credeau_fault = match fault {
        Fault::Hang => json!({"latency": "65s"}),
        _ => json!({"server_error_ratio": 1.0}),
    };
    let faulty_scenario = json!({
        "finbox": {"ready_after": "0s", "predictors": 5},
        "credeau": {"ready_after": "0s", "sms_count": 2, "faults": credeau_fault}
    });
    let sim = Simulator::start(
        &json!({
            "default": {
                "finbox": {"ready_after": "0s", "predictors": 5},
                "credeau": {"ready_after": "0s", "sms_count": 2}
            },
            "prefixes": {"bad-": faulty_scenario}
        }),
        &ctx.logs,
    )
    .await?;
    sim.limits(0, 0).await?;
    let names = Names::new(&format!("trickle{tag}"));
    kafka::create_run_topics(&names).await?;
    let mut env = names.service_env(&sim.url)?;
    kafka::set_env(&mut env, "INSIGHTS__CREDEAU__DEADLINE", "1m");
    kafka::set_env(&mut env, "INSIGHTS__FINBOX__DEADLINE", "1m");
    let mut svc = Service::start(&env, &ctx.log(&format!("trickle-{tag}-service")))?;
    svc.wait_ready(&ctx.http, Duration::from_secs(60)).await?;
    let reader = Reader::start(&names.combined)?;
    let ids: Vec<String> = (0..m)
        .map(|i| match fault {
            Fault::None => format!("fast-{i}"),
            _ if i % 20 == 0 => format!("bad-{i}"),
            _ => format!("fast-{i}"),
        })
        .collect();
    let fast: Vec<String> = ids
        .iter()
        .filter(|u| u.starts_with("fast-"))
        .cloned()
        .collect();
    let input = names.input.clone();
    let at = kafka::now_ms();
    let records: Vec<(String, Vec<u8>)> = ids
        .iter()
        .map(|id| (id.clone(), kafka::onboarded(id, at)))
        .collect();
    let producing = tokio::task::spawn_blocking(move || {
        kafka::produce_paced(&input, records, Duration::from_millis(20))
    });
    let started = Instant::now();
    loop {
        let done = reader
            .seen
            .lock()
            .map(|g| fast.iter().all(|u| g.first_seen.contains_key(u)))
            .unwrap_or(false);
        if done {
            break;
        }
        svc.proc.check_alive()?;
        if started.elapsed() > Duration::from_secs(300) {
            bail!("the well-behaved users were not done within 300 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let produced = producing.await??;
    let seen = reader
        .seen
        .lock()
        .map_err(|_| anyhow::anyhow!("reader poisoned"))?;
    let mut latencies: Vec<f64> = fast
        .iter()
        .map(|u| secs(seen.first_seen[u].saturating_duration_since(produced[u])))
        .collect();
    latencies.sort_by(f64::total_cmp);
    Ok(latencies)
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// The trickle runs' figures and goals.
async fn trickle(ctx: &Ctx, r: &mut Report) -> Result<()> {
    let m = ctx.size("TRICKLE_USERS", 100, 300);
    let base = trickle_once(ctx, m, Fault::None, "base").await?;
    let (b50, b95) = (pct(&base, 0.5), pct(&base, 0.95));
    r.fig("trickle_users", m);
    r.fig("trickle_others_p50_without_s", round(b50, 3));
    r.fig("trickle_others_p95_without_s", round(b95, 3));
    for (fault, name) in [(Fault::Hang, "hanging"), (Fault::Unavailable, "503")] {
        let with = trickle_once(ctx, m, fault, name).await?;
        let (w50, w95) = (pct(&with, 0.5), pct(&with, 0.95));
        r.fig(&format!("trickle_{name}_others_p50_s"), round(w50, 3));
        r.fig(&format!("trickle_{name}_others_p95_s"), round(w95, 3));
        r.fig(
            &format!("trickle_{name}_others_max_s"),
            round(with[with.len() - 1], 3),
        );
        if !ctx.smoke {
            r.goal(
                format!(
                    "trickled, 5 % {name}: the others' p50 within +0.5 s and p95 within +1.5 s"
                ),
                w50 <= b50 + 0.5 && w95 <= b95 + 1.5,
            );
        }
    }
    Ok(())
}

pub async fn run(ctx: &Ctx) -> Result<Report> {
    let n = ctx.size("BROWNOUT_USERS", 200, 2_000);
    let (baseline, _, base) = run_once(ctx, n, false, "base").await?;
    let (with_slow, slow, with) = run_once(ctx, n, true, "hang").await?;
    let mut r = Report::default();
    trickle(ctx, &mut r).await?;
    r.fig("users", n);
    r.fig("hanging_users", slow);
    r.fig("others_done_without_hanging_s", baseline);
    r.fig("others_done_with_hanging_s", with_slow);
    r.fig("extra_s", round(with_slow - baseline, 3));
    r.fig("ratio", round(with_slow / baseline.max(0.001), 3));
    let (b50, b95, w50, w95) = (
        pct(&base, 0.5),
        pct(&base, 0.95),
        pct(&with, 0.5),
        pct(&with, 0.95),
    );
    r.fig("backlog_others_p50_without_s", round(b50, 3));
    r.fig("backlog_others_p95_without_s", round(b95, 3));
    r.fig("backlog_hanging_others_p50_s", round(w50, 3));
    r.fig("backlog_hanging_others_p95_s", round(w95, 3));
    if !ctx.smoke {
        r.goal(
            "the others are done within 1 s of a run without hanging users",
            with_slow <= baseline + 1.0,
        );
        r.goal(
            "backlog, 5 % hanging: the others' p50 within +0.5 s and p95 within +1.5 s",
            w50 <= b50 + 0.5 && w95 <= b95 + 1.5,
        );
    }
    Ok(r)
}

//! Scenario 9, burst: N users whose first polls all fall due within a few
//! seconds, neither provider ready at the first poll, so that both
//! providers' repolls fall due in bursts too (FinBox 10 s later, Credeau
//! 15 s later, the default spacings). How late each poll ran after it was
//! due, per provider, from the simulator's per-user request log; the
//! service's own settings are the defaults but for the bench's topic names
//! and rate limits out of the way.
//!
//! Two shapes: `aligned`, Credeau's first poll due with FinBox's, and
//! `offset`, Credeau's 2.5 s later, so that the two providers' waits end
//! at different points of the delay tiers and take more hops through them
//! (BENCH_BURST_SHAPES picks one; the smoke run tries `offset` only).
//! BENCH_BURST_USERS (default 20,000) and BENCH_BURST_SPREAD_S (default 3)
//! set the burst.
//!
//! A repoll's due time is taken as the previous request's arrival plus the
//! spacing; the service counts the spacing from the answer's arrival, so
//! the figure overstates lateness by the time each answer took.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use futures::StreamExt;
use serde_json::{json, Value};

use super::kafka::{self, set_env, Names, Reader};
use super::procs::{request_times, Service, Simulator};
use super::{quantile, round, Ctx, Report};

const INITIAL_DELAY_MS: i64 = 120_000;
/// The default spacings of config/default.toml.
const FINBOX_SPACING_MS: i64 = 10_000;
const CREDEAU_SPACING_MS: i64 = 15_000;
/// Both providers are ready this long after the user's first request: the
/// first poll of each finds nothing, the second finds the data.
const READY_AFTER: &str = "5s";
/// Time to take the users in before the first polls fall due (full run,
/// smoke run).
const LEAD_MS: (i64, i64) = (30_000, 8_000);

/// One provider's polls of the sampled users: lateness of first polls and
/// of repolls (ms), and how many ran early.
#[derive(Default)]
struct Lateness {
    first: Vec<i64>,
    repoll: Vec<i64>,
    early: u64,
    earliest: i64,
}

impl Lateness {
    fn add(&mut self, polls: &[i64], first_due: i64, spacing: i64) {
        let mut due = first_due;
        for (i, at) in polls.iter().enumerate() {
            let l = at - due;
            if l < 0 {
                self.early += 1;
                self.earliest = self.earliest.min(l);
            }
            if i == 0 {
                self.first.push(l);
            } else {
                self.repoll.push(l);
            }
            due = at + spacing;
        }
    }

    fn report(&mut self, r: &mut Report, provider: &str) {
        self.first.sort_unstable();
        self.repoll.sort_unstable();
        for (what, v) in [("first_poll", &self.first), ("repoll", &self.repoll)] {
            r.fig(&format!("{provider}_{what}s"), v.len());
            r.fig(&format!("{provider}_{what}_p50_ms"), quantile(v, 0.5));
            r.fig(&format!("{provider}_{what}_p90_ms"), quantile(v, 0.9));
            r.fig(&format!("{provider}_{what}_p99_ms"), quantile(v, 0.99));
            r.fig(
                &format!("{provider}_{what}_max_ms"),
                v.last().copied().unwrap_or(0),
            );
        }
        r.fig(
            &format!("{provider}_repolls_over_1s"),
            self.repoll.iter().filter(|l| **l >= 1_000).count(),
        );
        r.fig(&format!("{provider}_early_polls"), self.early);
        r.fig(&format!("{provider}_earliest_ms"), self.earliest);
    }
}

/// The shapes of a burst: Credeau's first poll due with FinBox's, so that
/// each user's waits are whole tiers or just short of one; or 2.5 s after
/// it, so that most waits fall between tiers and cross several.
const SHAPES: [(&str, i64); 2] = [("aligned", 0), ("offset", 2_500)];

pub async fn run(ctx: &Ctx) -> Result<Report> {
    let mut r = Report::default();
    // The smoke run tries the shape with more hops only.
    let shapes = if ctx.smoke { &SHAPES[1..] } else { &SHAPES[..] };
    // BENCH_BURST_SHAPES=offset (or aligned) runs one of them.
    let only = std::env::var("BENCH_BURST_SHAPES").unwrap_or_default();
    for (shape, credeau_later_ms) in shapes {
        if !only.is_empty() && !only.split(',').any(|s| s.trim() == *shape) {
            continue;
        }
        one(ctx, shape, *credeau_later_ms, &mut r).await?;
    }
    Ok(r)
}

/// One burst: a fresh simulator, topics and service.
async fn one(ctx: &Ctx, shape: &str, credeau_later_ms: i64, r: &mut Report) -> Result<()> {
    let n = ctx.size("BURST_USERS", 200, 20_000);
    let spread_ms = ctx.size("BURST_SPREAD_S", 2, 3) as i64 * 1000;
    let sample = ctx.size("BURST_SAMPLE", 200, 5_000).min(n);
    let ready = json!({
        "finbox": {"ready_after": READY_AFTER, "predictors": 5},
        "credeau": {"ready_after": READY_AFTER, "sms_count": 2}
    });
    let sim = Simulator::start(&json!({ "default": ready }), &ctx.logs).await?;
    sim.limits(0, 0).await?;
    let names = Names::new("burst");
    kafka::create_run_topics(&names).await?;
    let mut env = names.service_env(&sim.url)?;
    let credeau_delay_ms = INITIAL_DELAY_MS + credeau_later_ms;
    set_env(&mut env, "INSIGHTS__FINBOX__INITIAL_DELAY", "2m");
    set_env(
        &mut env,
        "INSIGHTS__CREDEAU__INITIAL_DELAY",
        &format!("{credeau_delay_ms}ms"),
    );
    let mut svc = Service::start(&env, &ctx.log(&format!("burst-{shape}-service")))?;
    svc.wait_ready(&ctx.http, Duration::from_secs(60)).await?;
    let reader = Reader::start(&names.combined)?;
    // First polls fall due between LEAD and LEAD + spread from now, in
    // read order (the input is read in about that order anyway).
    let lead = if ctx.smoke { LEAD_MS.1 } else { LEAD_MS.0 };
    let t0 = kafka::now_ms();
    let users: Vec<(String, i64)> = (0..n)
        .map(|i| {
            let due = t0 + lead + (i as i64 * spread_ms) / n as i64;
            (format!("burst-{i}"), due - INITIAL_DELAY_MS)
        })
        .collect();
    let records: Vec<(String, Vec<u8>)> = users
        .iter()
        .map(|(id, at)| (id.clone(), kafka::onboarded(id, *at)))
        .collect();
    let input = names.input.clone();
    tokio::task::spawn_blocking(move || kafka::produce_all(&input, records.into_iter())).await??;
    let produced_ms = kafka::now_ms() - t0;
    reader
        .wait_distinct(n as usize, Duration::from_secs(90), || {
            svc.proc.check_alive()
        })
        .await?;

    let stride = (n / sample).max(1) as usize;
    let picked: Vec<&(String, i64)> = users.iter().step_by(stride).collect();
    let histories: Vec<Result<Option<Value>>> = futures::stream::iter(picked.iter())
        .map(|(id, _)| sim.user(id))
        .buffered(16)
        .collect()
        .await;
    let mut finbox = Lateness::default();
    let mut credeau = Lateness::default();
    for ((id, onboarded_at), h) in picked.iter().zip(histories) {
        let h = h?.with_context(|| format!("simulator never saw {id}"))?;
        for (provider, first_due, spacing, into) in [
            (
                "finbox",
                onboarded_at + INITIAL_DELAY_MS,
                FINBOX_SPACING_MS,
                &mut finbox,
            ),
            (
                "credeau",
                onboarded_at + credeau_delay_ms,
                CREDEAU_SPACING_MS,
                &mut credeau,
            ),
        ] {
            let polls = request_times(&h, provider, id)?;
            if polls.len() < 2 {
                bail!(
                    "{id}: {} {provider} request (2 or more expected)",
                    polls.len()
                );
            }
            into.add(&polls, first_due, spacing);
        }
    }
    let combined = reader.records();
    if combined != n {
        bail!("{shape}: {combined} combined events for {n} users");
    }
    let cpu = svc.proc.cpu()?;
    let f = |name: &str| format!("{shape}_{name}");
    // The service's own view, by the tier a task was read from: tasks due,
    // tasks forwarded (read before their due time), and due tasks
    // processed over a second late.
    for tier in kafka::TIERS {
        let label = format!("tier=\"{tier}\"");
        let due = svc
            .counter(&ctx.http, "insights_tasks_due_total", &label)
            .await?;
        let forwarded = svc
            .counter(&ctx.http, "insights_tasks_forwarded_total", &label)
            .await?;
        if due + forwarded == 0.0 {
            continue;
        }
        let late = svc
            .counter(&ctx.http, "insights_poll_lateness_seconds_count", &label)
            .await?
            - svc
                .counter(
                    &ctx.http,
                    "insights_poll_lateness_seconds_bucket",
                    &format!("{label},le=\"1\""),
                )
                .await?;
        r.fig(&f(&format!("service_tier_{tier}_due")), due);
        r.fig(&f(&format!("service_tier_{tier}_forwarded")), forwarded);
        r.fig(&f(&format!("service_tier_{tier}_over_1s")), late);
    }
    let txns = svc
        .counter(&ctx.http, "insights_transaction_duration_seconds_count", "")
        .await?;
    let txn_s = svc
        .counter(&ctx.http, "insights_transaction_duration_seconds_sum", "")
        .await?;
    let batched = svc
        .counter(&ctx.http, "insights_batch_records_sum", "")
        .await?;
    r.fig(&f("service_transactions"), txns);
    r.fig(
        &f("service_transaction_mean_ms"),
        round(txn_s * 1000.0 / txns.max(1.0), 1),
    );
    r.fig(
        &f("service_records_per_transaction"),
        round(batched / txns.max(1.0), 1),
    );
    r.fig(&f("service_cpu_s"), round(cpu.as_secs_f64(), 2));
    r.fig(&f("users"), n);
    r.fig(&f("credeau_first_poll_later_ms"), credeau_later_ms);
    r.fig(&f("due_spread_s"), round(spread_ms as f64 / 1000.0, 1));
    r.fig(
        &f("users_produced_s"),
        round(produced_ms as f64 / 1000.0, 1),
    );
    r.fig(&f("sampled_users"), picked.len());
    finbox.report(r, &f("finbox"));
    credeau.report(r, &f("credeau"));
    svc.proc.kill();
    r.goal(
        format!("{shape}: no poll before it was due"),
        finbox.early == 0 && credeau.early == 0,
    );
    if !ctx.smoke {
        for (name, l) in [("FinBox", &finbox), ("Credeau", &credeau)] {
            r.goal(
                format!("{shape}: {name} repoll lateness p99 under 1 s"),
                quantile(&l.repoll, 0.99) < 1_000,
            );
            r.goal(
                format!("{shape}: {name} repoll lateness max under 2 s"),
                l.repoll.last().copied().unwrap_or(0) < 2_000,
            );
        }
    }
    Ok(())
}

//! Scenario 4, timeliness: users due at spread-out times, FinBox ready at
//! spread-out times; how late each FinBox poll ran after it was due (from
//! the simulator's per-user request log) and polls per user against the
//! fewest possible.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use futures::StreamExt;
use serde_json::{json, Value};

use super::kafka::{self, set_env, Names, Reader};
use super::procs::{request_times, Service, Simulator};
use super::{quantile, Ctx, Report};

const INITIAL_DELAY_MS: i64 = 120_000;
const POLL_MS: i64 = 10_000;

/// FinBox readiness buckets: users named `b<k>-...` are ready k * step after
/// their first FinBox request.
fn buckets(smoke: bool) -> (usize, i64) {
    if smoke {
        (2, 6_000)
    } else {
        (6, 15_000)
    }
}

pub async fn run(ctx: &Ctx) -> Result<Report> {
    let n = ctx.size("TIMELINESS_USERS", 200, 100_000);
    let spread_ms = ctx.size("TIMELINESS_SPREAD_S", 5, 600) as i64 * 1000;
    let sample = ctx.size("TIMELINESS_SAMPLE", 200, 4_000).min(n);
    let (nb, step) = buckets(ctx.smoke);
    let mut prefixes = serde_json::Map::new();
    for k in 0..nb {
        prefixes.insert(
            format!("b{k}-"),
            json!({
                "finbox": {"ready_after": format!("{}ms", k as i64 * step), "predictors": 5},
                "credeau": {"ready_after": "0s", "sms_count": 2}
            }),
        );
    }
    let sim = Simulator::start(&json!({ "prefixes": prefixes }), &ctx.logs).await?;
    sim.limits(0, 0).await?;
    let names = Names::new("timely");
    kafka::create_run_topics(&names).await?;
    let mut env = names.service_env(&sim.url)?;
    for (k, v) in [
        ("INSIGHTS__FINBOX__INITIAL_DELAY", "2m"),
        ("INSIGHTS__CREDEAU__INITIAL_DELAY", "2m"),
        ("INSIGHTS__FINBOX__POLL_INTERVAL", "10s"),
        ("INSIGHTS__FINBOX__MAX_POLL_INTERVAL", "10s"),
        ("INSIGHTS__FINBOX__BACKOFF_MULTIPLIER", "1.0"),
    ] {
        set_env(&mut env, k, v);
    }
    let mut svc = Service::start(&env, &ctx.log("timeliness-service"))?;
    svc.wait_ready(&ctx.http, Duration::from_secs(60)).await?;
    let reader = Reader::start(&names.combined)?;
    // First polls fall due between 5 s and 5 s + spread from now.
    let t0 = kafka::now_ms();
    let mut users: Vec<(String, i64, i64)> = Vec::with_capacity(n as usize);
    for i in 0..n {
        let k = (i as usize) % nb;
        let due = t0 + 5_000 + (i as i64 * spread_ms) / n as i64;
        users.push((format!("b{k}-{i}"), due - INITIAL_DELAY_MS, k as i64 * step));
    }
    let records: Vec<(String, Vec<u8>)> = users
        .iter()
        .map(|(id, at, _)| (id.clone(), kafka::onboarded(id, *at)))
        .collect();
    let input = names.input.clone();
    tokio::task::spawn_blocking(move || kafka::produce_all(&input, records.into_iter())).await??;
    let idle = Duration::from_secs(90);
    reader
        .wait_distinct(n as usize, idle, || svc.proc.check_alive())
        .await?;

    // An even sample across the due times and buckets.
    let stride = (n / sample).max(1) as usize;
    let picked: Vec<&(String, i64, i64)> = users.iter().step_by(stride).collect();
    let histories: Vec<Result<Option<Value>>> = futures::stream::iter(picked.iter())
        .map(|(id, _, _)| sim.user(id))
        .buffered(16)
        .collect()
        .await;
    let mut late = Vec::new();
    let mut first_late = Vec::new();
    let mut early = Vec::new();
    let mut extra_max = i64::MIN;
    let mut extra_sum = 0i64;
    let mut over_one = 0u64;
    for ((id, onboarded_at, ready_after), h) in picked.iter().zip(histories) {
        let h = h?.with_context(|| format!("simulator never saw {id}"))?;
        let polls = request_times(&h, "finbox", id)?;
        let count = polls.len() as i64;
        let mut due = onboarded_at + INITIAL_DELAY_MS;
        for (i, at) in polls.iter().enumerate() {
            let l = at - due;
            if i == 0 {
                first_late.push(l);
            }
            if l < 0 {
                early.push(l);
            }
            late.push(l);
            due = at + POLL_MS;
        }
        // The fewest polls: one at first contact, then one every 10 s until
        // the first at or after readiness.
        let min = 1 + (ready_after + POLL_MS - 1) / POLL_MS;
        let extra = count - min;
        extra_max = extra_max.max(extra);
        extra_sum += extra;
        if extra > 1 {
            over_one += 1;
        }
    }
    late.sort_unstable();
    first_late.sort_unstable();
    // The service's own view: its poll_lateness_seconds histogram.
    let svc_late_count = svc
        .counter(&ctx.http, "insights_poll_lateness_seconds_count", "")
        .await?;
    let svc_late_sum = svc
        .counter(&ctx.http, "insights_poll_lateness_seconds_sum", "")
        .await?;
    let svc_over_5s = svc_late_count
        - svc
            .counter(
                &ctx.http,
                "insights_poll_lateness_seconds_bucket",
                "le=\"5\"",
            )
            .await?;
    let mut r = Report::default();
    // Where the late ones were read from.
    for tier in kafka::TIERS {
        let label = format!("tier=\"{tier}\"");
        let count = svc
            .counter(&ctx.http, "insights_poll_lateness_seconds_count", &label)
            .await?;
        if count == 0.0 {
            continue;
        }
        let within = svc
            .counter(
                &ctx.http,
                "insights_poll_lateness_seconds_bucket",
                &format!("{label},le=\"5\""),
            )
            .await?;
        r.fig(&format!("service_due_tasks_tier_{tier}"), count);
        r.fig(
            &format!("service_later_than_5s_tier_{tier}"),
            count - within,
        );
    }
    r.fig("users", n);
    r.fig("due_spread_s", spread_ms / 1000);
    r.fig("sampled_users", picked.len());
    r.fig("sampled_polls", late.len());
    r.fig("lateness_p50_ms", quantile(&late, 0.5));
    r.fig("lateness_p99_ms", quantile(&late, 0.99));
    r.fig("lateness_max_ms", late.last().copied().unwrap_or(0));
    r.fig("first_poll_lateness_p50_ms", quantile(&first_late, 0.5));
    r.fig("first_poll_lateness_p99_ms", quantile(&first_late, 0.99));
    r.fig(
        "first_poll_lateness_max_ms",
        first_late.last().copied().unwrap_or(0),
    );
    r.fig("service_due_tasks", svc_late_count);
    r.fig(
        "service_mean_lateness_ms",
        super::round(svc_late_sum * 1000.0 / svc_late_count.max(1.0), 1),
    );
    r.fig("service_tasks_later_than_5s", svc_over_5s);
    r.fig("early_polls", early.len());
    r.fig("earliest_ms", early.iter().min().copied().unwrap_or(0));
    r.fig("extra_polls_max", extra_max);
    r.fig(
        "extra_polls_mean",
        super::round(extra_sum as f64 / picked.len().max(1) as f64, 3),
    );
    r.fig("users_with_more_than_one_extra", over_one);
    let combined = reader.records();
    if combined != n {
        bail!("{combined} combined events for {n} users");
    }
    r.goal("no poll before it was due", early.is_empty());
    r.goal(
        "at most one FinBox poll more than the minimum",
        over_one == 0,
    );
    if !ctx.smoke {
        r.goal("p99 lateness under 1 s", quantile(&late, 0.99) < 1_000);
    }
    Ok(r)
}

//! Measures how the Credeau client reads a large answer that arrives
//! slowly, over real HTTP from the in-process simulator, under the shipped
//! settings (request_timeout 30 s, record budget 15 s, body_stall_timeout
//! 10 s, floor 16 KiB/s) with the loop's straggler cut fired a second into
//! the body. Prints one line per case: the answer's size, how long
//! it took, what the call ended with, and how many requests the simulator
//! received.
//!
//! `cargo run --release --example slow_answer [BYTES_PER_SECOND] [SMS]`
//! (defaults 500000 and 33000, about 30 MB).

use std::sync::Arc;
use std::time::{Duration, Instant};

use insights_enricher::config::Settings;
use insights_enricher::metrics::Metrics;
use insights_enricher::providers::budget::RecordClock;
use insights_enricher::providers::call::{self, PollOutcome};
use insights_enricher::providers::{
    CredeauAnswer, CredeauApi, CredeauClient, Provider, RateLimiter,
};
use insights_enricher::simulator::scenario::{CredeauScenario, Faults, UserScenario};
use insights_enricher::simulator::{self, SimulatorConfig};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let rate: u64 = args.next().map_or(Ok(500_000), |a| a.parse())?;
    let sms: u32 = args.next().map_or(Ok(33_000), |a| a.parse())?;
    let cases: [(&str, Faults); 3] = [
        (
            "streaming",
            Faults {
                body_bytes_per_second: rate,
                ..Faults::default()
            },
        ),
        (
            "streaming gzip",
            Faults {
                body_bytes_per_second: rate,
                gzip: true,
                ..Faults::default()
            },
        ),
        (
            "stalls after 1 MB",
            Faults {
                body_bytes_per_second: rate,
                body_stall_after_bytes: Some(1 << 20),
                ..Faults::default()
            },
        ),
    ];
    let mut config = SimulatorConfig {
        credeau_rate_limit_per_minute: 0,
        finbox_rate_limit_per_minute: 0,
        ..SimulatorConfig::default()
    };
    for (name, faults) in &cases {
        config.scenarios.users.insert(
            (*name).to_string(),
            UserScenario {
                credeau: Some(CredeauScenario {
                    sms_count: sms,
                    faults: faults.clone(),
                    ..CredeauScenario::default()
                }),
                finbox: None,
            },
        );
    }
    let sim = simulator::spawn(config).await?;
    let base = sim.base_url();
    let threshold = sms.to_string();
    let env = [
        ("INSIGHTS__CREDEAU__CNT_SMS_THRESHOLD", threshold.as_str()),
        ("INSIGHTS__FINBOX__API_KEY", "sim-finbox-key"),
        ("INSIGHTS__FINBOX__SERVER_HASH", "sim-server-hash"),
        ("INSIGHTS__CREDEAU__BASE_URL", base.as_str()),
        ("INSIGHTS__CREDEAU__CLIENT_ID", "sim-client"),
        ("INSIGHTS__CREDEAU__AUTH_TOKEN", "sim-token"),
    ];
    let settings = Settings::load_from(
        None,
        env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
    )?;
    let metrics = Arc::new(Metrics::new());
    let limiter = Arc::new(RateLimiter::new(
        Provider::Credeau,
        settings.credeau.http.rate_limit_per_minute,
        metrics.clone(),
    ));
    let client = CredeauClient::new(&settings.credeau, limiter, metrics)?;
    let budget = settings.schedule.record_budget;
    let straggler_wait = settings.schedule.straggler_wait;
    println!(
        "rate {rate} B/s, {sms} SMS, record budget {}, cut 1 s into the body",
        humantime::format_duration(budget),
    );
    for (name, _) in &cases {
        let clock = RecordClock::new();
        clock.begin(budget, Some(straggler_wait));
        // The loop's cut, fired a second into the body (the in-process
        // simulator takes seconds to build a 30 MB answer, and a cut before
        // the answer begins is an ordinary straggler cut).
        let cutter = clock.clone();
        tokio::spawn(async move {
            while !cutter.is_receiving_body() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            cutter.cut();
        });
        let started = Instant::now();
        let outcome = call::run(Provider::Credeau, &clock, budget, client.fetch_sms(name)).await;
        let took = started.elapsed();
        let ended = match &outcome {
            PollOutcome::Answered(Ok(CredeauAnswer::Data(d))) => {
                let bytes: usize = d.entries.iter().map(|e| e.get().len() + 1).sum();
                format!(
                    "data, {} SMS, {:.1} MB of entries",
                    d.entries.len(),
                    bytes as f64 / 1e6
                )
            }
            PollOutcome::Answered(Ok(CredeauAnswer::Empty)) => "empty".to_string(),
            PollOutcome::Answered(Err(e)) => format!("error: {e}"),
            PollOutcome::Cut => "cut short".to_string(),
            PollOutcome::NotSent => "not sent".to_string(),
        };
        let report: serde_json::Value = reqwest::get(format!("{base}/admin/users/{name}"))
            .await?
            .json()
            .await?;
        println!(
            "{name}: {:.1} s, requests received {}, {ended}",
            took.as_secs_f64(),
            report["credeau"]["requests"]
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

//! `insights_users_waiting` against the real broker and a running service:
//! with N users whose provider answers stay pending it reads exactly N
//! (within its refresh time, and at every later scrape while they wait,
//! though the tiers they wait in are paused and written in transactions),
//! and 0 once every user is done.

mod common;

use std::time::{Duration, Instant};

use common::*;
use insights_enricher::simulator::{self, SimulatorConfig};
use serde_json::json;

async fn users_waiting(port: u16) -> Option<f64> {
    let text = try_metrics_page(port).await?;
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).ok()?;
    scrape
        .samples
        .iter()
        .find(|s| s.metric == "insights_users_waiting")
        .map(|s| match s.value {
            prometheus_parse::Value::Gauge(v) => v,
            _ => f64::NAN,
        })
}

/// Scrapes every 500 ms until `want` is read or `within` passes; returns
/// the values read.
async fn until_reads(port: u16, want: f64, within: Duration) -> (bool, Vec<f64>) {
    let end = Instant::now() + within;
    let mut seen = Vec::new();
    while Instant::now() < end {
        if let Some(v) = users_waiting(port).await {
            seen.push(v);
            if v == want {
                return (true, seen);
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    (false, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_waiting_counts_the_users_waiting_and_drops_to_zero_when_done() {
    let sim = simulator::spawn(SimulatorConfig::default())
        .await
        .expect("simulator");
    let base = sim.base_url();
    // Both providers answer "in progress" until the deadline.
    sim_admin(
        &base,
        "/admin/scenarios",
        &json!({"default": {"finbox": {"ready_after": "1000d"}, "credeau": {"ready_after": "1000d"}}}),
    )
    .await;
    let topics = Topics::new("waiting");
    create_topic(&topics.input, 3).await;
    let dir = tempfile::tempdir().unwrap();
    let mut env = service_env(&topics, &unique("g"), &base);
    env.extend([
        ("INSIGHTS__FINBOX__DEADLINE".to_string(), "45s".to_string()),
        ("INSIGHTS__CREDEAU__DEADLINE".to_string(), "45s".to_string()),
    ]);
    let service = Service::start(&env, &dir.path().join("service.log"));
    wait_ready(&service).await;
    let port = metrics_port(&service.log_text()).expect("metrics port");
    let (zero, seen) = until_reads(port, 0.0, Duration::from_secs(15)).await;
    assert!(zero, "no user yet, but read {seen:?}");

    let n = 25;
    produce_users(&topics.input, "wait-", n).await;
    let produced = Instant::now();
    // Within two refreshes of every user's first poll.
    let (reached, seen) = until_reads(port, n as f64, Duration::from_secs(20)).await;
    assert!(
        reached,
        "never read {n}: {seen:?}\n{}",
        service.log_excerpt(40)
    );
    // And it stays right while they wait, through polls and tier moves.
    let mut later = Vec::new();
    while produced.elapsed() < Duration::from_secs(35) {
        tokio::time::sleep(Duration::from_secs(2)).await;
        if let Some(v) = users_waiting(port).await {
            later.push(v);
        }
    }
    assert!(later.len() >= 3, "{later:?}");
    assert!(
        later.iter().all(|v| *v == n as f64),
        "while waiting: {later:?}"
    );

    // Every user times out; then nobody waits.
    let combined = read_topic(&topics.combined, Some(n), Duration::from_secs(60));
    assert_eq!(combined.len(), n, "{}", service.log_excerpt(40));
    let (zero, seen) = until_reads(port, 0.0, Duration::from_secs(15)).await;
    assert!(zero, "all done, but read {seen:?}");
    drop(service);
    let _ = sim.shutdown().await;
}

//! One provider call on a record's clock, over real HTTP to the simulator:
//! what the call ends with when the record budget runs out or the loop
//! cuts it (the provider's last answer, never our own cut), and that
//! waiting for our own rate-limit permit is no poll.

mod providers_support;

use std::sync::Arc;
use std::time::Duration;

use insights_enricher::metrics::Metrics;
use insights_enricher::providers::budget::RecordClock;
use insights_enricher::providers::call::{self, PollOutcome};
use insights_enricher::providers::{CredeauApi, FinboxApi, Provider, ProviderErrorKind};
use insights_enricher::simulator::scenario::{CredeauScenario, Faults, UserScenario};
use providers_support::*;

fn credeau_503_forever(latency: Duration) -> UserScenario {
    UserScenario {
        credeau: Some(CredeauScenario {
            faults: Faults {
                server_error_first: 10_000,
                latency,
                ..Faults::default()
            },
            ..CredeauScenario::default()
        }),
        finbox: None,
    }
}

/// How many requests of `user` the simulator received at `provider`
/// (answered or not yet).
async fn received(
    sim: &insights_enricher::simulator::RunningSimulator,
    user: &str,
    provider: &str,
) -> u32 {
    let url = format!("{}/admin/users/{user}", sim.base_url());
    let report: serde_json::Value = reqwest::get(url).await.unwrap().json().await.unwrap();
    report[provider]["requests"].as_u64().unwrap_or(0) as u32
}

/// A record's clock with `budget` and no leash (the loop never cuts it).
fn clock(budget: Duration) -> Arc<RecordClock> {
    let clock = RecordClock::new();
    clock.begin(budget, None);
    clock
}

#[tokio::test]
async fn a_provider_answering_503_until_the_budget_runs_out_ends_with_its_503() {
    let user = "u-503-forever";
    let sim = simulator(&[(user, credeau_503_forever(Duration::from_millis(300)))]).await;
    let mut s = settings(&sim.base_url());
    // Many quick retries of slow 503s: the budget always runs out while a
    // request is out (a retry's sleep is never begun past it).
    s.credeau.max_retries = 10;
    s.credeau.retry_base = Duration::from_millis(10);
    s.credeau.retry_cap = Duration::from_millis(20);
    let c = credeau(&s, Arc::new(Metrics::new()));
    let budget = Duration::from_millis(1_100);
    let outcome = call::run(
        Provider::Credeau,
        &clock(budget),
        budget,
        c.client.fetch_sms(user),
    )
    .await;
    let PollOutcome::Answered(Err(e)) = outcome else {
        panic!("expected the provider's error, got {outcome:?}");
    };
    let seen = seen(&sim, user, "credeau").await;
    assert!(seen.len() >= 3, "{seen:?}");
    assert!(seen.iter().all(|(_, status)| *status == 503), "{seen:?}");
    assert_eq!(
        (e.kind, e.http_status),
        (ProviderErrorKind::ServerError, Some(503)),
        "{e}"
    );
    assert!(!e.message.contains("record budget"), "{e}");
    // Every request sent counts, the one still out at the deadline too.
    assert_eq!(e.attempts, received(&sim, user, "credeau").await, "{e:?}");
}

#[tokio::test]
async fn a_call_that_waits_for_our_own_permit_past_the_budget_sent_nothing() {
    let sim = simulator(&[]).await;
    let mut s = settings(&sim.base_url());
    s.finbox.http.rate_limit_per_minute = 1;
    let f = finbox(&s, Arc::new(Metrics::new()));
    // The only permit of the minute.
    let budget = Duration::from_millis(500);
    let first = call::run(
        Provider::Finbox,
        &clock(budget),
        budget,
        f.client.fetch_predictors("first"),
    )
    .await;
    assert!(matches!(first, PollOutcome::Answered(Ok(_))), "{first:?}");
    let started = std::time::Instant::now();
    let second = call::run(
        Provider::Finbox,
        &clock(budget),
        budget,
        f.client.fetch_predictors("second"),
    )
    .await;
    assert!(matches!(second, PollOutcome::NotSent), "{second:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(seen(&sim, "first", "finbox").await.len(), 1);
    assert!(seen(&sim, "second", "finbox").await.is_empty());
}

#[tokio::test]
async fn a_record_cut_while_it_waits_for_its_permit_sent_nothing() {
    let sim = simulator(&[]).await;
    let mut s = settings(&sim.base_url());
    s.credeau.http.rate_limit_per_minute = 1;
    let c = credeau(&s, Arc::new(Metrics::new()));
    let budget = Duration::from_secs(10);
    let first = call::run(
        Provider::Credeau,
        &clock(budget),
        budget,
        c.client.fetch_sms("first"),
    )
    .await;
    assert!(matches!(first, PollOutcome::Answered(Ok(_))), "{first:?}");
    let record = clock(budget);
    let cutter = record.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        cutter.cut();
    });
    let second = call::run(
        Provider::Credeau,
        &record,
        budget,
        c.client.fetch_sms("second"),
    )
    .await;
    assert!(matches!(second, PollOutcome::NotSent), "{second:?}");
    assert!(seen(&sim, "second", "credeau").await.is_empty());
}

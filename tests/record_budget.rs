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
use insights_enricher::providers::{
    CredeauAnswer, CredeauApi, FinboxApi, Provider, ProviderErrorKind,
};
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

fn credeau_answer(faults: Faults, sms_count: u32) -> UserScenario {
    UserScenario {
        credeau: Some(CredeauScenario {
            sms_count,
            faults,
            ..CredeauScenario::default()
        }),
        finbox: None,
    }
}

#[tokio::test]
async fn a_slow_healthy_answer_is_read_once_to_its_end_though_cut_and_past_the_budget() {
    let user = "u-slow-body";
    let faults = Faults {
        body_bytes_per_second: 400_000,
        ..Faults::default()
    };
    let sim = simulator(&[(user, credeau_answer(faults, 5_000))]).await;
    let mut s = settings(&sim.base_url());
    // Until the answer begins: the body then takes what it takes.
    s.credeau.http.request_timeout = Duration::from_secs(1);
    let c = credeau(&s, Arc::new(Metrics::new()));
    let budget = Duration::from_secs(1);
    let record = clock(budget);
    // The loop cuts the record while its answer is arriving.
    let cutter = record.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        cutter.cut();
    });
    let started = std::time::Instant::now();
    let outcome = call::run(Provider::Credeau, &record, budget, c.client.fetch_sms(user)).await;
    let took = started.elapsed();
    let Ok(CredeauAnswer::Data(sms)) = (match outcome {
        PollOutcome::Answered(r) => r,
        other => panic!("expected the answer, got {other:?}"),
    }) else {
        panic!("expected SMS data");
    };
    assert_eq!(sms.entries.len(), 5_000);
    assert!(
        took > Duration::from_secs(2),
        "{took:?}: not slow enough to test"
    );
    assert_eq!(received(&sim, user, "credeau").await, 1, "downloaded once");
}

#[tokio::test]
async fn a_body_that_stalls_midway_is_cut_with_the_providers_status() {
    let user = "u-stalled-body";
    let faults = Faults {
        body_stall_after_bytes: Some(10_000),
        ..Faults::default()
    };
    let sim = simulator(&[(user, credeau_answer(faults, 1_000))]).await;
    let mut s = settings(&sim.base_url());
    s.credeau.http.body_stall_timeout = Duration::from_millis(400);
    s.credeau.max_retries = 0;
    let c = credeau(&s, Arc::new(Metrics::new()));
    let budget = Duration::from_secs(10);
    let started = std::time::Instant::now();
    let outcome = call::run(
        Provider::Credeau,
        &clock(budget),
        budget,
        c.client.fetch_sms(user),
    )
    .await;
    let took = started.elapsed();
    let PollOutcome::Answered(Err(e)) = outcome else {
        panic!("expected a stalled body, got {outcome:?}");
    };
    assert_eq!(
        (e.kind, e.http_status),
        (ProviderErrorKind::Timeout, Some(200)),
        "{e}"
    );
    assert!(e.message.contains("stalled"), "{e}");
    assert!(took < Duration::from_secs(3), "{took:?}");
}

#[tokio::test]
async fn a_body_under_the_bytes_per_second_floor_is_cut() {
    let user = "u-trickle";
    let faults = Faults {
        body_bytes_per_second: 2_000,
        ..Faults::default()
    };
    let sim = simulator(&[(user, credeau_answer(faults, 1_000))]).await;
    let mut s = settings(&sim.base_url());
    s.credeau.http.body_stall_timeout = Duration::from_millis(500);
    s.credeau.http.min_body_bytes_per_second = 16_384;
    s.credeau.max_retries = 0;
    let c = credeau(&s, Arc::new(Metrics::new()));
    let budget = Duration::from_secs(10);
    let outcome = call::run(
        Provider::Credeau,
        &clock(budget),
        budget,
        c.client.fetch_sms(user),
    )
    .await;
    let PollOutcome::Answered(Err(e)) = outcome else {
        panic!("expected a body under the floor, got {outcome:?}");
    };
    assert_eq!(e.kind, ProviderErrorKind::Timeout, "{e}");
    assert!(e.message.contains("under the 16384 bytes/s floor"), "{e}");
}

#[tokio::test]
async fn a_gzip_answer_is_decoded() {
    let user = "u-gzip";
    let faults = Faults {
        gzip: true,
        ..Faults::default()
    };
    let sim = simulator(&[(user, credeau_answer(faults, 300))]).await;
    let c = credeau(&settings(&sim.base_url()), Arc::new(Metrics::new()));
    let answer = c.client.fetch_sms(user).await.expect("decoded");
    let CredeauAnswer::Data(sms) = answer else {
        panic!("expected SMS data");
    };
    assert_eq!(sms.entries.len(), 300);
}

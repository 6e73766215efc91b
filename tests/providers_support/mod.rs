//! Shared by the provider client tests: an in-process simulator per test,
//! settings pointing at it with short retry delays, clients, and the checks
//! that no secret or SMS body leaks into an error.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use insights_enricher::config::{InputEncoding, OutputEncoding, Settings};
use insights_enricher::core::tiers::DelayTiers;
use insights_enricher::core::Policies;
use insights_enricher::events::{InputDecoder, OutputEncoder};
use insights_enricher::metrics::Metrics;
use insights_enricher::pipeline::parked::ParkedCalls;
use insights_enricher::pipeline::record::{Incoming, SourceKind};
use insights_enricher::pipeline::worker::{OutputTopics, Worker};
use insights_enricher::providers::{
    CredeauClient, FinboxClient, Provider, ProviderError, RateLimiter,
};
use insights_enricher::simulator::{self, RunningSimulator, SimulatorConfig, UserScenario};
use serde_json::Value;

pub const API_KEY: &str = "sim-finbox-key";
pub const SERVER_HASH: &str = "sim-server-hash";
pub const CLIENT_ID: &str = "sim-client";
pub const AUTH_TOKEN: &str = "sim-token";

/// Settings for the simulator's default credentials, with fast retries:
/// FinBox 50 ms then 100 ms, Credeau 20 ms doubling up to 200 ms (3 retries).
pub fn settings(base_url: &str) -> Settings {
    let env = [
        ("INSIGHTS__FINBOX__BASE_URL", base_url),
        ("INSIGHTS__FINBOX__API_KEY", API_KEY),
        ("INSIGHTS__FINBOX__SERVER_HASH", SERVER_HASH),
        ("INSIGHTS__FINBOX__RETRY_DELAYS", "50ms,100ms"),
        ("INSIGHTS__FINBOX__RETRY_MAX_WAIT", "2s"),
        ("INSIGHTS__FINBOX__REQUEST_TIMEOUT", "2s"),
        ("INSIGHTS__FINBOX__CONNECT_TIMEOUT", "1s"),
        ("INSIGHTS__FINBOX__RATE_LIMIT_PER_MINUTE", "600000"),
        ("INSIGHTS__CREDEAU__BASE_URL", base_url),
        ("INSIGHTS__CREDEAU__CLIENT_ID", CLIENT_ID),
        ("INSIGHTS__CREDEAU__AUTH_TOKEN", AUTH_TOKEN),
        ("INSIGHTS__CREDEAU__RETRY_BASE", "20ms"),
        ("INSIGHTS__CREDEAU__RETRY_CAP", "200ms"),
        ("INSIGHTS__CREDEAU__MAX_RETRIES", "3"),
        ("INSIGHTS__CREDEAU__REQUEST_TIMEOUT", "3s"),
        ("INSIGHTS__CREDEAU__CONNECT_TIMEOUT", "1s"),
        ("INSIGHTS__CREDEAU__RATE_LIMIT_PER_MINUTE", "600000"),
    ];
    Settings::load_from(
        None,
        env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
    )
    .expect("test settings are valid")
}

/// A simulator with the given per-user scenarios (default limits and
/// credentials) on a free port.
pub async fn simulator(users: &[(&str, UserScenario)]) -> RunningSimulator {
    let mut config = SimulatorConfig {
        finbox_rate_limit_per_minute: 0,
        credeau_rate_limit_per_minute: 0,
        ..SimulatorConfig::default()
    };
    for (user, scenario) in users {
        config
            .scenarios
            .users
            .insert(user.to_string(), scenario.clone());
    }
    simulator_with(config).await
}

pub async fn simulator_with(config: SimulatorConfig) -> RunningSimulator {
    simulator::spawn(config).await.expect("simulator starts")
}

pub struct Finbox {
    pub client: FinboxClient,
    pub limiter: Arc<RateLimiter>,
    pub metrics: Arc<Metrics>,
}

pub fn finbox(settings: &Settings, metrics: Arc<Metrics>) -> Finbox {
    let limiter = Arc::new(RateLimiter::new(
        Provider::Finbox,
        settings.finbox.http.rate_limit_per_minute,
        metrics.clone(),
    ));
    let client = FinboxClient::new(&settings.finbox, limiter.clone(), metrics.clone())
        .expect("FinBox client builds");
    Finbox {
        client,
        limiter,
        metrics,
    }
}

pub struct Credeau {
    pub client: CredeauClient,
    pub limiter: Arc<RateLimiter>,
    pub metrics: Arc<Metrics>,
}

pub fn credeau(settings: &Settings, metrics: Arc<Metrics>) -> Credeau {
    let limiter = Arc::new(RateLimiter::new(
        Provider::Credeau,
        settings.credeau.http.rate_limit_per_minute,
        metrics.clone(),
    ));
    let client = CredeauClient::new(&settings.credeau, limiter.clone(), metrics.clone())
        .expect("Credeau client builds");
    Credeau {
        client,
        limiter,
        metrics,
    }
}

/// Asserts neither the error's text nor its Debug form holds a secret, the
/// salt of any of `customer_ids`, or any of `sms_bodies`.
pub fn assert_clean(err: &ProviderError, customer_ids: &[&str], sms_bodies: &[String]) {
    let shown = format!("{err} | {err:?}");
    let mut forbidden: Vec<String> = vec![API_KEY.into(), SERVER_HASH.into(), AUTH_TOKEN.into()];
    for id in customer_ids {
        forbidden.push(insights_enricher::providers::salt::finbox_salt(
            id,
            SERVER_HASH,
        ));
    }
    forbidden.extend(sms_bodies.iter().cloned());
    for secret in forbidden.iter().filter(|s| !s.is_empty()) {
        assert!(
            !shown.contains(secret.as_str()),
            "{secret:?} leaked in {shown}"
        );
    }
}

/// How many requests of `user` the simulator saw at `provider`, and when
/// (ms since its start), with their statuses.
pub async fn seen(sim: &RunningSimulator, user: &str, provider: &str) -> Vec<(u64, u16)> {
    let url = format!("{}/admin/users/{user}", sim.base_url());
    let report: Value = reqwest::get(url)
        .await
        .expect("admin answers")
        .json()
        .await
        .expect("admin JSON");
    report[provider]["last_requests"]
        .as_array()
        .map(|reqs| {
            reqs.iter()
                .map(|r| {
                    (
                        r["at_ms"].as_u64().unwrap_or_default(),
                        r["status"].as_u64().unwrap_or_default() as u16,
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A counter's value: `provider_requests{provider, outcome, http_status}`.
pub fn requests(metrics: &Metrics, provider: &str, outcome: &str, status: &str) -> u64 {
    metrics
        .provider_requests
        .with_label_values(&[provider, outcome, status])
        .get()
}

pub fn retries(metrics: &Metrics, provider: &str, reason: &str) -> u64 {
    metrics
        .provider_retries
        .with_label_values(&[provider, reason])
        .get()
}

pub fn healthy(metrics: &Metrics, provider: &str) -> i64 {
    metrics
        .provider_healthy
        .with_label_values(&[provider])
        .get()
}

pub fn ms(d: u64) -> Duration {
    Duration::from_millis(d)
}

/// The pipeline's worker over the two real provider clients of
/// `settings` (JSON in and out, no schema registry).
pub async fn worker(settings: &Settings, metrics: Arc<Metrics>) -> Worker {
    let tiers = DelayTiers::new(&settings.schedule.delay_tiers);
    Worker {
        finbox: Arc::new(finbox(settings, metrics.clone()).client),
        credeau: Arc::new(credeau(settings, metrics.clone()).client),
        decoder: Arc::new(InputDecoder::new(InputEncoding::Json, None)),
        encoder: Arc::new(
            OutputEncoder::new(OutputEncoding::Json, None, &settings.topics)
                .await
                .unwrap(),
        ),
        policies: Policies {
            finbox: settings.finbox.poll_policy(),
            credeau: settings.credeau.poll_policy(),
        },
        topics: OutputTopics {
            finbox_predictors: "out.finbox".into(),
            sms_extraction: "out.sms".into(),
            combined: "out.ready".into(),
            dead_letter: "out.dlq".into(),
            tiers: tiers.topics("delay"),
        },
        tiers,
        max_message_bytes: 8 << 20,
        record_budget: settings.schedule.record_budget,
        straggler_wait: settings.schedule.straggler_wait,
        parked: ParkedCalls::new(settings.schedule.max_in_flight),
        metrics,
    }
}

/// A consumed record of `kind` holding `value`.
pub fn record(kind: SourceKind, value: Vec<u8>) -> Incoming {
    Incoming {
        kind,
        topic: "in".into(),
        partition: 0,
        offset: 0,
        timestamp: None,
        key: None,
        value: Some(value),
        headers: vec![],
    }
}

//! The Credeau client over real sockets against the in-process simulator:
//! every row of the Credeau table in providers.md, exponential retries,
//! Retry-After from the provider's own rate limit, each injected fault, a
//! 5000-SMS answer, and that no secret or SMS body leaks into errors.

mod providers_support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use insights_enricher::metrics::Metrics;
use insights_enricher::providers::{
    credeau, CredeauAnswer, CredeauApi, ProviderErrorKind as Kind, SmsExtraction,
};
use insights_enricher::simulator::{CredeauScenario, Faults, SimulatorConfig, UserScenario};
use providers_support::*;
use serde_json::{json, Map, Value};

fn cr(scenario: CredeauScenario) -> UserScenario {
    UserScenario {
        finbox: None,
        credeau: Some(scenario),
    }
}

fn faults(f: Faults) -> UserScenario {
    cr(CredeauScenario {
        faults: f,
        ..CredeauScenario::default()
    })
}

/// The simulator's answer for `user`, fetched by hand (it is deterministic
/// per user, so it equals what the client received).
async fn raw(base_url: &str, user: &str, threshold: u32) -> (u16, Vec<u8>) {
    let r = reqwest::Client::new()
        .post(format!("{base_url}/api/fetch_extracted_data"))
        .header("x-client-id", CLIENT_ID)
        .header("x-auth-token", AUTH_TOKEN)
        .json(&json!({"user_id": user, "client_id": CLIENT_ID, "cnt_sms_threshold": threshold}))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.bytes().await.unwrap().to_vec())
}

/// Every `sms_body` string in a (possibly truncated) JSON text.
fn sms_bodies_in(text: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(text);
    text.split("\"sms_body\":")
        .skip(1)
        .filter_map(|rest| {
            let rest = rest.trim_start().strip_prefix('"')?;
            let body: String = rest.chars().take_while(|c| *c != '"').collect();
            (body.len() >= 20).then(|| body[..20].to_string())
        })
        .collect()
}

fn data(answer: CredeauAnswer) -> SmsExtraction {
    match answer {
        CredeauAnswer::Data(sms) => sms,
        CredeauAnswer::Empty => panic!("expected data, got an empty answer"),
    }
}

#[tokio::test]
async fn data_answer_keeps_every_field_of_every_entry() {
    let sim = simulator(&[(
        "u-data",
        cr(CredeauScenario {
            sms_count: 30,
            ..CredeauScenario::default()
        }),
    )])
    .await;
    let c = credeau(&settings(&sim.base_url()), Arc::new(Metrics::new()));
    let sms = data(c.client.fetch_sms("u-data").await.unwrap());
    let (_, body) = raw(&sim.base_url(), "u-data", 5000).await;
    let expected: Value = serde_json::from_slice(&body).unwrap();
    let expected = expected["extracted_sms_data"].as_array().unwrap();
    assert_eq!(sms.entries.len(), expected.len());
    let entries: Vec<Map<String, Value>> = sms
        .entries
        .iter()
        .map(|e| serde_json::from_str(e.get()).unwrap())
        .collect();
    for (got, want) in entries.iter().zip(expected) {
        let want = want.as_object().unwrap();
        // Every key, known or not, is kept ...
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>()
        );
        // ... with its value, except the per-request id and timestamps.
        for (key, value) in want {
            if !matches!(key.as_str(), "request_id" | "created_at" | "created_date") {
                assert_eq!(got.get(key), Some(value), "{key}");
            }
        }
    }
    assert_eq!(sms.entries.len(), 30);
    // Unknown fields survive (the simulator adds one the contract lacks).
    assert!(entries.iter().any(|e| e.contains_key("template_hash")));
    assert_eq!(requests(&c.metrics, "credeau", "data", "200"), 1);
    assert!(!format!("{sms:?}").contains("sms_body"));
}

#[tokio::test]
async fn not_yet_synced_and_never_synced_users_get_empty_answers() {
    let sim = simulator(&[
        (
            "u-later",
            cr(CredeauScenario {
                ready_after: Duration::from_secs(600),
                ..CredeauScenario::default()
            }),
        ),
        (
            "u-never",
            cr(CredeauScenario {
                sms_count: 0,
                ..CredeauScenario::default()
            }),
        ),
    ])
    .await;
    let c = credeau(&settings(&sim.base_url()), Arc::new(Metrics::new()));
    assert_eq!(
        c.client.fetch_sms("u-later").await.unwrap(),
        CredeauAnswer::Empty
    );
    assert_eq!(
        c.client.fetch_sms("u-never").await.unwrap(),
        CredeauAnswer::Empty
    );
    assert_eq!(requests(&c.metrics, "credeau", "empty", "200"), 2);
}

#[tokio::test]
async fn a_5000_sms_answer_is_parsed_whole_and_the_threshold_is_sent() {
    let sim = simulator(&[(
        "u-many",
        cr(CredeauScenario {
            sms_count: 6000,
            ..CredeauScenario::default()
        }),
    )])
    .await;
    let mut s = settings(&sim.base_url());
    let c = credeau(&s, Arc::new(Metrics::new()));
    let started = Instant::now();
    let sms = data(c.client.fetch_sms("u-many").await.unwrap());
    assert_eq!(sms.entries.len(), 5000, "the default threshold is 5000");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert!(sms.entries.iter().all(|e| {
        let e: Value = serde_json::from_str(e.get()).unwrap();
        e.get("sms_body")
            .and_then(Value::as_str)
            .is_some_and(|b| !b.is_empty())
    }));

    s.credeau.cnt_sms_threshold = 100;
    let c = credeau(&s, Arc::new(Metrics::new()));
    assert_eq!(
        data(c.client.fetch_sms("u-many").await.unwrap())
            .entries
            .len(),
        100
    );
}

#[tokio::test]
async fn wrong_token_is_unauthorized_with_the_providers_request_id() {
    let sim = simulator(&[]).await;
    let mut s = settings(&sim.base_url());
    s.credeau.auth_token = insights_enricher::config::SecretSource::new("wrong-token-456");
    let c = credeau(&s, Arc::new(Metrics::new()));
    let err = c.client.fetch_sms("u-1").await.unwrap_err();
    assert_eq!(
        (err.kind, err.http_status, err.attempts),
        (Kind::Unauthorized, Some(401), 1)
    );
    let id = err.provider_request_id.clone().unwrap();
    assert_eq!(id.len(), 32);
    assert!(id.chars().all(|c| c.is_ascii_hexdigit()));
    assert!(err.message.contains(&id));
    assert!(!format!("{err} {err:?}").contains("wrong-token-456"));
    assert_clean(&err, &[], &[]);
    assert_eq!(healthy(&c.metrics, "credeau"), 0);
}

#[tokio::test]
async fn credentials_fixed_at_run_time_make_credeau_healthy_again() {
    let mut config = SimulatorConfig::default();
    config.credentials.credeau_auth_token = "rotated-token".into();
    let sim = simulator_with(config).await;
    let c = credeau(&settings(&sim.base_url()), Arc::new(Metrics::new()));
    assert_eq!(
        c.client.fetch_sms("u-1").await.unwrap_err().kind,
        Kind::Unauthorized
    );
    assert_eq!(healthy(&c.metrics, "credeau"), 0);
    let fixed = reqwest::Client::new()
        .put(format!("{}/admin/credentials", sim.base_url()))
        .json(&json!({"credeau_auth_token": AUTH_TOKEN}))
        .send()
        .await
        .unwrap();
    assert!(fixed.status().is_success());
    data(c.client.fetch_sms("u-1").await.unwrap());
    assert_eq!(healthy(&c.metrics, "credeau"), 1);
}

#[tokio::test]
async fn a_wrong_path_gets_the_html_403_page_as_forbidden() {
    let sim = simulator(&[]).await;
    let s = settings(&format!("{}/wrong-prefix", sim.base_url()));
    let c = credeau(&s, Arc::new(Metrics::new()));
    let err = c.client.fetch_sms("u-1").await.unwrap_err();
    assert_eq!(
        (err.kind, err.http_status, err.attempts),
        (Kind::Forbidden, Some(403), 1)
    );
    assert!(err.message.contains("403 Forbidden"), "{}", err.message);
    assert_eq!(healthy(&c.metrics, "credeau"), 0);
}

#[tokio::test]
async fn a_blocked_ip_gets_the_html_403_page_as_forbidden() {
    let mut config = SimulatorConfig::default();
    config.credentials.credeau_ip_blocked = true;
    let sim = simulator_with(config).await;
    let c = credeau(&settings(&sim.base_url()), Arc::new(Metrics::new()));
    let err = c.client.fetch_sms("u-1").await.unwrap_err();
    assert_eq!((err.kind, err.attempts), (Kind::Forbidden, 1));
    assert!(err.message.contains("text/html"), "{}", err.message);
}

#[tokio::test]
async fn an_over_long_user_id_is_unprocessable_with_a_summarised_detail() {
    let sim = simulator(&[]).await;
    let c = credeau(&settings(&sim.base_url()), Arc::new(Metrics::new()));
    let long_id = "x".repeat(65);
    let err = c.client.fetch_sms(&long_id).await.unwrap_err();
    assert_eq!(
        (err.kind, err.http_status, err.attempts),
        (Kind::Unprocessable, Some(422), 1)
    );
    assert!(err.message.starts_with("body.user_id: "), "{}", err.message);
    assert!(err.message.contains("(string_too_long)"), "{}", err.message);
    assert!(!err.message.contains(&long_id), "the input is never echoed");
}

#[tokio::test]
async fn a_missing_field_422_is_summarised_without_the_echoed_input() {
    let sim = simulator(&[]).await;
    let r = reqwest::Client::new()
        .post(format!("{}/api/fetch_extracted_data", sim.base_url()))
        .header("x-client-id", CLIENT_ID)
        .header("x-auth-token", AUTH_TOKEN)
        .json(&json!({"client_id": CLIENT_ID, "cnt_sms_threshold": 10}))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let body = r.bytes().await.unwrap();
    let err = credeau::map_response(status, Some("application/json"), &body).unwrap_err();
    assert_eq!(err.kind, Kind::Unprocessable);
    assert_eq!(err.message, "body.user_id: Field required (missing)");
}

#[tokio::test]
async fn fault_429s_are_retried_with_backoff_and_slow_the_limiter() {
    let sim = simulator(&[(
        "u-429",
        faults(Faults {
            rate_limit_first: 2,
            ..Faults::default()
        }),
    )])
    .await;
    let c = credeau(&settings(&sim.base_url()), Arc::new(Metrics::new()));
    data(c.client.fetch_sms("u-429").await.unwrap());
    assert_eq!(retries(&c.metrics, "credeau", "rate_limited"), 2);
    assert!(c.limiter.effective_rate_per_minute() < c.limiter.configured_rate_per_minute());
    let seen = seen(&sim, "u-429", "credeau").await;
    assert_eq!(
        seen.iter().map(|s| s.1).collect::<Vec<_>>(),
        [429, 429, 200]
    );
    // 20 ms then 40 ms, each +/-20 %.
    assert!(seen[1].0 - seen[0].0 >= 16, "{seen:?}");
    assert!(seen[2].0 - seen[1].0 >= 32, "{seen:?}");
}

#[tokio::test]
async fn the_providers_own_rate_limit_retry_after_is_honoured() {
    let config = SimulatorConfig {
        credeau_rate_limit_per_minute: 60,
        ..SimulatorConfig::default()
    };
    let sim = simulator_with(config).await;
    let mut s = settings(&sim.base_url());
    s.credeau.retry_cap = Duration::from_secs(3);
    let c = credeau(&s, Arc::new(Metrics::new()));
    data(c.client.fetch_sms("u-a").await.unwrap());
    let started = Instant::now();
    data(c.client.fetch_sms("u-b").await.unwrap());
    // The 429 said "Retry-After: 1" (seconds); the computed 20 ms lost.
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(requests(&c.metrics, "credeau", "rate_limited", "429"), 1);
}

#[tokio::test]
async fn persistent_5xx_uses_every_retry_then_returns_a_retryable_error() {
    let sim = simulator(&[(
        "u-5xx",
        faults(Faults {
            server_error_first: 100,
            server_error_status: 500,
            ..Faults::default()
        }),
    )])
    .await;
    let c = credeau(&settings(&sim.base_url()), Arc::new(Metrics::new()));
    let err = c.client.fetch_sms("u-5xx").await.unwrap_err();
    assert_eq!(
        (err.kind, err.http_status, err.attempts),
        (Kind::ServerError, Some(500), 4)
    );
    assert_eq!(retries(&c.metrics, "credeau", "server_error"), 3);
    assert_clean(&err, &[], &[]);
}

#[tokio::test]
async fn a_5xx_storm_within_the_retries_ends_in_data() {
    let sim = simulator(&[(
        "u-storm",
        faults(Faults {
            server_error_first: 3,
            ..Faults::default()
        }),
    )])
    .await;
    let c = credeau(&settings(&sim.base_url()), Arc::new(Metrics::new()));
    data(c.client.fetch_sms("u-storm").await.unwrap());
    assert_eq!(requests(&c.metrics, "credeau", "server_error", "503"), 3);
}

#[tokio::test]
async fn timeouts_drops_and_proxy_pages_map_to_their_kinds() {
    let sim = simulator(&[
        (
            "u-slow",
            faults(Faults {
                latency: Duration::from_millis(1500),
                ..Faults::default()
            }),
        ),
        (
            "u-drop",
            faults(Faults {
                drop_first: 100,
                ..Faults::default()
            }),
        ),
        (
            "u-proxy",
            faults(Faults {
                proxy_html_first: 100,
                ..Faults::default()
            }),
        ),
    ])
    .await;
    let mut s = settings(&sim.base_url());
    s.credeau.http.request_timeout = Duration::from_millis(200);
    let c = credeau(&s, Arc::new(Metrics::new()));
    let slow = c.client.fetch_sms("u-slow").await.unwrap_err();
    assert_eq!((slow.kind, slow.attempts), (Kind::Timeout, 4));
    let drop = c.client.fetch_sms("u-drop").await.unwrap_err();
    assert_eq!((drop.kind, drop.attempts), (Kind::Connection, 4));
    let proxy = c.client.fetch_sms("u-proxy").await.unwrap_err();
    assert_eq!(
        (proxy.kind, proxy.http_status),
        (Kind::ServerError, Some(502))
    );
    for e in [&slow, &drop, &proxy] {
        assert!(e.is_retryable());
        assert_clean(e, &[], &[]);
    }
}

#[tokio::test]
async fn non_json_and_truncated_bodies_are_invalid_and_never_quote_sms() {
    let sim = simulator(&[
        (
            "u-html",
            faults(Faults {
                non_json_first: 100,
                ..Faults::default()
            }),
        ),
        (
            "u-cut",
            cr(CredeauScenario {
                sms_count: 50,
                faults: Faults {
                    truncated_json_first: 100,
                    ..Faults::default()
                },
                ..CredeauScenario::default()
            }),
        ),
    ])
    .await;
    let c = credeau(&settings(&sim.base_url()), Arc::new(Metrics::new()));
    let html = c.client.fetch_sms("u-html").await.unwrap_err();
    assert_eq!((html.kind, html.attempts), (Kind::InvalidBody, 4));
    let cut = c.client.fetch_sms("u-cut").await.unwrap_err();
    assert_eq!(
        (cut.kind, cut.http_status, cut.attempts),
        (Kind::InvalidBody, Some(200), 4)
    );
    // The same truncated answer, fetched by hand: none of its SMS bodies
    // may appear in the error.
    let (_, body) = raw(&sim.base_url(), "u-cut", 5000).await;
    let bodies = sms_bodies_in(&body);
    assert!(bodies.len() >= 5, "found {} SMS bodies", bodies.len());
    assert_clean(&cut, &[], &bodies);
    assert_clean(&html, &[], &[]);
}

#[tokio::test]
async fn a_response_over_the_size_cap_is_too_large_and_not_retried() {
    let sim = simulator(&[(
        "u-big",
        cr(CredeauScenario {
            sms_count: 200,
            ..CredeauScenario::default()
        }),
    )])
    .await;
    let mut s = settings(&sim.base_url());
    s.credeau.http.max_response_bytes = 10_000;
    let c = credeau(&s, Arc::new(Metrics::new()));
    let err = c.client.fetch_sms("u-big").await.unwrap_err();
    assert_eq!((err.kind, err.attempts), (Kind::TooLarge, 1));
    assert!(err.message.contains("10000-byte"), "{}", err.message);
    assert_eq!(requests(&c.metrics, "credeau", "too_large", "200"), 1);
}

#[tokio::test]
async fn a_retry_after_is_never_cut_short_and_the_jitter_still_spreads_the_retries() {
    let users: Vec<String> = (0..8).map(|i| format!("u-ra-{i}")).collect();
    let scenarios: Vec<(&str, UserScenario)> = users
        .iter()
        .map(|u| {
            (
                u.as_str(),
                faults(Faults {
                    rate_limit_first: 1,
                    retry_after_secs: Some(1),
                    ..Faults::default()
                }),
            )
        })
        .collect();
    let sim = simulator(&scenarios).await;
    let mut s = settings(&sim.base_url());
    s.credeau.retry_cap = Duration::from_secs(3);
    let c = credeau(&s, Arc::new(Metrics::new()));
    let calls = users.iter().map(|u| c.client.fetch_sms(u));
    for answer in futures::future::join_all(calls).await {
        data(answer.unwrap());
    }
    let mut gaps = Vec::new();
    for u in &users {
        let seen = seen(&sim, u, "credeau").await;
        assert_eq!(seen.iter().map(|s| s.1).collect::<Vec<_>>(), [429, 200]);
        gaps.push(seen[1].0 - seen[0].0);
    }
    // Never before the provider's second; at most 20 % (plus scheduling
    // slack on a busy machine) after it; and not all at once.
    assert!(gaps.iter().all(|g| (1000..=1500).contains(g)), "{gaps:?}");
    let spread = gaps.iter().max().unwrap() - gaps.iter().min().unwrap();
    assert!(spread >= 20, "retries bunched together: {gaps:?}");
}

#[tokio::test]
async fn groupings_are_sent_when_configured_and_left_out_otherwise() {
    let sim = simulator(&[(
        "u-groups",
        cr(CredeauScenario {
            require_groupings: true,
            ..CredeauScenario::default()
        }),
    )])
    .await;
    let mut s = settings(&sim.base_url());
    assert_eq!(s.credeau.groupings(), None);
    let c = credeau(&s, Arc::new(Metrics::new()));
    let err = c.client.fetch_sms("u-groups").await.unwrap_err();
    assert_eq!(err.kind, Kind::Unprocessable);
    assert_eq!(err.message, "body.groupings: Field required (missing)");

    s.credeau.groupings = json!(["bank", "upi"]);
    let c = credeau(&s, Arc::new(Metrics::new()));
    let sms = data(c.client.fetch_sms("u-groups").await.unwrap());
    assert_eq!(sms.entries.len(), 20);
    assert_eq!(sms.cnt_sms_threshold, Some(s.credeau.cnt_sms_threshold));
}

//! The FinBox client over real sockets against the in-process simulator:
//! every row of the FinBox table in providers.md, retries, Retry-After, the
//! rate limiter, each injected fault, and that no secret leaks into errors.
//! (Credeau is in providers_credeau.rs.)

mod providers_support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use insights_enricher::config::Settings;
use insights_enricher::metrics::Metrics;
use insights_enricher::providers::{
    finbox, FinboxAnswer, FinboxApi, ProviderErrorKind as Kind, RetryPolicy,
};
use insights_enricher::simulator::{
    Faults, FinboxOutcome, FinboxScenario, SimulatorConfig, UserScenario,
};
use providers_support::*;
use serde_json::{json, Value};

fn fb(scenario: FinboxScenario) -> UserScenario {
    UserScenario {
        finbox: Some(scenario),
        credeau: None,
    }
}

fn faults(f: Faults) -> UserScenario {
    fb(FinboxScenario {
        faults: f,
        ..FinboxScenario::default()
    })
}

#[tokio::test]
async fn in_progress_answer_carries_the_ten_second_suggestion() {
    let sim = simulator(&[(
        "u-wait",
        fb(FinboxScenario {
            ready_after: Duration::from_secs(600),
            ..FinboxScenario::default()
        }),
    )])
    .await;
    let f = finbox(&settings(&sim.base_url()), Arc::new(Metrics::new()));
    let answer = f.client.fetch_predictors("u-wait").await.unwrap();
    let FinboxAnswer::InProgress {
        suggested_wait,
        request_id,
    } = answer
    else {
        panic!("{answer:?}")
    };
    assert_eq!(suggested_wait, Some(Duration::from_secs(10)));
    assert_eq!(request_id.map(|r| r.len()), Some(32));
    assert_eq!(requests(&f.metrics, "finbox", "in_progress", "202"), 1);
}

#[tokio::test]
async fn complete_answer_holds_every_predictor_with_mixed_value_types() {
    let sim = simulator(&[(
        "u-done",
        fb(FinboxScenario {
            predictors: 40,
            ..FinboxScenario::default()
        }),
    )])
    .await;
    let f = finbox(&settings(&sim.base_url()), Arc::new(Metrics::new()));
    let FinboxAnswer::Complete(ins) = f.client.fetch_predictors("u-done").await.unwrap() else {
        panic!("expected complete")
    };
    assert_eq!(ins.predictors.len(), 40);
    let kinds: std::collections::BTreeSet<&str> = ins
        .predictors
        .iter()
        .map(|p| match p.value {
            Value::Number(_) => "number",
            Value::String(_) => "string",
            Value::Bool(_) => "bool",
            Value::Null => "null",
            _ => "other",
        })
        .collect();
    assert!(kinds.len() >= 3, "value kinds {kinds:?}");
    let request_id = ins.request_id.unwrap();
    assert_eq!(request_id.len(), 32);
    assert!(ins.date_requested.unwrap().contains('T'));
    assert_eq!(requests(&f.metrics, "finbox", "complete", "200"), 1);
    assert_eq!(healthy(&f.metrics, "finbox"), 1);
}

#[tokio::test]
async fn no_data_and_not_found_are_answers_not_errors() {
    let sim = simulator(&[
        (
            "u-nodata",
            fb(FinboxScenario {
                outcome: FinboxOutcome::NoData,
                ..FinboxScenario::default()
            }),
        ),
        (
            "u-missing",
            fb(FinboxScenario {
                outcome: FinboxOutcome::NotFound,
                ..FinboxScenario::default()
            }),
        ),
    ])
    .await;
    let f = finbox(&settings(&sim.base_url()), Arc::new(Metrics::new()));
    let nodata = f.client.fetch_predictors("u-nodata").await.unwrap();
    assert!(
        matches!(nodata, FinboxAnswer::NoData { request_id: Some(ref r) } if r.len() == 32),
        "{nodata:?}"
    );
    let missing = f.client.fetch_predictors("u-missing").await.unwrap();
    assert!(
        matches!(missing, FinboxAnswer::NotFound { request_id: Some(ref r) } if r.len() == 32),
        "{missing:?}"
    );
}

#[tokio::test]
async fn missing_key_400_maps_to_a_non_retryable_bad_request() {
    let sim = simulator(&[]).await;
    let s = settings(&sim.base_url());
    // The client always sends every key, so send the malformed request by
    // hand and map the simulator's real answer with the client's mapping.
    let response = reqwest::Client::new()
        .post(s.finbox.endpoint())
        .header("x-api-key", API_KEY)
        .json(&json!({"customer_id": "u-1", "salt": "x"}))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let ct = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string());
    let body = response.bytes().await.unwrap();
    let err = finbox::map_response(status, ct.as_deref(), &body).unwrap_err();
    assert_eq!(err.kind, Kind::BadRequest);
    assert_eq!(err.http_status, Some(400));
    assert_eq!(err.message, "Missing Key version");
    assert!(!err.is_retryable());
    assert_eq!(err.provider_request_id.map(|r| r.len()), Some(32));
}

#[tokio::test]
async fn wrong_api_key_is_forbidden_at_once_and_marks_finbox_unhealthy_until_a_success() {
    let sim = simulator(&[]).await;
    let metrics = Arc::new(Metrics::new());
    let mut wrong = settings(&sim.base_url());
    wrong.finbox.api_key = insights_enricher::config::SecretSource::new("wrong-key-123");
    let f = finbox(&wrong, metrics.clone());
    let err = f.client.fetch_predictors("u-1").await.unwrap_err();
    assert_eq!(
        (err.kind, err.http_status, err.attempts),
        (Kind::Forbidden, Some(403), 1)
    );
    assert_eq!(err.message, "Incorrect API Key");
    assert!(!format!("{err} {err:?}").contains("wrong-key-123"));
    assert_clean(&err, &["u-1"], &[]);
    assert_eq!(healthy(&metrics, "finbox"), 0);

    let good = finbox(&settings(&sim.base_url()), metrics.clone());
    good.client.fetch_predictors("u-1").await.unwrap();
    assert_eq!(healthy(&metrics, "finbox"), 1);
}

#[tokio::test]
async fn wrong_server_hash_gives_forbidden_incorrect_salt() {
    let sim = simulator(&[]).await;
    let mut wrong = settings(&sim.base_url());
    wrong.finbox.server_hash = insights_enricher::config::SecretSource::new("not-the-hash");
    let f = finbox(&wrong, Arc::new(Metrics::new()));
    let err = f.client.fetch_predictors("u-salt").await.unwrap_err();
    assert_eq!((err.kind, err.http_status), (Kind::Forbidden, Some(403)));
    assert_eq!(err.message, "Incorrect salt");
    let wrong_salt = insights_enricher::providers::salt::finbox_salt("u-salt", "not-the-hash");
    assert!(!format!("{err} {err:?}").contains(&wrong_salt));
    assert!(!format!("{err} {err:?}").contains("not-the-hash"));
}

#[tokio::test]
async fn ip_not_whitelisted_is_forbidden() {
    let mut config = SimulatorConfig::default();
    config.credentials.finbox_ip_blocked = true;
    let sim = simulator_with(config).await;
    let f = finbox(&settings(&sim.base_url()), Arc::new(Metrics::new()));
    let err = f.client.fetch_predictors("u-1").await.unwrap_err();
    assert_eq!((err.kind, err.attempts), (Kind::Forbidden, 1));
    assert_eq!(err.message, "IP address not whitelisted");
}

#[tokio::test]
async fn persistent_5xx_is_retried_twice_then_returned_as_retryable() {
    let sim = simulator(&[(
        "u-5xx",
        faults(Faults {
            server_error_first: 100,
            ..Faults::default()
        }),
    )])
    .await;
    let f = finbox(&settings(&sim.base_url()), Arc::new(Metrics::new()));
    let err = f.client.fetch_predictors("u-5xx").await.unwrap_err();
    assert_eq!(
        (err.kind, err.http_status, err.attempts),
        (Kind::ServerError, Some(503), 3)
    );
    assert!(err.is_retryable());
    assert_clean(&err, &["u-5xx"], &[]);
    assert_eq!(requests(&f.metrics, "finbox", "server_error", "503"), 3);
    assert_eq!(retries(&f.metrics, "finbox", "server_error"), 2);
    // The server saw the retries spaced by the configured 50 ms and 100 ms.
    let seen = seen(&sim, "u-5xx", "finbox").await;
    assert_eq!(seen.len(), 3);
    assert!(seen[1].0 - seen[0].0 >= 50, "{seen:?}");
    assert!(seen[2].0 - seen[1].0 >= 100, "{seen:?}");
}

#[tokio::test]
async fn a_5xx_storm_shorter_than_the_retries_ends_in_success() {
    let sim = simulator(&[(
        "u-storm",
        faults(Faults {
            server_error_first: 2,
            server_error_status: 500,
            ..Faults::default()
        }),
    )])
    .await;
    let f = finbox(&settings(&sim.base_url()), Arc::new(Metrics::new()));
    let answer = f.client.fetch_predictors("u-storm").await.unwrap();
    assert!(matches!(answer, FinboxAnswer::Complete(_)), "{answer:?}");
    assert_eq!(requests(&f.metrics, "finbox", "server_error", "500"), 2);
    assert_eq!(requests(&f.metrics, "finbox", "complete", "200"), 1);
}

#[tokio::test]
async fn a_429_is_retried_and_slows_the_client_side_limiter() {
    let sim = simulator(&[(
        "u-429",
        faults(Faults {
            rate_limit_first: 1,
            ..Faults::default()
        }),
    )])
    .await;
    let f = finbox(&settings(&sim.base_url()), Arc::new(Metrics::new()));
    let before = f.limiter.effective_rate_per_minute();
    let answer = f.client.fetch_predictors("u-429").await.unwrap();
    assert!(matches!(answer, FinboxAnswer::Complete(_)), "{answer:?}");
    assert_eq!(retries(&f.metrics, "finbox", "rate_limited"), 1);
    assert_eq!(f.limiter.effective_rate_per_minute(), before / 2);
}

#[tokio::test]
async fn retry_after_wins_over_the_configured_delay() {
    let sim = simulator(&[(
        "u-ra",
        faults(Faults {
            rate_limit_first: 1,
            retry_after_secs: Some(1),
            ..Faults::default()
        }),
    )])
    .await;
    let f = finbox(&settings(&sim.base_url()), Arc::new(Metrics::new()));
    let started = Instant::now();
    f.client.fetch_predictors("u-ra").await.unwrap();
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    let seen = seen(&sim, "u-ra", "finbox").await;
    assert_eq!(seen.iter().map(|s| s.1).collect::<Vec<_>>(), [429, 200]);
    assert!(seen[1].0 - seen[0].0 >= 1000, "{seen:?}");
}

#[tokio::test]
async fn a_zero_retry_after_does_not_shorten_the_documented_waits() {
    let sim = simulator(&[(
        "u-ra-zero",
        faults(Faults {
            rate_limit_first: 2,
            retry_after_secs: Some(0),
            ..Faults::default()
        }),
    )])
    .await;
    let mut s = settings(&sim.base_url());
    s.finbox.retry_delays = vec![ms(300), ms(600)];
    let f = finbox(&s, Arc::new(Metrics::new()));
    let answer = f.client.fetch_predictors("u-ra-zero").await.unwrap();
    assert!(matches!(answer, FinboxAnswer::Complete(_)), "{answer:?}");
    let seen = seen(&sim, "u-ra-zero", "finbox").await;
    assert_eq!(
        seen.iter().map(|s| s.1).collect::<Vec<_>>(),
        [429, 429, 200]
    );
    assert!(seen[1].0 - seen[0].0 >= 300, "{seen:?}");
    assert!(seen[2].0 - seen[1].0 >= 600, "{seen:?}");
}

#[tokio::test]
async fn retry_after_is_capped_at_retry_max_wait_and_reported_when_retries_run_out() {
    let sim = simulator(&[(
        "u-ra-cap",
        faults(Faults {
            rate_limit_first: 100,
            retry_after_secs: Some(30),
            ..Faults::default()
        }),
    )])
    .await;
    let mut s = settings(&sim.base_url());
    s.finbox.retry_max_wait = ms(100);
    let f = finbox(&s, Arc::new(Metrics::new()));
    let started = Instant::now();
    let err = f.client.fetch_predictors("u-ra-cap").await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!((err.kind, err.attempts), (Kind::RateLimited, 3));
    assert_eq!(err.retry_after, Some(Duration::from_secs(30)));
    let seen = seen(&sim, "u-ra-cap", "finbox").await;
    assert!(seen.windows(2).all(|w| w[1].0 - w[0].0 >= 100), "{seen:?}");
}

#[tokio::test]
async fn every_attempt_including_retries_takes_a_rate_limit_permit() {
    let sim = simulator(&[(
        "u-permits",
        faults(Faults {
            server_error_first: 2,
            ..Faults::default()
        }),
    )])
    .await;
    let mut s = settings(&sim.base_url());
    s.finbox.http.rate_limit_per_minute = 120; // one permit per 500 ms
    s.finbox.retry_delays = vec![ms(1), ms(1)];
    let f = finbox(&s, Arc::new(Metrics::new()));
    let started = Instant::now();
    f.client.fetch_predictors("u-permits").await.unwrap();
    // Three attempts: the first at once, then two permits 500 ms apart.
    assert!(started.elapsed() >= ms(1000), "{:?}", started.elapsed());
    let waits = f
        .metrics
        .rate_limiter_wait
        .with_label_values(&["finbox"])
        .get_sample_count();
    assert_eq!(waits, 3);
}

#[tokio::test]
async fn latency_beyond_the_request_timeout_is_a_timeout() {
    let sim = simulator(&[(
        "u-slow",
        faults(Faults {
            latency: ms(1500),
            ..Faults::default()
        }),
    )])
    .await;
    let mut s = settings(&sim.base_url());
    s.finbox.http.request_timeout = ms(200);
    let f = finbox(&s, Arc::new(Metrics::new()));
    let err = f.client.fetch_predictors("u-slow").await.unwrap_err();
    assert_eq!(
        (err.kind, err.http_status, err.attempts),
        (Kind::Timeout, None, 3)
    );
    assert_eq!(requests(&f.metrics, "finbox", "timeout", "none"), 3);
    assert_clean(&err, &["u-slow"], &[]);
}

#[tokio::test]
async fn dropped_connections_are_connection_errors() {
    let sim = simulator(&[(
        "u-drop",
        faults(Faults {
            drop_first: 100,
            ..Faults::default()
        }),
    )])
    .await;
    let f = finbox(&settings(&sim.base_url()), Arc::new(Metrics::new()));
    let err = f.client.fetch_predictors("u-drop").await.unwrap_err();
    assert_eq!((err.kind, err.attempts), (Kind::Connection, 3));
    assert!(err.is_retryable());
    assert_clean(&err, &["u-drop"], &[]);
}

#[tokio::test]
async fn non_json_and_truncated_json_bodies_are_invalid_and_retried() {
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
            faults(Faults {
                truncated_json_first: 100,
                ..Faults::default()
            }),
        ),
        (
            "u-cut-once",
            faults(Faults {
                truncated_json_first: 1,
                ..Faults::default()
            }),
        ),
    ])
    .await;
    let f = finbox(&settings(&sim.base_url()), Arc::new(Metrics::new()));
    let html = f.client.fetch_predictors("u-html").await.unwrap_err();
    assert_eq!(
        (html.kind, html.http_status, html.attempts),
        (Kind::InvalidBody, Some(200), 3)
    );
    let cut = f.client.fetch_predictors("u-cut").await.unwrap_err();
    assert_eq!((cut.kind, cut.attempts), (Kind::InvalidBody, 3));
    assert!(cut.message.contains("JSON"), "{}", cut.message);
    assert_eq!(retries(&f.metrics, "finbox", "invalid_body"), 4);
    let recovered = f.client.fetch_predictors("u-cut-once").await.unwrap();
    assert!(matches!(recovered, FinboxAnswer::Complete(_)));
    assert_clean(&html, &["u-html"], &[]);
    assert_clean(&cut, &["u-cut"], &[]);
}

#[tokio::test]
async fn proxy_html_502_is_a_retryable_server_error() {
    let sim = simulator(&[(
        "u-proxy",
        faults(Faults {
            proxy_html_first: 100,
            ..Faults::default()
        }),
    )])
    .await;
    let f = finbox(&settings(&sim.base_url()), Arc::new(Metrics::new()));
    let err = f.client.fetch_predictors("u-proxy").await.unwrap_err();
    assert_eq!(
        (err.kind, err.http_status, err.attempts),
        (Kind::ServerError, Some(502), 3)
    );
    assert!(err.message.contains("text/html"), "{}", err.message);
}

#[tokio::test]
async fn a_response_over_the_size_cap_is_refused_as_too_large() {
    let sim = simulator(&[(
        "u-big",
        fb(FinboxScenario {
            predictors: 500,
            ..FinboxScenario::default()
        }),
    )])
    .await;
    let mut s = settings(&sim.base_url());
    s.finbox.http.max_response_bytes = 2048;
    let f = finbox(&s, Arc::new(Metrics::new()));
    let err = f.client.fetch_predictors("u-big").await.unwrap_err();
    assert_eq!(
        (err.kind, err.http_status, err.attempts),
        (Kind::TooLarge, Some(200), 1)
    );
    assert!(!err.is_retryable());
}

#[tokio::test]
async fn the_staging_environment_uses_the_staging_path() {
    let sim = simulator(&[]).await;
    let mut s = settings(&sim.base_url());
    s.finbox.environment = insights_enricher::config::FinboxEnvironment::Staging;
    assert!(s.finbox.endpoint().ends_with("/staging/risk/predictors"));
    let f = finbox(&s, Arc::new(Metrics::new()));
    let answer = f.client.fetch_predictors("u-staging").await.unwrap();
    assert!(matches!(answer, FinboxAnswer::Complete(_)), "{answer:?}");
}

#[test]
fn documented_defaults_give_two_then_five_seconds() {
    let s = Settings::load_from(
        None,
        [
            ("INSIGHTS__FINBOX__API_KEY", "k"),
            ("INSIGHTS__FINBOX__SERVER_HASH", "h"),
            ("INSIGHTS__CREDEAU__CLIENT_ID", "c"),
            ("INSIGHTS__CREDEAU__AUTH_TOKEN", "t"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string())),
    )
    .unwrap();
    let p = finbox::retry_policy(&s.finbox);
    assert_eq!(
        p,
        RetryPolicy::Fixed {
            delays: vec![Duration::from_secs(2), Duration::from_secs(5)],
            max_wait: Duration::from_secs(60),
        }
    );
    let c = insights_enricher::providers::credeau::retry_policy(&s.credeau);
    assert_eq!(
        c,
        RetryPolicy::Exponential {
            max_retries: 3,
            base: Duration::from_secs(1),
            cap: Duration::from_secs(60),
        }
    );
    // Centre of the jitter: 1 s, 2 s, 4 s.
    let centres: Vec<_> = (0..3).map(|n| c.delay(n, 0.0).unwrap()).collect();
    assert_eq!(centres, [1, 2, 4].map(Duration::from_secs).to_vec());
}

#[tokio::test]
async fn an_endless_body_without_length_is_refused_while_streaming() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A server that answers 200 with a chunked body that never ends: only a
    // cap enforced while streaming can stop the client.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = [0u8; 4096];
                let _ = socket.read(&mut request).await;
                let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n";
                if socket.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                let chunk = format!("{:x}\r\n{}\r\n", 16 * 1024, "x".repeat(16 * 1024));
                while socket.write_all(chunk.as_bytes()).await.is_ok() {}
            });
        }
    });
    let mut s = settings(&format!("http://{addr}"));
    s.finbox.http.max_response_bytes = 100_000;
    let f = finbox(&s, Arc::new(Metrics::new()));
    let started = Instant::now();
    let err = f.client.fetch_predictors("u-endless").await.unwrap_err();
    assert_eq!(
        (err.kind, err.http_status, err.attempts),
        (Kind::TooLarge, Some(200), 1)
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn debug_and_warn_logs_never_hold_secrets_or_salts() {
    use std::sync::Mutex;
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    // The process's subscriber, not a thread-local one: with tests running
    // side by side, a callsite first reached on another thread (without a
    // subscriber) could be cached as never enabled, and this test's events
    // went missing. Other tests of this file log into the same buffer too;
    // they must not log secrets either.
    static LOGS: std::sync::OnceLock<Buffer> = std::sync::OnceLock::new();
    let buffer = LOGS
        .get_or_init(|| {
            let buffer = Buffer::default();
            let writer = buffer.clone();
            let subscriber = tracing_subscriber::fmt()
                .with_max_level(tracing::Level::DEBUG)
                .with_writer(move || writer.clone())
                .finish();
            tracing::subscriber::set_global_default(subscriber)
                .expect("no other subscriber in this test binary");
            buffer
        })
        .clone();

    let sim = simulator(&[(
        "u-log",
        faults(Faults {
            server_error_first: 1,
            ..Faults::default()
        }),
    )])
    .await;
    let f = finbox(&settings(&sim.base_url()), Arc::new(Metrics::new()));
    f.client.fetch_predictors("u-log").await.unwrap();
    let mut wrong = settings(&sim.base_url());
    wrong.finbox.api_key = insights_enricher::config::SecretSource::new("wrong-key-789");
    let bad = finbox(&wrong, Arc::new(Metrics::new()));
    bad.client.fetch_predictors("u-log").await.unwrap_err();

    let logs = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("provider request"), "{logs}");
    assert!(logs.contains("retrying provider request"), "{logs}");
    assert!(logs.contains("WARN"), "{logs}");
    let salt = insights_enricher::providers::salt::finbox_salt("u-log", SERVER_HASH);
    for secret in [API_KEY, SERVER_HASH, "wrong-key-789", salt.as_str()] {
        assert!(!logs.contains(secret), "{secret} in logs:\n{logs}");
    }
}

//! Secret hygiene end to end: the service runs at its most verbose (trace,
//! plus librdkafka's `debug=all`) with distinctive credentials, against the
//! simulator and the shared test broker, once with good credentials and
//! once with wrong ones (so users, and a poison input record, are
//! dead-lettered). Then every log line, the whole /metrics page and every
//! dead-letter header and value are searched for the API key, the server
//! hash, the auth tokens, each user's salt and each user's SMS bodies
//! (fetched directly from the simulator): none may appear.

mod common;

use std::time::Duration;

use common::*;
use insights_enricher::providers::salt::finbox_salt;
use insights_enricher::simulator::{self, Credentials, SimulatorConfig};

/// Credentials no other test uses, long enough that a hit is never chance.
struct Secrets {
    api_key: String,
    server_hash: String,
    client_id: String,
    token: String,
}

impl Secrets {
    fn new() -> Secrets {
        let id = uuid::Uuid::new_v4().simple().to_string();
        Secrets {
            api_key: format!("HYGfbkey{id}"),
            server_hash: format!("HYGhash{id}"),
            client_id: format!("hyg-client-{}", &id[..8]),
            token: format!("HYGtoken{id}"),
        }
    }
}

fn secret_env(s: &Secrets, api_key: &str, token: &str) -> Vec<(String, String)> {
    vec![
        ("INSIGHTS__FINBOX__API_KEY".into(), api_key.into()),
        (
            "INSIGHTS__FINBOX__SERVER_HASH".into(),
            s.server_hash.clone(),
        ),
        ("INSIGHTS__CREDEAU__CLIENT_ID".into(), s.client_id.clone()),
        ("INSIGHTS__CREDEAU__AUTH_TOKEN".into(), token.into()),
    ]
    .into_iter()
    .chain(most_verbose_log_env())
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_salt_or_sms_body_reaches_logs_metrics_or_dead_letters() {
    let s = Secrets::new();
    let sim = simulator::spawn(SimulatorConfig {
        credentials: Credentials {
            finbox_api_key: s.api_key.clone(),
            finbox_server_hash: s.server_hash.clone(),
            credeau_client_id: s.client_id.clone(),
            credeau_auth_token: s.token.clone(),
            ..Credentials::default()
        },
        finbox_rate_limit_per_minute: 0,
        credeau_rate_limit_per_minute: 0,
        ..SimulatorConfig::default()
    })
    .await
    .expect("simulator");
    let dir = tempfile::tempdir().expect("tempdir");
    let wrong_key = format!("HYGwrongkey{}", uuid::Uuid::new_v4().simple());
    let wrong_token = format!("HYGwrongtoken{}", uuid::Uuid::new_v4().simple());

    // Run 1: good credentials, JSON logs. Every user completes.
    let good = Topics::new("hygiene-good");
    create_topic(&good.input, 2).await;
    let mut env = service_env(&good, &unique("g"), &sim.base_url());
    env.extend(secret_env(&s, &s.api_key, &s.token));
    env.push(("INSIGHTS__LOG__FORMAT".into(), "json".into()));
    let mut service = Service::start(&env, &dir.path().join("good.log"));
    wait_ready(&service).await;
    let good_users = produce_users(&good.input, "hyg-ok-", 4).await;
    let combined = read_topic(
        &good.combined,
        Some(good_users.len()),
        Duration::from_secs(90),
    );
    assert_eq!(
        combined.len(),
        good_users.len(),
        "good run: combined events"
    );
    assert!(
        combined
            .iter()
            .all(|r| r.value["credeau"]["outcome"] == "complete"),
        "good run: SMS must have been fetched, so bodies passed through"
    );
    let good_metrics = metrics_page(&service.log_text()).await;
    assert!(good_metrics.contains("insights_"), "not the metrics page");
    assert!(service.terminate(Duration::from_secs(20)).is_some());
    let good_log = service.log_text();

    // Run 2: wrong FinBox key and Credeau token, text logs; plus a poison
    // record. Everything goes to the dead-letter topic.
    let bad = Topics::new("hygiene-bad");
    create_topic(&bad.input, 2).await;
    let mut env = service_env(&bad, &unique("g"), &sim.base_url());
    env.extend(secret_env(&s, &wrong_key, &wrong_token));
    let mut service = Service::start(&env, &dir.path().join("bad.log"));
    wait_ready(&service).await;
    let bad_users = produce_users(&bad.input, "hyg-dlq-", 3).await;
    produce(
        &producer(),
        &bad.input,
        Some(b"hyg-poison"),
        Some(b"{\"user_id\": \"hyg-poison\", \"oops\""),
    )
    .await;
    // Both providers fail for each user, and the poison record once.
    let want_dlq = bad_users.len() * 2 + 1;
    let dlq = read_topic(&bad.dlq, Some(want_dlq), Duration::from_secs(90));
    assert_eq!(dlq.len(), want_dlq, "bad run: dead letters: {dlq:?}");
    let stages: std::collections::BTreeSet<String> = dlq
        .iter()
        .filter_map(|r| r.headers.get("dlq.stage").cloned().flatten())
        .collect();
    assert!(stages.len() >= 3, "stages exercised: {stages:?}");
    let bad_metrics = metrics_page(&service.log_text()).await;
    assert!(service.terminate(Duration::from_secs(20)).is_some());
    let bad_log = service.log_text();

    // What must never appear.
    let mut needles = vec![
        ("FinBox API key".to_string(), s.api_key.clone()),
        ("FinBox server hash".to_string(), s.server_hash.clone()),
        ("Credeau token".to_string(), s.token.clone()),
        ("wrong FinBox API key".to_string(), wrong_key.clone()),
        ("wrong Credeau token".to_string(), wrong_token.clone()),
    ];
    let mut bodies = 0;
    for user in good_users.iter().chain(&bad_users) {
        needles.push((format!("salt of {user}"), finbox_salt(user, &s.server_hash)));
        for body in sms_bodies(&sim.base_url(), &s.client_id, &s.token, user).await {
            needles.push((format!("SMS body of {user}"), body));
            bodies += 1;
        }
    }
    assert!(bodies >= 10, "too few SMS bodies to check: {bodies}");

    // The logs are really the most verbose ones: trace events and
    // librdkafka's debug contexts are in them.
    assert!(good_log.lines().count() > 200, "good run log is short");
    assert!(
        good_log.contains("\"level\":\"TRACE\""),
        "no trace lines in the log"
    );
    assert!(
        good_log.contains("\"target\":\"librdkafka\"") && bad_log.contains("librdkafka"),
        "librdkafka's debug output is not in the logs"
    );

    let mut found = Vec::new();
    for (name, log) in [("good run log", &good_log), ("bad run log", &bad_log)] {
        for (i, line) in log.lines().enumerate() {
            found.extend(leaks(&format!("{name} line {}", i + 1), line, &needles));
        }
    }
    found.extend(leaks("good run /metrics", &good_metrics, &needles));
    found.extend(leaks("bad run /metrics", &bad_metrics, &needles));
    for r in &dlq {
        for (k, v) in &r.headers {
            let text = format!("{k}={}", v.as_deref().unwrap_or_default());
            found.extend(leaks(
                &format!("dead letter {} header {k}", r.offset),
                &text,
                &needles,
            ));
        }
        found.extend(leaks(
            &format!("dead letter {} key/value", r.offset),
            &format!("{:?} {}", r.key, r.value),
            &needles,
        ));
    }
    if let Ok(keep) = std::env::var("HYGIENE_KEEP_LOGS") {
        std::fs::write(format!("{keep}/good.log"), &good_log).expect("keep log");
        std::fs::write(format!("{keep}/bad.log"), &bad_log).expect("keep log");
    }
    assert!(found.is_empty(), "leaks:\n{}", found.join("\n"));
    let _ = sim.shutdown().await;
}

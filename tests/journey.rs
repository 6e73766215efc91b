//! `insights-enricher user USER_ID` (the binary, configured like the
//! service) against the real broker and a running service: a user still
//! waiting (next poll due, deadlines), the same user once timed out, a
//! complete user, a user whose Credeau answers were dead-lettered, a user
//! whose onboarding event was dead-lettered, and one never seen. Only the
//! user's own partition of each topic is read, found with the producer's
//! partitioner; no SMS body or secret is ever printed.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use insights_enricher::simulator::{self, SimulatorConfig};
use serde_json::{json, Value};

/// Secrets of the test configuration: none may appear in the output.
const SECRETS: &[&str] = &["sim-finbox-key", "sim-server-hash", "sim-token"];

/// Runs `insights-enricher user ARGS` with the service's environment;
/// returns stdout after checking it succeeded and printed no secret.
fn user_cli(env: &[(String, String)], args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_insights-enricher"))
        .arg("user")
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .expect("run user");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "user {args:?} failed: {stderr}\n{stdout}"
    );
    for s in SECRETS {
        assert!(
            !stdout.contains(s) && !stderr.contains(s),
            "user {args:?} printed the secret {s:?}"
        );
    }
    stdout
}

fn journey(env: &[(String, String)], user: &str) -> (String, Value) {
    let text = user_cli(env, &[user]);
    let json = user_cli(env, &[user, "--json"]);
    let v = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}: {json}"));
    (text, v)
}

fn steps<'a>(v: &'a Value, kind: &str) -> Vec<&'a Value> {
    v["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .filter(|s| s["step"] == kind)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_shows_each_users_journey_and_what_happens_next() {
    let sim = simulator::spawn(SimulatorConfig::default())
        .await
        .expect("simulator");
    let base = sim.base_url();
    sim_admin(
        &base,
        "/admin/scenarios",
        &json!({
            "default": {"credeau": {"sms_count": 30}},
            "prefixes": {
                "done-": {"finbox": {"ready_after": "0s", "predictors": 5},
                          "credeau": {"ready_after": "0s", "sms_count": 30}},
                "slow-": {"finbox": {"ready_after": "1000d"}, "credeau": {"ready_after": "1000d"}},
                "cut-": {"finbox": {"ready_after": "0s"},
                         "credeau": {"sms_count": 30, "faults": {"truncated_json_first": 1000}}}
            }
        }),
    )
    .await;

    let topics = Topics::new("journey");
    create_topic(&topics.input, 3).await;
    let dir = tempfile::tempdir().unwrap();
    let env = service_env(&topics, &unique("g"), &base);
    let service = Service::start(&env, &dir.path().join("service.log"));
    wait_ready(&service).await;

    let slow = produce_users(&topics.input, "slow-", 1).await.remove(0);
    let done = produce_users(&topics.input, "done-", 1).await.remove(0);
    let cut = produce_users(&topics.input, "cut-", 1).await.remove(0);
    let poison = format!("poison-{}", unique("u"));
    produce(
        &producer(),
        &topics.input,
        Some(poison.as_bytes()),
        Some(br#"{"event_id": "e", "user_id": "#),
    )
    .await;

    // Waiting: polled, not ready, scheduled again with a due time and the
    // deadlines ahead.
    let waiting = eventually(Duration::from_secs(30), || {
        let (text, v) = journey(&env, &slow);
        (v["next"]["state"] == "waiting" && !steps(&v, "provider_outcome").is_empty())
            .then_some((text, v))
    })
    .await;
    let (text, v) =
        waiting.unwrap_or_else(|| panic!("{slow} never waiting: {}", service.log_text()));
    assert_eq!(v["found"], true);
    assert_eq!(v["onboarding"]["event_id"], format!("ev-{slow}"), "{v}");
    assert_eq!(v["onboarding"]["input_topic"], topics.input.as_str(), "{v}");
    let scheduled = steps(&v, "scheduled");
    assert!(!scheduled.is_empty(), "{v}");
    assert!(
        scheduled[0]["tier"].is_string() && scheduled[0]["due_at"].is_string(),
        "{v}"
    );
    assert!(
        steps(&v, "provider_outcome")
            .iter()
            .any(|s| s["result"] == "not ready yet"),
        "{v}"
    );
    assert!(v["next"]["next_poll_due"].is_string(), "{v}");
    let deadlines: Vec<&str> = v["next"]["deadlines"]
        .as_array()
        .expect("deadlines")
        .iter()
        .map(|d| d[0].as_str().unwrap())
        .collect();
    assert_eq!(deadlines, ["finbox", "credeau"], "{v}");
    assert!(text.contains("now: waiting: next poll due at "), "{text}");
    assert!(text.contains("finbox deadline "), "{text}");
    assert!(text.contains("onboarded "), "{text}");

    // Everyone's final events: the slow user times out (deadlines 25 s and
    // 20 s), the others finish.
    let combined = read_topic(&topics.combined, Some(3), Duration::from_secs(90));
    assert_eq!(combined.len(), 3, "log:\n{}", service.log_text());
    let partition_of = |user: &str| {
        combined
            .iter()
            .find(|r| r.key.as_deref() == Some(user))
            .map(|r| r.partition)
            .expect("combined event")
    };

    // Timed out.
    let (text, v) = journey(&env, &slow);
    assert_eq!(v["next"]["state"], "complete", "{v}");
    let ready = steps(&v, "published");
    let ready: Vec<&&Value> = ready
        .iter()
        .filter(|s| s["event"] == "insights_ready")
        .collect();
    assert_eq!(ready.len(), 1, "{v}");
    assert_eq!(
        ready[0]["detail"], "finbox timed_out, credeau timed_out",
        "{v}"
    );
    // Found in the partition the producer chose.
    assert_eq!(ready[0]["partition"], partition_of(&slow), "{v}");
    assert!(
        text.contains("insights_ready: finbox timed_out, credeau timed_out"),
        "{text}"
    );

    // Complete, with both providers' events; the SMS event only by its
    // counts.
    let (text, v) = journey(&env, &done);
    assert_eq!(v["next"]["state"], "complete", "{v}");
    let events: Vec<&str> = steps(&v, "published")
        .iter()
        .map(|s| s["event"].as_str().unwrap())
        .collect();
    for e in ["finbox_predictors", "sms_extraction", "insights_ready"] {
        assert!(events.contains(&e), "{e} missing: {v}");
    }
    assert!(
        text.contains("sms_extraction: part 1 of 1, 30 SMS in all"),
        "{text}"
    );
    let outcomes = steps(&v, "provider_outcome");
    assert!(
        outcomes
            .iter()
            .any(|s| s["provider"] == "finbox" && s["result"] == "complete, 5 items")
            || text.contains("finbox complete"),
        "{v}"
    );
    let bodies = sms_bodies(&base, "sim-client", "sim-token", &done).await;
    assert!(bodies.len() >= 10, "only {} SMS bodies", bodies.len());
    let json_text = v.to_string();
    for b in &bodies {
        assert!(
            !text.contains(b.as_str()) && !json_text.contains(b.as_str()),
            "SMS body printed: {b:?}"
        );
    }

    // Credeau's answers dead-lettered (their SMS bodies never shown).
    let (text, v) = journey(&env, &cut);
    let dead = steps(&v, "dead_letter");
    assert!(
        dead.iter().any(|s| s["stage"] == "poll_credeau"
            && s["reason"] == "exhausted"
            && s["http_status"] == "200"),
        "{v}"
    );
    assert!(
        text.contains("dead letter stage poll_credeau, reason exhausted, credeau, HTTP 200"),
        "{text}"
    );
    assert!(
        steps(&v, "provider_outcome")
            .iter()
            .any(|s| s["provider"] == "credeau"
                && s["result"] == "error invalid_body, asked again later"
                && s["http_status"] == 200),
        "{v}"
    );
    sim_admin(
        &base,
        "/admin/scenarios",
        &json!({"default": {"credeau": {"sms_count": 30}}}),
    )
    .await;
    for b in sms_bodies(&base, "sim-client", "sim-token", &cut).await {
        assert!(
            !text.contains(b.as_str()) && !v.to_string().contains(b.as_str()),
            "SMS body printed: {b:?}"
        );
    }

    // The onboarding event itself dead-lettered: nothing scheduled.
    let (text, v) = journey(&env, &poison);
    assert_eq!(v["next"]["state"], "dead_lettered", "{v}");
    assert_eq!(steps(&v, "dead_letter")[0]["stage"], "decode", "{v}");
    assert!(
        text.contains("dead-lettered before any poll was scheduled"),
        "{text}"
    );

    // Never seen, and not seen in a window that ends before everything.
    let nobody = format!("nobody-{}", unique("u"));
    let (text, v) = journey(&env, &nobody);
    assert_eq!(v["found"], false);
    assert_eq!(v["next"]["state"], "not_found");
    assert!(
        text.contains(&format!(
            "not found: no record of user {nobody} in the service's topics since "
        )),
        "{text}"
    );
    let later = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    let text = user_cli(&env, &[&done, "--since", &later]);
    assert!(text.contains("not found:"), "{text}");
    drop(service);
    let _ = sim.shutdown().await;
}

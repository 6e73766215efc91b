//! A decision engine in another language reads every output: the service
//! publishes Avro (Confluent wire format, schemas registered in the registry
//! stand-in), and tests/python/decision_engine.py reads each output topic
//! with confluent-kafka's own AvroDeserializer, read_committed, checking
//! every field of every record against schemas/*.avsc.

mod common;

use std::process::Command;

use common::*;
use insights_enricher::simulator::{self, SimulatorConfig};
use serde_json::{json, Value};

/// Users by prefix: what FinBox and Credeau do for them, and the outcomes
/// their combined event must carry.
fn scenarios() -> Value {
    json!({
        "default": {},
        "prefixes": {
            // 3000 SMS of about 800 bytes do not fit one 1 MiB record: parts.
            "big-": {"finbox": {"predictors": 40}, "credeau": {"sms_count": 3000}},
            "nodata-": {"finbox": {"outcome": "no_data"}, "credeau": {"sms_count": 0}},
            // Credeau answers 5xx until its deadline: outcome failed, with
            // the error fields of the result set.
            "fail-": {"credeau": {"sms_count": 3, "faults": {"server_error_ratio": 1.0}}}
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_avro_consumer_reads_every_output_record_with_every_field_typed_as_the_schema_says(
) {
    let registry = Registry::start();
    let sim = simulator::spawn(SimulatorConfig::default())
        .await
        .expect("simulator");
    let r = reqwest::Client::new()
        .put(format!("{}/admin/scenarios", sim.base_url()))
        .json(&scenarios())
        .send()
        .await
        .expect("admin");
    assert!(r.status().is_success(), "{}", r.status());

    let topics = Topics::new("xlang");
    create_topic(&topics.input, 3).await;
    let dir = tempfile::tempdir().unwrap();
    let mut env = service_env(&topics, &unique("g"), &sim.base_url());
    let kv = |k: &str, v: &str| (k.to_string(), v.to_string());
    env.extend([
        kv("INSIGHTS__ENCODING__OUTPUT", "avro"),
        kv("INSIGHTS__ENCODING__SCHEMA_REGISTRY_URL", &registry.url),
        kv("INSIGHTS__TOPICS__MAX_MESSAGE_BYTES", "1048576"),
        // "nodata-" users: Credeau never has data; do not wait 20 s for it.
        kv("INSIGHTS__CREDEAU__DEADLINE", "8s"),
    ]);
    let service = Service::start(&env, &dir.path().join("service.log"));

    let p = producer();
    let prefixes = ["ok-", "ok-", "big-", "nodata-", "fail-"];
    let mut users = Vec::new();
    for (i, prefix) in prefixes.iter().enumerate() {
        let user = format!("{prefix}{i}-{}", unique("u"));
        produce(
            &p,
            &topics.input,
            Some(user.as_bytes()),
            Some(&onboarded_json(&format!("ev-{user}"), &user)),
        )
        .await;
        users.push(user);
    }
    let has_sms = |u: &&String| !u.starts_with("nodata-") && !u.starts_with("fail-");
    let has_predictors = |u: &&String| !u.starts_with("nodata-");
    let with_sms = users.iter().filter(has_sms).count();
    let with_predictors = users.iter().filter(has_predictors).count();

    let out = Command::new(python())
        .arg(repo_root().join("tests/python/decision_engine.py"))
        .args(["--bootstrap", &bootstrap(), "--registry", &registry.url])
        .args(["--finbox-topic", &topics.finbox])
        .args(["--sms-topic", &topics.sms])
        .args(["--combined-topic", &topics.combined])
        .args(["--min-combined", &users.len().to_string()])
        .args(["--min-finbox", &with_predictors.to_string()])
        // At least one part per user with SMS; exact parts checked below.
        .args(["--min-sms", &with_sms.to_string()])
        .output()
        .expect("run decision_engine.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let report: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "decision engine printed no report ({e}): {stdout}\n{stderr}\nlog:\n{}",
            service.log_text()
        )
    });
    assert!(
        out.status.success() && report["errors"].as_array().is_some_and(Vec::is_empty),
        "decision engine found errors: {}\n{stderr}",
        serde_json::to_string_pretty(&report["errors"]).unwrap()
    );

    // The checks were not vacuous: the unions were seen with values, not
    // only nulls, and every enum branch the scenarios lead to appeared.
    let branches = &report["branches"];
    let saw = |path: &str, kind: &str| {
        branches[path]
            .as_array()
            .is_some_and(|a| a.iter().any(|k| k == kind))
    };
    for (path, kind) in [
        ("$.predictors[].value", "long"),
        ("$.predictors[].value", "double"),
        ("$.predictors[].value", "string"),
        ("$.predictors[].value", "boolean"),
        ("$.predictors[].value", "null"),
        ("$.request_id", "string"),
        ("$.date_processed_at", "timestamp-millis"),
        ("$.entries[].sms_body", "string"),
        ("$.entries[].extra", "nonempty map"),
        ("$.finbox.first_poll_at", "timestamp-millis"),
        ("$.credeau.error_kind", "string"),
        ("$.credeau.http_status", "int"),
        ("$.credeau.error_message", "string"),
        ("$.credeau.items", "int"),
        ("$.replay_of", "null"),
    ] {
        assert!(saw(path, kind), "no {kind} seen at {path}: {branches}");
    }
    let mut outcomes: Vec<(String, String, String)> = report["outcomes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            (
                o[0].as_str().unwrap().to_string(),
                o[1].as_str().unwrap().to_string(),
                o[2].as_str().unwrap().to_string(),
            )
        })
        .collect();
    outcomes.sort();
    let mut want: Vec<(String, String, String)> = users
        .iter()
        .map(|u| {
            let (f, c) = if u.starts_with("nodata-") {
                ("no_data", "timed_out")
            } else if u.starts_with("fail-") {
                ("complete", "failed")
            } else {
                ("complete", "complete")
            };
            (u.clone(), f.to_string(), c.to_string())
        })
        .collect();
    want.sort();
    assert_eq!(outcomes, want);

    // Exactly one FinBox record per user with data, and each SMS extraction
    // whole: parts 1..=parts once each; the 3000-SMS one in several parts.
    let mut finbox_users: Vec<&str> = report["finbox_users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u.as_str().unwrap())
        .collect();
    finbox_users.sort_unstable();
    let mut want_finbox: Vec<&str> = users
        .iter()
        .filter(has_predictors)
        .map(String::as_str)
        .collect();
    want_finbox.sort_unstable();
    assert_eq!(finbox_users, want_finbox);
    let parts = report["sms_parts"].as_array().unwrap();
    let sms_users: std::collections::BTreeSet<&str> =
        parts.iter().map(|p| p[0].as_str().unwrap()).collect();
    let want_sms: std::collections::BTreeSet<&str> =
        users.iter().filter(has_sms).map(String::as_str).collect();
    assert_eq!(sms_users, want_sms);
    for u in &want_sms {
        let mut mine: Vec<(u64, u64)> = parts
            .iter()
            .filter(|p| p[0] == *u)
            .map(|p| (p[1].as_u64().unwrap(), p[2].as_u64().unwrap()))
            .collect();
        mine.sort_unstable();
        let n = mine.len() as u64;
        let want: Vec<(u64, u64)> = (1..=n).map(|i| (i, n)).collect();
        assert_eq!(mine, want, "SMS parts of {u}");
        if u.starts_with("big-") {
            assert!(n > 1, "3000 SMS fit one 1 MiB record?");
        }
    }
    let _ = sim.shutdown().await;
}

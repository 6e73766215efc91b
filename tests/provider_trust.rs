//! Provider answers a lender can trust, end to end over real HTTP against
//! the simulator (its scripted answers) but without Kafka: the pipeline's
//! worker (real clients, real JSON encoder, the pure core) processes a
//! user's onboarding event and each due task record it wrote. Covers the
//! identity check, the lenient reading of non-standard JSON, outcomes that
//! say what happened, and the answer's envelope.

mod common;
mod providers_support;

use std::sync::Arc;

use insights_enricher::config::OutputEncoding;
use insights_enricher::events::OutputEncoder;
use insights_enricher::metrics::Metrics;
use insights_enricher::pipeline::record::{Job, OutKind, OutRecord, SourceKind};
use insights_enricher::pipeline::worker::{now_ms, Worker};
use insights_enricher::simulator::{
    CredeauScenario, Faults, FinboxScenario, ScriptedAnswer, UserScenario,
};
use insights_enricher::task::Task;
use providers_support::*;
use serde_json::{json, Value};

/// An onboarding event an hour old, so both first polls are due at once.
fn onboarded(user: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "user_id": user,
        "event_id": format!("ev-{user}"),
        "onboarded_at": now_ms() - 3_600_000,
    }))
    .unwrap()
}

#[derive(Default)]
struct Run {
    outputs: Vec<OutRecord>,
    tasks: Vec<Task>,
}

impl Run {
    fn of(&self, kind: OutKind) -> Vec<Value> {
        self.outputs
            .iter()
            .filter(|o| o.kind == kind)
            .map(|o| serde_json::from_slice(o.value.as_deref().unwrap()).unwrap())
            .collect()
    }

    fn ready(&self) -> Value {
        let mut all = self.of(OutKind::InsightsReady);
        assert_eq!(all.len(), 1, "one InsightsReady");
        all.remove(0)
    }

    fn dead_letters(&self) -> Vec<&OutRecord> {
        self.outputs
            .iter()
            .filter(|o| o.kind == OutKind::DeadLetter)
            .collect()
    }
}

fn header<'a>(rec: &'a OutRecord, name: &str) -> Option<&'a str> {
    rec.headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| std::str::from_utf8(v).unwrap())
}

/// Processes the event, then the task it wrote (made due at once) again
/// and again, for at most `rounds` rounds or until the task ends.
async fn run(w: &Worker, user: &str, rounds: usize) -> Run {
    let mut out = Run::default();
    let mut job = Job::Input(record(SourceKind::Input, onboarded(user)));
    for _ in 0..rounds {
        let processed = w
            .process(
                job,
                insights_enricher::providers::budget::RecordClock::new(),
            )
            .await
            .expect("no transient failure");
        let mut next = None;
        for o in processed.outputs {
            match o.kind {
                OutKind::Delay(_) => {
                    next = Some(Task::decode(o.value.as_deref().unwrap()).unwrap())
                }
                _ => out.outputs.push(o),
            }
        }
        let Some(mut task) = next else { break };
        out.tasks.push(task.clone());
        let now = now_ms();
        for t in [&mut task.finbox, &mut task.credeau] {
            if !t.is_done() {
                t.next_poll_at = now;
            }
        }
        task.refresh_due();
        job = Job::Due(record(SourceKind::Tier(0), task.encode()), task);
    }
    out
}

fn scripted(status: u16, body: &str) -> Faults {
    Faults {
        scripted: Some(ScriptedAnswer {
            status,
            body: body.to_string(),
            ..ScriptedAnswer::default()
        }),
        ..Faults::default()
    }
}

fn finbox_says(status: u16, body: &str) -> UserScenario {
    UserScenario {
        finbox: Some(FinboxScenario {
            faults: scripted(status, body),
            ..FinboxScenario::default()
        }),
        credeau: None,
    }
}

fn credeau_says(status: u16, body: &str) -> UserScenario {
    UserScenario {
        finbox: None,
        credeau: Some(CredeauScenario {
            faults: scripted(status, body),
            ..CredeauScenario::default()
        }),
    }
}

fn finbox_bytes(status: u16, bytes: &[u8]) -> UserScenario {
    use base64::Engine as _;
    UserScenario {
        finbox: Some(FinboxScenario {
            faults: Faults {
                scripted: Some(ScriptedAnswer {
                    status,
                    body_base64: Some(base64::engine::general_purpose::STANDARD.encode(bytes)),
                    ..ScriptedAnswer::default()
                }),
                ..Faults::default()
            },
            ..FinboxScenario::default()
        }),
        credeau: None,
    }
}

fn counter(which: &prometheus::IntCounterVec, provider: &str) -> u64 {
    which.with_label_values(&[provider]).get()
}

// ---- 3. Identity is checked

#[tokio::test]
async fn a_finbox_complete_about_another_customer_is_failed_identity_mismatch_never_published() {
    let body = r#"{"customer_id": "someone-else", "request_id": "rq-77", "status": "complete",
        "message": "data processed successfully", "data": [{"name": "risk_band", "value": "A"}]}"#;
    let sim = simulator(&[
        ("u-mixup", finbox_says(200, body)),
        (
            "u-padded",
            finbox_says(
                200,
                r#"{"customer_id": " u-padded ", "status": "complete", "data": [{"name": "a", "value": 1}]}"#,
            ),
        ),
    ])
    .await;
    let s = settings(&sim.base_url());
    let metrics = Arc::new(Metrics::new());
    let w = worker(&s, metrics.clone()).await;

    let r = run(&w, "u-mixup", 5).await;
    assert!(
        r.of(OutKind::FinboxPredictors).is_empty(),
        "another customer's predictors are never published as this user's"
    );
    let f = &r.ready()["finbox"];
    assert_eq!(f["outcome"], "failed");
    assert_eq!(f["error_kind"], "identity_mismatch");
    assert_eq!(
        f["answered_id"], "someone-else",
        "the echo is kept for audit"
    );
    assert_eq!(f["provider_request_id"], "rq-77");
    assert_eq!(f["items"], Value::Null);
    let msg = f["error_message"].as_str().unwrap();
    assert!(
        msg.contains("\"u-mixup\"") && msg.contains("\"someone-else\""),
        "{msg}"
    );
    // Not retried: FinBox answers the same way again.
    assert_eq!(seen(&sim, "u-mixup", "finbox").await.len(), 1);
    let dls = r.dead_letters();
    assert_eq!(dls.len(), 1);
    assert_eq!(header(dls[0], "dlq.error.class"), Some("identity_mismatch"));
    assert_eq!(header(dls[0], "dlq.stage"), Some("poll_finbox"));
    assert_eq!(header(dls[0], "dlq.user_id"), Some("u-mixup"));
    assert_eq!(
        header(dls[0], "dlq.provider.answered_id"),
        Some("someone-else")
    );
    assert_eq!(counter(&metrics.provider_identity_mismatch, "finbox"), 1);

    // Whitespace around the echo is not another customer; the echo is kept.
    let r = run(&w, "u-padded", 5).await;
    let ev = &r.of(OutKind::FinboxPredictors)[0];
    assert_eq!(ev["answered_customer_id"], " u-padded ");
    assert_eq!(r.ready()["finbox"]["outcome"], "complete");
    assert!(r.dead_letters().is_empty());
}

#[tokio::test]
async fn credeau_entries_of_another_user_fail_identity_mismatch_and_no_sms_is_published() {
    let body = r#"{"extracted_sms_data": [
        {"_id": "1", "user_id": "{id}", "sms_id": "1", "sms_body": "mine"},
        {"_id": "2", "user_id": "intruder-9", "sms_id": "2", "sms_body": "not mine"},
        {"_id": "3", "sms_id": "3", "sms_body": "no user_id"}]}"#;
    let sim = simulator(&[
        ("u-mixed", credeau_says(200, body)),
        (
            "u-own",
            credeau_says(
                200,
                r#"{"extracted_sms_data": [{"_id": "1", "user_id": "{id}", "sms_body": "x"}]}"#,
            ),
        ),
    ])
    .await;
    let s = settings(&sim.base_url());
    let metrics = Arc::new(Metrics::new());
    let w = worker(&s, metrics.clone()).await;

    let r = run(&w, "u-mixed", 5).await;
    assert!(r.of(OutKind::SmsExtraction).is_empty());
    let c = &r.ready()["credeau"];
    assert_eq!(c["outcome"], "failed");
    assert_eq!(c["error_kind"], "identity_mismatch");
    assert_eq!(c["answered_id"], "intruder-9");
    let msg = c["error_message"].as_str().unwrap();
    assert!(msg.contains("1 of 3 SMS entries"), "{msg}");
    assert!(!msg.contains("not mine"), "no SMS text in errors: {msg}");
    assert_eq!(seen(&sim, "u-mixed", "credeau").await.len(), 1);
    let dls = r.dead_letters();
    assert_eq!(dls.len(), 1);
    assert_eq!(header(dls[0], "dlq.error.class"), Some("identity_mismatch"));
    assert_eq!(
        header(dls[0], "dlq.provider.answered_id"),
        Some("intruder-9")
    );
    assert_eq!(counter(&metrics.provider_identity_mismatch, "credeau"), 1);

    let r = run(&w, "u-own", 5).await;
    assert_eq!(r.of(OutKind::SmsExtraction).len(), 1);
    assert_eq!(r.ready()["credeau"]["outcome"], "complete");
}

// ---- 2. Non-standard JSON is read, not retried

#[tokio::test]
async fn finbox_answers_with_nan_infinity_huge_numbers_lone_surrogates_and_a_bom_are_read_at_once()
{
    let body = "\u{feff}{\"customer_id\": \"{id}\", \"status\": \"complete\", \"data\": [\
        {\"name\": \"ratio\", \"value\": NaN}, {\"name\": \"max\", \"value\": Infinity},\
        {\"name\": \"min\", \"value\": -Infinity}, {\"name\": \"big\", \"value\": 1e400},\
        {\"name\": \"label\", \"value\": \"caf\\ud83d\"}, {\"name\": \"ok\", \"value\": 7}]}";
    let sim = simulator(&[("u-nan", finbox_says(200, body))]).await;
    let s = settings(&sim.base_url());
    let metrics = Arc::new(Metrics::new());
    let w = worker(&s, metrics.clone()).await;
    let r = run(&w, "u-nan", 5).await;
    assert_eq!(seen(&sim, "u-nan", "finbox").await.len(), 1, "not retried");
    let ev = &r.of(OutKind::FinboxPredictors)[0];
    let values: Vec<(&str, &Value)> = ev["predictors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["name"].as_str().unwrap(), &p["value"]))
        .collect();
    assert_eq!(
        values,
        vec![
            ("ratio", &Value::Null),
            ("max", &Value::Null),
            ("min", &Value::Null),
            ("big", &json!("1e400")),
            ("label", &json!("caf\u{fffd}")),
            ("ok", &json!(7)),
        ]
    );
    let problem = ev["data_problem"].as_str().unwrap();
    for part in [
        "byte-order mark",
        "3 non-finite numbers (NaN, Infinity, -Infinity) read as null",
        "1 number beyond double range kept as text",
        "1 lone UTF-16 surrogate escape read as U+FFFD",
    ] {
        assert!(problem.contains(part), "{part:?} in {problem}");
    }
    let data: Value = serde_json::from_str(ev["data_json"].as_str().unwrap())
        .expect("data_json is standard JSON");
    assert_eq!(data.as_array().unwrap().len(), 6);
    let ready = r.ready();
    assert_eq!(ready["finbox"]["outcome"], "complete");
    assert_eq!(ready["finbox"]["data_problem"], problem);
    assert_eq!(counter(&metrics.provider_unexpected_data, "finbox"), 1);
}

#[tokio::test]
async fn credeau_answers_with_nan_and_a_bom_are_published_with_the_repair_named() {
    let body = "\u{feff}{\"extracted_sms_data\": [{\"_id\": \"1\", \"sms_body\": \"x\", \"transaction\": NaN}]}";
    let sim = simulator(&[("u-cnan", credeau_says(200, body))]).await;
    let s = settings(&sim.base_url());
    let w = worker(&s, Arc::new(Metrics::new())).await;
    let r = run(&w, "u-cnan", 5).await;
    assert_eq!(
        seen(&sim, "u-cnan", "credeau").await.len(),
        1,
        "not retried"
    );
    let sms = &r.of(OutKind::SmsExtraction)[0];
    assert_eq!(sms["entries"][0]["transaction"], Value::Null);
    let problem = sms["data_problem"].as_str().unwrap();
    assert!(
        problem.contains("byte-order mark") && problem.contains("NaN"),
        "{problem}"
    );
    assert_eq!(r.ready()["credeau"]["data_problem"], problem);
}

#[tokio::test]
async fn a_body_that_really_is_unreadable_says_why() {
    let gzip = [0x1f, 0x8b, 0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x03];
    let sim = simulator(&[
        (
            "u-latin1",
            finbox_bytes(200, b"{\"status\": \"complete\", \"message\": \"caf\xe9\"}"),
        ),
        ("u-gzip", finbox_bytes(200, &gzip)),
    ])
    .await;
    let s = settings(&sim.base_url());
    let w = worker(&s, Arc::new(Metrics::new())).await;
    for (user, why) in [
        ("u-latin1", "invalid UTF-8 at byte 38"),
        ("u-gzip", "gzip body not decodable"),
    ] {
        let r = run(&w, user, 1).await;
        let err = &r.tasks[0].finbox.last_error.as_ref().unwrap().message;
        assert!(err.contains(why), "{user}: {err}");
    }
}

// ---- 5. Outcomes say what happened

#[tokio::test]
async fn finbox_data_that_cannot_be_read_reaches_the_combined_event_not_as_an_empty_list() {
    let sim = simulator(&[
        (
            "u-empty-obj",
            finbox_says(200, r#"{"status": "complete", "data": {}}"#),
        ),
        (
            "u-twice",
            finbox_says(
                200,
                r#"{"status": "complete", "data": "[{\"name\": \"a\", \"value\": 1}, {\"name\": \"b\", \"value\": \"x\"}]"}"#,
            ),
        ),
        ("u-real-empty", finbox_says(200, r#"{"status": "complete", "data": []}"#)),
    ])
    .await;
    let s = settings(&sim.base_url());
    let w = worker(&s, Arc::new(Metrics::new())).await;

    let r = run(&w, "u-empty-obj", 5).await;
    let f = &r.ready()["finbox"];
    assert_eq!(
        (f["outcome"].as_str(), f["items"].as_i64()),
        (Some("complete"), Some(0))
    );
    assert!(
        f["data_problem"].as_str().unwrap().contains("empty object"),
        "{f}"
    );

    let r = run(&w, "u-twice", 5).await;
    let ev = &r.of(OutKind::FinboxPredictors)[0];
    assert_eq!(ev["predictors"][1]["value"], "x", "decoded");
    let f = &r.ready()["finbox"];
    assert_eq!(f["items"], 2);
    assert!(f["data_problem"]
        .as_str()
        .unwrap()
        .contains("encoded twice"));

    let r = run(&w, "u-real-empty", 5).await;
    let f = &r.ready()["finbox"];
    assert_eq!(f["items"], 0);
    assert_eq!(f["data_problem"], Value::Null, "a real empty list");
}

#[tokio::test]
async fn finbox_status_error_with_200_and_a_401_detail_keep_their_messages() {
    let sim = simulator(&[
        (
            "u-200-error",
            finbox_says(
                200,
                r#"{"status": "error", "message": "Featurization failed for this device", "request_id": "rq-e"}"#,
            ),
        ),
        (
            "u-401",
            finbox_says(401, r#"{"detail": "Invalid API key for this environment"}"#),
        ),
    ])
    .await;
    let s = settings(&sim.base_url());
    let w = worker(&s, Arc::new(Metrics::new())).await;

    let r = run(&w, "u-200-error", 10).await;
    let f = &r.ready()["finbox"];
    assert_eq!(f["outcome"], "failed");
    assert_eq!(f["error_kind"], "server_error");
    assert!(
        f["error_message"]
            .as_str()
            .unwrap()
            .contains("Featurization failed for this device"),
        "{f}"
    );
    assert_eq!(f["provider_request_id"], "rq-e");

    let r = run(&w, "u-401", 5).await;
    let f = &r.ready()["finbox"];
    assert_eq!(f["error_kind"], "unauthorized");
    assert_eq!(f["error_message"], "Invalid API key for this environment");
}

// ---- 4. Nothing the provider said is dropped

#[tokio::test]
async fn finbox_keys_outside_the_document_and_the_version_answered_are_kept() {
    let body = r#"{"customer_id": "{id}", "status": "complete", "version": 9, "score": 712,
        "model_version": "m-2024.1", "meta": {"region": "in"}, "data": [{"name": "a", "value": 1}]}"#;
    let sim = simulator(&[("u-env", finbox_says(200, body))]).await;
    let s = settings(&sim.base_url());
    let w = worker(&s, Arc::new(Metrics::new())).await;
    let r = run(&w, "u-env", 5).await;
    let ev = &r.of(OutKind::FinboxPredictors)[0];
    assert_eq!(ev["version"], s.finbox.predictors_version);
    assert_eq!(ev["answered_version"], 9);
    let envelope: Value = serde_json::from_str(ev["response_json"].as_str().unwrap()).unwrap();
    assert_eq!(
        envelope,
        json!({"version": 9, "score": 712, "model_version": "m-2024.1", "meta": {"region": "in"}})
    );
    assert_eq!(ev["data_problem"], Value::Null);
}

#[tokio::test]
async fn a_credeau_answer_that_says_it_holds_more_is_a_flagged_outcome() {
    let sim = simulator(&[
        (
            "u-more",
            credeau_says(
                200,
                r#"{"extracted_sms_data": [{"_id": "1", "sms_body": "x"}], "has_more": true,
                    "next_cursor": "c-2", "total": 40}"#,
            ),
        ),
        (
            "u-all",
            credeau_says(
                200,
                r#"{"extracted_sms_data": [{"_id": "1", "sms_body": "x"}], "has_more": false, "total": 1}"#,
            ),
        ),
    ])
    .await;
    let s = settings(&sim.base_url());
    let metrics = Arc::new(Metrics::new());
    let w = worker(&s, metrics.clone()).await;

    let r = run(&w, "u-more", 5).await;
    let sms = &r.of(OutKind::SmsExtraction)[0];
    let envelope: Value = serde_json::from_str(sms["response_json"].as_str().unwrap()).unwrap();
    assert_eq!(
        envelope,
        json!({"has_more": true, "next_cursor": "c-2", "total": 40})
    );
    let c = &r.ready()["credeau"];
    assert_eq!(c["outcome"], "complete");
    assert_eq!(c["partial"], true);
    let problem = c["data_problem"].as_str().unwrap();
    assert!(
        problem.contains("has_more: true")
            && problem.contains("a next_cursor")
            && problem.contains("total 40"),
        "{problem}"
    );
    assert_eq!(counter(&metrics.provider_partial_answers, "credeau"), 1);

    let r = run(&w, "u-all", 5).await;
    let c = &r.ready()["credeau"];
    assert_eq!(c["partial"], false);
    assert_eq!(c["data_problem"], Value::Null);
}

// ---- 6. Retry-After is never shortened

#[tokio::test]
async fn a_long_retry_after_is_honoured_at_the_poll_level_beyond_the_spacing_cap() {
    let limited = |secs| Faults {
        rate_limit_first: 1000,
        retry_after_secs: Some(secs),
        ..Faults::default()
    };
    let sim = simulator(&[
        (
            "u-wait70",
            UserScenario {
                finbox: Some(FinboxScenario {
                    faults: limited(70),
                    ..FinboxScenario::default()
                }),
                credeau: Some(CredeauScenario {
                    faults: limited(40),
                    ..CredeauScenario::default()
                }),
            },
        ),
        (
            "u-wait500",
            UserScenario {
                finbox: Some(FinboxScenario {
                    faults: limited(500),
                    ..FinboxScenario::default()
                }),
                credeau: None,
            },
        ),
    ])
    .await;
    let mut s = settings(&sim.base_url());
    // The spacing caps of config/local.toml, the retry caps of the defaults.
    s.finbox.poll.max_poll_interval = std::time::Duration::from_secs(20);
    s.credeau.poll.max_poll_interval = std::time::Duration::from_secs(15);
    s.finbox.retry_max_wait = std::time::Duration::from_secs(60);
    s.credeau.retry_cap = std::time::Duration::from_secs(60);
    let w = worker(&s, Arc::new(Metrics::new())).await;

    let before = now_ms();
    let r = run(&w, "u-wait70", 1).await;
    let after = now_ms();
    let t = &r.tasks[0];
    assert_eq!(t.finbox.last_error.as_ref().unwrap().http_status, Some(429));
    // FinBox asked 70 s: honoured up to finbox.retry_max_wait (60 s), not
    // cut to max_poll_interval (20 s).
    let fb = t.finbox.next_poll_at;
    assert!(
        fb >= before + 60_000 && fb <= after + 60_000,
        "next FinBox poll {} ms after the call",
        fb - before
    );
    // Credeau asked 40 s: honoured in full, not cut to 15 s.
    let cr = t.credeau.next_poll_at;
    assert!(
        cr >= before + 40_000 && cr <= after + 40_000,
        "next Credeau poll {} ms after the call",
        cr - before
    );

    // A wait beyond the retry cap is honoured up to the cap.
    let before = now_ms();
    let r = run(&w, "u-wait500", 1).await;
    let fb = r.tasks[0].finbox.next_poll_at;
    assert!(
        fb >= before + 60_000 && fb <= now_ms() + 60_000,
        "{} ms",
        fb - before
    );
}

// ---- 1. Avro output never loses an extraction to one value

#[tokio::test]
async fn in_avro_an_sms_entry_with_a_lone_surrogate_and_a_huge_number_is_published_not_dead_lettered(
) {
    let registry = Arc::new(common::FakeRegistry::default());
    let url = registry.serve().await;
    let client =
        Arc::new(insights_enricher::events::RegistryClient::new(&format!("{url}/")).unwrap());
    let body = r#"{"extracted_sms_data": [
        {"_id": "1", "user_id": "{id}", "sms_id": "1", "sms_body": "paid \ud83d", "transaction": 1e400},
        {"_id": "2", "user_id": "{id}", "sms_id": "2", "sms_body": "plain", "transaction": 80.0}]}"#;
    let sim = simulator(&[("u-avro-odd", credeau_says(200, body))]).await;
    let s = settings(&sim.base_url());
    let mut w = worker(&s, Arc::new(Metrics::new())).await;
    w.encoder = Arc::new(
        OutputEncoder::new(OutputEncoding::Avro, Some(client.clone()), &s.topics)
            .await
            .unwrap(),
    );
    let r = run(&w, "u-avro-odd", 5).await;
    assert!(r.dead_letters().is_empty(), "nothing dead-lettered");
    let sms: Vec<&OutRecord> = r
        .outputs
        .iter()
        .filter(|o| o.kind == OutKind::SmsExtraction)
        .collect();
    assert_eq!(sms.len(), 1);
    let sms = avro_value(&client, sms[0]).await;
    assert_eq!(field(&sms, "total_sms"), &Av::Int(2));
    let ready = r
        .outputs
        .iter()
        .find(|o| o.kind == OutKind::InsightsReady)
        .unwrap();
    let ready = avro_value(&client, ready).await;
    let credeau = field(&ready, "credeau");
    assert_eq!(field(credeau, "outcome"), &Av::Enum(0, "complete".into()));
    assert_eq!(field(credeau, "items"), &Av::Int(2));
}

use apache_avro::types::Value as Av;

/// A Confluent-framed output value, decoded with the schema its id names.
async fn avro_value(client: &insights_enricher::events::RegistryClient, rec: &OutRecord) -> Av {
    let value = rec.value.as_deref().unwrap();
    let id = u32::from_be_bytes(value[1..5].try_into().unwrap());
    let schema = client.schema_by_id(id).await.unwrap();
    apache_avro::from_avro_datum(&schema, &mut &value[5..], None).unwrap()
}

fn field<'a>(v: &'a Av, name: &str) -> &'a Av {
    let Av::Record(fields) = v else {
        panic!("not a record: {v:?}")
    };
    match &fields.iter().find(|(n, _)| n == name).unwrap().1 {
        Av::Union(_, inner) => inner,
        v => v,
    }
}

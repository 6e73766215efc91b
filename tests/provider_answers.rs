//! What the service makes of the providers' answers, end to end over real
//! HTTP against the simulator but without Kafka: the pipeline's worker (real
//! clients, real JSON encoder, the pure core) processes a user's onboarding
//! event and then each due task record it wrote, and the records it would
//! produce are checked. Covers the tolerant reading of FinBox `data`, the
//! fields that used to be dropped, the retry budget, the per-provider id
//! rules and the error-field rule of `InsightsReady`.

mod providers_support;

use std::sync::Arc;

use insights_enricher::config::Settings;
use insights_enricher::metrics::Metrics;
use insights_enricher::pipeline::record::{Job, OutKind, OutRecord, SourceKind};
use insights_enricher::pipeline::worker::{now_ms, Worker};
use insights_enricher::simulator::{
    CredeauScenario, Faults, FinboxDataShape, FinboxOutcome, FinboxScenario, RunningSimulator,
    UserScenario,
};
use insights_enricher::task::Task;
use providers_support::*;
use serde_json::{json, Value};

/// An onboarding event an hour old, so both first polls are due at once.
fn onboarded(event: Value) -> Vec<u8> {
    let mut event = event;
    let user: String = event["user_id"]
        .as_str()
        .unwrap_or("x")
        .chars()
        .take(20)
        .collect();
    event["event_id"] = json!(format!("ev-{user}"));
    event["onboarded_at"] = json!(now_ms() - 3_600_000);
    serde_json::to_vec(&event).unwrap()
}

/// What one user's records led to, round by round.
#[derive(Default)]
struct Run {
    /// Every produced record except task records, in order.
    outputs: Vec<OutRecord>,
    /// The task as written after each round.
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
async fn run(w: &Worker, event: Vec<u8>, rounds: usize) -> Run {
    let mut out = Run::default();
    let mut job = Job::Input(record(SourceKind::Input, event));
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
        // Skip the wait: whatever is pending is due now.
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

fn fb(s: FinboxScenario) -> UserScenario {
    UserScenario {
        finbox: Some(s),
        credeau: None,
    }
}

async fn setup(users: &[(&str, UserScenario)]) -> (RunningSimulator, Settings) {
    let sim = simulator(users).await;
    let s = settings(&sim.base_url());
    (sim, s)
}

fn is_hex32(v: &Value) -> bool {
    v.as_str()
        .is_some_and(|s| s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[tokio::test]
async fn a_complete_answer_of_another_data_shape_is_published_at_once_with_its_raw_data() {
    let (sim, s) = setup(&[
        (
            "u-object",
            fb(FinboxScenario {
                predictors: 6,
                data_shape: FinboxDataShape::Object,
                ..FinboxScenario::default()
            }),
        ),
        (
            "u-unnamed",
            fb(FinboxScenario {
                predictors: 4,
                data_shape: FinboxDataShape::ListWithoutNames,
                ..FinboxScenario::default()
            }),
        ),
    ])
    .await;
    let metrics = Arc::new(Metrics::new());
    let w = worker(&s, metrics.clone()).await;

    let object = run(&w, onboarded(json!({"user_id": "u-object"})), 5).await;
    let ev = &object.of(OutKind::FinboxPredictors)[0];
    assert_eq!(ev["predictors"].as_array().unwrap().len(), 6);
    assert!(ev["data_problem"].as_str().unwrap().contains("object"));
    let raw: Value = serde_json::from_str(ev["data_json"].as_str().unwrap()).unwrap();
    assert!(
        raw.is_object() && raw.as_object().unwrap().len() == 6,
        "{raw}"
    );
    for p in ev["predictors"].as_array().unwrap() {
        let name = p["name"].as_str().unwrap();
        let expected = &raw[name];
        let got = &p["value"];
        assert!(
            got == expected || got.as_f64() == expected.as_f64(),
            "{name}: {got} vs {expected}"
        );
    }
    // Not retried: one poll, one request, final at once.
    assert_eq!(seen(&sim, "u-object", "finbox").await.len(), 1);
    let ready = object.ready();
    assert_eq!(ready["finbox"]["outcome"], "complete");
    assert_eq!(ready["finbox"]["polls"], 1);
    assert_eq!(ready["finbox"]["items"], 6);

    let unnamed = run(&w, onboarded(json!({"user_id": "u-unnamed"})), 5).await;
    let ev = &unnamed.of(OutKind::FinboxPredictors)[0];
    assert_eq!(ev["predictors"].as_array().unwrap().len(), 1);
    assert_eq!(
        ev["data_problem"],
        "3 of 4 `data` entries are not objects with a string `name` (the first is data[1]); they are only in data_json"
    );
    let raw: Value = serde_json::from_str(ev["data_json"].as_str().unwrap()).unwrap();
    assert_eq!(raw.as_array().unwrap().len(), 4);
    assert_eq!(raw[0]["name"], ev["predictors"][0]["name"]);
    assert_eq!(seen(&sim, "u-unnamed", "finbox").await.len(), 1);
    assert!(unnamed.dead_letters().is_empty());

    assert_eq!(
        metrics
            .provider_unexpected_data
            .with_label_values(&["finbox"])
            .get(),
        2
    );
}

#[tokio::test]
async fn the_predictors_event_carries_version_message_entry_extras_and_the_exact_data() {
    let (sim, mut s) = setup(&[(
        "u-extras",
        fb(FinboxScenario {
            predictors: 3,
            data_shape: FinboxDataShape::ListWithExtras,
            ..FinboxScenario::default()
        }),
    )])
    .await;
    s.finbox.predictors_version = 7;
    let metrics = Arc::new(Metrics::new());
    let w = worker(&s, metrics.clone()).await;
    let r = run(&w, onboarded(json!({"user_id": "u-extras"})), 5).await;
    let ev = &r.of(OutKind::FinboxPredictors)[0];
    assert_eq!(ev["version"], 7);
    assert_eq!(ev["message"], "data processed successfully");
    assert_eq!(ev["data_problem"], Value::Null);
    let first = &ev["predictors"][0];
    // The simulator echoes the version it was asked for in each entry.
    assert_eq!(first["extra"]["version"], "7");
    assert!(first["extra"]["type"].is_string(), "{first}");
    assert!(first["extra"]["description"]
        .as_str()
        .unwrap()
        .contains("(simulated)"));
    // data_json is FinBox's text as sent: every entry with every key.
    let raw: Value = serde_json::from_str(ev["data_json"].as_str().unwrap()).unwrap();
    assert_eq!(raw.as_array().unwrap().len(), 3);
    assert_eq!(raw[0]["name"], first["name"]);
    assert_eq!(raw[0]["version"], 7);
    assert!(is_hex32(&ev["request_id"]));
    assert_eq!(ev["request_id"], r.ready()["finbox"]["request_id"]);
    assert_eq!(
        metrics
            .provider_unexpected_data
            .with_label_values(&["finbox"])
            .get(),
        0
    );
    drop(sim);
}

#[tokio::test]
async fn request_ids_of_in_progress_not_found_and_no_data_answers_are_kept() {
    let (_sim, s) = setup(&[
        (
            "u-slow",
            fb(FinboxScenario {
                ready_after: std::time::Duration::from_secs(3600),
                ..FinboxScenario::default()
            }),
        ),
        (
            "u-nodata",
            fb(FinboxScenario {
                outcome: FinboxOutcome::NoData,
                ..FinboxScenario::default()
            }),
        ),
    ])
    .await;
    let w = worker(&s, Arc::new(Metrics::new())).await;
    let slow = run(&w, onboarded(json!({"user_id": "u-slow"})), 2).await;
    // in_progress: the id is on the task record, so it reaches the combined
    // event whenever the provider ends.
    let ids: Vec<Value> = slow
        .tasks
        .iter()
        .map(|t| json!(t.finbox.request_id))
        .collect();
    assert_eq!(ids.len(), 2);
    assert!(ids.iter().all(is_hex32), "{ids:?}");
    assert_ne!(ids[0], ids[1], "each poll's own id");

    let nodata = run(&w, onboarded(json!({"user_id": "u-nodata"})), 5).await;
    let ready = nodata.ready();
    assert_eq!(ready["finbox"]["outcome"], "no_data");
    assert!(is_hex32(&ready["finbox"]["request_id"]), "{ready}");
    assert_eq!(ready["credeau"]["request_id"], Value::Null);

    // not_found, once the grace period is over.
    let sim2 = simulator(&[(
        "u-unknown",
        fb(FinboxScenario {
            outcome: FinboxOutcome::NotFound,
            ..FinboxScenario::default()
        }),
    )])
    .await;
    let mut s2 = settings(&sim2.base_url());
    s2.finbox.not_found_grace = std::time::Duration::ZERO;
    let w2 = worker(&s2, Arc::new(Metrics::new())).await;
    let unknown = run(&w2, onboarded(json!({"user_id": "u-unknown"})), 5).await;
    let ready = unknown.ready();
    assert_eq!(ready["finbox"]["outcome"], "not_found");
    assert!(is_hex32(&ready["finbox"]["request_id"]), "{ready}");
}

#[tokio::test]
async fn the_sms_event_says_which_threshold_was_applied() {
    let (_sim, mut s) = setup(&[(
        "u-many",
        UserScenario {
            finbox: None,
            credeau: Some(CredeauScenario {
                sms_count: 30,
                ..CredeauScenario::default()
            }),
        },
    )])
    .await;
    s.credeau.cnt_sms_threshold = 12;
    let w = worker(&s, Arc::new(Metrics::new())).await;
    let r = run(&w, onboarded(json!({"user_id": "u-many"})), 5).await;
    let sms = &r.of(OutKind::SmsExtraction)[0];
    assert_eq!(sms["total_sms"], 12);
    assert_eq!(sms["cnt_sms_threshold"], 12);
    assert_eq!(r.ready()["credeau"]["items"], 12);
}

#[tokio::test]
async fn finbox_ends_failed_after_the_failed_poll_budget_and_is_dead_lettered_with_the_last_error()
{
    let storm = fb(FinboxScenario {
        faults: Faults {
            server_error_first: 1000,
            ..Faults::default()
        },
        ..FinboxScenario::default()
    });
    let (sim, s) = setup(&[("u-down", storm.clone()), ("u-down-nobudget", storm)]).await;
    assert_eq!(s.finbox.poll.max_failed_polls, 3, "the documented default");
    let w = worker(&s, Arc::new(Metrics::new())).await;
    let r = run(&w, onboarded(json!({"user_id": "u-down"})), 10).await;
    let ready = r.ready();
    let f = &ready["finbox"];
    assert_eq!(f["outcome"], "failed");
    assert_eq!(f["polls"], 3);
    assert_eq!(f["error_kind"], "server_error");
    assert_eq!(f["http_status"], 503);
    assert!(f["error_message"]
        .as_str()
        .unwrap()
        .contains("contact support"));
    // Three polls of three requests each (two documented retries apiece).
    assert_eq!(seen(&sim, "u-down", "finbox").await.len(), 9);
    let dls = r.dead_letters();
    assert_eq!(dls.len(), 1);
    assert_eq!(header(dls[0], "dlq.error.class"), Some("exhausted"));
    assert_eq!(header(dls[0], "dlq.provider"), Some("finbox"));
    assert_eq!(header(dls[0], "dlq.http.status"), Some("503"));
    assert_eq!(header(dls[0], "dlq.attempts"), Some("3"));
    assert!(header(dls[0], "dlq.error.message")
        .unwrap()
        .contains("Internal Server Error"));

    // With the budget off, the same answers keep the user polling.
    let mut unlimited = s.clone();
    unlimited.finbox.poll.max_failed_polls = 0;
    let w = worker(&unlimited, Arc::new(Metrics::new())).await;
    let r = run(&w, onboarded(json!({"user_id": "u-down-nobudget"})), 5).await;
    assert!(r.of(OutKind::InsightsReady).is_empty());
    let last = r.tasks.last().unwrap();
    assert_eq!((last.finbox.polls, last.finbox.failed_polls), (5, 5));
    assert!(!last.finbox.is_done());
}

#[tokio::test]
async fn errors_a_later_answer_overcame_leave_the_combined_event_without_error_fields() {
    // The first poll's three requests fail; the second poll completes.
    let (_sim, s) = setup(&[(
        "u-flaky",
        fb(FinboxScenario {
            faults: Faults {
                server_error_first: 3,
                ..Faults::default()
            },
            ..FinboxScenario::default()
        }),
    )])
    .await;
    let w = worker(&s, Arc::new(Metrics::new())).await;
    let r = run(&w, onboarded(json!({"user_id": "u-flaky"})), 5).await;
    assert_eq!(r.tasks[0].finbox.failed_polls, 1);
    let f = &r.ready()["finbox"];
    assert_eq!(
        (f["outcome"].as_str(), f["polls"].as_i64()),
        (Some("complete"), Some(2))
    );
    for k in [
        "error_kind",
        "http_status",
        "error_message",
        "provider_request_id",
    ] {
        assert_eq!(f[k], Value::Null, "{k} on a complete result");
    }
    assert!(r.dead_letters().is_empty());
}

#[tokio::test]
async fn provider_ids_are_checked_by_each_providers_own_rule() {
    let long_finbox = format!("FB-{}", "7".repeat(257));
    assert_eq!(long_finbox.len(), 260);
    let (sim, s) = setup(&[]).await;
    let w = worker(&s, Arc::new(Metrics::new())).await;

    // 260 characters reach FinBox; Credeau gets its own short id.
    let r = run(
        &w,
        onboarded(json!({"user_id": long_finbox, "credeau_user_id": "c-7"})),
        5,
    )
    .await;
    assert!(r.dead_letters().is_empty());
    assert_eq!(
        r.of(OutKind::FinboxPredictors)[0]["finbox_customer_id"],
        long_finbox.as_str()
    );
    assert_eq!(seen(&sim, &long_finbox, "finbox").await.len(), 1);
    assert_eq!(seen(&sim, "c-7", "credeau").await.len(), 1);
    // Non-ASCII is fine for FinBox too.
    let r = run(
        &w,
        onboarded(json!({"user_id": "u-8", "finbox_customer_id": "ग्राहक-8"})),
        5,
    )
    .await;
    assert!(r.dead_letters().is_empty());
    assert_eq!(r.of(OutKind::FinboxPredictors).len(), 1);

    let rejected = |r: &Run| {
        let dls = r.dead_letters();
        assert_eq!(dls.len(), 1);
        assert_eq!(header(dls[0], "dlq.error.class"), Some("invalid_field"));
        header(dls[0], "dlq.error.message").unwrap().to_owned()
    };
    // Without an override, user_id must also suit Credeau.
    let msg = rejected(&run(&w, onboarded(json!({"user_id": "u".repeat(65)})), 1).await);
    assert!(msg.contains("user_id") && msg.contains("Credeau"), "{msg}");
    let msg = rejected(
        &run(
            &w,
            onboarded(json!({"user_id": "u-9", "finbox_customer_id": "F".repeat(261)})),
            1,
        )
        .await,
    );
    assert!(
        msg.contains("finbox_customer_id") && msg.contains("260"),
        "{msg}"
    );
    let msg = rejected(
        &run(
            &w,
            onboarded(json!({"user_id": "u-10", "credeau_user_id": "with space"})),
            1,
        )
        .await,
    );
    assert!(msg.contains("credeau_user_id"), "{msg}");
    let msg = rejected(
        &run(
            &w,
            onboarded(json!({"user_id": "u-11", "finbox_customer_id": "tab\there"})),
            1,
        )
        .await,
    );
    assert!(msg.contains("control character"), "{msg}");
}

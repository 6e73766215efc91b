//! The provider simulator over real sockets: every row of both providers'
//! tables, each fault kind, scenario lookup, the admin API, determinism and
//! rate limiting.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use insights_enricher::providers::salt::finbox_salt;
use insights_enricher::simulator::{
    spawn, CredeauScenario, Faults, FinboxOutcome, FinboxScenario, RunningSimulator, ScenarioSet,
    SimulatorConfig, UserScenario,
};
use reqwest::header::HeaderMap;
use serde_json::{json, Value};

const KEY: &str = "sim-finbox-key";
const HASH: &str = "sim-server-hash";
const CLIENT: &str = "sim-client";
const TOKEN: &str = "sim-token";

struct Answer {
    status: u16,
    headers: HeaderMap,
    text: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text))
    }
}

struct Sim {
    running: RunningSimulator,
    http: reqwest::Client,
}

impl Sim {
    async fn start(config: SimulatorConfig) -> Sim {
        Sim {
            running: spawn(config).await.expect("simulator starts"),
            http: reqwest::Client::new(),
        }
    }

    async fn with(scenarios: ScenarioSet) -> Sim {
        Sim::start(SimulatorConfig {
            scenarios,
            ..SimulatorConfig::default()
        })
        .await
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.running.base_url())
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Answer {
        let resp = req.send().await.expect("request is answered");
        Answer {
            status: resp.status().as_u16(),
            headers: resp.headers().clone(),
            text: resp.text().await.expect("body is complete"),
        }
    }

    async fn finbox_raw(&self, path: &str, key: Option<&str>, body: String) -> Answer {
        let mut req = self
            .http
            .post(self.url(path))
            .header("content-type", "application/json")
            .body(body);
        if let Some(key) = key {
            req = req.header("x-api-key", key);
        }
        self.send(req).await
    }

    async fn finbox(&self, customer_id: &str) -> Answer {
        let body = json!({"customer_id": customer_id, "version": 1, "salt": finbox_salt(customer_id, HASH)});
        self.finbox_raw("/v2/risk/predictors", Some(KEY), body.to_string())
            .await
    }

    async fn credeau_raw(&self, client: Option<&str>, token: Option<&str>, body: String) -> Answer {
        let mut req = self
            .http
            .post(self.url("/api/fetch_extracted_data"))
            .header("content-type", "application/json")
            .body(body);
        if let Some(c) = client {
            req = req.header("x-client-id", c);
        }
        if let Some(t) = token {
            req = req.header("x-auth-token", t);
        }
        self.send(req).await
    }

    async fn credeau(&self, user_id: &str, threshold: Option<i64>) -> Answer {
        let mut body = json!({"user_id": user_id, "client_id": CLIENT});
        if let Some(t) = threshold {
            body["cnt_sms_threshold"] = json!(t);
        }
        self.credeau_raw(Some(CLIENT), Some(TOKEN), body.to_string())
            .await
    }

    async fn admin(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Answer {
        let mut req = self.http.request(method, self.url(path));
        if let Some(b) = body {
            req = req.json(&b);
        }
        self.send(req).await
    }
}

fn finbox_user(s: FinboxScenario) -> UserScenario {
    UserScenario {
        finbox: Some(s),
        credeau: None,
    }
}

fn credeau_user(s: CredeauScenario) -> UserScenario {
    UserScenario {
        finbox: None,
        credeau: Some(s),
    }
}

fn users(entries: Vec<(&str, UserScenario)>) -> ScenarioSet {
    ScenarioSet {
        users: entries
            .into_iter()
            .map(|(u, s)| (u.to_owned(), s))
            .collect(),
        ..ScenarioSet::default()
    }
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn is_hex32(v: &Value) -> bool {
    v.as_str()
        .is_some_and(|s| s.len() == 32 && s.chars().all(|c| c.is_ascii_hexdigit()))
}

/// `YYYY-MM-DDThh:mm:ss:mil`.
fn is_finbox_timestamp(v: &Value) -> bool {
    let Some(s) = v.as_str() else { return false };
    chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S:%3f").is_ok() && s.len() == 23
}

// ---------------------------------------------------------------- FinBox

#[tokio::test]
async fn finbox_complete_carries_predictors_of_mixed_types_and_seed_keys() {
    let sim = Sim::with(ScenarioSet::default()).await;
    let a = sim.finbox("u-complete").await;
    assert_eq!(a.status, 200);
    let v = a.json();
    assert_eq!(v["status"], "complete");
    assert_eq!(v["message"], "data processed successfully");
    assert_eq!(v["customer_id"], "u-complete");
    assert!(is_hex32(&v["request_id"]), "{v}");
    assert!(is_finbox_timestamp(&v["date_requested"]), "{v}");
    assert!(is_finbox_timestamp(&v["date_processed"]), "{v}");
    let data = v["data"].as_array().expect("data is a list");
    assert_eq!(data.len(), 25);
    assert!(data
        .iter()
        .all(|p| p["name"].is_string() && p.get("value").is_some()));
    let values: Vec<&Value> = data.iter().map(|p| &p["value"]).collect();
    assert!(values.iter().any(|v| v.is_number()));
    assert!(values.iter().any(|v| v.is_string()));
    assert!(values.iter().any(|v| v.is_boolean()));
}

#[tokio::test]
async fn finbox_is_in_progress_with_202_until_ready_after_then_complete() {
    let sim = Sim::with(users(vec![(
        "u-late",
        finbox_user(FinboxScenario {
            ready_after: ms(300),
            predictors: 7,
            ..Default::default()
        }),
    )]))
    .await;
    let a = sim.finbox("u-late").await;
    assert_eq!(a.status, 202);
    let v = a.json();
    assert_eq!(v["status"], "in_progress");
    assert_eq!(
        v["message"],
        "Featurization in Progress, please try again in 10 Seconds"
    );
    assert!(
        v.get("data").is_none() && v.get("date_processed").is_none(),
        "{v}"
    );
    tokio::time::sleep(ms(350)).await;
    let done = sim.finbox("u-late").await;
    assert_eq!(done.status, 200);
    assert_eq!(done.json()["data"].as_array().map(Vec::len), Some(7));
}

#[tokio::test]
async fn finbox_no_data_is_200_with_null_data() {
    let sim = Sim::with(users(vec![(
        "u-nd",
        finbox_user(FinboxScenario {
            outcome: FinboxOutcome::NoData,
            ..Default::default()
        }),
    )]))
    .await;
    let a = sim.finbox("u-nd").await;
    assert_eq!(a.status, 200);
    let v = a.json();
    assert_eq!(v["status"], "no_data");
    assert_eq!(v["message"], "No data available for user");
    assert!(v["data"].is_null() && v.as_object().is_some_and(|o| o.contains_key("data")));
    assert!(is_finbox_timestamp(&v["date_processed"]));
}

#[tokio::test]
async fn finbox_not_found_for_a_while_then_in_progress_then_complete() {
    let sim = Sim::with(users(vec![
        (
            "u-sync",
            finbox_user(FinboxScenario {
                not_found_for: ms(200),
                ready_after: ms(400),
                ..Default::default()
            }),
        ),
        (
            "u-never",
            finbox_user(FinboxScenario {
                outcome: FinboxOutcome::NotFound,
                ..Default::default()
            }),
        ),
    ]))
    .await;
    let a = sim.finbox("u-sync").await;
    assert_eq!(a.status, 200);
    let v = a.json();
    assert_eq!(v["status"], "not_found");
    assert_eq!(v["message"], "User not found");
    let o = v.as_object().expect("object");
    assert!(o["date_processed"].is_null() && o["data"].is_null());
    tokio::time::sleep(ms(250)).await;
    assert_eq!(sim.finbox("u-sync").await.status, 202);
    tokio::time::sleep(ms(200)).await;
    assert_eq!(sim.finbox("u-sync").await.json()["status"], "complete");
    for _ in 0..3 {
        assert_eq!(sim.finbox("u-never").await.json()["status"], "not_found");
    }
}

#[tokio::test]
async fn finbox_bad_request_names_the_first_missing_key() {
    let sim = Sim::with(ScenarioSet::default()).await;
    let salt = finbox_salt("u-1", HASH);
    let cases = [
        (
            json!({"customer_id": "u-1", "salt": salt}).to_string(),
            "Missing Key version",
        ),
        (
            json!({"customer_id": "u-1", "version": 1}).to_string(),
            "Missing Key salt",
        ),
        (
            json!({"version": 1, "salt": salt}).to_string(),
            "Missing Key customer_id",
        ),
        ("not json at all".to_owned(), "Missing Key customer_id"),
    ];
    for (body, message) in cases {
        let a = sim.finbox_raw("/v2/risk/predictors", Some(KEY), body).await;
        assert_eq!(a.status, 400, "{}", a.text);
        let v = a.json();
        assert_eq!(v["status"], "error");
        assert_eq!(v["message"], message);
        assert!(is_hex32(&v["request_id"]));
        assert!(is_finbox_timestamp(&v["date_requested"]));
        assert!(v.as_object().is_some_and(|o| o.contains_key("customer_id")));
    }
}

#[tokio::test]
async fn finbox_forbids_wrong_key_wrong_salt_and_blocked_ip_in_that_order() {
    let sim = Sim::with(ScenarioSet::default()).await;
    let good =
        json!({"customer_id": "u-1", "version": 1, "salt": finbox_salt("u-1", HASH)}).to_string();
    let bad_salt = json!({"customer_id": "u-1", "version": 1, "salt": finbox_salt("u-1", "other")})
        .to_string();
    let msg = |a: Answer| {
        (
            a.status,
            a.json()["message"].as_str().unwrap_or("").to_owned(),
        )
    };
    let path = "/v2/risk/predictors";
    assert_eq!(
        msg(sim.finbox_raw(path, Some("wrong"), good.clone()).await),
        (403, "Incorrect API Key".into())
    );
    assert_eq!(
        msg(sim.finbox_raw(path, None, good.clone()).await),
        (403, "Incorrect API Key".into())
    );
    // The key is checked before the body.
    assert_eq!(
        msg(sim.finbox_raw(path, Some("wrong"), "{}".into()).await),
        (403, "Incorrect API Key".into())
    );
    assert_eq!(
        msg(sim.finbox_raw(path, Some(KEY), bad_salt).await),
        (403, "Incorrect salt".into())
    );

    let r = sim
        .admin(
            reqwest::Method::PUT,
            "/admin/credentials",
            Some(json!({"finbox_ip_blocked": true})),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        msg(sim.finbox_raw(path, Some("wrong"), good.clone()).await),
        (403, "IP address not whitelisted".into())
    );
    // The staging endpoint is not IP-whitelisted.
    let staging = sim
        .finbox_raw("/staging/risk/predictors", Some(KEY), good)
        .await;
    assert_eq!(staging.status, 200);
    assert_eq!(staging.json()["status"], "complete");
}

#[tokio::test]
async fn finbox_answers_429_once_its_rate_limit_is_exceeded() {
    let sim = Sim::start(SimulatorConfig {
        finbox_rate_limit_per_minute: 60,
        ..SimulatorConfig::default()
    })
    .await;
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let a = sim.finbox("u-rl").await;
        if a.status == 429 {
            assert_eq!(
                a.json(),
                json!({"status": "error", "message": "Rate limit exceeded"})
            );
        }
        statuses.push(a.status);
    }
    assert_eq!(statuses[0], 200);
    assert!(statuses[1..].iter().all(|s| *s == 429), "{statuses:?}");
}

#[tokio::test]
async fn requests_below_the_rate_limit_are_never_limited() {
    let sim = Sim::with(ScenarioSet::default()).await;
    // Bursts: FinBox 6000/min allows 100 at once, Credeau 1000/min 16.
    for i in 0..90 {
        assert_eq!(sim.finbox(&format!("u-{i}")).await.status, 200);
    }
    for i in 0..15 {
        assert_eq!(sim.credeau(&format!("u-{i}"), None).await.status, 200);
    }
    let stats = sim
        .admin(reqwest::Method::GET, "/admin/stats", None)
        .await
        .json();
    assert_eq!(stats["finbox"]["by_status"], json!({"200": 90}));
    assert_eq!(stats["credeau"]["by_status"], json!({"200": 15}));
}

// ---------------------------------------------------------------- Credeau

#[tokio::test]
async fn credeau_returns_min_of_sms_count_and_threshold_shaped_like_the_document() {
    let sim = Sim::with(users(vec![(
        "u-sms",
        credeau_user(CredeauScenario {
            sms_count: 40,
            ..Default::default()
        }),
    )]))
    .await;
    let a = sim.credeau("u-sms", Some(15)).await;
    assert_eq!(a.status, 200);
    let v = a.json();
    let entries = v["extracted_sms_data"].as_array().expect("array");
    assert_eq!(entries.len(), 15);
    assert_eq!(
        sim.credeau("u-sms", None).await.json()["extracted_sms_data"]
            .as_array()
            .map(Vec::len),
        Some(40)
    );
    assert_eq!(
        sim.credeau("u-sms", Some(500)).await.json()["extracted_sms_data"]
            .as_array()
            .map(Vec::len),
        Some(40)
    );
    for e in entries {
        for key in [
            "_id",
            "user_id",
            "client_id",
            "request_id",
            "sms_id",
            "sms_sender",
            "sms_inbox_date",
            "sms_body",
            "created_at",
            "created_date",
            "is_classified",
            "is_extracted",
            "sender_name",
            "sender_type",
            "sms_nlp_tag",
            "is_transactional",
            "unique_pan_nlp",
            "template_hash",
        ] {
            assert!(e.get(key).is_some(), "{key} missing in {e}");
        }
        assert_eq!(e["user_id"], "u-sms");
        assert_eq!(e["client_id"], CLIENT);
        assert!(is_hex32(&e["request_id"]));
        let len = e["sms_body"].as_str().map_or(0, str::len);
        assert!((100..=260).contains(&len), "body of {len} chars");
    }
    assert!(entries.iter().any(|e| e.get("transaction").is_some()));
    assert!(entries.iter().any(|e| e.get("transaction").is_none()));
}

#[tokio::test]
async fn credeau_is_empty_until_ready_and_for_ever_without_sms() {
    let sim = Sim::with(users(vec![
        (
            "u-wait",
            credeau_user(CredeauScenario {
                ready_after: ms(300),
                ..Default::default()
            }),
        ),
        (
            "u-none",
            credeau_user(CredeauScenario {
                sms_count: 0,
                ..Default::default()
            }),
        ),
    ]))
    .await;
    let empty = sim.credeau("u-wait", Some(5000)).await;
    assert_eq!(empty.status, 200);
    assert_eq!(empty.json(), json!({"extracted_sms_data": []}));
    assert_eq!(
        sim.credeau("u-none", None).await.json(),
        json!({"extracted_sms_data": []})
    );
    tokio::time::sleep(ms(350)).await;
    assert_eq!(
        sim.credeau("u-wait", Some(5000)).await.json()["extracted_sms_data"]
            .as_array()
            .map(Vec::len),
        Some(20)
    );
    assert_eq!(
        sim.credeau("u-none", None).await.json(),
        json!({"extracted_sms_data": []})
    );
}

#[tokio::test]
async fn credeau_serves_5000_sms_of_a_few_megabytes_quickly() {
    let sim = Sim::with(users(vec![(
        "u-big",
        credeau_user(CredeauScenario {
            sms_count: 6000,
            ..Default::default()
        }),
    )]))
    .await;
    let started = Instant::now();
    let a = sim.credeau("u-big", Some(5000)).await;
    let took = started.elapsed();
    assert_eq!(a.status, 200);
    assert_eq!(
        a.json()["extracted_sms_data"].as_array().map(Vec::len),
        Some(5000)
    );
    assert!(
        (2_000_000..10_000_000).contains(&a.text.len()),
        "{} bytes",
        a.text.len()
    );
    assert!(took < Duration::from_secs(3), "took {took:?}");
}

#[tokio::test]
async fn credeau_rejects_wrong_or_missing_credentials_with_a_request_id() {
    let sim = Sim::with(ScenarioSet::default()).await;
    let body = json!({"user_id": "u-1", "client_id": CLIENT}).to_string();
    let mismatched = json!({"user_id": "u-1", "client_id": "someone-else"}).to_string();
    let cases = [
        sim.credeau_raw(Some(CLIENT), Some("wrong"), body.clone())
            .await,
        sim.credeau_raw(Some("other"), Some(TOKEN), body.clone())
            .await,
        sim.credeau_raw(None, None, body).await,
        sim.credeau_raw(Some(CLIENT), Some(TOKEN), mismatched).await,
    ];
    for a in cases {
        assert_eq!(a.status, 401);
        let message = a.json()["error"].as_str().unwrap_or_default().to_owned();
        let id = message
            .strip_prefix("Could not validate credentials. (request_id=")
            .and_then(|rest| rest.split(')').next())
            .map(|id| json!(id));
        assert!(id.as_ref().is_some_and(is_hex32), "{message}");
        assert!(message.ends_with("Please contact us with the request_id for assistance."));
    }
}

#[tokio::test]
async fn credeau_answers_html_403_when_ip_blocked_and_on_wrong_paths() {
    let sim = Sim::with(ScenarioSet::default()).await;
    let html = |a: &Answer| {
        a.status == 403
            && a.text.contains("<center><h1>403 Forbidden</h1></center>")
            && a.headers["content-type"]
                .to_str()
                .is_ok_and(|c| c.starts_with("text/html"))
    };
    for path in [
        "/api/fetch_extracted_data",
        "/v2/risk/predictors",
        "/api/fetch_extracted",
        "/",
    ] {
        let a = sim.send(sim.http.get(sim.url(path))).await;
        assert!(html(&a), "GET {path}: {} {}", a.status, a.text);
    }
    let a = sim
        .send(
            sim.http
                .post(sim.url("/api/fetch_extracted_data/"))
                .body("{}"),
        )
        .await;
    assert!(html(&a));
    sim.admin(
        reqwest::Method::PUT,
        "/admin/credentials",
        Some(json!({"credeau_ip_blocked": true})),
    )
    .await;
    assert!(html(&sim.credeau("u-1", None).await));
    sim.admin(
        reqwest::Method::PUT,
        "/admin/credentials",
        Some(json!({"credeau_ip_blocked": false})),
    )
    .await;
    assert_eq!(sim.credeau("u-1", None).await.status, 200);
}

#[tokio::test]
async fn credeau_validates_the_payload_like_fastapi() {
    let sim = Sim::with(ScenarioSet::default()).await;
    let missing = sim
        .credeau_raw(
            Some(CLIENT),
            Some(TOKEN),
            json!({"client_id": CLIENT, "cnt_sms_threshold": 10}).to_string(),
        )
        .await;
    assert_eq!(missing.status, 422);
    assert_eq!(
        missing.json(),
        json!({"detail": [{"type": "missing", "loc": ["body", "user_id"], "msg": "Field required",
                           "input": {"client_id": CLIENT, "cnt_sms_threshold": 10}}]})
    );
    let no_client = sim
        .credeau_raw(
            Some(CLIENT),
            Some(TOKEN),
            json!({"user_id": "u"}).to_string(),
        )
        .await;
    assert_eq!(no_client.status, 422);
    assert_eq!(
        no_client.json()["detail"][0]["loc"],
        json!(["body", "client_id"])
    );

    let broken = sim
        .credeau_raw(Some(CLIENT), Some(TOKEN), "{\"user_id\": ".into())
        .await;
    assert_eq!(broken.status, 422);
    assert_eq!(broken.json()["detail"][0]["type"], "json_invalid");

    let long = "u".repeat(65);
    let too_long = sim.credeau(&long, None).await;
    assert_eq!(too_long.status, 422);
    let d = &too_long.json()["detail"][0];
    assert_eq!(d["type"], "string_too_long");
    assert_eq!(d["loc"], json!(["body", "user_id"]));
    assert_eq!(sim.credeau(&"u".repeat(64), None).await.status, 200);
}

#[tokio::test]
async fn credeau_answers_429_with_retry_after_once_its_limit_is_exceeded() {
    let sim = Sim::start(SimulatorConfig {
        credeau_rate_limit_per_minute: 60,
        ..SimulatorConfig::default()
    })
    .await;
    let mut limited = 0;
    for _ in 0..5 {
        let a = sim.credeau("u-rl", None).await;
        if a.status == 429 {
            limited += 1;
            assert_eq!(a.json(), json!({"error": "Rate limit exceeded"}));
            let secs: u64 = a.headers["retry-after"]
                .to_str()
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            assert!((1..=1).contains(&secs), "Retry-After {secs}");
        }
    }
    assert_eq!(limited, 4);
}

// ---------------------------------------------------------------- faults

fn faulty(faults: Faults) -> ScenarioSet {
    users(vec![(
        "u-f",
        UserScenario {
            finbox: Some(FinboxScenario {
                faults: faults.clone(),
                ..Default::default()
            }),
            credeau: Some(CredeauScenario {
                faults,
                ..Default::default()
            }),
        },
    )])
}

#[tokio::test]
async fn server_error_first_n_then_normal_answers_with_provider_bodies() {
    let sim = Sim::with(faulty(Faults {
        server_error_first: 2,
        server_error_status: 500,
        ..Faults::default()
    }))
    .await;
    for _ in 0..2 {
        let f = sim.finbox("u-f").await;
        assert_eq!(f.status, 500);
        assert_eq!(f.json()["status"], "error");
        let c = sim.credeau("u-f", None).await;
        assert_eq!(c.status, 500);
    }
    assert_eq!(sim.finbox("u-f").await.status, 200);
    assert_eq!(sim.credeau("u-f", None).await.status, 200);
}

#[tokio::test]
async fn rate_limit_fault_sends_retry_after_when_configured() {
    let sim = Sim::with(faulty(Faults {
        rate_limit_first: 1,
        retry_after_secs: Some(7),
        ..Faults::default()
    }))
    .await;
    let f = sim.finbox("u-f").await;
    assert_eq!(
        (f.status, f.json()["message"].clone()),
        (429, json!("Rate limit exceeded"))
    );
    assert_eq!(f.headers["retry-after"], "7");
    let c = sim.credeau("u-f", None).await;
    assert_eq!(c.status, 429);
    assert_eq!(c.headers["retry-after"], "7");
    assert_eq!(sim.finbox("u-f").await.status, 200);
}

#[tokio::test]
async fn proxy_html_non_json_and_truncated_json_faults_mangle_answers() {
    let sim = Sim::with(faulty(Faults {
        proxy_html_first: 1,
        non_json_first: 2,
        truncated_json_first: 3,
        ..Faults::default()
    }))
    .await;
    let proxy = sim.finbox("u-f").await;
    assert_eq!(proxy.status, 502);
    assert!(
        proxy.text.contains("nginx")
            && proxy.headers["content-type"]
                .to_str()
                .is_ok_and(|c| c.starts_with("text/html"))
    );
    let html = sim.finbox("u-f").await;
    assert_eq!(html.status, 200);
    assert!(html.text.starts_with("<!DOCTYPE html>"));
    let cut = sim.finbox("u-f").await;
    assert_eq!(cut.status, 200);
    assert_eq!(cut.headers["content-type"], "application/json");
    assert!(
        cut.text.starts_with("{\"") && serde_json::from_str::<Value>(&cut.text).is_err(),
        "{}",
        cut.text
    );
    assert_eq!(sim.finbox("u-f").await.json()["status"], "complete");

    assert_eq!(sim.credeau("u-f", None).await.status, 502);
    let c_cut = {
        sim.credeau("u-f", None).await;
        sim.credeau("u-f", None).await
    };
    assert!(serde_json::from_str::<Value>(&c_cut.text).is_err());
}

#[tokio::test]
async fn dropped_connections_fail_the_client_then_recover() {
    let sim = Sim::with(faulty(Faults {
        drop_first: 1,
        ..Faults::default()
    }))
    .await;
    let body = json!({"customer_id": "u-f", "version": 1, "salt": finbox_salt("u-f", HASH)});
    let outcome = match sim
        .http
        .post(sim.url("/v2/risk/predictors"))
        .header("x-api-key", KEY)
        .json(&body)
        .send()
        .await
    {
        Err(_) => Err(()),
        Ok(resp) => resp.bytes().await.map(|_| ()).map_err(|_| ()),
    };
    assert!(outcome.is_err(), "the dropped answer must not complete");
    assert_eq!(sim.finbox("u-f").await.status, 200);
    let stats = sim
        .admin(reqwest::Method::GET, "/admin/stats", None)
        .await
        .json();
    assert_eq!(stats["finbox"]["dropped"], 1);
    let user = sim
        .admin(reqwest::Method::GET, "/admin/users/u-f", None)
        .await
        .json();
    let statuses: Vec<&Value> = user["finbox"]["last_requests"]
        .as_array()
        .map(|l| l.iter().map(|r| &r["status"]).collect())
        .unwrap_or_default();
    assert_eq!(statuses, vec![&json!(0), &json!(200)]);
}

#[tokio::test]
async fn latency_fault_delays_every_answer() {
    let sim = Sim::with(faulty(Faults {
        latency: ms(200),
        ..Faults::default()
    }))
    .await;
    let started = Instant::now();
    assert_eq!(sim.finbox("u-f").await.status, 200);
    assert_eq!(sim.credeau("u-f", None).await.status, 200);
    assert!(started.elapsed() >= ms(400), "{:?}", started.elapsed());
}

#[tokio::test]
async fn a_faulted_first_request_starts_the_ready_clock() {
    let sim = Sim::with(users(vec![(
        "u-f",
        finbox_user(FinboxScenario {
            ready_after: ms(300),
            faults: Faults {
                server_error_first: 1,
                ..Faults::default()
            },
            ..Default::default()
        }),
    )]))
    .await;
    assert_eq!(sim.finbox("u-f").await.status, 503);
    tokio::time::sleep(ms(320)).await;
    assert_eq!(sim.finbox("u-f").await.json()["status"], "complete");
}

// ---------------------------------------------------------------- determinism

async fn fault_pattern(seed: u64) -> (Vec<u16>, Value, Vec<Value>) {
    let scenarios = faulty(Faults {
        server_error_ratio: 0.5,
        ..Faults::default()
    });
    let sim = Sim::start(SimulatorConfig {
        seed,
        scenarios,
        ..SimulatorConfig::default()
    })
    .await;
    let mut statuses = Vec::new();
    for _ in 0..24 {
        statuses.push(sim.finbox("u-f").await.status);
    }
    let predictors = sim.finbox("u-other").await.json()["data"].clone();
    let sms = sim.credeau("u-other", None).await.json()["extracted_sms_data"]
        .as_array()
        .map(|entries| {
            entries
                .iter()
                .map(|e| json!([e["_id"], e["sms_id"], e["sms_body"], e["template_hash"]]))
                .collect()
        })
        .unwrap_or_default();
    (statuses, predictors, sms)
}

#[tokio::test]
async fn the_same_seed_gives_the_same_faults_predictors_and_sms() {
    let a = fault_pattern(7).await;
    let b = fault_pattern(7).await;
    let c = fault_pattern(8).await;
    assert!(a.0.contains(&503) && a.0.contains(&200), "{:?}", a.0);
    assert_eq!(a, b);
    assert_ne!(a.0, c.0);
    assert_ne!(a.1, c.1);
    assert_ne!(a.2, c.2);
}

// ---------------------------------------------------------------- lookup and admin

#[tokio::test]
async fn lookup_prefers_exact_user_then_longest_prefix_then_default() {
    let nd = finbox_user(FinboxScenario {
        outcome: FinboxOutcome::NoData,
        ..Default::default()
    });
    let nf = finbox_user(FinboxScenario {
        outcome: FinboxOutcome::NotFound,
        ..Default::default()
    });
    let mut set = users(vec![(
        "p-long-exact",
        finbox_user(FinboxScenario::default()),
    )]);
    set.default = UserScenario {
        finbox: Some(FinboxScenario {
            ready_after: Duration::from_secs(3600),
            ..Default::default()
        }),
        credeau: None,
    };
    set.prefixes.insert("p-".into(), nd);
    set.prefixes.insert("p-long-".into(), nf);
    let sim = Sim::with(set).await;
    let status = |a: Answer| a.json()["status"].as_str().unwrap_or_default().to_owned();
    assert_eq!(status(sim.finbox("x-1").await), "in_progress");
    assert_eq!(status(sim.finbox("p-1").await), "no_data");
    assert_eq!(status(sim.finbox("p-long-1").await), "not_found");
    assert_eq!(status(sim.finbox("p-long-exact").await), "complete");
}

#[tokio::test]
async fn admin_replaces_and_merges_scenarios_and_rejects_invalid_ones() {
    let sim = Sim::with(ScenarioSet::default()).await;
    let put = sim
        .admin(
            reqwest::Method::PUT,
            "/admin/scenarios",
            Some(json!({
                "prefixes": {"nd-": {"finbox": {"outcome": "no_data"}}},
                "users": {"u-a": {"finbox": {"outcome": "not_found"}}}
            })),
        )
        .await;
    assert_eq!(
        (put.status, put.json()),
        (200, json!({"users": 1, "prefixes": 1}))
    );
    let merged = sim
        .admin(
            reqwest::Method::POST,
            "/admin/scenarios",
            Some(json!({
                "users": {"u-b": {"finbox": {"ready_after": "1h"}}}
            })),
        )
        .await;
    assert_eq!(merged.json(), json!({"users": 2, "prefixes": 1}));
    assert_eq!(sim.finbox("u-a").await.json()["status"], "not_found");
    assert_eq!(sim.finbox("u-b").await.status, 202);
    assert_eq!(sim.finbox("nd-1").await.json()["status"], "no_data");
    let replaced = sim
        .admin(
            reqwest::Method::PUT,
            "/admin/scenarios",
            Some(json!({"users": {"u-b": {}}})),
        )
        .await;
    assert_eq!(replaced.json(), json!({"users": 1, "prefixes": 0}));
    assert_eq!(sim.finbox("u-a").await.json()["status"], "complete");
    assert_eq!(sim.finbox("nd-1").await.json()["status"], "complete");
    let invalid = sim
        .admin(
            reqwest::Method::PUT,
            "/admin/scenarios",
            Some(json!({"default": {"credeau": {"faults": {"drop_ratio": 2.0}}}})),
        )
        .await;
    assert_eq!(invalid.status, 400);
    assert!(invalid.json()["error"]
        .as_str()
        .is_some_and(|e| e.contains("drop_ratio")));
    let typo = sim
        .admin(
            reqwest::Method::POST,
            "/admin/scenarios",
            Some(json!({"user": {}})),
        )
        .await;
    assert_eq!(typo.status, 400);
}

#[tokio::test]
async fn admin_fixes_credentials_at_run_time() {
    let sim = Sim::start(SimulatorConfig {
        credentials: insights_enricher::simulator::Credentials {
            finbox_api_key: "other-key".into(),
            credeau_auth_token: "other-token".into(),
            ..Default::default()
        },
        ..SimulatorConfig::default()
    })
    .await;
    assert_eq!(sim.finbox("u-1").await.status, 403);
    assert_eq!(sim.credeau("u-1", None).await.status, 401);
    let r = sim
        .admin(
            reqwest::Method::PUT,
            "/admin/credentials",
            Some(json!({"finbox_api_key": KEY, "credeau_auth_token": TOKEN})),
        )
        .await;
    assert_eq!(r.status, 200);
    assert!(
        !r.text.contains(KEY) && !r.text.contains(TOKEN),
        "secrets echoed: {}",
        r.text
    );
    assert_eq!(sim.finbox("u-1").await.status, 200);
    assert_eq!(sim.credeau("u-1", None).await.status, 200);
    sim.admin(
        reqwest::Method::PUT,
        "/admin/credentials",
        Some(json!({"finbox_server_hash": "new-hash"})),
    )
    .await;
    assert_eq!(sim.finbox("u-1").await.json()["message"], "Incorrect salt");
}

#[tokio::test]
async fn admin_limits_stats_users_reset_and_health() {
    let sim = Sim::with(users(vec![(
        "u-1",
        finbox_user(FinboxScenario {
            ready_after: Duration::from_secs(3600),
            ..Default::default()
        }),
    )]))
    .await;
    assert_eq!(
        sim.admin(reqwest::Method::GET, "/healthz", None)
            .await
            .status,
        200
    );
    let limits = sim
        .admin(
            reqwest::Method::PUT,
            "/admin/limits",
            Some(json!({"credeau_per_minute": 60})),
        )
        .await;
    assert_eq!(
        limits.json(),
        json!({"finbox_per_minute": 6000, "credeau_per_minute": 60})
    );
    assert_eq!(sim.credeau("u-1", None).await.status, 200);
    assert_eq!(sim.credeau("u-1", None).await.status, 429);
    sim.finbox("u-1").await;
    sim.finbox("u-1").await;
    sim.finbox_raw("/v2/risk/predictors", Some("bad"), "{}".into())
        .await;
    sim.send(sim.http.get(sim.url("/nowhere"))).await;

    let stats = sim
        .admin(reqwest::Method::GET, "/admin/stats", None)
        .await
        .json();
    assert_eq!(stats["finbox"]["requests"], 3);
    assert_eq!(stats["finbox"]["by_status"], json!({"202": 2, "403": 1}));
    assert_eq!(stats["credeau"]["by_status"], json!({"200": 1, "429": 1}));
    assert_eq!(stats["other"]["requests"], 1);
    assert_eq!(stats["users"], 1);

    let user = sim
        .admin(reqwest::Method::GET, "/admin/users/u-1", None)
        .await;
    assert_eq!(user.status, 200);
    let u = user.json();
    assert_eq!(u["finbox"]["requests"], 2);
    // The globally rate-limited request never reached the user's scenario.
    assert_eq!(u["credeau"]["requests"], 1);
    let first = u["finbox"]["first_contact"].as_u64().unwrap_or(0);
    let log = u["finbox"]["last_requests"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(log.len(), 2);
    assert!(log
        .iter()
        .all(|r| r["status"] == 202 && r["at_ms"].as_u64().unwrap_or(0) >= first));
    assert_eq!(
        sim.admin(reqwest::Method::GET, "/admin/users/nobody", None)
            .await
            .status,
        404
    );

    assert_eq!(
        sim.admin(reqwest::Method::POST, "/admin/reset", None)
            .await
            .status,
        200
    );
    let stats: HashMap<String, Value> = serde_json::from_value(
        sim.admin(reqwest::Method::GET, "/admin/stats", None)
            .await
            .json(),
    )
    .unwrap_or_default();
    assert_eq!(stats["users"], 0);
    assert_eq!(stats["finbox"]["requests"], 0);
    assert_eq!(
        sim.admin(reqwest::Method::GET, "/admin/users/u-1", None)
            .await
            .status,
        404
    );
    // Scenarios survive a reset.
    assert_eq!(sim.finbox("u-1").await.status, 202);
}

#[tokio::test]
async fn shutdown_stops_the_listener() {
    let sim = Sim::with(ScenarioSet::default()).await;
    let url = sim.url("/healthz");
    assert_eq!(sim.send(sim.http.get(&url)).await.status, 200);
    let Sim { running, .. } = sim;
    running.shutdown().await.expect("clean shutdown");
    assert!(reqwest::Client::new().get(&url).send().await.is_err());
}

#[test]
fn example_scenario_files_load_and_validate() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/scenarios");
    let mut loaded = 0;
    for entry in std::fs::read_dir(dir).expect("examples/scenarios exists") {
        let path = entry.expect("readable entry").path();
        if path.extension().is_some_and(|e| e == "json") {
            insights_enricher::simulator::load_scenarios(&path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            loaded += 1;
        }
    }
    assert!(loaded >= 3, "only {loaded} example files");
}

#[tokio::test]
async fn the_simulate_command_serves_the_scenario_file_it_is_given() {
    let file =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/scenarios/mixed.json");
    let expected = serde_json::to_value(
        insights_enricher::simulator::load_scenarios(&file).expect("mixed.json loads"),
    )
    .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_insights-enricher"))
        .args([
            "simulate",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--scenarios",
        ])
        .arg(&file)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn simulate");
    let base = format!("http://127.0.0.1:{port}");
    let until = Instant::now() + Duration::from_secs(30);
    let served = loop {
        if let Ok(r) = reqwest::get(format!("{base}/admin/scenarios")).await {
            break r.json::<Value>().await.expect("scenarios JSON");
        }
        assert!(Instant::now() < until, "simulate never answered on {base}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // A "fast-" user is complete at once; the default waits 20 s.
    let ask = |user: &str| {
        let body = json!({
            "customer_id": user,
            "version": 1,
            "salt": finbox_salt(user, "sim-server-hash"),
        });
        reqwest::Client::new()
            .post(format!("{base}/v2/risk/predictors"))
            .header("x-api-key", "sim-finbox-key")
            .json(&body)
            .send()
    };
    let fast = ask("fast-1").await.expect("finbox answers");
    let slow = ask("someone-1").await.expect("finbox answers");
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(served, expected);
    assert_eq!(fast.status(), 200);
    assert_eq!(fast.json::<Value>().await.unwrap()["status"], "complete");
    assert_eq!(slow.status(), 202);
}

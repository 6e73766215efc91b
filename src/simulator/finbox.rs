//! FinBox's Insights API (`POST /v2/risk/predictors`, and the staging path):
//! the gatekeeping in FinBox's order (IP whitelist, API key, body keys,
//! salt, rate limit), then the user's scenario: faults first, then
//! `not_found` / `in_progress` / `complete` / `no_data` by elapsed time.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use rand::Rng as _;
use serde::Serialize;
use serde_json::{json, Value};

use super::faults::{self, Dice};
use super::respond::{self, finbox_timestamp};
use super::scenario::{FinboxDataShape, FinboxOutcome, FinboxScenario};
use super::stats::Channel;
use super::users::Ticket;
use super::{Gate, Sim};
use crate::providers::Provider;

const IN_PROGRESS_MESSAGE: &str = "Featurization in Progress, please try again in 10 Seconds";
const SERVER_ERROR_MESSAGE: &str =
    "Internal Server Error. Please retry. If issue persists, please contact support";

/// `POST /v2/risk/predictors`: IP-whitelisted.
pub async fn production(State(sim): State<Arc<Sim>>, headers: HeaderMap, body: Bytes) -> Response {
    handle(sim, true, headers, body).await
}

/// `POST /staging/risk/predictors`: the development endpoint, which FinBox
/// does not IP-whitelist.
pub async fn staging(State(sim): State<Arc<Sim>>, headers: HeaderMap, body: Bytes) -> Response {
    handle(sim, false, headers, body).await
}

/// A FinBox answer, keys in the document's order. The outer `Option` of
/// `date_processed`/`data` says whether the key is present at all (the
/// document's examples leave them out in some cases and null them in others).
#[derive(Serialize)]
struct FinboxBody<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    customer_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    request_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    date_requested: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    date_processed: Option<Option<String>>,
    status: &'a str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<Option<Value>>,
}

#[derive(Serialize)]
struct BadRequestBody<'a> {
    customer_id: Option<&'a str>,
    request_id: String,
    date_requested: String,
    status: &'static str,
    message: String,
}

fn body_response(status: StatusCode, body: &FinboxBody<'_>) -> Response {
    respond::json_bytes(status, serde_json::to_vec(body).unwrap_or_default())
}

fn error(status: StatusCode, message: &str) -> Response {
    body_response(
        status,
        &FinboxBody {
            customer_id: None,
            request_id: None,
            date_requested: None,
            date_processed: None,
            status: "error",
            message,
            data: None,
        },
    )
}

/// A request that passed every check.
struct Accepted {
    customer_id: String,
    version: i64,
}

async fn handle(sim: Arc<Sim>, whitelisted: bool, headers: HeaderMap, body: Bytes) -> Response {
    let now = sim.clock.now_ms();
    match gatekeep(&sim, whitelisted, &headers, &body, now) {
        Gate::Pass(accepted) => serve(sim, accepted, now).await,
        Gate::Answer(resp) => sim.finish(Channel::Finbox, resp),
    }
}

fn gatekeep(
    sim: &Sim,
    whitelisted: bool,
    headers: &HeaderMap,
    body: &[u8],
    now: u64,
) -> Gate<Accepted> {
    let server_hash = {
        let creds = sim.credentials();
        if whitelisted && creds.finbox_ip_blocked {
            return Gate::Answer(error(StatusCode::FORBIDDEN, "IP address not whitelisted"));
        }
        let key = headers.get("x-api-key").map(|v| v.as_bytes());
        if key != Some(creds.finbox_api_key.as_bytes()) {
            return Gate::Answer(error(StatusCode::FORBIDDEN, "Incorrect API Key"));
        }
        creds.finbox_server_hash.clone()
    };
    let parsed: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let customer_id = parsed.get("customer_id").and_then(Value::as_str);
    let bad_request = |message: String| {
        // The seed's 400 example always carries customer_id (null when absent).
        let body = BadRequestBody {
            customer_id,
            request_id: uuid::Uuid::new_v4().simple().to_string(),
            date_requested: finbox_timestamp(now),
            status: "error",
            message,
        };
        respond::json_bytes(
            StatusCode::BAD_REQUEST,
            serde_json::to_vec(&body).unwrap_or_default(),
        )
    };
    for key in ["customer_id", "version", "salt"] {
        if parsed.get(key).is_none_or(Value::is_null) {
            return Gate::Answer(bad_request(format!("Missing Key {key}")));
        }
    }
    let (Some(customer_id), Some(version), Some(salt)) = (
        customer_id,
        parsed.get("version").and_then(Value::as_i64),
        parsed.get("salt").and_then(Value::as_str),
    ) else {
        let key = if customer_id.is_none() {
            "customer_id"
        } else if parsed.get("version").and_then(Value::as_i64).is_none() {
            "version"
        } else {
            "salt"
        };
        return Gate::Answer(bad_request(format!("Invalid value for Key {key}")));
    };
    if salt != crate::providers::salt::finbox_salt(customer_id, &server_hash) {
        return Gate::Answer(error(StatusCode::FORBIDDEN, "Incorrect salt"));
    }
    if sim.finbox_limit.check().is_err() {
        return Gate::Answer(error(StatusCode::TOO_MANY_REQUESTS, "Rate limit exceeded"));
    }
    Gate::Pass(Accepted {
        customer_id: customer_id.to_owned(),
        version,
    })
}

async fn serve(sim: Arc<Sim>, req: Accepted, now: u64) -> Response {
    let scenario = sim
        .scenarios()
        .lookup(&req.customer_id)
        .finbox
        .clone()
        .unwrap_or_default();
    let ticket = sim.users.begin(Provider::Finbox, &req.customer_id, now);
    let mut dice = Dice::new(
        sim.seed,
        "request",
        Provider::Finbox,
        &req.customer_id,
        ticket.number.into(),
    );
    let fault = faults::decide(&scenario.faults, ticket.number, &mut dice);
    let scripted = scenario
        .faults
        .scripted
        .as_ref()
        .filter(|s| s.applies(ticket.number));
    let request_id = dice.hex_id(16);
    let (status, body) = answer(&sim, &scenario, &req, ticket, now, &request_id);
    if !scenario.faults.latency.is_zero() {
        tokio::time::sleep(scenario.faults.latency).await;
    }
    let resp = match (fault, scripted) {
        (None, Some(answer)) => respond::scripted(answer, &req.customer_id),
        (None, None) => respond::shaped_json(status, body, &scenario.faults),
        (Some(fault), _) => respond::render_fault(
            fault,
            body,
            |status| error(status, SERVER_ERROR_MESSAGE),
            |retry_after| {
                respond::with_retry_after(
                    error(StatusCode::TOO_MANY_REQUESTS, "Rate limit exceeded"),
                    retry_after,
                )
            },
        ),
    };
    sim.record(Provider::Finbox, &req.customer_id, &resp);
    sim.finish(Channel::Finbox, resp)
}

/// The answer the user's state gives, before faults.
fn answer(
    sim: &Sim,
    scenario: &FinboxScenario,
    req: &Accepted,
    ticket: Ticket,
    now: u64,
    request_id: &str,
) -> (StatusCode, Vec<u8>) {
    let elapsed = now.saturating_sub(ticket.first_contact_ms);
    let ready_at = ticket
        .first_contact_ms
        .saturating_add(u64::try_from(scenario.ready_after.as_millis()).unwrap_or(u64::MAX));
    let not_found_until = u64::try_from(scenario.not_found_for.as_millis()).unwrap_or(u64::MAX);
    let cid = req.customer_id.as_str();
    let date_requested = finbox_timestamp(now);
    let mut body = FinboxBody {
        customer_id: Some(cid),
        request_id: Some(request_id.to_owned()),
        date_requested: Some(date_requested),
        date_processed: None,
        status: "complete",
        message: "data processed successfully",
        data: None,
    };
    let status = if scenario.outcome == FinboxOutcome::NotFound || elapsed < not_found_until {
        body.date_processed = Some(None);
        body.status = "not_found";
        body.message = "User not found";
        body.data = Some(None);
        StatusCode::OK
    } else if now < ready_at {
        body.status = "in_progress";
        body.message = IN_PROGRESS_MESSAGE;
        StatusCode::ACCEPTED
    } else if scenario.outcome == FinboxOutcome::NoData {
        body.date_processed = Some(Some(finbox_timestamp(ready_at)));
        body.status = "no_data";
        body.message = "No data available for user";
        body.data = Some(None);
        StatusCode::OK
    } else {
        body.date_processed = Some(Some(finbox_timestamp(ready_at)));
        body.data = Some(Some(shaped(
            predictors(sim.seed, cid, req.version, scenario.predictors),
            scenario.data_shape,
            req.version,
        )));
        StatusCode::OK
    };
    // Plain strings and JSON values: serialization cannot fail.
    (status, serde_json::to_vec(&body).unwrap_or_default())
}

/// What a predictor's value looks like.
#[derive(Clone, Copy)]
enum Kind {
    Count,
    Ratio,
    Amount,
    Flag,
    Label(&'static [&'static str]),
}

const PREDICTORS: &[(&str, Kind)] = &[
    ("cnt_sms_bank_30d", Kind::Count),
    ("cnt_debit_txn_30d", Kind::Count),
    ("cnt_credit_txn_30d", Kind::Count),
    ("avg_monthly_credit_amt_90d", Kind::Amount),
    ("avg_monthly_debit_amt_90d", Kind::Amount),
    ("latest_account_balance", Kind::Amount),
    ("salary_amount_latest", Kind::Amount),
    ("is_salaried", Kind::Flag),
    ("has_credit_card", Kind::Flag),
    ("cnt_loan_apps_installed", Kind::Count),
    ("cnt_emi_bounce_180d", Kind::Count),
    ("ratio_debit_credit_90d", Kind::Ratio),
    ("device_age_days", Kind::Count),
    (
        "device_manufacturer",
        Kind::Label(&["samsung", "xiaomi", "vivo", "oppo", "realme", "oneplus"]),
    ),
    ("os_version", Kind::Label(&["11", "12", "13", "14"])),
    ("is_rooted", Kind::Flag),
    ("cnt_contacts", Kind::Count),
    (
        "location_tier",
        Kind::Label(&["tier_1", "tier_2", "tier_3"]),
    ),
    ("cnt_upi_txn_30d", Kind::Count),
    ("max_credit_amt_90d", Kind::Amount),
    ("cnt_overdue_reminders_90d", Kind::Count),
    ("ratio_night_txn_90d", Kind::Ratio),
    ("has_loan_overdue", Kind::Flag),
    ("cnt_distinct_banks", Kind::Count),
    ("risk_band", Kind::Label(&["A", "B", "C", "D", "E"])),
];

/// The documented predictor list laid out as `shape` says.
pub fn shaped(list: Vec<Value>, shape: FinboxDataShape, version: i64) -> Value {
    match shape {
        FinboxDataShape::List => Value::Array(list),
        FinboxDataShape::ListWithExtras => Value::Array(
            list.into_iter()
                .map(|mut p| {
                    let kind = match &p["value"] {
                        Value::Bool(_) => "flag",
                        Value::Number(_) => "number",
                        Value::String(_) => "label",
                        _ => "unknown",
                    };
                    if let Value::Object(o) = &mut p {
                        o.insert("type".into(), json!(kind));
                        o.insert(
                            "description".into(),
                            json!(format!("{} (simulated)", o["name"].as_str().unwrap_or("?"))),
                        );
                        o.insert("version".into(), json!(version));
                    }
                    p
                })
                .collect(),
        ),
        FinboxDataShape::Object => Value::Object(
            list.into_iter()
                .filter_map(|p| match p {
                    Value::Object(mut o) => {
                        let name = o.remove("name")?.as_str()?.to_owned();
                        Some((name, o.remove("value").unwrap_or(Value::Null)))
                    }
                    _ => None,
                })
                .collect(),
        ),
        FinboxDataShape::ListWithoutNames => Value::Array(
            list.into_iter()
                .enumerate()
                .map(|(i, p)| match p {
                    // The first entry keeps the documented form.
                    Value::Object(mut o) if i > 0 => {
                        if let Some(name) = o.remove("name") {
                            o.insert("key".into(), name);
                        }
                        Value::Object(o)
                    }
                    other => other,
                })
                .collect(),
        ),
    }
}

/// `count` predictors, deterministic per (seed, user, version); about one in
/// ten values is null, as real featurization leaves gaps.
pub fn predictors(seed: u64, customer_id: &str, version: i64, count: u32) -> Vec<Value> {
    let mut dice = Dice::new(
        seed,
        "predictors",
        Provider::Finbox,
        customer_id,
        version.unsigned_abs(),
    );
    let rng = dice.rng();
    (0..count as usize)
        .map(|i| {
            let (base, kind) = PREDICTORS[i % PREDICTORS.len()];
            let name = if i < PREDICTORS.len() {
                base.to_owned()
            } else {
                format!("{base}_v{}", i / PREDICTORS.len() + 1)
            };
            let value = if rng.random_bool(0.1) {
                Value::Null
            } else {
                match kind {
                    Kind::Count => json!(rng.random_range(0..500u32)),
                    Kind::Ratio => json!(f64::from(rng.random_range(0..10_000u32)) / 10_000.0),
                    Kind::Amount => json!(f64::from(rng.random_range(0..20_000_000u32)) / 100.0),
                    Kind::Flag => json!(rng.random_bool(0.5)),
                    Kind::Label(options) => json!(options[rng.random_range(0..options.len())]),
                }
            };
            json!({"name": name, "value": value})
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn predictors_mix_value_types_deterministically() {
        let a = predictors(42, "u-1", 1, 60);
        assert_eq!(a.len(), 60);
        assert_eq!(a, predictors(42, "u-1", 1, 60));
        assert_ne!(a, predictors(42, "u-2", 1, 60));
        let values: Vec<&Value> = a.iter().map(|p| &p["value"]).collect();
        assert!(values.iter().any(|v| v.is_number()));
        assert!(values.iter().any(|v| v.is_string()));
        assert!(values.iter().any(|v| v.is_boolean()));
        assert!(values.iter().any(|v| v.is_null()));
        assert_eq!(a[25]["name"], "cnt_sms_bank_30d_v2");
    }

    #[test]
    fn every_data_shape_holds_the_same_predictors() {
        let list = predictors(42, "u-1", 3, 5);
        let extras = shaped(list.clone(), FinboxDataShape::ListWithExtras, 3);
        assert_eq!(extras[0]["version"], 3);
        assert_eq!(extras[0]["name"], list[0]["name"]);
        let obj = shaped(list.clone(), FinboxDataShape::Object, 3);
        for p in &list {
            assert_eq!(obj[p["name"].as_str().unwrap()], p["value"]);
        }
        let unnamed = shaped(list.clone(), FinboxDataShape::ListWithoutNames, 3);
        assert_eq!(unnamed[0], list[0]);
        assert_eq!(unnamed[1]["key"], list[1]["name"]);
        assert!(unnamed[1].get("name").is_none());
    }
}

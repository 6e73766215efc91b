//! Credeau's SMS extraction API (`POST /api/fetch_extracted_data`): the
//! gatekeeping in Credeau's order (IP whitelist, credentials, FastAPI-style
//! payload validation, rate limit), then the user's scenario: faults first,
//! then the empty array until the data is ready, then the SMS.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde::Serialize;
use serde_json::{json, Map, Value};

use super::faults::{self, Dice};
use super::respond;
use super::sms::{self, SmsEntry, SmsRequest};
use super::stats::Channel;
use super::{Gate, Sim};
use crate::providers::Provider;

/// Credeau's documented limit on `user_id`.
const MAX_USER_ID_CHARS: usize = 64;

fn error(status: StatusCode, message: &str) -> Response {
    respond::json(status, &json!({ "error": message }))
}

fn unauthorized() -> Response {
    let request_id = uuid::Uuid::new_v4().simple().to_string();
    error(
        StatusCode::UNAUTHORIZED,
        &format!("Could not validate credentials. (request_id={request_id}). It has been logged successfully on our servers. Please contact us with the request_id for assistance."),
    )
}

fn unprocessable(detail: Vec<Value>) -> Response {
    respond::json(
        StatusCode::UNPROCESSABLE_ENTITY,
        &json!({ "detail": detail }),
    )
}

fn rate_limited(retry_after_secs: Option<u64>) -> Response {
    respond::with_retry_after(
        error(StatusCode::TOO_MANY_REQUESTS, "Rate limit exceeded"),
        retry_after_secs,
    )
}

/// A request that passed every check.
struct Accepted {
    user_id: String,
    client_id: String,
    threshold: Option<i64>,
    has_groupings: bool,
}

/// `POST /api/fetch_extracted_data`.
pub async fn fetch(State(sim): State<Arc<Sim>>, headers: HeaderMap, body: Bytes) -> Response {
    let now = sim.clock.now_ms();
    match gatekeep(&sim, &headers, &body) {
        Gate::Pass(accepted) => serve(sim, accepted, now).await,
        Gate::Answer(resp) => sim.finish(Channel::Credeau, resp),
    }
}

fn gatekeep(sim: &Sim, headers: &HeaderMap, body: &[u8]) -> Gate<Accepted> {
    let client_id = {
        let creds = sim.credentials();
        if creds.credeau_ip_blocked {
            return Gate::Answer(respond::forbidden_html());
        }
        let client = headers.get("x-client-id").map(|v| v.as_bytes());
        let token = headers.get("x-auth-token").map(|v| v.as_bytes());
        if client != Some(creds.credeau_client_id.as_bytes())
            || token != Some(creds.credeau_auth_token.as_bytes())
        {
            return Gate::Answer(unauthorized());
        }
        creds.credeau_client_id.clone()
    };
    let parsed: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => {
            return Gate::Answer(unprocessable(vec![json!({
                "type": "json_invalid",
                "loc": ["body", e.column().saturating_sub(1)],
                "msg": "JSON decode error",
                "input": {},
                "ctx": {"error": "Expecting value"},
            })]))
        }
    };
    let Some(fields) = parsed.as_object() else {
        return Gate::Answer(unprocessable(vec![json!({
            "type": "model_attributes_type",
            "loc": ["body"],
            "msg": "Input should be a valid dictionary or object to extract fields from",
            "input": parsed,
        })]));
    };
    if let Some(body_client) = fields.get("client_id").and_then(Value::as_str) {
        if body_client != client_id {
            return Gate::Answer(unauthorized());
        }
    }
    let detail = validate(fields, &parsed);
    if !detail.is_empty() {
        return Gate::Answer(unprocessable(detail));
    }
    if let Err(wait) = sim.credeau_limit.check() {
        return Gate::Answer(rate_limited(Some(respond::retry_after_secs(wait))));
    }
    Gate::Pass(Accepted {
        user_id: fields
            .get("user_id")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
        client_id,
        threshold: fields.get("cnt_sms_threshold").and_then(Value::as_i64),
        has_groupings: fields.get("groupings").is_some_and(|g| !g.is_null()),
    })
}

/// FastAPI/pydantic v2 validation of the body model
/// `{user_id: str (max 64), client_id: str, cnt_sms_threshold: int | None}`.
fn validate(fields: &Map<String, Value>, whole: &Value) -> Vec<Value> {
    let mut detail = Vec::new();
    for key in ["user_id", "client_id"] {
        match fields.get(key) {
            None => detail.push(json!({
                "type": "missing", "loc": ["body", key], "msg": "Field required", "input": whole,
            })),
            Some(Value::String(s)) => {
                if key == "user_id" && s.chars().count() > MAX_USER_ID_CHARS {
                    detail.push(json!({
                        "type": "string_too_long", "loc": ["body", key],
                        "msg": format!("String should have at most {MAX_USER_ID_CHARS} characters"),
                        "input": s, "ctx": {"max_length": MAX_USER_ID_CHARS},
                    }));
                }
            }
            Some(other) => detail.push(json!({
                "type": "string_type", "loc": ["body", key],
                "msg": "Input should be a valid string", "input": other,
            })),
        }
    }
    match fields.get("cnt_sms_threshold") {
        None | Some(Value::Null) => {}
        Some(v) if v.as_i64().is_some() => {}
        Some(Value::String(s)) => detail.push(json!({
            "type": "int_parsing", "loc": ["body", "cnt_sms_threshold"],
            "msg": "Input should be a valid integer, unable to parse string as an integer",
            "input": s,
        })),
        Some(other) => detail.push(json!({
            "type": "int_type", "loc": ["body", "cnt_sms_threshold"],
            "msg": "Input should be a valid integer", "input": other,
        })),
    }
    detail
}

#[derive(Serialize)]
struct Envelope<'a> {
    extracted_sms_data: &'a [SmsEntry],
}

async fn serve(sim: Arc<Sim>, req: Accepted, now: u64) -> Response {
    let scenario = sim
        .scenarios()
        .lookup(&req.user_id)
        .credeau
        .clone()
        .unwrap_or_default();
    if scenario.require_groupings && !req.has_groupings {
        let resp = unprocessable(vec![json!({
            "type": "missing", "loc": ["body", "groupings"], "msg": "Field required",
            "input": {"user_id": req.user_id, "client_id": req.client_id},
        })]);
        sim.record(Provider::Credeau, &req.user_id, &resp);
        return sim.finish(Channel::Credeau, resp);
    }
    let ticket = sim.users.begin(Provider::Credeau, &req.user_id, now);
    let mut dice = Dice::new(
        sim.seed,
        "request",
        Provider::Credeau,
        &req.user_id,
        ticket.number.into(),
    );
    let fault = faults::decide(&scenario.faults, ticket.number, &mut dice);
    let scripted = scenario
        .faults
        .scripted
        .as_ref()
        .filter(|s| s.applies(ticket.number));
    let request_id = dice.hex_id(16);
    let ready_at = ticket
        .first_contact_ms
        .saturating_add(u64::try_from(scenario.ready_after.as_millis()).unwrap_or(u64::MAX));
    let count = if now < ready_at {
        0
    } else {
        let threshold = req.threshold.map_or(u64::MAX, |t| t.max(0).unsigned_abs());
        usize::try_from(u64::from(scenario.sms_count).min(threshold)).unwrap_or(usize::MAX)
    };
    let entries = sms::generate(&SmsRequest {
        seed: sim.seed,
        user_id: &req.user_id,
        client_id: &req.client_id,
        request_id: &request_id,
        ready_at_ms: ready_at,
        count,
    });
    // Serializing plain structs of strings, numbers and booleans cannot fail.
    let body = serde_json::to_vec(&Envelope {
        extracted_sms_data: &entries,
    })
    .unwrap_or_default();
    drop(entries);
    if !scenario.faults.latency.is_zero() {
        tokio::time::sleep(scenario.faults.latency).await;
    }
    let resp = match (fault, scripted) {
        (None, Some(answer)) => respond::scripted(answer, &req.user_id),
        (None, None) => respond::shaped_json(StatusCode::OK, body, &scenario.faults),
        (Some(fault), _) => respond::render_fault(
            fault,
            body,
            |status| error(status, "Internal Server Error"),
            rate_limited,
        ),
    };
    sim.record(Provider::Credeau, &req.user_id, &resp);
    sim.finish(Channel::Credeau, resp)
}

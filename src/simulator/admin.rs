//! The admin API: replace or merge scenarios, change credentials and rate
//! limits at run time, read statistics and one user's history, reset the
//! per-user state, and a health check. JSON in and out, no authentication
//! (the simulator is a local test tool).

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::scenario::{ScenarioPatch, ScenarioSet};
use super::Sim;

fn bad_request(message: String) -> Response {
    (StatusCode::BAD_REQUEST, Json(json!({ "error": message }))).into_response()
}

fn rejection(r: JsonRejection) -> Response {
    bad_request(r.body_text())
}

#[derive(Debug, Serialize)]
struct ScenarioSummary {
    users: usize,
    prefixes: usize,
}

fn summary(set: &ScenarioSet) -> Json<ScenarioSummary> {
    Json(ScenarioSummary {
        users: set.users.len(),
        prefixes: set.prefixes.len(),
    })
}

/// `PUT /admin/scenarios`: replaces the whole set.
pub async fn replace_scenarios(
    State(sim): State<Arc<Sim>>,
    body: Result<Json<ScenarioSet>, JsonRejection>,
) -> Response {
    let set = match body {
        Ok(Json(set)) => set,
        Err(r) => return rejection(r),
    };
    if let Err(e) = set.validate() {
        return bad_request(e.to_string());
    }
    let out = summary(&set);
    sim.set_scenarios(set);
    out.into_response()
}

/// `POST /admin/scenarios`: merges users; replaces `default`/`prefixes` when given.
pub async fn merge_scenarios(
    State(sim): State<Arc<Sim>>,
    body: Result<Json<ScenarioPatch>, JsonRejection>,
) -> Response {
    let patch = match body {
        Ok(Json(p)) => p,
        Err(r) => return rejection(r),
    };
    if let Err(e) = patch.validate() {
        return bad_request(e.to_string());
    }
    let mut set = (*sim.scenarios()).clone();
    set.merge(patch);
    let out = summary(&set);
    sim.set_scenarios(set);
    out.into_response()
}

/// `GET /admin/scenarios`: the set in force.
pub async fn get_scenarios(State(sim): State<Arc<Sim>>) -> Json<ScenarioSet> {
    Json((*sim.scenarios()).clone())
}

/// `PUT /admin/credentials`: any subset of the fields.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialsPatch {
    pub finbox_api_key: Option<String>,
    pub finbox_server_hash: Option<String>,
    pub credeau_client_id: Option<String>,
    pub credeau_auth_token: Option<String>,
    pub finbox_ip_blocked: Option<bool>,
    pub credeau_ip_blocked: Option<bool>,
}

pub async fn update_credentials(
    State(sim): State<Arc<Sim>>,
    body: Result<Json<CredentialsPatch>, JsonRejection>,
) -> Response {
    let patch = match body {
        Ok(Json(p)) => p,
        Err(r) => return rejection(r),
    };
    sim.update_credentials(patch);
    let creds = sim.credentials();
    // Only the flags: the secrets are never echoed.
    Json(json!({
        "finbox_ip_blocked": creds.finbox_ip_blocked,
        "credeau_ip_blocked": creds.credeau_ip_blocked,
    }))
    .into_response()
}

/// `PUT /admin/limits`: requests per minute; 0 turns a limit off.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsPatch {
    pub finbox_per_minute: Option<u32>,
    pub credeau_per_minute: Option<u32>,
}

pub async fn update_limits(
    State(sim): State<Arc<Sim>>,
    body: Result<Json<LimitsPatch>, JsonRejection>,
) -> Response {
    let patch = match body {
        Ok(Json(p)) => p,
        Err(r) => return rejection(r),
    };
    if let Some(n) = patch.finbox_per_minute {
        sim.finbox_limit.set(n);
    }
    if let Some(n) = patch.credeau_per_minute {
        sim.credeau_limit.set(n);
    }
    Json(LimitsPatch {
        finbox_per_minute: Some(sim.finbox_limit.per_minute()),
        credeau_per_minute: Some(sim.credeau_limit.per_minute()),
    })
    .into_response()
}

/// `GET /admin/stats`.
pub async fn stats(State(sim): State<Arc<Sim>>) -> Response {
    Json(sim.stats.report(sim.users.len())).into_response()
}

/// `GET /admin/users/{user_id}`: 404 for a user never seen.
pub async fn user(State(sim): State<Arc<Sim>>, Path(user_id): Path<String>) -> Response {
    match sim.users.report(&user_id) {
        Some(report) => Json(report).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            Json(json!({ "error": "no requests from this user" })),
        )
            .into_response(),
    }
}

/// `POST /admin/reset`: forgets users and counters; keeps scenarios,
/// credentials and limits.
pub async fn reset(State(sim): State<Arc<Sim>>) -> Response {
    sim.users.clear();
    sim.stats.reset();
    Json(json!({ "reset": true })).into_response()
}

pub async fn healthz() -> Response {
    Json(json!({ "status": "ok" })).into_response()
}

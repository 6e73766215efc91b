//! The FinBox DeviceConnect Insights client: builds the signed request
//! (API key header, salted body), maps every documented answer to a
//! [`FinboxAnswer`] or a [`ProviderError`], and retries 429/5xx/transport
//! failures after the documented 2 s and 5 s.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use hyper::header::{HeaderName, HeaderValue};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::budget;
use super::http::{
    self, error, json_error_summary, non_json_summary, parse_retry_after, read_capped, scrub,
    truncate, AnswerOutcome, Attempt, ClientBuildError, ClientOptions, RetryContext,
    MAX_MESSAGE_CHARS,
};
use super::identity;
use super::lenient_json;
use super::ratelimit::RateLimiter;
use super::retry::RetryPolicy;
use super::ProviderErrorKind as Kind;
use super::{FinboxAnswer, FinboxApi, FinboxInsights, Predictor, Provider, ProviderError};
use crate::config::{FinboxSettings, SecretSource};
use crate::metrics::Metrics;

const PROVIDER: Provider = Provider::Finbox;

static X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");

/// The body of a predictors request, written straight to JSON.
#[derive(serde::Serialize)]
struct PredictorsRequest<'a> {
    customer_id: &'a str,
    version: i64,
    salt: &'a str,
}

/// The FinBox client. One per process; cheap to share in an `Arc`.
pub struct FinboxClient {
    /// The pooled client, bound to the endpoint (parsed once).
    http: http::ProviderHttp,
    api_key: HeaderValue,
    api_key_secret: SecretSource,
    server_hash: SecretSource,
    version: i64,
    max_response_bytes: usize,
    policy: RetryPolicy,
    limiter: Arc<RateLimiter>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for FinboxClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FinboxClient")
            .field("http", &self.http)
            .field("version", &self.version)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl FinboxClient {
    pub fn new(
        settings: &FinboxSettings,
        limiter: Arc<RateLimiter>,
        metrics: Arc<Metrics>,
    ) -> Result<FinboxClient, ClientBuildError> {
        let http = http::ProviderHttp::new(
            &ClientOptions::new(PROVIDER, settings.base_url.as_str(), &settings.http),
            &settings.endpoint(),
        )?;
        Ok(FinboxClient {
            http,
            api_key: http::secret_header("finbox.api_key", settings.api_key.expose())?,
            api_key_secret: settings.api_key.clone(),
            server_hash: settings.server_hash.clone(),
            version: settings.predictors_version,
            max_response_bytes: settings.http.max_response_bytes,
            policy: retry_policy(settings),
            limiter,
            metrics,
        })
    }

    /// The retry policy in force (the configured delays).
    pub fn retry_policy(&self) -> &RetryPolicy {
        &self.policy
    }

    async fn attempt(&self, customer_id: &str, salt: &str) -> Attempt<FinboxAnswer> {
        let body = PredictorsRequest {
            customer_id,
            version: self.version,
            salt,
        };
        // Until the answer's status line and headers: a large body read
        // after them is not a provider that hangs.
        let awaiting = budget::current().map(|c| c.awaiting_answer());
        let sent = self
            .http
            .post_json(&[(&X_API_KEY, &self.api_key)], &body)
            .await;
        drop(awaiting);
        let response = match sent {
            Ok(r) => r,
            Err(e) => {
                return Attempt {
                    http_status: None,
                    result: Err(e),
                }
            }
        };
        let status = response.status();
        let retry_after = parse_retry_after(response.headers(), SystemTime::now());
        let content_type = response.content_type();
        let result = match read_capped(PROVIDER, response, self.max_response_bytes).await {
            Ok(bytes) => map_response(status, content_type.as_deref(), &bytes),
            Err(e) => Err(e),
        };
        let secrets = [
            self.api_key_secret.expose(),
            self.server_hash.expose(),
            salt,
        ];
        Attempt {
            http_status: Some(status),
            result: result.map_err(|mut e| {
                e.retry_after = retry_after;
                e.message = scrub(&e.message, &secrets);
                e
            }),
        }
    }
}

/// The documented policy from settings: one retry per configured delay.
pub fn retry_policy(settings: &FinboxSettings) -> RetryPolicy {
    RetryPolicy::Fixed {
        delays: settings.retry_delays.clone(),
        max_wait: settings.retry_max_wait,
    }
}

#[async_trait]
impl FinboxApi for FinboxClient {
    async fn fetch_predictors(&self, customer_id: &str) -> Result<FinboxAnswer, ProviderError> {
        let salt = crate::providers::salt::finbox_salt(customer_id, self.server_hash.expose());
        let ctx = RetryContext {
            provider: PROVIDER,
            policy: &self.policy,
            limiter: &self.limiter,
            metrics: &self.metrics,
        };
        let mut result = http::with_retries(ctx, |_| self.attempt(customer_id, &salt)).await;
        if let Ok(FinboxAnswer::Complete(insights)) = &result {
            if let Some(echo) = insights.customer_id.as_deref() {
                if !identity::same_id(customer_id, echo) {
                    self.metrics
                        .provider_identity_mismatch
                        .with_label_values(&[PROVIDER.as_str()])
                        .inc();
                    let mut e = identity::mismatch(PROVIDER, Some(200), customer_id, echo, "");
                    e.provider_request_id = insights.request_id.clone();
                    return Err(e);
                }
            }
        }
        if let Ok(FinboxAnswer::Complete(insights)) = &mut result {
            insights.version = Some(self.version);
            if let Some(problem) = &insights.data_problem {
                self.metrics
                    .provider_unexpected_data
                    .with_label_values(&[PROVIDER.as_str()])
                    .inc();
                tracing::warn!(
                    provider = PROVIDER.as_str(),
                    problem = problem.as_str(),
                    "FinBox data is not in the documented shape; published with the raw data"
                );
            }
        }
        result
    }
}

impl AnswerOutcome for FinboxAnswer {
    fn outcome(&self) -> &'static str {
        match self {
            FinboxAnswer::InProgress { .. } => "in_progress",
            FinboxAnswer::Complete(_) => "complete",
            FinboxAnswer::NoData { .. } => "no_data",
            FinboxAnswer::NotFound { .. } => "not_found",
        }
    }
}

/// Maps one FinBox response (status, content type, body) to an answer or an
/// error, as the table in `providers.md` says. Pure, so every row is unit
/// tested.
pub fn map_response(
    status: u16,
    content_type: Option<&str>,
    body: &[u8],
) -> Result<FinboxAnswer, ProviderError> {
    let read = read_body(body);
    let object = match &read {
        Read::Json(Value::Object(map), _) => Some(map),
        _ => None,
    };
    if (200..300).contains(&status) {
        let Some(obj) = object else {
            let why = match &read {
                Read::Unreadable(u) => lenient_json::describe_unreadable(u),
                Read::Malformed(_) if !looks_like_json(content_type) => {
                    non_json_summary(content_type, body)
                }
                Read::Malformed(e) => json_error_summary(e),
                Read::Json(..) if body.is_empty() => "empty body".to_string(),
                Read::Json(..) => "JSON that is not an object".to_string(),
            };
            return Err(error(PROVIDER, Kind::InvalidBody, Some(status), why));
        };
        let repaired = match &read {
            Read::Json(_, Some(r)) => Some(r),
            _ => None,
        };
        return map_success(status, obj, body, repaired);
    }
    let message = match object {
        Some(obj) => match text_field(obj, "message")
            .or_else(|| text_field(obj, "error"))
            .or_else(|| text_field(obj, "detail"))
        {
            Some(m) => truncate(&m, MAX_MESSAGE_CHARS),
            None => "no message".to_string(),
        },
        None => match &read {
            Read::Unreadable(u) => lenient_json::describe_unreadable(u),
            _ => non_json_summary(content_type, body),
        },
    };
    let kind = match status {
        400 => Kind::BadRequest,
        401 => Kind::Unauthorized,
        403 => Kind::Forbidden,
        408 => Kind::Timeout,
        429 => Kind::RateLimited,
        500..=599 => Kind::ServerError,
        _ => Kind::UnexpectedStatus,
    };
    let mut err = error(PROVIDER, kind, Some(status), message);
    err.provider_request_id = object.and_then(|o| text_field(o, "request_id"));
    Err(err)
}

/// A body as read: standard JSON (with the repair that made it so, if any,
/// see [`lenient_json`]), JSON that even a lenient reading cannot parse,
/// or bytes that are not JSON text at all.
enum Read {
    Json(Value, Option<lenient_json::Repaired>),
    Malformed(serde_json::Error),
    Unreadable(lenient_json::Unreadable),
}

fn read_body(body: &[u8]) -> Read {
    let strict = match serde_json::from_slice::<Value>(body) {
        Ok(v) => return Read::Json(v, None),
        Err(e) => e,
    };
    match lenient_json::repair(body) {
        Ok(r) if !r.notes.is_empty() => match serde_json::from_str::<Value>(&r.text) {
            Ok(v) => Read::Json(v, Some(r)),
            Err(_) => Read::Malformed(strict),
        },
        Ok(_) => Read::Malformed(strict),
        Err(u) => Read::Unreadable(u),
    }
}

fn looks_like_json(content_type: Option<&str>) -> bool {
    content_type.is_some_and(|ct| ct.to_ascii_lowercase().contains("json"))
}

fn map_success(
    status: u16,
    obj: &Map<String, Value>,
    body: &[u8],
    repaired: Option<&lenient_json::Repaired>,
) -> Result<FinboxAnswer, ProviderError> {
    let invalid = |why: String| error(PROVIDER, Kind::InvalidBody, Some(status), why);
    let request_id = text_field(obj, "request_id");
    let state = match obj.get("status") {
        Some(Value::String(s)) => s.as_str(),
        Some(_) => return Err(invalid("`status` is not a string".into())),
        None => return Err(invalid("no `status` key".into())),
    };
    match state {
        "in_progress" => Ok(FinboxAnswer::InProgress {
            suggested_wait: text_field(obj, "message")
                .as_deref()
                .and_then(parse_suggested_wait),
            request_id,
        }),
        "complete" => {
            let (predictors, shape_problem) = read_data(obj.get("data"));
            let body = repaired.map_or(body, |r| r.text.as_bytes());
            let rest: Map<String, Value> = obj
                .iter()
                .filter(|(k, _)| !DOCUMENTED_KEYS.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let (response_json, envelope_problem) = super::envelope_json(&rest);
            let data_problem = super::join_problems([
                repaired.and_then(lenient_json::Repaired::summary),
                shape_problem,
                envelope_problem,
            ]);
            Ok(FinboxAnswer::Complete(FinboxInsights {
                request_id,
                date_requested: text_field(obj, "date_requested"),
                date_processed: text_field(obj, "date_processed"),
                message: text_field(obj, "message"),
                version: None,
                customer_id: text_field(obj, "customer_id"),
                answered_version: obj.get("version").and_then(Value::as_i64),
                response_json,
                predictors,
                data_json: raw_data(body, obj),
                data_problem,
            }))
        }
        "no_data" => Ok(FinboxAnswer::NoData { request_id }),
        // A documented status, sent without the 4xx/5xx the document pairs
        // it with: handled as FinBox's errors without a client-error
        // status are (a server error, retried), its message kept.
        "error" => {
            let message = text_field(obj, "message")
                .or_else(|| text_field(obj, "error"))
                .or_else(|| text_field(obj, "detail"))
                .map(|m| truncate(&m, MAX_MESSAGE_CHARS))
                .unwrap_or_else(|| "no message".to_string());
            let mut e = error(
                PROVIDER,
                Kind::ServerError,
                Some(status),
                format!("status \"error\" with HTTP {status}: {message}"),
            );
            e.provider_request_id = request_id;
            Err(e)
        }
        "not_found" => Ok(FinboxAnswer::NotFound { request_id }),
        other => Err(invalid(format!("unknown status {:?}", truncate(other, 40)))),
    }
}

/// The response keys the document lists; the others go to `response_json`.
const DOCUMENTED_KEYS: [&str; 7] = [
    "customer_id",
    "request_id",
    "status",
    "message",
    "date_requested",
    "date_processed",
    "data",
];

/// `data` byte for byte as it appears in the body; `None` when absent or
/// null. Falls back to re-serializing the parsed value if the body cannot
/// be read field by field (a duplicated key, say).
fn raw_data(body: &[u8], obj: &Map<String, Value>) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct DataOnly<'a> {
        #[serde(borrow, default)]
        data: Option<&'a RawValue>,
    }
    match serde_json::from_slice::<DataOnly<'_>>(body) {
        Ok(d) => d.data.map(|raw| raw.get().to_owned()),
        Err(_) => obj
            .get("data")
            .filter(|v| !v.is_null())
            .map(Value::to_string),
    }
}

/// `data` read as predictors, and what in it is not the documented shape.
///
/// The document says "an array of objects ... having keys name ... and
/// value", and that the list is agreed per integration, so a different
/// shape is not a transient fault: it is read as far as it goes and never
/// retried. Null or absent is no predictors. In a list, each object with a
/// string `name` is a predictor (`value` may be any JSON, absent = null;
/// other keys go to `extra`); other entries are skipped here and kept only
/// in the raw `data`. An object is read as `name -> value` pairs. Anything
/// else gives no predictors.
pub fn read_data(data: Option<&Value>) -> (Vec<Predictor>, Option<String>) {
    let entries = match data {
        None | Some(Value::Null) => return (Vec::new(), None),
        Some(Value::Array(entries)) => entries,
        Some(Value::String(text)) => {
            // Double-encoded: the list written as a JSON string.
            return match serde_json::from_str::<Value>(text) {
                Ok(inner @ (Value::Array(_) | Value::Object(_))) => {
                    let (predictors, problem) = read_data(Some(&inner));
                    let note =
                        "`data` is a JSON string holding the data (encoded twice): it was decoded";
                    (
                        predictors,
                        Some(match problem {
                            Some(p) => format!("{note}; {p}"),
                            None => note.to_string(),
                        }),
                    )
                }
                _ => (
                    Vec::new(),
                    Some("`data` is a string, not a list".to_string()),
                ),
            };
        }
        Some(Value::Object(map)) if map.is_empty() => {
            return (
                Vec::new(),
                Some("`data` is an empty object, not a list: no predictors could be read".into()),
            );
        }
        Some(Value::Object(map)) => {
            let predictors = map
                .iter()
                .map(|(name, value)| Predictor {
                    name: name.clone(),
                    value: value.clone(),
                    extra: Map::new(),
                })
                .collect();
            return (
                predictors,
                Some(
                    "`data` is an object, not a list: its keys were read as predictor names".into(),
                ),
            );
        }
        Some(other) => {
            return (
                Vec::new(),
                Some(format!("`data` is {}, not a list", json_type(other))),
            )
        }
    };
    let mut predictors = Vec::with_capacity(entries.len());
    let mut skipped = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        let Some((name, fields)) = entry
            .as_object()
            .and_then(|o| o.get("name").and_then(Value::as_str).map(|n| (n, o)))
        else {
            skipped.push(i);
            continue;
        };
        predictors.push(Predictor {
            name: name.to_owned(),
            value: fields.get("value").cloned().unwrap_or(Value::Null),
            extra: fields
                .iter()
                .filter(|(k, _)| !matches!(k.as_str(), "name" | "value"))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        });
    }
    let problem = skipped.first().map(|first| {
        format!(
            "{} of {} `data` entries are not objects with a string `name` (the first is data[{first}]); they are only in data_json",
            skipped.len(),
            entries.len()
        )
    });
    (predictors, problem)
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// A string field; numbers are accepted as text, anything else is absent.
fn text_field(obj: &Map<String, Value>, key: &str) -> Option<String> {
    match obj.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The wait suggested by an in-progress message such as "Featurization in
/// Progress, please try again in 10 Seconds": the first number followed by
/// a time unit (or written with one, like "10s").
pub fn parse_suggested_wait(message: &str) -> Option<Duration> {
    let lower = message.to_ascii_lowercase();
    let words: Vec<&str> = lower
        .split(|c: char| c.is_whitespace() || matches!(c, ',' | ';' | '(' | ')' | '!'))
        .map(|w| w.trim_end_matches('.'))
        .filter(|w| !w.is_empty())
        .collect();
    for (i, word) in words.iter().enumerate() {
        if let Ok(n) = word.parse::<f64>() {
            if !(n.is_finite() && n >= 0.0) {
                continue;
            }
            let unit = match words.get(i + 1).copied() {
                Some("ms" | "millisecond" | "milliseconds") => 0.001,
                Some("s" | "sec" | "secs" | "second" | "seconds") => 1.0,
                Some("m" | "min" | "mins" | "minute" | "minutes") => 60.0,
                Some("h" | "hr" | "hrs" | "hour" | "hours") => 3600.0,
                _ => continue,
            };
            return Duration::try_from_secs_f64(n * unit).ok();
        }
        if word.starts_with(|c: char| c.is_ascii_digit()) {
            if let Ok(d) = humantime::parse_duration(word) {
                return Some(d);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests;

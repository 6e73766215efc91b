//! The Credeau SMS extraction client: sends the credentials headers and the
//! `{user_id, client_id, cnt_sms_threshold[, groupings]}` body, keeps every field of
//! every SMS entry, maps 401/403/422 to their errors without ever quoting
//! SMS data or echoed input, and retries 429/5xx/transport failures with
//! the documented exponential backoff.

use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use hyper::header::{HeaderName, HeaderValue};
use serde::Deserialize;
use serde_json::{Map, Value};

use super::budget;
use super::http::{
    self, error, json_error_summary, non_json_summary, parse_retry_after, read_capped, scrub,
    truncate, AnswerOutcome, Attempt, ClientBuildError, ClientOptions, RetryContext,
    MAX_MESSAGE_CHARS,
};
use super::ratelimit::RateLimiter;
use super::retry::RetryPolicy;
use super::ProviderErrorKind as Kind;
use super::{CredeauAnswer, CredeauApi, Provider, ProviderError, SmsEntry, SmsExtraction};
use crate::config::{CredeauSettings, SecretSource};
use crate::metrics::Metrics;

const PROVIDER: Provider = Provider::Credeau;

static X_CLIENT_ID: HeaderName = HeaderName::from_static("x-client-id");
static X_AUTH_TOKEN: HeaderName = HeaderName::from_static("x-auth-token");

/// The Credeau client. One per process; cheap to share in an `Arc`.
pub struct CredeauClient {
    /// The pooled client, bound to the endpoint (parsed once).
    http: http::ProviderHttp,
    client_id: String,
    client_id_header: HeaderValue,
    auth_token: HeaderValue,
    auth_token_secret: SecretSource,
    cnt_sms_threshold: u32,
    groupings: Option<Value>,
    max_response_bytes: usize,
    policy: RetryPolicy,
    limiter: Arc<RateLimiter>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for CredeauClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredeauClient")
            .field("http", &self.http)
            .field("client_id", &self.client_id)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl CredeauClient {
    pub fn new(
        settings: &CredeauSettings,
        limiter: Arc<RateLimiter>,
        metrics: Arc<Metrics>,
    ) -> Result<CredeauClient, ClientBuildError> {
        let http = http::ProviderHttp::new(
            &ClientOptions::new(PROVIDER, settings.base_url.as_str(), &settings.http),
            &settings.endpoint(),
        )?;
        let client_id_header = HeaderValue::from_str(&settings.client_id).map_err(|_| {
            ClientBuildError::InvalidHeaderValue {
                key: "credeau.client_id".into(),
            }
        })?;
        Ok(CredeauClient {
            http,
            client_id: settings.client_id.clone(),
            client_id_header,
            auth_token: http::secret_header("credeau.auth_token", settings.auth_token.expose())?,
            auth_token_secret: settings.auth_token.clone(),
            cnt_sms_threshold: settings.cnt_sms_threshold,
            groupings: settings.groupings().cloned(),
            max_response_bytes: settings.http.max_response_bytes,
            policy: retry_policy(settings),
            limiter,
            metrics,
        })
    }

    /// The retry policy in force.
    pub fn retry_policy(&self) -> &RetryPolicy {
        &self.policy
    }

    async fn attempt(&self, user_id: &str) -> Attempt<CredeauAnswer> {
        let body = request_body(
            user_id,
            &self.client_id,
            self.cnt_sms_threshold,
            self.groupings.as_ref(),
        );
        // Until the answer's status line and headers: a large body read
        // after them is not a provider that hangs.
        let awaiting = budget::current().map(|c| c.awaiting_answer());
        let sent = self
            .http
            .post_json(
                &[
                    (&X_CLIENT_ID, &self.client_id_header),
                    (&X_AUTH_TOKEN, &self.auth_token),
                ],
                &body,
            )
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
        let secrets = [self.auth_token_secret.expose()];
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

/// The request body. `groupings` appears only when configured: the document
/// names it once, among the required fields of its 422 example, and nowhere
/// else (not in the request table, not in its cURL example).
pub fn request_body(
    user_id: &str,
    client_id: &str,
    cnt_sms_threshold: u32,
    groupings: Option<&Value>,
) -> Value {
    let mut body = serde_json::json!({
        "user_id": user_id,
        "client_id": client_id,
        "cnt_sms_threshold": cnt_sms_threshold,
    });
    if let (Some(g), Value::Object(map)) = (groupings, &mut body) {
        map.insert("groupings".to_owned(), g.clone());
    }
    body
}

/// The documented policy from settings: exponential from `retry_base`,
/// doubling, capped at `retry_cap`, +/-20 % jitter.
pub fn retry_policy(settings: &CredeauSettings) -> RetryPolicy {
    RetryPolicy::Exponential {
        max_retries: settings.max_retries,
        base: settings.retry_base,
        cap: settings.retry_cap,
    }
}

#[async_trait]
impl CredeauApi for CredeauClient {
    async fn fetch_sms(&self, user_id: &str) -> Result<CredeauAnswer, ProviderError> {
        let ctx = RetryContext {
            provider: PROVIDER,
            policy: &self.policy,
            limiter: &self.limiter,
            metrics: &self.metrics,
        };
        let mut result = http::with_retries(ctx, |_| self.attempt(user_id)).await;
        if let Ok(CredeauAnswer::Data(sms)) = &mut result {
            sms.cnt_sms_threshold = Some(self.cnt_sms_threshold);
        }
        result
    }
}

impl AnswerOutcome for CredeauAnswer {
    fn outcome(&self) -> &'static str {
        match self {
            CredeauAnswer::Data(_) => "data",
            CredeauAnswer::Empty => "empty",
        }
    }
}

#[derive(Deserialize)]
struct SuccessBody {
    extracted_sms_data: Vec<SmsEntry>,
}

/// Maps one Credeau response (status, content type, body) to an answer or
/// an error, as the table in `providers.md` says. Pure, so every row is unit
/// tested. Error text never quotes SMS data or echoed request input.
pub fn map_response(
    status: u16,
    content_type: Option<&str>,
    body: &[u8],
) -> Result<CredeauAnswer, ProviderError> {
    if (200..300).contains(&status) {
        return match serde_json::from_slice::<SuccessBody>(body) {
            Ok(parsed) if parsed.extracted_sms_data.is_empty() => Ok(CredeauAnswer::Empty),
            Ok(parsed) => {
                // Kept as text, so the shape of each entry is checked here.
                if let Some(i) = parsed
                    .extracted_sms_data
                    .iter()
                    .position(|e| !e.get().starts_with('{'))
                {
                    return Err(error(
                        PROVIDER,
                        Kind::InvalidBody,
                        Some(status),
                        format!("JSON of an unexpected shape (SMS entry {i} is not an object)"),
                    ));
                }
                Ok(CredeauAnswer::Data(SmsExtraction {
                    entries: parsed.extracted_sms_data,
                    cnt_sms_threshold: None,
                }))
            }
            Err(e) => {
                let json_like =
                    content_type.is_some_and(|ct| ct.to_ascii_lowercase().contains("json"));
                let why = if json_like || e.classify() != serde_json::error::Category::Syntax {
                    json_error_summary(&e)
                } else {
                    non_json_summary(content_type, body)
                };
                Err(error(PROVIDER, Kind::InvalidBody, Some(status), why))
            }
        };
    }
    let json = match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(obj)) => Some(obj),
        _ => None,
    };
    let kind = match status {
        400 => Kind::BadRequest,
        401 => Kind::Unauthorized,
        403 => Kind::Forbidden,
        408 => Kind::Timeout,
        422 => Kind::Unprocessable,
        429 => Kind::RateLimited,
        500..=599 => Kind::ServerError,
        _ => Kind::UnexpectedStatus,
    };
    let message = match &json {
        Some(obj) => error_message(obj),
        None => non_json_summary(content_type, body),
    };
    let mut err = error(PROVIDER, kind, Some(status), message);
    err.provider_request_id = json
        .as_ref()
        .and_then(|o| o.get("error"))
        .and_then(Value::as_str)
        .and_then(request_id_in);
    Err(err)
}

/// `error` (401), a summarised `detail` (422), or `message`.
fn error_message(obj: &Map<String, Value>) -> String {
    if let Some(Value::String(e)) = obj.get("error") {
        return truncate(e, MAX_MESSAGE_CHARS);
    }
    match obj.get("detail") {
        Some(Value::Array(items)) => return detail_summary(items),
        Some(Value::String(d)) => return truncate(d, MAX_MESSAGE_CHARS),
        _ => {}
    }
    if let Some(Value::String(m)) = obj.get("message") {
        return truncate(m, MAX_MESSAGE_CHARS);
    }
    "no message".to_string()
}

/// FastAPI validation errors as "body.user_id: Field required (missing)",
/// joined by "; ". Only `loc`, `msg` and `type`: `input` echoes the request.
pub fn detail_summary(items: &[Value]) -> String {
    let parts: Vec<String> = items
        .iter()
        .map(|item| {
            let loc = match item.get("loc") {
                Some(Value::Array(parts)) => parts
                    .iter()
                    .map(|p| match p {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    })
                    .collect::<Vec<_>>()
                    .join("."),
                _ => "?".to_string(),
            };
            let msg = item.get("msg").and_then(Value::as_str).unwrap_or("invalid");
            let kind = item
                .get("type")
                .and_then(Value::as_str)
                .unwrap_or("unknown");
            format!("{loc}: {msg} ({kind})")
        })
        .collect();
    if parts.is_empty() {
        "validation failed".to_string()
    } else {
        truncate(&parts.join("; "), MAX_MESSAGE_CHARS)
    }
}

/// The provider's id from "... (request_id=abc123). ..." (for support).
pub fn request_id_in(text: &str) -> Option<String> {
    let start = text.find("request_id=")? + "request_id=".len();
    let id: String = text[start..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
        .take(64)
        .collect();
    (!id.is_empty()).then_some(id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn map(status: u16, body: Value) -> Result<CredeauAnswer, ProviderError> {
        map_response(
            status,
            Some("application/json"),
            body.to_string().as_bytes(),
        )
    }

    #[test]
    fn data_keeps_every_field_including_unknown_ones() {
        let entry = json!({"_id": "1", "sms_id": "1345", "sms_body": "dear upi user", "template_hash": "t-1",
                           "transaction": 80.0, "is_extracted": true, "brand_new": {"nested": [1, 2]}});
        let a = map(200, json!({"extracted_sms_data": [entry.clone()]})).unwrap();
        let CredeauAnswer::Data(sms) = a else {
            panic!("no data")
        };
        let got: Value = serde_json::from_str(sms.entries[0].get()).unwrap();
        assert_eq!(got, entry);
        assert!(!format!("{sms:?}").contains("dear upi user"));
    }

    #[test]
    fn groupings_are_sent_only_when_configured() {
        let without = request_body("u-1", "c", 5000, None);
        assert_eq!(
            without,
            json!({"user_id": "u-1", "client_id": "c", "cnt_sms_threshold": 5000})
        );
        let with = request_body("u-1", "c", 10, Some(&json!(["bank", "upi"])));
        assert_eq!(with["groupings"], json!(["bank", "upi"]));
        assert_eq!(with["cnt_sms_threshold"], json!(10));
    }

    #[test]
    fn empty_array_is_empty() {
        assert_eq!(
            map(200, json!({"extracted_sms_data": []})).unwrap(),
            CredeauAnswer::Empty
        );
    }

    #[test]
    fn unauthorized_carries_the_providers_request_id() {
        let e = map(401, json!({"error": "Could not validate credentials. (request_id=9c8d583b51334515a6ae3dfe8cb333ce). It has been logged successfully on our servers."}))
            .unwrap_err();
        assert_eq!(e.kind, Kind::Unauthorized);
        assert_eq!(
            e.provider_request_id.as_deref(),
            Some("9c8d583b51334515a6ae3dfe8cb333ce")
        );
        assert!(e.message.starts_with("Could not validate credentials"));
    }

    #[test]
    fn forbidden_html_page_is_forbidden() {
        let page = b"<html>\n<head><title>403 Forbidden</title></head>\n<body><center><h1>403 Forbidden</h1></center></body></html>";
        let e = map_response(403, Some("text/html"), page).unwrap_err();
        assert_eq!(e.kind, Kind::Forbidden);
        assert!(e.message.contains("403 Forbidden"), "{}", e.message);
    }

    #[test]
    fn unprocessable_summarises_detail_without_the_input() {
        let e = map(422, json!({"detail": [{"type": "missing", "loc": ["body", "user_id"], "msg": "Field required",
                                            "input": {"client_id": "secret-client-input", "cnt_sms_threshold": 10}}]}))
        .unwrap_err();
        assert_eq!(e.kind, Kind::Unprocessable);
        assert_eq!(e.message, "body.user_id: Field required (missing)");
    }

    #[test]
    fn rate_limits_server_errors_and_odd_bodies_map_to_retryable_kinds() {
        assert_eq!(
            map(429, json!({"error": "Rate limit exceeded"}))
                .unwrap_err()
                .kind,
            Kind::RateLimited
        );
        assert_eq!(map(503, json!({})).unwrap_err().kind, Kind::ServerError);
        let html = map_response(200, Some("text/html"), b"<html>hello</html>").unwrap_err();
        assert_eq!(html.kind, Kind::InvalidBody);
        let cut = map_response(
            200,
            Some("application/json"),
            br#"{"extracted_sms_data": [{"sms_body": "dear"#,
        )
        .unwrap_err();
        assert_eq!(cut.kind, Kind::InvalidBody);
        assert!(!cut.message.contains("dear"), "{}", cut.message);
        let shape = map(200, json!({"extracted_sms_data": "private sms text"})).unwrap_err();
        assert_eq!(shape.kind, Kind::InvalidBody);
        assert!(!shape.message.contains("private"), "{}", shape.message);
        let not_object = map(
            200,
            json!({"extracted_sms_data": [{"sms_body": "a"}, "private sms text"]}),
        )
        .unwrap_err();
        assert_eq!(not_object.kind, Kind::InvalidBody);
        assert_eq!(
            not_object.message,
            "JSON of an unexpected shape (SMS entry 1 is not an object)"
        );
    }

    #[test]
    fn request_id_is_read_up_to_the_closing_parenthesis() {
        assert_eq!(
            request_id_in("x (request_id=ab-12). y").as_deref(),
            Some("ab-12")
        );
        assert_eq!(request_id_in("no id here"), None);
        assert_eq!(request_id_in("(request_id=)"), None);
    }
}

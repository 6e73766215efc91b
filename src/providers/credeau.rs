//! The Credeau SMS extraction client: sends the credentials headers and the
//! `{user_id, client_id, cnt_sms_threshold[, groupings]}` body, keeps every field of
//! every SMS entry, maps 401/403/422 to their errors without ever quoting
//! SMS data or echoed input, and retries 429/5xx/transport failures with
//! the documented exponential backoff.

use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;
use hyper::header::{HeaderName, HeaderValue};
use serde::Deserialize;
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
            Ok(bytes) => map_answer(status, content_type.as_deref(), &bytes),
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
        if let Ok(CredeauAnswer::Data(sms)) = &result {
            if let Some(e) = foreign_entries(user_id, &sms.entries) {
                self.metrics
                    .provider_identity_mismatch
                    .with_label_values(&[PROVIDER.as_str()])
                    .inc();
                return Err(e);
            }
        }
        if let Ok(CredeauAnswer::Data(sms)) = &mut result {
            sms.cnt_sms_threshold = Some(self.cnt_sms_threshold);
            if sms.partial {
                self.metrics
                    .provider_partial_answers
                    .with_label_values(&[PROVIDER.as_str()])
                    .inc();
            }
            if let Some(problem) = &sms.data_problem {
                self.metrics
                    .provider_unexpected_data
                    .with_label_values(&[PROVIDER.as_str()])
                    .inc();
                tracing::warn!(
                    provider = PROVIDER.as_str(),
                    problem = problem.as_str(),
                    "Credeau answered non-standard JSON; read leniently and published"
                );
            }
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

/// The identity mismatch of an answer whose entries name another
/// `user_id` than `asked` (entries without one are not checked), or `None`.
/// Reads each entry's `user_id` alone; the entries stay as Credeau sent them.
pub fn foreign_entries(asked: &str, entries: &[SmsEntry]) -> Option<ProviderError> {
    let mut foreign = 0usize;
    let mut first: Option<(usize, String)> = None;
    for (i, entry) in entries.iter().enumerate() {
        let named = identity::entry_user_id(entry.get());
        if let Some(named) = named {
            if !identity::same_id(asked, &named) {
                foreign += 1;
                first.get_or_insert_with(|| (i, named.into_owned()));
            }
        }
    }
    let (i, named) = first?;
    let detail = format!(
        " ({foreign} of {} SMS entries, the first is entry {i})",
        entries.len()
    );
    Some(identity::mismatch(
        PROVIDER,
        Some(200),
        asked,
        &named,
        &detail,
    ))
}

/// A 2xx body: the entries kept as text, and every other top-level key
/// (read in the same pass, so the entries are scanned once).
struct SuccessBody {
    extracted_sms_data: Vec<SmsEntry>,
    rest: Map<String, Value>,
}

/// A 2xx body as read from `body`: the entries are slices of it.
struct Borrowed<'a> {
    extracted_sms_data: Vec<&'a RawValue>,
    rest: Map<String, Value>,
}

/// `whole` read as a 2xx body, its entries slices of it.
fn read_within(whole: &Bytes) -> serde_json::Result<SuccessBody> {
    let read = serde_json::from_slice::<Borrowed<'_>>(whole)?;
    Ok(SuccessBody {
        extracted_sms_data: read
            .extracted_sms_data
            .into_iter()
            .map(|e| SmsEntry::within(whole, e.get()))
            .collect(),
        rest: read.rest,
    })
}

impl<'de> Deserialize<'de> for Borrowed<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Borrowed<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object with extracted_sms_data")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Borrowed<'de>, A::Error> {
                let mut entries = None;
                let mut rest = Map::new();
                while let Some(key) = map.next_key::<String>()? {
                    if key == "extracted_sms_data" {
                        entries = Some(map.next_value::<Vec<&'de RawValue>>()?);
                    } else {
                        rest.insert(key, map.next_value::<Value>()?);
                    }
                }
                let entries =
                    entries.ok_or_else(|| serde::de::Error::missing_field("extracted_sms_data"))?;
                Ok(Borrowed {
                    extracted_sms_data: entries,
                    rest,
                })
            }
        }
        d.deserialize_map(Visit)
    }
}

/// Whether Credeau said it holds more than it sent, and how it said so.
fn incompleteness(rest: &Map<String, Value>, sent: usize) -> Option<String> {
    let mut signs = Vec::new();
    if rest.get("has_more") == Some(&Value::Bool(true)) {
        signs.push("has_more: true".to_string());
    }
    match rest.get("next_cursor") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) if s.is_empty() => {}
        Some(_) => signs.push("a next_cursor".to_string()),
    }
    if let Some(total) = rest.get("total").and_then(Value::as_u64) {
        if total > sent as u64 {
            signs.push(format!("total {total}"));
        }
    }
    (!signs.is_empty()).then(|| {
        format!(
            "Credeau holds more than it sent ({}) for {sent} entries sent: only those are published",
            signs.join(", ")
        )
    })
}

/// Why a 2xx body could not be read.
enum SuccessRead {
    Malformed(serde_json::Error),
    Unreadable(lenient_json::Unreadable),
}

/// The 2xx body, strictly or else leniently read (see [`lenient_json`]):
/// Credeau answers the same way every time, so a repairable body is
/// repaired, not retried. With the body, what was repaired (`None` when
/// nothing was).
fn read_success(body: &Bytes) -> Result<(SuccessBody, Option<String>), SuccessRead> {
    let strict = match read_within(body) {
        Ok(parsed) => return Ok((parsed, None)),
        Err(e) => e,
    };
    match lenient_json::repair(body) {
        Ok(r) if !r.notes.is_empty() => {
            let summary = r.summary();
            match read_within(&Bytes::from(r.text)) {
                Ok(parsed) => Ok((parsed, summary)),
                Err(_) => Err(SuccessRead::Malformed(strict)),
            }
        }
        Ok(_) => Err(SuccessRead::Malformed(strict)),
        Err(u) => Err(SuccessRead::Unreadable(u)),
    }
}

/// Maps one Credeau response (status, content type, body) to an answer or
/// an error, as the table in `providers.md` says. Pure, so every row is unit
/// tested. Error text never quotes SMS data or echoed request input.
///
/// The answer's entries are copied out of `body` once, together; the client
/// reads its bodies with [`map_answer`], whose entries are the body itself.
pub fn map_response(
    status: u16,
    content_type: Option<&str>,
    body: &[u8],
) -> Result<CredeauAnswer, ProviderError> {
    map_answer(status, content_type, &Bytes::copy_from_slice(body))
}

/// [`map_response`] over a body the answer's entries slice (no copy): the
/// body stays in memory while any entry does.
pub fn map_answer(
    status: u16,
    content_type: Option<&str>,
    body: &Bytes,
) -> Result<CredeauAnswer, ProviderError> {
    if (200..300).contains(&status) {
        let (parsed, repaired) = match read_success(body) {
            Ok(read) => read,
            Err(why) => {
                let why = match why {
                    SuccessRead::Unreadable(u) => lenient_json::describe_unreadable(&u),
                    SuccessRead::Malformed(e) => {
                        let json_like =
                            content_type.is_some_and(|ct| ct.to_ascii_lowercase().contains("json"));
                        if json_like || e.classify() != serde_json::error::Category::Syntax {
                            json_error_summary(&e)
                        } else {
                            non_json_summary(content_type, body)
                        }
                    }
                };
                return Err(error(PROVIDER, Kind::InvalidBody, Some(status), why));
            }
        };
        if parsed.extracted_sms_data.is_empty() {
            return Ok(CredeauAnswer::Empty);
        }
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
        let incomplete = incompleteness(&parsed.rest, parsed.extracted_sms_data.len());
        let (response_json, envelope_problem) = super::envelope_json(&parsed.rest);
        return Ok(CredeauAnswer::Data(SmsExtraction {
            partial: incomplete.is_some(),
            data_problem: super::join_problems([repaired, incomplete, envelope_problem]),
            response_json,
            entries: parsed.extracted_sms_data,
            cnt_sms_threshold: None,
        }));
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
    fn entries_are_slices_of_the_body_they_came_in() {
        let body = Bytes::from_static(
            br#"{"extracted_sms_data": [{"_id": "a", "user_id": "u"}, {"_id": "b"}], "total": 2}"#,
        );
        let Ok(CredeauAnswer::Data(sms)) = map_answer(200, Some("application/json"), &body) else {
            panic!("a 200 with entries is data");
        };
        let within = body.as_ptr_range();
        for e in &sms.entries {
            assert!(within.contains(&e.get().as_ptr()), "an entry was copied");
        }
        assert_eq!(sms.entries[1].get(), r#"{"_id": "b"}"#);
        // A body read leniently: the entries are slices of the repaired text.
        let odd = br#"{"extracted_sms_data": [{"_id": "c", "transaction": NaN}]}"#;
        let Ok(CredeauAnswer::Data(sms)) = map_response(200, None, odd) else {
            panic!("a repairable body is data");
        };
        assert_eq!(sms.entries[0].get(), r#"{"_id": "c", "transaction": null}"#);
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

//! A small client for a Confluent-compatible schema registry: fetch a writer
//! schema by id (`GET /schemas/ids/{id}`), check a schema against a
//! subject's latest version (`POST /compatibility/subjects/{subject}/
//! versions/latest`) and register a schema under a subject (`POST
//! /subjects/{subject}/versions`). Ids and registrations are cached for the
//! life of the process: ids are immutable in the registry, and a schema
//! registered once keeps its id.
//!
//! Credentials (`encoding.schema_registry_username` / `_password`, given
//! with [`RegistryClient::with_basic_auth`]) are sent as HTTP basic auth.
//! Ones in the URL (`https://key:secret@host`; the service's configuration
//! refuses those) are taken out of it the same way, so they never appear in
//! a URL that an error message could echo.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use apache_avro::Schema;
use serde::Deserialize;

const CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Error bodies are quoted in errors; keep that short, except for the
/// answers to a registration, which explain an incompatible schema.
const MAX_QUOTED_BODY: usize = 200;
const MAX_QUOTED_REGISTRATION: usize = 64 * 1024;
/// How long start-up waits for a registry that does not answer (connection
/// refused, timeouts, HTTP 5xx), as it does for the brokers: a registry
/// restarting next to the service is not a reason to exit.
pub const STARTUP_WAIT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    #[error("schema registry URL is not valid: {0}")]
    InvalidUrl(String),
    /// The registry has no schema with this id (HTTP 404).
    #[error("schema id {0} is not known to the schema registry")]
    UnknownId(u32),
    /// The registry answered with an error status.
    #[error("schema registry answered HTTP {status}: {message}")]
    Status { status: u16, message: String },
    /// No answer: connection refused, reset, timeout, TLS.
    #[error("schema registry unreachable: {0}")]
    Transport(String),
    /// An answer that is not what the registry API says.
    #[error("schema registry answer not understood: {0}")]
    InvalidResponse(String),
    /// The schema behind an id is not an Avro schema we can parse.
    #[error("schema id {id} is not a usable Avro schema: {reason}")]
    InvalidSchema { id: u32, reason: String },
}

impl RegistryError {
    /// Whether asking again later can help (as opposed to the answer being
    /// final for this id or schema).
    pub fn is_transient(&self) -> bool {
        match self {
            RegistryError::Transport(_) | RegistryError::InvalidResponse(_) => true,
            // 4xx other than 404 means our credentials or setup; retrying
            // beats dead-lettering every record for an operator's mistake.
            RegistryError::Status { status, .. } => *status != 422 && *status != 409,
            RegistryError::InvalidUrl(_)
            | RegistryError::UnknownId(_)
            | RegistryError::InvalidSchema { .. } => false,
        }
    }
}

pub struct RegistryClient {
    http: reqwest::Client,
    /// Base URL without credentials and without a trailing slash.
    base: String,
    basic_auth: Option<(String, Option<String>)>,
    by_id: RwLock<HashMap<u32, Arc<Schema>>>,
    registered: RwLock<HashMap<(String, String), u32>>,
    startup_wait: Duration,
}

/// The registry's view of a schema for a subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compatibility {
    Compatible,
    /// With the registry's reasons, when it gives any (`verbose=true`).
    Incompatible(Vec<String>),
}

impl std::fmt::Debug for RegistryClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryClient")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct SchemaById {
    schema: String,
    #[serde(rename = "schemaType", default)]
    schema_type: Option<String>,
}

#[derive(Deserialize)]
struct Registered {
    id: u32,
}

#[derive(Deserialize)]
struct CompatibilityAnswer {
    is_compatible: bool,
    #[serde(default)]
    messages: Vec<String>,
}

impl RegistryClient {
    pub fn new(url: &str) -> Result<Self, RegistryError> {
        let mut parsed =
            url::Url::parse(url).map_err(|e| RegistryError::InvalidUrl(e.to_string()))?;
        if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
            return Err(RegistryError::InvalidUrl(
                "needs an http(s) scheme and a host".into(),
            ));
        }
        let basic_auth = if parsed.username().is_empty() {
            None
        } else {
            let user = decode_userinfo(parsed.username());
            let password = parsed.password().map(decode_userinfo);
            // Both setters only fail for URLs that cannot have credentials,
            // which http(s) URLs with a host always can.
            let _ = parsed.set_username("");
            let _ = parsed.set_password(None);
            Some((user, password))
        };
        let base = parsed.as_str().trim_end_matches('/').to_string();
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            .build()
            .map_err(|e| transport(&base, e))?;
        Ok(RegistryClient {
            http,
            base,
            basic_auth,
            by_id: RwLock::new(HashMap::new()),
            registered: RwLock::new(HashMap::new()),
            startup_wait: STARTUP_WAIT,
        })
    }

    /// Sends `username` and `password` as HTTP basic auth with every request
    /// (instead of any credentials the URL held).
    pub fn with_basic_auth(mut self, username: &str, password: &str) -> Self {
        self.basic_auth = Some((username.to_string(), Some(password.to_string())));
        self
    }

    /// How long start-up waits for the registry (default [`STARTUP_WAIT`]).
    pub fn with_startup_wait(mut self, wait: Duration) -> Self {
        self.startup_wait = wait;
        self
    }

    pub fn startup_wait(&self) -> Duration {
        self.startup_wait
    }

    /// The registry's base URL, credentials removed.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let rb = self
            .http
            .request(method, format!("{}{}", self.base, path))
            .header(reqwest::header::ACCEPT, CONTENT_TYPE);
        match &self.basic_auth {
            Some((user, password)) => rb.basic_auth(user, password.as_ref()),
            None => rb,
        }
    }

    /// The writer schema registered under `id`.
    pub async fn schema_by_id(&self, id: u32) -> Result<Arc<Schema>, RegistryError> {
        if let Some(s) = read_lock(&self.by_id).get(&id) {
            return Ok(Arc::clone(s));
        }
        let resp = self
            .request(reqwest::Method::GET, &format!("/schemas/ids/{id}"))
            .send()
            .await
            .map_err(|e| transport(&self.base, e))?;
        let status = resp.status();
        if status == reqwest::StatusCode::NOT_FOUND {
            return Err(RegistryError::UnknownId(id));
        }
        let body = resp.bytes().await.map_err(|e| transport(&self.base, e))?;
        if !status.is_success() {
            return Err(status_error(status, &body, MAX_QUOTED_BODY));
        }
        let answer: SchemaById = serde_json::from_slice(&body)
            .map_err(|e| RegistryError::InvalidResponse(e.to_string()))?;
        if let Some(t) = answer.schema_type.as_deref() {
            if !t.eq_ignore_ascii_case("AVRO") {
                return Err(RegistryError::InvalidSchema {
                    id,
                    reason: format!("schema type is {}", quote(t.as_bytes())),
                });
            }
        }
        let schema =
            Schema::parse_str(&answer.schema).map_err(|e| RegistryError::InvalidSchema {
                id,
                reason: e.to_string(),
            })?;
        let schema = Arc::new(schema);
        write_lock(&self.by_id).insert(id, Arc::clone(&schema));
        Ok(schema)
    }

    /// Registers `schema` (Avro schema JSON text) under `subject` and returns
    /// its id; registering the same schema again returns the same id.
    pub async fn register(&self, subject: &str, schema: &str) -> Result<u32, RegistryError> {
        let key = (subject.to_string(), schema.to_string());
        if let Some(id) = read_lock(&self.registered).get(&key) {
            return Ok(*id);
        }
        let path = subject_path(&["subjects", subject, "versions"])?;
        let body = serde_json::json!({ "schema": schema });
        let resp = self
            .request(reqwest::Method::POST, &path)
            .header(reqwest::header::CONTENT_TYPE, CONTENT_TYPE)
            .body(body.to_string())
            .send()
            .await
            .map_err(|e| transport(&self.base, e))?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(|e| transport(&self.base, e))?;
        if !status.is_success() {
            // A refused registration says why (an incompatibility lists
            // every difference): quoted whole, not cut.
            return Err(status_error(status, &bytes, MAX_QUOTED_REGISTRATION));
        }
        let answer: Registered = serde_json::from_slice(&bytes)
            .map_err(|e| RegistryError::InvalidResponse(e.to_string()))?;
        write_lock(&self.registered).insert(key, answer.id);
        Ok(answer.id)
    }

    /// Whether `schema` may be registered under `subject`, under the
    /// subject's compatibility level against its latest version. A subject
    /// with no versions yet accepts any schema (Confluent answers 404 there,
    /// Apicurio `true`).
    pub async fn check_compatibility(
        &self,
        subject: &str,
        schema: &str,
    ) -> Result<Compatibility, RegistryError> {
        let path = subject_path(&["compatibility", "subjects", subject, "versions", "latest"])?;
        let body = serde_json::json!({ "schema": schema });
        let resp = self
            .request(reqwest::Method::POST, &format!("{path}?verbose=true"))
            .header(reqwest::header::CONTENT_TYPE, CONTENT_TYPE)
            .body(body.to_string())
            .send()
            .await
            .map_err(|e| transport(&self.base, e))?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(|e| transport(&self.base, e))?;
        if status == reqwest::StatusCode::NOT_FOUND {
            return Ok(Compatibility::Compatible);
        }
        if !status.is_success() {
            return Err(status_error(status, &bytes, MAX_QUOTED_REGISTRATION));
        }
        let answer: CompatibilityAnswer = serde_json::from_slice(&bytes)
            .map_err(|e| RegistryError::InvalidResponse(e.to_string()))?;
        Ok(if answer.is_compatible {
            Compatibility::Compatible
        } else {
            Compatibility::Incompatible(answer.messages)
        })
    }
}

/// `/a/b/...` with each segment percent-encoded (subjects may hold any
/// character).
fn subject_path(segments: &[&str]) -> Result<String, RegistryError> {
    let mut url =
        url::Url::parse("http://x/").map_err(|e| RegistryError::InvalidUrl(e.to_string()))?;
    url.path_segments_mut()
        .map_err(|()| RegistryError::InvalidUrl("cannot build subject path".into()))?
        .clear()
        .extend(segments);
    Ok(url.path().to_string())
}

/// A poisoned lock only means another thread panicked mid-insert into a
/// cache of immutable entries; the map itself is still sound.
fn read_lock<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write_lock<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The registry's URL (credentials are never part of it) and why it did not
/// answer, with the causes reqwest keeps behind "error sending request".
fn transport(base: &str, e: reqwest::Error) -> RegistryError {
    let e = e.without_url();
    let mut reason = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(cause) = source {
        let text = cause.to_string();
        if !reason.contains(&text) {
            reason.push_str(": ");
            reason.push_str(&text);
        }
        source = cause.source();
    }
    RegistryError::Transport(format!("{base}: {reason}"))
}

fn status_error(status: reqwest::StatusCode, body: &[u8], limit: usize) -> RegistryError {
    #[derive(Deserialize)]
    struct ErrorBody {
        message: Option<String>,
    }
    let message = serde_json::from_slice::<ErrorBody>(body)
        .ok()
        .and_then(|b| b.message)
        .map(|m| quote_at_most(m.as_bytes(), limit))
        .unwrap_or_else(|| quote_at_most(body, limit));
    RegistryError::Status {
        status: status.as_u16(),
        message,
    }
}

fn quote(bytes: &[u8]) -> String {
    quote_at_most(bytes, MAX_QUOTED_BODY)
}

fn quote_at_most(bytes: &[u8], limit: usize) -> String {
    let cut = &bytes[..bytes.len().min(limit)];
    let mut s = crate::printable::quoted(cut);
    if bytes.len() > cut.len() {
        s.push_str("...");
    }
    s
}

/// Percent-decodes URL userinfo. The form decoder is the only one `url`
/// exposes; it reads `+` as a space, which userinfo does not, so `+` is
/// escaped first.
fn decode_userinfo(s: &str) -> String {
    url::form_urlencoded::parse(format!("x={}", s.replace('+', "%2B")).as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_leave_the_url_and_become_basic_auth() {
        let c = RegistryClient::new("https://key:s%40cret@registry.example:8081/").unwrap();
        assert_eq!(c.base_url(), "https://registry.example:8081");
        assert_eq!(
            c.basic_auth,
            Some(("key".to_string(), Some("s@cret".to_string())))
        );
        assert!(!format!("{c:?}").contains("cret"));
    }

    #[test]
    fn non_http_urls_are_rejected() {
        assert!(matches!(
            RegistryClient::new("ftp://registry"),
            Err(RegistryError::InvalidUrl(_))
        ));
        assert!(matches!(
            RegistryClient::new("not a url"),
            Err(RegistryError::InvalidUrl(_))
        ));
    }

    #[test]
    fn only_answers_that_can_change_are_transient() {
        assert!(RegistryError::Transport("reset".into()).is_transient());
        assert!(RegistryError::Status {
            status: 503,
            message: String::new()
        }
        .is_transient());
        assert!(!RegistryError::UnknownId(3).is_transient());
        assert!(!RegistryError::InvalidSchema {
            id: 3,
            reason: String::new()
        }
        .is_transient());
    }
}

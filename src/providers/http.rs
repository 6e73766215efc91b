//! What both provider clients share: a pooled HTTP client built from
//! settings, reading a response body under a size cap, turning transport
//! failures and provider bodies into safe error text, parsing `Retry-After`,
//! and the retry loop (rate-limit permit, attempt, metrics, log, back off).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{
    HeaderMap, HeaderName, HeaderValue, ACCEPT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER,
    USER_AGENT,
};
use hyper::{Method, Request, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

use super::body::{self, BodyError, BodyLimits};
use super::call;
pub(crate) use super::retry::{with_retries, AnswerOutcome, Attempt, RetryContext};
use super::{Provider, ProviderError, ProviderErrorKind};
use crate::config::ProviderHttpSettings;

/// Provider messages are at most 200 characters by contract; anything
/// longer is cut so an odd body cannot flood logs or DLQ headers.
pub(crate) const MAX_MESSAGE_CHARS: usize = 300;

/// Why a provider client could not be built (bad settings, unreadable CA).
#[derive(Debug, thiserror::Error)]
pub enum ClientBuildError {
    #[error("{key}: {reason}")]
    InvalidBaseUrl { key: String, reason: String },
    #[error("{key}: cannot read CA bundle {path}: {source}")]
    CaBundleUnreadable {
        key: String,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{key}: CA bundle {path} holds no usable PEM certificate")]
    CaBundleInvalid { key: String, path: String },
    /// The secret is not a valid HTTP header value (its value is not shown).
    #[error("{key}: not a valid HTTP header value")]
    InvalidHeaderValue { key: String },
    #[error("cannot build the HTTP client for {provider}: {reason}")]
    Build { provider: Provider, reason: String },
}

/// Connection settings common to both providers.
pub(crate) struct ClientOptions<'a> {
    pub provider: Provider,
    pub base_url: &'a str,
    pub connect_timeout: Duration,
    /// Until the answer begins (status line and headers).
    pub request_timeout: Duration,
    /// When an answer's body is cut (its stall, its floor).
    pub body_stall_timeout: Duration,
    pub min_body_bytes_per_second: u64,
    pub ca_bundle: Option<&'a std::path::Path>,
}

impl<'a> ClientOptions<'a> {
    /// A provider's options from its `base_url` and `[<provider>.http]`.
    pub fn new(provider: Provider, base_url: &'a str, http: &'a ProviderHttpSettings) -> Self {
        ClientOptions {
            provider,
            base_url,
            connect_timeout: http.connect_timeout,
            request_timeout: http.request_timeout,
            body_stall_timeout: http.body_stall_timeout,
            min_body_bytes_per_second: http.min_body_bytes_per_second,
            ca_bundle: http.ca_bundle.as_deref(),
        }
    }
}

/// A provider URL (its base URL, or the endpoint built on it), parsed once;
/// an error names the provider's `base_url` key.
pub(crate) fn endpoint_url(provider: Provider, url: &str) -> Result<url::Url, ClientBuildError> {
    url::Url::parse(url).map_err(|e| ClientBuildError::InvalidBaseUrl {
        key: format!("{}.base_url", provider.as_str()),
        reason: format!("not a URL ({e})"),
    })
}

/// Idle connections kept per provider host. A connection held about 20 KB
/// of buffers, and a burst left more of them open than calls ever ran at
/// once (a call that finds none idle opens one, then may take another
/// that fell idle meanwhile); the default `max_in_flight` (64) reuses
/// these.
const MAX_IDLE_CONNECTIONS: usize = 64;

/// How long an idle pooled connection is kept before it is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

const USER_AGENT_VALUE: &str = concat!("insights-enricher/", env!("CARGO_PKG_VERSION"));

type Connector = hyper_rustls::HttpsConnector<HttpConnector>;

/// A pooled HTTP client for one provider, on hyper directly: every request
/// is a JSON POST to one endpoint, so none of a general client's per-request
/// layers (redirects, cookies, URL re-parsing, default-header merging) are
/// paid for. A connect timeout and a timeout until the answer begins as
/// configured; a body is cut only when it stalls ([`super::body`]). HTTPS
/// only, unless the base URL is explicitly `http://` (the local simulator).
#[derive(Clone)]
pub(crate) struct ProviderHttp {
    provider: Provider,
    client: Client<Connector, Full<Bytes>>,
    endpoint: Uri,
    request_timeout: Duration,
    body_stall_timeout: Duration,
    min_body_bytes_per_second: u64,
}

impl std::fmt::Debug for ProviderHttp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProviderHttp")
            .field("endpoint", &self.endpoint)
            .field("request_timeout", &self.request_timeout)
            .finish_non_exhaustive()
    }
}

/// An answer's status line and headers, with its body still to be read
/// (by [`read_capped`]), cut only if it stalls.
pub(crate) struct Answer {
    head: hyper::http::response::Parts,
    body: Incoming,
    body_stall_timeout: Duration,
    min_body_bytes_per_second: u64,
}

impl Answer {
    pub fn status(&self) -> u16 {
        self.head.status.as_u16()
    }

    pub fn headers(&self) -> &HeaderMap {
        &self.head.headers
    }

    pub fn content_type(&self) -> Option<String> {
        self.head
            .headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    }
}

impl ProviderHttp {
    /// The client for `endpoint` (built on the provider's base URL).
    pub fn new(opts: &ClientOptions<'_>, endpoint: &str) -> Result<ProviderHttp, ClientBuildError> {
        let section = opts.provider.as_str();
        let url = endpoint_url(opts.provider, opts.base_url)?;
        let https = match url.scheme() {
            "https" => true,
            "http" => false,
            other => {
                return Err(ClientBuildError::InvalidBaseUrl {
                    key: format!("{section}.base_url"),
                    reason: format!(
                        "scheme must be https (or http for a local simulator), got {other}"
                    ),
                })
            }
        };
        let endpoint_url = endpoint_url(opts.provider, endpoint)?;
        let endpoint =
            Uri::try_from(endpoint_url.as_str()).map_err(|e| ClientBuildError::InvalidBaseUrl {
                key: format!("{section}.base_url"),
                reason: format!("not a URL ({e})"),
            })?;
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(ca_bundle) = opts.ca_bundle {
            let key = format!("{section}.ca_bundle");
            let pem = std::fs::read(ca_bundle).map_err(|source| {
                ClientBuildError::CaBundleUnreadable {
                    key: key.clone(),
                    path: ca_bundle.display().to_string(),
                    source,
                }
            })?;
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
                .filter_map(Result::ok)
                .collect();
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(ClientBuildError::CaBundleInvalid {
                    key,
                    path: ca_bundle.display().to_string(),
                });
            }
        }
        let build_error = |reason: String| ClientBuildError::Build {
            provider: opts.provider,
            reason,
        };
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| build_error(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let mut tcp = HttpConnector::new();
        tcp.enforce_http(false);
        tcp.set_nodelay(true);
        tcp.set_connect_timeout(Some(opts.connect_timeout));
        let schemes = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls);
        let schemes = if https {
            schemes.https_only()
        } else {
            schemes.https_or_http()
        };
        let connector = schemes.enable_all_versions().wrap_connector(tcp);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(IDLE_TIMEOUT)
            .pool_max_idle_per_host(MAX_IDLE_CONNECTIONS)
            .build(connector);
        Ok(ProviderHttp {
            provider: opts.provider,
            client,
            endpoint,
            request_timeout: opts.request_timeout,
            body_stall_timeout: opts.body_stall_timeout,
            min_body_bytes_per_second: opts.min_body_bytes_per_second,
        })
    }

    /// POSTs `body` (JSON) to the endpoint with `headers`, and waits for the
    /// answer's status line and headers. A redirect is not followed (it
    /// would resend our credentials to wherever it points, and neither
    /// provider documents one): a 3xx is an unexpected answer.
    pub async fn post_json<B: serde::Serialize>(
        &self,
        headers: &[(&HeaderName, &HeaderValue)],
        body: &B,
    ) -> Result<Answer, ProviderError> {
        let body = serde_json::to_vec(body).map_err(|e| {
            error(
                self.provider,
                ProviderErrorKind::BadRequest,
                None,
                format!("request body not encodable: {}", json_error_summary(&e)),
            )
        })?;
        let deadline = tokio::time::Instant::now() + self.request_timeout;
        let mut request = Request::new(Full::new(Bytes::from(body)));
        *request.method_mut() = Method::POST;
        *request.uri_mut() = self.endpoint.clone();
        let h = request.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        h.insert(USER_AGENT, HeaderValue::from_static(USER_AGENT_VALUE));
        h.insert(ACCEPT_ENCODING, HeaderValue::from_static("gzip"));
        for (name, value) in headers {
            h.insert(*name, (*value).clone());
        }
        match tokio::time::timeout_at(deadline, self.client.request(request)).await {
            Ok(Ok(response)) => {
                let (head, body) = response.into_parts();
                Ok(Answer {
                    head,
                    body,
                    body_stall_timeout: self.body_stall_timeout,
                    min_body_bytes_per_second: self.min_body_bytes_per_second,
                })
            }
            Ok(Err(e)) => Err(transport_error(self.provider, &e, None)),
            Err(_) => Err(timed_out(self.provider, self.request_timeout, None)),
        }
    }
}

/// A secret as a header value that HTTP debugging output hides.
pub(crate) fn secret_header(key: &str, value: &str) -> Result<HeaderValue, ClientBuildError> {
    let mut v = HeaderValue::from_str(value).map_err(|_| ClientBuildError::InvalidHeaderValue {
        key: key.to_string(),
    })?;
    v.set_sensitive(true);
    Ok(v)
}

/// A provider error with only the per-attempt parts filled; the retry loop
/// fills `attempts`.
pub(crate) fn error(
    provider: Provider,
    kind: ProviderErrorKind,
    http_status: Option<u16>,
    message: impl Into<String>,
) -> ProviderError {
    ProviderError::new(provider, kind, http_status, message)
}

/// A transport failure: timeouts are `Timeout`, everything else (refused,
/// reset, closed mid-body, TLS) is `Connection`. The text is the error's and
/// its causes'; hyper's errors never hold the URL, request headers or
/// bodies.
pub(crate) fn transport_error(
    provider: Provider,
    err: &(dyn std::error::Error + 'static),
    http_status: Option<u16>,
) -> ProviderError {
    let mut text = err.to_string();
    let mut timed_out = false;
    let mut source = Some(err);
    while let Some(s) = source {
        if s.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
        {
            timed_out = true;
        }
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    let kind = if timed_out {
        ProviderErrorKind::Timeout
    } else {
        ProviderErrorKind::Connection
    };
    error(
        provider,
        kind,
        http_status,
        truncate(&text, MAX_MESSAGE_CHARS),
    )
}

/// The answer did not begin within `request_timeout`.
fn timed_out(provider: Provider, limit: Duration, http_status: Option<u16>) -> ProviderError {
    error(
        provider,
        ProviderErrorKind::Timeout,
        http_status,
        format!(
            "operation timed out: no answer within the {} request timeout",
            humantime::format_duration(limit)
        ),
    )
}

/// Reads the whole body, gzip decoded, for as long as it keeps arriving
/// ([`body::read`]): refused as soon as it (or its decoding) would exceed
/// `max_bytes`, a timeout when it stalls.
pub(crate) async fn read_capped(
    provider: Provider,
    answer: Answer,
    max_bytes: usize,
) -> Result<Bytes, ProviderError> {
    let status = Some(answer.status());
    let too_large = |decoded: bool| {
        let what = if decoded {
            "decoded response body"
        } else {
            "response body"
        };
        error(
            provider,
            ProviderErrorKind::TooLarge,
            status,
            format!("{what} exceeds the {max_bytes}-byte limit"),
        )
    };
    let announced = answer
        .head
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|len| len > max_bytes as u64) {
        return Err(too_large(false));
    }
    // The answer has begun: the loop's cut and the record budget let it
    // finish; only a stall cuts it.
    // Its bytes count against the record's answers: the announced length
    // before a byte is read (a large answer waits for the byte budget to
    // have room for it), then what arrives beyond it.
    let arriving = call::body_arriving();
    let prepaid = match (announced, &arriving) {
        (Some(len), Some(guard)) => {
            let len = usize::try_from(len).unwrap_or(usize::MAX);
            guard.make_room(len, answer.body_stall_timeout).await;
            len
        }
        _ => 0,
    };
    let mut seen = 0usize;
    let counted = |n: usize| {
        let before = seen;
        let after = before.saturating_add(n);
        seen = after;
        let beyond = after.saturating_sub(prepaid) - before.saturating_sub(prepaid);
        if let (true, Some(guard)) = (beyond > 0, &arriving) {
            guard.arrived(beyond);
        }
    };
    let limits = BodyLimits {
        max_bytes,
        stall_timeout: answer.body_stall_timeout,
        min_bytes_per_second: answer.min_body_bytes_per_second,
    };
    match body::read(&answer.head.headers, answer.body, limits, counted).await {
        Ok(bytes) => Ok(bytes),
        Err(BodyError::TooLarge { decoded }) => Err(too_large(decoded)),
        Err(BodyError::Stalled(why)) => {
            Err(error(provider, ProviderErrorKind::Timeout, status, why))
        }
        Err(BodyError::Transport(e)) => Err(transport_error(provider, &e, status)),
        Err(BodyError::BadGzip(why)) => Err(error(
            provider,
            ProviderErrorKind::InvalidBody,
            status,
            truncate(
                &format!("gzip body not decodable: {why}"),
                MAX_MESSAGE_CHARS,
            ),
        )),
    }
}

/// `Retry-After` as a wait from `now`: delta-seconds (fractions tolerated)
/// or an HTTP-date (a date in the past means "now").
pub(crate) fn parse_retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let raw = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = raw.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    if let Ok(secs) = raw.parse::<f64>() {
        return Duration::try_from_secs_f64(secs).ok();
    }
    let at = httpdate::parse_http_date(raw).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// At most `max` characters, marked when cut.
pub(crate) fn truncate(text: &str, max: usize) -> String {
    let text = text.trim();
    match text.char_indices().nth(max) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text.to_string(),
    }
}

/// A description of a JSON parse failure that never quotes the input
/// (serde's own messages may quote a value, and values can be SMS bodies).
pub(crate) fn json_error_summary(e: &serde_json::Error) -> String {
    use serde_json::error::Category;
    let what = match e.classify() {
        Category::Eof => "truncated JSON",
        Category::Syntax => "malformed JSON",
        Category::Data => "JSON of an unexpected shape",
        Category::Io => "unreadable JSON",
    };
    format!("{what} (line {}, column {})", e.line(), e.column())
}

/// A short description of a body that is not the JSON we expected: its
/// content type, size, and an HTML page's title.
pub(crate) fn non_json_summary(content_type: Option<&str>, body: &[u8]) -> String {
    let ct = content_type.unwrap_or("no content type");
    let mut text = format!("non-JSON body ({ct}, {} bytes", body.len());
    if let Some(title) = html_title(body) {
        text.push_str(&format!(", title {:?}", truncate(&title, 80)));
    }
    text.push(')');
    text
}

fn html_title(body: &[u8]) -> Option<String> {
    let head = &body[..body.len().min(4096)];
    let text = String::from_utf8_lossy(head);
    let lower = text.to_ascii_lowercase();
    let start = lower.find("<title>")? + "<title>".len();
    let end = start + lower[start..].find("</title>")?;
    Some(text[start..end].trim().to_string())
}

/// Replaces any occurrence of our secrets in provider-supplied text, in case
/// a provider or proxy echoes a header or the request back.
pub(crate) fn scrub(text: &str, secrets: &[&str]) -> String {
    let mut out = text.to_string();
    for s in secrets.iter().filter(|s| s.len() >= 4) {
        if out.contains(*s) {
            out = out.replace(*s, "<redacted>");
        }
    }
    out
}

#[cfg(test)]
mod tests;

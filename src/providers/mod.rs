//! The two provider APIs as the rest of the service sees them: typed answers,
//! typed errors, and the traits the pipeline calls. The HTTP clients live in
//! the submodules; every response maps to exactly one variant here.

use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

pub(crate) mod body;
pub mod budget;
pub mod call;
pub mod credeau;
pub mod finbox;
pub mod http;
pub mod identity;
pub mod lenient_json;
pub mod ratelimit;
pub mod retry;
pub mod salt;

pub use credeau::CredeauClient;
pub use finbox::FinboxClient;
pub use http::ClientBuildError;
pub use ratelimit::RateLimiter;
pub use retry::RetryPolicy;

/// Which provider a poll, an error or a metric is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    Finbox,
    Credeau,
}

impl Provider {
    pub const ALL: [Provider; 2] = [Provider::Finbox, Provider::Credeau];

    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Finbox => "finbox",
            Provider::Credeau => "credeau",
        }
    }
}

impl std::fmt::Display for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One FinBox predictor. The set depends on version and contract, so it is
/// kept open: any name, any JSON value, and any other key of the entry.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Predictor {
    pub name: String,
    pub value: serde_json::Value,
    /// The entry's keys other than `name` and `value`, as FinBox sent them.
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// A completed FinBox featurization. Nothing FinBox sent about it is
/// dropped: `data_json` holds `data` byte for byte, and `predictors` is the
/// part of it that reads as the documented `{name, value}` list.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct FinboxInsights {
    pub request_id: Option<String>,
    /// Raw provider timestamps (`YYYY-MM-DDThh:mm:ss:mil`), kept verbatim.
    pub date_requested: Option<String>,
    pub date_processed: Option<String>,
    /// The top-level `message` ("data processed successfully").
    pub message: Option<String>,
    /// The DC_PREDICTORS_VERSION the request asked for (set by the client).
    pub version: Option<i64>,
    /// The `customer_id` FinBox echoed (checked against the one asked for;
    /// kept for audit).
    pub customer_id: Option<String>,
    pub predictors: Vec<Predictor>,
    /// `data` exactly as FinBox sent it (JSON text); `None` when absent.
    pub data_json: Option<String>,
    /// Why `data` is not (wholly) the documented list of `{name, value}`
    /// objects, and what was repaired to read the answer; `None` when
    /// there is nothing to say.
    pub data_problem: Option<String>,
    /// The `version` FinBox's answer named, when it named one as an integer.
    pub answered_version: Option<i64>,
    /// The answer's top-level keys other than the documented ones, as a
    /// JSON object text (bounded, see [`envelope_json`]); `None` when none.
    pub response_json: Option<String>,
}

/// The most bytes an answer's envelope (`response_json`) may take in an
/// event; a larger one is left out and the data problem says so.
pub const MAX_ENVELOPE_BYTES: usize = 65_536;

/// `rest` (an answer's top-level keys other than the ones an event carries
/// in fields of their own) as JSON object text, or why it is left out.
pub fn envelope_json(
    rest: &serde_json::Map<String, serde_json::Value>,
) -> (Option<String>, Option<String>) {
    if rest.is_empty() {
        return (None, None);
    }
    let text = serde_json::Value::Object(rest.clone()).to_string();
    if text.len() > MAX_ENVELOPE_BYTES {
        let keys: Vec<&str> = rest.keys().map(String::as_str).take(10).collect();
        return (
            None,
            Some(format!(
                "the answer's other top-level keys ({}) take {} bytes, over {MAX_ENVELOPE_BYTES}: left out of response_json",
                keys.join(", "),
                text.len()
            )),
        );
    }
    (Some(text), None)
}

/// Joins data problems into one text (`None` when there are none).
pub fn join_problems<I: IntoIterator<Item = Option<String>>>(parts: I) -> Option<String> {
    let parts: Vec<String> = parts.into_iter().flatten().collect();
    (!parts.is_empty()).then(|| parts.join("; "))
}

/// What a FinBox call answered, once it answered something meaningful.
// One answer per poll, moved into the task's effects at once: never held
// in bulk, so the size of `Complete` costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum FinboxAnswer {
    /// 202 `in_progress`; the message may suggest a wait ("try again in 10 Seconds").
    InProgress {
        suggested_wait: Option<Duration>,
        request_id: Option<String>,
    },
    /// 200 `complete`.
    Complete(FinboxInsights),
    /// 200 `no_data`: processing finished, the device gave nothing.
    NoData { request_id: Option<String> },
    /// 200 `not_found`: the SDK may not have synced yet.
    NotFound { request_id: Option<String> },
}

impl FinboxAnswer {
    /// FinBox's `request_id` of this answer, when it sent one.
    pub fn request_id(&self) -> Option<&str> {
        match self {
            FinboxAnswer::InProgress { request_id, .. }
            | FinboxAnswer::NoData { request_id }
            | FinboxAnswer::NotFound { request_id } => request_id.as_deref(),
            FinboxAnswer::Complete(ins) => ins.request_id.as_deref(),
        }
    }
}

/// One extracted SMS: a JSON object, kept as the text Credeau sent (unknown
/// fields too). JSON events carry it over byte for byte, so it is neither
/// parsed into a map nor encoded again; the Avro encoder reads its fields.
///
/// The text is a slice of the answer's body, not a copy: a 30 MB answer's
/// entries are the body itself, held once, rather than the body and then
/// each entry again beside it while the answer is read.
#[derive(Clone)]
pub struct SmsEntry(bytes::Bytes);

impl SmsEntry {
    /// The entry's JSON text.
    pub fn get(&self) -> &str {
        // SAFETY: every constructor takes its bytes from a `&str` (or a
        // `String`), so they are UTF-8.
        unsafe { std::str::from_utf8_unchecked(&self.0) }
    }

    /// The entry `text`, which lies within `whole`, as a slice of `whole`
    /// (no copy). Panics when it does not lie within it.
    pub(crate) fn within(whole: &bytes::Bytes, text: &str) -> SmsEntry {
        SmsEntry(whole.slice_ref(text.as_bytes()))
    }

    /// An entry of its own from JSON text, which must be one JSON value.
    pub fn from_json(text: String) -> Result<SmsEntry, serde_json::Error> {
        serde_json::from_str::<&serde_json::value::RawValue>(&text)?;
        Ok(SmsEntry(bytes::Bytes::from(text)))
    }
}

/// Written as the JSON value it is (through a copy: not for the hot path).
impl serde::Serialize for SmsEntry {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        serde_json::value::RawValue::from_string(self.get().to_owned())
            .map_err(serde::ser::Error::custom)?
            .serialize(s)
    }
}

/// Its length only: an entry holds an SMS body.
impl std::fmt::Debug for SmsEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SmsEntry({} bytes)", self.0.len())
    }
}

/// Credeau's extracted SMS. Each entry is kept whole (unknown fields too).
/// Holds SMS bodies: never log it, never put it in an error.
#[derive(Clone, Default)]
pub struct SmsExtraction {
    pub entries: Vec<SmsEntry>,
    /// The `cnt_sms_threshold` the request sent (set by the client): when
    /// there are exactly this many entries, the device may hold more.
    pub cnt_sms_threshold: Option<u32>,
    /// What had to be repaired to read Credeau's answer (a non-finite
    /// number read as null, a byte-order mark skipped); `None` when it was
    /// standard JSON.
    pub data_problem: Option<String>,
    /// The answer's top-level keys other than `extracted_sms_data`, as a
    /// JSON object text (bounded); `None` when there were none.
    pub response_json: Option<String>,
    /// Credeau said it holds more than it sent (`has_more: true`, a
    /// `next_cursor`, or a `total` above the entries sent).
    pub partial: bool,
}

impl PartialEq for SmsExtraction {
    fn eq(&self, other: &Self) -> bool {
        self.cnt_sms_threshold == other.cnt_sms_threshold
            && self.data_problem == other.data_problem
            && self.response_json == other.response_json
            && self.partial == other.partial
            && self
                .entries
                .iter()
                .map(|e| e.get())
                .eq(other.entries.iter().map(|e| e.get()))
    }
}

impl std::fmt::Debug for SmsExtraction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "SmsExtraction {{ {} entries, cnt_sms_threshold {:?} }}",
            self.entries.len(),
            self.cnt_sms_threshold
        )
    }
}

/// What a Credeau call answered.
#[derive(Debug, Clone, PartialEq)]
pub enum CredeauAnswer {
    /// 200 with a non-empty `extracted_sms_data`.
    Data(SmsExtraction),
    /// 200 with an empty array: not synced yet (or the sync failed).
    Empty,
}

/// Why a call failed. The split between retryable and not follows
/// `providers.md`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderErrorKind {
    /// 400 (FinBox "Missing Key ...").
    BadRequest,
    /// 401 (Credeau wrong credentials).
    Unauthorized,
    /// 403 (wrong key, IP not whitelisted, wrong path).
    Forbidden,
    /// 422 (Credeau FastAPI validation `detail`).
    Unprocessable,
    /// Any other 4xx that is not retryable (404, 405, 413, ...).
    UnexpectedStatus,
    /// 429.
    RateLimited,
    /// 5xx.
    ServerError,
    /// The request or response did not complete in time.
    Timeout,
    /// Connection refused, reset, dropped mid-response, TLS failure.
    Connection,
    /// A body that is not what the document says (not JSON, truncated,
    /// wrong shape, unknown status).
    InvalidBody,
    /// The response exceeded the configured size cap.
    TooLarge,
    /// An answer that arrived whole but whose event cannot be published
    /// (one SMS entry larger than `topics.max_message_bytes`): ours to fix,
    /// not the provider's.
    OutputTooLarge,
    /// An answer about someone else: FinBox echoed another `customer_id`,
    /// or a Credeau SMS entry names another `user_id`. Never published as
    /// this user's data, never retried.
    IdentityMismatch,
    /// An answer that arrived whole but whose event cannot be encoded for
    /// another reason than its size: ours to fix, not the provider's.
    OutputUnencodable,
}

impl ProviderErrorKind {
    /// Whether waiting and asking again can help.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ProviderErrorKind::RateLimited
                | ProviderErrorKind::ServerError
                | ProviderErrorKind::Timeout
                | ProviderErrorKind::Connection
                | ProviderErrorKind::InvalidBody
        )
    }

    /// Answers that mean our own credentials or network setup are wrong:
    /// they are counted and alerted on, since every user will fail alike.
    pub fn is_credential_problem(self) -> bool {
        matches!(
            self,
            ProviderErrorKind::Unauthorized | ProviderErrorKind::Forbidden
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ProviderErrorKind::BadRequest => "bad_request",
            ProviderErrorKind::Unauthorized => "unauthorized",
            ProviderErrorKind::Forbidden => "forbidden",
            ProviderErrorKind::Unprocessable => "unprocessable",
            ProviderErrorKind::UnexpectedStatus => "unexpected_status",
            ProviderErrorKind::RateLimited => "rate_limited",
            ProviderErrorKind::ServerError => "server_error",
            ProviderErrorKind::Timeout => "timeout",
            ProviderErrorKind::Connection => "connection",
            ProviderErrorKind::InvalidBody => "invalid_body",
            ProviderErrorKind::TooLarge => "too_large",
            ProviderErrorKind::OutputTooLarge => "output_too_large",
            ProviderErrorKind::IdentityMismatch => "identity_mismatch",
            ProviderErrorKind::OutputUnencodable => "output_unencodable",
        }
    }
}

/// A failed call, after the in-process retries the provider documents.
/// `message` is safe to log: it never holds secrets, salts or SMS bodies.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{provider} {kind}{status}: {message}", kind = kind.as_str(), status = http_status.map(|s| format!(" (HTTP {s})")).unwrap_or_default())]
pub struct ProviderError {
    pub provider: Provider,
    pub kind: ProviderErrorKind,
    pub http_status: Option<u16>,
    pub message: String,
    /// The provider's own request id, when it sent one (support tickets).
    pub provider_request_id: Option<String>,
    /// A `Retry-After` the provider sent with its last answer.
    pub retry_after: Option<Duration>,
    /// How many HTTP requests this call made (1 + in-process retries).
    pub attempts: u32,
    /// With `IdentityMismatch`: the id the answer named (kept for audit).
    pub answered_id: Option<String>,
}

impl ProviderError {
    /// An error of `provider` of `kind`, with the answer's HTTP status if
    /// there was one, counted as one attempt.
    pub fn new(
        provider: Provider,
        kind: ProviderErrorKind,
        http_status: Option<u16>,
        message: impl Into<String>,
    ) -> ProviderError {
        ProviderError {
            provider,
            kind,
            http_status,
            message: message.into(),
            provider_request_id: None,
            retry_after: None,
            attempts: 1,
            answered_id: None,
        }
    }

    pub fn is_retryable(&self) -> bool {
        self.kind.is_retryable()
    }
}

/// The FinBox Insights API, as the pipeline calls it.
#[async_trait]
pub trait FinboxApi: Send + Sync {
    async fn fetch_predictors(&self, customer_id: &str) -> Result<FinboxAnswer, ProviderError>;
}

/// The Credeau SMS extraction API, as the pipeline calls it.
#[async_trait]
pub trait CredeauApi: Send + Sync {
    async fn fetch_sms(&self, user_id: &str) -> Result<CredeauAnswer, ProviderError>;
}

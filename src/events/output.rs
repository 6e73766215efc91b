//! Building the values of the three output events (FinBox predictors, SMS
//! extraction, insights ready) in the configured encoding. Keys are the
//! caller's business (always `user_id`). With Avro the schemas are
//! registered once at start and their ids kept; encoding itself is
//! synchronous and allocation-light, since it sits on the hot path.

use std::borrow::Cow;
use std::sync::Arc;

use serde::Serialize;

use super::avro::{
    self, put_bool, put_double, put_int, put_long, put_opt, put_opt_str, put_str, EventSchema,
};
pub use super::encode_error::EncodeError;
use super::registry::RegistryClient;
use super::sms::{self, SmsHeader};
use super::timestamps::parse_finbox_timestamp;
use crate::config::{OutputEncoding, TopicSettings};
use crate::providers::{FinboxInsights, Provider, SmsExtraction};
use crate::task::{Millis, ProviderTrack, Task};

/// Registered schema ids, one per output subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchemaIds {
    pub finbox_predictors: u32,
    pub sms_extraction: u32,
    pub insights_ready: u32,
}

/// Builds output values. Cheap to share; holds only the encoding and, for
/// Avro, the registered schema ids.
#[derive(Debug, Clone)]
pub struct OutputEncoder {
    avro_ids: Option<SchemaIds>,
}

impl OutputEncoder {
    /// Registers the three output schemas under "<topic>-value" subjects when
    /// Avro is configured.
    pub async fn new(
        encoding: OutputEncoding,
        registry: Option<Arc<RegistryClient>>,
        topics: &TopicSettings,
    ) -> Result<OutputEncoder, EncodeError> {
        let avro_ids = match encoding {
            OutputEncoding::Json => None,
            OutputEncoding::Avro => {
                let registry = registry.ok_or(EncodeError::NoRegistry)?;
                let ids = super::startup::register_all(
                    &registry,
                    &[
                        (&topics.finbox_predictors, EventSchema::FinboxPredictors),
                        (&topics.sms_extraction, EventSchema::SmsExtraction),
                        (&topics.combined, EventSchema::InsightsReady),
                    ],
                )
                .await?;
                Some(SchemaIds {
                    finbox_predictors: ids[0],
                    sms_extraction: ids[1],
                    insights_ready: ids[2],
                })
            }
        };
        Ok(OutputEncoder { avro_ids })
    }

    /// The registered ids (Avro only).
    pub fn schema_ids(&self) -> Option<SchemaIds> {
        self.avro_ids
    }

    pub fn finbox_predictors(
        &self,
        task: &Task,
        insights: &FinboxInsights,
        fetched_at: Millis,
    ) -> Result<Vec<u8>, EncodeError> {
        let u = &task.user;
        let date_processed_at = insights
            .date_processed
            .as_deref()
            .and_then(parse_finbox_timestamp);
        let Some(ids) = self.avro_ids else {
            let event = FinboxPredictorsJson {
                event_id: &u.event_id,
                user_id: &u.user_id,
                finbox_customer_id: &u.finbox_customer_id,
                onboarded_at: u.onboarded_at,
                fetched_at,
                request_id: insights.request_id.as_deref(),
                date_requested: insights.date_requested.as_deref(),
                date_processed: insights.date_processed.as_deref(),
                date_processed_at,
                predictors: insights
                    .predictors
                    .iter()
                    .map(|p| PredictorJson {
                        name: &p.name,
                        value: PredictorValue::from_json(&p.value),
                        extra: p
                            .extra
                            .iter()
                            .map(|(k, v)| (k.as_str(), v.to_string()))
                            .collect(),
                    })
                    .collect(),
                version: insights.version,
                message: insights.message.as_deref(),
                data_json: insights.data_json.as_deref(),
                data_problem: insights.data_problem.as_deref(),
                answered_customer_id: insights.customer_id.as_deref(),
                answered_version: insights.answered_version,
                response_json: insights.response_json.as_deref(),
            };
            return Ok(serde_json::to_vec(&event)?);
        };
        let mut buf = Vec::with_capacity(256 + insights.predictors.len() * 48);
        avro::put_wire_header(&mut buf, ids.finbox_predictors);
        put_str(&mut buf, &u.event_id);
        put_str(&mut buf, &u.user_id);
        put_str(&mut buf, &u.finbox_customer_id);
        put_long(&mut buf, u.onboarded_at);
        put_long(&mut buf, fetched_at);
        put_opt_str(&mut buf, insights.request_id.as_deref());
        put_opt_str(&mut buf, insights.date_requested.as_deref());
        put_opt_str(&mut buf, insights.date_processed.as_deref());
        put_opt(&mut buf, date_processed_at, put_long);
        if !insights.predictors.is_empty() {
            put_long(&mut buf, avro::len_i64(insights.predictors.len()));
            for p in &insights.predictors {
                put_str(&mut buf, &p.name);
                PredictorValue::from_json(&p.value).put_avro(&mut buf);
                if !p.extra.is_empty() {
                    put_long(&mut buf, avro::len_i64(p.extra.len()));
                    for (k, v) in &p.extra {
                        put_str(&mut buf, k);
                        put_str(&mut buf, &v.to_string());
                    }
                }
                put_long(&mut buf, 0);
            }
        }
        put_long(&mut buf, 0);
        put_opt(&mut buf, insights.version, put_long);
        put_opt_str(&mut buf, insights.message.as_deref());
        put_opt_str(&mut buf, insights.data_json.as_deref());
        put_opt_str(&mut buf, insights.data_problem.as_deref());
        put_opt_str(&mut buf, insights.customer_id.as_deref());
        put_opt(&mut buf, insights.answered_version, put_long);
        put_opt_str(&mut buf, insights.response_json.as_deref());
        Ok(buf)
    }

    /// One value per part: splits entries into numbered parts so each
    /// encoded value is <= max_bytes; an entry that alone exceeds max_bytes
    /// is an EncodeError::TooLarge.
    pub fn sms_extraction(
        &self,
        task: &Task,
        sms: &SmsExtraction,
        fetched_at: Millis,
        max_bytes: usize,
    ) -> Result<Vec<Vec<u8>>, EncodeError> {
        let u = &task.user;
        let header = SmsHeader {
            event_id: &u.event_id,
            user_id: &u.user_id,
            credeau_user_id: &u.credeau_user_id,
            onboarded_at: u.onboarded_at,
            fetched_at,
            cnt_sms_threshold: sms.cnt_sms_threshold,
            data_problem: sms.data_problem.as_deref(),
            response_json: sms.response_json.as_deref(),
        };
        match self.avro_ids {
            Some(ids) => sms::encode_avro(&header, &sms.entries, ids.sms_extraction, max_bytes),
            None => sms::encode_json(&header, &sms.entries, max_bytes),
        }
    }

    pub fn insights_ready(
        &self,
        task: &Task,
        completed_at: Millis,
    ) -> Result<Vec<u8>, EncodeError> {
        let finbox = ProviderResult::from_track(Provider::Finbox, &task.finbox)?;
        let credeau = ProviderResult::from_track(Provider::Credeau, &task.credeau)?;
        let u = &task.user;
        let Some(ids) = self.avro_ids else {
            let event = InsightsReadyJson {
                event_id: &u.event_id,
                user_id: &u.user_id,
                onboarded_at: u.onboarded_at,
                completed_at,
                replay_of: task.replay_of.as_deref(),
                finbox,
                credeau,
            };
            return Ok(serde_json::to_vec(&event)?);
        };
        let mut buf = Vec::with_capacity(256);
        avro::put_wire_header(&mut buf, ids.insights_ready);
        put_str(&mut buf, &u.event_id);
        put_str(&mut buf, &u.user_id);
        put_long(&mut buf, u.onboarded_at);
        put_long(&mut buf, completed_at);
        put_opt_str(&mut buf, task.replay_of.as_deref());
        finbox.put_avro(&mut buf);
        credeau.put_avro(&mut buf);
        Ok(buf)
    }
}

#[derive(Serialize)]
struct FinboxPredictorsJson<'a> {
    event_id: &'a str,
    user_id: &'a str,
    finbox_customer_id: &'a str,
    onboarded_at: Millis,
    fetched_at: Millis,
    request_id: Option<&'a str>,
    date_requested: Option<&'a str>,
    date_processed: Option<&'a str>,
    date_processed_at: Option<Millis>,
    predictors: Vec<PredictorJson<'a>>,
    version: Option<i64>,
    message: Option<&'a str>,
    data_json: Option<&'a str>,
    data_problem: Option<&'a str>,
    answered_customer_id: Option<&'a str>,
    answered_version: Option<i64>,
    response_json: Option<&'a str>,
}

#[derive(Serialize)]
struct PredictorJson<'a> {
    name: &'a str,
    value: PredictorValue<'a>,
    /// As in Avro: the value's JSON text, so both encodings agree.
    extra: std::collections::BTreeMap<&'a str, String>,
}

/// A predictor value in the union both encodings share:
/// null | boolean | long | double | string.
#[derive(Debug, PartialEq, Serialize)]
#[serde(untagged)]
enum PredictorValue<'a> {
    Null,
    Boolean(bool),
    Long(i64),
    Double(f64),
    String(Cow<'a, str>),
}

impl<'a> PredictorValue<'a> {
    fn from_json(v: &'a serde_json::Value) -> Self {
        use serde_json::Value as J;
        match v {
            J::Null => PredictorValue::Null,
            J::Bool(b) => PredictorValue::Boolean(*b),
            J::Number(n) => match n.as_i64() {
                Some(i) => PredictorValue::Long(i),
                // u64 above i64::MAX, or a fraction; serde_json numbers are
                // always finite.
                None => PredictorValue::Double(n.as_f64().unwrap_or(f64::NAN)),
            },
            J::String(s) => PredictorValue::String(Cow::Borrowed(s)),
            J::Array(_) | J::Object(_) => PredictorValue::String(Cow::Owned(v.to_string())),
        }
    }

    fn put_avro(&self, buf: &mut Vec<u8>) {
        match self {
            PredictorValue::Null => put_long(buf, 0),
            PredictorValue::Boolean(b) => {
                put_long(buf, 1);
                put_bool(buf, *b);
            }
            PredictorValue::Long(i) => {
                put_long(buf, 2);
                put_long(buf, *i);
            }
            PredictorValue::Double(d) => {
                put_long(buf, 3);
                put_double(buf, *d);
            }
            PredictorValue::String(s) => {
                put_long(buf, 4);
                put_str(buf, s);
            }
        }
    }
}

#[derive(Serialize)]
struct InsightsReadyJson<'a> {
    event_id: &'a str,
    user_id: &'a str,
    onboarded_at: Millis,
    completed_at: Millis,
    replay_of: Option<&'a str>,
    finbox: ProviderResult<'a>,
    credeau: ProviderResult<'a>,
}

#[derive(Serialize)]
struct ProviderResult<'a> {
    outcome: &'static str,
    #[serde(skip)]
    outcome_index: i32,
    polls: i32,
    first_poll_at: Option<Millis>,
    finished_at: Millis,
    items: Option<i32>,
    error_kind: Option<&'static str>,
    http_status: Option<i32>,
    error_message: Option<&'a str>,
    provider_request_id: Option<&'a str>,
    request_id: Option<&'a str>,
    answered_id: Option<&'a str>,
    data_problem: Option<&'a str>,
    partial: bool,
}

impl<'a> ProviderResult<'a> {
    fn from_track(provider: Provider, t: &'a ProviderTrack) -> Result<Self, EncodeError> {
        let done = t.done.as_ref().ok_or(EncodeError::NotFinal(provider))?;
        let err = t.last_error.as_ref();
        Ok(ProviderResult {
            outcome: done.outcome.as_str(),
            // Symbol order of ProviderOutcome in insights_ready.avsc.
            outcome_index: match done.outcome {
                crate::task::Outcome::Complete => 0,
                crate::task::Outcome::NoData => 1,
                crate::task::Outcome::NotFound => 2,
                crate::task::Outcome::TimedOut => 3,
                crate::task::Outcome::Failed => 4,
            },
            polls: saturating_i32(t.polls),
            first_poll_at: t.first_poll_at,
            finished_at: done.at,
            items: done.items.map(saturating_i32),
            error_kind: err.map(|e| e.kind.as_str()),
            http_status: err.and_then(|e| e.http_status).map(i32::from),
            error_message: err.map(|e| e.message.as_str()),
            provider_request_id: err.and_then(|e| e.provider_request_id.as_deref()),
            request_id: t.request_id.as_deref(),
            answered_id: err.and_then(|e| e.answered_id.as_deref()),
            data_problem: t.data_problem.as_deref(),
            partial: t.partial,
        })
    }

    fn put_avro(&self, buf: &mut Vec<u8>) {
        put_int(buf, self.outcome_index);
        put_int(buf, self.polls);
        put_opt(buf, self.first_poll_at, put_long);
        put_long(buf, self.finished_at);
        put_opt(buf, self.items, put_int);
        put_opt_str(buf, self.error_kind);
        put_opt(buf, self.http_status, put_int);
        put_opt_str(buf, self.error_message);
        put_opt_str(buf, self.provider_request_id);
        put_opt_str(buf, self.request_id);
        put_opt_str(buf, self.answered_id);
        put_opt_str(buf, self.data_problem);
        put_bool(buf, self.partial);
    }
}

fn saturating_i32(n: u32) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn predictor_values_map_to_the_narrowest_union_branch() {
        let cases = [
            (serde_json::json!(null), PredictorValue::Null),
            (serde_json::json!(true), PredictorValue::Boolean(true)),
            (serde_json::json!(-7), PredictorValue::Long(-7)),
            (
                serde_json::json!(u64::MAX),
                PredictorValue::Double(u64::MAX as f64),
            ),
            (serde_json::json!(0.5), PredictorValue::Double(0.5)),
            (serde_json::json!("x"), PredictorValue::String("x".into())),
            (
                serde_json::json!({"a": [1]}),
                PredictorValue::String("{\"a\":[1]}".into()),
            ),
        ];
        for (json, expected) in cases {
            assert_eq!(PredictorValue::from_json(&json), expected, "{json}");
        }
    }
}

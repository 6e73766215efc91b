//! Dead letters, as part of the event contract: the record that failed
//! plus headers saying what failed, where and why (the header names are
//! documented in docs/events.md and the AsyncAPI document; `dlq inspect`
//! and `dlq replay` read them). The closed vocabularies of those headers
//! (stage, reason, replay target) are [`crate::core::dead_letter`]'s.

pub use crate::core::dead_letter::{Reason, ReplayTarget, Stage};
use crate::providers::Provider;
use crate::task::Millis;

/// Header names on dead-letter records (documented in docs/events.md and the
/// AsyncAPI document; `dlq replay` reads them).
pub mod headers {
    pub const ORIGINAL_TOPIC: &str = "dlq.original.topic";
    pub const ORIGINAL_PARTITION: &str = "dlq.original.partition";
    pub const ORIGINAL_OFFSET: &str = "dlq.original.offset";
    pub const ORIGINAL_TIMESTAMP: &str = "dlq.original.timestamp";
    pub const STAGE: &str = "dlq.stage";
    pub const ERROR_CLASS: &str = "dlq.error.class";
    pub const ERROR_MESSAGE: &str = "dlq.error.message";
    pub const ATTEMPTS: &str = "dlq.attempts";
    pub const PROVIDER: &str = "dlq.provider";
    pub const HTTP_STATUS: &str = "dlq.http.status";
    pub const PROVIDER_REQUEST_ID: &str = "dlq.provider.request_id";
    /// With `identity_mismatch`: the id the provider's answer named.
    pub const PROVIDER_ANSWERED_ID: &str = "dlq.provider.answered_id";
    pub const FAILED_AT: &str = "dlq.failed_at";
    pub const USER_ID: &str = "dlq.user_id";
    pub const EVENT_ID: &str = "dlq.event_id";
    /// What `dlq replay` sends the record back as: `input` (the value is the
    /// original input event) or `task` (the value is a task record).
    pub const REPLAY_TARGET: &str = "dlq.replay.target";
    /// Set on records sent back by `dlq replay`: `<dlq topic>/<partition>/<offset>`.
    pub const REPLAYED_FROM: &str = "dlq.replayed.from";
}

/// One dead letter, before it becomes a Kafka record.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub stage: Stage,
    /// Stable, low-cardinality label (`malformed_json`, `forbidden`, ...).
    pub reason: Reason,
    /// Human-readable detail: never secrets or SMS bodies.
    pub message: String,
    pub original_topic: String,
    pub original_partition: i32,
    pub original_offset: i64,
    pub original_timestamp: Option<Millis>,
    pub attempts: u32,
    pub provider: Option<Provider>,
    pub http_status: Option<u16>,
    pub provider_request_id: Option<String>,
    /// With `identity_mismatch`: the id the provider's answer named.
    pub answered_id: Option<String>,
    pub user_id: Option<String>,
    pub event_id: Option<String>,
    pub replay_target: ReplayTarget,
    pub failed_at: Millis,
    /// Headers of the original record, kept (prefixed names are ours).
    pub original_headers: Vec<(String, Vec<u8>)>,
}

impl DeadLetter {
    /// The headers to attach, in a stable order.
    pub fn headers(&self) -> Vec<(String, Vec<u8>)> {
        let mut h: Vec<(String, Vec<u8>)> = self
            .original_headers
            .iter()
            .filter(|(k, _)| !k.starts_with("dlq."))
            .cloned()
            .collect();
        let mut put = |k: &str, v: String| h.push((k.to_string(), v.into_bytes()));
        put(headers::ORIGINAL_TOPIC, self.original_topic.clone());
        put(
            headers::ORIGINAL_PARTITION,
            self.original_partition.to_string(),
        );
        put(headers::ORIGINAL_OFFSET, self.original_offset.to_string());
        if let Some(ts) = self.original_timestamp {
            put(headers::ORIGINAL_TIMESTAMP, ts.to_string());
        }
        put(headers::STAGE, self.stage.as_str().to_string());
        put(headers::ERROR_CLASS, self.reason.as_str().to_string());
        put(headers::ERROR_MESSAGE, truncate(&self.message, 1024));
        put(headers::ATTEMPTS, self.attempts.to_string());
        if let Some(p) = self.provider {
            put(headers::PROVIDER, p.as_str().to_string());
        }
        if let Some(s) = self.http_status {
            put(headers::HTTP_STATUS, s.to_string());
        }
        if let Some(r) = &self.provider_request_id {
            put(headers::PROVIDER_REQUEST_ID, r.clone());
        }
        if let Some(a) = &self.answered_id {
            put(headers::PROVIDER_ANSWERED_ID, a.clone());
        }
        if let Some(u) = &self.user_id {
            put(headers::USER_ID, u.clone());
        }
        if let Some(e) = &self.event_id {
            put(headers::EVENT_ID, e.clone());
        }
        put(
            headers::REPLAY_TARGET,
            self.replay_target.as_str().to_string(),
        );
        put(headers::FAILED_AT, self.failed_at.to_string());
        h
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_name_origin_stage_and_reason() {
        let d = DeadLetter {
            key: None,
            value: None,
            stage: Stage::Poll(Provider::Credeau),
            reason: Reason::Unauthorized,
            message: "m".repeat(2000),
            original_topic: "t".into(),
            original_partition: 3,
            original_offset: 42,
            original_timestamp: Some(7),
            attempts: 1,
            provider: Some(Provider::Credeau),
            http_status: Some(401),
            provider_request_id: Some("rid".into()),
            answered_id: None,
            user_id: Some("u".into()),
            event_id: Some("e".into()),
            replay_target: ReplayTarget::Task,
            failed_at: 9,
            original_headers: vec![("trace".into(), b"1".to_vec())],
        };
        let h = d.headers();
        let get = |k: &str| {
            h.iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| String::from_utf8(v.clone()).unwrap())
        };
        assert_eq!(get(headers::ORIGINAL_OFFSET).as_deref(), Some("42"));
        assert_eq!(get(headers::STAGE).as_deref(), Some("poll_credeau"));
        assert_eq!(get(headers::HTTP_STATUS).as_deref(), Some("401"));
        assert_eq!(get(headers::ERROR_CLASS).as_deref(), Some("unauthorized"));
        assert_eq!(get(headers::REPLAY_TARGET).as_deref(), Some("task"));
        assert_eq!(get("trace").as_deref(), Some("1"));
        assert!(get(headers::ERROR_MESSAGE).unwrap().len() < 1100);
    }
}

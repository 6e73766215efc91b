//! What a dead letter says: the stage a record failed in, the reason, and
//! how `dlq replay` may send it back, as closed enums whose wire values (the
//! `dlq.stage`, `dlq.error.class` and `dlq.replay.target` headers, the
//! `stage` and `reason` labels of `insights_dead_letters_total`) are the ones
//! documented in docs/events.md, docs/runbook.md and docs/asyncapi.yaml.
//! Also the pure decisions that pick them: which stage and reason a failed
//! provider or an undecodable input is written with.

use std::fmt;
use std::str::FromStr;

use crate::providers::{Provider, ProviderErrorKind};

/// A stage, reason or replay target that is not one of the known values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} {value:?}: expected one of {expected}")]
pub struct UnknownValue {
    what: &'static str,
    value: String,
    expected: String,
}

fn parse<T: Copy>(
    what: &'static str,
    all: &[T],
    as_str: impl Fn(T) -> &'static str,
    s: &str,
) -> Result<T, UnknownValue> {
    all.iter()
        .copied()
        .find(|v| as_str(*v) == s)
        .ok_or_else(|| UnknownValue {
            what,
            // Bounded: the text may come from a command line or a header.
            value: s.chars().take(64).collect(),
            expected: all
                .iter()
                .map(|v| as_str(*v))
                .collect::<Vec<_>>()
                .join(", "),
        })
}

/// Where in the pipeline a record failed (`dlq.stage`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    /// Decoding or validating an input event.
    Decode,
    /// Decoding a task record from a delay topic.
    TaskDecode,
    /// A provider answer that ended the provider as failed.
    Poll(Provider),
    /// Encoding an output that cannot be published.
    Publish,
}

impl Stage {
    pub const ALL: [Stage; 5] = [
        Stage::Decode,
        Stage::TaskDecode,
        Stage::Poll(Provider::Finbox),
        Stage::Poll(Provider::Credeau),
        Stage::Publish,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Decode => "decode",
            Stage::TaskDecode => "task_decode",
            Stage::Poll(Provider::Finbox) => "poll_finbox",
            Stage::Poll(Provider::Credeau) => "poll_credeau",
            Stage::Publish => "publish",
        }
    }
}

impl FromStr for Stage {
    type Err = UnknownValue;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse("stage", &Stage::ALL, Stage::as_str, s)
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a record was dead-lettered (`dlq.error.class`): a stable,
/// low-cardinality label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    // Decode: the input event breaks the contract.
    Empty,
    NotUtf8,
    MalformedJson,
    InvalidAvro,
    UnknownSchemaId,
    InvalidField,
    // Task decode.
    InvalidTask,
    // A provider answer that is never retried.
    BadRequest,
    Unauthorized,
    Forbidden,
    Unprocessable,
    UnexpectedStatus,
    /// A provider answer about another user than the one asked for.
    IdentityMismatch,
    /// A provider answer over `max_response_bytes` (stage `poll_*`), or an
    /// output larger than a record (stage `publish`).
    TooLarge,
    /// A provider that kept failing with retryable answers until its retry
    /// budget or deadline ran out.
    Exhausted,
    // Publish.
    EncodeFailed,
}

impl Reason {
    pub const ALL: [Reason; 16] = [
        Reason::Empty,
        Reason::NotUtf8,
        Reason::MalformedJson,
        Reason::InvalidAvro,
        Reason::UnknownSchemaId,
        Reason::InvalidField,
        Reason::InvalidTask,
        Reason::BadRequest,
        Reason::Unauthorized,
        Reason::Forbidden,
        Reason::Unprocessable,
        Reason::UnexpectedStatus,
        Reason::IdentityMismatch,
        Reason::TooLarge,
        Reason::Exhausted,
        Reason::EncodeFailed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Empty => "empty",
            Reason::NotUtf8 => "not_utf8",
            Reason::MalformedJson => "malformed_json",
            Reason::InvalidAvro => "invalid_avro",
            Reason::UnknownSchemaId => "unknown_schema_id",
            Reason::InvalidField => "invalid_field",
            Reason::InvalidTask => "invalid_task",
            Reason::BadRequest => "bad_request",
            Reason::Unauthorized => "unauthorized",
            Reason::Forbidden => "forbidden",
            Reason::Unprocessable => "unprocessable",
            Reason::UnexpectedStatus => "unexpected_status",
            Reason::IdentityMismatch => "identity_mismatch",
            Reason::TooLarge => "too_large",
            Reason::Exhausted => "exhausted",
            Reason::EncodeFailed => "encode_failed",
        }
    }

    /// Whether a record dead-lettered for this reason counts for the
    /// dead-letter guard. Exhausted retries do not: they are a provider's
    /// outage or brown-out. Nor does a provider's rejection of one user's
    /// request (`bad_request` 400, `unprocessable` 422): that is the
    /// provider's final answer about that user (a contract change on its
    /// side rejects users one by one), not something a restart fixes. In
    /// both cases the user already gets a final combined event (`failed`)
    /// and a dead letter to replay, and stopping the service would hold back
    /// every other user's answer. Every other reason is something a person
    /// can fix on our side (the input producer, a key or IP, a limit, a
    /// deploy), so a run of them stops the service instead of dead-lettering
    /// a topic.
    pub fn counts_for_guard(self) -> bool {
        !matches!(
            self,
            Reason::Exhausted | Reason::BadRequest | Reason::Unprocessable
        )
    }
}

impl FromStr for Reason {
    type Err = UnknownValue;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse("reason", &Reason::ALL, Reason::as_str, s)
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What `dlq replay` sends a dead letter back as (`dlq.replay.target`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReplayTarget {
    /// The value is the original input event: back to the input topic.
    Input,
    /// The value is a task record: back to the shortest delay tier with its
    /// failed providers reopened.
    Task,
    /// Not replayable.
    None,
}

impl ReplayTarget {
    pub const ALL: [ReplayTarget; 3] =
        [ReplayTarget::Input, ReplayTarget::Task, ReplayTarget::None];

    pub fn as_str(self) -> &'static str {
        match self {
            ReplayTarget::Input => "input",
            ReplayTarget::Task => "task",
            ReplayTarget::None => "none",
        }
    }
}

impl FromStr for ReplayTarget {
    type Err = UnknownValue;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse("replay target", &ReplayTarget::ALL, ReplayTarget::as_str, s)
    }
}

impl fmt::Display for ReplayTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a dead letter of a consumed record itself (its own key and value) is
/// replayed: an input event goes back to the input topic; anything else
/// (an unreadable task record) cannot be.
pub fn record_replay_target(stage: Stage) -> ReplayTarget {
    if stage == Stage::Decode {
        ReplayTarget::Input
    } else {
        ReplayTarget::None
    }
}

/// The stage and reason a provider that ended `failed` with its last error
/// of `kind` is dead-lettered with. An output that could not be published
/// is the publish stage's (fixed by `topics.max_message_bytes`); an answer
/// over `<provider>.max_response_bytes` is the poll's; retryable answers
/// mean the retries ran out.
pub fn provider_failed(provider: Provider, kind: ProviderErrorKind) -> (Stage, Reason) {
    let poll = Stage::Poll(provider);
    match kind {
        ProviderErrorKind::OutputTooLarge => (Stage::Publish, Reason::TooLarge),
        ProviderErrorKind::OutputUnencodable => (Stage::Publish, Reason::EncodeFailed),
        k if k.is_retryable() => (poll, Reason::Exhausted),
        ProviderErrorKind::BadRequest => (poll, Reason::BadRequest),
        ProviderErrorKind::Unauthorized => (poll, Reason::Unauthorized),
        ProviderErrorKind::Forbidden => (poll, Reason::Forbidden),
        ProviderErrorKind::Unprocessable => (poll, Reason::Unprocessable),
        ProviderErrorKind::UnexpectedStatus => (poll, Reason::UnexpectedStatus),
        ProviderErrorKind::TooLarge => (poll, Reason::TooLarge),
        ProviderErrorKind::IdentityMismatch => (poll, Reason::IdentityMismatch),
        // The retryable kinds, matched above.
        ProviderErrorKind::RateLimited
        | ProviderErrorKind::ServerError
        | ProviderErrorKind::Timeout
        | ProviderErrorKind::Connection
        | ProviderErrorKind::InvalidBody => (poll, Reason::Exhausted),
    }
}

/// Every provider error kind.
const KINDS: [ProviderErrorKind; 14] = [
    ProviderErrorKind::BadRequest,
    ProviderErrorKind::Unauthorized,
    ProviderErrorKind::Forbidden,
    ProviderErrorKind::Unprocessable,
    ProviderErrorKind::UnexpectedStatus,
    ProviderErrorKind::RateLimited,
    ProviderErrorKind::ServerError,
    ProviderErrorKind::Timeout,
    ProviderErrorKind::Connection,
    ProviderErrorKind::InvalidBody,
    ProviderErrorKind::TooLarge,
    ProviderErrorKind::OutputTooLarge,
    ProviderErrorKind::OutputUnencodable,
    ProviderErrorKind::IdentityMismatch,
];

/// Fails to compile when a kind is added without being listed above.
#[allow(dead_code)]
fn kinds_are_all_listed(k: ProviderErrorKind) {
    match k {
        ProviderErrorKind::BadRequest
        | ProviderErrorKind::Unauthorized
        | ProviderErrorKind::Forbidden
        | ProviderErrorKind::Unprocessable
        | ProviderErrorKind::UnexpectedStatus
        | ProviderErrorKind::RateLimited
        | ProviderErrorKind::ServerError
        | ProviderErrorKind::Timeout
        | ProviderErrorKind::Connection
        | ProviderErrorKind::InvalidBody
        | ProviderErrorKind::TooLarge
        | ProviderErrorKind::OutputTooLarge
        | ProviderErrorKind::OutputUnencodable
        | ProviderErrorKind::IdentityMismatch => {}
    }
}

/// Every (stage, reason) pair a dead letter can carry: the decode
/// failures of an input event, a task record that does not decode, and
/// what [`provider_failed`] gives for each provider and error kind. The
/// metrics export each at 0 from the start, so the first dead letter of a
/// kind is an increase the alerts can see.
pub fn label_pairs() -> Vec<(Stage, Reason)> {
    let decode = [
        Reason::Empty,
        Reason::NotUtf8,
        Reason::MalformedJson,
        Reason::InvalidAvro,
        Reason::UnknownSchemaId,
        Reason::InvalidField,
    ];
    let mut pairs: Vec<(Stage, Reason)> = decode.map(|r| (Stage::Decode, r)).to_vec();
    pairs.push((Stage::TaskDecode, Reason::InvalidTask));
    for provider in Provider::ALL {
        for kind in KINDS {
            let pair = provider_failed(provider, kind);
            if !pairs.contains(&pair) {
                pairs.push(pair);
            }
        }
    }
    pairs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_label_pairs_cover_every_reason_once_per_stage() {
        let pairs = label_pairs();
        for r in Reason::ALL {
            assert!(pairs.iter().any(|(_, pr)| *pr == r), "{r} in no pair");
        }
        let mut sorted: Vec<_> = pairs
            .iter()
            .map(|(s, r)| (s.as_str(), r.as_str()))
            .collect();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), pairs.len(), "a pair twice");
        assert!(pairs.contains(&(Stage::Poll(Provider::Credeau), Reason::Forbidden)));
        assert!(pairs.contains(&(Stage::Publish, Reason::EncodeFailed)));
        assert!(!pairs.contains(&(Stage::Decode, Reason::Exhausted)));
    }

    #[test]
    fn every_stage_round_trips_and_keeps_its_documented_wire_value() {
        let wire: Vec<&str> = Stage::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(
            wire,
            [
                "decode",
                "task_decode",
                "poll_finbox",
                "poll_credeau",
                "publish"
            ]
        );
        for s in Stage::ALL {
            assert_eq!(s.as_str().parse::<Stage>(), Ok(s));
            assert_eq!(s.to_string(), s.as_str());
        }
    }

    #[test]
    fn every_reason_round_trips_and_keeps_its_documented_wire_value() {
        let wire: Vec<&str> = Reason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(
            wire,
            [
                "empty",
                "not_utf8",
                "malformed_json",
                "invalid_avro",
                "unknown_schema_id",
                "invalid_field",
                "invalid_task",
                "bad_request",
                "unauthorized",
                "forbidden",
                "unprocessable",
                "unexpected_status",
                "identity_mismatch",
                "too_large",
                "exhausted",
                "encode_failed",
            ]
        );
        for r in Reason::ALL {
            assert_eq!(r.as_str().parse::<Reason>(), Ok(r));
            assert_eq!(r.to_string(), r.as_str());
        }
    }

    #[test]
    fn every_replay_target_round_trips_and_keeps_its_documented_wire_value() {
        let wire: Vec<&str> = ReplayTarget::ALL.iter().map(|t| t.as_str()).collect();
        assert_eq!(wire, ["input", "task", "none"]);
        for t in ReplayTarget::ALL {
            assert_eq!(t.as_str().parse::<ReplayTarget>(), Ok(t));
        }
    }

    /// The `enum:` list of a dlq header in docs/asyncapi.yaml.
    fn documented(header: &str) -> Vec<String> {
        let doc = include_str!("../../docs/asyncapi.yaml");
        let at = doc
            .find(&format!("        {header}:\n"))
            .unwrap_or_else(|| panic!("{header} is not described"));
        let line = doc[at..]
            .lines()
            .skip(1)
            .take_while(|l| l.starts_with("          "))
            .find_map(|l| l.trim().strip_prefix("enum: "))
            .unwrap_or_else(|| panic!("{header} has no enum"));
        line.trim_matches(|c| c == '[' || c == ']')
            .split(',')
            .map(|v| v.trim().to_string())
            .collect()
    }

    #[test]
    fn the_asyncapi_document_lists_exactly_the_values_written() {
        let strs = |v: Vec<&str>| v.into_iter().map(String::from).collect::<Vec<_>>();
        assert_eq!(
            documented("dlq.stage"),
            strs(Stage::ALL.iter().map(|s| s.as_str()).collect())
        );
        assert_eq!(
            documented("dlq.error.class"),
            strs(Reason::ALL.iter().map(|r| r.as_str()).collect())
        );
        assert_eq!(
            documented("dlq.replay.target"),
            strs(ReplayTarget::ALL.iter().map(|t| t.as_str()).collect())
        );
    }

    #[test]
    fn unknown_values_are_rejected_naming_what_is_expected() {
        let e = "poll_experian".parse::<Stage>().unwrap_err().to_string();
        assert_eq!(
            e,
            "unknown stage \"poll_experian\": expected one of decode, task_decode, poll_finbox, poll_credeau, publish"
        );
        let e = "Forbidden".parse::<Reason>().unwrap_err().to_string();
        assert!(
            e.starts_with("unknown reason \"Forbidden\": expected one of empty,"),
            "{e}"
        );
        assert!(
            e.contains("forbidden") && e.ends_with("encode_failed"),
            "{e}"
        );
        let e = "".parse::<ReplayTarget>().unwrap_err().to_string();
        assert_eq!(
            e,
            "unknown replay target \"\": expected one of input, task, none"
        );
        let long = "x".repeat(1000);
        let e = long.parse::<Reason>().unwrap_err().to_string();
        assert!(
            e.len() < 400,
            "the quoted value is bounded: {} bytes",
            e.len()
        );
    }

    #[test]
    fn only_an_input_event_is_replayed_as_itself() {
        assert_eq!(record_replay_target(Stage::Decode), ReplayTarget::Input);
        for s in [
            Stage::TaskDecode,
            Stage::Poll(Provider::Finbox),
            Stage::Poll(Provider::Credeau),
            Stage::Publish,
        ] {
            assert_eq!(record_replay_target(s), ReplayTarget::None, "{s}");
        }
    }

    #[test]
    fn a_failed_provider_is_dead_lettered_by_stage_and_reason() {
        for p in Provider::ALL {
            for k in KINDS {
                let (stage, reason) = provider_failed(p, k);
                match k {
                    ProviderErrorKind::OutputTooLarge => {
                        assert_eq!((stage, reason), (Stage::Publish, Reason::TooLarge))
                    }
                    ProviderErrorKind::OutputUnencodable => {
                        assert_eq!((stage, reason), (Stage::Publish, Reason::EncodeFailed))
                    }
                    k if k.is_retryable() => {
                        assert_eq!(
                            (stage, reason),
                            (Stage::Poll(p), Reason::Exhausted),
                            "{k:?}"
                        )
                    }
                    k => {
                        assert_eq!(stage, Stage::Poll(p), "{k:?}");
                        // A final answer keeps the provider error's own label.
                        assert_eq!(reason.as_str(), k.as_str(), "{k:?}");
                    }
                }
            }
        }
        assert_eq!(
            provider_failed(Provider::Credeau, ProviderErrorKind::TooLarge),
            (Stage::Poll(Provider::Credeau), Reason::TooLarge)
        );
    }
}

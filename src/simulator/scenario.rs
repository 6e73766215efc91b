//! The scenario format: what each simulated user's providers answer and
//! when, and which faults they inject. One JSON document (a file given with
//! `--scenarios`, or the admin API) holds a default, prefix rules and exact
//! users; lookup is exact user, else the longest matching prefix, else the
//! default.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The most SMS one user may have: each answer is generated in memory.
pub const MAX_SMS_COUNT: u32 = 100_000;

/// The whole scenario set.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScenarioSet {
    /// Applies to users that match neither an exact entry nor a prefix.
    pub default: UserScenario,
    /// User-id prefixes; the longest matching prefix wins.
    pub prefixes: BTreeMap<String, UserScenario>,
    /// Exact user ids.
    pub users: HashMap<String, UserScenario>,
}

/// A partial update of the scenario set (`POST /admin/scenarios`): the given
/// users are added or overwritten; `default` and `prefixes` are replaced
/// only when present.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScenarioPatch {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default: Option<UserScenario>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefixes: Option<BTreeMap<String, UserScenario>>,
    pub users: HashMap<String, UserScenario>,
}

/// One user's (or prefix's) behaviour at both providers. A missing part
/// means that provider's built-in defaults (ready at once, no faults).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UserScenario {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finbox: Option<FinboxScenario>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credeau: Option<CredeauScenario>,
}

/// What FinBox finally says about a user.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinboxOutcome {
    /// 200 `complete` with predictors.
    #[default]
    Complete,
    /// 200 `no_data`, `data: null`.
    NoData,
    /// 200 `not_found` for ever (the user never reached FinBox).
    NotFound,
}

/// How a `complete` answer lays out its `data`. The document describes only
/// the first; the list is agreed per integration, so clients must cope
/// with the others.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinboxDataShape {
    /// `[{"name": ..., "value": ...}, ...]`, as documented.
    #[default]
    List,
    /// The documented list, each entry with more keys (`type`,
    /// `description`, `version`).
    ListWithExtras,
    /// One object, predictor name to value.
    Object,
    /// A list whose entries name the predictor `key` instead of `name`,
    /// plus one documented entry.
    ListWithoutNames,
}

/// A user's FinBox behaviour. Times are measured from the user's first
/// FinBox request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FinboxScenario {
    /// Before this, 202 `in_progress`.
    #[serde(with = "humantime_serde")]
    pub ready_after: Duration,
    pub outcome: FinboxOutcome,
    /// For this long, 200 `not_found` (the SDK has not synced yet); then
    /// `in_progress` until `ready_after`.
    #[serde(with = "humantime_serde")]
    pub not_found_for: Duration,
    /// How many predictors a `complete` answer carries.
    pub predictors: u32,
    /// How a `complete` answer lays out `data`.
    pub data_shape: FinboxDataShape,
    pub faults: Faults,
}

impl Default for FinboxScenario {
    fn default() -> Self {
        Self {
            ready_after: Duration::ZERO,
            outcome: FinboxOutcome::Complete,
            not_found_for: Duration::ZERO,
            predictors: 25,
            data_shape: FinboxDataShape::List,
            faults: Faults::default(),
        }
    }
}

/// A user's Credeau behaviour. Times are measured from the user's first
/// Credeau request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CredeauScenario {
    /// Before this, `{"extracted_sms_data": []}`.
    #[serde(with = "humantime_serde")]
    pub ready_after: Duration,
    /// SMS on the device; 0 means the data never arrives (always empty).
    pub sms_count: u32,
    /// Answer 422 (`groupings` missing) when the request has no
    /// `groupings`, as the document's 422 example says Credeau may.
    pub require_groupings: bool,
    pub faults: Faults,
}

impl Default for CredeauScenario {
    fn default() -> Self {
        Self {
            ready_after: Duration::ZERO,
            sms_count: 20,
            require_groupings: false,
            faults: Faults::default(),
        }
    }
}

/// Injected faults. `*_first: N` hits the user's first N requests to that
/// provider; `*_ratio: p` hits a request with probability p, decided by an
/// RNG seeded from (seed, provider, user, request number).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    pub server_error_first: u32,
    pub server_error_ratio: f64,
    /// The 5xx status sent for server errors.
    pub server_error_status: u16,
    pub rate_limit_first: u32,
    pub rate_limit_ratio: f64,
    /// Sent as `Retry-After` with fault 429s when set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after_secs: Option<u64>,
    /// Added before every answer to this user.
    #[serde(with = "humantime_serde")]
    pub latency: Duration,
    pub drop_first: u32,
    pub drop_ratio: f64,
    pub non_json_first: u32,
    pub non_json_ratio: f64,
    pub truncated_json_first: u32,
    pub truncated_json_ratio: f64,
    pub proxy_html_first: u32,
    /// An exact answer sent instead of the user's own: bodies the
    /// documents do not describe (non-standard JSON, another user's id,
    /// extra keys, a 200 `"status": "error"`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scripted: Option<ScriptedAnswer>,
    /// An answer's body (not a fault's) is sent at this many bytes per
    /// second (in tenth-of-a-second pieces); 0 = at once.
    pub body_bytes_per_second: u64,
    /// An answer's body (not a fault's) stops after this many bytes, the
    /// connection held open: a body that stalls mid-way.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body_stall_after_bytes: Option<u64>,
    /// An answer's body (not a fault's) is gzip-compressed
    /// (`Content-Encoding: gzip`), whether or not the request asked for it.
    pub gzip: bool,
}

/// One exact answer (see [`Faults::scripted`]). `{id}` in `body` is
/// replaced by the id the request asked for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScriptedAnswer {
    /// Only the user's first N requests; 0 = every request.
    pub first: u32,
    pub status: u16,
    /// The body as text.
    pub body: String,
    /// The body as Base64, for bytes that are not UTF-8 (a gzip stream,
    /// invalid UTF-8); used instead of `body` when set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body_base64: Option<String>,
    pub content_type: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after_secs: Option<u64>,
}

impl Default for ScriptedAnswer {
    fn default() -> Self {
        Self {
            first: 0,
            status: 200,
            body: String::new(),
            body_base64: None,
            content_type: "application/json".into(),
            retry_after_secs: None,
        }
    }
}

impl ScriptedAnswer {
    /// Whether request number `n` (1-based) gets this answer.
    pub fn applies(&self, n: u32) -> bool {
        self.first == 0 || n <= self.first
    }

    /// The body's bytes for a request about `id`.
    pub fn body_bytes(&self, id: &str) -> Vec<u8> {
        use base64::Engine as _;
        match &self.body_base64 {
            Some(b64) => base64::engine::general_purpose::STANDARD
                .decode(b64)
                .unwrap_or_default(),
            None => self.body.replace("{id}", id).into_bytes(),
        }
    }
}

impl Default for Faults {
    fn default() -> Self {
        Self {
            server_error_first: 0,
            server_error_ratio: 0.0,
            server_error_status: 503,
            rate_limit_first: 0,
            rate_limit_ratio: 0.0,
            retry_after_secs: None,
            latency: Duration::ZERO,
            drop_first: 0,
            drop_ratio: 0.0,
            non_json_first: 0,
            non_json_ratio: 0.0,
            truncated_json_first: 0,
            truncated_json_ratio: 0.0,
            proxy_html_first: 0,
            scripted: None,
            body_bytes_per_second: 0,
            body_stall_after_bytes: None,
            gzip: false,
        }
    }
}

/// A scenario that cannot be served as written.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("scenario {place}: {problem}")]
pub struct ScenarioError {
    pub place: String,
    pub problem: String,
}

impl Faults {
    fn validate(&self, place: &str) -> Result<(), ScenarioError> {
        let ratios = [
            ("server_error_ratio", self.server_error_ratio),
            ("rate_limit_ratio", self.rate_limit_ratio),
            ("drop_ratio", self.drop_ratio),
            ("non_json_ratio", self.non_json_ratio),
            ("truncated_json_ratio", self.truncated_json_ratio),
        ];
        for (name, p) in ratios {
            if !(0.0..=1.0).contains(&p) {
                return Err(ScenarioError {
                    place: place.to_owned(),
                    problem: format!("{name} must be between 0 and 1, got {p}"),
                });
            }
        }
        if let Some(s) = &self.scripted {
            use base64::Engine as _;
            if !(100..=599).contains(&s.status) {
                return Err(ScenarioError {
                    place: format!("{place}.scripted"),
                    problem: format!("status must be an HTTP status, got {}", s.status),
                });
            }
            if let Some(b64) = &s.body_base64 {
                if base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .is_err()
                {
                    return Err(ScenarioError {
                        place: format!("{place}.scripted"),
                        problem: "body_base64 is not standard Base64".into(),
                    });
                }
            }
        }
        if !(500..=599).contains(&self.server_error_status) {
            return Err(ScenarioError {
                place: place.to_owned(),
                problem: format!(
                    "server_error_status must be a 5xx status, got {}",
                    self.server_error_status
                ),
            });
        }
        Ok(())
    }
}

impl UserScenario {
    fn validate(&self, place: &str) -> Result<(), ScenarioError> {
        if let Some(f) = &self.finbox {
            f.faults.validate(&format!("{place}.finbox.faults"))?;
        }
        if let Some(c) = &self.credeau {
            c.faults.validate(&format!("{place}.credeau.faults"))?;
            if c.sms_count > MAX_SMS_COUNT {
                return Err(ScenarioError {
                    place: format!("{place}.credeau"),
                    problem: format!(
                        "sms_count must be at most {MAX_SMS_COUNT}, got {}",
                        c.sms_count
                    ),
                });
            }
        }
        Ok(())
    }
}

impl ScenarioSet {
    /// Rejects what cannot be served (ratios outside [0, 1], non-5xx error
    /// statuses), naming the entry.
    pub fn validate(&self) -> Result<(), ScenarioError> {
        self.default.validate("default")?;
        for (prefix, s) in &self.prefixes {
            s.validate(&format!("prefixes[{prefix:?}]"))?;
        }
        for (user, s) in &self.users {
            s.validate(&format!("users[{user:?}]"))?;
        }
        Ok(())
    }

    /// The scenario governing `user_id`: exact entry, else the longest
    /// matching prefix, else the default.
    pub fn lookup(&self, user_id: &str) -> &UserScenario {
        if let Some(s) = self.users.get(user_id) {
            return s;
        }
        self.prefixes
            .iter()
            .filter(|(prefix, _)| user_id.starts_with(prefix.as_str()))
            .max_by_key(|(prefix, _)| prefix.len())
            .map(|(_, s)| s)
            .unwrap_or(&self.default)
    }

    /// Applies a patch: users merged, `default`/`prefixes` replaced when given.
    pub fn merge(&mut self, patch: ScenarioPatch) {
        if let Some(d) = patch.default {
            self.default = d;
        }
        if let Some(p) = patch.prefixes {
            self.prefixes = p;
        }
        self.users.extend(patch.users);
    }
}

impl ScenarioPatch {
    pub fn validate(&self) -> Result<(), ScenarioError> {
        let as_set = ScenarioSet {
            default: self.default.clone().unwrap_or_default(),
            prefixes: self.prefixes.clone().unwrap_or_default(),
            users: HashMap::new(),
        };
        as_set.validate()?;
        for (user, s) in &self.users {
            s.validate(&format!("users[{user:?}]"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finbox_ready(after_ms: u64) -> UserScenario {
        UserScenario {
            finbox: Some(FinboxScenario {
                ready_after: Duration::from_millis(after_ms),
                ..Default::default()
            }),
            credeau: None,
        }
    }

    #[test]
    fn exact_user_beats_longest_prefix_which_beats_default() {
        let mut set = ScenarioSet {
            default: finbox_ready(1),
            ..Default::default()
        };
        set.prefixes.insert("late-".into(), finbox_ready(2));
        set.prefixes.insert("late-very-".into(), finbox_ready(3));
        set.users.insert("late-very-1".into(), finbox_ready(4));
        let after = |u: &str| set.lookup(u).finbox.as_ref().map(|f| f.ready_after);
        assert_eq!(after("other"), Some(Duration::from_millis(1)));
        assert_eq!(after("late-x"), Some(Duration::from_millis(2)));
        assert_eq!(after("late-very-2"), Some(Duration::from_millis(3)));
        assert_eq!(after("late-very-1"), Some(Duration::from_millis(4)));
    }

    #[test]
    fn json_uses_humantime_and_fills_defaults() {
        let set: ScenarioSet = serde_json::from_str(
            r#"{"users":{"u":{"finbox":{"ready_after":"1m 30s","faults":{"drop_first":2}}}}}"#,
        )
        .unwrap();
        let f = set.users["u"].finbox.clone().unwrap();
        assert_eq!(f.ready_after, Duration::from_secs(90));
        assert_eq!(f.predictors, 25);
        assert_eq!(f.faults.drop_first, 2);
        assert_eq!(f.faults.server_error_status, 503);
        assert!(set.users["u"].credeau.is_none());
    }

    #[test]
    fn unknown_keys_and_bad_ratios_are_rejected() {
        assert!(serde_json::from_str::<ScenarioSet>(r#"{"defaults":{}}"#).is_err());
        let set: ScenarioSet =
            serde_json::from_str(r#"{"default":{"credeau":{"faults":{"drop_ratio":1.5}}}}"#)
                .unwrap();
        let err = set.validate().unwrap_err();
        assert!(err.to_string().contains("drop_ratio"), "{err}");
    }

    #[test]
    fn merge_replaces_prefixes_only_when_given() {
        let mut set = ScenarioSet::default();
        set.prefixes.insert("a-".into(), finbox_ready(1));
        set.users.insert("u1".into(), finbox_ready(1));
        let mut patch = ScenarioPatch::default();
        patch.users.insert("u2".into(), finbox_ready(2));
        set.merge(patch);
        assert_eq!(set.prefixes.len(), 1);
        assert_eq!(set.users.len(), 2);
        set.merge(ScenarioPatch {
            prefixes: Some(BTreeMap::new()),
            ..Default::default()
        });
        assert!(set.prefixes.is_empty());
    }
}

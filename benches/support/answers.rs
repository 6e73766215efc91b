//! The provider answers the bench's simulator gives, chosen with
//! `BENCH_ANSWERS`:
//!
//! - `small` (the default): 5 FinBox predictors and 2 SMS a user;
//! - `realistic`: 200 FinBox predictors a user; Credeau 200, 400, 600, 800
//!   or 1,000 SMS for 19 users in 20 (about 0.1 to 0.5 MB of JSON each)
//!   and 5,000 SMS for every twentieth (about 2.5 MB, the
//!   `cnt_sms_threshold` of Credeau's document);
//! - `huge`: `realistic`, but user 500 of a run gets 33,000 SMS (about
//!   30 MB of JSON; the backlog run's service asks for up to that many):
//!   one answer larger than the rest, to see what it costs against the
//!   byte budget.
//!
//! The simulator picks a user's answer by the prefix of its id, so the mix
//! is in the ids: `s400-b-17` gets 400 SMS, `x5000-b-19` gets 5,000.

use std::sync::OnceLock;

use anyhow::{bail, Result};
use serde_json::{json, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answers {
    Small,
    Realistic,
    Huge,
}

/// The SMS count of the 19 users in 20 that are not large, by `i % 5`.
const SMS_COUNTS: [u32; 5] = [200, 400, 600, 800, 1000];
/// Every twentieth user's SMS count.
const LARGE_SMS: u32 = 5000;
const PREDICTORS: u32 = 200;
/// The one user of a `huge` run with the huge answer, and its SMS count.
const HUGE_AT: u64 = 500;
const HUGE_SMS: u32 = 33_000;

impl Answers {
    pub fn parse(v: &str) -> Result<Answers> {
        Ok(match v {
            "" | "small" => Answers::Small,
            "realistic" => Answers::Realistic,
            "huge" => Answers::Huge,
            other => bail!("BENCH_ANSWERS={other}: expected small, realistic or huge"),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Answers::Small => "small",
            Answers::Realistic => "realistic",
            Answers::Huge => "huge",
        }
    }

    /// Everyone ready at once, with this mix's answers.
    pub fn ready_scenarios(self) -> Value {
        match self {
            Answers::Small => json!({"default": {
                "finbox": {"ready_after": "0s", "predictors": 5},
                "credeau": {"ready_after": "0s", "sms_count": 2}
            }}),
            Answers::Realistic | Answers::Huge => {
                let entry = |sms: u32| {
                    json!({
                        "finbox": {"ready_after": "0s", "predictors": PREDICTORS},
                        "credeau": {"ready_after": "0s", "sms_count": sms}
                    })
                };
                let mut prefixes = serde_json::Map::new();
                for sms in SMS_COUNTS {
                    prefixes.insert(format!("s{sms}-"), entry(sms));
                }
                prefixes.insert(format!("x{LARGE_SMS}-"), entry(LARGE_SMS));
                if self == Answers::Huge {
                    prefixes.insert(format!("h{HUGE_SMS}-"), entry(HUGE_SMS));
                }
                json!({"default": entry(SMS_COUNTS[0]), "prefixes": prefixes})
            }
        }
    }

    /// The `cnt_sms_threshold` the service must ask for to be sent the
    /// mix's largest answer whole, when its default (5,000) is not enough.
    pub fn sms_threshold(self) -> Option<u32> {
        (self == Answers::Huge).then_some(HUGE_SMS)
    }

    /// The SMS count the simulator answers user `i` with.
    pub fn sms_count(self, i: u64) -> usize {
        match self {
            Answers::Small => 2,
            Answers::Huge if i == HUGE_AT => HUGE_SMS as usize,
            Answers::Realistic | Answers::Huge if i % 20 == 19 => LARGE_SMS as usize,
            Answers::Realistic | Answers::Huge => SMS_COUNTS[(i % 5) as usize] as usize,
        }
    }

    /// The id of user `i` of a run whose users are named after `prefix`.
    pub fn user_id(self, prefix: &str, i: u64) -> String {
        match self {
            Answers::Small => format!("{prefix}-{i}"),
            Answers::Huge if i == HUGE_AT => format!("h{HUGE_SMS}-{prefix}-{i}"),
            Answers::Realistic | Answers::Huge if i % 20 == 19 => {
                format!("x{LARGE_SMS}-{prefix}-{i}")
            }
            Answers::Realistic | Answers::Huge => {
                format!("s{}-{prefix}-{i}", SMS_COUNTS[(i % 5) as usize])
            }
        }
    }
}

/// The mix of this run (`BENCH_ANSWERS`, read once; `small` when unset).
pub fn answers() -> Answers {
    static ANSWERS: OnceLock<Answers> = OnceLock::new();
    *ANSWERS.get_or_init(|| {
        let v = std::env::var("BENCH_ANSWERS").unwrap_or_default();
        Answers::parse(&v).unwrap_or_else(|e| {
            eprintln!("bench: {e}");
            std::process::exit(2)
        })
    })
}

//! Shared machinery of the pipeline bench: the run context, the report of a
//! scenario (figures and goals), and the child processes and Kafka helpers.

pub mod answers;
pub mod backlog;
pub mod brownout;
pub mod burst;
pub mod kafka;
pub mod memory;
pub mod parse;
pub mod peer;
pub mod procs;
pub mod ratelimit;
pub mod recovery;
pub mod throughput;
pub mod timeliness;

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Map, Value};

/// What every scenario gets: whether this is the smoke run (tiny sizes, no
/// timing goals), where child logs go, and an HTTP client.
pub struct Ctx {
    pub smoke: bool,
    pub logs: PathBuf,
    pub http: reqwest::Client,
    /// Where to write a `perf record` of the service during the throughput
    /// run (`BENCH_PERF_DATA`), if at all.
    pub perf_data: Option<PathBuf>,
}

impl Ctx {
    /// A size from the environment (`BENCH_<NAME>`), else the smoke or full
    /// default.
    pub fn size(&self, name: &str, smoke: u64, full: u64) -> u64 {
        std::env::var(format!("BENCH_{name}"))
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(if self.smoke { smoke } else { full })
    }

    pub fn sizes(&self, name: &str, smoke: &[u64], full: &[u64]) -> Vec<u64> {
        match std::env::var(format!("BENCH_{name}")) {
            Ok(v) => v.split(',').filter_map(|s| s.trim().parse().ok()).collect(),
            Err(_) => (if self.smoke { smoke } else { full }).to_vec(),
        }
    }

    pub fn log(&self, name: &str) -> PathBuf {
        self.logs.join(format!("{name}.log"))
    }
}

/// A goal of the brief and whether this run met it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Goal {
    pub goal: String,
    pub met: bool,
}

/// One scenario's figures (in insertion order) and goals.
#[derive(Debug, Default, serde::Serialize)]
pub struct Report {
    pub figures: Map<String, Value>,
    pub goals: Vec<Goal>,
}

impl Report {
    pub fn fig(&mut self, name: &str, value: impl Into<Value>) {
        self.figures.insert(name.to_string(), value.into());
    }

    pub fn goal(&mut self, goal: impl Into<String>, met: bool) {
        self.goals.push(Goal {
            goal: goal.into(),
            met,
        });
    }
}

pub fn secs(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round() / 1000.0
}

pub fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

/// The q-quantile (0..=1) of sorted values, nearest rank.
pub fn quantile(sorted: &[i64], q: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

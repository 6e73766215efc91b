//! Test harness shared by the integration tests, one module per concern:
//! `kafka` (the one broker of the test run, started by scripts/test.sh with
//! its address in KAFKA_BOOTSTRAP; unique topic names, producing, and an
//! independent reader: Python's confluent-kafka, read_committed), `service`
//! (the service binary as a child process, its log, metrics and readiness),
//! `registry` (the schema registry: one in-process fake, and the Python
//! stand-in for other processes; Avro onboarding events) and `simulator`
//! (asking the provider simulator directly). Everything is re-exported here,
//! so a test says `use common::*;`.
#![allow(dead_code)]
// Each test binary uses some of the modules only.
#![allow(unused_imports)]

pub mod kafka;
pub mod registry;
pub mod service;
pub mod simulator;

pub use kafka::*;
pub use registry::*;
pub use service::*;
pub use simulator::*;

use std::path::PathBuf;
use std::time::{Duration, Instant};

pub fn bootstrap() -> String {
    std::env::var("KAFKA_BOOTSTRAP").unwrap_or_else(|_| {
        panic!(
            "KAFKA_BOOTSTRAP is not set: run the tests with ./scripts/test.sh, or start a broker \
             with `scripts/kafka.sh start --dir /tmp/k` and export KAFKA_BOOTSTRAP"
        )
    })
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    )
}

pub fn python() -> String {
    std::env::var("INSIGHTS_PYTHON").unwrap_or_else(|_| "python3".to_string())
}

/// Polls `f` until it returns Some or `timeout` passes.
pub async fn eventually<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > end {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#!/usr/bin/env bash
# The whole test suite, from nothing: builds, installs the tools it needs
# (cached under ~/.cache/insights-enricher), starts one local Apache Kafka
# broker for the run, runs every test, stops the broker.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
cargo test --all-targets

#!/usr/bin/env bash
# The pipeline benchmark (benches/pipeline.rs; figures explained in
# docs/benchmarks.md): starts its own local Kafka broker, builds the release
# binary and the bench, runs the scenarios and prints a table of figures.
#
#   scripts/bench.sh [--smoke] [--out FILE] [--perf FILE] [scenario...]
#
# Scenarios: throughput backlog memory ratelimit timeliness recovery brownout
# parse burst peer (default: all). burst has BENCH_BURST_USERS users (default
# 20,000) fall due within BENCH_BURST_SPREAD_S seconds (default 3) and
# measures how late their repolls run. peer alternates the service with a Python
# program doing the same work (benches/peer/peer.py, run by the venv of
# scripts/tools.sh python): BENCH_PEER_USERS users (default 10,000),
# BENCH_PEER_PAIRS pairs (default 3).
#   --smoke      tiny sizes, no timing goals (what the test suite runs)
#   --out FILE   also write the figures as JSON to FILE
#   --perf FILE  `perf record -g` the service during the throughput run
#                into FILE (then: perf report --stdio -i FILE)
# Sizes can be changed with BENCH_* variables (docs/benchmarks.md), e.g.
# BENCH_MEMORY_USERS=1000,100000; BENCH_ANSWERS=realistic gives the throughput,
# backlog and peer runs realistic answers (200 predictors, 200 to 5,000 SMS a
# user; benches/support/answers.rs). Child logs go to BENCH_LOG_DIR (default: a
# fresh directory under /tmp, printed at start). Exits non-zero when a
# scenario produced wrong counts or failed to run; goals not met are listed
# but do not fail the run.
set -euo pipefail
cd "$(dirname "$0")/.."

mode="--full"
out=""
perf=""
declare -a scenarios=()
while (($#)); do
    case "$1" in
    --smoke) mode="--smoke" ;;
    --out)
        out="$(realpath -m "$2")"
        shift
        ;;
    --perf)
        perf="$(realpath -m "$2")"
        shift
        ;;
    -h | --help)
        sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'
        exit 0
        ;;
    -*)
        echo "bench.sh: unknown option $1" >&2
        exit 2
        ;;
    *) scenarios+=("$1") ;;
    esac
    shift
done

KAFKA_DIR="$(mktemp -d "${TMPDIR:-/tmp}/insights-bench-kafka.XXXXXX")"
cleanup() {
    scripts/kafka.sh stop --dir "$KAFKA_DIR" >/dev/null 2>&1 || true
    rm -rf "$KAFKA_DIR"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

echo "bench.sh: building (release)" >&2
# One build of the release binary and the bench together: `cargo build
# --release` alone would resolve features without the dev-dependencies and
# rebuild half the graph a second time.
cargo bench --bench pipeline --no-run

KAFKA_BOOTSTRAP="$(scripts/kafka.sh start --dir "$KAFKA_DIR")"
export KAFKA_BOOTSTRAP
export BENCH_SERVICE_BIN="${BENCH_SERVICE_BIN:-${CARGO_TARGET_DIR:-$PWD/target}/release/insights-enricher}"
if [[ -n "$perf" ]]; then
    export BENCH_PERF_DATA="$perf"
fi
# The peer scenario's Python (the test venv, built on first use).
if ((${#scenarios[@]} == 0)) || [[ " ${scenarios[*]} " == *" peer "* ]]; then
    if [[ -z "${BENCH_PEER_PYTHON:-}" ]]; then
        BENCH_PEER_PYTHON="$(scripts/tools.sh python)" || BENCH_PEER_PYTHON=""
    fi
    export BENCH_PEER_PYTHON
fi

echo "bench.sh: broker $KAFKA_BOOTSTRAP; machine: $(nproc) cores; $(uptime)" >&2
args=("$mode")
if [[ -n "$out" ]]; then
    args+=(--out "$out")
fi
cargo bench --bench pipeline -- "${args[@]}" "${scenarios[@]}"

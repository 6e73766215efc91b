#!/usr/bin/env bash
# The whole test suite, from nothing: builds, installs the tools it needs
# (cached under ~/.cache/insights-enricher), starts one local Apache Kafka 4
# broker and one schema registry (Apicurio, scripts/registry.sh) for the run,
# runs every test, stops them.
#
# Stages: cargo fmt --check, cargo clippy -D warnings, tools + broker,
# cargo build --all-targets, cargo test --all-targets, the broker-restart
# tests on a fresh Kafka 4 broker of their own, tests/pipeline_crash.rs again
# (ignored ones included) on a Kafka 3.9
# broker of its own, pytest tests/python,
# scripts/asyncapi-check.sh, scripts/lint-shell.sh (shellcheck),
# scripts/check-layers.sh (import rules),
# scripts/helm-test.sh (when present). A failing stage does not hide the
# others (only a failed build or broker skips what needs them); the run ends
# with a summary and exits non-zero when anything failed.
#
# Environment read: TEST_THREADS (cargo test threads, default 2),
# TEST_LANES (test binaries run at once, default 3),
# KAFKA_START_TIMEOUT (seconds, default 90). Exported to the tests:
# KAFKA_BOOTSTRAP, KAFKA_DIR, TEST_SCHEMA_REGISTRY (the registry's Confluent
# API URL), INSIGHTS_PYTHON, HELM, PROMTOOL, PROMETHEUS.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

# The machine's tools first: one clear line per missing one, before any work.
scripts/prereqs.sh test || exit 1

CACHE="${INSIGHTS_CACHE:-$HOME/.cache/insights-enricher}"
mkdir -p "$CACHE"
# Tests of one binary run two at a time; tests use unique topics and
# groups, so they may overlap.
TEST_THREADS="${TEST_THREADS:-2}"
# Test binaries run at once (cargo_test_in_lanes).
TEST_LANES="${TEST_LANES:-3}"
# Python must not leave bytecode in the repository.
export PYTHONPYCACHEPREFIX="$CACHE/pycache"

LOGS="$(mktemp -d "${TMPDIR:-/tmp}/insights-test-logs.XXXXXX")"
declare -a STAGES=() RESULTS=() TIMES=()
FAILED=0
TESTS_PASSED=0
TESTS_FAILED=0

KAFKA_DIR=""
KAFKA3_DIR=""
REGISTRY_DIR=""
# shellcheck disable=SC2317,SC2329 # run by the EXIT trap
cleanup() {
    local d
    for d in "$KAFKA_DIR" "$KAFKA3_DIR"; do
        [[ -n "$d" ]] || continue
        scripts/kafka.sh stop --dir "$d" >/dev/null 2>&1 || true
        rm -rf "$d"
    done
    if [[ -n "$REGISTRY_DIR" ]]; then
        scripts/registry.sh stop --dir "$REGISTRY_DIR" >/dev/null 2>&1 || true
        rm -rf "$REGISTRY_DIR"
    fi
    rm -rf "$LOGS"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

banner() { printf '\n==== %s ====\n' "$*"; }

# run_stage NAME COMMAND...: runs a stage, keeps its output in a log for the
# counts, and records pass/fail and duration.
run_stage() {
    local name="$1" start=$SECONDS rc
    shift
    banner "$name: $*"
    "$@" 2>&1 | tee "$LOGS/$name.log"
    rc=${PIPESTATUS[0]}
    record "$name" "$rc" $((SECONDS - start))
    return "$rc"
}

record() {
    STAGES+=("$1")
    TIMES+=("$3")
    if [[ "$2" == 0 ]]; then
        RESULTS+=("ok")
    else
        RESULTS+=("FAILED (exit $2)")
        FAILED=1
    fi
}

skip() {
    STAGES+=("$1")
    TIMES+=(0)
    RESULTS+=("skipped: $2")
    FAILED=1
}

# Adds up the per-binary "test result: ... N passed; M failed" lines.
count_cargo() {
    local p f
    read -r p f < <(awk '/^test result:/ {
            for (i = 1; i < NF; i++) {
                if ($(i + 1) ~ /^passed/) p += $i
                if ($(i + 1) ~ /^failed/) f += $i
            }
        } END { print p + 0, f + 0 }' "$1")
    TESTS_PASSED=$((TESTS_PASSED + p))
    TESTS_FAILED=$((TESTS_FAILED + f))
}

# Reads a closing "N passed, M failed" style line (pytest, helm-test.sh).
count_summary() {
    local line p f e
    line=$(grep -E '[0-9]+ (passed|failed)' "$1" | tail -n1)
    p=$(grep -oE '[0-9]+ passed' <<<"$line" | grep -oE '[0-9]+' || echo 0)
    f=$(grep -oE '[0-9]+ failed' <<<"$line" | grep -oE '[0-9]+' || echo 0)
    e=$(grep -oE '[0-9]+ errors?' <<<"$line" | grep -oE '[0-9]+' || echo 0)
    TESTS_PASSED=$((TESTS_PASSED + ${p:-0}))
    TESTS_FAILED=$((TESTS_FAILED + ${f:-0} + ${e:-0}))
}

# own_broker_stage NAME KAFKA_LINE TEST_ARGS...: tests/pipeline_crash.rs
# with TEST_ARGS against a broker of its own of KAFKA_LINE (4 or 3.9),
# started fresh for the stage and stopped after it. The broker-restart
# tests stop and start their broker: a fresh one restarts in seconds,
# where the run's shared broker, holding every other test's partitions,
# takes minutes.
own_broker_stage() {
    local name="$1" line="$2" start=$SECONDS bootstrap
    shift 2
    banner "$name: a Kafka $line broker of its own for tests/pipeline_crash.rs"
    KAFKA3_DIR="$(mktemp -d "${TMPDIR:-/tmp}/insights-kafka-own.XXXXXX")"
    if ! bootstrap="$(scripts/kafka.sh start --kafka "$line" --dir "$KAFKA3_DIR")"; then
        record "$name" 1 $((SECONDS - start))
        return
    fi
    KAFKA_BOOTSTRAP="$bootstrap" KAFKA_DIR="$KAFKA3_DIR" \
        run_stage "$name" cargo test --test pipeline_crash -- "$@" --test-threads=1
    count_cargo "$LOGS/$name.log"
    scripts/kafka.sh stop --dir "$KAFKA3_DIR" >/dev/null 2>&1 || true
    rm -rf "$KAFKA3_DIR"
    KAFKA3_DIR=""
}

# cargo_test_in_lanes: `cargo test --all-targets`, with the test binaries
# run TEST_LANES at a time instead of one after the other; each still runs
# its own tests TEST_THREADS at a time. Most tests wait on the broker, the
# simulator or a timer, not on the CPU: one binary at a time left this
# 2-core machine at a load under 1. The longest binaries start first (as
# the last run on this machine timed them, kept in the cache); each
# binary's output is printed whole once it is done, with its time.
# shellcheck disable=SC2329 # run by run_stage
cargo_test_in_lanes() {
    local list="$LOGS/test-binaries" bins="$LOGS/bins" times="$CACHE/test-times" rc=0
    mkdir -p "$bins"
    cargo test --all-targets --no-run --message-format=json >"$list.json" || return 1
    # What `cargo test` would run: every artifact built as a test.
    python3 -c '
import json, sys
for line in open(sys.argv[1]):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print(m["executable"])
' "$list.json" >"$list.paths" || return 1
    # Longest first: seconds from the last run, 0 for a binary not yet timed.
    local exe name
    while read -r exe; do
        name="$(basename "$exe" | sed 's/-[0-9a-f]*$//')"
        printf '%s %s\n' "$(awk -v n="$name" '$1 == n { print $2 }' "$times" 2>/dev/null | tail -n1 | grep . || echo 0)" "$exe"
    done <"$list.paths" | sort -rn | cut -d' ' -f2- >"$list.order"
    # shellcheck disable=SC2016 # expanded by the inner shell
    xargs -P "$TEST_LANES" -I{} bash -c '
        exe="$1"; name="$(basename "$exe" | sed "s/-[0-9a-f]*\$//")"; start=$SECONDS
        "$exe" --test-threads="$2" >"$3/$(basename "$exe").log" 2>&1
        echo "$name $? $((SECONDS - start)) $(basename "$exe")" >>"$3/status"
    ' _ {} "$TEST_THREADS" "$bins" <"$list.order" || rc=1
    local status secs base
    while read -r name status secs base; do
        printf '\n     Running %s (%s s, exit %s)\n' "$name" "$secs" "$status"
        cat "$bins/$base.log"
        ((status == 0)) || rc=1
    done <"$bins/status"
    awk '{ print $1, $3 }' "$bins/status" >"$times.new" && mv "$times.new" "$times"
    return "$rc"
}

TOTAL_START=$SECONDS

run_stage fmt cargo fmt --all -- --check
run_stage clippy cargo clippy --all-targets -- -D warnings

# ---- tools and the broker
tools_ok=1
banner "tools: Kafka jars (4 and 3.9), Apicurio Registry, Python venv, helm, promtool, prometheus"
start=$SECONDS
{
    scripts/tools.sh kafka >/dev/null &&
        scripts/tools.sh kafka-3.9 >/dev/null &&
        scripts/tools.sh apicurio >/dev/null &&
        INSIGHTS_PYTHON="$(scripts/tools.sh python)" &&
        HELM="$(scripts/tools.sh helm)" &&
        PROMTOOL="$(scripts/tools.sh promtool)" &&
        PROMETHEUS="$(scripts/tools.sh prometheus)"
} || tools_ok=0
record tools $((1 - tools_ok)) $((SECONDS - start))
export INSIGHTS_PYTHON="${INSIGHTS_PYTHON:-}" HELM="${HELM:-}" PROMTOOL="${PROMTOOL:-}" PROMETHEUS="${PROMETHEUS:-}"

broker_ok=0
if ((tools_ok)); then
    banner "kafka: starting one broker for the run"
    start=$SECONDS
    KAFKA_DIR="$(mktemp -d "${TMPDIR:-/tmp}/insights-kafka.XXXXXX")"
    if KAFKA_BOOTSTRAP="$(scripts/kafka.sh start --dir "$KAFKA_DIR")"; then
        broker_ok=1
        export KAFKA_BOOTSTRAP KAFKA_DIR
        echo "KAFKA_BOOTSTRAP=$KAFKA_BOOTSTRAP KAFKA_DIR=$KAFKA_DIR"
    fi
    record kafka $((1 - broker_ok)) $((SECONDS - start))
    # The schema registry: a broker without it still runs the JSON tests,
    # so its failure fails the run without skipping them.
    banner "registry: starting one schema registry for the run"
    start=$SECONDS
    REGISTRY_DIR="$(mktemp -d "${TMPDIR:-/tmp}/insights-registry.XXXXXX")"
    registry_ok=0
    if TEST_SCHEMA_REGISTRY="$(scripts/registry.sh start --dir "$REGISTRY_DIR")"; then
        registry_ok=1
        export TEST_SCHEMA_REGISTRY
        echo "TEST_SCHEMA_REGISTRY=$TEST_SCHEMA_REGISTRY"
    fi
    record registry $((1 - registry_ok)) $((SECONDS - start))
else
    skip kafka "tools failed"
    skip registry "tools failed"
fi

# ---- Rust
build_ok=0
run_stage build cargo build --all-targets && build_ok=1
if ((build_ok && broker_ok)); then
    run_stage cargo-test cargo_test_in_lanes
    count_cargo "$LOGS/cargo-test.log"
    # Tests that restart their broker are #[ignore]d by the run above and
    # run here alone, after the rest, on a fresh Kafka 4 broker; then the
    # transaction, crash and broker-restart tests once more on the last 3.x
    # line (clusters not yet on Kafka 4 run the same service).
    own_broker_stage broker-restart 4 --ignored
    own_broker_stage kafka-3.9 3.9 --include-ignored
else
    skip cargo-test "needs a build and a broker"
fi

# ---- Python
if ((broker_ok)); then
    run_stage pytest "$INSIGHTS_PYTHON" -m pytest -q -c tests/python/pytest.ini --rootdir tests/python tests/python
    count_summary "$LOGS/pytest.log"
else
    skip pytest "needs the broker"
fi

# ---- Event contract (AsyncAPI document, parsed with @asyncapi/parser)
run_stage asyncapi scripts/asyncapi-check.sh
count_summary "$LOGS/asyncapi.log"

# ---- Shell scripts
run_stage lint-shell scripts/lint-shell.sh
count_summary "$LOGS/lint-shell.log"

# ---- The house's import rules (the broker-free loop, the tools)
run_stage layers scripts/check-layers.sh
count_summary "$LOGS/layers.log"

# ---- Helm chart
if [[ -x scripts/helm-test.sh ]]; then
    run_stage helm-test scripts/helm-test.sh
    count_summary "$LOGS/helm-test.log"
fi

banner "summary"
for i in "${!STAGES[@]}"; do
    printf '  %-11s %-28s %5ss\n' "${STAGES[$i]}" "${RESULTS[$i]}" "${TIMES[$i]}"
done
printf '  total time: %ss\n' $((SECONDS - TOTAL_START))
if ((FAILED)); then
    echo "  RESULT: FAILED"
else
    echo "  RESULT: all stages passed"
fi
echo "tests: $TESTS_PASSED passed, $TESTS_FAILED failed"
exit "$FAILED"

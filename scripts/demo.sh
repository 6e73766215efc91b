#!/usr/bin/env bash
# The local quick start: a real Apache Kafka broker, the provider simulator
# and the service on this machine, a batch of sample users with a mix of
# scenarios, progress while they flow, and a summary of every output topic.
#
#   ./scripts/demo.sh            # run the demo, then stop everything
#   ./scripts/demo.sh --keep     # leave broker, simulator and service running
#
# Everything it needs is built or installed on first use (cached under
# ~/.cache/insights-enricher). Ports: simulator 127.0.0.1:8080, metrics
# 127.0.0.1:9464, broker on a free port (printed).
set -euo pipefail
cd "$(dirname "$0")/.."

KEEP=0
[[ "${1:-}" == "--keep" ]] && KEEP=1

RUN_DIR="$(mktemp -d "${TMPDIR:-/tmp}/insights-demo.XXXXXX")"
SIM_PID=""
SVC_PID=""
cleanup() {
    if [[ "$KEEP" == 1 ]]; then
        echo "left running: broker dir $RUN_DIR/kafka, simulator pid $SIM_PID, service pid $SVC_PID"
        return
    fi
    [[ -n "$SVC_PID" ]] && kill -TERM "$SVC_PID" 2>/dev/null && wait "$SVC_PID" 2>/dev/null || true
    [[ -n "$SIM_PID" ]] && kill -TERM "$SIM_PID" 2>/dev/null && wait "$SIM_PID" 2>/dev/null || true
    scripts/kafka.sh stop --dir "$RUN_DIR/kafka" >/dev/null 2>&1 || true
    rm -rf "$RUN_DIR"
}
trap cleanup EXIT

echo "== building insights-enricher"
cargo build --quiet
BIN=target/debug/insights-enricher
PY="$(scripts/tools.sh python)"

echo "== starting Apache Kafka (KRaft, single node)"
BOOTSTRAP="$(scripts/kafka.sh start --dir "$RUN_DIR/kafka" | tail -n 1)"
echo "   broker at $BOOTSTRAP"

echo "== starting the provider simulator on 127.0.0.1:8080 (examples/scenarios/mixed.json)"
"$BIN" simulate --listen 127.0.0.1:8080 --scenarios examples/scenarios/mixed.json \
    >"$RUN_DIR/simulator.log" 2>&1 &
SIM_PID=$!

echo "== starting the service (config/local.toml), log in $RUN_DIR/service.log"
INSIGHTS__KAFKA__BOOTSTRAP_SERVERS="$BOOTSTRAP" "$BIN" run --config config/local.toml \
    >"$RUN_DIR/service.log" 2>&1 &
SVC_PID=$!

for _ in $(seq 1 60); do
    if curl -fsS http://127.0.0.1:9464/readyz >/dev/null 2>&1; then break; fi
    if ! kill -0 "$SVC_PID" 2>/dev/null; then
        echo "the service exited; its log:" >&2
        tail -n 30 "$RUN_DIR/service.log" >&2
        exit 1
    fi
    sleep 1
done
echo "   ready: http://127.0.0.1:9464/metrics"

echo "== sending sample users"
"$PY" scripts/demo.py --bootstrap "$BOOTSTRAP" --metrics http://127.0.0.1:9464/metrics

echo
echo "== dead letters, as an operator sees them (insights-enricher dlq inspect --summary)"
INSIGHTS__KAFKA__BOOTSTRAP_SERVERS="$BOOTSTRAP" "$BIN" dlq inspect --summary --config config/local.toml

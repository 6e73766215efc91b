#!/usr/bin/env bash
# The local quick start: a real Apache Kafka broker, the provider simulator
# and the service on this machine, a batch of sample users with a mix of
# scenarios, progress while they flow, and a summary of every output topic.
#
#   ./scripts/demo.sh            # run the demo, then stop everything
#   ./scripts/demo.sh --keep     # leave broker, simulator and service running
#   ./scripts/demo.sh --avro     # outputs in Avro through a real schema
#                                # registry (scripts/registry.sh), read back
#                                # with confluent-kafka's AvroDeserializer
#
# Everything it needs is built or installed on first use (cached under
# ~/.cache/insights-enricher). Every port is a free one picked at start and
# printed (the broker's, the simulator's, the service's metrics); set
# DEMO_SIMULATOR_PORT or DEMO_METRICS_PORT to choose one, which must then be free.
# When the broker, the simulator or the service exits, the demo stops at
# once and prints why, with the end of that process's log (logs are kept).
set -euo pipefail
cd "$(dirname "$0")/.."

KEEP=0
AVRO=0
for arg in "$@"; do
    case "$arg" in
    --keep) KEEP=1 ;;
    --avro) AVRO=1 ;;
    *)
        echo "usage: $0 [--keep] [--avro]" >&2
        exit 2
        ;;
    esac
done

scripts/prereqs.sh demo

# shellcheck source=scripts/demo-lib.sh
source scripts/demo-lib.sh

# Ports first, so a port given and taken stops the demo before any work.
SIM_PORT="$(demo_port simulator "${DEMO_SIMULATOR_PORT:-}")" || exit 1
METRICS_PORT="$(demo_port metrics "${DEMO_METRICS_PORT:-}")" || exit 1
while [[ "$METRICS_PORT" == "$SIM_PORT" && -z "${DEMO_METRICS_PORT:-}" ]]; do
    METRICS_PORT="$(demo_port metrics)"
done
METRICS="http://127.0.0.1:$METRICS_PORT"

RUN_DIR="$(mktemp -d "${TMPDIR:-/tmp}/insights-demo.XXXXXX")"
SIM_PID=""
SVC_PID=""
PY_PID=""
FAILED=0
TARGET="${CARGO_TARGET_DIR:-target}"
BIN="$TARGET/debug/insights-enricher"

stop_all() {
    if [[ -n "$PY_PID" ]]; then kill -TERM "$PY_PID" 2>/dev/null || true; fi
    if [[ -n "$SVC_PID" ]] && kill -TERM "$SVC_PID" 2>/dev/null; then wait "$SVC_PID" 2>/dev/null || true; fi
    if [[ -n "$SIM_PID" ]] && kill -TERM "$SIM_PID" 2>/dev/null; then wait "$SIM_PID" 2>/dev/null || true; fi
    scripts/kafka.sh stop --dir "$RUN_DIR/kafka" >/dev/null 2>&1 || true
    scripts/registry.sh stop --dir "$RUN_DIR/registry" >/dev/null 2>&1 || true
}
cleanup() {
    if [[ "$KEEP" == 1 && "$FAILED" == 0 ]]; then
        return
    fi
    stop_all
    if [[ "$FAILED" == 0 ]]; then
        rm -rf "$RUN_DIR"
    else
        echo "logs kept in $RUN_DIR" >&2
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Stops the demo when one of its processes is gone: the reason and the end
# of that process's log. Called between every step and while users flow.
check_alive() {
    if ! demo_watch broker "$(cat "$RUN_DIR/kafka/pid" 2>/dev/null || true)" "$RUN_DIR/kafka/broker.log" ||
        ! demo_watch simulator "$SIM_PID" "$RUN_DIR/simulator.log" ||
        ! demo_watch service "$SVC_PID" "$RUN_DIR/service.log"; then
        FAILED=1
        exit 1
    fi
}

echo "== building insights-enricher (cargo's progress below; the first build takes a few minutes)"
cargo build --bin insights-enricher
PY="$(scripts/tools.sh python)"

echo "== starting Apache Kafka (KRaft, single node)"
if ! BOOTSTRAP="$(scripts/kafka.sh start --dir "$RUN_DIR/kafka" | tail -n 1)"; then
    FAILED=1
    echo "error: the broker did not start (see above)" >&2
    exit 1
fi
echo "   broker at $BOOTSTRAP"

REGISTRY=""
if [[ "$AVRO" == 1 ]]; then
    echo "== starting a schema registry (Apicurio Registry, in memory)"
    if ! REGISTRY="$(scripts/registry.sh start --dir "$RUN_DIR/registry" | tail -n 1)"; then
        FAILED=1
        echo "error: the schema registry did not start (see above)" >&2
        exit 1
    fi
    echo "   registry at $REGISTRY"
fi

echo "== starting the provider simulator on 127.0.0.1:$SIM_PORT (examples/scenarios/mixed.json)"
"$BIN" simulate --listen "127.0.0.1:$SIM_PORT" --scenarios examples/scenarios/mixed.json \
    >"$RUN_DIR/simulator.log" 2>&1 &
SIM_PID=$!

echo "== starting the service (config/local.toml), log in $RUN_DIR/service.log"
SERVICE_ENV=(
    "INSIGHTS__KAFKA__BOOTSTRAP_SERVERS=$BOOTSTRAP"
    "INSIGHTS__FINBOX__BASE_URL=http://127.0.0.1:$SIM_PORT"
    "INSIGHTS__CREDEAU__BASE_URL=http://127.0.0.1:$SIM_PORT"
    "INSIGHTS__SERVER__LISTEN=127.0.0.1:$METRICS_PORT"
)
DEMO_ARGS=()
if [[ -n "$REGISTRY" ]]; then
    SERVICE_ENV+=("INSIGHTS__ENCODING__OUTPUT=avro" "INSIGHTS__ENCODING__SCHEMA_REGISTRY_URL=$REGISTRY")
    DEMO_ARGS+=(--registry "$REGISTRY")
fi
env "${SERVICE_ENV[@]}" "$BIN" run --config config/local.toml >"$RUN_DIR/service.log" 2>&1 &
SVC_PID=$!

ready=0
for _ in $(seq 1 90); do
    check_alive
    if curl -fsS "$METRICS/readyz" >/dev/null 2>&1 &&
        curl -fsS "http://127.0.0.1:$SIM_PORT/admin/stats" >/dev/null 2>&1; then
        ready=1
        break
    fi
    sleep 1
done
check_alive
if [[ "$ready" != 1 ]]; then
    FAILED=1
    echo "error: the service was not ready within 90 s; the end of its log:" >&2
    tail -n 15 "$RUN_DIR/service.log" | sed 's/^/    /' >&2
    exit 1
fi
echo "   ready: $METRICS/metrics"

echo "== sending sample users"
"$PY" scripts/demo.py --bootstrap "$BOOTSTRAP" --metrics "$METRICS/metrics" "${DEMO_ARGS[@]}" &
PY_PID=$!
while demo_alive "$PY_PID"; do
    check_alive
    sleep 1
done
set +e
wait "$PY_PID"
status=$?
set -e
PY_PID=""
check_alive

echo
echo "== dead letters, as an operator sees them (insights-enricher dlq inspect --summary)"
INSIGHTS__KAFKA__BOOTSTRAP_SERVERS="$BOOTSTRAP" "$BIN" dlq inspect --summary --config config/local.toml

if [[ "$KEEP" == 1 ]]; then
    cat <<EOF

== left running (--keep)
   broker     $BOOTSTRAP (directory $RUN_DIR/kafka)
   simulator  http://127.0.0.1:$SIM_PORT (pid $SIM_PID, log $RUN_DIR/simulator.log)
   service    $METRICS/metrics (pid $SVC_PID, log $RUN_DIR/service.log)
   try:
     INSIGHTS__KAFKA__BOOTSTRAP_SERVERS=$BOOTSTRAP $BIN dlq inspect --config config/local.toml
     INSIGHTS__KAFKA__BOOTSTRAP_SERVERS=$BOOTSTRAP $BIN dlq replay --dry-run --config config/local.toml
     curl -s $METRICS/metrics | grep ^insights_
   stop everything:
     kill $SVC_PID $SIM_PID; scripts/kafka.sh stop --dir $RUN_DIR/kafka
     scripts/registry.sh stop --dir $RUN_DIR/registry; rm -rf $RUN_DIR
EOF
fi
if [[ "$status" != 0 ]]; then
    FAILED=1
    exit "$status"
fi

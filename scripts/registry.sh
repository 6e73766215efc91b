#!/usr/bin/env bash
# A real Confluent-compatible schema registry for tests and local runs:
# Apicurio Registry (its Confluent API, /apis/ccompat/v7), in-memory storage,
# BACKWARD compatibility by default as in Confluent's registry. The
# application comes from scripts/tools.sh apicurio (Maven Central, cached).
#
#   scripts/registry.sh start --dir DIR [--port N]   start one, print its URL
#   scripts/registry.sh stop --dir DIR               SIGTERM, then SIGKILL
#   scripts/registry.sh status --dir DIR             exit 0 when it runs
#
# DIR holds registry.log, pid and url. The registry listens on 127.0.0.1
# only: its API on the port (free one by default), its management interface
# (health, metrics) on a second free port. It runs on Java 21 or newer:
# $REGISTRY_JAVA, else $JAVA_HOME/bin/java, else java on the PATH, else the
# newest JDK under /usr/lib/jvm ($REGISTRY_JVM_DIR), whichever first is 21
# or newer.
# Environment: REGISTRY_START_TIMEOUT (seconds, default 120),
# REGISTRY_HEAP_MAX (default 384m), INSIGHTS_CACHE.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
START_TIMEOUT="${REGISTRY_START_TIMEOUT:-120}"
HEAP_MAX="${REGISTRY_HEAP_MAX:-384m}"
MIN_JAVA=21

log() { echo "registry.sh: $*" >&2; }
die() {
    log "error: $*"
    exit 1
}

usage() {
    sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

java_version() {
    "$1" -XshowSettings:properties -version 2>&1 | sed -n 's/^ *java.specification.version = //p'
}

# The first Java of at least MIN_JAVA among the candidates, or a clear
# error naming what was found.
find_java() {
    local candidates=() c v seen=""
    [[ -z "${REGISTRY_JAVA:-}" ]] || candidates+=("$REGISTRY_JAVA")
    [[ -z "${JAVA_HOME:-}" ]] || candidates+=("$JAVA_HOME/bin/java")
    c="$(command -v java || true)"
    [[ -z "$c" ]] || candidates+=("$c")
    while IFS= read -r c; do
        candidates+=("$c")
    done < <(find "${REGISTRY_JVM_DIR:-/usr/lib/jvm}" -mindepth 3 -maxdepth 3 \
        -path '*/bin/java' 2>/dev/null | sort -V -r)
    for c in "${candidates[@]}"; do
        [[ -x "$c" ]] || continue
        v="$(java_version "$c")"
        if [[ "$v" =~ ^[0-9]+$ ]] && ((v >= MIN_JAVA)); then
            echo "$c"
            return
        fi
        seen+=" $c (Java ${v:-?})"
    done
    die "Apicurio Registry needs Java $MIN_JAVA or newer; found only:${seen:- no java at all}. Install one (e.g. a Temurin 21 or 25 JDK) or point REGISTRY_JAVA at it"
}

# The pid file is trusted only while that pid is our registry for DIR.
registry_pid() {
    local dir="$1" pid
    [[ -f "$dir/pid" ]] || return 1
    pid="$(cat "$dir/pid")"
    [[ "$pid" =~ ^[0-9]+$ && -r "/proc/$pid/cmdline" ]] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "-Dinsights.registry.dir=$dir " || return 1
    echo "$pid"
}

alive() {
    local state
    state="$(sed -n 's/^[0-9]* (.*) \([A-Za-z]\).*/\1/p' "/proc/$1/stat" 2>/dev/null)" || return 1
    [[ -n "$state" && "$state" != "Z" ]]
}

fail_start() {
    local dir="$1" offset="$2" reason="$3"
    log "error: $reason"
    log "---- tail of $dir/registry.log ----"
    tail -c "+$((offset + 1))" "$dir/registry.log" 2>/dev/null | tail -n 40 >&2 || true
    log "----"
    if [[ -f "$dir/pid" ]]; then
        kill -KILL "$(cat "$dir/pid")" 2>/dev/null || true
    fi
    rm -f "$dir/pid"
    exit 1
}

start() {
    local dir="$1" port="$2"
    mkdir -p "$dir"
    dir="$(cd "$dir" && pwd)"
    local pid
    if pid="$(registry_pid "$dir")"; then
        log "registry already running in $dir (pid $pid)"
        cat "$dir/url"
        return
    fi
    local java app
    java="$(find_java)"
    app="$("$HERE/tools.sh" apicurio)" || die "scripts/tools.sh apicurio failed"
    [[ -n "$port" ]] || port="$(free_port)"
    port_open "$port" && die "port $port is already in use (the registry's API port)"
    local mport
    mport="$(free_port)"
    while [[ "$mport" == "$port" ]]; do mport="$(free_port)"; done

    touch "$dir/registry.log"
    local offset
    offset="$(stat -c %s "$dir/registry.log")"
    echo "==== registry.sh start $(date -u +%FT%TZ) port=$port management=$mport java=$java ====" >>"$dir/registry.log"
    # C1 only and one GC thread: it starts faster and serves a test run's
    # few requests easily on a shared 2-core machine.
    (cd "$dir" && exec nohup "$java" -Xms64m "-Xmx$HEAP_MAX" -XX:+UseSerialGC \
        -XX:TieredStopAtLevel=1 -Djava.awt.headless=true \
        "-Dinsights.registry.dir=$dir" \
        -Dquarkus.http.host=127.0.0.1 "-Dquarkus.http.port=$port" \
        -Dquarkus.management.host=127.0.0.1 "-Dquarkus.management.port=$mport" \
        -Dapicurio.storage.kind=sql -Dapicurio.storage.sql.kind=h2 \
        -Dapicurio.rules.global.compatibility=BACKWARD \
        -jar "$app/quarkus-run.jar" >>"$dir/registry.log" 2>&1 </dev/null) &
    local started=$!
    echo "$started" >"$dir/pid"
    local url="http://127.0.0.1:$port/apis/ccompat/v7"

    local began=$SECONDS deadline=$((SECONDS + START_TIMEOUT))
    while ((SECONDS < deadline)); do
        alive "$started" || fail_start "$dir" "$offset" "the registry exited during start-up"
        if curl -sf -o /dev/null --max-time 5 "$url/subjects"; then
            echo "$url" >"$dir/url"
            log "registry ready at $url after $((SECONDS - began))s (pid $started, log $dir/registry.log)"
            echo "$url"
            return
        fi
        sleep 0.5
    done
    fail_start "$dir" "$offset" "the registry did not answer at $url within ${START_TIMEOUT}s"
}

stop() {
    local dir="$1" pid
    [[ -d "$dir" ]] || return 0
    dir="$(cd "$dir" && pwd)"
    if ! pid="$(registry_pid "$dir")"; then
        rm -f "$dir/pid"
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + 20))
    while registry_pid "$dir" >/dev/null && ((SECONDS < deadline)); do sleep 0.2; done
    if registry_pid "$dir" >/dev/null; then
        log "registry (pid $pid) ignored SIGTERM for 20s, killing it"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$dir/pid"
}

status() {
    local dir="$1" pid
    [[ -d "$dir" ]] || die "no such directory: $dir"
    dir="$(cd "$dir" && pwd)"
    if pid="$(registry_pid "$dir")"; then
        echo "running pid=$pid url=$(cat "$dir/url")"
    else
        echo "stopped"
        return 1
    fi
}

cmd="${1:-}"
[[ -n "$cmd" ]] || usage
shift
dir=""
port=""
while (($#)); do
    case "$1" in
    --dir)
        dir="${2:?--dir needs a value}"
        shift 2
        ;;
    --port)
        port="${2:?--port needs a value}"
        [[ "$port" =~ ^[0-9]+$ ]] || die "--port must be a number"
        shift 2
        ;;
    *) usage ;;
    esac
done
[[ -n "$dir" ]] || usage
case "$cmd" in
start) start "$dir" "$port" ;;
stop) stop "$dir" ;;
status) status "$dir" ;;
*) usage ;;
esac

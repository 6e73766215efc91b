#!/usr/bin/env bash
# A real Apache Kafka broker (KRaft, single node) for tests and local runs,
# from the jars scripts/tools.sh installs (it pins the version and resolves
# them from Maven Central with the pom in scripts/kafka/).
#
#   scripts/kafka.sh fetch [--kafka 3.9]        install the jars (tools.sh kafka)
#   scripts/kafka.sh start --dir DIR [--port N] [--sasl-ssl] [--kafka 3.9]
#                                               start a broker, print host:port
#   scripts/kafka.sh stop --dir DIR             SIGTERM, then SIGKILL if needed
#   scripts/kafka.sh restart --dir DIR          same ports, same data
#   scripts/kafka.sh status --dir DIR           exit 0 when the broker runs
#   scripts/kafka.sh tool CLASS [ARGS...]       run a Kafka CLI class, e.g.
#       kafka.admin.ConfigCommand (kafka-configs), org.apache.kafka.tools.TopicCommand
#
# DIR holds server.properties, data/, broker.log, bootstrap (host:port) and pid.
# The broker is the Kafka 4 release tools.sh pins; --kafka 3.9 starts the
# 3.9 one instead (DIR/kafka-line remembers it for restart). Kafka 4 brokers
# need Java 17 or newer.
# --sasl-ssl adds a second listener (TLS + SASL: SCRAM-SHA-512, SCRAM-SHA-256
# and PLAIN) next to the plaintext one: a CA and a broker certificate are
# generated with openssl, user "insights" gets a random password, and DIR
# also holds ca.pem, sasl_ssl_bootstrap (host:port), sasl_username and
# sasl_password (mode 600). A directory started once with --sasl-ssl keeps
# the listener, its port and its users across restart.
# Environment: KAFKA_START_TIMEOUT (seconds, default 90), KAFKA_HEAP_MAX
# (default 768m), INSIGHTS_CACHE (default ~/.cache/insights-enricher).
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
TEMPLATE="$HERE/kafka/server.properties.template"
# Set by fetch: the jars, and the logging options for the broker and the
# tools (Kafka 4 logs through log4j2, 3.9 through reload4j).
LIBS=""
LOG_OPT=""
TOOLS_LOG_OPT=""
# "" for the default Kafka 4 line, or "3.9".
LINE=""
START_TIMEOUT="${KAFKA_START_TIMEOUT:-90}"
STOP_TIMEOUT="${KAFKA_STOP_TIMEOUT:-30}"
HEAP_MAX="${KAFKA_HEAP_MAX:-768m}"

log() { echo "kafka.sh: $*" >&2; }
die() {
    log "error: $*"
    exit 1
}

usage() {
    sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

# ---------------------------------------------------------------- fetch

# The broker's jars: scripts/tools.sh installs them once and prints where.
fetch() {
    local tool="kafka${LINE:+-$LINE}"
    LIBS="$("$HERE/tools.sh" "$tool")" || die "scripts/tools.sh $tool failed"
    if compgen -G "$LIBS/log4j-core-*.jar" >/dev/null; then
        LOG_OPT="-Dlog4j2.configurationFile=file:$HERE/kafka/log4j2.properties"
        TOOLS_LOG_OPT="-Dlog4j2.configurationFile=file:$HERE/kafka/tools-log4j2.properties"
    else
        LOG_OPT="-Dlog4j.configuration=file:$HERE/kafka/log4j.properties"
        TOOLS_LOG_OPT="-Dlog4j.configuration=file:$HERE/kafka/tools-log4j.properties"
    fi
    check_java
}

# Kafka 4 brokers run on Java 17 or newer (3.9 too, here): say so plainly
# instead of letting the JVM fail on a class file version.
check_java() {
    command -v java >/dev/null || die "java (17 or newer) is required for the Kafka broker"
    local v
    v="$(java -XshowSettings:properties -version 2>&1 | sed -n 's/^ *java.specification.version = //p')"
    [[ "$v" =~ ^[0-9]+$ ]] || die "cannot tell the version of $(command -v java)"
    ((v >= 17)) || die "the Kafka broker needs Java 17 or newer; $(command -v java) is Java $v"
}

# ---------------------------------------------------------------- helpers

free_port() {
    if command -v python3 >/dev/null; then
        python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
        return
    fi
    # Without python: probe random high ports until nothing answers.
    local port
    for _ in $(seq 1 200); do
        port=$((20000 + RANDOM % 40000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "$port"
            return
        fi
    done
    die "no free TCP port found"
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

java_opts() {
    # Small heap and a single-threaded collector: the machine has two cores
    # shared with the build and the tests.
    echo "-Xms128m -Xmx$HEAP_MAX -XX:+UseSerialGC" \
        "-Djava.awt.headless=true $LOG_OPT"
}

# Short-lived tools: C1-only compilation starts faster and they do little work.
run_tool() {
    java -Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 \
        "$TOOLS_LOG_OPT" -cp "$LIBS/*" "$@"
}

# The pid file is only trusted when that pid is still our broker for this
# directory, so a recycled pid is never signalled.
broker_pid() {
    local dir="$1" pid
    [[ -f "$dir/pid" ]] || return 1
    pid="$(cat "$dir/pid")"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    [[ -r "/proc/$pid/cmdline" ]] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "kafka.Kafka $dir/server.properties" || return 1
    echo "$pid"
}

# Alive and not a zombie: a broker that died during startup stays a zombie
# child of this script until it exits, and kill -0 would still succeed.
alive() {
    local state
    state="$(sed -n 's/^[0-9]* (.*) \([A-Za-z]\).*/\1/p' "/proc/$1/stat" 2>/dev/null)" || return 1
    [[ -n "$state" && "$state" != "Z" ]]
}

prop() { sed -n "s/^$1=//p" "$2" | head -n1; }

write_properties() {
    local dir="$1" port="$2" cport="$3"
    sed -e "s|@PORT@|$port|g" \
        -e "s|@CONTROLLER_PORT@|$cport|g" \
        -e "s|@DATA_DIR@|$dir/data|g" \
        "$TEMPLATE" >"$dir/server.properties"
}

random_cluster_id() {
    # A Kafka cluster id is 16 random bytes in unpadded URL-safe base64. One
    # in 64 starts with "-", which the storage tool's argument parser takes
    # for an option (it prints its usage and fails); Kafka's own
    # Uuid.randomUuid() redraws those, and so do we.
    local id
    while :; do
        id="$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')"
        [[ "$id" == -* ]] || break
    done
    echo "$id"
}

fail_start() {
    local dir="$1" offset="$2" reason="$3" pid
    log "error: $reason"
    log "---- tail of $dir/broker.log ----"
    tail -c "+$((offset + 1))" "$dir/broker.log" 2>/dev/null | tail -n 60 >&2 || true
    log "----"
    if [[ -f "$dir/pid" ]]; then
        kill -KILL "$(cat "$dir/pid")" 2>/dev/null || true
    fi
    rm -f "$dir/pid"
    exit 1
}

# A metadata round trip through Kafka's own admin tooling: proves the broker
# answers requests on the advertised listener, not just that a port is open.
metadata_ok() {
    local bootstrap="$1"
    timeout 45 java -Xmx128m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 \
        "$TOOLS_LOG_OPT" -cp "$LIBS/*" \
        org.apache.kafka.tools.TopicCommand --bootstrap-server "$bootstrap" --list \
        >/dev/null 2>&1
}

# ---------------------------------------------------------------- sasl_ssl

SASL_USER="insights"

# A CA and a broker certificate for 127.0.0.1/localhost (librdkafka checks
# the host name), packed as a PKCS#12 keystore for the broker. Generated
# once per directory, so a restart keeps what clients already trust.
make_certificates() {
    local tls="$1/tls"
    [[ -f "$tls/broker.p12" && -f "$1/ca.pem" ]] && return
    command -v openssl >/dev/null || die "openssl is required for --sasl-ssl"
    mkdir -p "$tls"
    (
        umask 077
        openssl req -x509 -newkey rsa:2048 -nodes -days 30 -sha256 \
            -subj "/CN=insights-enricher test CA" \
            -addext "basicConstraints=critical,CA:TRUE" \
            -addext "keyUsage=critical,keyCertSign,cRLSign" \
            -keyout "$tls/ca.key" -out "$tls/ca.pem"
        openssl req -newkey rsa:2048 -nodes -sha256 -subj "/CN=localhost" \
            -keyout "$tls/broker.key" -out "$tls/broker.csr"
        printf '%s\n' "subjectAltName=IP:127.0.0.1,DNS:localhost" \
            "extendedKeyUsage=serverAuth" \
            "keyUsage=critical,digitalSignature,keyEncipherment" >"$tls/broker.ext"
        openssl x509 -req -in "$tls/broker.csr" -CA "$tls/ca.pem" -CAkey "$tls/ca.key" \
            -CAcreateserial -days 30 -sha256 -extfile "$tls/broker.ext" -out "$tls/broker.pem"
        head -c 24 /dev/urandom | base64 | tr -d '=+/\n' >"$tls/keystore_password"
        openssl pkcs12 -export -in "$tls/broker.pem" -inkey "$tls/broker.key" \
            -certfile "$tls/ca.pem" -name broker -out "$tls/broker.p12" \
            -passout "file:$tls/keystore_password"
    ) >"$1/tls.log" 2>&1 || {
        cat "$1/tls.log" >&2
        die "generating the TLS certificates in $tls failed"
    }
    cp "$tls/ca.pem" "$1/ca.pem"
    chmod 644 "$1/ca.pem"
}

# The SASL user and its password, generated once per directory.
make_sasl_user() {
    local dir="$1"
    [[ -s "$dir/sasl_password" ]] && return
    (
        umask 077
        # Letters and digits only: the password goes into JAAS and SCRAM
        # arguments, where quotes, commas and brackets are syntax.
        head -c 48 /dev/urandom | base64 | tr -d '=+/\n' | head -c 32 >"$dir/sasl_password"
    )
    echo "$SASL_USER" >"$dir/sasl_username"
}

# Adds the SASL_SSL listener to DIR/server.properties. The plaintext
# listener stays the inter-broker one, so the readiness check and the admin
# tools keep working without credentials.
write_sasl_properties() {
    local dir="$1" sport="$2" password keystore_password
    password="$(cat "$dir/sasl_password")"
    keystore_password="$(cat "$dir/tls/keystore_password")"
    local props="$dir/server.properties"
    sed -i \
        -e "s|^listeners=\(.*\)$|listeners=\1,SASL_SSL://127.0.0.1:$sport|" \
        -e "s|^advertised.listeners=\(.*\)$|advertised.listeners=\1,SASL_SSL://127.0.0.1:$sport|" \
        -e "s|^listener.security.protocol.map=\(.*\)$|listener.security.protocol.map=\1,SASL_SSL:SASL_SSL|" \
        "$props"
    chmod 600 "$props"
    cat >>"$props" <<EOF

# ---- added by kafka.sh --sasl-ssl
sasl.enabled.mechanisms=SCRAM-SHA-512,SCRAM-SHA-256,PLAIN
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.sasl_ssl.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required user_$SASL_USER="$password";
listener.name.sasl_ssl.ssl.keystore.type=PKCS12
listener.name.sasl_ssl.ssl.keystore.location=$dir/tls/broker.p12
listener.name.sasl_ssl.ssl.keystore.password=$keystore_password
listener.name.sasl_ssl.ssl.key.password=$keystore_password
EOF
}


# ---------------------------------------------------------------- commands

start() {
    local dir="$1" port="$2" sasl="$3"
    mkdir -p "$dir"
    dir="$(cd "$dir" && pwd)"
    # A directory keeps the Kafka line it was formatted with.
    if [[ -f "$dir/kafka-line" ]]; then
        local had
        had="$(cat "$dir/kafka-line")"
        [[ -z "$LINE_GIVEN" || "$LINE" == "$had" ]] ||
            die "$dir holds a Kafka ${had:-4} broker; use a fresh directory for Kafka ${LINE:-4}"
        LINE="$had"
    fi
    fetch
    printf '%s' "$LINE" >"$dir/kafka-line"
    local pid
    if pid="$(broker_pid "$dir")"; then
        log "broker already running in $dir (pid $pid)"
        cat "$dir/bootstrap"
        return
    fi
    # Once a directory has the SASL_SSL listener, it keeps it (and its port).
    local sport=""
    if [[ -f "$dir/sasl_ssl_bootstrap" ]]; then
        sasl=1
        sport="$(sed 's/.*://' "$dir/sasl_ssl_bootstrap")"
    fi
    if [[ -n "$sasl" && -f "$dir/data/meta.properties" && ! -f "$dir/sasl_ssl_bootstrap" ]]; then
        die "$dir was formatted without --sasl-ssl (no SCRAM users); use a fresh directory"
    fi

    # A directory that ran a broker before keeps its ports (and data), which
    # is what restart needs; --port overrides the client port.
    local cport
    if [[ -f "$dir/server.properties" ]]; then
        cport="$(prop controller.quorum.voters "$dir/server.properties" | sed 's/.*://')"
        if [[ -z "$port" ]]; then
            port="$(prop listeners "$dir/server.properties" | sed 's|PLAINTEXT://127.0.0.1:\([0-9]*\),.*|\1|')"
        fi
    fi
    [[ -n "$port" ]] || port="$(free_port)"
    [[ -n "${cport:-}" && "$cport" != "$port" ]] || cport="$(free_port)"
    while [[ "$cport" == "$port" ]]; do cport="$(free_port)"; done
    write_properties "$dir" "$port" "$cport"
    local scram=()
    if [[ -n "$sasl" ]]; then
        [[ -n "$sport" ]] || sport="$(free_port)"
        while [[ "$sport" == "$port" || "$sport" == "$cport" ]]; do sport="$(free_port)"; done
        make_certificates "$dir"
        make_sasl_user "$dir"
        write_sasl_properties "$dir" "$sport"
        local password
        password="$(cat "$dir/sasl_password")"
        scram=(--add-scram "SCRAM-SHA-512=[name=$SASL_USER,password=$password]"
            --add-scram "SCRAM-SHA-256=[name=$SASL_USER,password=$password]")
    fi

    if port_open "$port"; then
        die "port $port is already in use"
    fi
    if [[ -n "$sport" ]] && port_open "$sport"; then
        die "port $sport (SASL_SSL) is already in use"
    fi

    if [[ ! -f "$dir/data/meta.properties" ]]; then
        mkdir -p "$dir/data"
        # SCRAM users are written into the metadata log at format time.
        if ! run_tool kafka.tools.StorageTool format "${scram[@]}" \
            -t "$(random_cluster_id)" -c "$dir/server.properties" >"$dir/format.log" 2>&1; then
            cat "$dir/format.log" >&2
            die "formatting the KRaft storage in $dir/data failed"
        fi
    fi

    touch "$dir/broker.log"
    local offset
    offset="$(stat -c %s "$dir/broker.log")"
    echo "==== kafka.sh start $(date -u +%FT%TZ) port=$port controller=$cport ====" >>"$dir/broker.log"
    # Detached from our stdin/stdout so `$(kafka.sh start ...)` returns.
    # shellcheck disable=SC2046
    nohup java $(java_opts) -Dkafka.logs.dir="$dir/logs" -cp "$LIBS/*" \
        kafka.Kafka "$dir/server.properties" >>"$dir/broker.log" 2>&1 </dev/null &
    local started=$!
    echo "$started" >"$dir/pid"
    echo "127.0.0.1:$port" >"$dir/bootstrap"
    [[ -z "$sport" ]] || echo "127.0.0.1:$sport" >"$dir/sasl_ssl_bootstrap"

    local began=$SECONDS deadline=$((SECONDS + START_TIMEOUT))
    local phase="port"
    while ((SECONDS < deadline)); do
        # By pid, not broker_pid: the command line may still be nohup's for a
        # moment.
        alive "$started" || fail_start "$dir" "$offset" "broker process exited during startup"
        case "$phase" in
        port)
            if port_open "$port" && { [[ -z "$sport" ]] || port_open "$sport"; } &&
                tail -c "+$((offset + 1))" "$dir/broker.log" | grep -q "Kafka Server started"; then
                phase="metadata"
                continue
            fi
            ;;
        metadata)
            if metadata_ok "127.0.0.1:$port"; then
                [[ -z "$sport" ]] || log "SASL_SSL listener on 127.0.0.1:$sport (CA $dir/ca.pem, user $SASL_USER)"
                log "broker ready on 127.0.0.1:$port after $((SECONDS - began))s (pid $(cat "$dir/pid"), log $dir/broker.log)"
                echo "127.0.0.1:$port"
                return
            fi
            ;;
        esac
        sleep 0.5
    done
    fail_start "$dir" "$offset" "broker did not become ready within ${START_TIMEOUT}s (phase: $phase)"
}

stop() {
    local dir="$1" pid
    [[ -d "$dir" ]] || return 0
    dir="$(cd "$dir" && pwd)"
    if ! pid="$(broker_pid "$dir")"; then
        rm -f "$dir/pid"
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null || true
    # broker_pid rather than kill -0: an exited broker whose parent has not
    # reaped it yet is a zombie with an empty command line, and is stopped.
    local deadline=$((SECONDS + STOP_TIMEOUT))
    while broker_pid "$dir" >/dev/null && ((SECONDS < deadline)); do
        sleep 0.2
    done
    if broker_pid "$dir" >/dev/null; then
        log "broker (pid $pid) ignored SIGTERM for ${STOP_TIMEOUT}s, killing it"
        kill -KILL "$pid" 2>/dev/null || true
        deadline=$((SECONDS + 10))
        while broker_pid "$dir" >/dev/null && ((SECONDS < deadline)); do sleep 0.1; done
    fi
    rm -f "$dir/pid"
}

status() {
    local dir="$1" pid
    [[ -d "$dir" ]] || die "no such directory: $dir"
    dir="$(cd "$dir" && pwd)"
    if pid="$(broker_pid "$dir")"; then
        echo "running pid=$pid bootstrap=$(cat "$dir/bootstrap")"
    else
        echo "stopped"
        return 1
    fi
}

# ---------------------------------------------------------------- main

cmd="${1:-}"
[[ -n "$cmd" ]] || usage
shift
if [[ "$cmd" == "tool" ]]; then
    (($#)) || usage
    fetch
    run_tool "$@"
    exit
fi
dir=""
port=""
sasl=""
LINE_GIVEN=""
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
    --sasl-ssl)
        sasl=1
        shift
        ;;
    --kafka)
        case "${2:-}" in
        3.9) LINE="3.9" ;;
        4) LINE="" ;;
        *) die "--kafka takes 4 (the default) or 3.9" ;;
        esac
        LINE_GIVEN=1
        shift 2
        ;;
    *) usage ;;
    esac
done

case "$cmd" in
fetch)
    fetch
    echo "$LIBS"
    ;;
start)
    [[ -n "$dir" ]] || usage
    start "$dir" "$port" "$sasl"
    ;;
stop)
    [[ -n "$dir" ]] || usage
    stop "$dir"
    ;;
restart)
    [[ -n "$dir" ]] || usage
    [[ -f "$dir/server.properties" ]] || die "$dir has never run a broker"
    stop "$dir"
    start "$dir" "$port" "$sasl"
    ;;
status)
    [[ -n "$dir" ]] || usage
    status "$dir"
    ;;
*) usage ;;
esac

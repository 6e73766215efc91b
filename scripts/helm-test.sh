#!/usr/bin/env bash
# Tests the Helm chart offline: lint, render several value sets, validate the
# manifests against the Kubernetes schemas, prove that bad values are
# rejected with a clear message, and run the binary's check-config on the
# config.toml each value set renders. Prints "N passed, N failed".
set -euo pipefail
cd "$(dirname "$0")/.."

CHART=helm/insights-enricher
VALUES=tests/helm
# A version both helm's renderer and kubernetes-validate's schemas cover.
K8S_VERSION=1.31.0

# Tools come from scripts/tools.sh, the only installer (it pins the
# versions); HELM, INSIGHTS_PYTHON and PROMTOOL, when set (scripts/test.sh
# exports them), are used as they are.
tool() {
    local name=$1 path
    if ! path=$(scripts/tools.sh "$name" | tail -n1) || [[ ! -x "$path" ]]; then
        echo "helm-test.sh: scripts/tools.sh $name failed" >&2
        exit 1
    fi
    echo "$path"
}
HELM=${HELM:-$(tool helm)}
PY=${INSIGHTS_PYTHON:-$(tool python)}
PROMTOOL=${PROMTOOL:-$(tool promtool)}

# Always through cargo: a no-op when fresh, and never a stale binary judging
# a newer config.
BIN=${CARGO_TARGET_DIR:-target}/debug/insights-enricher
cargo build --quiet --bin insights-enricher

OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
passed=0
failed=0

pass() { passed=$((passed + 1)); echo "  ok   $*"; }
fail() { failed=$((failed + 1)); echo "  FAIL $*"; }

# Runs one of check_rendered.py's subcommands and adds its counts.
py_checks() {
    local log="$OUT/py.log" counts
    "$PY" "$VALUES/check_rendered.py" "$@" >"$log" 2>&1 || true
    grep -E '^  (ok|FAIL) ' "$log" | grep -v '^  ok ' || true
    counts=$(grep -Eo '^  \([0-9]+ ok, [0-9]+ failed\)$' "$log" | tail -n1 || true)
    if [[ -z "$counts" ]]; then
        cat "$log"
        fail "check_rendered.py $1 did not finish"
        return
    fi
    local ok bad
    ok=$(sed -E 's/.*\(([0-9]+) ok.*/\1/' <<<"$counts")
    bad=$(sed -E 's/.*, ([0-9]+) failed.*/\1/' <<<"$counts")
    passed=$((passed + ok))
    failed=$((failed + bad))
    echo "  $1 ${*:2:1}: $ok ok, $bad failed"
}

echo "== values.schema.json against config/default.toml"
py_checks schema-drift "$CHART/values.schema.json" config/default.toml

echo "== helm's built-in Kubernetes version"
# Without --kube-version helm checks the chart's kubeVersion against the
# version compiled into it; scripts/tools.sh builds helm with the ldflags
# that set it (a plain go install assumes Kubernetes 1.20 and fails here).
if "$HELM" template insights-enricher "$CHART" -f "$VALUES/minimal.yaml" >/dev/null 2>"$OUT/plain.log"; then
    pass "plain helm template (no --kube-version) renders"
else
    cat "$OUT/plain.log"
    fail "plain helm template (no --kube-version) renders"
fi

echo "== values a pod cannot run without are required"
# The chart's defaults set neither the brokers, the Credeau client id nor
# the secrets: helm refuses them, naming every value to set, whether or not
# the schema is checked. tests/helm/minimal.yaml sets them and every other
# value set builds on it or sets them itself.
for skip in "" --skip-schema-validation; do
    if "$HELM" template insights-enricher "$CHART" ${skip:+"$skip"} >/dev/null 2>"$OUT/err.log"; then
        fail "default values${skip:+ ($skip)}: rendered, but must be refused"
        continue
    fi
    for want in config.kafka.bootstrap_servers config.credeau.client_id secrets.finboxApiKey \
        secrets.finboxServerHash secrets.credeauAuthToken secrets.existingSecret; do
        if grep -qF -- "$want" "$OUT/err.log"; then
            pass "default values${skip:+ ($skip)} refused, naming $want"
        else
            cat "$OUT/err.log"
            fail "default values${skip:+ ($skip)} refused, but without naming $want"
        fi
    done
done
# helm lint reports a template's fail as information (so a chart with
# required values can be linted): with the defaults it lints the templates.
if "$HELM" lint --strict "$CHART" >"$OUT/lint.log" 2>&1; then
    pass "helm lint --strict (default values)"
else
    cat "$OUT/lint.log"
    fail "helm lint --strict (default values)"
fi
# One value missing: named alone.
REQUIRED="config.kafka.bootstrap_servers config.credeau.client_id secrets.finboxApiKey
secrets.finboxServerHash secrets.credeauAuthToken secrets.kafkaSaslPassword"
# The required values other than $1, as an extended regex.
others() { tr ' ' '\n' <<<"$REQUIRED" | grep -vxF "$1" | paste -sd'|' | sed 's/\./\\./g'; }
declare -A MISSING_ONE=(
    [config.credeau.client_id]="--set config.credeau.client_id="
    [secrets.finboxServerHash]="--set secrets.finboxServerHash="
    [secrets.kafkaSaslPassword]="--set config.kafka.security_protocol=sasl_ssl --set config.kafka.sasl_mechanism=PLAIN"
)
for name in $(printf '%s\n' "${!MISSING_ONE[@]}" | sort); do
    # shellcheck disable=SC2086 # the --set flags split on purpose
    if "$HELM" template insights-enricher "$CHART" -f "$VALUES/minimal.yaml" ${MISSING_ONE[$name]} \
        >/dev/null 2>"$OUT/err.log"; then
        fail "minimal.yaml without $name: rendered, but must be refused"
    elif listed=$(sed -n 's/.*without these values: \(.*\)\. Secrets may.*/\1/p' "$OUT/err.log") &&
        [[ "$listed" == "$name"* ]] && ! grep -qE "$(others "$name")" <<<"$listed"; then
        pass "minimal.yaml without $name refused, naming it alone"
    else
        cat "$OUT/err.log"
        fail "minimal.yaml without $name refused, naming it alone"
    fi
done
# With an existing Secret, no secret value is needed.
if "$HELM" template insights-enricher "$CHART" --set config.kafka.bootstrap_servers=k:9092 \
    --set config.credeau.client_id=c --set secrets.existingSecret=s >/dev/null 2>"$OUT/err.log"; then
    pass "with secrets.existingSecret only the brokers and the client id are required"
else
    cat "$OUT/err.log"
    fail "with secrets.existingSecret only the brokers and the client id are required"
fi

# name -> values files, space separated, and what check-config must say.
declare -A SETS=(
    [minimal]="$VALUES/minimal.yaml"
    [everything-on]="$VALUES/everything-on.yaml"
    [keda]="$VALUES/keda.yaml"
    [statefulset]="$VALUES/statefulset.yaml"
    [statefulset-hpa]="$VALUES/everything-on.yaml $VALUES/statefulset-hpa.yaml"
    [registry-auth]="$VALUES/minimal.yaml $VALUES/registry-auth.yaml"
)
declare -A EXPECT_CONFIG=(
    [minimal]="ok"
    [everything-on]="ok"
    [keda]="ok"
    [statefulset]="ok"
    [statefulset-hpa]="ok"
    [registry-auth]="ok"
)

for set in minimal everything-on keda statefulset statefulset-hpa registry-auth; do
    args=()
    for file in ${SETS[$set]}; do
        args+=(-f "$file")
    done
    echo "== value set: $set"
    if "$HELM" lint --strict "$CHART" "${args[@]}" >"$OUT/lint.log" 2>&1; then
        pass "helm lint --strict ($set)"
    else
        cat "$OUT/lint.log"
        fail "helm lint --strict ($set)"
    fi
    rendered="$OUT/$set.yaml"
    if "$HELM" template insights-enricher "$CHART" --namespace lending \
        --kube-version "$K8S_VERSION" "${args[@]}" >"$rendered" 2>"$OUT/template.log"; then
        pass "helm template ($set)"
    else
        cat "$OUT/template.log"
        fail "helm template ($set)"
        continue
    fi
    py_checks validate "$rendered" "$K8S_VERSION"
    py_checks check-config "$rendered" "$BIN" "${EXPECT_CONFIG[$set]}"
done

echo "== kinds each switch adds"
expect_kinds() {
    local set=$1
    shift
    for kind in "$@"; do
        if grep -q "^kind: $kind\$" "$OUT/$set.yaml"; then
            pass "$set renders a $kind"
        else
            fail "$set renders a $kind"
        fi
    done
}
expect_kinds everything-on ServiceMonitor PrometheusRule PodDisruptionBudget \
    HorizontalPodAutoscaler NetworkPolicy
expect_kinds keda ScaledObject Deployment
expect_kinds statefulset StatefulSet ScaledObject PodDisruptionBudget
expect_kinds statefulset-hpa StatefulSet HorizontalPodAutoscaler
for set in statefulset statefulset-hpa; do
    if grep -q '^kind: Deployment$' "$OUT/$set.yaml"; then
        fail "$set renders no Deployment"
    else
        pass "$set renders no Deployment"
    fi
done
if grep -q '^kind: HorizontalPodAutoscaler$' "$OUT/keda.yaml" ||
    grep -q '^kind: ScaledObject$' "$OUT/everything-on.yaml"; then
    fail "HPA and ScaledObject never render together"
else
    pass "HPA and ScaledObject never render together"
fi
if grep -q 'grafana_dashboard: "1"' "$OUT/everything-on.yaml"; then
    pass "everything-on renders the Grafana dashboard ConfigMap"
else
    fail "everything-on renders the Grafana dashboard ConfigMap"
fi
for secret in fake-finbox-key fake-server-hash fake-credeau-token fake-sasl-password; do
    if sed -n '/^kind: ConfigMap$/,/^---$/p' "$OUT/everything-on.yaml" | grep -q "$secret"; then
        fail "secret value $secret kept out of every ConfigMap"
    else
        pass "secret value $secret kept out of every ConfigMap"
    fi
done
echo "== the registry password is only in the Secret"
py_checks secret-only "$OUT/registry-auth.yaml" \
    schema-registry-password=fake-registry-password-5e21 \
    finbox-api-key=fake-finbox-key credeau-auth-token=fake-credeau-token
if grep -q 'schema_registry_password_file = ".*/schema-registry-password"' "$OUT/registry-auth.yaml"; then
    pass "registry-auth wires encoding.schema_registry_password_file to the mounted Secret"
else
    fail "registry-auth wires encoding.schema_registry_password_file to the mounted Secret"
fi
if [[ "$(grep -c '^kind: Secret$' "$OUT/keda.yaml" || true)" == 0 ]]; then
    pass "with existingSecret the chart creates no Secret"
else
    fail "with existingSecret the chart creates no Secret"
fi

echo "== config changes roll the pods"
checksum() { grep -m1 'checksum/config:' "$1" | awk '{print $2}'; }
if "$HELM" template insights-enricher "$CHART" --namespace lending --kube-version "$K8S_VERSION" \
    -f "$VALUES/minimal.yaml" --set config.schedule.max_in_flight=64 >"$OUT/changed.yaml" &&
    [[ "$(checksum "$OUT/minimal.yaml")" != "$(checksum "$OUT/changed.yaml")" ]]; then
    pass "checksum/config changes with the config"
else
    fail "checksum/config changes with the config"
fi

echo "== alert rules"
if [[ -n "$PROMTOOL" && -x "$PROMTOOL" ]]; then
    mkdir -p "$OUT/rules"
    "$HELM" template insights-enricher "$CHART" --namespace lending --kube-version "$K8S_VERSION" \
        -f "$VALUES/minimal.yaml" --set prometheusRule.enabled=true >"$OUT/rules/rendered.yaml" || true
    "$PY" -c '
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d and d["kind"] == "PrometheusRule"]
yaml.safe_dump(docs[0]["spec"], open(sys.argv[2], "w"))
' "$OUT/rules/rendered.yaml" "$OUT/rules/rules.yaml" || true
    cp "$VALUES/alerts-test.yaml" "$OUT/rules/"
    if (cd "$OUT/rules" && "$PROMTOOL" check rules rules.yaml) >"$OUT/promtool.log" 2>&1; then
        pass "promtool check rules: the PrometheusRule's expressions parse"
    else
        cat "$OUT/promtool.log"
        fail "promtool check rules"
    fi
    if (cd "$OUT/rules" && "$PROMTOOL" test rules alerts-test.yaml) >"$OUT/promtool.log" 2>&1; then
        pass "promtool test rules: alerts fire on the series in tests/helm/alerts-test.yaml, and only there"
    else
        cat "$OUT/promtool.log"
        fail "promtool test rules"
    fi
    # The same rules rendered in StatefulSet mode, where pods are named by
    # ordinal.
    mkdir -p "$OUT/rules-sts"
    "$HELM" template insights-enricher "$CHART" --namespace lending --kube-version "$K8S_VERSION" \
        -f "$VALUES/statefulset.yaml" >"$OUT/rules-sts/rendered.yaml" || true
    "$PY" -c '
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d and d["kind"] == "PrometheusRule"]
yaml.safe_dump(docs[0]["spec"], open(sys.argv[2], "w"))
' "$OUT/rules-sts/rendered.yaml" "$OUT/rules-sts/rules.yaml" || true
    cp "$VALUES/alerts-test-statefulset.yaml" "$OUT/rules-sts/"
    if (cd "$OUT/rules-sts" && "$PROMTOOL" test rules alerts-test-statefulset.yaml) >"$OUT/promtool.log" 2>&1; then
        pass "promtool test rules (StatefulSet): the pod restart alert matches ordinal pod names, and only this release's"
    else
        cat "$OUT/promtool.log"
        fail "promtool test rules (StatefulSet)"
    fi
else
    fail "promtool unavailable (scripts/tools.sh promtool)"
fi

echo "== invalid values are rejected"
# file in tests/helm/invalid -> text the error must contain
declare -A INVALID=(
    [replica-count-string]="at '/replicaCount': got string, want integer"
    [unknown-top-level-key]="additional properties 'replicaCont' not allowed"
    [unknown-config-key]="additional properties 'bootstrap_server' not allowed"
    [hpa-and-keda]="autoscaling.enabled and keda.enabled are mutually exclusive"
    [grace-period-too-short]="terminationGracePeriodSeconds (20) must be longer than config.shutdown.timeout (30s = 30s)"
    [secret-in-config]="at '/config/finbox': additional properties 'api_key' not allowed"
    [tls-without-tls-protocol]="kafkaTls.enabled needs config.kafka.security_protocol ssl or sasl_ssl"
    [keda-scale-to-zero]="at '/keda/minReplicas': minimum: got 0, want 1"
    [workload-kind-unknown]="at '/workload/kind': value must be one of 'Deployment', 'StatefulSet'"
    [registry-credentials-in-url]="config.encoding.schema_registry_url must not hold credentials (user:password@): they would be stored in the ConfigMap; set config.encoding.schema_registry_username and secrets.schemaRegistryPassword instead"
    [provider-credentials-in-url]="config.finbox.base_url must not hold credentials"
    [registry-password-without-username]="secrets.schemaRegistryPassword needs config.encoding.schema_registry_username"
)
for name in $(printf '%s\n' "${!INVALID[@]}" | sort); do
    want=${INVALID[$name]}
    if "$HELM" template insights-enricher "$CHART" --kube-version "$K8S_VERSION" \
        -f "$VALUES/minimal.yaml" -f "$VALUES/invalid/$name.yaml" >/dev/null 2>"$OUT/err.log"; then
        fail "$name: rendered, but must be rejected"
    elif grep -q fake-url-password "$OUT/err.log"; then
        fail "$name: the error echoes the password in the URL"
    elif grep -qF -- "$want" "$OUT/err.log"; then
        pass "$name rejected: $want"
    else
        cat "$OUT/err.log"
        fail "$name rejected, but without: $want"
    fi
done

# The templates refuse these even when the schema is skipped.
declare -A INVALID_TEMPLATE=(
    [secret-in-config]="config.finbox.api_key must not be set"
    [keda-scale-to-zero]="keda.minReplicas must be at least 1 (got 0)"
    [workload-kind-unknown]='workload.kind must be Deployment or StatefulSet, not "DaemonSet"'
)
for name in $(printf '%s\n' "${!INVALID_TEMPLATE[@]}" | sort); do
    want=${INVALID_TEMPLATE[$name]}
    if "$HELM" template insights-enricher "$CHART" --kube-version "$K8S_VERSION" --skip-schema-validation \
        -f "$VALUES/minimal.yaml" -f "$VALUES/invalid/$name.yaml" >/dev/null 2>"$OUT/err.log"; then
        fail "$name without the schema: rendered, but must be rejected"
    elif grep -qF -- "$want" "$OUT/err.log"; then
        pass "$name rejected by the templates too: $want"
    else
        cat "$OUT/err.log"
        fail "$name without the schema rejected, but without: $want"
    fi
done

echo
echo "helm: $passed passed, $failed failed"
[[ "$failed" == 0 ]]

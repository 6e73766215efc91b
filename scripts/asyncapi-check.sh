#!/usr/bin/env bash
# Validates docs/asyncapi.yaml with the AsyncAPI parser (tools/asyncapi),
# resolving its $refs to schemas/*.avsc, and proves the check can fail: broken
# copies of the document (a missing required field, a dangling $ref, an
# invalid Avro schema, an undocumented dead-letter header) must be rejected.
# The parser comes from scripts/tools.sh asyncapi (npm, pinned by
# tools/asyncapi/package-lock.json). Prints "N passed, N failed".
set -euo pipefail
cd "$(dirname "$0")/.."

TOOL=tools/asyncapi
NODE_PATH="$(scripts/tools.sh asyncapi)"
export NODE_PATH

passed=0
failed=0
pass() { passed=$((passed + 1)); echo "PASS $1"; }
fail() { failed=$((failed + 1)); echo "FAIL $1"; }

validate() {
    node "$TOOL/validate.js" "$1" --avro-dir "$2" --dlq-headers src/events/dead_letter.rs
}

# The document as committed.
if out=$(validate docs/asyncapi.yaml schemas 2>&1); then
    pass "docs/asyncapi.yaml is valid: ${out##*$'\n'}"
else
    fail "docs/asyncapi.yaml is invalid:"
    printf '    %s\n' "${out//$'\n'/$'\n'    }"
fi

# Broken copies, each in a scratch tree shaped like the repository so the
# relative $refs (../schemas/*.avsc) resolve the same way.
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

# expect_rejected NAME WANT EDIT...: copies docs/ and schemas/, runs EDIT in
# the copy, and passes when the validator rejects it with a line matching WANT.
expect_rejected() {
    local name=$1 want=$2
    shift 2
    local dir="$scratch/$name"
    mkdir -p "$dir"
    cp -r docs schemas "$dir/"
    (cd "$dir" && "$@")
    local out rc=0
    out=$(validate "$dir/docs/asyncapi.yaml" "$dir/schemas" 2>&1) || rc=$?
    if [[ $rc -eq 1 ]] && grep -qE "$want" <<<"$out"; then
        pass "rejected: $name"
    else
        fail "not rejected as expected: $name (exit $rc)"
        printf '    %s\n' "${out//$'\n'/$'\n'    }"
    fi
}

expect_rejected "missing info.title (required field)" 'must have required property "title"' \
    sed -i '/^  title: insights-enricher$/d' docs/asyncapi.yaml
# shellcheck disable=SC2016 # the Python program is quoted on purpose
expect_rejected "operation without its required channel" 'must have required property .channel.' \
    python3 -c '
import re, pathlib
p = pathlib.Path("docs/asyncapi.yaml")
t = p.read_text()
t = re.sub(r"(  sendInsightsReady:\n(?:    .*\n)*?)    channel:\n      \$ref: .*\n", r"\1", t, count=1)
p.write_text(t)'
expect_rejected "dangling \$ref to an .avsc file" 'ENOENT|invalid-ref' \
    sed -i 's|\.\./schemas/insights_ready\.avsc|../schemas/insights_ready_v9.avsc|' docs/asyncapi.yaml
expect_rejected "invalid Avro schema behind a \$ref" 'finboxPredictorsAvro: invalid Avro schema.*strnig' \
    sed -i '0,/"type": "string"/s//"type": "strnig"/' schemas/finbox_predictors.avsc
expect_rejected "an .avsc that no message uses" 'not the payload of any Avro message' \
    python3 -c '
import json
s = json.load(open("schemas/user_onboarded.avsc"))
s["name"] = "UnusedEvent"
json.dump(s, open("schemas/unused_event.avsc", "w"))'
expect_rejected "unknown operation action" 'action' \
    sed -i '0,/action: send/s//action: publish/' docs/asyncapi.yaml
expect_rejected "undocumented dead-letter header" 'dlq.attempts.*not described' \
    python3 -c '
import pathlib
p = pathlib.Path("docs/asyncapi.yaml")
lines = p.read_text().splitlines(keepends=True)
out, skip = [], False
for line in lines:
    if line.startswith("        dlq.attempts:"):
        skip = True
        continue
    if skip and line.startswith("          "):
        continue
    skip = False
    out.append(line)
text = "".join(out).replace("        - dlq.attempts\n", "")
p.write_text(text)'

echo "$passed passed, $failed failed"
[[ $failed -eq 0 ]]

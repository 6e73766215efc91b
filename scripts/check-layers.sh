#!/usr/bin/env bash
# Checks the house's import rules, one line per rule and a closing
# "layers: N passed, N failed"; exits non-zero when any rule is broken.
#
#   - src/pipeline/ is the broker-free loop: it never names librdkafka
#     (rdkafka) nor the Kafka wing (crate::kafka);
#   - src/dlq/ (the operator tools) never imports the pipeline: the
#     dead-letter record is part of the event contract (src/events/);
#   - src/metrics/ is the ground floor: it imports no other module of the
#     service;
#   - src/core/ (the pure decisions) never imports the event codecs, the
#     Kafka wing or the pipeline.
set -euo pipefail
cd "$(dirname "$0")/.."

passed=0
failed=0

# rule NAME DIR PATTERN: no line of a .rs file under DIR matches PATTERN
# (an extended regular expression), comments excepted.
rule() {
    local name="$1" dir="$2" pattern="$3" hits line
    hits=$(grep -rnE --include='*.rs' "$pattern" "$dir" | grep -vE '^[^:]+:[0-9]+:[[:space:]]*//' || true)
    if [[ -z "$hits" ]]; then
        passed=$((passed + 1))
        echo "  ok   $name"
    else
        failed=$((failed + 1))
        echo "  FAIL $name"
        while IFS= read -r line; do
            echo "    $line"
        done <<<"$hits"
    fi
}

rule "pipeline/ never names rdkafka" src/pipeline '\brdkafka\b'
rule "pipeline/ never imports the Kafka wing" src/pipeline 'crate::kafka\b'
rule "dlq/ never imports pipeline/" src/dlq 'crate::pipeline\b'
rule "metrics/ imports no other module" src/metrics 'crate::[a-z_]+'
rule "core/ never imports events, kafka or pipeline" src/core 'crate::(events|kafka|pipeline)\b'

echo
echo "layers: $passed passed, $failed failed"
[[ "$failed" == 0 ]]

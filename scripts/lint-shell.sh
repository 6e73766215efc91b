#!/usr/bin/env bash
# Runs ShellCheck (pinned in scripts/tools.sh) on every shell script of the
# repository: scripts/*.sh and .ci/run. All severities count, style notes
# included. One line per script, its findings under it, and a closing
# "shellcheck: N passed, N failed"; exits non-zero when any script has a
# finding. SHELLCHECK, when set, is used as it is.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -z "${SHELLCHECK:-}" ]]; then
    if ! SHELLCHECK=$(scripts/tools.sh shellcheck | tail -n1) || [[ ! -x "$SHELLCHECK" ]]; then
        echo "lint-shell.sh: scripts/tools.sh shellcheck failed" >&2
        exit 1
    fi
fi

scripts=(scripts/*.sh)
[[ -f .ci/run ]] && scripts+=(.ci/run)

passed=0
failed=0
out=$(mktemp)
trap 'rm -f "$out"' EXIT
for script in "${scripts[@]}"; do
    # -x follows the scripts a script sources (their paths are from the
    # repository root, where this runs).
    if "$SHELLCHECK" -x --format=gcc "$script" >"$out" 2>&1; then
        passed=$((passed + 1))
        echo "  ok   $script"
    else
        failed=$((failed + 1))
        echo "  FAIL $script"
        sed 's/^/    /' "$out"
    fi
done

echo
echo "shellcheck: $passed passed, $failed failed"
[[ "$failed" == 0 ]]

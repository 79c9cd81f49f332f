#!/usr/bin/env bash
# Lints template.yaml with cfn-lint and `sam validate --lint` (offline), then runs the template
# tests (tests/template: what a real `sam build && sam deploy` of it would do).
# Creates .venv-sam in the repo root on first use (tools/venv-sam.sh).
# Quiet and idempotent: prints a few lines on success; any error or warning fails.
set -euo pipefail
cd "$(dirname "$0")/.."

source tools/venv-sam.sh
ensure_venv_sam lint-template sam cfn-lint pytest

export SAM_CLI_TELEMETRY=0 AWS_DEFAULT_REGION="${AWS_DEFAULT_REGION:-us-east-1}"
# Offline: no credentials needed, and none from the environment are used.
export AWS_EC2_METADATA_DISABLED=true

out="$(mktemp)"; trap 'rm -f "$out"' EXIT

# cfn-lint exits non-zero on errors (2) and warnings (4); informational (8) is
# not enabled by default. Any output at all is treated as a failure too.
if ! "$VENV/bin/cfn-lint" --format parseable template.yaml >"$out" 2>&1 || [[ -s "$out" ]]; then
    echo "lint-template: cfn-lint found problems:" >&2; cat "$out" >&2; exit 1
fi

if ! "$VENV/bin/sam" validate --lint --region "$AWS_DEFAULT_REGION" --template-file template.yaml >"$out" 2>&1 \
    || ! grep -q "is a valid SAM Template" "$out" \
    || grep -qiE "warn|error|E[0-9]{4}|W[0-9]{4}" "$out"; then
    echo "lint-template: sam validate --lint failed:" >&2; cat "$out" >&2; exit 1
fi

echo "template.yaml: cfn-lint and sam validate --lint passed (0 errors, 0 warnings)"

"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/template

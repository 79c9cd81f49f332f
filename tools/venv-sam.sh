# Sourced (from the repo root) by tools/lint-template.sh and tools/sam-build.sh: the .venv-sam
# they share, with aws-sam-cli, cfn-lint, cargo-lambda and ziglang from tools/requirements-sam.txt.
VENV=.venv-sam

# ensure_venv_sam WHO COMMAND...: creates or refreshes $VENV when one of the COMMANDs is missing
# from $VENV/bin or tools/requirements-sam.txt changed since the last install. WHO names the
# caller in the error message.
ensure_venv_sam() {
    local who=$1 req=tools/requirements-sam.txt stamp="$VENV/.requirements-sam.sha256" want cmd fresh=1
    shift
    want="$(sha256sum "$req" | cut -d' ' -f1)"
    for cmd in "$@"; do [[ -x "$VENV/bin/$cmd" ]] || fresh=0; done
    [[ "$(cat "$stamp" 2>/dev/null)" == "$want" ]] || fresh=0
    if (( ! fresh )); then
        [[ -x "$VENV/bin/python3" ]] || python3 -m venv "$VENV"
        printf '*\n' > "$VENV/.gitignore"   # keep the venv out of git
        # One retry: a registry hiccup should not fail the whole test run.
        local try
        for try in 1 2; do
            "$VENV/bin/pip" install -q --disable-pip-version-check -r "$req" >"$VENV/pip.log" 2>&1 \
                && break
            (( try == 2 )) && { cat "$VENV/pip.log" >&2; echo "$who: pip install failed" >&2; exit 1; }
            sleep 5
        done
        echo "$want" > "$stamp"
    fi
}

#!/usr/bin/env bash
# `sam build` of template.yaml (rust-cargolambda: cargo lambda build --release,
# cross-compiled and linked with zig), then checks the artifact:
# .aws-sam/build/ProxyFunction/bootstrap must be an ELF for the chosen architecture.
#
#   tools/sam-build.sh            # arm64 (the template's default)
#   ARCH=x86_64 tools/sam-build.sh
#
# Installs what it needs: .venv-sam (aws-sam-cli, cargo-lambda, ziglang from
# tools/requirements-sam.txt) and the Rust std for the target (rustup target add).
set -euo pipefail
cd "$(dirname "$0")/.."

ARCH="${ARCH:-arm64}"
case "$ARCH" in
    arm64)  RUST_TARGET=aarch64-unknown-linux-gnu; ELF_MACHINE=183; ELF_NAME=aarch64 ;;
    x86_64) RUST_TARGET=x86_64-unknown-linux-gnu;  ELF_MACHINE=62;  ELF_NAME=x86-64 ;;
    *) echo "sam-build: ARCH must be arm64 or x86_64, not '$ARCH'" >&2; exit 2 ;;
esac
FUNCTION_ID=ProxyFunction

VENV=.venv-sam
REQ=tools/requirements-sam.txt
stamp="$VENV/.requirements-sam.sha256"
want="$(sha256sum "$REQ" | cut -d' ' -f1)"
if [[ ! -x "$VENV/bin/sam" || ! -x "$VENV/bin/cargo-lambda" || "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
    [[ -x "$VENV/bin/python3" ]] || python3 -m venv "$VENV"
    printf '*\n' > "$VENV/.gitignore"   # keep the venv out of git
    "$VENV/bin/pip" install -q --disable-pip-version-check -r "$REQ" >"$VENV/pip.log" 2>&1 \
        || { cat "$VENV/pip.log" >&2; echo "sam-build: pip install failed" >&2; exit 1; }
    echo "$want" > "$stamp"
fi

# The venv's bin first: `cargo lambda` is found as cargo-lambda on PATH, and it
# finds zig through the venv's `python3 -m ziglang`.
export PATH="$PWD/$VENV/bin:$PATH"
export SAM_CLI_TELEMETRY=0

if ! rustup target list --installed 2>/dev/null | grep -qx "$RUST_TARGET"; then
    rustup target add "$RUST_TARGET" \
        || { echo "sam-build: the Rust std for $RUST_TARGET is missing and could not be installed" >&2; exit 1; }
fi

start=$(date +%s)
sam build --parameter-overrides "Architecture=$ARCH"
echo "sam-build: sam build took $(( $(date +%s) - start )) s"

artifact=".aws-sam/build/$FUNCTION_ID/bootstrap"
[[ -f "$artifact" ]] || { echo "sam-build: $artifact is missing" >&2; exit 1; }
python3 - "$artifact" "$ELF_MACHINE" "$ELF_NAME" <<'PY'
import struct, sys
path, want, name = sys.argv[1], int(sys.argv[2]), sys.argv[3]
with open(path, "rb") as f:
    head = f.read(20)
if head[:4] != b"\x7fELF":
    sys.exit(f"sam-build: {path} is not an ELF file")
if head[4] != 2 or head[5] != 1:
    sys.exit(f"sam-build: {path} is not a 64-bit little-endian ELF")
(machine,) = struct.unpack_from("<H", head, 18)
if machine != want:
    sys.exit(f"sam-build: {path} is an ELF for machine {machine}, not {name} ({want})")
print(f"sam-build: {path} is a 64-bit {name} ELF executable")
PY
command -v file >/dev/null && file -b "$artifact" || true

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

source tools/venv-sam.sh
ensure_venv_sam sam-build sam cargo-lambda

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

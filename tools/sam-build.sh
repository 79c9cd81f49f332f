#!/usr/bin/env bash
# `sam build` of template.yaml (rust-cargolambda: cargo lambda build --release,
# cross-compiled and linked with zig), then checks the artifact:
# .aws-sam/build/ProxyFunction/bootstrap must be an ELF for the template's architecture.
#
#   tools/sam-build.sh
#
# The architecture is the one fixed line `Architectures: [arm64]` of template.yaml, which
# `sam build` and `sam deploy` both read (a parameter could differ between the two; see
# docs/deploy.md, "Architecture"). To build for x86_64, change that line.
#
# Installs what it needs: .venv-sam (aws-sam-cli, cargo-lambda, ziglang from
# tools/requirements-sam.txt) and the Rust std for the target (rustup target add).
set -euo pipefail
cd "$(dirname "$0")/.."

source tools/venv-sam.sh
ensure_venv_sam sam-build sam cargo-lambda

ARCH="$("$VENV/bin/python" -c '
from cfnlint.decode import cfn_yaml
archs = cfn_yaml.load("template.yaml")["Resources"]["ProxyFunction"]["Properties"]["Architectures"]
print(archs[0] if len(archs) == 1 and isinstance(archs[0], str) else "")
')"
case "$ARCH" in
    arm64)  RUST_TARGET=aarch64-unknown-linux-gnu; ELF_MACHINE=183; ELF_NAME=aarch64 ;;
    x86_64) RUST_TARGET=x86_64-unknown-linux-gnu;  ELF_MACHINE=62;  ELF_NAME=x86-64 ;;
    *) echo "sam-build: template.yaml's ProxyFunction Architectures must be [arm64] or [x86_64]" >&2; exit 2 ;;
esac
FUNCTION_ID=ProxyFunction

# The venv's bin first: `cargo lambda` is found as cargo-lambda on PATH, and it
# finds zig through the venv's `python3 -m ziglang`.
export PATH="$PWD/$VENV/bin:$PATH"
export SAM_CLI_TELEMETRY=0

if ! rustup target list --installed 2>/dev/null | grep -qx "$RUST_TARGET"; then
    rustup target add "$RUST_TARGET" \
        || { echo "sam-build: the Rust std for $RUST_TARGET is missing and could not be installed" >&2; exit 1; }
fi

start=$(date +%s)
sam build
echo "sam-build: sam build ($ARCH) took $(( $(date +%s) - start )) s"

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

#!/usr/bin/env bash
# `make bench`: build the release artifacts once (into target/bench, separate from everyone
# else's target dir), then run bench/bench.py, which prints the table and writes
# bench/out/results.json. Knobs (environment):
#   BENCH_TARGET_DIR   cargo target dir            (default: <repo>/target/bench)
#   BENCH_ARM64=0      skip the arm64 size build   (default: build it with cargo lambda --arm64)
#   BENCH_ARGS         extra arguments for bench.py (e.g. "--invocations 5000 --cold-starts 40")
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export PATH="$ROOT/.venv/bin:$PATH"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
T="${BENCH_TARGET_DIR:-$ROOT/target/bench}"
OUT="$ROOT/bench/out"
mkdir -p "$OUT/logs" "$T"
t_start=$(date +%s)
log() { echo "[bench $(( $(date +%s) - t_start ))s] $*" >&2; }

# The hello-world baseline must be built with exactly the proxy's release profile.
python3 - <<'EOF'
import tomllib, sys
a = tomllib.load(open("Cargo.toml", "rb"))["profile"]["release"]
b = tomllib.load(open("bench/hello/Cargo.toml", "rb"))["profile"]["release"]
if a != b:
    sys.exit(f"bench/hello/Cargo.toml [profile.release] {b} differs from Cargo.toml's {a}: keep them in sync")
EOF

# 1. The proxy exactly as deployed: `cargo lambda build --release` (x86_64), i.e. the bootstrap.
log "building bootstrap (x86_64, cargo lambda build --release) -> $T/lambda"
cargo lambda build --release --x86-64 --bin openai-lambda-proxy --target-dir "$T" \
  --lambda-dir "$T/lambda/x86_64" >"$OUT/logs/build-x86_64.log" 2>&1 \
  || { tail -30 "$OUT/logs/build-x86_64.log" >&2; exit 1; }
PROXY="$T/lambda/x86_64/openai-lambda-proxy/bootstrap"

# 2. The simulator and the hello-world lambda_http baseline (own workspace, same profile).
log "building openai-simulator and bench/hello (release)"
cargo build --release -p openai-simulator --bin openai-simulator --target-dir "$T" \
  >"$OUT/logs/build-sim.log" 2>&1 || { tail -30 "$OUT/logs/build-sim.log" >&2; exit 1; }
cargo build --release --manifest-path bench/hello/Cargo.toml --target-dir "$T/hello" \
  >"$OUT/logs/build-hello.log" 2>&1 || { tail -30 "$OUT/logs/build-hello.log" >&2; exit 1; }

# 3. arm64 bootstrap, for its size only (zig from .venv cross-links it).
ARM_ARGS=()
if [ "${BENCH_ARM64:-1}" != "0" ]; then
  log "building bootstrap (arm64, cargo lambda build --release --arm64)"
  if cargo lambda build --release --arm64 --bin openai-lambda-proxy --target-dir "$T" \
      --lambda-dir "$T/lambda/arm64" >"$OUT/logs/build-arm64.log" 2>&1; then
    ARM_ARGS=(--arm64-bin "$T/lambda/arm64/openai-lambda-proxy/bootstrap")
  else
    ARM_ARGS=(--arm64-note "cargo lambda build --arm64 failed: $(grep -m1 -i error "$OUT/logs/build-arm64.log" || echo see bench/out/logs/build-arm64.log)")
  fi
else
  ARM_ARGS=(--arm64-note "skipped (BENCH_ARM64=0)")
fi

log "running bench/bench.py"
# shellcheck disable=SC2086
python3 bench/bench.py --proxy-bin "$PROXY" --hello-bin "$T/hello/release/bench-hello" \
  --sim-bin "$T/release/openai-simulator" "${ARM_ARGS[@]}" ${BENCH_ARGS:-}
log "done in $(( $(date +%s) - t_start )) s"

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

# Four independent release builds, run side by side: each ends in a long single-threaded fat-LTO
# step, so on a 2-core machine running them together takes far less than running them in a row.
# Each has its own target dir (cargo locks a target dir per build).
build() {  # name, command...
  local name=$1; shift
  if "$@" >"$OUT/logs/build-$name.log" 2>&1; then echo ok >"$OUT/logs/build-$name.rc"
  else echo fail >"$OUT/logs/build-$name.rc"; fi
}
rm -f "$OUT"/logs/build-*.rc
log "building (release, in parallel): bootstrap x86_64 + arm64 (cargo lambda build --release), openai-simulator, bench/hello"
# 1. The proxy exactly as deployed: the `bootstrap` of `cargo lambda build --release`.
build x86_64 env CARGO_TARGET_DIR="$T/x86_64" cargo lambda build --release --x86-64 \
  --bin openai-lambda-proxy --lambda-dir "$T/lambda/x86_64" &
# 2. arm64 (the template's default architecture), for its size; zig from .venv cross-links it.
if [ "${BENCH_ARM64:-1}" != "0" ]; then
  build arm64 env CARGO_TARGET_DIR="$T/arm64" cargo lambda build --release --arm64 \
    --bin openai-lambda-proxy --lambda-dir "$T/lambda/arm64" &
fi
# 3. The simulator, and the hello-world lambda_http baseline (own workspace, same profile).
build sim cargo build --release -p openai-simulator --bin openai-simulator --target-dir "$T/sim" &
build hello cargo build --release --manifest-path bench/hello/Cargo.toml --target-dir "$T/hello" &
wait
for name in x86_64 sim hello; do
  if [ "$(cat "$OUT/logs/build-$name.rc")" != ok ]; then
    tail -30 "$OUT/logs/build-$name.log" >&2; echo "bench: the $name build failed" >&2; exit 1
  fi
done
PROXY="$T/lambda/x86_64/openai-lambda-proxy/bootstrap"
if [ "${BENCH_ARM64:-1}" = "0" ]; then
  ARM_ARGS=(--arm64-note "skipped (BENCH_ARM64=0)")
elif [ "$(cat "$OUT/logs/build-arm64.rc")" = ok ]; then
  ARM_ARGS=(--arm64-bin "$T/lambda/arm64/openai-lambda-proxy/bootstrap")
else
  ARM_ARGS=(--arm64-note "cargo lambda build --arm64 failed: $(grep -m1 -i error "$OUT/logs/build-arm64.log" || echo see bench/out/logs/build-arm64.log)")
fi
log "builds done"

log "running bench/bench.py"
# shellcheck disable=SC2086
python3 bench/bench.py --proxy-bin "$PROXY" --hello-bin "$T/hello/release/bench-hello" \
  --sim-bin "$T/sim/release/openai-simulator" "${ARM_ARGS[@]}" ${BENCH_ARGS:-}
log "done in $(( $(date +%s) - t_start )) s"

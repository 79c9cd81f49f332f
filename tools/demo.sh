#!/usr/bin/env bash
# `make demo`: see tools/demo.py. Runs with the venv's python (cargo-lambda lives there).
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python tools/demo.py

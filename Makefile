# The README's two commands: `make demo` and `make test`. Each creates or updates the
# virtualenv and installs what it needs, Debian's prometheus package included.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SUDO := $(shell [ "$$(id -u)" = "0" ] || echo sudo)
# The dbt manifest the Dagster definitions are built from (pipelines/defs/allocation
# parses it on import too when it is missing or older than a project file).
MANIFEST := dbt/target/manifest.json
DBT_SOURCES := $(shell find dbt/models dbt/macros dbt/tests -type f 2>/dev/null) \
	dbt/dbt_project.yml dbt/profiles.yml

.PHONY: demo demo-live test lint unit integration bench system-deps browser-deps triton-deps install dbt-parse clean

demo: install system-deps triton-deps
	$(BIN)/gpuledger demo

# Real Triton traffic through the metering gateway, measured and billed (issue 7).
demo-live: install system-deps triton-deps
	$(BIN)/gpuledger demo-live

test: install system-deps browser-deps triton-deps lint
	bash tests/focus_validator_setup.sh
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy models
	$(BIN)/sqlfluff lint dbt/models

unit: install
	$(BIN)/pytest tests/unit

integration: install system-deps
	$(BIN)/pytest tests/integration

bench: install system-deps
	$(BIN)/python bench/simulate.py

install: $(STAMP) $(MANIFEST)

dbt-parse: $(MANIFEST)

$(MANIFEST): $(STAMP) $(DBT_SOURCES)
	cd dbt && env -u GPULEDGER_DUCKDB_PATH ../$(BIN)/dbt parse --quiet --profiles-dir . --target-path target

# Re-install whenever the dependency pins change.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || { \
		echo "python venv unavailable: installing python3-venv"; \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq python3-venv && \
		$(PYTHON) -m venv $(VENV); }
	$(BIN)/python -m pip install -q --upgrade "pip>=24"
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	@touch $(STAMP)

# The dashboard's browser test drives Debian's Chromium (headless); installed when missing.
browser-deps:
	@if ! command -v chromium >/dev/null; then \
		echo "installing Debian package chromium (the dashboard's browser test)"; \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends chromium; \
	fi

# The Triton server (nvidia-pytriton's tritonserver) in its own venv, .venv-triton: it
# pins numpy < 2. Fast when already installed; installs libpython3.11 when missing.
triton-deps:
	bash ingest/triton/setup_venv.sh

# Prometheus and promtool come from Debian (2.42); installed only when missing.
system-deps:
	@if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then \
		echo "installing Debian package prometheus (prometheus, promtool)"; \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends prometheus; \
	fi

clean:
	rm -rf $(VENV) .gpuledger .pytest_cache .mypy_cache .ruff_cache dbt/target

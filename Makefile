# Two commands set everything up: `make run` and `make test`. Both create .venv and install what they need.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CONFIG ?= deploy/config.toml
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test check bench mosquitto promtool clean

# Runtime packages only (what `make run` needs on the box that runs it).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV) || { echo 'installing python3-venv with apt-get'; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq python3-venv && $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --only-binary=msgspec,lxml -e . || { \
	  echo "no ready-built msgspec or lxml for this machine (32-bit ARM, e.g. an Orange Pi under Armbian):"; \
	  echo "installing what builds them with apt-get (gcc python3-dev libxml2-dev libxslt1-dev); building takes a while"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq \
	    gcc python3-dev libxml2-dev libxslt1-dev && $(PY) -m pip install --quiet -e .; }
	touch $@

# The test and dev extras on top (pytest, ruff, mypy), for `make test`, `make check` and `make bench`.
$(VENV)/.dev-installed: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[test,dev]'
	touch $@

# Installs Debian's mosquitto when it is missing (the tests start their own broker from it).
mosquitto:
	@command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || { \
	  echo "installing mosquitto with apt-get"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq mosquitto; }

# promtool (from Debian's prometheus package) checks the /metrics output. The package also installs a Prometheus
# server, so it is installed by itself only in CI; elsewhere the promtool test is skipped unless you install it.
promtool:
	@command -v promtool >/dev/null || { \
	  if [ "$${CI:-}" = true ]; then \
	    echo "installing promtool (Debian's prometheus package) with apt-get"; \
	    $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq \
	      --no-install-recommends prometheus; \
	  else echo "promtool not found: its test is skipped (apt-get install prometheus to run it)"; fi; }

run: $(VENV)/.installed
	scripts/run-local $(PY) $(CONFIG)

test: $(VENV)/.dev-installed mosquitto promtool
	$(PY) -m pytest

# mypy checks what pyproject.toml's [tool.mypy] names: supervisor, contracts, workers and tests, all strict.
check: $(VENV)/.dev-installed
	$(VENV)/bin/ruff check supervisor contracts workers tests
	$(VENV)/bin/mypy

bench: $(VENV)/.dev-installed mosquitto
	$(PY) -m tests.bench

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache .ruff_cache

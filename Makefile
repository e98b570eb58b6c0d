# Two commands set everything up: `make run` and `make test`. Both create .venv and install what they need.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CONFIG ?= deploy/config.toml
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# supervisor/fastpaho.py overrides private methods of paho-mqtt's client, so both ends of the paho range that
# pyproject.toml allows are tested: `make test` also runs the paho guard and the link's tests under the oldest, in a
# venv of its own, whenever .venv holds a newer release. `make test-paho PAHO=2.3.0` runs them under any release
# (before the range is widened to admit it); `PAHO_TESTS=tests` runs the whole suite there.
PAHO_OLDEST := $(shell sed -n 's/^ *"paho-mqtt>=\([0-9.]*\),.*/\1/p' pyproject.toml)
PAHO ?= $(PAHO_OLDEST)
PAHO_VENV := .venv-paho-$(PAHO)
PAHO_TESTS ?= tests/test_fastpaho.py tests/test_supervisor.py tests/test_hostile.py

.PHONY: run test test-paho check bench mosquitto promtool clean

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
	@if [ "$$($(PY) -c 'from paho.mqtt import __version__; print(__version__)')" != "$(PAHO_OLDEST)" ]; then \
	  $(MAKE) --no-print-directory test-paho PAHO=$(PAHO_OLDEST); fi

# The project with one paho-mqtt release, installed over the one pip picks (which may lie outside the range).
$(PAHO_VENV)/.installed: pyproject.toml
	@[ -n "$(PAHO)" ] || { echo 'no "paho-mqtt>=X,<Y" in pyproject.toml: say PAHO=<version>'; exit 2; }
	$(PYTHON) -m venv $(PAHO_VENV)
	$(PAHO_VENV)/bin/python -m pip install --quiet -e '.[test]'
	$(PAHO_VENV)/bin/python -m pip install --quiet 'paho-mqtt==$(PAHO)'
	touch $@

test-paho: $(PAHO_VENV)/.installed mosquitto
	$(PAHO_VENV)/bin/python -m pytest $(PAHO_TESTS)

# mypy checks what pyproject.toml's [tool.mypy] names: supervisor, contracts, workers and tests, all strict.
check: $(VENV)/.dev-installed
	$(VENV)/bin/ruff check supervisor contracts workers tests
	$(VENV)/bin/mypy

bench: $(VENV)/.dev-installed mosquitto
	$(PY) -m tests.bench

clean:
	rm -rf $(VENV) .venv-paho-* *.egg-info .pytest_cache .mypy_cache .ruff_cache

# Two commands set everything up: `make run` and `make test`. Both create .venv and install what they need.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CONFIG ?= deploy/config.toml
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test check bench mosquitto clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV) || { echo 'installing python3-venv with apt-get'; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq python3-venv && $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,dev]'
	touch $@

# Installs Debian's mosquitto when it is missing (the tests start their own broker from it).
mosquitto:
	@command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || { \
	  echo "installing mosquitto with apt-get"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq mosquitto; }

run: $(VENV)/.installed
	scripts/run-local $(PY) $(CONFIG)

test: $(VENV)/.installed mosquitto
	$(PY) -m pytest

check: $(VENV)/.installed
	$(VENV)/bin/ruff check supervisor contracts workers tests
	$(VENV)/bin/mypy

bench: $(VENV)/.installed mosquitto
	$(PY) -m tests.bench

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache .ruff_cache

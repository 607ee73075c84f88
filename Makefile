# The two commands a user needs: `make demo` and `make test`. Everything else is for us.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
NODE_STAMP := workers/node/node_modules/.installed-stamp

.PHONY: install demo test lint typecheck openapi check-openapi bench serve clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Node reference workers (issue 4) install from their committed lockfile.
$(NODE_STAMP): $(wildcard workers/node/package-lock.json)
	@if [ -f workers/node/package-lock.json ]; then \
		cd workers/node && npm ci --no-audit --no-fund --loglevel=error && touch node_modules/.installed-stamp; \
	else mkdir -p workers/node/node_modules && touch $(NODE_STAMP); fi

demo: install
	$(BIN)/celeriac demo

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

check-openapi: install
	$(BIN)/python -m service.openapi_export --check

openapi: install
	$(BIN)/python -m service.openapi_export

test: install $(NODE_STAMP) lint check-openapi
	$(BIN)/pytest -q

bench:  # side by side with Celery, Dramatiq, Huey, RQ: peers only in .bench-venv (docs/benchmarks.md)
	test -x .bench-venv/bin/python || $(PYTHON) -m venv .bench-venv
	.bench-venv/bin/pip install --quiet --upgrade pip
	.bench-venv/bin/pip install --quiet -e . -r bench/requirements.txt
	.bench-venv/bin/python bench/run.py $(BENCH_ARGS)

serve: install
	$(BIN)/celeriac serve

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache workers/node/node_modules

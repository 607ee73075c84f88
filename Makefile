# The two commands a user needs: `make demo` and `make test`. Everything else is for us.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
NODE_STAMP := workers/node/node_modules/.installed-stamp

.PHONY: install demo test lint typecheck openapi check-openapi bench serve clean lock audit

# Issue 12, finding 13: pinned, hashed dependency locks (docs/deploy.md, "Reproducible
# installs"). requirements.lock: the service (the Dockerfile installs it);
# requirements-dev.lock: the same pins plus the dev extras (this venv, CI).
LOCK     := requirements.lock
DEV_LOCK := requirements-dev.lock

# Everything from the dev lock, hash-checked; then the two distributions alone (--no-deps):
# the worker SDK (workers/python) and the service (this directory). The check first says
# `make lock` when either pyproject.toml asks for something the locks lack. The lock is
# complete (uv resolved it), so pip installs it as it is (--no-deps) and `pip check`
# proves nothing is missing: left to resolve, pip 23.2 read a dependency named with an
# extra (pip-audit's `CacheControl[filecache]>=0.13`) as a requirement of its own, found
# a newer release on PyPI than the pin, and refused the whole install under hashes.
SDK := workers/python
$(STAMP): pyproject.toml $(SDK)/pyproject.toml $(LOCK) $(DEV_LOCK)
	$(PYTHON) tools/locks.py check $(LOCK) $(DEV_LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --require-hashes --no-deps -r $(DEV_LOCK)
	$(BIN)/pip install --quiet --no-deps -e ./$(SDK) -e .
	$(BIN)/pip check
	touch $(STAMP)

install: $(STAMP)

# Regenerate both locks from pyproject.toml after changing a dependency. The service lock
# includes the `otel` extra, so the image can trace (off unless configured). Pins already in
# the locks are kept where pyproject still allows them; LOCK_ARGS=--upgrade moves every
# pin to the newest release, LOCK_ARGS='--upgrade-package NAME' one package. The SDK's
# own dependencies come in through the service's; the SDK itself is this checkout
# ([tool.uv.sources]), not a pin.
UV_COMPILE := $(BIN)/uv pip compile pyproject.toml --universal --python-version 3.11 \
	--generate-hashes --quiet --custom-compile-command 'make lock' \
	--no-emit-package celeriac $(LOCK_ARGS)
# No `install` prerequisite: that refuses stale locks, which this is here to fix.
lock:
	test -x $(BIN)/uv || { $(PYTHON) -m venv $(VENV) && $(BIN)/pip install --quiet \
		"uv==$$(sed -n 's/^uv==\([^ ]*\).*/\1/p' $(DEV_LOCK))"; }
	$(UV_COMPILE) --extra otel -o $(LOCK)
	$(UV_COMPILE) --extra dev -c $(LOCK) -o $(DEV_LOCK)

# Known vulnerabilities in the locked versions (CI runs it before the tests).
audit: install
	$(BIN)/python tools/locks.py audit $(LOCK) $(DEV_LOCK)

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

# Two processes (pytest-xdist), a test module to each at a time, RabbitMQ's tests together
# (tests/support/parallel.py): most of a test's time is spent waiting on services and
# workers, and the suite must stay under 15 minutes on a 2-core machine.
# TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2
test: install $(NODE_STAMP) lint check-openapi
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadscope

bench:  # side by side with Celery, Dramatiq, Huey, RQ: peers only in .bench-venv (docs/benchmarks.md)
	test -x .bench-venv/bin/python || $(PYTHON) -m venv .bench-venv
	.bench-venv/bin/pip install --quiet --upgrade pip
	.bench-venv/bin/pip install --quiet -e ./$(SDK) -e . -r bench/requirements.txt
	.bench-venv/bin/python bench/run.py $(BENCH_ARGS)
	.bench-venv/bin/python bench/workflow_chord.py  # a chord of 10,000 beside Celery's (docs/workflows.md)

serve: install
	$(BIN)/celeriac serve

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache workers/node/node_modules

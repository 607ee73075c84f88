# syntax=docker/dockerfile:1
#
# celeriac: one image for the API (`celeriac serve`), the schema migrations
# (`celeriac migrate`) and the Python worker (`celeriac worker`).
#
#   docker build -t celeriac:0.1.0 .
#
# Every setting comes from CELERIAC_* environment variables at run time (see
# .env.example and docs/deploy.md). No secret is baked into the image.

# ---------------------------------------------------------------------------
# builder: has compilers, builds a self-contained virtualenv in /opt/venv
# ---------------------------------------------------------------------------
FROM python:3.12-slim-bookworm AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

# Build tools for any dependency that has no wheel for this platform. They
# stay in this stage: the runtime stage copies only the virtualenv.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src

# 1. Dependencies only. This layer is rebuilt when pyproject.toml changes, not
#    when the source does.
COPY pyproject.toml ./
RUN python -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; open('/tmp/requirements.txt', 'w').write('\n'.join(deps) + '\n')" \
    && pip install -r /tmp/requirements.txt

# 2. The project itself (a regular, non-editable install).
COPY README.md ./
COPY service/ service/
COPY workers/python/celeriac/ workers/python/celeriac/
RUN pip install --no-deps .

# ---------------------------------------------------------------------------
# node-worker: the reference Node.js worker (compose profile "node").
# Built only when asked for (`--target node-worker`, or the compose service).
# ---------------------------------------------------------------------------
FROM node:20-alpine AS node-worker

ENV NODE_ENV=production
WORKDIR /app
COPY workers/node/ workers/node/
# npm ci when the worker ships a lockfile; it has no third-party packages otherwise.
# hadolint ignore=DL3016
RUN if [ -f workers/node/package-lock.json ]; then \
        npm ci --omit=dev --prefix workers/node; \
    elif [ -f workers/node/package.json ]; then \
        npm install --omit=dev --prefix workers/node; \
    fi \
    && npm cache clean --force
# the image's unprivileged "node" user
USER 1000:1000
STOPSIGNAL SIGTERM
CMD ["node", "workers/node/worker.js"]

# ---------------------------------------------------------------------------
# runtime: slim, no compilers, runs as an unprivileged user
# ---------------------------------------------------------------------------
FROM python:3.12-slim-bookworm AS runtime

LABEL org.opencontainers.image.title="celeriac" \
      org.opencontainers.image.description="Job queue service: HTTP API, migrations and Python worker" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN groupadd --system --gid 10001 celeriac \
    && useradd --system --uid 10001 --gid celeriac --no-create-home \
       --home-dir /app --shell /usr/sbin/nologin celeriac

COPY --from=builder /opt/venv /opt/venv

# `celeriac migrate` reads alembic.ini and alembic/ from the working directory.
WORKDIR /app
COPY alembic.ini ./
COPY alembic/ alembic/

# Files stay owned by root: the service user (celeriac, 10001) can read but
# not change them. Numeric, so runAsNonRoot-style checks can verify it.
USER 10001:10001

EXPOSE 8000

# The worker's warm shutdown: on SIGTERM it stops leasing, finishes running
# jobs and releases leased-but-unstarted ones. Give it time (compose:
# stop_grace_period).
STOPSIGNAL SIGTERM

# slim has no curl: ask /healthz with the standard library. Override the URL
# with CELERIAC_HEALTHCHECK_URL when the API listens elsewhere.
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ.get('CELERIAC_HEALTHCHECK_URL', 'http://127.0.0.1:8000/healthz'), timeout=4)"]

CMD ["celeriac", "serve", "--host", "0.0.0.0", "--port", "8000"]

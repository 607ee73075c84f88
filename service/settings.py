"""The one settings object. Every value comes from a ``CELERIAC_``-prefixed environment
variable (or a ``.env`` file); nothing is read at import time."""

from __future__ import annotations

from datetime import timedelta
from functools import cached_property

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.auth import MIN_KEY_LENGTH, ApiKey, parse_api_keys
from service.schemas import WebhookSpec
from service.states import JobStatus


def normalise_database_url(url: str) -> str:
    """Accept Celery's ``db+driver://`` result-backend form and pick our drivers."""
    if url.startswith("db+"):
        url = url[3:]
    replacements = {
        "postgresql://": "postgresql+psycopg://",
        "postgres://": "postgresql+psycopg://",
        "mysql://": "mysql+pymysql://",
        "mariadb://": "mariadb+pymysql://",
    }
    for prefix, replacement in replacements.items():
        if url.startswith(prefix):
            return replacement + url[len(prefix) :]
    return url


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CELERIAC_", env_file=".env", extra="ignore")

    database_url: str = "sqlite:///celeriac.db"
    # "sql" (dispatch from the jobs table), a redis:// or an amqp:// URL.
    broker_url: str = "sql"
    redis_prefix: str = "celeriac"
    # Serve the Redis worker protocol (docs/protocol.md) beside HTTP leases: job envelopes
    # are written next to the ready sets and worker events are applied to SQL.
    redis_workers: bool = True
    # With an amqp:// broker, queues are "<amqp_prefix>.<queue>"; classic queues
    # with priorities unless quorum queues are asked for (see docs/protocol.md, AMQP).
    amqp_prefix: str = "celeriac"
    amqp_quorum: bool = False
    # "secret:scope+scope[@queue-pattern|…],…" — see docs/security.md. Empty: auth off.
    api_keys: str = Field(default="", repr=False)

    max_payload_bytes: int = 1024 * 1024
    max_batch_jobs: int = 1000
    # Jobs in one POST /workflows (docs/workflows.md): one transaction, bounded by
    # max_request_bytes too.
    max_workflow_jobs: int = Field(20_000, ge=1, le=100_000)
    # Cap on batch bodies (jobs/batch, leases/report): a full batch at the per-job limit
    # would be 1 GiB. 16 MiB parses in about 0.1 s, which bounds how long one request can
    # hold the interpreter (docs/security.md).
    max_request_bytes: int = Field(16 * 1024 * 1024, ge=64 * 1024, le=256 * 1024 * 1024)
    # A request body must arrive whole within this many seconds (a client that declares
    # 60 MB and sends 1 KB must not hold a connection for ever): 408 after it.
    body_read_timeout_seconds: float = Field(10.0, gt=0, le=600)
    max_lease_jobs: int = 1000
    default_lease_seconds: float = 30.0
    max_lease_seconds: float = 3600.0
    max_lease_wait_seconds: float = 30.0
    max_result_wait_seconds: float = 60.0
    # Long-polls (POST /leases with wait > 0, GET /jobs/{id}?wait=) held at once, in all and
    # per API key (docs/api.md, Limits); more are answered at once with Retry-After. The
    # HTTP server answers 503 beyond limit_concurrency connections (default: the long-poll
    # cap + 1000; `celeriac serve --limit-concurrency`).
    max_long_polls: int = Field(1000, ge=1)
    max_long_polls_per_key: int = Field(200, ge=1)
    limit_concurrency: int | None = Field(None, ge=1)
    default_max_retries: int = 3
    # How long an Idempotency-Key is remembered (per API key) after its job was submitted;
    # reused later, it makes a new job. 0 = for ever.
    idempotency_ttl_seconds: float = Field(24 * 3600.0, ge=0)
    # Background loops: how often the reconciler re-checks the dispatch index, and the
    # fallback wake-up for SQL dispatch on a database without notifications (MariaDB).
    reconcile_interval_seconds: float = 5.0
    sql_poll_fallback_seconds: float = 1.0
    # Worker registry (docs/api.md, Workers): the heartbeat interval handed to workers; one
    # silent for two intervals is lost and its leases are reclaimed at once. Lost workers
    # stay listed by GET /workers this long.
    worker_heartbeat_seconds: float = Field(10.0, gt=0, le=3600)
    worker_lost_retention_seconds: float = Field(3600.0, ge=0)
    # Schedules: a tick later than this is 'missed' and handled by the schedule's catch_up
    # policy; the file (YAML or TOML) is applied at start-up, upserting by name.
    schedule_misfire_grace_seconds: float = Field(default=60.0, ge=1)
    schedules_file: str | None = None
    log_level: str = "info"
    # "text" or "json" (one JSON object per line; docs/operations.md, Logs).
    log_format: str = Field("text", pattern="^(text|json)$")
    # GET /metrics (docs/operations.md): a key that may read it and nothing else (besides
    # any API key with the read scope); the queue gauges are read from SQL at most this often.
    metrics_key: str = Field(default="", repr=False)
    metrics_refresh_seconds: float = Field(5.0, ge=0, le=3600)

    # --- webhooks (docs/webhooks.md) ---
    # "whsec_<base64>"; several, space-separated, while rotating: each signs every delivery.
    webhook_secret: str = Field(default="", repr=False)
    # JSON object {queue: {"url": ..., "events": [...]}} for jobs submitted without a webhook.
    webhook_queue_defaults: dict[str, WebhookSpec] = Field(default_factory=dict)
    # Comma-separated host names, addresses or CIDR ranges that may be private (SSRF rules).
    webhook_allowed_hosts: str = ""
    webhook_concurrency: int = Field(16, ge=1, le=1024)
    webhook_timeout_seconds: float = Field(10.0, gt=0, le=300)
    # Retries: exponential from base, capped at max, jittered; given up after the window.
    webhook_retry_base_seconds: float = Field(5.0, gt=0)
    webhook_retry_max_seconds: float = Field(3600.0, gt=0)
    webhook_retry_window_seconds: float = Field(3 * 86400.0, ge=0)
    # The delivery loop sleeps until the next due attempt or a local wake-up; this caps the
    # sleep so deliveries recorded by a replica that died are picked up by the others.
    webhook_idle_check_seconds: float = Field(60.0, gt=0)

    # --- results (docs/results.md) ---
    # file:///path for results over result_inline_max_bytes; "none" disables (results over
    # max_payload_bytes are then refused). Unset: a "results" folder beside the SQLite file.
    result_store: str = ""
    result_inline_max_bytes: int = Field(64 * 1024, ge=0)
    result_max_bytes: int = Field(16 * 1024 * 1024, ge=1)
    # Seconds a result is kept after its job succeeded (per job: result_ttl); 0 = forever.
    result_expires_seconds: float = Field(86400.0, ge=0)
    result_cleanup_batch: int = Field(100, ge=1, le=1000)
    result_cleanup_interval_seconds: float = Field(60.0, gt=0)

    # --- retention (docs/operations.md, Retention) ---
    # "<status>=<period>,…" over the defaults succeeded=7d,failed=30d,cancelled=7d,expired=7d
    # (periods in s, m, h, d or w; "forever" keeps a status; "off" keeps every job).
    retention: str = ""
    retention_batch: int = Field(500, ge=1, le=10000)
    retention_interval_seconds: float = Field(60.0, gt=0)
    # GET /events: a stream ends after this many seconds (EventSource clients reconnect).
    events_max_seconds: float = Field(300.0, gt=0, le=86400)

    # --- traces (docs/operations.md, Traces) ---
    # The service's own spans (submit, lease, settle) through the global OpenTelemetry
    # tracer provider; needs the otel extra. A traceparent header is stored either way.
    tracing: bool = False

    @field_validator("database_url")
    @classmethod
    def _normalise(cls, value: str) -> str:
        return normalise_database_url(value)

    @field_validator("api_keys")
    @classmethod
    def _valid_keys(cls, value: str) -> str:
        parse_api_keys(value)  # refuse placeholders, short keys and unknown scopes at start
        return value

    @field_validator("metrics_key")
    @classmethod
    def _valid_metrics_key(cls, value: str) -> str:
        if value and len(value) < MIN_KEY_LENGTH:
            raise ValueError(f"CELERIAC_METRICS_KEY must be at least {MIN_KEY_LENGTH} characters")
        return value

    @field_validator("retention")
    @classmethod
    def _valid_retention(cls, value: str) -> str:
        from service.retention import parse_retention  # it imports this module

        parse_retention(value)  # a malformed period fails start-up with its reason
        return value

    @cached_property
    def retention_periods(self) -> dict[JobStatus, timedelta | None]:
        from service.retention import parse_retention

        return parse_retention(self.retention)

    @cached_property
    def parsed_api_keys(self) -> tuple[ApiKey, ...]:
        return parse_api_keys(self.api_keys)

    @property
    def auth_enabled(self) -> bool:
        return bool(self.parsed_api_keys)

    @property
    def broker_kind(self) -> str:
        if self.broker_url in ("", "sql"):
            return "sql"
        if self.broker_url.startswith(("redis://", "rediss://", "unix://")):
            return "redis"
        if self.broker_url.startswith(("amqp://", "amqps://")):
            return "amqp"
        raise ValueError(
            f"CELERIAC_BROKER_URL: unsupported broker {self.broker_url.split(':')[0]!r}"
        )

"""The one settings object. Every value comes from a ``CELERIAC_``-prefixed environment
variable (or a ``.env`` file); nothing is read at import time."""

from __future__ import annotations

from functools import cached_property

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

SCOPES = frozenset({"submit", "read", "work", "admin"})


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


class ApiKey:
    """One configured key and the scopes it grants (``admin`` implies all)."""

    __slots__ = ("scopes", "secret")

    def __init__(self, secret: str, scopes: frozenset[str]) -> None:
        self.secret = secret
        self.scopes = scopes

    def __repr__(self) -> str:  # never print the secret
        return f"ApiKey(scopes={sorted(self.scopes)})"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CELERIAC_", env_file=".env", extra="ignore")

    database_url: str = "sqlite:///celeriac.db"
    # "sql" (dispatch from the jobs table) or a redis:// URL.
    broker_url: str = "sql"
    redis_prefix: str = "celeriac"
    # Serve the Redis worker protocol (docs/protocol.md) beside HTTP leases: job envelopes
    # are written next to the ready sets and worker events are applied to SQL.
    redis_workers: bool = True
    # "secret:scope+scope,secret2:scope" — see docs/api.md. Empty: auth off.
    api_keys: str = Field(default="", repr=False)

    max_payload_bytes: int = 1024 * 1024
    max_batch_jobs: int = 1000
    max_lease_jobs: int = 1000
    default_lease_seconds: float = 30.0
    max_lease_seconds: float = 3600.0
    max_lease_wait_seconds: float = 30.0
    max_result_wait_seconds: float = 60.0
    default_max_retries: int = 3
    idempotency_ttl_seconds: float = 24 * 3600.0
    # Background loops: how often the reconciler re-checks the dispatch index, and the
    # fallback wake-up for SQL dispatch on a database without notifications (MariaDB).
    reconcile_interval_seconds: float = 5.0
    sql_poll_fallback_seconds: float = 1.0
    log_level: str = "info"

    @field_validator("database_url")
    @classmethod
    def _normalise(cls, value: str) -> str:
        return normalise_database_url(value)

    @cached_property
    def parsed_api_keys(self) -> tuple[ApiKey, ...]:
        keys: list[ApiKey] = []
        for entry in filter(None, (part.strip() for part in self.api_keys.split(","))):
            secret, _, scope_text = entry.rpartition(":")
            if not secret:
                raise ValueError("CELERIAC_API_KEYS entries look like 'secret:scope+scope'")
            scopes = frozenset(s.strip() for s in scope_text.split("+") if s.strip())
            unknown = scopes - SCOPES
            if unknown or not scopes:
                raise ValueError(f"CELERIAC_API_KEYS: unknown scopes {sorted(unknown)}")
            keys.append(ApiKey(secret, scopes))
        return tuple(keys)

    @property
    def auth_enabled(self) -> bool:
        return bool(self.parsed_api_keys)

    @property
    def broker_kind(self) -> str:
        if self.broker_url in ("", "sql"):
            return "sql"
        if self.broker_url.startswith(("redis://", "rediss://", "unix://")):
            return "redis"
        raise ValueError(
            f"CELERIAC_BROKER_URL: unsupported broker {self.broker_url.split(':')[0]!r}"
        )

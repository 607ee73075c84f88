"""The service's log format: uvicorn's own text lines (the default), or one JSON object
per line (``celeriac serve --log-format json``, ``CELERIAC_LOG_FORMAT=json``) from every
logger, uvicorn's included, through the SDK's ``JsonFormatter`` (which masks credentials
and adds ``job_id``, ``task``, ``queue``, ``attempt`` and ``worker`` where a record is
about one job: docs/operations.md, Logs)."""

from __future__ import annotations

from typing import Any

FORMATS = ("text", "json")


def uvicorn_log_config(level: str, log_format: str) -> dict[str, Any] | None:
    """The ``log_config`` for ``uvicorn.run``; None keeps uvicorn's default (text)."""
    if log_format != "json":
        return None
    level = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": "celeriac._logging.JsonFormatter"}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "json",
                "stream": "ext://sys.stderr",
            }
        },
        "loggers": {
            "uvicorn": {"handlers": ["stderr"], "level": level, "propagate": False},
            "uvicorn.error": {"level": level},
            "uvicorn.access": {"handlers": ["stderr"], "level": level, "propagate": False},
            # One line per webhook delivery request at INFO is noise; failures still show.
            "httpx": {"level": "WARNING"},
            "httpcore": {"level": "WARNING"},
        },
        "root": {"handlers": ["stderr"], "level": level},
    }

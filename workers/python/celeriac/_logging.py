"""The worker's logging: a level, a format that names the node (text, or one JSON
object per line), stderr or a log file, and SIGHUP to reopen that file after logrotate
has moved it away."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import sys
import threading
from datetime import UTC, datetime
from types import FrameType
from typing import Any

from .context import get_current_job

logger = logging.getLogger("celeriac.worker")

LEVELS = ("debug", "info", "warning", "error", "critical")
# The node name is fixed for the life of the process: baked into the format, not looked
# up per record.
LOG_FORMAT = "[%(asctime)s %(levelname)s {node}/%(threadName)s] %(name)s: %(message)s"
FORMATS = ("text", "json")
# Placed where a format string goes (a processes-pool child copies the worker's format):
# the child then formats records as JSON too.
JSON_MARKER = "json"
# The fields a record about one job carries (``extra=`` or the running job's context).
JOB_FIELDS = ("job_id", "task", "queue", "attempt", "worker")
# Credentials never reach a log line: a URL's password, a bearer token, an API key header.
_SECRETS = (
    (re.compile(r"(\b[a-zA-Z][\w+.-]*://[^/\s:@]*:)[^@\s/]+@"), r"\1***@"),
    (re.compile(r"(?i)\b(bearer\s+)[^\s'\"]+"), r"\1***"),
    (re.compile(r"(?i)\b(x-api-key['\"]?\s*[:=]\s*['\"]?)[^\s'\",}]+"), r"\1***"),
)


def redact(text: str) -> str:
    """``text`` with credentials it may hold (URL passwords, bearer tokens) masked."""
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    return text


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts`` (UTC, ISO 8601), ``level``, ``logger``,
    ``message``, ``node`` (when given), ``thread``, the job's ``job_id``, ``task``,
    ``queue``, ``attempt`` and ``worker`` when the record is about one (passed as
    ``extra=``, or the job running where it was logged), and ``exc`` for a traceback.
    Credentials in the text are masked (``redact``)."""

    def __init__(self, node: str | None = None) -> None:
        super().__init__()
        self.node = node
        self._fmt = JSON_MARKER  # what a processes-pool child is told to use

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        if self.node:
            entry["node"] = self.node
        entry["thread"] = record.threadName
        entry.update(_job_fields(record))
        if record.exc_info:
            entry["exc"] = redact(self.formatException(record.exc_info))
        elif record.stack_info:
            entry["exc"] = redact(self.formatStack(record.stack_info))
        return json.dumps(entry, ensure_ascii=False, default=str)


def _job_fields(record: logging.LogRecord) -> dict[str, Any]:
    given = {name: getattr(record, name) for name in JOB_FIELDS if hasattr(record, name)}
    if given:
        return given
    context = get_current_job()
    if context is None:
        return {}
    return {"job_id": context.job_id, "task": context.task, "queue": context.queue,
            "attempt": context.attempt, "worker": context.worker}  # fmt: skip


def formatter(log_format: str | None, node: str | None = None) -> logging.Formatter:
    """The formatter for a format name (``json``) or a ``%``-style format string."""
    if log_format == JSON_MARKER:
        return JsonFormatter(node)
    return logging.Formatter(log_format)


def parse_format(name: str | None) -> str:
    """``text`` or ``json`` (default: $CELERIAC_LOG_FORMAT, else text); ``ValueError``
    for anything else."""
    chosen = (name or os.environ.get("CELERIAC_LOG_FORMAT") or "text").lower()
    if chosen not in FORMATS:
        raise ValueError(f"unknown log format {chosen!r} (text or json)")
    return chosen


def parse_level(name: str) -> int:
    """A level name in any case; ``ValueError`` for anything but the five levels."""
    if name.lower() not in LEVELS:
        raise ValueError(f"unknown log level {name!r} (one of {', '.join(LEVELS)})")
    return logging.getLevelNamesMapping()[name.upper()]


class ReopenableFileHandler(logging.FileHandler):
    """A file handler (append mode) that ``reopen()`` points at a new file of the same
    name, so logrotate can move the old one away and signal us."""

    def __init__(self, path: str) -> None:
        super().__init__(path, mode="a", encoding="utf-8")

    def reopen(self) -> None:
        self.acquire()
        try:
            old = self.stream
            self.stream = self._open()
            if old is not None:
                _follow_to(old.fileno(), self.stream.fileno())
                old.close()
        finally:
            self.release()


def _follow_to(old_fd: int, new_fd: int) -> None:
    """Point stdout/stderr at the new log file if they wrote to the old one (``celeriac
    multi`` sends them there, for tracebacks that bypass logging)."""
    old = os.fstat(old_fd)
    for stream in (sys.stdout, sys.stderr):
        try:
            fd = stream.fileno()
            current = os.fstat(fd)
        except (AttributeError, OSError, ValueError):
            continue  # replaced or closed
        if (current.st_dev, current.st_ino) == (old.st_dev, old.st_ino):
            stream.flush()
            os.dup2(new_fd, fd)


def configure(
    level_name: str, node: str, logfile: str | None, log_format: str | None = None
) -> None:
    """Log at ``level_name`` to ``logfile`` (appending) or stderr, as text or JSON
    (``parse_format``). ``ValueError`` for an unknown level or format, ``OSError`` if
    the file cannot be opened."""
    level = parse_level(level_name)
    as_json = parse_format(log_format) == "json"
    handler: logging.Handler
    handler = ReopenableFileHandler(logfile) if logfile else logging.StreamHandler()
    if as_json:
        handler.setFormatter(JsonFormatter(node))
    else:
        handler.setFormatter(logging.Formatter(LOG_FORMAT.format(node=node.replace("%", "%%"))))
    logging.basicConfig(level=level, handlers=[handler])
    # httpx logs every request at INFO: one line per lease/report call is noise.
    logging.getLogger("httpx").setLevel(max(level, logging.WARNING))
    logging.getLogger("httpcore").setLevel(max(level, logging.WARNING))
    if threading.current_thread() is threading.main_thread():
        # Also without a log file: SIGHUP's default action would kill the worker
        # without a warm shutdown.
        signal.signal(signal.SIGHUP, _on_sighup)


def _on_sighup(signum: int, frame: FrameType | None) -> None:
    # Not here: the signal may have interrupted this very thread inside a handler's
    # emit(), with the handler's (reentrant) lock held and half a line written.
    threading.Thread(target=reopen_log_files, name="celeriac-reopen-logs", daemon=True).start()


def reopen_log_files() -> None:
    handlers = [h for h in logging.getLogger().handlers if isinstance(h, ReopenableFileHandler)]
    for handler in handlers:
        try:
            handler.reopen()
        except OSError as exc:
            logger.error("SIGHUP: cannot reopen %s, still logging to the old file: %s",
                         handler.baseFilename, exc)  # fmt: skip
            continue
        logger.info("SIGHUP: reopened log file %s", handler.baseFilename)
    if not handlers:
        logger.info("SIGHUP: no log file to reopen")

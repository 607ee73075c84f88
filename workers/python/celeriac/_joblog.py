"""Per-attempt job logs (River's ``riverlog`` is the model): what a task logs while it
runs is kept with that attempt, bounded, and sent with the attempt's report, so
``GET /jobs/{id}/logs`` shows it beside the outcome.

One handler on the root logger, installed once per process, appends each record to the
log of the job running in the emitting context (``current_job``: a pool thread, an
asyncio task, a processes-pool child). Records from anything else (the worker itself,
another job's thread) are not captured. Levels are the worker's: a record its logger
does not emit (``--loglevel``) is not captured either."""

from __future__ import annotations

import logging
import re
import threading

from .context import JobContext, get_current_job

# Per attempt, as the service's limit for the report's ``logs`` field.
MAX_LOG_BYTES = 65536
TRUNCATED = "\n[celeriac: log truncated, {dropped} more bytes not kept]\n"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# The service refuses control characters other than tab, LF and CR in text (a NUL breaks
# PostgreSQL; an ANSI colour code is noise): shown escaped instead, never dropping a report.
_CONTROLS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _escaped(line: str) -> str:
    # A lone surrogate (from a bytes path decoded with surrogateescape) is invalid JSON.
    line = line.encode("utf-8", "replace").decode("utf-8")
    return _CONTROLS.sub(lambda m: f"\\x{ord(m.group()):02x}", line)


class AttemptLog:
    """The bounded text of one attempt: the first ``MAX_LOG_BYTES`` bytes are kept, the
    rest are counted and named by a marker at the end."""

    __slots__ = ("_dropped", "_lock", "_parts", "_size")

    def __init__(self) -> None:
        self._parts: list[str] = []
        self._size = 0
        self._dropped = 0
        self._lock = threading.Lock()  # a task may log from threads of its own

    def add(self, line: str) -> None:
        line = _escaped(line)
        encoded = len(line.encode("utf-8"))
        with self._lock:
            room = MAX_LOG_BYTES - self._size
            if encoded <= room:
                self._parts.append(line)
                self._size += encoded
                return
            if room > 0:  # keep what fits, cut on a character boundary
                kept = line.encode("utf-8")[:room].decode("utf-8", "ignore")
                self._parts.append(kept)
                self._size += len(kept.encode("utf-8"))
                encoded -= len(kept.encode("utf-8"))
            self._dropped += encoded

    def text(self) -> str | None:
        """The attempt's log, or None when the task logged nothing."""
        with self._lock:
            if not self._parts and not self._dropped:
                return None
            text = "".join(self._parts)
            if self._dropped:
                text += TRUNCATED.format(dropped=self._dropped)
            return text


class _CaptureHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        context = get_current_job()
        log = getattr(context, "attempt_log", None) if context is not None else None
        if log is None:
            return
        try:
            log.add(self.format(record) + "\n")
        except Exception:  # a bad record must not fail the task
            self.handleError(record)


_installed: _CaptureHandler | None = None
_install_lock = threading.Lock()


def install() -> None:
    """Capture task logs in this process from now on (idempotent)."""
    global _installed
    with _install_lock:
        if _installed is not None:
            return
        handler = _CaptureHandler(level=logging.NOTSET)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        logging.getLogger().addHandler(handler)
        _installed = handler


def start_attempt(context: JobContext) -> AttemptLog:
    """A fresh log for the attempt ``context`` runs."""
    log = AttemptLog()
    context.attempt_log = log
    return log

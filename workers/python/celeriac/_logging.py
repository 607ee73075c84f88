"""The worker's logging: a level, a format that names the node, stderr or a log file,
and SIGHUP to reopen that file after logrotate has moved it away."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from types import FrameType

logger = logging.getLogger("celeriac.worker")

LEVELS = ("debug", "info", "warning", "error", "critical")
# The node name is fixed for the life of the process: baked into the format, not looked
# up per record.
LOG_FORMAT = "[%(asctime)s %(levelname)s {node}/%(threadName)s] %(name)s: %(message)s"


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


def configure(level_name: str, node: str, logfile: str | None) -> None:
    """Log at ``level_name`` to ``logfile`` (appending) or stderr. ``ValueError`` for an
    unknown level, ``OSError`` if the file cannot be opened."""
    level = parse_level(level_name)
    handler: logging.Handler
    handler = ReopenableFileHandler(logfile) if logfile else logging.StreamHandler()
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

"""Outages of the database, told apart from errors in the data.

While SQL cannot be reached every request that needs it answers ``503`` with a
``Retry-After`` header (``errors.DatabaseUnavailable``), and the log gets ONE line when
the outage starts and ONE when it ends: a client retrying a thousand times must not write
a thousand tracebacks. ``Database`` (service/db.py) feeds the tracker: it knows when a
call failed for want of a connection and when one succeeded again. Background loops ask
``log_failure`` whether their failure is already told by the tracker.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Any

import sqlalchemy as sa

from service import errors

log = logging.getLogger("celeriac.outage")

# PostgreSQL: class 08 is "connection exception"; 57P01-03 are a server shutting down,
# crashing or starting up; 53300 is "too many connections". psycopg's own client-side
# failures (refused, reset, closed) carry no SQLSTATE at all.
_PG_STATES = frozenset({"57P01", "57P02", "57P03", "53300"})
# MySQL/MariaDB client and server codes for a connection that is gone or never came:
# 1040 too many connections, 1053 server shutdown, 2002/2003 cannot connect, 2006 gone
# away, 2013 lost during a query, 2055 lost at handshake, 4031 closed for inactivity.
_MYSQL_CODES = frozenset({1040, 1053, 2002, 2003, 2006, 2013, 2055, 4031})
RETRY_AFTER_MIN, RETRY_AFTER_MAX = 1, 5


def is_unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` says the database could not be reached (an outage), rather than
    that a statement or its data was refused (a bug or a bad value: not an outage)."""
    if isinstance(exc, sa.exc.TimeoutError):  # the pool had no connection to give in time
        return True
    if not isinstance(exc, sa.exc.DBAPIError):
        return False
    if exc.connection_invalidated:  # SQLAlchemy's dialect recognised a disconnect
        return True
    original = exc.orig
    if type(original).__module__.startswith("sqlite3"):
        # SQLite is a file: the only "outage" is a file that cannot be opened.
        return "unable to open database file" in str(original)
    if isinstance(exc, sa.exc.InterfaceError):  # psycopg/pymysql: the connection is closed
        return True
    if not isinstance(exc, sa.exc.OperationalError):
        return False
    if type(original).__module__.startswith("psycopg"):
        state: str | None = getattr(original, "sqlstate", None)
        return state is None or state.startswith("08") or state in _PG_STATES
    args: tuple[Any, ...] = getattr(original, "args", ())
    return bool(args) and args[0] in _MYSQL_CODES


def describe(exc: BaseException) -> str:
    """One short line for the log: the driver's error class and the first line of its text."""
    if isinstance(exc, errors.DatabaseUnavailable) and exc.__cause__ is not None:
        exc = exc.__cause__  # what the driver said, not our 503
    original = exc.orig if isinstance(exc, sa.exc.DBAPIError) else exc
    text = str(original).strip().splitlines()
    return f"{type(original).__name__}: {text[0][:200] if text else ''}".rstrip(": ")


class OutageTracker:
    """Whether ``what`` is down, since when, and how many calls failed meanwhile. Called
    from the threads that run database work, hence the lock around the transitions."""

    def __init__(self, what: str = "database") -> None:
        self.what = what
        self.since: float | None = None  # time.monotonic() of the first failure
        self.failures = 0
        self._lock = threading.Lock()

    @property
    def down(self) -> bool:
        return self.since is not None

    def failed(self, exc: BaseException) -> errors.DatabaseUnavailable:
        """Record a failed call (log it if it starts an outage); returns the 503 to raise."""
        with self._lock:
            self.failures += 1
            starts = self.since is None
            if starts:
                self.since = time.monotonic()
        if starts:
            log.error(
                "%s unreachable (%s): answering 503 until it is back", self.what, describe(exc)
            )
        return self.unavailable()

    def succeeded(self, started: float) -> None:
        """Record a call that worked (log the end of an outage, once). ``started``: its
        time.monotonic() when it began; a call begun before the outage proves nothing."""
        since = self.since
        if since is None or started < since:  # the common case: no lock, nothing to do
            return
        with self._lock:
            since, failures = self.since, self.failures
            self.since, self.failures = None, 0
        if since is not None:
            log.warning(
                "%s reachable again after %.1fs (%d calls failed meanwhile)",
                self.what, time.monotonic() - since, failures,
            )  # fmt: skip

    def retry_after(self) -> int:
        """Seconds a client should wait: short at first, longer as an outage goes on."""
        since = self.since
        elapsed = 0.0 if since is None else time.monotonic() - since
        return int(min(RETRY_AFTER_MIN + elapsed // 10, RETRY_AFTER_MAX))

    def unavailable(self, detail: str | None = None) -> errors.DatabaseUnavailable:
        seconds = self.retry_after()
        return errors.DatabaseUnavailable(
            detail
            or f"the {self.what} is unreachable; retry in {seconds}s (with the same "
            "Idempotency-Key, a retried submit never creates a second job)",
            headers={"Retry-After": str(seconds)},
        )


def is_outage(exc: BaseException | None) -> bool:
    """Whether ``exc`` is the database being unreachable: the tracker tells that once."""
    return isinstance(exc, errors.DatabaseUnavailable) or (exc is not None and is_unreachable(exc))


def log_failure(logger: logging.Logger, what: str) -> None:
    """For a background loop's ``except``: an outage is already told once by the tracker,
    so it is not logged again on every pass; anything else gets its traceback."""
    exc = sys.exc_info()[1]
    if is_outage(exc):
        logger.debug("%s failed: the database is unreachable", what)
        return
    logger.exception("%s failed; retrying", what)

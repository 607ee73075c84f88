"""One bad row never fails its neighbours: tell a row the database refused (a value out
of range, a constraint, a string too long) from an outage, and turn the former into a
client error. Batches (group commit, sweeps, the Redis event stream) use this to retry
their rows alone after a failed transaction and to set aside only the row that still
fails; an outage is never blamed on a row and propagates as before."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa

from service import errors

log = logging.getLogger("celeriac.isolation")

# MySQL/MariaDB errors about a value, which PyMySQL reports as OperationalError or
# InternalError (it maps by code range): a CHECK constraint such as MariaDB's
# JSON_VALID on JSON columns (4025: JSON nested 32 or more levels deep), invalid JSON
# (3140), a string that does not fit (1406, 1366), a number or date out of range (1264,
# 1265, 1292), a NULL where none is allowed (1048). And a statement larger than
# max_allowed_packet (1153): a group of many large jobs splits until each part fits.
_MYSQL_ROW_CODES = frozenset({1048, 1153, 1264, 1265, 1292, 1366, 1406, 3140, 4025})
DETAIL_CHARS = 300


def is_row_error(exc: BaseException) -> bool:
    """Whether ``exc`` is the database (or our own bind processing) refusing a value of
    the statement's rows, as opposed to the database being unreachable or a bug in a
    statement: retrying the same rows fails the same way, retrying others may not."""
    if isinstance(exc, sa.exc.DataError | sa.exc.IntegrityError):
        return True
    if isinstance(exc, sa.exc.DBAPIError):
        args: tuple[Any, ...] = getattr(exc.orig, "args", ())
        return bool(args) and args[0] in _MYSQL_ROW_CODES
    # Not from the driver: a value a type's bind processing could not convert (a date
    # that overflows when moved to UTC: OverflowError where our bulk insert converts the
    # values itself, service/bulk.py) or the driver's adaptation refused.
    return isinstance(exc, sa.exc.StatementError | OverflowError)


def reason(exc: BaseException) -> str:
    """One line saying what the database refused, for logs."""
    original = getattr(exc, "orig", None) or exc
    text = str(original).strip().splitlines()
    first = text[0] if text else type(original).__name__
    return f"{type(original).__name__}: {first}"[:DETAIL_CHARS]


def not_storable(exc: BaseException, what: str = "the job") -> errors.JobNotStorable:
    """The client error for a row the database refused. The database's own message
    stays in the log: it may name the schema."""
    log.warning("%s could not be stored: %s", what, reason(exc))
    return errors.JobNotStorable(
        f"{what} could not be stored: the database refused one of its values (for "
        "example JSON nested 32 or more levels deep on MariaDB, a string too long for "
        "its column, or a date out of range). Nothing was stored."
    )


@contextlib.contextmanager
def refusing_unstorable(what: str = "the job") -> Iterator[None]:
    """Turn a row the database refused into a 422 (a 500 otherwise); outages pass."""
    try:
        yield
    except Exception as exc:
        if is_row_error(exc):
            raise not_storable(exc, what) from None
        raise

"""Strict decoding of the Redis worker protocol's events (docs/protocol.md, "Redis
protocol"). Any client that can reach Redis can append to the stream, so an event is
input like an HTTP body: checked field by field, its JSON parsed strictly (no NaN or
Infinity, no duplicate keys, no NUL, bounded depth: the request gate's parser). An event
that cannot be read is dropped; a report whose payload cannot be read becomes a failure
report saying so (its job runs again per its retry policy instead of waiting for its
lease to run out). Neither stops the other events of the batch."""

from __future__ import annotations

import logging
import math
from enum import StrEnum
from typing import Any

from pydantic import TypeAdapter, ValidationError

from service import errors, gate, schemas
from service.ids import is_job_id

log = logging.getLogger("celeriac.redis.protocol")

Event = dict[str, Any]


class Kind(StrEnum):
    """The event kinds on the stream (docs/protocol.md): one letter each on the wire."""

    lease = "L"
    heartbeat = "H"
    complete = "C"
    fail = "F"
    release = "R"


KINDS = frozenset(Kind)
REPORTS = frozenset({Kind.complete, Kind.fail, Kind.release})
TOKEN_MAX, WORKER_MAX = 64, 200  # the lease_token and lease_worker columns
LEASE_MS_MAX = 7 * 86400 * 1000
RETRY_IN_MAX = 366 * 86400.0
WHY_CHARS = 200
_PROGRESS: TypeAdapter[Any] = TypeAdapter(schemas.Progress)
_LOGS: TypeAdapter[str | None] = TypeAdapter(schemas.AttemptLogs)


class BadEvent(ValueError):
    """An event that cannot be applied: what is wrong with it."""


def strict_json(text: str) -> Any:
    """One JSON value, as strictly as an HTTP body (``service.gate.strict_loads``)."""
    try:
        return gate.strict_loads(text.encode("utf-8", "replace"))
    except errors.InvalidJson as exc:
        raise BadEvent(exc.detail) from None


def _text(fields: dict[str, str], name: str, limit: int) -> str:
    value = fields.get(name)
    if not isinstance(value, str) or not value or len(value) > limit:
        raise BadEvent(f"field {name!r} must be 1-{limit} characters")
    if not value.isprintable():
        raise BadEvent(f"field {name!r} holds control characters")
    return value


def _lease_ms(fields: dict[str, str]) -> int:
    raw = fields.get("ms", "")
    if not raw.isdigit() or not 0 < int(raw) <= LEASE_MS_MAX:
        raise BadEvent(f"field 'ms' must be an integer in 1..{LEASE_MS_MAX}")
    return int(raw)


def _retry_in(raw: str) -> float | None:
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise BadEvent("field 'in' is not a number") from None
    if not math.isfinite(value) or not 0 <= value <= RETRY_IN_MAX:
        raise BadEvent(f"field 'in' must be a number of seconds in 0..{RETRY_IN_MAX:g}")
    return value


def _error(raw: str) -> dict[str, Any]:
    """The same rules as an HTTP report's error (sizes, no control characters): what is
    stored must render back through the API's own schema."""
    value = strict_json(raw)
    try:
        return schemas.ErrorInfo.model_validate(value).model_dump(exclude_none=True)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ()))
        raise BadEvent(f"field 'e' is not a valid error ({where}: {first['msg']})") from None


def _progress(raw: str) -> Any:
    """A heartbeat's progress; one that breaks the HTTP rules (size) is dropped, and the
    heartbeat still extends the lease."""
    if not raw:
        return None
    try:
        return _PROGRESS.validate_python(strict_json(raw))
    except (BadEvent, ValidationError):
        return None


def decode(fields: dict[str, str]) -> Event:
    """One event from its stream fields, every value checked and parsed; BadEvent when it
    cannot be applied at all."""
    kind = fields.get("k")
    if kind not in KINDS:
        raise BadEvent(f"unknown event kind {str(kind)[:20]!r}")
    job_id = fields.get("id", "")
    if not is_job_id(job_id):
        raise BadEvent("field 'id' is not a job id")
    event: Event = {"k": kind, "id": job_id, "t": _text(fields, "t", TOKEN_MAX)}
    if kind == Kind.lease:
        event.update(w=_text(fields, "w", WORKER_MAX), ms=_lease_ms(fields))
    elif kind == Kind.heartbeat:
        event.update(ms=_lease_ms(fields), p=_progress(fields.get("p") or ""))
    elif kind in (Kind.complete, Kind.fail):
        try:
            event.update(_report_fields(kind, fields))
        except BadEvent as exc:  # the report arrived: record it as a failure, saying why
            message = f"the worker's report could not be read: {exc}"[:WHY_CHARS]
            event.update(k=Kind.fail, e={"type": "InvalidReport", "message": message}, retry=True,
                         retry_in=None)  # fmt: skip
    return event


def _report_fields(kind: str, fields: dict[str, str]) -> Event:
    logs = _logs(fields.get("l"))
    if kind == Kind.complete:
        return {"r": strict_json(fields.get("r", "")), "l": logs}
    return {
        "e": _error(fields.get("e", "")),
        "retry": fields.get("retry", "1") != "0",
        "retry_in": _retry_in(fields.get("in") or ""),
        "l": logs,
    }


def _logs(raw: str | None) -> str | None:
    """The attempt's logs as an HTTP report's ``logs`` would be accepted; logs that would
    not are replaced by a note saying why (the report itself still counts: the worker
    was told OK)."""
    if not raw:
        return None
    try:
        return _LOGS.validate_python(raw)
    except ValidationError as exc:
        why = exc.errors()[0]["msg"][:WHY_CHARS]
        return f"[celeriac: the worker's logs were refused: {why}]\n"


def decode_all(entries: list[tuple[str, dict[str, str]]]) -> list[Event]:
    """The batch's events that can be applied, in stream order; the others are dropped
    with one log line for the batch (a flood of bad events must not flood the log)."""
    events: list[Event] = []
    dropped: list[str] = []
    for entry_id, fields in entries:
        if not fields:
            continue
        try:
            events.append(decode(fields))
        except BadEvent as exc:
            dropped.append(f"{entry_id}: {exc}"[:WHY_CHARS])
    if dropped:
        log.warning(
            "dropped %d Redis worker event(s) that cannot be applied (first: %s)",
            len(dropped),
            dropped[0],
        )
    return events

"""Results lifecycle (docs/results.md): where a result lives, reading it back, expiry.

A result up to ``CELERIAC_RESULT_INLINE_MAX_BYTES`` of JSON is stored in the job row,
as before. A larger one goes to the result store (``CELERIAC_RESULT_STORE``, a folder)
and the row keeps its key in ``result_ref``; without a store, results over
``CELERIAC_MAX_PAYLOAD_BYTES`` are refused with 413 as they always were. The file is
written before the transaction that settles the job, under a key no other report uses,
so a commit never points at a missing file; a report that turns out stale deletes its
file again.

A succeeded job's result is kept ``result_ttl`` seconds (``CELERIAC_RESULT_EXPIRES_SECONDS``
by default, 0 = forever). From then on the job reads ``result_expired: true`` and the
cleanup loop deletes the result (row and file) in small SKIP LOCKED batches; the job and
its status stay. The cleanup is a background plugin (``ResultCleaner``, service/loops.py):
due at the next ``result_expires_at``, at most ``result_cleanup_interval_seconds`` apart."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO
from urllib.parse import unquote, urlsplit

import anyio
import sqlalchemy as sa
from sqlalchemy.orm import Session

from service import errors
from service.ids import is_job_id
from service.leases import Settle, filter_only
from service.loops import Pass, Plugin
from service.models import JOBS_TABLE, JobRow, values_of
from service.serialize import iso, result_fields
from service.settings import Settings
from service.states import JobStatus, Outcome

if TYPE_CHECKING:
    from service.runtime import Runtime

log = logging.getLogger("celeriac.results")
jobs_c = JOBS_TABLE.c
CHUNK = 256 * 1024


class FileStore:
    """Results as files under ``root``: ``<first 8 hex of the job id>/<job id>.<random>.json``
    (UUIDv7 ids are time-ordered, so a folder holds about a minute of jobs)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def new_key(self, job_id: str) -> str:
        return f"{job_id[:8]}/{job_id}.{secrets.token_hex(6)}.json"

    def path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root.resolve() not in path.parents:  # keys are ours; never trust blindly
            raise ValueError(f"result key {key!r} points outside the result store")
        return path

    def put(self, key: str, data: bytes) -> None:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp")
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())  # durable before the commit that points at it
        os.replace(temporary, path)

    def read(self, key: str) -> bytes:
        return self.path(key).read_bytes()

    def open(self, key: str) -> tuple[BinaryIO, int]:
        handle = open(self.path(key), "rb")  # noqa: SIM115 - the response stream closes it
        return handle, os.fstat(handle.fileno()).st_size

    def delete(self, keys: Iterable[str]) -> None:
        for key in keys:
            path = self.path(key)
            path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # not empty, or already gone
                path.parent.rmdir()


def store_of(settings: Settings) -> FileStore | None:
    return _store(settings.result_store, settings.database_url)


@lru_cache(maxsize=8)
def _store(url: str, database_url: str) -> FileStore | None:
    if url.strip().lower() == "none":
        return None
    if not url:
        # The default: a "results" folder beside an SQLite database file; none otherwise.
        if not database_url.startswith("sqlite"):
            return None
        database = sa.engine.make_url(database_url).database
        if not database or database == ":memory:":
            return None
        return FileStore(Path(database).resolve().parent / "results")
    parts = urlsplit(url)
    if parts.scheme != "file" or parts.netloc not in ("", "localhost") or not parts.path:
        raise ValueError(
            "CELERIAC_RESULT_STORE: give a file:///absolute/path URL or 'none' "
            f"(the {parts.scheme or 'given'!r} scheme is not supported)"
        )
    return FileStore(Path(unquote(parts.path)))


# --- placing results when jobs settle ------------------------------------------------------


def _too_large(size: int, limit: int, setting: str, hint: str) -> errors.PayloadTooLarge:
    return errors.PayloadTooLarge(
        f"the result is {size} bytes of JSON; the limit is {limit} ({setting}). {hint}"
    )


async def place(
    runtime: Runtime, request_length: int | None, reports: Sequence[Settle]
) -> tuple[list[Settle], list[str]]:
    """Write results too large for the row to the store. Returns the reports (a stored
    result replaced by its ``result_ref``) and the keys written, which the caller must
    ``discard`` for reports that did not settle."""
    settings = runtime.settings
    store = store_of(settings)
    inline_max = settings.max_payload_bytes if store is None else settings.result_inline_max_bytes
    if request_length is not None and request_length <= inline_max:
        return list(reports), []  # the common case: no result can be over the limit
    large = {i: data for i, r in enumerate(reports) if (data := _large_result(r, inline_max))}
    if not large:
        return list(reports), []
    for data in large.values():
        _check_size(len(data), inline_max, settings, with_store=store is not None)
    assert store is not None  # _check_size refused every large result without one
    # A file only for a report that holds its lease: an id that is no job's (NUL, 300
    # characters...) or a stale token never reaches the file system. Settling checks the
    # token again, in its own transaction; a report that fails there deletes its file.
    pairs = [(reports[i].id, reports[i].token) for i in large]
    live = await runtime.db.read(lambda session: live_leases(session, pairs))
    placed: list[Settle] = list(reports)
    written: list[str] = []
    try:
        for index, data in large.items():
            report = reports[index]
            if (report.id, report.token) not in live:
                placed[index] = replace(report, result=None)  # refused when it settles
                continue
            key = store.new_key(report.id)
            await anyio.to_thread.run_sync(store.put, key, data)
            written.append(key)
            placed[index] = replace(report, result=None, result_ref=key)
    except BaseException:
        await discard(runtime, written)
        raise
    return placed, written


def _check_size(size: int, inline_max: int, settings: Settings, *, with_store: bool) -> None:
    if not with_store:
        raise _too_large(size, inline_max, "CELERIAC_MAX_PAYLOAD_BYTES",
                         "Configure CELERIAC_RESULT_STORE for larger results, or "
                         "store them elsewhere and return a reference.")  # fmt: skip
    if size > settings.result_max_bytes:
        raise _too_large(size, settings.result_max_bytes, "CELERIAC_RESULT_MAX_BYTES",
                         "Store it elsewhere and return a reference.")  # fmt: skip


def live_leases(session: Session, pairs: Sequence[tuple[str, str]]) -> set[tuple[str, str]]:
    """The (job id, token) pairs that hold a running job's lease right now."""
    ids = list({job_id for job_id, _token in pairs if is_job_id(job_id)})
    if not ids:
        return set()
    rows = session.execute(
        sa.select(jobs_c.id, jobs_c.lease_token).where(
            jobs_c.id.in_(ids), filter_only(jobs_c.status == JobStatus.running)
        )
    )
    held = {(row.id, row.lease_token) for row in rows}
    return {pair for pair in pairs if pair in held}


def _large_result(report: Settle, inline_max: int) -> bytes | None:
    if report.outcome != Outcome.succeeded or report.result is None:
        return None
    data = json.dumps(report.result, separators=(",", ":"), ensure_ascii=False).encode()
    return data if len(data) > inline_max else None


async def discard(runtime: Runtime, keys: Sequence[str]) -> None:
    """Delete stored results nothing points at (their report was stale, or failed)."""
    store = store_of(runtime.settings)
    if keys and store is not None:
        try:
            await anyio.to_thread.run_sync(store.delete, keys)
        except OSError:
            log.exception("could not delete %d orphaned result file(s)", len(keys))


# --- reading results back --------------------------------------------------------------------


async def inline_stored(
    runtime: Runtime, result_ref: str | None, body: dict[str, Any]
) -> dict[str, Any]:
    """GET /jobs/{id}: put a stored result (``result_ref``, the job's) into the job's
    body, as if it were inline."""
    if not body.get("result_stored") or result_ref is None:
        return body
    store = store_of(runtime.settings)
    if store is None:
        raise errors.ServiceUnavailable(
            "the result is in a result store this service is not configured with "
            "(CELERIAC_RESULT_STORE)"
        )
    try:
        data = await anyio.to_thread.run_sync(store.read, result_ref)
    except FileNotFoundError:  # deleted by the cleanup since the row was read
        return body | {"result": None, "result_stored": False, "result_expired": True}
    return body | {"result": json.loads(data)}


@dataclass(frozen=True, slots=True)
class ResultStream:
    """A result to send: inline bytes, or chunks of a stored file of ``size`` bytes."""

    size: int
    data: bytes | None = None
    chunks: AsyncIterator[bytes] | None = None


async def open_result(runtime: Runtime, row: JobRow) -> ResultStream:
    """GET /jobs/{id}/result: the result's JSON, streamed from the store if it is there."""
    fields = result_fields(values_of(row))
    if fields["result_expired"]:
        expired_at = iso(row.result_expires_at) or "an earlier cleanup"
        raise errors.ResultExpired(
            f"the result of job {row.id} expired ({expired_at}) and was deleted; the job "
            f"stays {row.status}. Keep results longer with result_ttl when submitting."
        )
    if row.status != JobStatus.succeeded:
        hint = "see its error" if row.status == JobStatus.failed else "only a succeeded job has one"
        if row.status not in (JobStatus.failed, JobStatus.cancelled, JobStatus.expired):
            hint = "wait for it with GET /jobs/{id}?wait=60"
        raise errors.NoResult(f"job {row.id} is {row.status}: it has no result ({hint})")
    if row.result_ref is None:
        data = json.dumps(row.result, separators=(",", ":"), ensure_ascii=False).encode()
        return ResultStream(len(data), data=data)
    store = store_of(runtime.settings)
    if store is None:
        raise errors.ServiceUnavailable(
            "the result store (CELERIAC_RESULT_STORE) is not configured"
        )
    try:
        handle, size = await anyio.to_thread.run_sync(store.open, row.result_ref)
    except FileNotFoundError:
        raise errors.ResultExpired(f"the result of job {row.id} expired and was deleted") from None
    return ResultStream(size, chunks=_chunks(handle))


async def _chunks(handle: BinaryIO) -> AsyncIterator[bytes]:
    try:
        while chunk := await anyio.to_thread.run_sync(handle.read, CHUNK):
            yield chunk
    finally:
        handle.close()


# --- expiry ------------------------------------------------------------------------------------


def expire_batch(session: Session, now: datetime, limit: int) -> tuple[int, list[str]]:
    """Delete up to ``limit`` expired results from their rows; returns how many, and the
    store keys to delete once this commits. SKIP LOCKED: replicas share the work, and a
    small batch holds its row locks only briefly."""
    rows = session.execute(
        sa.select(jobs_c.id, jobs_c.result_ref)
        .where(jobs_c.result_expires_at <= now)
        .order_by(jobs_c.result_expires_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    ).all()
    if rows:
        session.execute(
            sa.update(JOBS_TABLE)
            .where(jobs_c.id.in_([r.id for r in rows]))
            .values(result=None, result_ref=None, result_expires_at=None, result_expired=True)
        )
    return len(rows), [r.result_ref for r in rows if r.result_ref is not None]


def next_expiry(session: Session) -> datetime | None:
    value: datetime | None = session.scalar(sa.select(sa.func.min(jobs_c.result_expires_at)))
    return value


class ResultCleaner(Plugin):
    name = "results"

    def __init__(self, runtime: Runtime) -> None:
        settings = runtime.settings
        self.store = store_of(settings)  # a bad CELERIAC_RESULT_STORE fails start-up
        self.interval = settings.result_cleanup_interval_seconds
        self.batch = settings.result_cleanup_batch

    async def run_once(self, runtime: Runtime) -> Pass:
        if await self.sweep(runtime) >= self.batch:
            return Pass(more=True)  # more are due: next batch, a new transaction
        return Pass(due=await runtime.db.read(next_expiry))

    async def sweep(self, runtime: Runtime) -> int:
        now = runtime.clock.now()
        cleaned, keys = await runtime.db.run(lambda session: expire_batch(session, now, self.batch))
        if keys and self.store is not None:
            await anyio.to_thread.run_sync(self.store.delete, keys)
        return cleaned

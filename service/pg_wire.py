"""Statements sent straight through libpq from the event loop (issue 14): psycopg's
connection, its binding of libpq (``psycopg.pq``) and its adapters (``Transformer``),
without its cursor.

psycopg's async cursor wraps every statement in layers of Python: a lock, waits driven
through generators, the query's placeholders converted and looked up, a prepare manager
counting uses, a cursor object and its result bookkeeping. On this project's 2-core
machine that was about 30 µs of the event loop's CPU per statement (docs/benchmarks.md,
issue 14, thirteenth pass), on the statements every round trip runs (the submit's
insert, the claim, the settle, the waiter's read). Those statements are few and fixed,
so the work that does not depend on a call is done once here, and per call only what
does: dump the parameters, send, wait for the socket, load the rows.

Contract:

- ``WireConnection(conn)`` takes over an open ``AsyncConnection`` in autocommit; nothing
  else may run statements on it afterwards (psycopg's own waits would also take over the
  watch on its socket). Opening it stays psycopg's; ``close()`` stops watching the socket
  and closes it.
- ``run(statements)``: each statement an SQL text with ``$n`` placeholders and its
  parameters as Python values (dumped as psycopg dumps them). They go out in one
  pipeline whose one ``Sync`` ends one implicit transaction: all of them commit, or none.
  Each distinct statement is prepared on the connection the first time it is sent (the
  ``Parse`` rides the same pipeline) and executed by name after (past ``MAX_PREPARED``
  statements, as the unnamed statement, parsed each time). Returns one ``Answer``
  per statement: its rows as tuples, loaded by psycopg's loaders, and its row count.
- Failures are psycopg's own exceptions: a statement the server refused raises the
  ``psycopg.errors`` class of its SQLSTATE, a lost connection ``OperationalError``. A
  ``run`` cancelled while its statements still run asks the server to cancel them (as
  psycopg's cursor does). After any failure or cancellation the connection's state is
  unknown: the caller closes it (``DirectPg`` and ``SubmitPipeline`` do)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import pq
from psycopg.adapt import PyFormat, Transformer
from psycopg.errors import error_from_result

log = logging.getLogger("celeriac.db")

CANCEL_TIMEOUT_SECONDS = 5.0
# Statements kept prepared per connection. The hot statements are a few dozen shapes
# (and a shape per pattern of NULL parameters); past this, the unnamed statement.
MAX_PREPARED = 256
_OK = (pq.ExecStatus.TUPLES_OK, pq.ExecStatus.COMMAND_OK)
_SYNC = pq.ExecStatus.PIPELINE_SYNC

# One statement: its SQL (``$n`` placeholders) and its parameters in that order.
Statement = tuple[bytes, Sequence[Any]]


@dataclass(frozen=True, slots=True)
class Answer:
    rows: list[tuple[Any, ...]]
    rowcount: int  # rows inserted, updated, deleted or returned
    result: pq.abc.PGresult

    def types(self) -> tuple[int, ...]:
        """Each returned column's type (an OID): read when asked, as a caller needs them
        once per statement, not once per answer."""
        return tuple(self.result.ftype(i) for i in range(self.result.nfields))


class WireConnection:
    """One connection's statements through libpq; see the module's docstring."""

    __slots__ = (
        "_encoding", "_fd", "_formats", "_pg", "_prepared", "_tx", "_waiter", "_watching",
        "conn",
    )  # fmt: skip

    def __init__(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self.conn = conn
        self._pg = conn.pgconn
        self._pg.nonblocking = 1
        self._fd = self._pg.socket
        self._tx = Transformer(conn)
        self._encoding = conn.info.encoding
        # A name per statement and parameter types: a NULL's type may differ from a
        # value's, and a prepared statement keeps the types it was prepared with.
        self._prepared: dict[tuple[bytes, tuple[int, ...]], bytes] = {}
        self._formats: dict[int, list[PyFormat]] = {}
        # The loop that watches the socket for reading between waits (see ``_readable``),
        # and the future a statement's wait for its results is parked on.
        self._watching: asyncio.AbstractEventLoop | None = None
        self._waiter: asyncio.Future[None] | None = None

    async def run(self, statements: Sequence[Statement]) -> list[Answer]:
        pg = self._pg
        newly: list[bytes | None] = []  # per statement: the name its own Parse prepares
        pg.enter_pipeline_mode()
        for sql, params in statements:
            newly.append(self._send(sql, params))
        pg.pipeline_sync()
        try:
            await self._flush()
            results = await self._results(len(statements) + sum(n is not None for n in newly))
        except BaseException:
            await self._cancel_in_server()
            raise
        pg.exit_pipeline_mode()
        answers: list[Answer] = []
        position = 0
        for name in newly:
            position += name is not None  # a Parse's result comes just before its statement's
            answers.append(self._answer(results[position]))
            position += 1
        return answers

    def _send(self, sql: bytes, params: Sequence[Any]) -> bytes | None:
        """Sends the statement (and its Parse the first time): the name it prepared."""
        tx = self._tx
        formats = self._formats.get(len(params))
        if formats is None:
            formats = self._formats[len(params)] = [PyFormat.AUTO] * len(params)
        values = tx.dump_sequence(params, formats)
        types = tuple(tx.types or ())
        key = (sql, types)
        name = self._prepared.get(key)
        parsed = None
        if name is None:
            if len(self._prepared) < MAX_PREPARED:
                name = self._prepared[key] = b"_celeriac_%d" % len(self._prepared)
            else:  # the unnamed statement, parsed anew each time: the server's memory bounded
                name = b""
            self._pg.send_prepare(name, sql, param_types=types)
            parsed = name
        self._pg.send_query_prepared(name, values, param_formats=tx.formats)
        return parsed

    async def _cancel_in_server(self) -> None:
        """Cancelled (its request went away) while a statement still runs, perhaps
        waiting on a lock: the server is told to cancel it, as psycopg's cursor does.
        Closing the connection alone would not stop it, and it would commit later."""
        if self._pg.transaction_status != pq.TransactionStatus.ACTIVE:
            return
        try:
            await self.conn.cancel_safe(timeout=CANCEL_TIMEOUT_SECONDS)
        except Exception as exc:
            log.warning("cancelling a statement in the server failed: %s", exc)

    async def _flush(self) -> None:
        """Sends what libpq holds (a big group's rows may not fit the socket at once)."""
        while self._pg.flush():
            await self._writable()

    async def _results(self, expected: int) -> list[pq.abc.PGresult]:
        """Each statement's last result, in order, up to the pipeline's ``Sync``; the
        first refusal raised (those after it were aborted)."""
        pg = self._pg
        results: list[pq.abc.PGresult] = []
        last: pq.abc.PGresult | None = None
        while True:
            pg.consume_input()
            while not pg.is_busy():
                result = pg.get_result()
                if result is None:  # the end of one statement's results
                    if last is not None:
                        results.append(last)
                        last = None
                    continue
                if result.status == _SYNC:
                    return self._checked(results, expected)
                last = result
            await self._readable()

    def _checked(self, results: list[pq.abc.PGresult], expected: int) -> list[pq.abc.PGresult]:
        for result in results:
            if result.status not in _OK:
                raise error_from_result(result, encoding=self._encoding)
        if len(results) != expected:  # cannot happen without a refusal above
            raise psycopg.InternalError(f"{len(results)} results for {expected} statements")
        return results

    async def _readable(self) -> None:
        """Until the socket has something to read. The socket stays watched from one wait
        to the next: adding a reader and removing it again around each wait cost about
        11 µs of the loop's CPU per statement on uvloop (eight system calls: libuv checks
        the descriptor, sets it non-blocking, registers it and unregisters it; issue 14,
        docs/benchmarks.md). Readable with nobody waiting (the server closed the idle
        connection, or sent it a notice), it stops being watched until the next wait, so
        an idle connection never keeps the loop busy."""
        loop = asyncio.get_running_loop()
        if self._watching is not loop:
            self._unwatch()
            loop.add_reader(self._fd, self._on_readable)
            self._watching = loop
        waiter = self._waiter = loop.create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    def _on_readable(self) -> None:
        waiter = self._waiter
        if waiter is None:
            self._unwatch()
        elif not waiter.done():
            waiter.set_result(None)

    def _unwatch(self) -> None:
        loop, self._watching = self._watching, None
        if loop is not None and not loop.is_closed():
            loop.remove_reader(self._fd)

    async def close(self) -> None:
        """Stops watching the socket, then closes the connection (psycopg's ``close``)."""
        self._unwatch()
        await self.conn.close()

    async def _writable(self) -> None:
        """Until the socket takes more (rare: a big group's rows), watched for this wait only."""
        loop = asyncio.get_running_loop()
        ready = loop.create_future()
        loop.add_writer(self._fd, _resolve, ready)
        try:
            await ready
        finally:
            loop.remove_writer(self._fd)

    def _answer(self, result: pq.abc.PGresult) -> Answer:
        count = result.ntuples
        if result.nfields == 0:
            return Answer([], result.command_tuples or 0, result)
        tx = self._tx
        tx.set_pgresult(result)
        return Answer(tx.load_rows(0, count, tuple), count, result)


def _resolve(ready: asyncio.Future[None]) -> None:
    if not ready.done():
        ready.set_result(None)

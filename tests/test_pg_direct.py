"""The hot paths' single statements on PostgreSQL, run from the event loop
(service/pg_direct.py): the claims, the mirror of Redis workers' leases, and the settle
of a success (a job read and a queue's claim: tests/test_loop_direct.py, SQLite's too). In
process, on a real migrated PostgreSQL database, each against the pool's path it stands
in for: the same values read, the same rows written, and what the direct path leaves (a
stale token, a job with a webhook) still answered by the pool's path as before."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import psycopg
import pytest
import sqlalchemy as sa
from conftest import migrated_database, selected_databases
from sqlalchemy.orm import Session
from support.plans import plan_nodes

from service import flow, reports, waiting
from service.brokers.sql import SqlBroker
from service.db import Database
from service.effects import Effects
from service.jobs import Defaults, insert_jobs, new_job
from service.leases import (
    ENDED_COLUMNS,
    Lease,
    LeaseTerms,
    Settle,
    _grant_ids_statement,
    _pick_by_ids,
    claim_by_ids,
    claim_ids_direct,
    claim_params,
    grant,
    grant_mirrored_direct,
    grant_mirrored_step,
    mirrored,
    settle,
    settle_succeeded_direct,
)
from service.models import JOBS_TABLE, JobValues, LimitRow
from service.pg_direct import (
    APPLICATION_NAME,
    Compiled,
    Refused,
    connect_args,
    connect_wire,
    wire_dialect,
)
from service.results import live_leases
from service.runtime import Clock, Runtime
from service.schemas import JobSubmit
from service.settings import Settings
from service.signals import Signals
from service.states import JobStatus, LeaseProblem, Outcome

pytestmark = pytest.mark.skipif(
    "postgres" not in selected_databases(), reason="the direct path is PostgreSQL's"
)
# Values whose stored form the two paths could write differently: key order, an integer
# beyond 64 bits, JSON null against SQL NULL, a fractional result TTL.
KWARGS = {"b": 1, "a": [None, 1.5, "x", {"z": 2**70}]}
RESULT = {"zeta": [1, None], "alpha": 2**66, "text": "é\u2028"}


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    with migrated_database("postgres", tmp_path) as database:
        yield database


def runtime_of(db: Database, expect_flow: bool = False) -> Runtime:
    signals = Signals()
    runtime = Runtime(Settings(), db, signals, SqlBroker(db, signals, fallback_seconds=1.0))
    assert runtime.direct is not None, "PostgreSQL through psycopg takes the direct path"
    db.run_sync(flow.snapshot)  # what is configured, as a claim would read it
    assert flow.active(db.engine) == expect_flow
    return runtime


def jobs_in(db: Database, n: int, queue: str = "q_direct", **spec: Any) -> list[JobValues]:
    now = Clock().now()
    submit = JobSubmit(task="tests.direct", queue=queue, kwargs=KWARGS, args=[None], **spec)
    rows = [new_job(submit, now, Defaults(max_retries=1, result_ttl=12.5)) for _ in range(n)]
    db.run_sync(lambda session: insert_jobs(session, rows))
    return rows


def stored(db: Database, job_id: str) -> dict[str, Any]:
    query = sa.select(JOBS_TABLE).where(JOBS_TABLE.c.id == job_id)
    return db.run_sync(lambda session: dict(session.execute(query).mappings().one()))


def terms(token: str = "tok") -> LeaseTerms:
    return LeaseTerms(worker="w1", token=token, now=Clock().now(), lease_seconds=None,
                      default_seconds=30.0, key_id="k1")  # fmt: skip


def without(row: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k not in keys}


def test_claims_grant_as_the_pool_does(db: Database) -> None:
    first, second = jobs_in(db, 2)
    runtime = runtime_of(db)
    granted = terms()
    assert runtime.direct is not None
    direct = asyncio.run(claim_ids_direct(runtime.direct, [first["id"], "nope"], granted))
    pooled = db.run_sync(lambda session: claim_by_ids(session, [second["id"]], granted))
    assert [without(r, "id") for r in direct] == [without(r, "id") for r in pooled]
    assert without(stored(db, first["id"]), "id") == without(stored(db, second["id"]), "id")
    # Granted once: neither path grants a running job again.
    again = asyncio.run(claim_ids_direct(runtime.direct, [first["id"], second["id"]], terms()))
    assert again == []


def test_a_mirrored_lease_grants_as_grant_does(db: Database) -> None:
    """The Redis protocol's leases, as its event ingest writes them on PostgreSQL."""
    first, second = jobs_in(db, 2)
    runtime = runtime_of(db)
    assert runtime.direct is not None
    now = Clock().now()
    lease = Lease("tok", "redis-worker", "", now + timedelta(seconds=7.5), now)
    later = Lease("other", "redis-worker", "", now + timedelta(seconds=60), now)

    async def mirror(*rows: dict[str, Any]) -> None:
        assert runtime.direct is not None
        try:
            await grant_mirrored_direct(runtime.direct, rows)
        finally:
            await runtime.close()

    asyncio.run(mirror(mirrored(first["id"], lease)))
    db.run_sync(lambda session: grant(session, [second["id"]], lease))
    first_row = stored(db, first["id"])
    assert without(first_row, "id") == without(stored(db, second["id"]), "id")
    assert first_row["status"] == JobStatus.running and first_row["attempt"] == 1
    assert first_row["lease_expires_at"] == now + timedelta(seconds=7.5)
    # As grant: a job no longer queued is left alone (a replayed or late event).
    asyncio.run(mirror(mirrored(first["id"], later), mirrored("not-a-job", later)))
    assert stored(db, first["id"]) == first_row


def test_a_lease_and_its_report_are_one_transaction(db: Database) -> None:
    """The Redis protocol's lease ahead of its report in the settle's transaction
    (``first``): both land with one commit, and a refusal of either leaves neither (the
    events then go through the pool, which applies them as it always did)."""
    job, poisoned = jobs_in(db, 2)
    runtime = runtime_of(db)
    direct = runtime.direct
    assert direct is not None
    db.run_sync(lambda session: session.execute(sa.text(
        f"ALTER TABLE jobs ADD CONSTRAINT poison CHECK (id <> '{poisoned['id']}'"
        " OR status <> 'succeeded')"
    )))  # fmt: skip
    now = Clock().now()
    lease = Lease("tok", "redis-worker", "", now + timedelta(seconds=30), now)

    async def lease_and_settle(job_id: str) -> dict[str, JobValues]:
        assert direct is not None
        step = grant_mirrored_step(direct, [mirrored(job_id, lease)])
        report = Settle(job_id, "tok", Outcome.succeeded, result=RESULT)
        return await settle_succeeded_direct(
            direct, [report], now, Effects(), key_id="", waited=lambda _: False, first=[step]
        )

    async def both() -> tuple[dict[str, JobValues], BaseException | None]:
        try:
            settled = await lease_and_settle(job["id"])
            refused = await asyncio.gather(lease_and_settle(poisoned["id"]), return_exceptions=True)
            return settled, cast(BaseException | None, refused[0])
        finally:
            await runtime.close()

    settled, refused = asyncio.run(both())
    assert list(settled) == [job["id"]]
    row = stored(db, job["id"])
    assert (row["status"], row["attempt"], row["lease_worker"]) == ("succeeded", 1, "redis-worker")
    assert isinstance(refused, Refused), refused
    untouched = stored(db, poisoned["id"])
    assert (untouched["status"], untouched["attempt"]) == (JobStatus.queued, 0), untouched


def test_a_process_that_claims_nothing_through_sql_still_learns_flow_control(
    db: Database,
) -> None:
    """``flow.active_now``: the Redis protocol's ingest claims nothing through SQL, where
    the flow-control state is otherwise read: it looks itself, as often as the paused
    view (a limit another replica made is seen within ``PAUSED_VIEW_SECONDS``)."""
    runtime = runtime_of(db)
    flow.state_of(db.engine).active = True  # a fresh process: assume so until read

    async def look() -> list[bool]:
        seen = [await flow.active_now(runtime)]
        now = Clock().now()
        made = LimitRow(name="elsewhere", max_running=1, created_at=now, updated_at=now)
        db.run_sync(lambda session: session.add(made))
        seen.append(await flow.active_now(runtime))  # within the interval: as last read
        flow.paused_view(runtime).read_at -= flow.PAUSED_VIEW_SECONDS  # the interval ends
        seen.append(await flow.active_now(runtime))
        await runtime.close()
        return seen

    assert asyncio.run(look()) == [False, False, True]


def _lease_both(db: Database, **spec: Any) -> tuple[JobValues, JobValues, LeaseTerms]:
    first, second = jobs_in(db, 2, **spec)
    granted = terms()
    db.run_sync(lambda session: claim_by_ids(session, [first["id"], second["id"]], granted))
    return first, second, granted


def test_a_success_settles_as_settle_writes_it(db: Database) -> None:
    first, second, granted = _lease_both(db)
    runtime = runtime_of(db)
    assert runtime.direct is not None
    now = Clock().now()
    effects = Effects()
    report = Settle(first["id"], granted.token, Outcome.succeeded, result=RESULT)
    settled = asyncio.run(
        settle_succeeded_direct(
            runtime.direct, [report], now, effects, key_id="k1", waited=lambda _: True
        )
    )
    pooled_effects = Effects()
    other = Settle(second["id"], granted.token, Outcome.succeeded, result=RESULT)
    db.run_sync(lambda session: settle(session, [other], now, pooled_effects, key_id="k1"))
    first_row, second_row = stored(db, first["id"]), stored(db, second["id"])
    assert without(first_row, "id") == without(second_row, "id")
    assert first_row["status"] == JobStatus.succeeded
    assert first_row["result_expires_at"] == now + timedelta(seconds=12.5)
    assert list(first_row["result"]) == ["zeta", "alpha", "text"]
    assert settled[first["id"]] == first_row
    assert effects.finished == [first["id"]] and effects.settled == settled
    [ended], [pooled_ended] = effects.ended, pooled_effects.ended
    assert without(asdict(ended), "id") == without(asdict(pooled_ended), "id")


def test_what_the_direct_settle_leaves_is_settled_as_before(db: Database) -> None:
    """A stale token, a foreign key and a job with a webhook are not the direct path's:
    through ``settle_many`` they are answered (409) and settled (the outbox row) as
    they always were, and a batch's other successes still settle."""
    plain, hooked, granted = _lease_both(db)
    db.run_sync(
        lambda session: session.execute(
            sa.update(JOBS_TABLE)
            .where(JOBS_TABLE.c.id == hooked["id"])
            .values(webhook={"url": "https://example.com/hook", "events": ["succeeded"]})
        )
    )
    runtime = runtime_of(db)
    batch = [
        Settle(plain["id"], "stale", Outcome.succeeded, result=1),
        Settle(hooked["id"], granted.token, Outcome.succeeded, result=2),
    ]

    async def run(items: list[Settle], key_id: str) -> list[Any]:
        try:
            return await reports.settle_many(runtime, items, key_id)
        finally:
            await runtime.close()

    outcomes = asyncio.run(run(batch, "k1"))
    assert [o.problem for o in outcomes] == [LeaseProblem.stale, None]
    assert stored(db, plain["id"])["status"] == JobStatus.running
    assert stored(db, hooked["id"])["status"] == JobStatus.succeeded
    outbox = db.run_sync(
        lambda session: session.execute(
            sa.text("SELECT count(*) FROM webhook_deliveries WHERE job_id = :id"),
            {"id": hooked["id"]},
        ).scalar_one()
    )
    assert outbox == 1
    foreign = asyncio.run(run([Settle(plain["id"], granted.token, Outcome.succeeded)], "k2"))
    assert [o.problem for o in foreign] == [LeaseProblem.stale]
    right = asyncio.run(run([Settle(plain["id"], granted.token, Outcome.succeeded)], "k1"))
    assert [(o.problem, o.status) for o in right] == [(None, JobStatus.succeeded)]


def test_a_connection_the_server_closed_is_replaced(db: Database) -> None:
    [job] = jobs_in(db, 1)
    runtime = runtime_of(db)

    async def read_twice() -> JobValues:
        try:
            await waiting.read_values(runtime, job["id"])
            terminated = db.run_sync(
                lambda session: session.execute(
                    sa.text(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                        "WHERE application_name = :name AND datname = current_database()"
                    ),
                    {"name": APPLICATION_NAME},
                ).scalar_one()
            )
            assert terminated == 1
            await asyncio.sleep(0.2)  # the server's close reaches the socket
            return await waiting.read_values(runtime, job["id"])
        finally:
            await runtime.close()

    assert asyncio.run(read_twice())["id"] == job["id"]


def test_a_cancelled_statement_does_not_return_its_connection(db: Database) -> None:
    """A claim waiting on a row lock is cancelled (its request went away): the
    connection, mid-statement, is closed rather than handed to the next statement."""
    [job] = jobs_in(db, 1)
    runtime = runtime_of(db)
    assert runtime.direct is not None
    url = db.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)

    async def cancelled() -> None:
        assert runtime.direct is not None
        with psycopg.connect(url) as holder:
            holder.execute("SELECT 1 FROM jobs WHERE id = %s FOR UPDATE", (job["id"],))
            claim = asyncio.ensure_future(claim_ids_direct(runtime.direct, [job["id"]], terms()))
            await asyncio.sleep(0.3)  # waiting on the lock
            assert not claim.done()
            claim.cancel()
            with pytest.raises(asyncio.CancelledError):
                await claim
            holder.rollback()
        assert runtime.direct._idle == []
        # The next statement takes a fresh connection, and the job is still grantable.
        rows = await claim_ids_direct(runtime.direct, [job["id"]], terms("tok2"))
        assert [r["lease_token"] for r in rows] == ["tok2"]
        await runtime.close()

    asyncio.run(cancelled())


def test_a_batch_settle_returns_what_its_effects_need(db: Database) -> None:
    """Not waited on here: the statement returns ``ENDED_COLUMNS`` only, and the
    effects (metrics, logs) are those of a whole row."""
    first, second, granted = _lease_both(db)
    runtime = runtime_of(db)
    assert runtime.direct is not None
    now = Clock().now()
    narrow, whole = Effects(), Effects()
    for job, effects, waited in ((first, narrow, False), (second, whole, True)):
        report = Settle(job["id"], granted.token, Outcome.succeeded, result=RESULT)
        settled = asyncio.run(
            settle_succeeded_direct(
                runtime.direct, [report], now, effects, key_id="k1", waited=lambda _, w=waited: w
            )
        )
        assert set(settled[job["id"]]) == (
            set(JOBS_TABLE.c.keys()) if waited else set(ENDED_COLUMNS)
        )
    assert without(asdict(narrow.ended[0]), "id") == without(asdict(whole.ended[0]), "id")
    assert narrow.settled == {} and list(whole.settled) == [second["id"]]


def test_a_waiter_that_comes_during_the_settle_is_not_handed_a_narrow_row(db: Database) -> None:
    """A ``?wait=`` that registers while the statement runs (after it chose to return
    ``ENDED_COLUMNS`` only) is woken without a row, and reads the job: handed the narrow
    row, it answered a 500 (seen once, a Redis worker's success applied by the ingest)."""
    job, _, granted = _lease_both(db)
    runtime = runtime_of(db)
    assert runtime.direct is not None
    asked: list[str] = []

    def waited(job_id: str) -> bool:  # no one waits when asked first; someone does after
        asked.append(job_id)
        return len(asked) > 1

    effects = Effects()
    report = Settle(job["id"], granted.token, Outcome.succeeded, result=RESULT)
    settled = asyncio.run(
        settle_succeeded_direct(runtime.direct, [report], Clock().now(), effects, key_id="k1",
                                waited=waited)
    )  # fmt: skip
    assert set(settled[job["id"]]) == set(ENDED_COLUMNS)
    assert effects.finished == [job["id"]] and effects.settled == {}


def test_under_flow_control_a_limited_job_is_granted_by_flow_control_and_settled_directly(
    db: Database,
) -> None:
    """With a limit configured, the plain direct claim grants a job that names no limits
    and leaves one that does; the dispatcher's flow-control claim grants that one (it
    counts its key: tests/test_flow_direct.py), and both settle in the direct statement,
    which frees the limited one's slot: its key has room again, and the job it held back
    is announced once more."""
    now = Clock().now()
    db.run_sync(
        lambda session: session.add(
            LimitRow(name="fl-*", max_running=1, created_at=now, updated_at=now)
        )
    )
    [plain] = jobs_in(db, 1)
    limited, waiting_ = jobs_in(db, 2, limits=["fl-1"])
    runtime = runtime_of(db, expect_flow=True)
    assert runtime.direct is not None
    state = flow.state_of(db.engine)
    state.reoffers = True  # as under a broker with an index, which drops what it hands back
    limited_queues = flow.limited_queues(db.engine)
    assert limited_queues == frozenset()
    ids = [limited["id"], plain["id"]]
    granted = asyncio.run(claim_ids_direct(runtime.direct, ids, terms(), limited_queues))
    assert [r["id"] for r in granted] == [plain["id"]]

    async def dispatch_and_settle() -> dict[str, JobValues]:
        try:
            rows = await runtime.dispatcher._claim_ids([limited["id"], waiting_["id"]], terms)
            assert [r["id"] for r in rows] == [limited["id"]]  # fl-1 has one slot
            held = db.run_sync(lambda session: flow.running_counts(session, ["fl-1"]))
            assert held == {"fl-1": 1}
            assert "fl-1" in state.full and "fl-1" in state.held
            reports_ = [
                Settle(job_id, "tok", Outcome.succeeded, result=1)
                for job_id in (plain["id"], limited["id"])
            ]
            return await reports._settle_direct(runtime, reports_, Clock().now(), "k1")
        finally:
            await runtime.close()

    settled = asyncio.run(dispatch_and_settle())
    assert sorted(settled) == sorted([plain["id"], limited["id"]])
    assert {stored(db, i)["status"] for i in settled} == {JobStatus.succeeded}
    # Its slot was held from the grant until its settle.
    assert db.run_sync(lambda session: flow.running_counts(session, ["fl-1"])) == {}
    assert "fl-1" not in state.full

    # What the key held back is announced again after the settle, read after its commit.
    state.held["fl-1"] = time.monotonic()
    effects = Effects()
    asyncio.run(flow.freed_after_commit(db, [settled[limited["id"]]], effects))
    assert [(d.id, d.reoffer) for d in effects.dispatch] == [(waiting_["id"], True)]


def _generic_plan_indexes(db: Database, sql: str, params: Sequence[Any]) -> set[str]:
    """The indexes PostgreSQL's generic plan of ``sql`` reads: the plan it runs a prepared
    statement with, made without the parameters' values."""
    url = db.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SET plan_cache_mode = force_generic_plan")
        conn.execute(f"PREPARE probe AS {sql}")
        cursor = psycopg.ClientCursor(conn)  # the values as literals in EXECUTE's list
        marks = ", ".join(["%s"] * len(params))
        cursor.execute(f"EXPLAIN (FORMAT JSON) EXECUTE probe({marks})", params)
        (plan,) = cast(tuple[Any], cursor.fetchone())
    return {node["Index Name"] for node in plan_nodes(plan[0]["Plan"]) if "Index Name" in node}


@pytest.mark.parametrize("plain", [False, True])
def test_a_claim_of_ids_reads_only_those_ids_with_a_generic_plan(db: Database, plain: bool) -> None:
    """A backlog in one queue, a table never analyzed (autovacuum off): PostgreSQL's
    generic plan of a claim by ids, which the direct path and psycopg's prepared
    statements run, finds the jobs by their primary key. With ``status = $9`` as an index
    condition it took the status index and read every queued job, per claim."""
    jobs_in(db, 3000, queue="backlog")
    [job] = jobs_in(db, 1)
    values = claim_params(terms()) | {"ids": [job["id"]]}
    if plain:
        values["limited_queues"] = ["elsewhere"]
    dialect = wire_dialect(db.engine.dialect)
    direct = Compiled(_grant_ids_statement(own_deadlines=False, plain=plain), dialect)
    assert _generic_plan_indexes(db, direct.sql, direct.positional_params(values)) == {"pk_jobs"}
    # The pool's path (and flow control's) locks them first, by the same condition.
    pooled = cast(sa.sql.compiler.SQLCompiler, _pick_by_ids().compile(dialect=dialect))
    state = pooled.construct_expanded_state(pooled.construct_params(values))
    binds = state.processors
    params = [
        binds[n](state.parameters[n]) if n in binds else state.parameters[n]
        for n in state.positiontup or ()
    ]
    assert _generic_plan_indexes(db, state.statement, params) == {"pk_jobs"}


def _executed(db: Database, work: Callable[[Session], object]) -> list[tuple[str, list[Any]]]:
    """The statements ``work`` sends through the pool, as PostgreSQL would prepare them:
    ``$n`` placeholders (a name used twice is one parameter) and their values in order."""
    sent: list[tuple[str, list[Any]]] = []

    def capture(_conn: Any, _cursor: Any, sql: str, params: Any, *_: Any) -> None:
        names: list[str] = []

        def number(match: re.Match[str]) -> str:
            if match.group(1) not in names:
                names.append(match.group(1))
            return f"${names.index(match.group(1)) + 1}"

        text = re.sub(r"%\((\w+)\)s", number, sql).replace("%%", "%")
        sent.append((text, [params[name] for name in names]))

    sa.event.listen(db.engine, "before_cursor_execute", capture)
    try:
        db.run_sync(work)
    finally:
        sa.event.remove(db.engine, "before_cursor_execute", capture)
    return sent


def test_the_pools_lookups_by_id_read_only_those_ids_with_a_generic_plan(db: Database) -> None:
    """The pool's statements that find jobs by their ids and check a status (the grant
    of a flow-control claim and of the Redis workers' mirrored leases, the check of live
    leases, the mirror of limit slots) are prepared by psycopg after five runs, so they
    too run a generic plan. With a backlog and no statistics, ``status = $n`` took the
    status index: the flow claim's grant read all 20,000 queued jobs of a keyed drain per
    grant (docs/benchmarks.md, issue 14, fourteenth pass)."""
    jobs_in(db, 3000, queue="backlog")
    [job] = jobs_in(db, 1)
    now = Clock().now()
    db.run_sync(
        lambda session: session.add(LimitRow(name="fl-*", max_running=1, created_at=now,
                                             updated_at=now))
    )  # fmt: skip
    db.run_sync(flow.snapshot)  # configured: the mirror of limit slots reads the jobs
    lease = Lease("tok", "w1", "k1", now + timedelta(seconds=30), now)
    lookups = {
        "grant": lambda session: grant(session, [job["id"]], lease),
        "live leases": lambda session: live_leases(session, [(job["id"], "tok")]),
        "mirrored slots": lambda session: flow.record_mirrored(session, [job["id"]], "tok", now),
    }
    for name, work in lookups.items():
        [(sql, params)] = [
            s for s in _executed(db, work) if "FROM jobs" in s[0] or "UPDATE jobs" in s[0]
        ]
        assert _generic_plan_indexes(db, sql, params) == {"pk_jobs"}, name


def test_a_plan_made_on_a_small_table_still_uses_an_index_after_a_backlog(db: Database) -> None:
    """PostgreSQL keeps a prepared statement's generic plan until the table's statistics
    change. Made while ``jobs`` was nearly empty it was a sequential scan, which read a
    whole backlog per claim once there was one (never analyzed: autovacuum off). The hot
    statements' connections (``connect_wire``) do not scan the table."""
    dialect = wire_dialect(db.engine.dialect)
    claim = Compiled(_grant_ids_statement(own_deadlines=False, plain=False), dialect)

    def values() -> tuple[Any, ...]:
        [job] = jobs_in(db, 1)
        return claim.positional_params(claim_params(terms()) | {"ids": [job["id"]]})

    async def generic_plan() -> dict[str, Any]:
        wire = await connect_wire(connect_args(db.engine, "celeriac-test"))
        try:
            for _ in range(8):  # past the five runs after which PostgreSQL settles on a plan
                [answer] = await wire.run([(claim.sql_bytes, values())])
                assert answer.rowcount == 1
            jobs_in(db, 3000, queue="backlog")
            params = values()
            cursor = psycopg.AsyncClientCursor(wire.conn)
            marks = ", ".join(["%s"] * len(params))
            await cursor.execute(f"EXPLAIN (FORMAT JSON) EXECUTE _celeriac_0({marks})", params)
            (plan,) = cast(tuple[Any], await cursor.fetchone())
            return cast(dict[str, Any], plan[0]["Plan"])
        finally:
            await wire.conn.close()

    assert "Seq Scan" not in {node["Node Type"] for node in plan_nodes(asyncio.run(generic_plan()))}

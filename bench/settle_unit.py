"""The CPU of one claim and one settle as units of work, in this process (issue 14).

On a fresh SQLite file (or ``--database``, any URL the service takes, migrated here), the
claim of one job (``leases.claim_queue``) and the settle of its success report
(``leases.settle`` with ``keep_settled``, as a report from an HTTP worker goes when it
does not take PostgreSQL's direct path) each in a transaction of its own, through the
same sessions and functions as the service, one job at a time. Prints CPU microseconds
per unit and Python function calls per settle: the part of a round trip that is the
database layer's, without HTTP, a worker or a network. On SQLite, also a claim that
finds nothing, through a session on the event loop and on SQLite's direct path.

    .venv/bin/python bench/settle_unit.py --n 500 --runs 3

Compare two checkouts with ``PYTHONPATH=<checkout>``, alternating."""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import tempfile
import time
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.orm import Session

QUEUE = "settle-unit"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500, help="jobs per run")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--database", default="")
    args = parser.parse_args()

    from service.db import create_engine
    from service.effects import Effects
    from service.jobs import Defaults, insert_jobs, new_job
    from service.leases import LeaseTerms, Settle, claim_queue, keep_settled, new_token, settle
    from service.migrate import upgrade
    from service.schemas import JobSubmit
    from service.states import Outcome

    url = args.database or f"sqlite:///{tempfile.mkdtemp()}/settle_unit.db"
    upgrade(url)
    engine = create_engine(url)
    spec = JobSubmit.model_validate({"task": "bench.noop", "queue": QUEUE, "args": [1]})
    total = args.n * (args.runs + 2)
    rows = [new_job(spec, datetime.now(UTC), Defaults(max_retries=3)) for _ in range(total)]
    with Session(engine) as session, session.begin():
        insert_jobs(session, rows)

    def claim_one() -> dict[str, Any]:
        terms = LeaseTerms("bench", new_token(), datetime.now(UTC), None, 60.0)
        with Session(engine) as session, session.begin():
            [row] = claim_queue(session, QUEUE, 1, terms)
            return dict(row)

    def settle_one(row: dict[str, Any]) -> None:
        effects = Effects()
        report = Settle(row["id"], row["lease_token"], Outcome.succeeded, result="1")
        with Session(engine) as session, session.begin():
            settle(session, [report], datetime.now(UTC), effects)
            keep_settled(session, effects, lambda _job_id: True)  # a waiter on every job

    def timed_claims() -> tuple[list[dict[str, Any]], float]:
        started = time.process_time()
        claimed = [claim_one() for _ in range(args.n)]
        return claimed, (time.process_time() - started) / args.n * 1e6

    # A first run warms SQLAlchemy's caches (and builds what is built once); the second
    # counts the settle's function calls.
    for counted in (False, True):
        claimed, _ = timed_claims()
        profile = cProfile.Profile()
        if counted:
            profile.enable()
        for row in claimed:
            settle_one(row)
        profile.disable()
    stats = pstats.Stats(profile, stream=io.StringIO())
    print(f"function calls per settle: {stats.total_calls / args.n:.0f}")  # type: ignore[attr-defined]
    for run in range(args.runs):
        claimed, claim_us = timed_claims()
        started = time.process_time()
        for row in claimed:
            settle_one(row)
        settle_us = (time.process_time() - started) / args.n * 1e6
        print(f"run {run + 1}: claim {claim_us:6.0f} us CPU, settle {settle_us:6.0f} us CPU")
    if engine.dialect.name == "sqlite":
        empty_claims(engine, args.n)
    engine.dispose()


def empty_claims(engine: Any, n: int) -> None:
    """A claim that finds nothing (what a prefetching worker's next ask mostly does), on
    the event loop as the service runs it on SQLite: a unit of work through a session
    (``Database._on_loop``), and the one statement on SQLite's direct path."""
    import asyncio

    from service.db import Database
    from service.leases import LeaseTerms, claim_queue, claim_queue_direct, new_token
    from service.sqlite_direct import DirectSqlite

    db, direct = Database(engine), DirectSqlite.for_engine(engine)
    assert direct is not None

    def terms() -> LeaseTerms:
        return LeaseTerms("bench", new_token(), datetime.now(UTC), None, 60.0)

    def through_session() -> object:
        return db._on_loop(lambda s: claim_queue(s, "empty", 1, terms()), write=True)

    async def direct_path() -> None:
        assert direct is not None
        for _ in range(n):
            await claim_queue_direct(direct, "empty", 1, terms())

    for label, run in (("session", lambda: [through_session() for _ in range(n)]),
                       ("direct", lambda: asyncio.run(direct_path()))):  # fmt: skip
        run()  # warm
        started = time.process_time()
        run()
        print(f"empty claim, {label}: {(time.process_time() - started) / n * 1e6:6.0f} us CPU")
    asyncio.run(direct.close())
    db.dispose()


if __name__ == "__main__":
    main()

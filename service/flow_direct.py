"""Flow control's claim of a broker's candidates, from the event loop on PostgreSQL.

``flow.claim_by_ids`` through the pool takes a database thread, an ORM session and a round
trip for each of its steps: lock the candidates, lock their keys, count the keys' slots,
(Redis's slots), grant, write the grant rows, commit. Here the same steps, and the same
decision (``flow.admitted``), run in one explicit transaction on a direct connection
(``DirectPg.transaction``), in three round trips:

1. BEGIN, and the candidates still grantable, locked (``FOR UPDATE``);
2. the advisory locks of their limited keys, then, a statement later (so that it counts
   whatever committed before the locks were held), the slots held per key and, for the
   keys with a rate, the grants within each one's window;
3. after Redis's slots (where the service serves Redis workers), the grant, the grant
   rows (and, at most once a second, the pruning of the rows that hold nothing) and the
   COMMIT.

It takes a claim only while this process's snapshot of the rules is fresh, as the plain
direct claim does (``flow.limited_queues``); otherwise it raises ``Refused`` before it
sends anything, and the pool's path reads the rules again. A ``Refused`` from the database
means nothing was committed, and the pool's path takes the claim (slots Redis gave are
given back first). What it does not grant stays queued (``Claimed.blocked``) for the
caller, as the pool's path leaves it."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from service import flow, leases
from service.brokers.redis_link import RedisLink
from service.flow_redis import SlotArbiter, needing_slots, with_answers
from service.models import JOBS_TABLE, LIMIT_GRANTS_TABLE, JobValues, UTCDateTime
from service.pg_direct import DirectPg, DirectTransaction, Refused, Step
from service.states import JobStatus

log = logging.getLogger("celeriac.flow")
# Redis's side of the grant, where the service serves Redis workers (``flow_redis``).
Slots = tuple[SlotArbiter, RedisLink]


@dataclass(frozen=True, slots=True)
class Claimed:
    granted: list[JobValues]  # as the grant returned them
    blocked: list[JobValues]  # left queued: a key without room, or Redis refused a slot


async def claim_by_ids(
    direct: DirectPg, engine: Any, ids: Sequence[str], terms: leases.LeaseTerms, slots: Slots | None
) -> Claimed:
    """``flow.claim_by_ids``'s first look (its fallback to the queues' other jobs,
    ``flow.instead_of_blocked``, is the caller's) for a caller that may use every queue;
    see the module's docstring. It runs to its end even if its caller is cancelled, as a
    claim in a database thread does: cancelled during its COMMIT, it could not tell
    whether to give Redis's slots back. (A grant it committed for a caller that has gone
    is reclaimed at its deadline.)"""
    claim = asyncio.ensure_future(_claim(direct, engine, ids, terms, slots))
    try:
        return await asyncio.shield(claim)
    except asyncio.CancelledError:
        claim.add_done_callback(_log_failure)
        raise


def _log_failure(claim: asyncio.Future[Claimed]) -> None:
    if not claim.cancelled() and claim.exception() is not None:
        log.warning("a claim whose lease was cancelled failed: %s", claim.exception())


async def _claim(
    direct: DirectPg, engine: Any, ids: Sequence[str], terms: leases.LeaseTerms, slots: Slots | None
) -> Claimed:
    state = flow.state_of(engine)
    snap = state.snapshot
    if snap is None or time.monotonic() - snap.read_at >= flow.SNAPSHOT_SECONDS:
        raise Refused("flow control's rules are not known here: the pool's path reads them")
    params = leases.claim_params(terms)
    async with direct.transaction() as tx:
        candidates = direct.compiled("flow candidates", _candidates)
        [found] = await tx.run([(candidates, params | {"ids": list(ids)})])
        by_id = {row["id"]: row for row in cast(list[JobValues], found)}
        rows, rules = flow.unpaused_and_rules(snap, [by_id[i] for i in ids if i in by_id])
        if rules:
            running, window = await _counted(direct, tx, rules, terms.now)
            admission = flow.admitted(state, rows, rules, running, window, None)
        else:
            admission = flow.Admission(rows, [], {})
        limited = needing_slots(admission) if slots is not None else []
        taken: list[JobValues] = []
        if slots is not None and limited:
            answers = await slots[0].take_from_loop(slots[1], limited, terms.token)
            taken = [row for row, answer in zip(limited, answers, strict=True) if answer == ""]
            admission = with_answers(admission, limited, answers)
        try:
            granted = await _grant_and_commit(direct, tx, admission, state, terms, params)
        except BaseException:
            if slots is not None and taken:  # the grant did not commit: Redis's slots go back
                await asyncio.shield(slots[0].undo_from_loop(slots[1], taken, terms.token))
            raise
    return Claimed(granted, admission.blocked)


async def _counted(
    direct: DirectPg, tx: DirectTransaction, rules: dict[str, flow.Rule], now: datetime
) -> tuple[dict[str, int], flow.Window]:
    """Lock the keys (one stable order: no deadlock between claims), then count them."""
    keys = sorted(rules)
    steps: list[Step] = [
        (
            direct.compiled("flow lock keys", _lock_keys),
            {"space": flow.PG_LOCK_SPACE, "keys": keys},
        ),
        (direct.compiled("flow running", _running), {"names": keys}),
    ]
    rated = [(key, rule.rate_period or 0.0) for key, rule in rules.items() if rule.rate_limit]
    if rated:
        cutoffs = [now - timedelta(seconds=period) for _, period in rated]
        names = [key for key, _ in rated]
        steps.append(
            (direct.compiled("flow window", _window), {"names": names, "cutoffs": cutoffs})
        )
    answers = await tx.run(steps)
    running = {row["limit_name"]: row["held"] for row in answers[1]}
    window = (
        {row["limit_name"]: (row["granted"], row["oldest"]) for row in answers[2]} if rated else {}
    )
    return running, window


async def _grant_and_commit(
    direct: DirectPg,
    tx: DirectTransaction,
    admission: flow.Admission,
    state: flow.FlowState,
    terms: leases.LeaseTerms,
    params: dict[str, Any],
) -> list[JobValues]:
    admitted = admission.admitted
    if not admitted:
        return []  # nothing written: the transaction rolls back, and the rows' locks go
    own_deadlines = not terms.lease_seconds
    grant = direct.compiled(
        ("claim ids", own_deadlines, False),
        lambda: leases._grant_ids_statement(own_deadlines, plain=False),
    )
    steps: list[Step] = [(grant, params | {"ids": [row["id"] for row in admitted]})]
    grants = [
        (key, row["id"]) for row in admitted for key in flow.keys_of(row) if key in admission.rules
    ]
    if grants:
        names, jobs = [key for key, _ in grants], [job for _, job in grants]
        values = {"names": names, "jobs": jobs, "token": params["token"], "now": params["now"]}
        steps.append((direct.compiled("flow grant rows", _grant_rows), values))
    if time.monotonic() - state.pruned_at >= flow.PRUNE_SECONDS and state.snapshot is not None:
        state.pruned_at = time.monotonic()
        cutoff = params["now"] - timedelta(seconds=flow.longest_period(state.snapshot))
        steps.append((direct.compiled("flow prune", _prune), {"cutoff": cutoff}))
    [rows, *_] = await tx.commit(steps)
    found = {row["id"]: row for row in cast(list[JobValues], rows)}
    return [found[row["id"]] for row in admitted if row["id"] in found]


# --- the statements, built once per process (``DirectPg.compiled``) ----------------------
jobs_c, grants_c = JOBS_TABLE.c, LIMIT_GRANTS_TABLE.c
_IDS = sa.bindparam("ids", type_=postgresql.ARRAY(sa.String()))
_NAMES = sa.bindparam("names", type_=postgresql.ARRAY(sa.String()))


def _candidates() -> sa.Select[Any]:
    """``flow.claim_by_ids``'s candidates: the ids still grantable, locked, by id."""
    return (
        leases._select((*leases.CLAIM_COLUMNS, "limits", "limit_key"))
        .where(jobs_c.id == sa.any_(_IDS), leases.grantable_by_id())
        .order_by(jobs_c.id)
        .with_for_update()
    )


def _lock_keys() -> sa.TextClause:
    return flow.PG_LOCK_KEYS


def _running() -> sa.Select[Any]:
    """``flow.running_counts``: slots held per key, grants whose job runs under them."""
    still_held = sa.and_(jobs_c.id == grants_c.job_id, jobs_c.lease_token == grants_c.lease_token)
    return (
        sa.select(grants_c.limit_name, sa.func.count().label("held"))
        .select_from(LIMIT_GRANTS_TABLE.join(JOBS_TABLE, still_held))
        .where(
            grants_c.limit_name == sa.any_(_NAMES),
            leases.filter_only(jobs_c.status == JobStatus.running),
        )
        .group_by(grants_c.limit_name)
    )


def _window() -> sa.Select[Any]:
    """``flow._granted_in_window``: per key with a rate, the grants after its cutoff (now
    less its period) and the oldest of them."""
    cutoffs = sa.bindparam("cutoffs", type_=postgresql.ARRAY(UTCDateTime()))
    windows = sa.func.unnest(_NAMES, cutoffs).table_valued("name", "cutoff").render_derived()
    return (
        sa.select(
            grants_c.limit_name,
            sa.func.count().label("granted"),
            sa.func.min(grants_c.granted_at).label("oldest"),
        )
        .select_from(LIMIT_GRANTS_TABLE.join(windows, grants_c.limit_name == windows.c.name))
        .where(grants_c.granted_at > windows.c.cutoff)
        .group_by(grants_c.limit_name)
    )


def _grant_rows() -> sa.Insert:
    """``flow.record_grants``: a row per (key, job) granted, under the claim's token."""
    rows = sa.func.unnest(_NAMES, sa.bindparam("jobs", type_=postgresql.ARRAY(sa.String())))
    pairs = rows.table_valued("name", "job").render_derived()
    return sa.insert(LIMIT_GRANTS_TABLE).from_select(
        ["limit_name", "job_id", "lease_token", "granted_at"],
        sa.select(
            pairs.c.name,
            pairs.c.job,
            sa.bindparam("token", type_=sa.String()),
            sa.bindparam("now", type_=UTCDateTime()),
        ).select_from(pairs),
    )


def _prune() -> sa.Delete:
    return flow.prune_statement()

"""The worker registry: which worker processes are alive, what they hold, and the commands
an administrator left for them (quiet, shutdown).

Liveness is a deadline, not a clock comparison at read time: every heartbeat moves the
worker's ``expires_at`` two intervals ahead, and the maintenance loop marks a worker whose
deadline passed as lost. Losing a worker ends its leases at once — their deadlines are set
to now, so the ordinary reclaim (``service.leases.reclaim_expired_leases``) requeues or
fails the jobs on its next pass, exactly as if the leases had run out. SQL stays the
authority: a Redis-leased job is reclaimed in SQL and taken out of Redis by the re-publish.

A registration belongs to the API key that made it (``key_id``): another key's heartbeat
or deregistration finds no such worker (404, existence not revealed), and a lost worker
ends only leases granted to its own key under its name, so registering someone else's
name and falling silent ends nothing of theirs. With auth off every key_id is "".
Plain functions over a Session; the caller owns the transaction."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from service import errors
from service.auth import Principal
from service.ids import uuid7
from service.models import JOBS_TABLE, WORKERS_TABLE
from service.schemas import WorkerRegister
from service.serialize import iso
from service.states import JobStatus

ONLINE, LOST = "online", "lost"
# Heartbeats a worker may miss before it is lost: one late beat is not a death.
MISSED_BEATS = 2
workers_c = WORKERS_TABLE.c
jobs_c = JOBS_TABLE.c


def _deadline(now: datetime, interval: float) -> datetime:
    return now + timedelta(seconds=MISSED_BEATS * interval)


def register(
    session: Session, spec: WorkerRegister, principal: Principal, now: datetime, interval: float
) -> str:
    for queue in spec.queues:  # it could not lease from them anyway: say so now
        principal.check_queue(queue)
    worker_id = uuid7()
    session.execute(
        sa.insert(WORKERS_TABLE).values(
            id=worker_id,
            key_id=principal.key_id,
            **spec.model_dump(),
            status=ONLINE,
            command=None,
            running=[],
            registered_at=now,
            last_heartbeat_at=now,
            expires_at=_deadline(now, interval),
            lost_at=None,
        )
    )
    return worker_id


def heartbeat(
    session: Session,
    worker_id: str,
    key_id: str,
    running: Sequence[str],
    now: datetime,
    interval: float,
) -> str | None:
    """Record a heartbeat; returns the command waiting for the worker. A worker marked lost
    that beats again is online again (its old leases stay reclaimed: their reports will
    be refused as stale)."""
    result = session.execute(
        sa.update(WORKERS_TABLE)
        .where(workers_c.id == worker_id, workers_c.key_id == key_id)
        .values(
            status=ONLINE,
            lost_at=None,
            running=list(running),
            last_heartbeat_at=now,
            expires_at=_deadline(now, interval),
        )
    )
    if result.rowcount == 0:  # type: ignore[attr-defined]
        raise _not_found(worker_id)
    command: str | None = session.scalar(
        sa.select(workers_c.command).where(workers_c.id == worker_id)
    )
    return command


def deregister(session: Session, worker_id: str, key_id: str) -> None:
    """A worker that shut down cleanly: it holds nothing, so it is simply forgotten."""
    result = session.execute(
        sa.delete(WORKERS_TABLE).where(workers_c.id == worker_id, workers_c.key_id == key_id)
    )
    if result.rowcount == 0:  # type: ignore[attr-defined]
        raise _not_found(worker_id)


def send_command(
    session: Session, worker_id: str, command: str, principal: Principal
) -> dict[str, Any]:
    """Leave ``command`` for the worker's next heartbeat. A shutdown outranks a quiet.
    An administrator restricted to some queues commands only workers serving just those."""
    row = _get(session, worker_id)
    if not serves_only_allowed(row, principal):
        raise _not_found(worker_id)
    if row["command"] != "shutdown":
        session.execute(
            sa.update(WORKERS_TABLE).where(workers_c.id == worker_id).values(command=command)
        )
        row["command"] = command
    return row


def list_workers(session: Session, principal: Principal) -> list[dict[str, Any]]:
    query = sa.select(WORKERS_TABLE).order_by(workers_c.name, workers_c.id)
    rows = (dict(row._mapping) for row in session.execute(query))
    return [row for row in rows if serves_only_allowed(row, principal)]


def serves_only_allowed(row: dict[str, Any], principal: Principal) -> bool:
    """Whether every queue the worker serves is one ``principal`` may use: a key
    restricted to some queues sees (and commands) only such workers."""
    return principal.queues is None or all(principal.allows_queue(q) for q in row["queues"])


def _get(session: Session, worker_id: str) -> dict[str, Any]:
    row = session.execute(
        sa.select(WORKERS_TABLE).where(workers_c.id == worker_id).with_for_update()
    ).first()
    if row is None:
        raise _not_found(worker_id)
    return dict(row._mapping)


def _not_found(worker_id: str) -> errors.WorkerNotFound:
    return errors.WorkerNotFound(
        f"no worker has id {worker_id!r}: it never registered, shut down, or was lost "
        "long enough ago to be purged; a worker that gets this registers again"
    )


def worker_body(row: dict[str, Any], now: datetime) -> dict[str, Any]:
    # Past its deadline but not yet swept by the maintenance loop: lost already.
    lost = row["status"] == LOST or row["expires_at"] < now
    return {
        "id": row["id"],
        "name": row["name"],
        "hostname": row["hostname"],
        "pid": row["pid"],
        "queues": row["queues"],
        "concurrency": row["concurrency"],
        "pool": row["pool"],
        "version": row["version"],
        "status": LOST if lost else ONLINE,
        "command": row["command"],
        "running": row["running"],
        "registered_at": iso(row["registered_at"]),
        "last_heartbeat_at": iso(row["last_heartbeat_at"]),
        "lost_at": iso(row["lost_at"] or (row["expires_at"] if lost else None)),
    }


# --- maintenance ---------------------------------------------------------------------------


def mark_lost(session: Session, now: datetime, retention_seconds: float) -> int:
    """Workers past their deadline become lost, and the leases they held end now; lost
    workers older than the retention are purged. Returns how many were lost."""
    rows = session.execute(
        sa.select(workers_c.id, workers_c.name, workers_c.key_id, workers_c.running)
        .where(workers_c.status == ONLINE, workers_c.expires_at < now)
        .with_for_update(skip_locked=True)
    ).all()
    if rows:
        ids = [row.id for row in rows]
        session.execute(
            sa.update(WORKERS_TABLE).where(workers_c.id.in_(ids)).values(status=LOST, lost_at=now)
        )
        _end_leases(session, rows, now)
    session.execute(
        sa.delete(WORKERS_TABLE).where(
            workers_c.status == LOST, workers_c.lost_at < now - timedelta(seconds=retention_seconds)
        )
    )
    return len(rows)


def _end_leases(session: Session, lost: Sequence[Any], now: datetime) -> None:
    """Jobs are leased under the worker's name, by its API key: a lost worker ends only
    leases its own key holds under that name (another key may use the same name; names are
    chosen by workers). Another live worker of the same key may use the same name too:
    then only the jobs in the lost one's last heartbeat go."""
    names = {row.name for row in lost}
    shared = set(
        session.execute(
            sa.select(workers_c.name, workers_c.key_id).where(
                workers_c.status == ONLINE, workers_c.name.in_(names)
            )
        ).tuples()
    )
    held = []
    for row in lost:
        # Leases of other keys, and (auth on) Redis-protocol leases, which belong to no
        # key, run to their own deadlines instead.
        mine = sa.and_(jobs_c.lease_worker == row.name, jobs_c.lease_key == row.key_id)
        if (row.name, row.key_id) in shared:
            mine = sa.and_(mine, jobs_c.id.in_(list(row.running) or [""]))
        held.append(mine)
    session.execute(
        sa.update(JOBS_TABLE)
        .where(jobs_c.status == JobStatus.running, jobs_c.lease_expires_at > now, sa.or_(*held))
        .values(lease_expires_at=now)
    )


def next_due(session: Session) -> datetime | None:
    """When the next online worker will be overdue (the maintenance loop's wake-up)."""
    due: datetime | None = session.scalar(
        sa.select(sa.func.min(workers_c.expires_at)).where(workers_c.status == ONLINE)
    )
    return due

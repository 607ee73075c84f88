"""How a worker talks to the queue: the small interface its two transports share.

``HttpTransport`` speaks the HTTP worker protocol to the service; ``RedisTransport`` calls
the Redis Functions the service loads (docs/protocol.md, "Redis protocol"), and results
still reach SQL through the service, which applies the Redis event stream. The worker
(leasing, heartbeats, reports, shutdown) is the same over either.

Every call may raise ``ServerUnreachable`` (try again later) or ``CeleriacError`` (its
``is_transient`` says whether to try again)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ._execution import LeasedJob, Report, released


@dataclass(frozen=True, slots=True)
class Grant:
    """One leased job. ``job`` has the fields of a ``POST /leases`` job (its ``lease`` in
    the transport's own form); ``lease_left`` is how long the lease lasts as far as this
    process can tell, ``lease_seconds`` the length to ask for at each heartbeat (None:
    the service's choice)."""

    job: LeasedJob
    token: str
    lease_left: float
    lease_seconds: float | None


@dataclass(frozen=True, slots=True)
class BeatItem:
    job_id: str
    token: str
    progress: Any
    lease_seconds: float | None


@dataclass(frozen=True, slots=True)
class BeatAnswer:
    """``ok`` False: the lease is gone (stale or unknown job): stop and drop the job."""

    job_id: str
    ok: bool
    lease_left: float | None = None
    cancel_requested: bool = False


@dataclass(frozen=True, slots=True)
class Settled:
    job_id: str
    ok: bool
    detail: str | None = None


class Transport(Protocol):
    name: str

    def lease(self, max_jobs: int) -> list[Grant]:
        """Up to ``max_jobs`` jobs; waits (without polling) up to the worker's poll wait
        while none is ready, then returns what there is, possibly nothing."""
        ...

    def heartbeat(self, items: Sequence[BeatItem]) -> list[BeatAnswer]: ...

    def report(self, reports: Sequence[Report]) -> list[Settled]: ...

    def report_and_lease(
        self, reports: Sequence[Report], max_jobs: int
    ) -> tuple[list[Settled], list[Grant]]:
        """``report``, and in the same call up to ``max_jobs`` jobs that are ready now
        (no waiting): report-and-fetch, where the transport has it (else no jobs)."""
        ...

    def release(self, grants: Sequence[tuple[str, str]]) -> list[Settled]:
        """Give back jobs never started: (job id, token) pairs."""
        ...

    def end_wait(self) -> None:
        """Make a ``lease`` waiting in another thread return soon, with whatever it was
        granted (the caller releases that), and any later ``lease`` return at once: the
        worker is stopping. Never loses a grant; callable from any thread."""
        ...

    def close(self) -> None: ...


def release_all(transport: Transport, grants: Sequence[tuple[str, str]]) -> list[Settled]:
    """``release`` as reports, for transports with nothing better."""
    return transport.report([released(job_id, token) for job_id, token in grants])

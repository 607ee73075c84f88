"""What the service tells its observers (metrics, logs) of what happened: a no-op base
that ``service.metrics.Metrics`` implements. The runtime calls it after commits, so an
observer sees only what is true in SQL; every method must be cheap and never raise into
the caller (it runs on the event loop, on the hot paths)."""

from __future__ import annotations

from collections.abc import Sequence

from service.effects import Effects
from service.models import JobValues


class Observer:
    """Hears of committed work; this one ignores it."""

    def submitted(self, rows: Sequence[JobValues]) -> None:
        """Jobs stored by a submit (replays of an idempotency key are not in ``rows``)."""

    def leased(self, rows: Sequence[JobValues]) -> None:
        """Jobs granted to an HTTP worker."""

    def committed(self, effects: Effects) -> None:
        """A transaction committed with these effects."""

    def progressed(self, job_ids: Sequence[str]) -> None:
        """Heartbeats stored progress for these jobs (GET /events)."""

    def webhook_delivered(self, outcome: str) -> None:
        """A webhook delivery attempt was recorded with this status: ``delivered``,
        ``pending`` (to be retried), ``failed`` (given up) or ``gone`` (410)."""

"""The Redis worker protocol v1 (docs/protocol.md, "Redis protocol"): lease, heartbeat and
settle jobs with the service's Redis Functions, straight from Redis.

Leasing asks for as many jobs as the worker has free slots; with none ready it blocks in
``BLPOP`` on the queues' wake-up lists (the service pushes a token whenever it makes jobs
ready), so an idle worker costs nothing and wakes at once. Heartbeats and reports are
pipelined: one round trip for every lease due, or every outcome waiting. The service
applies each call's event to SQL, which remains the system of record."""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading
from collections.abc import Sequence
from typing import Any

from ._execution import Report, dumps
from ._resp import RedisFailure, RedisUnavailable, ReplyError, connect
from ._transport import BeatAnswer, BeatItem, Grant, Settled, release_all
from .errors import CeleriacError, ServerUnreachable

logger = logging.getLogger("celeriac.worker")

PROTOCOL = "1"
# The lease call takes one length for every job; HTTP's default is the service's 30 s.
DEFAULT_LEASE_SECONDS = 30.0
MAX_LEASE_JOBS = 1000


class RedisTransport:
    name = "redis"

    def __init__(
        self,
        url: str,
        *,
        prefix: str,
        worker: str,
        queues: Sequence[str],
        lease_seconds: float | None,
        poll_wait: float,
    ) -> None:
        # BLPOP holds its connection for the whole wait: a connection (and socket timeout)
        # of its own, so heartbeats and reports never queue behind it.
        self._redis = connect(url, socket_timeout=30, blocking_timeout=poll_wait + 30)
        self.url = url
        tag = "{" + prefix + "}"
        self._events = f"{tag}:events"
        self._job = f"{tag}:job:"
        # BLPOP also watches a key of this process's own, so that ``end_wait`` can
        # wake it without waking (and so robbing) another worker.
        self._own_wake = f"{tag}:wake-worker:{worker}:{os.getpid()}:{secrets.token_hex(4)}"
        self._wake = [f"{tag}:wake:{queue}" for queue in queues] + [self._own_wake]
        self._waits_ended = threading.Event()
        ready = [f"{tag}:ready:{queue}" for queue in queues]
        self._lease_call = ("FCALL", "celeriac_v1_lease", 1 + len(ready), self._events, *ready)
        self._worker = worker
        self._explicit = lease_seconds
        self._lease_seconds = lease_seconds or DEFAULT_LEASE_SECONDS
        self._poll_wait = poll_wait

    def lease(self, max_jobs: int) -> list[Grant]:
        grants = self._lease_now(max_jobs)
        if grants or self._poll_wait <= 0 or self._waits_ended.is_set():
            return grants
        try:
            woken = self._redis.blocking("BLPOP", *self._wake, self._poll_wait)
        except RedisFailure as exc:
            raise _translate(exc) from exc
        if not woken or self._waits_ended.is_set():
            return []
        # Another worker may win the jobs that woke us: then there is nothing, and the
        # worker asks again (back to BLPOP), which is no more than one empty call.
        return self._lease_now(max_jobs)

    def end_wait(self) -> None:
        self._waits_ended.set()
        try:  # the key outlives us only briefly if nobody was waiting on it
            self._pipeline([("RPUSH", self._own_wake, "stop"), ("EXPIRE", self._own_wake, 60)])
        except (ServerUnreachable, CeleriacError) as exc:  # Redis is down, or refused
            logger.debug("could not wake the lease wait: %r", exc)

    def _lease_now(self, max_jobs: int) -> list[Grant]:
        want = min(max_jobs, MAX_LEASE_JOBS)
        call = (*self._lease_call, PROTOCOL, self._worker, want, int(self._lease_seconds * 1000))
        [items] = self._pipeline([call])
        grants = []
        for item in items:
            job = json.loads(item)
            # The job's own timeout is its lease length at each heartbeat (as over HTTP,
            # unless the worker chose one); the first beat is due at the shorter of both.
            length = self._explicit or job.get("timeout") or self._lease_seconds
            left = min(length, self._lease_seconds)
            grants.append(Grant(job, job["lease"]["token"], left, length))
        return grants

    def heartbeat(self, items: Sequence[BeatItem]) -> list[BeatAnswer]:
        calls = []
        for item in items:
            length = item.lease_seconds or self._lease_seconds
            progress = "" if item.progress is None else dumps(item.progress)
            calls.append((
                "FCALL", "celeriac_v1_heartbeat", 2, self._events, self._job + item.job_id,
                PROTOCOL, item.job_id, item.token, int(length * 1000), progress,
            ))  # fmt: skip
        answers = []
        for item, answer in zip(items, self._pipeline(calls), strict=True):
            if isinstance(answer, ReplyError):
                answers.append(BeatAnswer(item.job_id, False))
            else:
                length = item.lease_seconds or self._lease_seconds
                answers.append(BeatAnswer(item.job_id, True, length, bool(int(answer[1]))))
        return answers

    def report(self, reports: Sequence[Report]) -> list[Settled]:
        answers = self._pipeline([self._settle_call(report) for report in reports])
        return [
            Settled(report.job_id, False, "stale-lease")
            if isinstance(answer, ReplyError)
            else Settled(report.job_id, True)
            for report, answer in zip(reports, answers, strict=True)
        ]

    def report_and_lease(
        self, reports: Sequence[Report], max_jobs: int
    ) -> tuple[list[Settled], list[Grant]]:
        return self.report(reports), []  # the leaser's blocking pop serves at once

    def _settle_call(self, report: Report) -> tuple[Any, ...]:
        head = (self._events, self._job + report.job_id, PROTOCOL, report.job_id, report.token)
        # The attempt's logs ride as an optional last argument (docs/protocol.md).
        logs = () if report.logs is None else (report.logs,)
        if report.outcome == "succeeded":
            return ("FCALL", "celeriac_v1_complete", 2, *head, report.result, *logs)
        if report.outcome == "released":
            return ("FCALL", "celeriac_v1_release", 2, *head)
        retry_in = "" if report.retry_in is None else repr(report.retry_in)
        return (
            "FCALL", "celeriac_v1_fail", 2, *head, dumps(report.error),
            "1" if report.retry else "0", retry_in, *logs,
        )  # fmt: skip

    def _pipeline(self, calls: list[tuple[Any, ...]]) -> list[Any]:
        """Send every call in one write and read the answers in order; per-call ``STALE``
        errors come back in place, any other error (a wrong protocol version, functions
        not loaded) raises."""
        try:
            answers = self._redis.pipeline(calls)
        except RedisFailure as exc:
            raise _translate(exc) from exc
        for answer in answers:
            if isinstance(answer, ReplyError) and not str(answer).startswith("STALE"):
                raise _translate(answer)
        return answers

    def release(self, grants: Sequence[tuple[str, str]]) -> list[Settled]:
        return release_all(self, grants)

    def close(self) -> None:
        self._redis.close()


def _translate(exc: RedisFailure) -> CeleriacError | ServerUnreachable:
    """Redis failures in the worker's terms: what to retry, and what means stop."""
    if isinstance(exc, RedisUnavailable):
        return ServerUnreachable(f"Redis: {exc}")
    text = str(exc)
    if text.startswith("VERSION"):
        # 426 Upgrade Required: not transient, the worker stops and says why.
        return CeleriacError(426, "Redis protocol version mismatch", text, {"detail": text})
    if "Function not found" in text:
        detail = (
            "the celeriac_v1 Redis functions are not loaded: is the service running with "
            f"CELERIAC_BROKER_URL=redis://… and the same Redis? ({text})"
        )
        return CeleriacError(503, "Redis functions not loaded", detail, {"detail": detail})
    return CeleriacError(503, "Redis error", text, {"detail": text})

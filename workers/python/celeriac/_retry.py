"""When a producer's request is sent again, and how long it waits first.

A request is *safe* to send twice when sending it twice has the effect of sending it once:
a read (``GET``), or a ``POST`` carrying an ``Idempotency-Key`` (the service answers a
replay with the job the first attempt created). A safe request is retried when no answer
came (refused, reset, timed out) and on 429/502/503/504, which the service or a proxy in
front of it sends without having done anything. Any other request (a batch submit, a
cancel) is retried only when its connection could not even be opened (``ConnectFailed``):
then it provably never reached the service.

Waits grow 0.5, 1, 2, 4, 4 s, each shortened by up to a quarter at random so that clients
cut off by the same blip do not all come back in the same instant; a ``Retry-After`` from
the service is the least wait. No retry starts later than ``budget`` seconds after the
first attempt began, and one whose ``Retry-After`` lies beyond that is not made at all.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

from .errors import CeleriacError, ConnectFailed, ServerUnreachable

log = logging.getLogger("celeriac.client")

RETRIES_ENV = "CELERIAC_CLIENT_RETRIES"
BUDGET_ENV = "CELERIAC_CLIENT_RETRY_BUDGET"
DEFAULT_RETRIES = 5
DEFAULT_BUDGET = 10.0
FIRST_WAIT = 0.5
MAX_WAIT = 4.0
# Answers that mean "not done, come back later" from the service or a proxy before it.
RETRY_STATUS = frozenset({429, 502, 503, 504})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def is_safe(method: str, headers: Mapping[str, str] | None) -> bool:
    """Whether sending this request twice has the effect of sending it once."""
    if method.upper() in SAFE_METHODS:
        return True
    given = headers or {}
    return any(name.lower() == "idempotency-key" and value for name, value in given.items())


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After as seconds from now: delay-seconds or an HTTP-date (RFC 9110 10.2.3)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _env_number(name: str) -> float | None:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number, not {raw!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a non-negative number, not {raw!r}")
    return value


@dataclass(frozen=True)
class RetryPolicy:
    """``retries`` sends after the first (0: none); ``budget`` seconds after the first
    attempt began, no further one starts."""

    retries: int = DEFAULT_RETRIES
    budget: float = DEFAULT_BUDGET

    def __post_init__(self) -> None:
        if self.retries < 0 or not math.isfinite(self.budget) or self.budget < 0:
            raise ValueError(f"retries and retry_budget must be >= 0, not {self!r}")

    @classmethod
    def resolve(cls, retries: int | None, budget: float | None) -> RetryPolicy:
        """Arguments first, then $CELERIAC_CLIENT_RETRIES / $CELERIAC_CLIENT_RETRY_BUDGET."""
        if retries is None:
            from_env = _env_number(RETRIES_ENV)
            retries = DEFAULT_RETRIES if from_env is None else int(from_env)
        if budget is None:
            from_env = _env_number(BUDGET_ENV)
            budget = DEFAULT_BUDGET if from_env is None else from_env
        return cls(retries, budget)

    @property
    def enabled(self) -> bool:
        return self.retries > 0

    def wait_before(
        self, retry: int, exc: Exception, *, safe: bool, deadline: float
    ) -> float | None:
        """Seconds to wait before retry number ``retry`` (0 for the first) after ``exc``;
        None: do not retry, raise ``exc``."""
        if retry >= self.retries or not retryable(exc, safe=safe):
            return None
        left = deadline - time.monotonic()
        backoff = min(MAX_WAIT, FIRST_WAIT * 2**retry) * random.uniform(0.75, 1.0)
        asked = exc.retry_after if isinstance(exc, CeleriacError) else None
        if asked is not None and asked > left:
            return None  # the service wants more time than we may spend
        wait = min(max(backoff, asked or 0.0), left)
        return wait if wait >= 0 else None


def retryable(exc: Exception, *, safe: bool) -> bool:
    if isinstance(exc, ConnectFailed):
        return True  # never reached the service: sending it again cannot repeat anything
    if not safe:
        return False
    if isinstance(exc, ServerUnreachable):
        return True
    return isinstance(exc, CeleriacError) and exc.status in RETRY_STATUS


def note_retry(what: str, exc: Exception, retry: int, policy: RetryPolicy, wait: float) -> None:
    log.info("%s: %s; retry %d of %d in %.2f s", what, exc, retry + 1, policy.retries, wait)


def monotonic_deadline(policy: RetryPolicy) -> float:
    return time.monotonic() + policy.budget

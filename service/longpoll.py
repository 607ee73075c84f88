"""Caps on concurrent long-polls, so that one client cannot hold every waiting slot.

A long-poll (``POST /leases`` with ``wait > 0``, ``GET /jobs/{id}?wait=``) costs a
connection, a coroutine and a waiter for as long as it waits. Each API key may hold at
most ``max_long_polls_per_key`` of them and the process ``max_long_polls`` in all; a
request over either cap is answered at once (an empty lease after one non-waiting
attempt, or the job as it is now) with ``Retry-After``, never queued. With auth off
(one trusted tenant, ``key_id`` "") only the total applies.

Counting happens on the event loop only, so it needs no lock."""

from __future__ import annotations

import logging
import time
from collections import Counter

log = logging.getLogger("celeriac.longpoll")

# Seconds a refused long-poll is told to wait before it asks again: long enough that
# refused workers do not turn into a polling loop, short enough that work is not left
# waiting for long (their non-waiting attempt already took anything ready).
RETRY_AFTER_SECONDS = 5
RETRY_AFTER = {"Retry-After": str(RETRY_AFTER_SECONDS)}
# A refusal is logged at most this often: a saturated service must not flood its log.
_LOG_EVERY_SECONDS = 60.0


class LongPolls:
    def __init__(self, max_total: int, max_per_key: int) -> None:
        self.max_total = max_total
        self.max_per_key = max_per_key
        self.total = 0
        self._per_key: Counter[str] = Counter()
        self._last_logged = -_LOG_EVERY_SECONDS

    def held(self, key_id: str) -> int:
        return self._per_key[key_id]

    def try_enter(self, key_id: str) -> bool:
        """Take a slot for ``key_id``; False (and nothing taken) when a cap is reached.
        Every True must be matched by one ``leave``."""
        if self.total >= self.max_total:
            self._refused(f"the service holds {self.total} (CELERIAC_MAX_LONG_POLLS)")
            return False
        if key_id and self._per_key[key_id] >= self.max_per_key:
            self._refused(
                f"API key {key_id} holds {self._per_key[key_id]} (CELERIAC_MAX_LONG_POLLS_PER_KEY)"
            )
            return False
        self.total += 1
        self._per_key[key_id] += 1
        return True

    def leave(self, key_id: str) -> None:
        self.total -= 1
        self._per_key[key_id] -= 1
        if self._per_key[key_id] <= 0:
            del self._per_key[key_id]

    def _refused(self, why: str) -> None:
        now = time.monotonic()
        if now - self._last_logged >= _LOG_EVERY_SECONDS:
            self._last_logged = now
            log.warning(
                "long-poll cap reached: %s; answering further long-polls at once with "
                "Retry-After (logged at most once a minute)",
                why,
            )

"""Time-ordered job ids (UUIDv7, RFC 9562): sortable as text, so newest-first listing and
keyset pagination walk the primary key."""

from __future__ import annotations

import os
import re
import threading
import time
from datetime import datetime

_lock = threading.Lock()
_last_ms = 0
_counter = 0
# Random bytes from the OS (os.urandom), drawn 4 KiB at a time: one getrandom() call
# took 13 µs here, and each POST /jobs made two (the counter's seed and the id's random
# bits), a twentieth of its CPU in the service's HTTP layer. A forked child (another pid)
# draws its own: it must not reuse its parent's bytes.
_POOL_BYTES = 4096
_pool = b""
_pool_at = 0
_pool_pid = 0


def _random_bytes(count: int) -> bytes:
    """``count`` bytes of os.urandom's output, from the pool. Under ``_lock``."""
    global _pool, _pool_at, _pool_pid
    if count > _POOL_BYTES:
        return os.urandom(count)
    if _pool_at + count > len(_pool) or _pool_pid != os.getpid():
        _pool, _pool_at, _pool_pid = os.urandom(_POOL_BYTES), 0, os.getpid()
    _pool_at += count
    return _pool[_pool_at - count : _pool_at]


def uuid7() -> str:
    """A UUIDv7 whose 12-bit sub-millisecond counter keeps ids from one process strictly
    increasing even within the same millisecond."""
    return uuid7s(1)[0]


def uuid7s(count: int) -> list[str]:
    """``count`` ids as ``uuid7`` makes them, in increasing order; their random bits come
    from os.urandom, at most one system call for all of them (a batch submit makes a
    thousand) and usually none (``_random_bytes``)."""
    global _last_ms, _counter
    stamps = []
    with _lock:
        for _ in range(count):
            ms = time.time_ns() // 1_000_000
            if ms <= _last_ms:
                ms = _last_ms
                _counter += 1
                if _counter > 0xFFF:  # counter exhausted: borrow the next millisecond
                    ms += 1
                    _counter = 0
            else:
                _counter = int.from_bytes(_random_bytes(2), "big") & 0x3FF  # leave headroom
            _last_ms = ms
            stamps.append((ms, _counter))
        random_bits = _random_bytes(8 * count)
    ids = []
    for index, (ms, counter) in enumerate(stamps):
        rand_b = int.from_bytes(random_bits[8 * index : 8 * index + 8]) & ((1 << 62) - 1)
        value = (ms & ((1 << 48) - 1)) << 80
        value |= 0x7 << 76
        value |= counter << 64
        value |= 0b10 << 62
        value |= rand_b
        digits = f"{value:032x}"  # what str(uuid.UUID(int=value)) gives, faster
        ids.append(f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}")
    return ids


# A UUID's canonical text, the only form ids are stored in (any other form of the same
# UUID would match no row anyway). A regular expression: ``uuid.UUID`` took 1.5 µs, and
# the Redis protocol's ingest checks every event's id (a fifth of its time).
_JOB_ID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def is_job_id(text: str) -> bool:
    return _JOB_ID.fullmatch(text) is not None


def floor_of(when: datetime) -> str:
    """The smallest UUIDv7 text of the millisecond ``when``: every id made earlier sorts
    below it, every id made at or after it sorts at or above it."""
    digits = f"{int(when.timestamp() * 1000):012x}"
    return f"{digits[:8]}-{digits[8:]}-0000-0000-000000000000"

"""Job ids (service/ids.py): UUIDv7 text, strictly increasing within a process, their
random bits drawn from os.urandom through a pool that a forked child never shares."""

from __future__ import annotations

import os
import uuid

from service.ids import is_job_id, uuid7, uuid7s


def test_ids_are_uuid7_text_and_strictly_increasing() -> None:
    made = [uuid7() for _ in range(3000)] + uuid7s(5000)  # 5000 x 8 bytes: past the pool
    assert made == sorted(made) and len(set(made)) == len(made)
    assert all(is_job_id(i) and uuid.UUID(i).version == 7 for i in made[::97])


def test_a_forked_child_draws_random_bits_of_its_own() -> None:
    uuid7()  # the parent's pool holds bytes now
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through the pipe
        try:
            os.write(write, uuid7().encode())
        finally:
            os._exit(0)
    os.close(write)
    theirs = os.read(read, 100).decode()
    os.close(read)
    os.waitpid(child, 0)
    ours = uuid7()
    # Bits 0-61 are random: a child reusing the parent's pool would repeat them.
    assert uuid.UUID(theirs).int & ((1 << 62) - 1) != uuid.UUID(ours).int & ((1 << 62) - 1)

"""A fixed pool of threads that hand each queued item to one function."""

from __future__ import annotations

import threading
from collections.abc import Callable
from queue import SimpleQueue
from typing import Generic, TypeVar

T = TypeVar("T")


class ThreadPool(Generic[T]):
    """``size`` daemon threads calling ``handle(item)`` for each submitted item.

    Not ``ThreadPoolExecutor``, for two reasons: it makes a Future (with its Condition)
    per item, a measurable share of a no-op job's cost; and its threads are joined at
    interpreter exit, so one task stuck forever would keep a cold-shut-down worker alive.
    The worker never submits more items than there are free threads, so nothing queues.
    """

    def __init__(self, size: int, handle: Callable[[T], None], name: str) -> None:
        self._handle = handle
        self._items: SimpleQueue[T | None] = SimpleQueue()
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-{n}", daemon=True)
            for n in range(size)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def submit(self, item: T) -> None:
        self._items.put(item)

    def stop(self) -> None:
        """Let every thread end once it is idle (running items finish first)."""
        for _ in self._threads:
            self._items.put(None)

    def _work(self) -> None:
        while (item := self._items.get()) is not None:
            self._handle(item)

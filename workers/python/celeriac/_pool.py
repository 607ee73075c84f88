"""A fixed pool of threads that hand each queued item to one function."""

from __future__ import annotations

import itertools
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
        self._name = name
        self._numbers = itertools.count()
        self._items: SimpleQueue[T | None] = SimpleQueue()
        self._size = size
        self._retired: set[int] = set()
        self._lock = threading.Lock()

    def start(self) -> None:
        for _ in range(self._size):
            self._add_thread()

    def submit(self, item: T) -> None:
        self._items.put(item)

    def stop(self) -> None:
        """Let every thread end once it is idle (running items finish first)."""
        for _ in range(self._size):
            self._items.put(None)

    def replace(self, thread: threading.Thread) -> None:
        """``thread`` is stuck in an item it was given up on: it leaves when (if ever)
        the item returns, and a new thread takes its place now."""
        with self._lock:
            if thread.ident is not None:
                self._retired.add(thread.ident)
        self._add_thread()

    def _add_thread(self) -> None:
        name = f"{self._name}-{next(self._numbers)}"
        threading.Thread(target=self._work, name=name, daemon=True).start()

    def _work(self) -> None:
        me = threading.get_ident()
        while (item := self._items.get()) is not None:
            self._handle(item)
            if self._retired and me in self._retired:
                with self._lock:
                    self._retired.discard(me)
                return

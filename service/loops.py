"""The one background loop every replica runs, once per plugin (after Oban's plugins:
its stager, pruner and lifeline are our maintenance, result cleanup and reclaim).

The contract, between a plugin and the loop:

- A **plugin** does one pass of its work in ``run_once(runtime)`` and answers a ``Pass``:
  ``more=True`` when it stopped at its batch limit (more of the same is waiting), and
  ``due``, when it next has work (None: nothing known; it waits to be woken). A pass that
  raises is a failed pass; the plugin keeps no loop state for it. It names the events
  that wake it early (``wakes``, from ``runtime.signals``; each event has one listener,
  since the loop clears it before every pass) and ``interval``, the longest it may go
  without a pass (how soon it notices what no event announces: another replica's work, a
  lost notification). ``stop()`` runs once when the loop ends, to let go of what the
  plugin started (the webhook plugin's attempts in flight).
- The **loop** owns everything around the pass: it clears the plugin's events, runs the
  pass, and then runs it again at once (``more``), or sleeps until ``due``, one of the
  events, or ``interval``, whichever comes first, never polling faster than the plugin
  asked. A failed pass is retried after an exponential backoff (``Backoff``; capped, and
  never longer than ``interval``, so recovery is no slower than an idle plugin's next
  look), which resets on the first pass that succeeds; wake-ups do not cut a backoff
  short. A database outage is logged once by the outage tracker (``outage.log_failure``);
  any other failure gets one line with its traceback, at most once every
  ``LOG_EVERY_SECONDS`` per plugin (the next line says how many were not logged).
  Cancelling the task (shutdown, bounded by the app's lifespan) ends the sleep or the pass
  at once, then calls ``stop()``.

To add a plugin (retention, limits, workflows...): subclass ``Plugin`` in the module that
owns its domain functions; set ``name`` (its task is ``celeriac-<name>``, its log
``celeriac.<name>``), ``interval`` (a setting) and, if writes elsewhere should wake it,
``wakes`` (add an ``asyncio.Event`` to ``service.signals.Signals`` and set it from
``Runtime.apply`` or the router that makes the change); write ``run_once`` as plain calls
to functions that take a session, through ``runtime.transact`` or ``runtime.db``, with
a batch limit (return ``more=True`` when the batch was full); then add it to
``background_plugins`` in service/app.py and to "Background plugins" in
docs/architecture.md. Keep per-row isolation inside the pass (service/isolation.py): a
pass that raises is retried whole."""

from __future__ import annotations

import abc
import asyncio
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar

from service.outage import is_outage, log_failure

if TYPE_CHECKING:
    from service.runtime import Runtime

LOG_EVERY_SECONDS = 60.0
# A due time already past still waits this long: a row another replica holds locked stays
# "due" until its commit, and re-reading it at once would spin.
MIN_SLEEP_SECONDS = 0.01


@dataclass(frozen=True, slots=True)
class Pass:
    """What a pass found: ``more`` work waiting now, and when the plugin is ``due`` next."""

    more: bool = False
    due: datetime | None = None


@dataclass(frozen=True, slots=True)
class Backoff:
    """Seconds before the ``failures``-th retry: ``first``, doubled each time, at most
    ``cap`` (and at most the plugin's interval)."""

    first: float = 0.5
    cap: float = 30.0

    def seconds(self, failures: int, interval: float) -> float:
        return min(self.first * 2.0 ** min(failures - 1, 32), self.cap, interval)


class Plugin(abc.ABC):
    """One kind of background work; see the module docstring for the contract."""

    name: ClassVar[str]
    interval: float  # seconds: the longest the loop sleeps without a wake-up
    wakes: Sequence[asyncio.Event] = ()

    @abc.abstractmethod
    async def run_once(self, runtime: Runtime) -> Pass:
        """One pass: a batch of work, then what is waiting and when it is next due."""

    async def stop(self) -> None:  # noqa: B027 - most plugins hold nothing between passes
        """The loop is ending (shutdown): let go of anything the passes started."""


def sleep_seconds(due: datetime | None, now: datetime, interval: float) -> float:
    """How long an idle plugin sleeps: until ``due``, at most ``interval``."""
    if due is None:
        return interval
    return min(interval, max((due - now).total_seconds(), MIN_SLEEP_SECONDS))


class Loop:
    """Runs one plugin until cancelled. ``runtime`` is handed to each pass; the loop
    itself reads only its clock."""

    def __init__(self, plugin: Plugin, runtime: Runtime, backoff: Backoff | None = None) -> None:
        self.plugin = plugin
        self.runtime = runtime
        self.backoff = backoff or Backoff()
        self.log = logging.getLogger(f"celeriac.{plugin.name}")
        self.failures = 0
        self._logged_at = float("-inf")
        self._unlogged = 0

    async def run(self) -> None:
        try:
            while True:
                await self._turn()
        finally:
            await self.plugin.stop()

    async def _turn(self) -> None:
        plugin = self.plugin
        for event in plugin.wakes:
            event.clear()  # before the pass: a wake-up during it cuts the next sleep short
        try:
            outcome = await plugin.run_once(self.runtime)
        except Exception:
            self.failures += 1
            self._report()
            await asyncio.sleep(self.backoff.seconds(self.failures, plugin.interval))
            return
        self.failures = 0
        if outcome.more:
            await asyncio.sleep(0)  # the next batch at once, but let the event loop breathe
            return
        now = self.runtime.clock.now()
        await self._sleep(sleep_seconds(outcome.due, now, plugin.interval))

    async def _sleep(self, seconds: float) -> None:
        """Until one of the plugin's events is set, or ``seconds`` have passed."""
        if not self.plugin.wakes:
            await asyncio.sleep(seconds)
            return
        waiters = [asyncio.ensure_future(event.wait()) for event in self.plugin.wakes]
        try:
            await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()

    def _report(self) -> None:
        """Log the failure in flight: an outage is told by the tracker, a bug (or another
        service's failure) with its traceback, once per ``LOG_EVERY_SECONDS``."""
        what = f"{self.plugin.name} pass"
        if is_outage(sys.exc_info()[1]):
            log_failure(self.log, what)
            return
        now = time.monotonic()
        if now - self._logged_at < LOG_EVERY_SECONDS:
            self._unlogged += 1
            self.log.debug("%s failed again (%d in a row)", what, self.failures)
            return
        if self._unlogged:
            what += f" ({self._unlogged} earlier failure(s) not logged)"
        self._logged_at, self._unlogged = now, 0
        log_failure(self.log, what)


def launch(runtime: Runtime, plugins: Sequence[Plugin]) -> list[asyncio.Task[Any]]:
    """One task per plugin; the app's lifespan cancels them at shutdown."""
    return [
        asyncio.create_task(Loop(plugin, runtime).run(), name=f"celeriac-{plugin.name}")
        for plugin in plugins
    ]

"""The background loop itself (service/loops.py), in process on a real event loop: a
plugin here is a small scripted object (the loop's collaborator), the loop is the real
one. Each test waits for the pass it expects, never for a fixed time."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest

from service import errors
from service.loops import Backoff, Loop, Pass, Plugin

# The loop reads nothing from the runtime but its clock (it hands the runtime to passes).
RUNTIME: Any = SimpleNamespace(clock=SimpleNamespace(now=lambda: datetime.now(UTC)))
FAST = Backoff(first=0.02, cap=0.08)


@dataclass
class Scripted(Plugin):
    """Runs ``script(n)`` for its n-th pass and records when each pass began."""

    script: Callable[[int], Awaitable[Pass]]
    interval: float = 60.0
    wakes: tuple[asyncio.Event, ...] = ()
    name = "test"
    starts: list[float] = field(default_factory=list)
    passed: asyncio.Event = field(default_factory=asyncio.Event)
    stopped: bool = False

    async def run_once(self, runtime: Any) -> Pass:
        self.starts.append(time.monotonic())
        self.passed.set()
        return await self.script(len(self.starts))

    async def stop(self) -> None:
        self.stopped = True

    async def passes(self, count: int, within: float = 5.0) -> None:
        """Wait until ``count`` passes have begun."""
        async with asyncio.timeout(within):
            while len(self.starts) < count:
                self.passed.clear()
                await self.passed.wait()


def run(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(scenario())


async def started(plugin: Scripted, backoff: Backoff | None = None) -> asyncio.Task[None]:
    return asyncio.create_task(Loop(plugin, RUNTIME, backoff).run())


async def stopped(task: asyncio.Task[None]) -> float:
    """Cancel the loop; how long it took to end."""
    began = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    return time.monotonic() - began


def answers(*passes: Pass) -> Callable[[int], Awaitable[Pass]]:
    """The n-th pass answers ``passes[n-1]``, and the last one from then on."""

    async def script(n: int) -> Pass:
        return passes[min(n, len(passes)) - 1]

    return script


def test_more_work_runs_again_at_once() -> None:
    async def scenario() -> None:
        plugin = Scripted(answers(*[Pass(more=True)] * 5, Pass()))
        began = time.monotonic()
        task = await started(plugin)
        await plugin.passes(6)
        assert time.monotonic() - began < 1.0  # five full batches, no sleep between them
        await asyncio.sleep(0.1)
        assert len(plugin.starts) == 6  # then idle: no pass before its interval (60 s)
        await stopped(task)

    run(scenario)


def test_sleeps_until_due_not_before() -> None:
    async def scenario() -> None:
        async def script(n: int) -> Pass:
            return Pass(due=datetime.now(UTC) + timedelta(seconds=0.2))

        plugin = Scripted(script)
        task = await started(plugin)
        await plugin.passes(3)
        gaps = [b - a for a, b in zip(plugin.starts, plugin.starts[1:], strict=False)]
        assert all(gap >= 0.19 for gap in gaps), gaps
        await stopped(task)

    run(scenario)


def test_a_wake_event_runs_it_before_its_due_time() -> None:
    async def scenario() -> None:
        wake = asyncio.Event()
        far = datetime.now(UTC) + timedelta(hours=1)
        plugin = Scripted(answers(Pass(due=far)), interval=3600.0, wakes=(wake,))
        task = await started(plugin)
        await plugin.passes(1)
        await asyncio.sleep(0.05)  # asleep towards its due time
        assert len(plugin.starts) == 1
        wake.set()
        await plugin.passes(2, within=1.0)
        assert not wake.is_set()  # cleared before the pass: the next sleep is a real one
        await stopped(task)

    run(scenario)


def test_a_wake_during_a_pass_is_not_lost() -> None:
    async def scenario() -> None:
        wake = asyncio.Event()

        async def script(n: int) -> Pass:
            if n == 1:
                wake.set()  # work arrived while the pass ran
            return Pass()

        plugin = Scripted(script, interval=3600.0, wakes=(wake,))
        task = await started(plugin)
        await plugin.passes(2, within=1.0)
        await stopped(task)

    run(scenario)


def test_a_failing_plugin_backs_off_then_recovers(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        async def script(n: int) -> Pass:
            if n <= 5 or n == 7:  # five failures, a success, then one more failure
                raise RuntimeError(f"pass {n} broke")
            return Pass(due=datetime.now(UTC))  # due at once: go again (after the floor)

        plugin = Scripted(script)
        task = await started(plugin, FAST)
        await plugin.passes(9)
        await stopped(task)
        gaps = [b - a for a, b in zip(plugin.starts, plugin.starts[1:], strict=False)]
        # 0.02, 0.04, 0.08, then capped at 0.08, 0.08; success resets: 0.02 after pass 7.
        for gap, least in zip(gaps[:5], (0.02, 0.04, 0.08, 0.08, 0.08), strict=True):
            assert gap >= least * 0.95, gaps
        assert gaps[3] < 0.16 and gaps[4] < 0.16, gaps  # the cap holds
        assert 0.019 <= gaps[6] < gaps[2], gaps  # the backoff started over

    with caplog.at_level(logging.DEBUG, logger="celeriac.test"):
        run(scenario)
    logged = [r for r in caplog.records if r.levelno >= logging.ERROR]
    # One line with the traceback; the six failures after it are rate-limited.
    assert len(logged) == 1, [r.getMessage() for r in logged]
    assert logged[0].exc_info is not None and "pass 1 broke" in str(logged[0].exc_info[1])


def test_an_outage_is_not_logged_per_pass(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        async def script(n: int) -> Pass:
            raise errors.DatabaseUnavailable("the database is unreachable")

        plugin = Scripted(script)
        task = await started(plugin, FAST)
        await plugin.passes(4)
        await stopped(task)

    with caplog.at_level(logging.DEBUG, logger="celeriac.test"):
        run(scenario)
    # The outage tracker tells it once (service/outage.py); the loop adds nothing above debug.
    assert not [r for r in caplog.records if r.levelno > logging.DEBUG]


def test_backoff_is_no_longer_than_the_interval() -> None:
    assert Backoff(first=0.5, cap=30.0).seconds(1, interval=0.3) == 0.3
    assert Backoff(first=0.5, cap=30.0).seconds(3, interval=60.0) == 2.0
    assert Backoff(first=0.5, cap=30.0).seconds(10**6, interval=60.0) == 30.0


async def idle(n: int) -> Pass:
    return Pass()


async def endless(n: int) -> Pass:
    await asyncio.sleep(3600)  # a pass that would never end by itself
    return Pass()


async def broken(n: int) -> Pass:
    raise RuntimeError("broken")


@pytest.mark.parametrize(
    "script", [idle, endless, broken], ids=["asleep", "mid-pass", "backing-off"]
)
def test_shutdown_ends_the_loop_promptly(script: Callable[[int], Awaitable[Pass]]) -> None:
    async def scenario() -> None:
        plugin = Scripted(script, interval=3600.0, wakes=(asyncio.Event(),))
        task = await started(plugin, Backoff(first=3600.0, cap=3600.0))
        await plugin.passes(1)
        await asyncio.sleep(0.01)  # into its sleep, pass or backoff
        assert await stopped(task) < 0.5
        assert plugin.stopped

    run(scenario)

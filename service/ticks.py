"""When a schedule fires: cron and interval ticks, and which of the due ticks to fire after
a delay (the catch-up policy). Pure functions of their arguments, no database, no clock:
the scheduler passes "now" in, and the tests pass fixed instants.

Cron expressions are evaluated by cronsim (the evaluator of healthchecks.io): maintained,
typed, and it reproduces Debian cron's daylight-saving rules. For expressions with a fixed
minute and hour ("30 2 * * *"), a local time skipped by a spring-forward fires once right
after the gap, and a local time repeated by a fall-back fires once (its first occurrence).
Expressions with a wildcard hour ("0 * * * *", "*/15 * * * *") follow elapsed time: an
hourly job fires every real hour, so it fires twice in a repeated hour and not at all in a
skipped one."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import islice, takewhile
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

from service.schemas import CatchUp

ALIASES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
# Catch-up "all" and a long stall fire at most this many jobs per schedule per pass.
MAX_FIRES = 1000
_MICROSECOND = timedelta(microseconds=1)
_PROBE = datetime(2000, 1, 1, tzinfo=UTC)


def cron_expression(text: str) -> str:
    """The 5-field expression of ``text`` (an alias resolved); ValueError if invalid."""
    stripped = text.strip()
    expression = ALIASES.get(stripped.lower(), stripped)
    if expression.startswith("@"):
        raise ValueError(f"unknown cron alias {stripped!r}; use one of {', '.join(ALIASES)}")
    if len(expression.split()) != 5:
        raise ValueError(
            f"{stripped!r} has {len(expression.split())} fields; a cron expression has 5: "
            "minute hour day-of-month month day-of-week"
        )
    try:
        next(CronSim(expression, _PROBE))
    except CronSimError as exc:
        raise ValueError(f"{exc} in cron expression {stripped!r}") from None
    except StopIteration:
        raise ValueError(f"cron expression {stripped!r} never matches") from None
    except (ValueError, IndexError, KeyError) as exc:  # malformed input cronsim did not expect
        raise ValueError(f"invalid cron expression {stripped!r}: {exc}") from None
    return expression


@functools.lru_cache(maxsize=512)
def zone(name: str) -> ZoneInfo:
    """The IANA zone ``name``; ValueError if unknown."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ValueError(f"unknown time zone {name!r}; use an IANA name like Asia/Seoul") from None


@dataclass(frozen=True, slots=True)
class Timing:
    """A schedule's ticks: ``cron`` read in ``zone``, or ``anchor + k * every``, limited
    to [start_at, end_at]. All instants are aware UTC."""

    cron: str | None
    every: int | None
    zone: str
    anchor: datetime
    start_at: datetime | None = None
    end_at: datetime | None = None

    def ticks_after(self, after: datetime) -> Iterator[datetime]:
        """Ticks strictly after ``after``, ascending (an endless iterator without end_at)."""
        if self.start_at is not None and after < self.start_at:
            after = self.start_at - _MICROSECOND
        raw = self._interval_ticks(after) if self.every else self._cron_ticks(after)
        for tick in raw:
            if self.end_at is not None and tick > self.end_at:
                return
            yield tick

    def next_after(self, after: datetime) -> datetime | None:
        return next(self.ticks_after(after), None)

    def _interval_ticks(self, after: datetime) -> Iterator[datetime]:
        assert self.every is not None
        step = timedelta(seconds=self.every)
        count = 0 if after < self.anchor else (after - self.anchor) // step + 1
        tick = self.anchor + count * step
        while True:
            yield tick
            tick += step

    def _cron_ticks(self, after: datetime) -> Iterator[datetime]:
        assert self.cron is not None
        local = after.astimezone(zone(self.zone))
        last = after
        for candidate in CronSim(cron_expression(self.cron), local):
            tick = candidate.astimezone(UTC)
            # cronsim walks fixed-time expressions in naive local time; started inside a
            # repeated hour it can offer that hour's first occurrence, which is behind us.
            if tick > last:
                last = tick
                yield tick


@dataclass(frozen=True, slots=True)
class Plan:
    """The ticks to submit a job for now (oldest first, each the key of its fire), the
    next tick after now, and how many due ticks are not fired (skipped or folded)."""

    fires: list[datetime]
    next_fire_at: datetime | None
    dropped: int


def plan_fires(
    timing: Timing,
    due: datetime,
    now: datetime,
    catch_up: CatchUp,
    grace: timedelta,
    limit: int = MAX_FIRES,
) -> Plan:
    """Which ticks from ``due`` (the earliest unfired tick) up to ``now`` to fire.

    A tick at most ``grace`` late is on time and fires, however many there are. Older
    ticks were missed (the service was down, or stalled): ``skip`` drops them, ``once``
    fires one job for all of them (keyed by the first), ``all`` fires each, at most
    ``limit`` in all, oldest first."""
    cutoff = now - grace
    fires: list[datetime] = []
    dropped = 0
    first_on_time: datetime | None = due
    if due < cutoff:
        missed = _ticks_from(timing, due, cutoff - _MICROSECOND, limit + 1)
        kept = _keep_missed(missed, catch_up, limit)
        fires.extend(kept)
        dropped = max(len(missed) - len(kept), 0)  # a lower bound when missed was cut
        first_on_time = timing.next_after(cutoff - _MICROSECOND)
    if first_on_time is not None:
        fires.extend(_ticks_from(timing, first_on_time, now, limit - len(fires)))
    return Plan(fires, timing.next_after(now), dropped)


def _ticks_from(timing: Timing, first: datetime, until: datetime, limit: int) -> list[datetime]:
    """``first`` (a tick) and the ticks after it, up to and including ``until``."""
    if first > until or limit <= 0:
        return []
    later = takewhile(lambda tick: tick <= until, timing.ticks_after(first))
    return [first, *islice(later, limit - 1)]


def _keep_missed(missed: list[datetime], catch_up: CatchUp, limit: int) -> list[datetime]:
    if not missed or catch_up == CatchUp.skip:
        return []
    if catch_up == CatchUp.once:
        return missed[:1]
    return missed[:limit]

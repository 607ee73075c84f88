"""The scheduler plugin every replica runs (service/loops.py runs it): fire due
schedules, then sleep until the earliest ``next_fire_at`` (or until a local change wakes
it: ``Signals.schedules``). There is no leader: replicas claim due schedules with row
locks and the fire key makes each tick fire once (see service.schedules).
``reconcile_interval_seconds`` caps the sleep, so a replica learns of a schedule created
or moved earlier on another replica within that bound; until then the replica that made
the change fires it.

Also here: the schedules file (CELERIAC_SCHEDULES_FILE), applied once at start-up."""

from __future__ import annotations

import logging
import tomllib
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from service import errors, schedules
from service.loops import Pass, Plugin
from service.runtime import Runtime
from service.schemas import ScheduleCreate

log = logging.getLogger("celeriac.scheduler")

# A due schedule we could not claim is being fired by another replica: look again soon
# (its commit moves next_fire_at) rather than spin on the stale value.
LOCKED_RETRY_SECONDS = 0.05
# Schedules fired per pass before the loop re-plans; each is its own transaction.
MAX_PER_PASS = 1000


async def fire_due(runtime: Runtime) -> int:
    """Fire every due schedule this replica can claim; how many it fired."""
    grace = timedelta(seconds=runtime.settings.schedule_misfire_grace_seconds)
    fired = 0
    for _ in range(MAX_PER_PASS):
        now = runtime.clock.now()

        def work(session: Session, now: datetime = now) -> schedules.Fired | None:
            return schedules.fire_next_due(session, now, grace, runtime.defaults)

        try:
            outcome = await runtime.db.run(work)
        except IntegrityError:
            # Another replica committed the same tick first: our job rolled back with
            # our fire row. The next pass sees its commit.
            log.warning("lost a race for a schedule tick; nothing was submitted twice")
            break
        if outcome is None:
            break
        if outcome.dropped:
            log.warning(
                "schedule %r: %d missed tick(s) not fired (catch_up policy, misfire grace)",
                outcome.schedule,
                outcome.dropped,
            )
        await runtime.after_submit(outcome.jobs)
        fired += 1
    return fired


class Scheduler(Plugin):
    name = "scheduler"

    def __init__(self, runtime: Runtime) -> None:
        self.interval = runtime.settings.reconcile_interval_seconds
        self.wakes = (runtime.signals.schedules,)

    async def run_once(self, runtime: Runtime) -> Pass:
        if await fire_due(runtime) >= MAX_PER_PASS:
            return Pass(more=True)
        upcoming = await runtime.db.read(schedules.next_due_at)
        now = runtime.clock.now()
        if upcoming is not None and upcoming <= now:
            # Due but not claimed: another replica holds it (or won its tick just now).
            upcoming = now + timedelta(seconds=LOCKED_RETRY_SECONDS)
        return Pass(due=upcoming)


async def prepare_scheduler(runtime: Runtime) -> None:
    """Before the first pass: measure the database's clock (ticks are instants on it) and
    apply the schedules file (an invalid one stops start-up)."""
    await runtime.db.read(runtime.clock.measure)
    if runtime.settings.schedules_file:
        await apply_schedules_file(runtime, Path(runtime.settings.schedules_file))


# --- the schedules file -----------------------------------------------------------------


class ScheduleFileError(ValueError):
    """The schedules file cannot be read or holds an invalid schedule."""


def _parse(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ScheduleFileError(f"CELERIAC_SCHEDULES_FILE: cannot read {path}: {exc}") from None
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            return tomllib.loads(text)
        if suffix in (".yaml", ".yml"):
            import yaml

            return yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, ValueError) as exc:
        raise ScheduleFileError(f"{path}: not valid {suffix[1:].upper()}: {exc}") from None
    raise ScheduleFileError(f"{path}: the schedules file must end in .yaml, .yml or .toml")


def load_schedules_file(path: Path) -> list[ScheduleCreate]:
    """The schedules of a YAML or TOML file: a list of schedules in the API's shape, at
    the top level (YAML) or under the key ``schedules`` (YAML, or TOML's [[schedules]])."""
    data = _parse(path)
    entries = data.get("schedules") if isinstance(data, dict) else data
    if entries is None:
        return []
    if not isinstance(entries, list):
        raise ScheduleFileError(f"{path}: expected a list of schedules")
    specs = [_entry(path, index, entry) for index, entry in enumerate(entries)]
    repeated = [name for name, n in Counter(spec.name for spec in specs).items() if n > 1]
    if repeated:
        raise ScheduleFileError(f"{path}: schedule names appear more than once: {repeated}")
    return specs


def _entry(path: Path, index: int, entry: Any) -> ScheduleCreate:
    where = f"schedules[{index}]"
    try:
        spec = ScheduleCreate.model_validate(entry)
        schedules.check_spec(spec, where=where)
    except ValidationError as exc:
        raise ScheduleFileError(f"{path}: {where}: {exc}") from None
    except errors.ValidationFailed as exc:
        raise ScheduleFileError(f"{path}: {exc.detail}") from None
    return spec


async def apply_schedules_file(runtime: Runtime, path: Path) -> dict[str, str]:
    """Upsert the file's schedules by name, idempotently: an unchanged schedule is not
    written, so a restart neither resets last_fired_at nor moves next_fire_at. Schedules
    missing from the file are left alone (delete them over the API)."""
    specs = load_schedules_file(path)

    def work(session: Session) -> dict[str, str]:
        now = runtime.clock.now()
        return {spec.name: schedules.upsert_schedule(session, spec, now) for spec in specs}

    # Replicas starting together may insert the same new name at once: the loser's
    # retry finds the winner's row and has nothing left to do.
    for attempt in range(3):
        try:
            outcome = await runtime.db.run(work)
            break
        except (IntegrityError, OperationalError):
            if attempt == 2:
                raise
    counts = Counter(outcome.values())
    log.info(
        "schedules file %s: %d created, %d updated, %d unchanged",
        path, counts["created"], counts["updated"], counts["unchanged"],
    )  # fmt: skip
    if counts["created"] or counts["updated"]:
        runtime.signals.schedules.set()
    return outcome

"""The database's clock (service/runtime.py, ``Clock``): the offset the service adds to its
own clock, so that replicas with skewed clocks agree on ``created_at`` and ``run_at``.
Here the database runs on this host's clock, so the offset must come out near zero."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import migrated_database, selected_databases
from sqlalchemy.orm import Session

from service.db import Database
from service.runtime import Clock

# Same host, same clock: anything beyond a few loopback round trips is a measuring error.
SAME_HOST_SLACK_SECONDS = 0.02


@pytest.fixture(params=[d for d in selected_databases() if d != "sqlite"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    with migrated_database(str(request.param), tmp_path) as database:
        yield database


def test_the_clock_is_read_when_measured_not_when_the_transaction_began(db: Database) -> None:
    """PostgreSQL's now() is the start of the transaction: read 0.3 s into one, it put
    every job's timestamps 0.3 s early (15 ms early under an ordinary load)."""
    clock = Clock()

    def measure_late(session: Session) -> None:
        session.execute(sa.text("SELECT 1"))  # the transaction has begun
        time.sleep(0.3)
        clock.measure(session)

    db.run_sync(measure_late)
    assert abs(clock.offset.total_seconds()) < SAME_HOST_SLACK_SECONDS, clock.offset

"""How ``make test`` spreads the suite over two processes (pytest-xdist, ``-n 2 --dist
loadscope``): most of a test's time is spent waiting on services, workers and leases, and
the suite has to stay under 15 minutes on a 2-core machine.

A unit of work is a test module, so that its module fixtures (a service, a cluster) are
set up once; every process sets up the session's backends it needs itself (a database, a
Redis prefix and a service of its own, as in a one-process run). One exception: whatever
uses the machine's one RabbitMQ is a single unit in collection order, because
``test_amqp.py`` stops and starts the RabbitMQ application under its own service, which a
test on another process must not see. Modules known to be long go out first, so that no
process idles at the end while the other finishes one.

xdist's ``loadgroup`` would do the grouping from ``xdist_group`` marks, but with pytest 9.2
it silently stops grouping (pytest-dev/pytest-xdist#1386): hence a scheduler of our own.
"""

from __future__ import annotations

import re

from xdist.scheduler import LoadScopeScheduling
from xdist.workermanage import WorkerController

RABBITMQ_UNIT = "rabbitmq"
# A matrix test on a RabbitMQ backend: tests/x.py::test_y[postgres-amqp] (or ...-amqp-...]).
_ON_RABBITMQ = re.compile(r"\[(?:[^\]]*-)?(?:sqlite|postgres|mariadb)-amqp(?:-[^\]]*)?\]$")
# The longest modules (minutes of a one-process run, 2026-12-06): sent out first.
LONGEST_FIRST = (
    "tests/test_fuzz.py",  # 107 s in 13 tests
    "tests/test_core.py",  # 131 s
    "tests/test_schedules.py",  # 48 s
    "tests/test_flow_invariants.py",  # 47 s in 10 tests
    "tests/test_longpoll.py",  # 39 s in 6 tests
    "tests/test_workflows_run.py",  # 37 s
)


def unit_of(nodeid: str) -> str:
    """The unit of work a test belongs to: its module, or the RabbitMQ unit."""
    module = nodeid.split("::", 1)[0]
    if module.endswith("/test_amqp.py") or _ON_RABBITMQ.search(nodeid):
        return RABBITMQ_UNIT
    return module


def _rank(unit: str) -> int:
    return LONGEST_FIRST.index(unit) if unit in LONGEST_FIRST else len(LONGEST_FIRST)


class ModuleScheduling(LoadScopeScheduling):
    """``loadscope`` with ``unit_of`` as the scope, the longest units handed out first."""

    def _split_scope(self, nodeid: str) -> str:
        return unit_of(nodeid)

    def _assign_work_unit(self, node: WorkerController) -> None:
        # The first of the longest waiting units (else the queue's own order) goes next.
        _, _, unit = min((_rank(unit), at, unit) for at, unit in enumerate(self.workqueue))
        self.workqueue.move_to_end(unit, last=False)
        super()._assign_work_unit(node)

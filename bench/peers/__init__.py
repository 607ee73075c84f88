"""The systems of the side-by-side bench and the configurations (variants) measured for
each scenario. The first variant of a scenario is the system's headline configuration: the
one celeriac's ratios are computed against.

"keyed", "plain" and "fairness" are celeriac's flow control (issue 15), beside itself.

"sequential" is one thread submitting one job at a time (``delay()``, ``send()``, …), for
every system; "submit" is the bulk paths (celeriac's 16 client threads and ``POST
/jobs/batch``, RQ's ``enqueue_many``), which the other peers do not have.

A system's module reads its configuration from the environment when imported, so
``load()`` sets the variant's environment first; each sample runs in its own process.
"""

from __future__ import annotations

import importlib
import os

import flow_keyed

from peers.base import System

# the flow-control scenarios (issue 15, bench/flow_keyed.py) are celeriac's alone
SCENARIOS = ("sequential", "submit", "drain", "latency", "fanout", *flow_keyed.SCENARIOS)

VARIANTS: dict[str, dict[str, list[str]]] = {
    "celeriac": {
        "sequential": ["delay(), PostgreSQL"],
        "submit": ["POST /jobs x16 clients", "POST /jobs/batch of 1000"],
        "drain": ["http worker -c 8", "redis worker -c 8", "redis protocol loop"],
        "latency": [
            "http worker -c 8",
            "http worker -c 8, SQL broker",
            "redis worker -c 8",
            "SQLite default, http worker -c 8",
        ],
        "fanout": ["4 x http worker -c 8"],
        **flow_keyed.variants(),
    },
    "celery": {
        "sequential": ["delay()"],
        "drain": [
            "prefork -c 2, redis results",
            "prefork -c 2, postgres results",
            "threads -c 8, redis results",
        ],
        "latency": ["prefork -c 2, redis results"],
        "fanout": ["4 nodes x prefork -c 1"],
    },
    "dramatiq": {
        "sequential": ["send(), redis", "send(), rabbitmq"],
        "drain": [
            "redis, 2 proc x 8 threads (default)",
            "redis, 1 proc x 8 threads",
            "rabbitmq, 2 proc x 8 threads",
        ],
        "latency": ["redis, 2 proc x 8 threads (default)", "rabbitmq, 2 proc x 8 threads"],
        "fanout": ["redis, 4 proc x 8 threads"],
    },
    "huey": {
        "sequential": ["call"],
        "drain": ["2 processes"],
        "latency": ["2 processes"],
        "fanout": ["4 processes"],
    },
    "rq": {
        "sequential": ["enqueue()"],
        "submit": ["enqueue_many() of 1000"],
        "drain": ["SimpleWorker --burst"],
        "latency": ["SimpleWorker"],
        "fanout": ["4 x SimpleWorker --burst"],
    },
}

MODULES = {
    "celeriac": "celeriac_side",
    "celery": "peers.celery",
    "dramatiq": "peers.dramatiq",
    "huey": "peers.huey",
    "rq": "peers.rq",
}


def variant_env(system: str, variant: str) -> dict[str, str]:
    """What a variant sets in the environment before its system's module is imported."""
    if system == "dramatiq":
        return {"BENCH_DRAMATIQ_BROKER": "rabbitmq" if "rabbitmq" in variant else "redis"}
    return {}


def load(system: str, variant: str) -> System:
    os.environ.update(variant_env(system, variant))
    module = importlib.import_module(MODULES[system])
    cls: type[System] = module.SYSTEM
    return cls(variant)

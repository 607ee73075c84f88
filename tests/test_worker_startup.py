"""A worker's start-up imports only what it uses (issue 14): ``celeriac`` exports
``AsyncClient`` without importing httpx until it is asked for (httpx was about 0.1 s of
a worker's 0.3 s from exec to its first result; bench/worker_startup.py), asyncio only
when a task needs it, and no plugins for its own commands."""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = """
import json, sys
import celeriac, celeriac.cli, celeriac.worker, celeriac._transport_redis, celeriac._pools
before = {name: name in sys.modules for name in ("httpx", "asyncio")}
from celeriac import AsyncClient
from celeriac.client import AsyncClient as same
print(json.dumps({"before": before, "after": "httpx" in sys.modules,
                  "name": AsyncClient.__name__, "same": AsyncClient is same}))
"""


def test_a_worker_imports_no_httpx_nor_asyncio_and_async_client_still_imports() -> None:
    """asyncio is about 28 ms of a start, and a worker running plain functions in its
    threads never needs it: the async pool and ``async def`` tasks import it when used."""
    probe = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60, check=True
    )
    found = json.loads(probe.stdout)
    assert found == {
        "before": {"httpx": False, "asyncio": False},
        "after": True,
        "name": "AsyncClient",
        "same": True,
    }


def test_the_sdk_says_the_version_it_was_installed_as() -> None:
    """``celeriac.__version__`` (what a worker registers with) is the distribution's."""
    import importlib.metadata

    import celeriac

    assert celeriac.__version__ == importlib.metadata.version("celeriac")


def test_only_a_command_of_the_sdk_skips_the_plugins() -> None:
    """``celeriac worker`` starts without reading every distribution's entry points;
    anything else (a server command, ``--help``, a typo) loads them first."""
    from celeriac.cli import _own_command

    assert _own_command(["worker"]) and _own_command(["multi"]) and _own_command(["jobs"])
    for first in ([], ["serve"], ["migrate"], ["--help"], ["wokrer"]):
        assert not _own_command(first), first


def test_an_unknown_attribute_is_still_an_attribute_error() -> None:
    import celeriac
    import celeriac.client

    for module in (celeriac, celeriac.client):
        assert not hasattr(module, "NoSuchThing")

"""A worker's start-up imports only what it uses (issue 14): ``celeriac`` exports
``AsyncClient`` without importing httpx until it is asked for (httpx was about 0.1 s of
a worker's 0.3 s from exec to its first result; bench/worker_startup.py)."""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = """
import json, sys
import celeriac, celeriac.cli, celeriac.worker, celeriac._transport_redis
before = "httpx" in sys.modules
from celeriac import AsyncClient
from celeriac.client import AsyncClient as same
print(json.dumps({"before": before, "after": "httpx" in sys.modules,
                  "name": AsyncClient.__name__, "same": AsyncClient is same}))
"""


def test_a_worker_imports_no_httpx_and_async_client_still_imports() -> None:
    probe = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60, check=True
    )
    found = json.loads(probe.stdout)
    assert found == {"before": False, "after": True, "name": "AsyncClient", "same": True}


def test_an_unknown_attribute_is_still_an_attribute_error() -> None:
    import celeriac
    import celeriac.client

    for module in (celeriac, celeriac.client):
        assert not hasattr(module, "NoSuchThing")

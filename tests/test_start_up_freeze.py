"""The service's start-up objects are frozen out of the garbage collector's full passes
(service/app.py, ``freeze_start_up_objects``) in the process that serves, and only there.
Run in a child process: a freeze in pytest's own would outlive the test."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

CHILD = """
import asyncio, gc, json, sys, threading
from service.app import create_app
from service.settings import Settings

async def frozen_while_serving() -> int:
    app = create_app(Settings(database_url=sys.argv[1]))
    async with app.router.lifespan_context(app):
        return gc.get_freeze_count()

seen = {}
worker = threading.Thread(target=lambda: seen.update(thread=asyncio.run(frozen_while_serving())))
worker.start()
worker.join()
seen["main"] = asyncio.run(frozen_while_serving())
print(json.dumps(seen))
"""


def test_the_serving_process_freezes_what_start_up_built(tmp_path: Path) -> None:
    database = f"sqlite:///{tmp_path / 'freeze.db'}"
    done = subprocess.run(
        [sys.executable, "-c", CHILD, database],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={"PATH": "/usr/bin:/bin", "CELERIAC_LOG_LEVEL": "warning"},
    )
    assert done.returncode == 0, done.stderr
    frozen = json.loads(done.stdout.strip().splitlines()[-1])
    assert frozen["thread"] == 0  # an app in another thread (a test client): no freeze
    # The main thread's app (as under ``celeriac serve``): the modules, the app, its
    # routes and schemas, far more than a few objects.
    assert frozen["main"] > 50_000

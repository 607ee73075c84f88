"""The worker SDK installs without the server (issue 13, item 5).

``pip install ./workers/python`` into a fresh virtualenv: no FastAPI, SQLAlchemy,
database driver, Alembic, uvicorn or aio-pika arrives, the ``service`` package is not
importable, and ``celeriac worker --app …`` from that venv runs a job submitted to a real
service. ``celeriac serve`` there says to install the server instead of failing with an
ImportError. The install reaches the package index for httpx and typer (as a user's
would); the source is copied first so the build leaves nothing in the checkout.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, Api, Spawner, spawn, unique_name

# What only the service needs: none of it may reach a worker machine.
SERVER_ONLY = {
    "fastapi", "sqlalchemy", "psycopg", "psycopg-binary", "alembic", "uvicorn", "aio-pika",
    "pymysql", "celeriac-server",
}  # fmt: skip
SERVER_MODULES = ["service", "fastapi", "sqlalchemy", "psycopg", "alembic", "uvicorn", "aio_pika"]

TASKS = f"""
import sys

from celeriac import Celeriac

app = Celeriac("sdk")


@app.task(name="sdk.add")
def add(x: int, y: int) -> dict[str, object]:
    loaded = [name for name in {SERVER_MODULES!r} if name in sys.modules]
    return {{"sum": x + y, "server_modules": loaded}}
"""


class Venv:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.bin = root / "bin"

    def env(self) -> dict[str, str]:
        """Nothing of the checkout or of the test's own venv: no PYTHONPATH, no
        CELERIAC_* settings from the developer's shell."""
        drop = ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")
        env = {
            key: value
            for key, value in os.environ.items()
            if key not in drop and not key.startswith("CELERIAC_")
        }
        env["PATH"] = f"{self.bin}{os.pathsep}{env.get('PATH', '')}"
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def run(self, *argv: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.bin / argv[0]), *argv[1:]], cwd=cwd, env=self.env(),
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip


@pytest.fixture(scope="module")
def sdk(tmp_path_factory: pytest.TempPathFactory) -> Venv:
    root = tmp_path_factory.mktemp("sdk-install")
    source = root / "source"
    shutil.copytree(
        REPO / "workers/python", source,
        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "dist"),
    )  # fmt: skip
    made = subprocess.run(
        [sys.executable, "-m", "venv", str(root / "venv")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    venv = Venv(root / "venv")
    installed = venv.run("pip", "install", "--quiet", str(source), cwd=root, timeout=90)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    return venv


@pytest.fixture(scope="module")
def workdir(sdk: Venv) -> Path:
    path = sdk.root / "app"
    path.mkdir()
    (path / "sdk_tasks.py").write_text(TASKS)
    return path


def test_sdk_installs_none_of_the_server(sdk: Venv, workdir: Path) -> None:
    probe = (
        "import importlib.metadata as m, importlib.util as u, json; print(json.dumps({"
        "'dists': sorted(d.metadata['Name'].lower().replace('_', '-') "
        "for d in m.distributions()), 'service': u.find_spec('service') is not None}))"
    )
    ran = sdk.run("python", "-c", probe, cwd=workdir)
    assert ran.returncode == 0, ran.stderr
    found = json.loads(ran.stdout)
    assert "celeriac" in found["dists"], found
    assert not SERVER_ONLY & set(found["dists"]), found["dists"]
    assert not found["service"], "the service package is importable from the SDK's venv"


def test_sdk_command_has_the_worker_commands_only(sdk: Venv, workdir: Path) -> None:
    ran = sdk.run("celeriac", "--help", cwd=workdir)
    assert ran.returncode == 0, ran.stderr
    for command in ("worker", "multi", "jobs", "schedules"):
        assert f" {command} " in ran.stdout, ran.stdout
    assert " serve " not in ran.stdout  # --help lists only what works here


@pytest.mark.parametrize("command", [["serve"], ["serve", "--port", "8001"], ["migrate"]])
def test_server_commands_say_to_install_the_server(
    sdk: Venv, workdir: Path, command: list[str]
) -> None:
    for argv in (["celeriac", *command], ["python", "-m", "celeriac", *command]):
        ran = sdk.run(*argv, cwd=workdir)
        assert ran.returncode == 2, ran.stdout + ran.stderr
        assert f"`celeriac {command[0]}` is part of the celeriac service" in ran.stderr
        assert "celeriac-server" in ran.stderr and "Traceback" not in ran.stderr


def test_redis_broker_without_the_extra_says_which_extra(sdk: Venv, workdir: Path) -> None:
    argv = ["celeriac", "worker", "--app", "sdk_tasks:app", "--broker", "redis://127.0.0.1:1/0"]
    ran = sdk.run(*argv, cwd=workdir)
    assert ran.returncode == 2, ran.stdout + ran.stderr
    assert "pip install 'celeriac[redis]'" in ran.stderr and "Traceback" not in ran.stderr


@pytest.mark.timeout(120)
def test_sdk_worker_runs_a_job(sdk: Venv, workdir: Path, spawner: Spawner) -> None:
    service = spawner.service()  # sqlite-sql, from the checkout's own venv
    queue = unique_name("sdk_")
    with Api(service.url) as api:
        job = api.submit(task="sdk.add", args=[2, 3], queue=queue)
        argv = [str(sdk.bin / "celeriac"), "worker", "--app", "sdk_tasks:app"]
        argv += ["--server", service.url, "-Q", queue, "-c", "1", "--poll-wait", "1"]
        worker = spawn(argv, sdk.env(), workdir, "sdk-worker")
        try:
            finished = api.wait_finished(job["id"], timeout=30)
            assert finished["status"] == "succeeded", f"{finished}\n{worker.log()}"
            assert finished["result"] == {"sum": 5, "server_modules": []}
            assert worker.proc.poll() is None, worker.log()
            worker.proc.send_signal(signal.SIGTERM)  # a warm shutdown ends on its own
            assert worker.proc.wait(timeout=20) == 0, worker.log()
        finally:
            worker.stop()

"""examples/flask_upload end to end: a real service, a real ``celeriac worker`` running
examples/flask_upload/tasks.py, and the Flask app served by ``flask run``. The upload
answers long before the job (about 2 s) is done; the status page then shows the result."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import Process, Service, Spawner, free_port, unavailable

PROCESS_SECONDS = 2.0
TEXT = "the quick brown fox\njumps over\nthe lazy dog\n"


@pytest.fixture(scope="module", autouse=True)
def flask_installed() -> None:
    try:
        import flask  # noqa: F401
    except ImportError:
        unavailable("flask is missing: it is in the dev extra, pip install -e '.[dev]'")


def start_flask(spawner: Spawner, service: Service, upload_dir: Path) -> tuple[Process, str]:
    port = free_port()
    flask = spawner.process(
        [sys.executable, "-m", "flask", "--app", "examples.flask_upload.app", "run",
         "--host", "127.0.0.1", "--port", str(port)],
        "flask",
        {"CELERIAC_SERVER_URL": service.url, "UPLOAD_DIR": str(upload_dir)},
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        assert flask.proc.poll() is None, flask.log()
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return flask, url
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"flask did not start:\n{flask.log()}"
        time.sleep(0.1)


def test_the_upload_answers_at_once_and_the_status_page_shows_the_result(
    spawner: Spawner, tmp_path: Path
) -> None:
    service = spawner.service()
    worker = spawner.process(
        [sys.executable, "-m", "celeriac", "worker", "--app", "examples.flask_upload.tasks:app",
         "--queues", "uploads", "--poll-wait", "1"],
        "upload-worker",
        {"CELERIAC_SERVER_URL": service.url, "UPLOAD_PROCESS_SECONDS": str(PROCESS_SECONDS)},
    )  # fmt: skip
    _flask, url = start_flask(spawner, service, tmp_path / "uploads")

    with httpx.Client(base_url=url, timeout=30) as web:
        started = time.monotonic()
        answer = web.post("/upload", files={"file": ("notes.txt", TEXT.encode(), "text/plain")})
        elapsed = time.monotonic() - started
        assert answer.status_code == 202, answer.text
        assert elapsed < PROCESS_SECONDS / 2, f"the upload took {elapsed:.2f}s"
        body = answer.json()
        job_id = body["job_id"]
        assert body["status"] == "queued"
        assert answer.headers["location"] == body["status_url"] == f"/status/{job_id}"
        assert list((tmp_path / "uploads").glob("*-notes.txt")), "the file was not stored"

        seen: set[str] = set()
        deadline = time.monotonic() + 30
        while True:
            status = web.get(body["status_url"], headers={"Accept": "application/json"})
            assert status.status_code == 200, status.text
            job = status.json()
            seen.add(job["status"])
            if job["status"] in ("succeeded", "failed", "cancelled", "expired"):
                break
            assert time.monotonic() < deadline, f"job not finished:\n{worker.log()}"
            time.sleep(0.2)

        assert job["status"] == "succeeded", job
        assert seen & {"queued", "running"}, "the upload did not return before the work"
        result = job["result"]
        assert (result["lines"], result["words"], result["bytes"]) == (3, 9, len(TEXT))
        assert result["file"].endswith("-notes.txt")

        page = web.get(body["status_url"], headers={"Accept": "text/html"})
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert "succeeded" in page.text
        assert "<td>words</td><td>9</td>" in page.text
        assert 'http-equiv="refresh"' not in page.text  # finished: no more refreshing

        assert web.get("/status/not-a-job").status_code == 404
        assert web.post("/upload").status_code == 400

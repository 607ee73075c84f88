"""Issue 17: the dashboard at /ui, in a real headless Chromium (Debian's ``chromium``,
driven by Playwright for Python pointed at that executable: no browser download).

One keyed service (SQLite, SQL broker) with an admin key and a read key, and a real
``celeriac worker``. The tests fill a queue, then use the pages as a person would: the
overview shows the queue, the jobs list filters, a failed job shows its traceback, retry
(one job, then a filtered set in bulk) makes them succeed once the worker runs them, and a
read key sees the action buttons refused. Each page's screenshot is written to
docs/screenshots/ (the README shows them), so they stay current."""

from __future__ import annotations

import secrets
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import IN_CI, Api, Service, Spawner, expect

pytestmark = pytest.mark.timeout(120)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SCREENSHOTS = Path(__file__).resolve().parent.parent / "docs" / "screenshots"
ADMIN_KEY = "ui-admin-" + secrets.token_hex(16)
READ_KEY = "ui-read-" + secrets.token_hex(16)
WORKER_KEY = "ui-work-" + secrets.token_hex(16)
QUEUE = "ui-demo"

sync_api = pytest.importorskip("playwright.sync_api")
if not Path(CHROMIUM).exists():
    if IN_CI:
        raise RuntimeError("the dashboard tests need Debian's chromium (apt-get install chromium)")
    pytest.skip("chromium is not installed (apt-get install chromium)", allow_module_level=True)


@pytest.fixture(scope="module")
def keyed(module_spawner: Spawner) -> Service:
    keys = f"{ADMIN_KEY}:admin,{READ_KEY}:read,{WORKER_KEY}:work"
    return module_spawner.service(extra={"CELERIAC_API_KEYS": keys})


@pytest.fixture(scope="module")
def admin(keyed: Service) -> Iterator[Api]:
    with Api(keyed.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as client:
        yield client


@pytest.fixture(scope="module")
def worker(keyed: Service, module_spawner: Spawner) -> Any:
    command = [
        sys.executable, "-m", "celeriac", "worker",
        "--app", "tasks_for_tests:app", "--server", keyed.url,
        "-c", "2", "-Q", QUEUE, "-l", "warning", "--hostname", "ui-worker", "--poll-wait", "1",
    ]  # fmt: skip
    return module_spawner.process(command, "ui-worker", env={"CELERIAC_API_KEY": WORKER_KEY})


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    opened = context.new_page()
    errors: list[str] = []
    opened.on("pageerror", lambda exc: errors.append(str(exc)))
    yield opened
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def log_in(page: Any, service: Service, key: str) -> None:
    page.goto(f"{service.url}/ui")
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Log in").click()
    page.get_by_role("heading", name="Overview").wait_for()


def shoot(page: Any, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def failed_job(admin: Api, label: str) -> dict[str, Any]:
    spec = {"task": "tests.fail_first", "args": [label], "queue": QUEUE, "max_retries": 0}
    job = expect(admin.http.post("/jobs", params={"wait": 20}, json=spec), 202)
    assert job["status"] == "failed", job
    return job


def test_the_overview_shows_a_filled_queue(page: Any, keyed: Service, admin: Api) -> None:
    filled = f"ui-fill-{secrets.token_hex(3)}"
    admin.submit_batch([{"task": "tests.add", "args": [i, i], "queue": filled} for i in range(7)])
    limit = {"max_running": 2, "rate": {"limit": 100, "period": 60}}
    expect(admin.http.put(f"/limits/{filled}-api", json=limit), 200)
    log_in(page, keyed, ADMIN_KEY)
    limits = page.get_by_role("row").filter(
        has=page.get_by_role("rowheader", name=f"{filled}-api", exact=True)
    )
    limits.wait_for()
    assert limits.get_by_role("cell").all_inner_texts()[:2] == ["2", "100 per 60 s"]
    row = page.get_by_role("row").filter(has=page.get_by_role("rowheader", name=filled, exact=True))
    row.wait_for()
    assert row.get_by_role("cell").nth(0).inner_text() == "7"  # queued
    shoot(page, "overview")
    # Pausing from the overview pauses the queue in the service (flow control).
    row.get_by_role("button", name="Pause").click()
    row.get_by_role("button", name="Resume").wait_for()
    assert expect(admin.http.get(f"/queues/{filled}"), 200)["paused"] is True
    row.get_by_role("button", name="Resume").click()
    row.get_by_role("button", name="Pause").wait_for()
    assert expect(admin.http.get(f"/queues/{filled}"), 200)["paused"] is False
    # No key material anywhere in what the page holds.
    assert ADMIN_KEY not in page.content()
    assert ADMIN_KEY not in page.evaluate("document.cookie")  # HttpOnly: not readable


def test_jobs_filter_and_a_failed_job_shows_its_traceback(
    page: Any, keyed: Service, admin: Api, worker: Any
) -> None:
    job = failed_job(admin, "traceback")
    log_in(page, keyed, ADMIN_KEY)
    page.get_by_role("link", name="Jobs").click()
    page.get_by_label("Status").select_option("failed")
    page.get_by_label("Queue").fill(QUEUE)
    page.get_by_role("button", name="Filter").click()
    page.get_by_role("link", name=job["id"]).wait_for()
    statuses = page.locator("tbody .status").all_inner_texts()
    assert statuses and set(statuses) == {"failed"}, statuses
    shoot(page, "jobs")
    page.get_by_role("link", name=job["id"]).click()
    traceback = page.locator("pre.traceback")
    traceback.wait_for()
    assert "ValueError: traceback: the first attempt always fails" in traceback.inner_text()
    shoot(page, "job")


def test_retry_from_the_job_page_succeeds(
    page: Any, keyed: Service, admin: Api, worker: Any
) -> None:
    job = failed_job(admin, "retry-me")
    log_in(page, keyed, ADMIN_KEY)
    page.goto(f"{keyed.url}/ui#/jobs/{job['id']}")
    page.get_by_role("button", name="Retry").click()
    page.get_by_role("status").get_by_text("queued again").wait_for()
    done = expect(admin.http.get(f"/jobs/{job['id']}", params={"wait": 20}), 200)
    assert (done["status"], done["result"]) == ("succeeded", "retry-me: ok on attempt 1")
    page.reload()
    page.locator(".status.succeeded").first.wait_for()


def test_bulk_retry_of_a_filtered_set(page: Any, keyed: Service, admin: Api, worker: Any) -> None:
    jobs = [failed_job(admin, f"bulk-{i}") for i in range(3)]
    log_in(page, keyed, ADMIN_KEY)
    page.goto(f"{keyed.url}/ui#/jobs?status=failed&queue={QUEUE}&task=tests.fail_first")
    page.get_by_role("link", name=jobs[0]["id"]).wait_for()
    page.once("dialog", lambda dialog: dialog.accept())  # the confirmation
    page.get_by_role("button", name="Retry all").click()
    message = page.get_by_role("status").get_by_text("retry:")
    message.wait_for()
    assert "changed" in message.inner_text()
    for job in jobs:
        done = expect(admin.http.get(f"/jobs/{job['id']}", params={"wait": 20}), 200)
        assert done["status"] == "succeeded", done


def test_a_read_key_sees_but_cannot_act(page: Any, keyed: Service, admin: Api) -> None:
    job = admin.submit(task="tests.add", args=[1, 1], queue="ui-read-only")
    log_in(page, keyed, READ_KEY)
    page.goto(f"{keyed.url}/ui#/jobs/{job['id']}")
    retry = page.get_by_role("button", name="Retry")
    retry.wait_for()
    assert retry.is_disabled() and page.get_by_role("button", name="Cancel").is_disabled()
    assert "admin scope" in (retry.get_attribute("title") or "")
    # The API refuses the cookie's key too, whatever the page shows.
    refused = page.evaluate(
        """async (id) => (await fetch(`/jobs/${id}/cancel`, {method: "POST",
             headers: {"X-Celeriac-UI": "1"}})).status""",
        job["id"],
    )
    assert refused == 403
    # Without the UI header the cookie is not a credential at all (CSRF).
    anonymous = page.evaluate("async () => (await fetch('/jobs')).status")
    assert anonymous == 401


def test_workers_and_schedules_pages(page: Any, keyed: Service, admin: Api, worker: Any) -> None:
    name = f"ui-sched-{secrets.token_hex(3)}"
    schedule = {"name": name, "every": 3600, "job": {"task": "tests.add", "args": [2, 2],
                                                      "queue": QUEUE}}  # fmt: skip
    expect(admin.http.post("/schedules", json=schedule), 201)
    log_in(page, keyed, ADMIN_KEY)
    page.get_by_role("link", name="Workers").click()
    page.get_by_role("rowheader", name="ui-worker").first.wait_for()
    shoot(page, "workers")
    page.get_by_role("link", name="Schedules").click()
    row = page.get_by_role("row").filter(has=page.get_by_role("rowheader", name=name, exact=True))
    row.get_by_role("button", name="Pause").click()
    row.get_by_role("button", name="Resume").wait_for()
    assert expect(admin.http.get(f"/schedules/{name}"), 200)["enabled"] is False
    row.get_by_role("button", name="Trigger now").click()
    page.get_by_role("status").get_by_text("Triggered").wait_for()
    shoot(page, "schedules")


def test_a_phone_sized_screen_keeps_every_section_reachable(page: Any, keyed: Service) -> None:
    page.set_viewport_size({"width": 390, "height": 844})
    log_in(page, keyed, ADMIN_KEY)
    for section in ("Jobs", "Workers", "Schedules", "Overview"):
        link = page.get_by_role("link", name=section, exact=True)
        assert link.is_visible()
        link.focus()
        page.keyboard.press("Enter")
        page.get_by_role("heading", name=section).wait_for()
    shoot(page, "overview-phone")

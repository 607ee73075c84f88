"""Webhooks (issue 5): signed completion callbacks from the outbox to a REAL local HTTP
receiver, against real service processes on fresh migrated databases.

Signatures are checked with the ``standardwebhooks`` package, an implementation
independent of ours. The receiver is a thread running http.server on 127.0.0.1, which
the service may call only because the suite allows it (CELERIAC_WEBHOOK_ALLOWED_HOSTS):
by default loopback is refused, as the SSRF tests show."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    DATABASES,
    SELECTED_BACKENDS,
    Api,
    Service,
    Spawner,
    assert_problem,
    expect,
)
from standardwebhooks import Webhook

from service import webhooks
from service.netguard import AddressPolicy, AddressRefused, GuardedBackend, why_refused
from service.settings import Settings
from service.webhook_delivery import decide, parse_secrets, retry_after_seconds, signature

pytestmark = pytest.mark.timeout(120)

SECRET_OLD = "whsec_" + base64.b64encode(b"an old secret of 32 bytes.......").decode()
SECRET_NEW = "whsec_" + base64.b64encode(b"the new secret, 32 bytes too....").decode()
DEFAULT_QUEUE = "hooked"  # the queue with a default webhook (CELERIAC_WEBHOOK_QUEUE_DEFAULTS)
FAST = {
    "CELERIAC_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1",
    "CELERIAC_WEBHOOK_SECRET": f"{SECRET_OLD} {SECRET_NEW}",  # rotation: both sign
    "CELERIAC_WEBHOOK_TIMEOUT_SECONDS": "2",
    "CELERIAC_WEBHOOK_RETRY_BASE_SECONDS": "0.1",
    "CELERIAC_WEBHOOK_RETRY_MAX_SECONDS": "0.3",
    "CELERIAC_WEBHOOK_RETRY_WINDOW_SECONDS": "60",
    "CELERIAC_WEBHOOK_CONCURRENCY": "4",
}


# --- the receiver ------------------------------------------------------------------------


@dataclass
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    hang: threading.Event | None = None  # answer only once this is set (or after 30 s)


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float

    @property
    def payload(self) -> Any:
        return json.loads(self.body)


class Receiver:
    """Records every POST; answers each path from its script, then with 200."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.scripts: dict[str, list[Reply]] = {}
        self.changed = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                with receiver.changed:
                    receiver.received.append(
                        Received(
                            self.path,
                            {k.lower(): v for k, v in self.headers.items()},
                            body,
                            time.monotonic(),
                        )
                    )
                    script = receiver.scripts.get(self.path)
                    reply = script.pop(0) if script else Reply()
                    receiver.changed.notify_all()
                if reply.hang is not None:
                    reply.hang.wait(30)
                try:
                    self.send_response(reply.status)
                    for name, value in reply.headers.items():
                        self.send_header(name, value)
                    self.send_header("content-length", "2")
                    self.end_headers()
                    self.wfile.write(b"ok")
                except OSError:
                    pass  # the service gave up on us (timeout) or died

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def script(self, path: str, *replies: Reply) -> None:
        with self.changed:
            self.scripts[path] = list(replies)

    def at(self, path: str) -> list[Received]:
        with self.changed:
            return [r for r in self.received if r.path == path]

    def wait(self, path: str, count: int = 1, timeout: float = 10.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                got = [r for r in self.received if r.path == path]
                if len(got) >= count:
                    return got
                left = deadline - time.monotonic()
                assert left > 0, f"{path}: {len(got)} requests within {timeout}s, wanted {count}"
                self.changed.wait(left)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def verify(received: Received) -> dict[str, Any]:
    """Verify with standardwebhooks under each secret in rotation; return the payload."""
    payloads = [
        Webhook(s).verify(received.body, received.headers) for s in (SECRET_OLD, SECRET_NEW)
    ]
    assert payloads[0] == payloads[1]
    assert len(received.headers["webhook-signature"].split(" ")) == 2
    result: dict[str, Any] = payloads[0]
    return result


# --- fixtures ---------------------------------------------------------------------------------


def _databases() -> list[str]:
    return [d for d in DATABASES if any(b.startswith(f"{d}-") for b in SELECTED_BACKENDS)]


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    made = Receiver()
    yield made
    made.close()


@pytest.fixture(scope="module", params=_databases())
def service(
    request: pytest.FixtureRequest, receiver: Receiver, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    """One service per database (webhooks do not depend on the broker), with short
    timers and the receiver allowed."""
    spawner = Spawner(tmp_path_factory.mktemp(f"webhooks-{request.param}"))
    try:
        backend = spawner.backend(str(request.param), "sql")
        defaults = {DEFAULT_QUEUE: {"url": receiver.url("/default"), "events": ["succeeded"]}}
        extra = {**FAST, "CELERIAC_WEBHOOK_QUEUE_DEFAULTS": json.dumps(defaults)}
        yield spawner.service(backend, extra)
    finally:
        spawner.close()


def run_job(api: Api, queue: str, outcome: str = "succeeded", **spec: Any) -> dict[str, Any]:
    api.submit(queue=queue, **spec)
    leased = api.lease_one(queue)
    if outcome == "succeeded":
        return dict(expect(api.complete(leased, {"answer": 42}), 200))
    return dict(expect(api.fail(leased, retry=False), 200))


def deliveries(api: Api, job_id: str) -> list[dict[str, Any]]:
    return list(expect(api.http.get(f"/jobs/{job_id}/deliveries"), 200)["deliveries"])


def wait_delivery(api: Api, job_id: str, status: str, timeout: float = 10.0) -> dict[str, Any]:
    def settled() -> dict[str, Any] | None:
        found = deliveries(api, job_id)
        return found[-1] if found and found[-1]["status"] == status else None

    result: dict[str, Any] = api.wait_for(settled, timeout, what=f"a {status} delivery")
    return result


# --- end to end ---------------------------------------------------------------------------


def test_signed_callbacks_for_succeeded_and_failed_jobs(
    api: Api, queue: str, receiver: Receiver
) -> None:
    ok = run_job(api, queue, "succeeded", webhook={"url": receiver.url(f"/{queue}/ok")})
    failed = run_job(api, queue, "failed", webhook={"url": receiver.url(f"/{queue}/failed")})

    for job, event, path in ((ok, "job.succeeded", "ok"), (failed, "job.failed", "failed")):
        [got] = receiver.wait(f"/{queue}/{path}")
        payload = verify(got)
        assert payload["type"] == event
        assert payload["data"] == api.get(job["id"]), "data is the job as GET shows it"
        datetime.fromisoformat(payload["timestamp"])
        assert got.headers["content-type"] == "application/json"
        assert abs(int(got.headers["webhook-timestamp"]) - time.time()) < 60
        delivery = wait_delivery(api, job["id"], "delivered")
        assert got.headers["webhook-id"] == delivery["id"]
        assert delivery["event"] == event and delivery["job_id"] == job["id"]
        [attempt] = delivery["attempts"]
        assert attempt["status_code"] == 200 and attempt["error"] is None
        assert attempt["latency_ms"] >= 0
    assert api.get(ok["id"])["webhook"] == {
        "url": receiver.url(f"/{queue}/ok"),
        "events": ["succeeded", "failed", "cancelled", "expired"],
    }


def test_events_filter_and_jobs_without_webhooks(api: Api, queue: str, receiver: Receiver) -> None:
    only_failures = {"url": receiver.url(f"/{queue}/f"), "events": ["failed"]}
    job = run_job(api, queue, "succeeded", webhook=only_failures)
    # The outbox row would have committed with the job's final state: none is there.
    assert deliveries(api, job["id"]) == []
    plain = run_job(api, queue, "succeeded")
    assert plain["webhook"] is None and deliveries(api, plain["id"]) == []
    assert_problem(api.http.get("/jobs/0190c3a5-0000-7000-8000-000000000000/deliveries"), 404)


def test_failing_receiver_is_retried_until_it_answers(
    api: Api, queue: str, receiver: Receiver
) -> None:
    path = f"/{queue}/flaky"
    receiver.script(path, Reply(500), Reply(502), Reply(500), Reply(200))
    job = run_job(api, queue, webhook={"url": receiver.url(path)})
    got = receiver.wait(path, 4)
    delivery = wait_delivery(api, job["id"], "delivered")
    assert len(deliveries(api, job["id"])) == 1, "exactly one delivery"
    assert [a["status_code"] for a in delivery["attempts"]] == [500, 502, 500, 200]
    assert [a["error"] for a in delivery["attempts"]] == ["HTTP 500", "HTTP 502", "HTTP 500", None]
    assert {r.headers["webhook-id"] for r in got} == {delivery["id"]}, "stable across retries"
    gaps = [b.at - a.at for a, b in itertools.pairwise(got)]
    assert all(gap >= 0.04 for gap in gaps), gaps  # backoff 0.1 s x [0.5, 1]
    time.sleep(0.5)
    assert len(receiver.at(path)) == 4, "nothing after the 2xx"


def test_410_gone_stops_retries_at_once(api: Api, queue: str, receiver: Receiver) -> None:
    path = f"/{queue}/gone"
    receiver.script(path, Reply(410))
    job = run_job(api, queue, webhook={"url": receiver.url(path)})
    delivery = wait_delivery(api, job["id"], "gone")
    assert [a["status_code"] for a in delivery["attempts"]] == [410]
    assert delivery["next_attempt_at"] is None
    time.sleep(0.6)  # two maximum backoffs: a retry would have come
    assert len(receiver.at(path)) == 1


def test_retry_after_is_honoured_and_redirects_are_not_followed(
    api: Api, queue: str, receiver: Receiver
) -> None:
    slow = f"/{queue}/busy"
    receiver.script(slow, Reply(429, {"Retry-After": "1"}))
    moved = f"/{queue}/moved"
    receiver.script(moved, Reply(302, {"Location": receiver.url(f"/{queue}/elsewhere")}))
    busy_job = run_job(api, queue, webhook={"url": receiver.url(slow)})
    moved_job = run_job(api, queue, webhook={"url": receiver.url(moved)})

    first, second = receiver.wait(slow, 2)
    assert second.at - first.at >= 0.9, "Retry-After: 1 beats the 0.1 s backoff"
    wait_delivery(api, busy_job["id"], "delivered")

    delivery = wait_delivery(api, moved_job["id"], "delivered")
    assert delivery["attempts"][0]["status_code"] == 302
    assert "redirects are not followed" in delivery["attempts"][0]["error"]
    assert receiver.at(f"/{queue}/elsewhere") == []


def test_hanging_receiver_delays_neither_jobs_nor_other_receivers(
    api: Api, queue: str, receiver: Receiver
) -> None:
    release = threading.Event()
    hang = f"/{queue}/hang"
    receiver.script(hang, Reply(hang=release), Reply(hang=release))
    try:
        for _ in range(2):  # two of the four delivery slots stuck
            run_job(api, queue, webhook={"url": receiver.url(hang)})
        receiver.wait(hang, 2)
        latencies, callbacks = [], []
        for index in range(5):
            path = f"/{queue}/fast{index}"
            job = api.submit(queue=queue, webhook={"url": receiver.url(path)})
            leased = api.lease_one(queue)
            started = time.monotonic()
            expect(api.complete(leased, index), 200)
            latencies.append(time.monotonic() - started)
            [got] = receiver.wait(path, 1, timeout=5)
            callbacks.append(got.at - started)
            assert verify(got)["data"]["id"] == job["id"]
        assert max(latencies) < 0.5, f"completions took {latencies}"
        assert max(callbacks) < 1.0, f"callbacks took {callbacks}"
    finally:
        release.set()


def test_redelivery_queues_a_new_delivery(api: Api, queue: str, receiver: Receiver) -> None:
    path = f"/{queue}/again"
    job = run_job(api, queue, webhook={"url": receiver.url(path)})
    first = wait_delivery(api, job["id"], "delivered")
    again = expect(api.http.post(f"/jobs/{job['id']}/deliveries/redeliver"), 202)
    assert again["id"] != first["id"] and again["event"] == "job.succeeded"
    got = receiver.wait(path, 2)
    assert got[1].headers["webhook-id"] == again["id"]
    api.wait_for(
        lambda: [d["status"] for d in deliveries(api, job["id"])] == ["delivered", "delivered"],
        what="both deliveries delivered",
    )

    running = api.submit(queue=queue, webhook={"url": receiver.url(path)})
    assert_problem(
        api.http.post(f"/jobs/{running['id']}/deliveries/redeliver"), 409, "job-not-finished"
    )
    plain = run_job(api, f"{queue}-plain")
    assert_problem(api.http.post(f"/jobs/{plain['id']}/deliveries/redeliver"), 409, "no-webhook")


def test_cancelled_expired_and_reclaimed_jobs_call_back(
    api: Api, queue: str, receiver: Receiver
) -> None:
    hook = {"url": receiver.url(f"/{queue}/ends")}
    cancelled = api.submit(queue=queue, delay=60, webhook=hook)
    expect(api.cancel(cancelled["id"]), 200)
    soon = (datetime.now(UTC) + timedelta(seconds=0.3)).isoformat()
    expired = api.submit(queue=f"{queue}-idle", expires_at=soon, webhook=hook)
    reclaimed = api.submit(queue=queue, max_retries=0, webhook=hook)
    api.lease_one(queue, lease_seconds=0.3)  # and never heard of again

    got = receiver.wait(f"/{queue}/ends", 3)
    events = {verify(r)["data"]["id"]: verify(r)["type"] for r in got}
    assert events == {
        cancelled["id"]: "job.cancelled",
        expired["id"]: "job.expired",
        reclaimed["id"]: "job.failed",
    }


def test_queue_default_webhook(api: Api, receiver: Receiver) -> None:
    job = run_job(api, DEFAULT_QUEUE)
    assert job["webhook"] == {"url": receiver.url("/default"), "events": ["succeeded"]}
    # (Every database's service posts to /default: pick this job's callback.)
    api.wait_for(
        lambda: [r for r in receiver.at("/default") if verify(r)["data"]["id"] == job["id"]],
        what="the default webhook's callback",
    )
    own = run_job(api, DEFAULT_QUEUE, webhook={"url": receiver.url("/own"), "events": ["failed"]})
    assert own["webhook"]["url"].endswith("/own"), "the job's own webhook wins"


# --- crash safety and SSRF, on one database -------------------------------------------------


def test_delivered_after_the_service_is_killed(spawner: Spawner, receiver: Receiver) -> None:
    """SIGKILL between the commit and a finished delivery: the outbox row survives and
    the restarted service delivers it (again: at-least-once, same webhook-id)."""
    backend = spawner.backend("sqlite", "sql")
    # A 0.5 s timeout: an attempt's claim lapses after 2 s (2 x timeout + 1).
    settings = {**FAST, "CELERIAC_WEBHOOK_TIMEOUT_SECONDS": "0.5"}
    first = spawner.service(backend, settings)
    release = threading.Event()
    path = f"/kill-{backend.redis_prefix}"
    receiver.script(path, Reply(hang=release))
    with Api(first.url) as api:
        job = run_job(api, "q-kill", webhook={"url": receiver.url(path)})
        receiver.wait(path, 1)  # the attempt is in flight ...
        first.kill()  # ... and its process dies
        release.set()
    second = spawner.service(backend, settings)
    with Api(second.url) as api:
        delivery = wait_delivery(api, job["id"], "delivered", timeout=15)
        again = receiver.wait(path, 2)
        assert {r.headers["webhook-id"] for r in again} == {delivery["id"]}
        assert verify(again[1])["data"]["status"] == "succeeded"


def test_private_addresses_are_refused_by_default(
    spawner: Spawner, receiver: Receiver, tmp_path: Path
) -> None:
    backend = spawner.backend("sqlite", "sql")
    service = spawner.service(backend, {"CELERIAC_WEBHOOK_SECRET": SECRET_NEW})
    with Api(service.url) as api:
        direct = run_job(api, "q-ssrf", webhook={"url": receiver.url("/ssrf")})
        by_name = run_job(api, "q-ssrf", webhook={"url": f"http://localhost:{receiver.port}/ssrf"})
        metadata = run_job(api, "q-ssrf", webhook={"url": "http://169.254.169.254/latest"})
        for job, why in (
            (direct, "127.0.0.1 a loopback address"),
            (by_name, "localhost resolves to 127.0.0.1, a loopback address"),
            (metadata, "169.254.169.254 a cloud metadata address"),
        ):
            delivery = wait_delivery(api, job["id"], "failed")
            [attempt] = delivery["attempts"]  # refused for good: no retries
            assert attempt["status_code"] is None
            assert why in attempt["error"] and "CELERIAC_WEBHOOK_ALLOWED_HOSTS" in attempt["error"]
            assert delivery["last_error"] == attempt["error"]
    assert receiver.at("/ssrf") == []


def test_webhook_option_validation(api: Api, queue: str) -> None:
    for bad in (
        {"url": "ftp://example.com/x"},
        {"url": "/relative/path"},
        {"url": "https://example.com/x", "events": []},
        {"url": "https://example.com/x", "events": ["running"]},
        {"url": "https://example.com/x", "secret": "no such field"},
    ):
        response = api.http.post("/jobs", json={"task": "t", "queue": queue, "webhook": bad})
        assert_problem(response, 422, "validation-failed")


# --- units: address rules, signing, retry policy ------------------------------------------


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("127.8.9.10", "loopback"),
        ("::1", "loopback"),
        ("10.0.0.1", "private"),
        ("172.16.5.4", "private"),
        ("192.168.1.1", "private"),
        ("fc00::1", "private"),
        ("169.254.169.254", "metadata"),
        ("fd00:ec2::254", "metadata"),
        ("168.63.129.16", "metadata"),
        ("169.254.1.1", "link-local"),
        ("fe80::1", "link-local"),
        ("100.64.0.1", "CGNAT"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("240.0.0.1", "reserved"),
        ("192.0.2.1", "private"),  # documentation range
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:10.1.2.3", "private"),
        ("64:ff9b::a9fe:a9fe", "metadata"),  # NAT64 of 169.254.169.254
        ("2002:7f00:1::1", "loopback"),  # 6to4 of 127.0.0.1
    ],
)
def test_refused_addresses(address: str, reason: str) -> None:
    import ipaddress

    why = why_refused(ipaddress.ip_address(address))
    assert why is not None and reason in why, (address, why)


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111"])
def test_public_addresses_pass(address: str) -> None:
    import ipaddress

    assert why_refused(ipaddress.ip_address(address)) is None


def test_allow_list_names_addresses_and_ranges() -> None:
    import ipaddress

    policy = AddressPolicy.parse(" hooks.internal , 127.0.0.1, 10.20.0.0/16,[fd00::1] ")
    assert policy.name_allowed("HOOKS.internal.") and not policy.name_allowed("other.internal")
    assert policy.refusal(ipaddress.ip_address("127.0.0.1")) is None
    assert policy.refusal(ipaddress.ip_address("10.20.3.4")) is None
    assert policy.refusal(ipaddress.ip_address("fd00::1")) is None
    assert policy.refusal(ipaddress.ip_address("10.21.0.1")) is not None
    assert policy.refusal(ipaddress.ip_address("127.0.0.2")) is not None


def test_resolved_addresses_are_checked() -> None:
    """A name is checked by what it resolves to, at connect time (DNS rebinding)."""

    async def resolve(policy: AddressPolicy, host: str) -> list[str]:
        return [str(a) for a in await GuardedBackend(policy).resolve(host, 80)]

    with pytest.raises(AddressRefused, match=r"localhost resolves to .*loopback"):
        asyncio.run(resolve(AddressPolicy(), "localhost"))
    with pytest.raises(AddressRefused, match=r"10\.0\.0\.1 a private address"):
        asyncio.run(resolve(AddressPolicy(), "10.0.0.1"))
    with pytest.raises(AddressRefused, match=r"::1 a loopback"):
        asyncio.run(resolve(AddressPolicy(), "[::1]"))
    assert "127.0.0.1" in asyncio.run(resolve(AddressPolicy.parse("localhost"), "localhost"))
    assert asyncio.run(resolve(AddressPolicy.parse("127.0.0.0/8"), "127.0.0.1")) == ["127.0.0.1"]


def test_signature_matches_an_independent_implementation() -> None:
    keys = parse_secrets(f"{SECRET_OLD}  {SECRET_NEW}")
    body = json.dumps({"type": "job.succeeded", "data": {"é": 1}}, ensure_ascii=False).encode()
    stamp = int(time.time())
    header = signature(keys, "msg_1", stamp, body)
    headers = {"webhook-id": "msg_1", "webhook-timestamp": str(stamp), "webhook-signature": header}
    for secret in (SECRET_OLD, SECRET_NEW):
        assert Webhook(secret).verify(body, headers)["data"] == {"é": 1}
    tampered = {**headers, "webhook-id": "msg_2"}
    with pytest.raises(Exception, match="No matching signature"):
        Webhook(SECRET_NEW).verify(body, tampered)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("secret-without-prefix", "entry 1 must start with whsec_"),
        (f"{SECRET_OLD} whsec_!!notbase64!!", "entry 2 is not base64"),
        ("whsec_" + base64.b64encode(b"short").decode(), "shorter than 16 bytes"),
    ],
)
def test_malformed_secrets_are_refused_without_echoing_them(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem) as caught:
        parse_secrets(text)
    assert "notbase64" not in str(caught.value) and "without-prefix" not in str(caught.value)
    assert SECRET_NEW not in repr(Settings(webhook_secret=SECRET_NEW))


def _claim(attempts: int, age: float = 0.0) -> webhooks.Claim:
    now = datetime.now(UTC)
    return webhooks.Claim("d", "j", "job.succeeded", "u", attempts, now - timedelta(seconds=age),
                          now, None)  # fmt: skip


def test_retry_policy() -> None:
    settings = Settings(
        webhook_retry_base_seconds=5, webhook_retry_max_seconds=60,
        webhook_retry_window_seconds=3600,
    )  # fmt: skip
    now = datetime.now(UTC)
    assert decide(_claim(0), now, 204, None, settings) == ("delivered", None)
    assert decide(_claim(3), now, 410, None, settings) == ("gone", None)
    delays = []
    for attempts in range(8):
        status, when = decide(_claim(attempts), now, 500, None, settings)
        assert status == "pending" and when is not None
        delays.append((when - now).total_seconds())
    assert 2.5 <= delays[0] <= 5 and 5 <= delays[1] <= 10 and 10 <= delays[2] <= 20
    assert all(30 <= d <= 60 for d in delays[4:]), delays  # capped, jittered
    status, when = decide(_claim(1), now, 503, 120.0, settings)
    assert status == "pending" and when == now + timedelta(seconds=120)
    assert decide(_claim(1), now, None, None, settings)[0] == "pending"  # network error
    assert decide(_claim(9, age=3599), now, 500, None, settings) == ("failed", None)


def test_retry_after_header_forms() -> None:
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert retry_after_seconds("120", now) == 120
    assert retry_after_seconds("Thu, 01 Jan 2026 12:00:30 GMT", now) == 30
    assert retry_after_seconds("Thu, 01 Jan 2026 11:00:00 GMT", now) == 0
    assert retry_after_seconds("soon", now) is None and retry_after_seconds(None, now) is None

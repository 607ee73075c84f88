"""The cost of one HTTP request (issue 14): client and service CPU per call, and calls/s.

Against a running ``celeriac serve`` (``--base``; ``--pid`` its process, for the service's
CPU from /proc):

    seq      one thread calling Client.submit in a loop (an Idempotency-Key on each)
    conc     16 threads sharing one Client (a connection each), as a web app's threads
    raw      POST /jobs on one kept-alive socket, the request prebuilt: the service alone
             (``--queue idle``: to a queue no worker reads, with workers attached)
    health   GET /healthz the same way: the floor of uvicorn, FastAPI and the gate
    batch    POST /jobs/batch of 1000 jobs

In this process, without a network or a database (``inprocess-submit``,
``inprocess-health``, ``inprocess-batch``): the app's ASGI callable driven directly on
SQLite, with the submit's storage replaced by a stub, so what is measured is the HTTP
layer alone (routing, gate, validation, rendering), in CPU microseconds per request.
``inprocess-routing``: every route's handler replaced by one that answers nothing, so
what is left of the four requests of a round trip is the middleware and the routing.

    .venv/bin/python bench/per_request.py seq --base http://127.0.0.1:8000 --pid PID
    .venv/bin/python bench/per_request.py inprocess-submit --n 4000

Compare before and after interleaved (A B A B): CPU per call is steadier than calls/s on
a shared machine."""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

Result = tuple[int, float, float]  # calls, wall seconds, client CPU seconds


def service_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed(n: int, run: Callable[[], object]) -> Result:
    cpu, wall = time.process_time(), time.perf_counter()
    run()
    return n, time.perf_counter() - wall, time.process_time() - cpu


def seq(base: str, n: int) -> Result:
    from celeriac.client import Client

    with Client(base) as client:
        for i in range(50):  # connect, warm up
            client.submit("bench.noop", [i])
        return timed(n, lambda: [client.submit("bench.noop", [i]) for i in range(n)])


def conc(base: str, n: int, threads: int = 16) -> Result:
    from celeriac.client import Client

    each = n // threads
    with Client(base) as client, ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda i: client.submit("bench.noop", [i]), range(threads)))

        def one(_: int) -> None:
            for i in range(each):
                client.submit("bench.noop", [i])

        return timed(each * threads, lambda: list(pool.map(one, range(threads))))


def batch(base: str, n: int) -> Result:
    from celeriac.client import Client, job_spec

    specs = [job_spec("bench.noop", [i]) for i in range(1000)]
    with Client(base) as client:
        client.submit_batch(specs)
        rounds = max(1, n // 1000)

        def run() -> None:
            for _ in range(rounds):
                client.submit_batch(specs)

        return timed(rounds * 1000, run)


def _raw(base: str, n: int, request: bytes, expect: bytes) -> Result:
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader = sock.makefile("rb")

        def one() -> None:
            sock.sendall(request)
            status = reader.readline()
            assert expect in status, status
            length = 0
            while (line := reader.readline()) != b"\r\n":
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            reader.read(length)

        def loop(count: int) -> None:
            for _ in range(count):
                one()

        loop(50)
        return timed(n, lambda: loop(n))


def raw(base: str, n: int, queue: str | None = None) -> Result:
    body = b'{"task":"bench.noop","args":[1],"kwargs":{}}'
    if queue:  # a queue no worker reads: the submit's cost alone, with workers attached
        body = body[:-1] + b',"queue":"%s"}' % queue.encode()
    head = b"POST /jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    request = head + b"Content-Length: %d\r\n\r\n" % len(body) + body
    return _raw(base, n, request, b" 202 ")


def health(base: str, n: int) -> Result:
    return _raw(base, n, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", b" 200 ")


# --- in this process: the HTTP layer alone ------------------------------------------------

SUBMIT_BODY = b'{"task":"bench.noop","args":[1],"kwargs":{}}'
BATCH_BODY = (
    b'{"jobs":['
    + b",".join(b'{"task":"bench.noop","args":[%d],"kwargs":{}}' % i for i in range(1000))
    + b"]}"
)
CASES = {
    "inprocess-submit": ("POST", "/jobs", SUBMIT_BODY, [(b"idempotency-key", b"k" * 36)]),
    "inprocess-health": ("GET", "/healthz", b"", []),
    "inprocess-batch": ("POST", "/jobs/batch", BATCH_BODY, []),
}


def _scope(method: str, path: str, body: bytes, headers: list[Any]) -> dict[str, Any]:
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
        "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "",
        "query_string": b"", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2),
        "headers": [(b"host", b"x"), (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()), *headers],
    }  # fmt: skip


async def _asgi(app: Any, method: str, path: str, body: bytes, headers: list[Any]) -> int:
    scope = _scope(method, path, body, headers)
    sent = False
    status: list[int] = []

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            status.append(message["status"])

    await app(scope, receive, send)
    return status[0]


async def _inprocess(case: str, n: int) -> Result:
    from service.app import create_app
    from service.idempotency import Submitted

    app = create_app()
    async with app.router.lifespan_context(app):
        runtime = app.state.runtime
        while not runtime.started:  # noqa: ASYNC110 - a flag the lifespan's start task sets
            await asyncio.sleep(0.05)

        async def stored(row: Any, *_: Any, **__: Any) -> Submitted:
            return Submitted(row)

        async def nothing(*_: Any, **__: Any) -> None:
            return None

        # The storage is not what is measured: the submit's group commit, the batch's
        # transaction and the publish after it answer at once.
        runtime.submits.submit = stored
        runtime.db.run = nothing
        runtime.after_submit = nothing
        method, path, body, headers = CASES[case]
        status = await _asgi(app, method, path, body, headers)
        assert status < 300, status
        for _ in range(100):
            await _asgi(app, method, path, body, headers)
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in range(n):
            await _asgi(app, method, path, body, headers)
        return n, time.perf_counter() - wall, time.process_time() - cpu


# The four requests of a round trip over HTTP, as routing sees them.
ROUND_TRIP = [
    ("POST", "/jobs"),
    ("GET", "/jobs/x"),
    ("POST", "/leases"),
    ("POST", "/leases/report"),
]


def _silence_routes(app: Any) -> None:
    from fastapi.routing import APIRoute

    async def nothing(*_: Any) -> None:
        return None

    routes = list(app.router.routes)
    while routes:
        route = routes.pop()
        included = getattr(route, "original_router", None)  # behind include_router
        if included is not None:
            routes.extend(included.routes)
        elif isinstance(route, APIRoute):
            route.handle = nothing  # type: ignore[method-assign,assignment]


async def _routing(n: int) -> dict[str, float]:
    from service.app import create_app

    app = create_app()
    async with app.router.lifespan_context(app):
        _silence_routes(app)
        spent = {}
        for method, path in ROUND_TRIP:
            for _ in range(200):
                await app(_scope(method, path, b"", []), _no_body, _ignore)
            cpu = time.process_time()
            for _ in range(n):
                await app(_scope(method, path, b"", []), _no_body, _ignore)
            spent[f"{method} {path}"] = (time.process_time() - cpu) / n * 1e6
        return spent


async def _no_body() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def _ignore(_message: Any) -> None:
    return None


def inprocess(case: str, n: int) -> Result:
    _migrated_database()
    return _in_a_loop(_inprocess(case, n))  # type: ignore[no-any-return]


def routing(n: int) -> dict[str, float]:
    _migrated_database()
    return _in_a_loop(_routing(n))  # type: ignore[no-any-return]


def _migrated_database() -> None:
    from service.migrate import upgrade

    url = os.environ.setdefault(
        "CELERIAC_DATABASE_URL", f"sqlite:///{tempfile.mkdtemp()}/per_request.db"
    )
    upgrade(url)


def _in_a_loop(work: Any) -> Any:
    """On uvloop, as ``celeriac serve`` runs, where it is installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(work)
    return uvloop.run(work)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    modes = ["seq", "conc", "raw", "health", "batch", *CASES, "inprocess-routing"]
    parser.add_argument("mode", choices=modes)
    parser.add_argument("--base", default="http://127.0.0.1:8000")
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--pid", type=int, help="the service's process, for its CPU")
    parser.add_argument("--label", default="")
    parser.add_argument("--queue", help="raw: submit to this queue (one no worker reads)")
    args = parser.parse_args()
    if args.mode == "inprocess-routing":
        for request, micros in routing(args.n).items():
            print(f"{args.label:8} {request:22} {micros:7.1f} us CPU of routing and middleware")
        return
    if args.mode in CASES:
        calls, wall, cpu = inprocess(args.mode, args.n)
        print(f"{args.label:8} {args.mode:17} {cpu / calls * 1e6:9.1f} us CPU per request")
        return
    before = service_cpu(args.pid) if args.pid else 0.0
    run = {"seq": seq, "conc": conc, "raw": raw, "health": health, "batch": batch}[args.mode]
    calls, wall, cpu = raw(args.base, args.n, args.queue) if run is raw else run(args.base, args.n)
    spent = (service_cpu(args.pid) - before) / calls * 1e6 if args.pid else float("nan")
    print(
        f"{args.label:8} {args.mode:6} n={calls} {calls / wall:8.0f}/s {wall / calls * 1e3:7.3f} "
        f"ms/call  client CPU {cpu / calls * 1e6:5.0f} us/call  service CPU {spent:5.0f} us/call"
    )


if __name__ == "__main__":
    main()

"""What the metrics cost the hot paths, in process (no I/O; issue 16): the request
counter middleware around a no-op ASGI app, and ``Metrics.committed`` /
``Metrics.submitted`` per job. ``.venv/bin/python bench/metrics_overhead.py``"""

import asyncio
import time
from datetime import UTC, datetime, timedelta

from service.effects import Effects, Ended
from service.metrics import Metrics, RequestCounter


class Route:
    path = "/jobs/{job_id}"


ROUTE = Route()


async def app(scope, receive, send):
    scope["route"] = ROUTE
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b""})


async def send(message):
    pass


async def receive():
    return {}


async def run(target, n):
    scope = {"type": "http", "method": "GET"}
    t = time.perf_counter()
    for _ in range(n):
        await target(dict(scope), receive, send)
    return (time.perf_counter() - t) / n


m = Metrics()
wrapped = RequestCounter(app, m)
n = 200_000
for _ in range(3):
    bare = asyncio.run(run(app, n))
    mid = asyncio.run(run(wrapped, n))
    print(
        f"request counter: {(mid - bare) * 1e6:.2f} us per request "
        f"(bare {bare * 1e6:.2f}, with {mid * 1e6:.2f})"
    )
now = datetime.now(UTC)
ended = [
    Ended(
        f"id{i}",
        "emails",
        "send",
        "succeeded",
        1,
        "w1",
        now - timedelta(seconds=2),
        now - timedelta(seconds=1),
        now,
    )
    for i in range(1000)
]
for _ in range(3):
    t = time.perf_counter()
    for _ in range(100):
        m.committed(Effects(ended=ended))
    print(f"committed: {(time.perf_counter() - t) / 100_000 * 1e6:.2f} us per ended job")
rows = [{"queue": "emails"}] * 1000
t = time.perf_counter()
for _ in range(100):
    m.submitted(rows)
print(f"submitted: {(time.perf_counter() - t) / 100_000 * 1e6:.2f} us per job")

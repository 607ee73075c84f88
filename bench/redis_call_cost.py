"""The CPU one short Redis command costs the service (issue 14, tenth pass).

One command at a time, the way a submit's publish or a lease's acknowledgement runs
(``EVALSHA`` of a one-line script), on uvloop as in ``celeriac serve``: through
redis-py's asyncio client (``register_script``, as the service called it before), and
through the service's ``RedisLink`` (service/brokers/redis_link.py); then 64 callers at
once through the link, whose commands share one connection. Prints CPU and wall
microseconds per command of this process (not Redis's).

    .venv/bin/python bench/redis_call_cost.py --n 5000
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import time
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis
import uvloop

from service.brokers import redis_link

SCRIPT = "return redis.call('ZADD', KEYS[1], ARGV[1], ARGV[2])"


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def measure(label: str, n: int, call: Callable[[int], Awaitable[object]]) -> None:
    for i in range(200):  # warm
        await call(i)
    started, cpu_started = time.perf_counter(), cpu()
    for i in range(n):
        await call(i)
    wall, spent = time.perf_counter() - started, cpu() - cpu_started
    print(f"{label:<34} {spent / n * 1e6:6.0f} µs CPU  {wall / n * 1e6:6.0f} µs wall")


async def main(url: str, n: int) -> None:
    key = "{redis-call-cost}:z"
    client = aioredis.from_url(url, decode_responses=True)
    script = client.register_script(SCRIPT)
    link = redis_link.for_url(url, client, client)
    try:
        await measure("redis-py, registered script", n, lambda i: script(keys=[key], args=[i, "a"]))
        await measure(
            "RedisLink.script", n, lambda i: link.script(script.sha, SCRIPT, [key], [i, "a"])
        )

        async def together(i: int) -> None:
            await asyncio.gather(*(link.call("ZADD", key, i, f"m{k}") for k in range(64)))

        started, cpu_started = time.perf_counter(), cpu()
        for i in range(n // 64):
            await together(i)
        done = (n // 64) * 64
        wall, spent = time.perf_counter() - started, cpu() - cpu_started
        print(f"{'RedisLink, 64 callers at once':<34} {spent / done * 1e6:6.0f} µs CPU"
              f"  {wall / done * 1e6:6.0f} µs wall")  # fmt: skip
    finally:
        await client.delete(key)
        await link.close()
        await client.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="redis://127.0.0.1:6379/9")
    parser.add_argument("--n", type=int, default=5000)
    args = parser.parse_args()
    uvloop.run(main(args.url, args.n))

"""Submit a job over HTTP with httpx (no celeriac package needed) and wait for its result.

    python submit.py math.add '[2, 3]'            # TASK [ARGS-JSON [QUEUE]]

CELERIAC_SERVER_URL (default http://127.0.0.1:8000); CELERIAC_API_KEY, a key with the
submit and read scopes, if the service has keys.
"""

from __future__ import annotations

import json
import os
import sys
import uuid

import httpx


def main(argv: list[str]) -> int:
    task = argv[0] if argv else "math.add"
    args = json.loads(argv[1]) if len(argv) > 1 else [2, 3]
    queue = argv[2] if len(argv) > 2 else "default"
    headers = {}
    if key := os.environ.get("CELERIAC_API_KEY"):
        headers["Authorization"] = f"Bearer {key}"
    server = os.environ.get("CELERIAC_SERVER_URL", "http://127.0.0.1:8000")
    # The result long-poll below holds the request up to 60 s.
    with httpx.Client(base_url=server, headers=headers, timeout=90) as client:
        # 202 means committed. The Idempotency-Key makes retrying this request safe.
        response = client.post(
            "/jobs",
            json={"task": task, "args": args, "queue": queue, "max_retries": 3},
            headers={"Idempotency-Key": str(uuid.uuid4())},
        )
        if response.is_error:  # application/problem+json: type, title, status, detail
            problem = response.json()
            message = f"{response.status_code} {problem['title']}: {problem['detail']}"
            print(message, file=sys.stderr)
            return 2
        job_id = response.json()["id"]
        print(f"submitted {job_id}", file=sys.stderr)
        job = client.get(f"/jobs/{job_id}", params={"wait": 60}).raise_for_status().json()
    print(json.dumps({k: job[k] for k in ("id", "status", "result", "error")}))
    return 0 if job["status"] == "succeeded" else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

"""The worker side of the upload example: what used to be the Celery task.

Run it from the repository root (or with ``--app tasks:app`` from this directory):

    celeriac worker --app examples.flask_upload.tasks:app --queues uploads

The worker must see the files where the web app stored them (a shared disk or volume).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from celeriac import Celeriac, current_job

app = Celeriac("uploads")

QUEUE = "uploads"
# How long processing takes, spread over STEPS progress reports: the example's stand-in
# for real work (thumbnails, parsing, virus scans ...).
PROCESS_SECONDS = float(os.environ.get("UPLOAD_PROCESS_SECONDS", "2"))
STEPS = 4


# A 3-second lease makes the worker heartbeat every second, so progress shows up live.
@app.task(name="uploads.process", queue=QUEUE, max_retries=2, timeout=3)
def process(path: str) -> dict[str, Any]:
    """Count the lines, words and bytes of an uploaded file."""
    data = Path(path).read_bytes()
    text = data.decode("utf-8", errors="replace")
    for step in range(STEPS):
        current_job.report_progress(step, STEPS, "counting")
        if current_job.wait_cancelled(PROCESS_SECONDS / STEPS):
            current_job.raise_if_cancelled()
    return {
        "file": Path(path).name,
        "bytes": len(data),
        "lines": len(text.splitlines()),
        "words": len(text.split()),
    }

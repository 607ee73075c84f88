"""A Flask upload endpoint that must not block: it stores the file, submits a celeriac
job over HTTP, and answers 202 at once; the work happens in a worker.

    flask --app examples.flask_upload.app run       # from the repository root
    celeriac worker --app examples.flask_upload.tasks:app --queues uploads

    curl -F file=@README.md http://127.0.0.1:5000/upload
    # 202 {"job_id": "01a2…", "status_url": "/status/01a2…"}
    curl -H 'Accept: application/json' http://127.0.0.1:5000/status/01a2…

Settings (environment): CELERIAC_SERVER_URL, CELERIAC_API_KEY (a key with the submit and
read scopes), UPLOAD_DIR (default: uploads/ beside this file; the worker must see it too).
The web app does not import the task code: it submits by task name.
"""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path
from typing import Any

from celeriac import CeleriacError, Client, ServerUnreachable
from flask import Flask, Response, jsonify, render_template_string, request, url_for
from werkzeug.utils import secure_filename

TASK = "uploads.process"
QUEUE = "uploads"
JOB_ID = re.compile(r"^[A-Za-z0-9-]{1,64}$")
FINISHED = {"succeeded", "failed", "cancelled", "expired"}

app = Flask(__name__)
app.config["MAX_CONTENT_LENGTH"] = 16 * 1024 * 1024
UPLOAD_DIR = Path(os.environ.get("UPLOAD_DIR") or Path(__file__).resolve().parent / "uploads")
celeriac = Client()  # CELERIAC_SERVER_URL, CELERIAC_API_KEY

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>{{ title }}</title>
{% if refresh %}<meta http-equiv="refresh" content="1">{% endif %}
<style>body{font:16px system-ui;margin:2em auto;max-width:40em}
progress{width:100%}td{padding:.2em 1em .2em 0}</style></head><body>
{% if job is none %}
  <h1>Upload a text file</h1>
  <form method="post" action="{{ url_for('upload') }}" enctype="multipart/form-data">
    <input type="file" name="file" required> <button>Upload</button>
  </form>
{% else %}
  <h1>Job {{ job.id }}</h1>
  <p>Status: <strong>{{ job.status }}</strong>
    {% if job.attempt > 1 %}(attempt {{ job.attempt }}){% endif %}</p>
  {% if job.progress and job.status == "running" %}
    <progress value="{{ job.progress.current }}" max="{{ job.progress.total or 1 }}"></progress>
    <p>{{ job.progress.message or "" }}</p>
  {% endif %}
  {% if job.result %}<table>{% for key, value in job.result.items() %}
    <tr><td>{{ key }}</td><td>{{ value }}</td></tr>{% endfor %}</table>{% endif %}
  {% if job.error %}<p>Error: {{ job.error.type }}: {{ job.error.message }}</p>{% endif %}
  <p><a href="{{ url_for('index') }}">Upload another</a></p>
{% endif %}
</body></html>"""


def wants_html() -> bool:
    best = request.accept_mimetypes.best_match(["application/json", "text/html"])
    return best == "text/html" and request.args.get("format") != "json"


def problem(status: int, detail: str) -> tuple[Response, int]:
    return jsonify({"error": detail}), status


@app.get("/")
def index() -> str:
    return render_template_string(PAGE, title="Upload", job=None, refresh=False)


@app.post("/upload")
def upload() -> Any:
    file = request.files.get("file")
    if file is None or not file.filename:
        return problem(400, "send the file as multipart form field 'file'")
    UPLOAD_DIR.mkdir(parents=True, exist_ok=True)
    path = UPLOAD_DIR / f"{uuid.uuid4().hex}-{secure_filename(file.filename) or 'upload'}"
    file.save(path)
    try:
        # One short HTTP call: 202 from celeriac means the job is committed.
        job = celeriac.submit(TASK, [str(path)], queue=QUEUE)
    except (CeleriacError, ServerUnreachable) as exc:
        path.unlink(missing_ok=True)
        return problem(503, f"could not queue the file for processing: {exc}")
    status_url = url_for("status", job_id=job["id"])
    if wants_html():
        page = render_template_string(PAGE, title="Queued", job=job, refresh=True)
        return page, 202, {"Location": status_url}
    body = {"job_id": job["id"], "status": job["status"], "status_url": status_url}
    return jsonify(body), 202, {"Location": status_url}


@app.get("/status/<job_id>")
def status(job_id: str) -> Any:
    if not JOB_ID.match(job_id):
        return problem(404, "no such job")
    try:
        job = celeriac.get(job_id)
    except ServerUnreachable as exc:
        return problem(503, str(exc))
    except CeleriacError as exc:
        if exc.status == 404:
            return problem(404, "no such job")
        raise
    if wants_html():
        finished = job["status"] in FINISHED
        return render_template_string(PAGE, title=job["status"], job=job, refresh=not finished)
    keys = ("id", "status", "attempt", "progress", "result", "error")
    return jsonify({key: job[key] for key in keys})

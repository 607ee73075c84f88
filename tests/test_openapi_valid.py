"""The committed contract, openapi/openapi.json, is a valid OpenAPI document (checked
with openapi-spec-validator, a dev dependency) and is the HTTP API v1 that
docs/protocol.md describes."""

from __future__ import annotations

import json
from typing import Any

import pytest
from conftest import REPO, unavailable

SPEC = REPO / "openapi" / "openapi.json"


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(SPEC.read_text())
    return document


def test_openapi_json_is_a_valid_openapi_document(spec: dict[str, Any]) -> None:
    try:
        from openapi_spec_validator import validate
    except ImportError:
        unavailable("openapi-spec-validator is missing: pip install -e '.[dev]'")
    validate(spec)  # raises OpenAPIValidationError, naming the offending path


def test_the_worker_protocol_is_http_api_v1(spec: dict[str, Any]) -> None:
    assert spec["info"]["version"].split(".")[0] == "1"
    for path in (
        "/leases",
        "/leases/heartbeat",
        "/leases/report",
        "/jobs/{job_id}/heartbeat",
        "/jobs/{job_id}/complete",
        "/jobs/{job_id}/fail",
        "/jobs/{job_id}/release",
    ):
        assert "post" in spec["paths"][path], path
    protocol = (REPO / "docs" / "protocol.md").read_text()
    assert "HTTP API v1" in protocol

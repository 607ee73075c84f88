"""The door every request passes before a route sees it: who is calling, how large a body
the route accepts, how long it may take to arrive, and whether it is strict JSON.

Order matters. The key is checked from the headers before a single byte of the body is
read, so a caller without a key cannot make the service buffer or parse anything. The
body is then read against the route's own limit (a job is small; only batches and results
are large) within ``CELERIAC_BODY_READ_TIMEOUT_SECONDS``, and parsed as RFC 8259 JSON
with the few things Python's parser lets through refused: NaN and Infinity (and numbers
that overflow to them), duplicate keys, nesting deeper than ``MAX_JSON_DEPTH`` (32), the NUL
character and lone surrogates, none of which every database and language can hold. Large
bodies are parsed in a worker thread so that one of them cannot stall the event loop.

Routes declare what they need with ``require(scope, body=...)`` and use ``GuardedRoute``
(set on every APIRouter); FastAPI then validates the already-parsed body as usual."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from enum import Enum
from typing import Any
from urllib.parse import unquote_plus

import anyio
import orjson
from fastapi import Request, Response
from fastapi.routing import APIRoute
from pydantic_core import PydanticUndefined

from service import errors
from service.auth import Principal, authenticate
from service.endpoint_plan import plan_for
from service.settings import Settings

# MariaDB's JSON type holds at most 32 levels; one limit for every backend.
MAX_JSON_DEPTH = 32
# Bodies up to this size are parsed on the event loop (microseconds); larger ones in a
# thread, where a megabyte's parse cannot delay other requests.
INLINE_PARSE_BYTES = 64 * 1024
ENVELOPE_BYTES = 64 * 1024


class BodyKind(Enum):
    """The size class of a route's body (docs/api.md, Limits)."""

    none = "none"  # no body expected: a small allowance for empty JSON objects
    control = "control"  # lease requests, claims, schedules, registrations: 64 KiB
    report = "report"  # heartbeats with progress, failures with tracebacks: 1 MiB
    job = "job"  # one job: CELERIAC_MAX_PAYLOAD_BYTES plus room for its options
    result = "result"  # one result: CELERIAC_RESULT_MAX_BYTES plus room
    batch = "batch"  # batches of jobs or reports: CELERIAC_MAX_REQUEST_BYTES

    def limit(self, settings: Settings) -> int:
        sizes = {
            BodyKind.none: 4 * 1024,
            BodyKind.control: 64 * 1024,
            BodyKind.report: 1024 * 1024,
            BodyKind.job: settings.max_payload_bytes + ENVELOPE_BYTES,
            BodyKind.result: settings.result_max_bytes + ENVELOPE_BYTES,
            BodyKind.batch: settings.max_request_bytes,
        }
        return sizes[self]


@dataclass(frozen=True, slots=True)
class Guard:
    scope: str | None  # None: public (health checks)
    body: BodyKind


PUBLIC = Guard(scope=None, body=BodyKind.none)
GuardDependency = Callable[[Request], Coroutine[Any, Any, Principal]]


def require(scope: str, body: BodyKind = BodyKind.control) -> GuardDependency:
    """A route's declaration of the scope it needs and its body's size class. The check
    itself runs in ``GuardedRoute`` before the body is read; as a dependency this hands
    the route its caller."""

    async def principal(request: Request) -> Principal:
        found: Principal = request.state.principal
        return found

    principal.__name__ = f"require_{scope}"
    principal.guard = Guard(scope, body)  # type: ignore[attr-defined]
    return principal


def guard_of(route: APIRoute) -> Guard:
    for dependency in route.dependencies:
        guard = getattr(dependency.dependency, "guard", None)
        if isinstance(guard, Guard):
            return guard
    return PUBLIC


class GuardedRoute(APIRoute):
    """An APIRoute that authenticates and reads its body through the gate first."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        guard = guard_of(self)
        expects_body = self.body_field is not None
        plan = plan_for(self)  # None: FastAPI solves this route's arguments itself
        limits = _Limits(guard.body)

        async def guarded(request: Request) -> Response:
            settings: Settings = request.app.state.runtime.settings
            principal = authenticate(settings.parsed_api_keys, request.headers, guard.scope)
            request.state.principal = principal
            _check_url_text(request)
            body = await read_body(request, limits.of(settings), settings)
            parsed: Any = PydanticUndefined
            if body and expects_body:
                _check_json_media_type(request)
                parsed = request._json = await parse_json(body)
            if plan is None or request.app.dependency_overrides:
                return await handler(request)
            return await plan.call(request, parsed)

        return guarded


class _Limits:
    """A route's body limit, worked out once per settings object rather than per request."""

    __slots__ = ("_limit", "_settings", "kind")

    def __init__(self, kind: BodyKind) -> None:
        self.kind = kind
        self._settings: Settings | None = None
        self._limit = 0

    def of(self, settings: Settings) -> int:
        if settings is not self._settings:
            self._limit, self._settings = self.kind.limit(settings), settings
        return self._limit


async def read_body(request: Request, limit: int, settings: Settings) -> bytes:
    """The whole body, refused as soon as it is known to exceed ``limit``, and within the
    read timeout. Kept on the request so FastAPI does not read it again."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    parts: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(settings.body_read_timeout_seconds):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise _too_large(limit)
                parts.append(chunk)
    except TimeoutError:
        raise errors.RequestTimeout(
            f"the request body did not arrive within {settings.body_read_timeout_seconds:g}"
            " seconds (CELERIAC_BODY_READ_TIMEOUT_SECONDS)"
        ) from None
    body = b"".join(parts)
    request._body = body
    return body


def _too_large(limit: int) -> errors.PayloadTooLarge:
    return errors.PayloadTooLarge(
        f"the request body exceeds this route's limit of {limit} bytes (docs/api.md, Limits)"
    )


# C0 controls and DEL: no id, name or filter holds them, and PostgreSQL cannot compare
# text with a NUL in it.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _check_url_text(request: Request) -> None:
    """Path parameters and query values reach SQL as text: refuse control characters in
    them (percent-encoded or not) with one 400 rather than per route."""
    query = unquote_plus(request.scope.get("query_string", b"").decode("latin-1"))
    if _CONTROL.search(request.scope["path"]) or _CONTROL.search(query):
        raise errors.BadRequest("the URL holds a control character (%00-%1F or %7F)")


def _check_json_media_type(request: Request) -> None:
    media_type = request.headers.get("content-type", "")
    essence = media_type.split(";", 1)[0].strip().lower()
    if not (essence == "application/json" or essence.endswith("+json")):
        raise errors.UnsupportedMediaType(
            f"send the body as application/json, not {media_type or 'no content type'}"
        )


async def parse_json(body: bytes) -> Any:
    if len(body) <= INLINE_PARSE_BYTES:
        return strict_loads(body)
    return await anyio.to_thread.run_sync(strict_loads, body)


# A ``\u0000`` escape, not preceded by an odd number of backslashes (which would make it
# the literal text "\u0000"). Searched only where a plain find says it may be: a
# regex with a look-behind cannot skip ahead, and is 50 times slower on a large body.
_NUL_ESCAPE = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_EMPTY_PAIR = re.compile(rb"\[\]|\{\}")
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'[]{}"')


def strict_loads(body: bytes) -> Any:
    """Parse ``body`` as strict JSON or raise ``InvalidJson`` saying what is wrong."""
    if b"\\u0000" in body and _NUL_ESCAPE.search(body):
        raise errors.InvalidJson("the body holds a NUL character (\\u0000), which is refused")
    if _too_deep(body):
        raise errors.InvalidJson(f"the body nests JSON deeper than {MAX_JSON_DEPTH} levels")
    value = _quick_loads(body)
    if value is not _UNDECIDED:
        return value
    return _careful_loads(body)


# Digits enough to pass a 64-bit integer (anywhere, strings included: a false alarm only
# costs the careful parse): orjson would read such an integer as a float, losing digits.
_LONG_NUMBER = re.compile(rb"[0-9]{19}")
_UNDECIDED = object()


def _quick_loads(body: bytes) -> Any:
    """The common case at C speed: orjson refuses NaN, Infinity, numbers that overflow a
    double, lone surrogates and anything else RFC 8259 does not allow, but it keeps the
    last of duplicate keys silently. So the name separators (colons outside strings) of
    the body are counted against those of the value written back: a dropped duplicate
    makes them differ. ``_UNDECIDED`` sends anything doubtful to the careful parse, which
    also says what is wrong."""
    if _LONG_NUMBER.search(body):
        return _UNDECIDED
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        return _UNDECIDED
    if b":" in body and _name_separators(body) != _name_separators(orjson.dumps(value)):
        return _UNDECIDED
    return value


def _name_separators(text: bytes) -> int:
    """How many ``:`` of valid JSON ``text`` stand outside strings: one per object member."""
    if b"\\" in text:  # escapes: an escaped backslash, then an escaped quote
        text = text.replace(b"\\\\", b"").replace(b'\\"', b"")
    return b"".join(text.split(b'"')[::2]).count(b":")


def _careful_loads(body: bytes) -> Any:
    try:
        value = json.loads(
            body,
            parse_constant=_refuse_constant,
            parse_float=_finite_float,
            object_pairs_hook=_unique_keys,
        )
    except _Refused as exc:
        raise errors.InvalidJson(str(exc)) from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, huge ints
        raise errors.InvalidJson(f"the body is not valid JSON: {exc}") from None
    if (b"\\ud" in body or b"\\uD" in body) and _SURROGATE_ESCAPE.search(body):
        _refuse_lone_surrogates(value)
    return value


class _Refused(ValueError):
    pass


def _refuse_constant(name: str) -> Any:
    raise _Refused(f"{name} is not JSON (RFC 8259 has no NaN or Infinity)")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise _Refused(f"the number {text[:40]} is too large for a double")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        duplicate = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise _Refused(f"the key {duplicate[:100]!r} appears twice in one object")
    return result


def _too_deep(body: bytes) -> bool:
    """Whether containers nest deeper than ``MAX_JSON_DEPTH``, without parsing, at C
    speed: drop escaped backslashes and quotes, keep only quotes and brackets, drop what
    lies between quotes (string contents), then peel innermost pairs level by level (at
    most MAX_JSON_DEPTH passes)."""
    if body.count(b"[") + body.count(b"{") <= MAX_JSON_DEPTH:
        return False
    if b"\\" in body:  # escapes: an escaped backslash, then an escaped quote
        body = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    structure = body.translate(None, _NOT_STRUCTURE)
    brackets = b"".join(structure.split(b'"')[::2])
    for _ in range(MAX_JSON_DEPTH):
        peeled = _EMPTY_PAIR.sub(b"", brackets)
        if peeled == brackets:  # nothing left, or not balanced (the parser says why)
            return False
        brackets = peeled
    return bool(brackets) and _EMPTY_PAIR.search(brackets) is not None


def _refuse_lone_surrogates(value: Any) -> None:
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise errors.InvalidJson(
            "the body holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is not text"
        ) from None

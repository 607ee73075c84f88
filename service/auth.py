"""API keys with scopes, compared in constant time."""

from __future__ import annotations

import hmac

from fastapi import Request

from service import errors
from service.settings import ApiKey, Settings


def _presented_key(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if header is not None:
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and value:
            return value.strip()
    return request.headers.get("x-api-key")


def _match(keys: tuple[ApiKey, ...], presented: str) -> ApiKey | None:
    found = None
    for key in keys:  # check every key: timing must not reveal which one matched
        if hmac.compare_digest(key.secret.encode(), presented.encode()):
            found = key
    return found


def authorize(settings: Settings, request: Request, scope: str) -> None:
    if not settings.auth_enabled:
        return
    presented = _presented_key(request)
    key = _match(settings.parsed_api_keys, presented) if presented else None
    if key is None:
        raise errors.Unauthorized("send an API key as 'Authorization: Bearer <key>'")
    if scope not in key.scopes and "admin" not in key.scopes:
        raise errors.Forbidden(f"this API key lacks the {scope!r} scope")

"""API keys: who is calling (a ``Principal``), decided from the request headers alone,
before any body is read (service.gate). Keys are compared in constant time.

A key grants scopes (``submit``, ``read``, ``work``, ``admin``; admin implies all) and may
be restricted to queue patterns, so two teams can share one service. Everything a key
creates that another key must not touch (idempotency keys, worker registrations, leases)
is bound to the key's ``key_id``: a short fingerprint of the secret, never the secret."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from urllib.parse import unquote

from service import errors

SCOPES = frozenset({"submit", "read", "work", "admin"})
MIN_KEY_LENGTH = 24
# Shipped in examples and old .env files: a service that holds one of these would be open
# to anyone who has read our documentation.
PLACEHOLDER_KEYS = frozenset(
    {
        "change-me-admin-key",
        "change-me-client-key",
        "change-me-worker-key",
        "change-me",
        "changeme",
    }
)


def key_fingerprint(secret: str) -> str:
    """A stable, non-secret id for a key: enough to tell keys apart in rows and logs."""
    return hashlib.sha256(secret.encode()).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller. ``key_id`` is "" when auth is off (one trusted tenant)."""

    key_id: str
    scopes: frozenset[str]
    # fnmatch patterns (``emails-*``); None means every queue.
    queues: tuple[str, ...] | None = None

    def has(self, scope: str) -> bool:
        return scope in self.scopes or "admin" in self.scopes

    def allows_queue(self, queue: str) -> bool:
        return self.queues is None or any(fnmatchcase(queue, p) for p in self.queues)

    def check_queue(self, queue: str) -> None:
        if not self.allows_queue(queue):
            raise errors.Forbidden(f"this API key may not use queue {queue!r}")


ANONYMOUS = Principal(key_id="", scopes=frozenset({"admin"}))


@dataclass(frozen=True, slots=True)
class ApiKey:
    """One configured key. ``repr`` never shows the secret."""

    secret: str
    principal: Principal

    def __repr__(self) -> str:
        return f"ApiKey(id={self.principal.key_id}, scopes={sorted(self.principal.scopes)})"


def parse_api_keys(text: str) -> tuple[ApiKey, ...]:
    """``secret:scope+scope[@pattern|pattern],…`` (docs/security.md). Refuses the shipped
    placeholders and short keys: a guessable key is worse than none, as it looks safe."""
    keys: list[ApiKey] = []
    for entry in filter(None, (part.strip() for part in text.split(","))):
        grant, _, patterns = entry.partition("@")
        secret, _, scope_text = grant.rpartition(":")
        if not secret:
            raise ValueError("CELERIAC_API_KEYS entries look like 'secret:scope+scope[@queue-*]'")
        if secret.lower() in PLACEHOLDER_KEYS:
            raise ValueError(
                "CELERIAC_API_KEYS holds a placeholder key from the examples; generate real "
                "ones: python -c 'import secrets; print(secrets.token_urlsafe(32))'"
            )
        if len(secret) < MIN_KEY_LENGTH:
            raise ValueError(
                f"CELERIAC_API_KEYS: every key must be at least {MIN_KEY_LENGTH} characters"
            )
        scopes = frozenset(s.strip() for s in scope_text.split("+") if s.strip())
        unknown = scopes - SCOPES
        if unknown or not scopes:
            raise ValueError(f"CELERIAC_API_KEYS: unknown scopes {sorted(unknown)}")
        queues = tuple(p.strip() for p in patterns.split("|") if p.strip()) or None
        principal = Principal(key_fingerprint(secret), scopes, queues)
        keys.append(ApiKey(secret, principal))
    return tuple(keys)


# The dashboard (service/ui) keeps the key it was given in an HttpOnly, SameSite=Strict
# cookie. The cookie counts only on requests that also carry the UI_HEADER, which a page
# of another site cannot send without a CORS preflight this service never grants: so a
# form or link elsewhere can never act with it (CSRF), whatever the browser.
UI_COOKIE = "celeriac_key"
UI_HEADER = "x-celeriac-ui"


def _presented_key(headers: Mapping[str, str]) -> str | None:
    header = headers.get("authorization")
    if header is not None:
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and value:
            return value.strip()
    key = headers.get("x-api-key")
    if key is None and UI_HEADER in headers:
        key = cookie_key(headers.get("cookie"))
    return key


def cookie_key(cookie_header: str | None) -> str | None:
    """The dashboard's key from a Cookie header, if it holds one."""
    if not cookie_header or UI_COOKIE not in cookie_header:
        return None
    for part in cookie_header.split(";"):
        name, _, value = part.strip().partition("=")
        if name == UI_COOKIE and value:
            return unquote(value)  # set percent-encoded (service/ui)
    return None


def match_key(keys: tuple[ApiKey, ...], presented: str) -> Principal | None:
    """The principal of a presented key (the dashboard's log-in), or None."""
    key = _match(keys, presented)
    return None if key is None else key.principal


def _match(keys: tuple[ApiKey, ...], presented: str) -> ApiKey | None:
    found = None
    presented_bytes = presented.encode("utf-8", "surrogateescape")
    for key in keys:  # check every key: timing must not reveal which one matched
        if hmac.compare_digest(key.secret.encode(), presented_bytes):
            found = key
    return found


def authenticate(
    keys: tuple[ApiKey, ...], headers: Mapping[str, str], scope: str | None
) -> Principal:
    """The caller of a route that needs ``scope`` (None: a public route). With no keys
    configured everyone is the anonymous administrator."""
    if not keys:
        return ANONYMOUS
    presented = _presented_key(headers)
    key = _match(keys, presented) if presented else None
    if key is None:
        if scope is None:
            return Principal(key_id="", scopes=frozenset())
        raise errors.Unauthorized("send an API key as 'Authorization: Bearer <key>'")
    if scope is not None and not key.principal.has(scope):
        raise errors.Forbidden(f"this API key lacks the {scope!r} scope")
    return key.principal

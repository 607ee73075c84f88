"""The webhook delivery loop (docs/webhooks.md): claims due deliveries from the outbox
(``service.webhooks``), signs them per Standard Webhooks and POSTs them, at most
``CELERIAC_WEBHOOK_CONCURRENCY`` at a time, each bounded by
``CELERIAC_WEBHOOK_TIMEOUT_SECONDS`` from DNS lookup to the last byte.

It shares nothing with job processing but the database: a slow or dead receiver holds one
delivery slot for at most the timeout, and never a job, a lease or a request. The
``Deliverer`` is a background plugin (service/loops.py): it is due when the next attempt
is, and is woken by a commit that wrote deliveries (Effects -> ``Signals.webhooks``) or by
a finishing attempt that frees a slot or wants an earlier retry;
``webhook_idle_check_seconds`` caps its sleep so deliveries a crashed replica recorded are
picked up by the others."""

from __future__ import annotations

import asyncio
import base64
import binascii
import email.utils
import hashlib
import hmac
import json
import logging
import random
import re
import time
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import httpx

from service import webhooks
from service.loops import Pass, Plugin, sleep_seconds
from service.netguard import AddressPolicy, AddressRefused, GuardedTransport, check_webhook_url
from service.outage import log_failure
from service.serialize import iso, values_body
from service.settings import Settings
from service.webhooks import Claim, Outcome

if TYPE_CHECKING:
    from service.runtime import Runtime

log = logging.getLogger("celeriac.webhooks")

SECRET_PREFIX = "whsec_"  # noqa: S105 - the format's prefix, not a secret
USER_AGENT = "celeriac-webhooks/1"
RESPONSE_READ_LIMIT = 64 * 1024  # read this much of an answer (keep-alive), no more
MIN_SECRET_BYTES = 16
# An attempt's error goes into a text column and the log: no control characters (an
# exception's text may quote the URL, and PostgreSQL refuses NUL outright).
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


# --- signing (https://www.standardwebhooks.com) --------------------------------------------


def parse_secrets(text: str) -> tuple[bytes, ...]:
    """CELERIAC_WEBHOOK_SECRET: ``whsec_<base64>`` entries, space-separated. Errors name
    the entry's position, never its value."""
    keys: list[bytes] = []
    for position, entry in enumerate(text.split(), start=1):
        if not entry.startswith(SECRET_PREFIX):
            raise ValueError(f"CELERIAC_WEBHOOK_SECRET: entry {position} must start with whsec_")
        encoded = entry[len(SECRET_PREFIX) :]
        try:
            key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
        except binascii.Error:
            raise ValueError(
                f"CELERIAC_WEBHOOK_SECRET: entry {position} is not base64 after whsec_"
            ) from None
        if len(key) < MIN_SECRET_BYTES:
            raise ValueError(
                f"CELERIAC_WEBHOOK_SECRET: entry {position} is shorter than "
                f'{MIN_SECRET_BYTES} bytes; make one with: python -c "import base64, '
                "secrets; print('whsec_' + base64.b64encode(secrets.token_bytes(32)).decode())\""
            )
        keys.append(key)
    return tuple(keys)


def signature(keys: tuple[bytes, ...], msg_id: str, timestamp: int, body: bytes) -> str:
    """``v1,<base64 HMAC-SHA256>`` per key, space-separated (rotation: receivers accept
    any one that matches)."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return " ".join(
        "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
        for key in keys
    )


def payload(claim: Claim) -> bytes:
    """``{type, timestamp, data}``: data is the job as GET /jobs/{id} shows it, except a
    result kept in the result store (``result_stored: true``), which is not inlined."""
    assert claim.job is not None
    data = values_body(claim.job)
    if claim.event.startswith("workflow."):  # docs/workflows.md: named by its last job
        data = {"workflow_id": claim.job.get("workflow_id"), "status": claim.event[9:],
                "last_job": data}  # fmt: skip
    body = {"type": claim.event, "timestamp": iso(claim.created_at), "data": data}
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


def headers(keys: tuple[bytes, ...], msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    result = {
        "content-type": "application/json",
        "user-agent": USER_AGENT,
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
    }
    if keys:
        result["webhook-signature"] = signature(keys, msg_id, timestamp, body)
    return result


# --- retry policy --------------------------------------------------------------------------


def retry_after_seconds(value: str | None, now: datetime) -> float | None:
    """Retry-After: delay-seconds or an HTTP-date (RFC 9110 10.2.3)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max((when - now).total_seconds(), 0.0)


def decide(
    claim: Claim,
    now: datetime,
    status_code: int | None,
    retry_after: float | None,
    settings: Settings,
) -> tuple[str, datetime | None]:
    """The delivery's next status, and when to try again if pending. 2xx: delivered.
    410: gone, at once. Anything else (another status, a timeout, a network error) is
    retried with exponential backoff and jitter, or after Retry-After on 429/503, until
    ``webhook_retry_window_seconds`` after the delivery was created."""
    if status_code is not None and 200 <= status_code < 300:
        return webhooks.DELIVERED, None
    if status_code == 410:
        return webhooks.GONE, None
    attempt = claim.attempts + 1
    delay = min(
        settings.webhook_retry_max_seconds,
        settings.webhook_retry_base_seconds * 2 ** min(attempt - 1, 62),
    ) * random.uniform(0.5, 1.0)
    if status_code in (429, 503) and retry_after is not None:
        # The receiver's number, capped just past the window (a Retry-After of 10**20
        # seconds must not overflow the date): a wait beyond it gives up now.
        delay = min(retry_after, settings.webhook_retry_window_seconds + 1.0)
    next_attempt = now + timedelta(seconds=delay)
    give_up_at = claim.created_at + timedelta(seconds=settings.webhook_retry_window_seconds)
    if next_attempt > give_up_at:
        return webhooks.FAILED, None
    return webhooks.PENDING, next_attempt


# --- the plugin ----------------------------------------------------------------------------


def http_client(settings: Settings) -> httpx.AsyncClient:
    """The one client every delivery shares: address rules at connect time, no proxies
    from the environment, no redirects (a 3xx is an answer, not a new destination)."""
    return httpx.AsyncClient(
        transport=GuardedTransport(
            AddressPolicy.parse(settings.webhook_allowed_hosts),
            max_connections=settings.webhook_concurrency,
        ),
        timeout=httpx.Timeout(settings.webhook_timeout_seconds),
        follow_redirects=False,
        trust_env=False,
    )


class Deliverer(Plugin):
    name = "webhooks"

    def __init__(self, runtime: Runtime, client: httpx.AsyncClient) -> None:
        settings = runtime.settings
        self.runtime = runtime
        self.client = client
        self.keys = parse_secrets(settings.webhook_secret)  # fails start-up if malformed
        self.slots = settings.webhook_concurrency
        self.timeout = settings.webhook_timeout_seconds
        # A claim outlives the attempt's hard deadline, with room to record the outcome
        # (were it late, the fence in record_attempt keeps a second claimer's result).
        self.hold_seconds = 2 * self.timeout + 1.0
        self.interval = settings.webhook_idle_check_seconds
        self.wake = runtime.signals.webhooks
        self.wakes = (self.wake,)
        self.in_flight: set[asyncio.Task[None]] = set()
        self.backlog = False
        # When the loop means to look again (None: mid-pass, or after a failed one).
        self.sleeping_until: datetime | None = None
        self._warned_unsigned = False

    async def run_once(self, runtime: Runtime) -> Pass:
        self.sleeping_until = None
        upcoming = await self._pass()
        now = runtime.clock.now()
        self.sleeping_until = now + timedelta(seconds=sleep_seconds(upcoming, now, self.interval))
        return Pass(due=upcoming)

    async def stop(self) -> None:
        """Shutting down: abandon attempts in flight (their claims run out)."""
        for task in list(self.in_flight):
            task.cancel()
        await asyncio.gather(*self.in_flight, return_exceptions=True)

    async def _pass(self) -> datetime | None:
        """Start attempts for due deliveries while slots are free; returns when the next
        one is due (None: wait for a wake-up)."""
        free = self.slots - len(self.in_flight)
        self.backlog = free <= 0
        if self.backlog:
            return None  # a finishing attempt wakes us
        now = self.runtime.clock.now()
        claims = await self.runtime.db.run(
            lambda session: webhooks.claim_due(session, now, free, self.hold_seconds)
        )
        for claim in claims:
            task = asyncio.create_task(self._deliver(claim), name=f"webhook-{claim.id}")
            self.in_flight.add(task)
            task.add_done_callback(self._finished)
        if len(claims) == free:
            self.backlog = True
            return None
        return await self.runtime.db.read(webhooks.next_due)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self.in_flight.discard(task)
        if self.backlog:
            self.wake.set()

    async def _deliver(self, claim: Claim) -> None:
        try:
            outcome = await self.attempt(claim)
            await self.runtime.db.run(
                lambda session: webhooks.record_attempt(session, claim, outcome)
            )
        except asyncio.CancelledError:
            raise
        except Exception:
            # The claim's hold runs out and the delivery is tried again.
            log_failure(log, f"webhook delivery {claim.id}: recording the attempt")
            return
        # A retry due before the loop means to wake (it slept towards this attempt's
        # claim, or longer): wake it now.
        # (Mid-pass or after a failed pass, sleeping_until is None: the loop looks again.)
        self.runtime.observer.webhook_delivered(outcome.status)  # metrics
        retry_at = outcome.next_attempt_at
        if retry_at is not None and (self.sleeping_until is None or retry_at < self.sleeping_until):
            self.wake.set()
        if outcome.status in (webhooks.FAILED, webhooks.GONE):
            log.warning(
                "webhook delivery %s to %s gave up (%s): %s",
                claim.id,
                _host_of(claim.url),
                outcome.status,
                outcome.error,
            )

    async def attempt(self, claim: Claim) -> Outcome:
        """One POST. Never raises: whatever went wrong is this attempt's recorded error,
        and the delivery's retry window applies to it like to any other failure."""
        at = self.runtime.clock.now()
        started = time.monotonic()
        status_code: int | None = None
        retry_after: float | None = None
        error: str | None = None
        refused = False
        try:
            _check_target(claim)
            status_code, retry_after, error = await self._post(claim)
        except (AddressRefused, LookupError) as exc:
            refused, error = True, str(exc)
        except TimeoutError:
            error = f"no complete answer within {self.timeout:g}s"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        except Exception as exc:  # a bug, or a URL the checks missed: one line, no traceback
            error = f"{type(exc).__name__}: {exc}"
            log.warning("webhook delivery %s: attempt failed unexpectedly: %s", claim.id,
                        _CONTROL.sub("?", error)[: webhooks.ERROR_MAX_CHARS])  # fmt: skip
        if error is not None:
            error = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", error)
        latency_ms = int((time.monotonic() - started) * 1000)
        now = self.runtime.clock.now()
        if refused:  # permanent: the same URL would be refused again
            status, next_attempt = webhooks.FAILED, None
        else:
            status, next_attempt = decide(
                claim, now, status_code, retry_after, self.runtime.settings
            )
        return Outcome(at, status_code, latency_ms, error, status, next_attempt)

    async def _post(self, claim: Claim) -> tuple[int, float | None, str | None]:
        body = payload(claim)
        if not self.keys and not self._warned_unsigned:
            self._warned_unsigned = True
            log.warning("CELERIAC_WEBHOOK_SECRET is not set: webhooks are sent unsigned")
        sent = headers(self.keys, claim.id, int(time.time()), body)
        async with asyncio.timeout(self.timeout):  # the whole exchange, DNS included
            async with self.client.stream("POST", claim.url, content=body, headers=sent) as answer:
                received = 0
                async for chunk in answer.aiter_raw():
                    received += len(chunk)
                    if received > RESPONSE_READ_LIMIT:
                        break
        code = answer.status_code
        retry_after = retry_after_seconds(answer.headers.get("retry-after"), datetime.now(UTC))
        if 200 <= code < 300:
            return code, None, None
        error = f"HTTP {code}"
        if 300 <= code < 400:
            error += " (redirects are not followed: point the webhook at the final URL)"
        return code, retry_after, error


def _check_target(claim: Claim) -> None:
    """Refuse (for good) a delivery that can never succeed: its job is gone, or its URL is
    not one a request can be made to (rows written before URLs were checked at submit,
    or written by hand)."""
    if claim.job is None:
        raise LookupError("the job no longer exists")
    try:
        check_webhook_url(claim.url)
    except ValueError as exc:
        raise AddressRefused(f"invalid webhook URL: {exc}") from None


def _host_of(url: str) -> str:
    try:
        return urlsplit(url).hostname or "?"
    except ValueError:
        return "?"

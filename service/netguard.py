"""Where webhooks may connect (SSRF rules, docs/webhooks.md).

A webhook URL is chosen by whoever submits a job, and the service connects from inside
the network: without rules, ``http://169.254.169.254/`` or ``http://localhost:5432/``
would let a client probe (or talk to) what only the service can reach. So by default every
address that is not plainly public is refused: loopback, private, link-local, CGNAT,
multicast, reserved, unspecified, cloud metadata, and IPv6 forms that embed such an IPv4
address. ``CELERIAC_WEBHOOK_ALLOWED_HOSTS`` lists exceptions (names, addresses, CIDRs).

The check runs on the *resolved* address, at connect time, and the connection goes to
exactly the address that was checked: the network backend below resolves once, checks
every answer, then connects to the checked IP. A name that resolves to a public address
for a validator and to 127.0.0.1 a moment later (DNS rebinding) gains nothing. The URL's
host still goes into the Host header and TLS SNI/certificate checks (httpcore takes those
from the request, not from the socket)."""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import ssl
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpcore
import httpx
import idna

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

METADATA = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, ...
        "fd00:ec2::254",  # AWS over IPv6
        "168.63.129.16",  # Azure wire server (a public address!)
        "100.100.100.200",  # Alibaba Cloud
    )
)
CGNAT = ipaddress.ip_network("100.64.0.0/10")
NAT64 = ipaddress.ip_network("64:ff9b::/96")


class AddressRefused(Exception):
    """The webhook's host is (or resolves to) an address the rules refuse. Not an
    httpcore error, so httpx lets it through unchanged and the caller can tell it from
    a network failure: a refusal is permanent, a failure is retried."""


def _embedded(address: IPAddress) -> list[IPAddress]:
    """Any IPv4 address an IPv6 form carries (mapped, 6to4, Teredo, NAT64), each of which
    the network may route to, then the address itself (the inner one names the reason)."""
    found: list[IPAddress] = []
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            found.append(address.ipv4_mapped)
        if address.sixtofour is not None:
            found.append(address.sixtofour)
        if address.teredo is not None:
            found.extend(address.teredo)
        if address in NAT64:
            found.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return [*found, address]


def why_refused(address: IPAddress) -> str | None:
    """The reason this address is not plainly public, or None."""
    for candidate in _embedded(address):
        reason = _classify(candidate)
        if reason is not None:
            return reason if candidate == address else f"{reason} ({candidate} inside)"
    return None


def _classify(address: IPAddress) -> str | None:
    checks = (
        (address in METADATA, "a cloud metadata address"),
        (address.is_loopback, "a loopback address"),
        (address.is_unspecified, "the unspecified address"),
        (address.is_link_local, "a link-local address"),
        (address.is_multicast, "a multicast address"),
        (isinstance(address, ipaddress.IPv4Address) and address in CGNAT, "a CGNAT address"),
        (address.is_reserved, "a reserved address"),
        (address.is_private, "a private address"),
        (not address.is_global, "not a public address"),
    )
    return next((reason for hit, reason in checks if hit), None)


@dataclass(frozen=True)
class AddressPolicy:
    """The allow-list: host names (exact, case-insensitive) and addresses or networks."""

    names: frozenset[str] = frozenset()
    networks: tuple[IPNetwork, ...] = field(default_factory=tuple)

    @classmethod
    def parse(cls, text: str) -> AddressPolicy:
        names: set[str] = set()
        networks: list[IPNetwork] = []
        for entry in filter(None, (part.strip() for part in text.split(","))):
            try:
                networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
            except ValueError:
                names.add(_normal_name(entry))
        return cls(frozenset(names), tuple(networks))

    def name_allowed(self, host: str) -> bool:
        return _normal_name(host) in self.names

    def refusal(self, address: IPAddress) -> str | None:
        if any(address.version == n.version and address in n for n in self.networks):
            return None
        return why_refused(address)


def _normal_name(host: str) -> str:
    return host.strip("[]").rstrip(".").lower()


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """Resolve once, check every address, connect to a checked one."""

    def __init__(self, policy: AddressPolicy, inner: httpcore.AsyncNetworkBackend | None = None):
        self.policy = policy
        self.inner = inner or httpcore.AnyIOBackend()

    async def resolve(self, host: str, port: int) -> list[IPAddress]:
        name = host.strip("[]")
        try:
            addresses: list[IPAddress] = [ipaddress.ip_address(name)]
        except ValueError:
            addresses = await _lookup(name, port)
        if self.policy.name_allowed(name):
            return addresses
        # Every answer must pass, not just the first: a mixed answer is a rebinding tell.
        for address in addresses:
            reason = self.policy.refusal(address)
            if reason is not None:
                shown = name if str(address) == name else f"{name} resolves to {address},"
                raise AddressRefused(
                    f"{shown} {reason}: refused (webhooks go to public addresses only; "
                    "allow it with CELERIAC_WEBHOOK_ALLOWED_HOSTS)"
                )
        return addresses

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's signature
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        failure: Exception | None = None
        for address in await self.resolve(host, port):
            try:
                return await self.inner.connect_tcp(
                    str(address),
                    port,
                    timeout=timeout,
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
        assert failure is not None  # resolve() returns at least one address
        raise failure

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's signature
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise AddressRefused("webhooks do not connect to unix sockets")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


async def _lookup(name: str, port: int) -> list[IPAddress]:
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(name, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        # Maybe temporary (a resolver outage): a network failure, retried.
        raise httpcore.ConnectError(f"cannot resolve {name}: {exc.strerror}") from exc
    found: dict[IPAddress, None] = {}
    for _family, _type, _proto, _canon, sockaddr in infos:
        found[ipaddress.ip_address(str(sockaddr[0]).split("%")[0])] = None
    if not found:
        raise httpcore.ConnectError(f"cannot resolve {name}: no addresses")
    return list(found)


class GuardedTransport(httpx.AsyncHTTPTransport):
    """httpx's transport over a ``GuardedBackend``. No proxies (``trust_env`` off): a
    proxy would make the connection, bypassing the address check. HTTP/1.1 only."""

    def __init__(self, policy: AddressPolicy, *, max_connections: int) -> None:
        super().__init__(trust_env=False)
        # httpx builds its pool with no way to pass a network backend: build our own.
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=_ssl_context(),
            max_connections=max_connections,
            max_keepalive_connections=max_connections,
            keepalive_expiry=30.0,
            http1=True,
            http2=False,
            network_backend=GuardedBackend(policy),
        )


def _ssl_context() -> ssl.SSLContext:
    return httpx.create_ssl_context(trust_env=False)


# --- webhook URLs: checked whole at submit, and again before every delivery attempt ---

URL_MAX_CHARS = 2000
HOSTNAME_MAX_CHARS = 253
LABEL_MAX_CHARS = 63
_LDH_LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9-]*[a-z0-9])?$")
# WHATWG URL parsing reads a host whose last label is a number (decimal, octal, hex) as an
# IPv4 address, so resolvers and proxies disagree on what "0177.0.0.1" or "0x7f.1" is.
_NUMERIC_LABEL = re.compile(r"^(?:[0-9]+|0x[0-9a-f]*)$")


def check_webhook_url(url: str) -> str:
    """The URL if a delivery can be attempted to it; else ValueError naming the problem.
    http(s) only, no user info, a port in 1..65535, and a host that is a DNS name
    (IDNA-encodable, labels of 1..63 letters, digits and inner hyphens, 253 characters in
    all), a canonical dotted-quad IPv4 address or a bracketed IPv6 address. Which
    addresses are allowed is decided at connect time (``GuardedBackend``)."""
    if len(url) > URL_MAX_CHARS:
        raise ValueError(f"the URL is longer than {URL_MAX_CHARS} characters")
    bad = next((c for c in url if c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F), None)
    if bad is not None:
        raise ValueError(f"the URL holds whitespace or a control character (U+{ord(bad):04X})")
    try:
        parts = urlsplit(url)
        port = parts.port  # raises for a port that is not a number in 0..65535
    except ValueError as exc:
        raise ValueError(f"the URL cannot be parsed: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError("the URL must be an absolute http:// or https:// URL")
    if "@" in parts.netloc:
        raise ValueError("user info (user:password@) is not allowed in a webhook URL")
    if port == 0:
        raise ValueError("the port must be in 1..65535")
    host = parts.netloc.rpartition(":")[0] if parts.port is not None else parts.netloc
    if host.endswith(":"):  # "host:" with an empty port
        host = host[:-1]
    _check_host(host)
    try:
        httpx.URL(url)  # what delivery will parse: it must agree
    except (httpx.InvalidURL, UnicodeError) as exc:
        raise ValueError(f"the URL cannot be parsed: {exc}") from None
    return url


def _check_host(host: str) -> None:
    if not host:
        raise ValueError("the URL has no host")
    if host.startswith("["):
        if not host.endswith("]") or "%" in host:
            raise ValueError(f"{host!r} is not a bracketed IPv6 address")
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError(f"{host!r} is not a valid IPv6 address") from None
        return
    name = host.lower()
    name = name[:-1] if name.endswith(".") else name
    labels = name.split(".")
    if _NUMERIC_LABEL.match(labels[-1]):
        try:
            canonical = str(ipaddress.IPv4Address(name)) == name
        except ValueError:
            canonical = False
        if not canonical:
            raise ValueError(
                f"{host!r} looks like an IPv4 address but is not a canonical dotted quad "
                "(four decimal numbers 0-255 without leading zeros)"
            )
        return
    _check_dns_name(host, name)


def _check_dns_name(host: str, name: str) -> None:
    try:
        ascii_name = name if name.isascii() else idna.encode(name).decode("ascii")
    except (idna.IDNAError, UnicodeError) as exc:
        raise ValueError(f"{host!r} is not a valid internationalised host name: {exc}") from None
    if len(ascii_name) > HOSTNAME_MAX_CHARS:
        raise ValueError(f"the host name is longer than {HOSTNAME_MAX_CHARS} characters")
    for label in ascii_name.split("."):
        if not label:
            raise ValueError(f"{host!r} has an empty label (two dots in a row, or a leading dot)")
        if len(label) > LABEL_MAX_CHARS:
            raise ValueError(f"{host!r} has a label longer than {LABEL_MAX_CHARS} characters")
        if not _LDH_LABEL.match(label):
            raise ValueError(
                f"{host!r}: the label {label!r} may hold only letters, digits and hyphens, "
                "and may not start or end with a hyphen"
            )
        if label.startswith("xn--"):
            try:
                idna.decode(label)
            except (idna.IDNAError, UnicodeError) as exc:
                raise ValueError(f"{host!r}: {label!r} is not a valid IDNA label: {exc}") from None

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
import socket
import ssl
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import httpcore
import httpx

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

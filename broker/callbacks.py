"""Delivery of provisioning outcomes to managers: the callback outbox dispatcher.

At least once: every outbox entry is POSTed until a 2xx answer, with exponential backoff and jitter,
across restarts (the outbox is in the store). Each delivery carries headers a manager verifies and
de-duplicates on:

- ``X-Broker-Delivery-Id``: stable across retries of one delivery;
- ``X-Broker-Timestamp``: unix seconds of this attempt;
- ``X-Broker-Signature``: ``v1=`` + hex HMAC-SHA256 over ``"{delivery_id}.{timestamp}.{body}"``
  with the shared callback key.

The URL is user input that the broker calls, so it is an SSRF risk. It is checked twice, against
one table (``broker.domain.addresses.RULES``: loopback, link-local and cloud metadata, multicast,
unspecified, broadcast and reserved addresses, each in every IPv6 spelling that embeds it):

- at Provision time, its literal host (``CallbackPolicy.check_literal``), read the way aiohttp's URL
  parser (yarl) reads it and refused when urllib reads it differently;
- at every delivery attempt, the literal host again and, for names, every address the name resolves
  to. The resolution is done by ``GuardedResolver`` inside aiohttp's connector, so the connection goes
  to exactly the addresses that were checked: DNS cannot swap in another address between the check
  and the connect.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import hashlib
import hmac
import logging
import random
import socket
import time
import urllib.parse
from typing import Any, Protocol

import aiohttp
import aiohttp.abc
import yarl

from broker import errors, workers
from broker.domain import addresses
from broker.store import port

log = logging.getLogger(__name__)

DELIVERY_HEADER = "X-Broker-Delivery-Id"
TIMESTAMP_HEADER = "X-Broker-Timestamp"
SIGNATURE_HEADER = "X-Broker-Signature"

IpNetwork = addresses.IpNetwork


def sign(key: bytes, delivery_id: str, timestamp: str, body: bytes) -> str:
    """The signature header value of one delivery attempt."""
    mac = hmac.new(key, f"{delivery_id}.{timestamp}.".encode() + body, hashlib.sha256)
    return "v1=" + mac.hexdigest()


FORBIDDEN = "CALLBACK_FORBIDDEN"


def _forbidden(message: str) -> errors.PermissionDenied:
    return errors.PermissionDenied(message, reason=FORBIDDEN)


@dataclasses.dataclass(frozen=True)
class CallbackPolicy:
    """Which callback destinations are allowed: ``addresses.RULES``, two switches and a deny-list."""

    allow_loopback: bool = False
    allow_link_local: bool = False
    denied_networks: tuple[IpNetwork, ...] = ()

    def check_address(self, address: str) -> None:
        """Raise PermissionDenied for an address the policy forbids, in any of its spellings."""
        ip = addresses.parse(address)
        refused = addresses.refusal(
            ip, allow_loopback=self.allow_loopback, allow_link_local=self.allow_link_local
        )
        if refused is not None:
            raise _forbidden(refused.message)
        for form in addresses.all_forms(ip):
            if any(form.version == net.version and form in net for net in self.denied_networks):
                raise _forbidden(f"callback address {ip} is in a denied network")

    def check_literal(self, url: str) -> None:
        """Refuse a URL whose host is a forbidden address or a localhost name, or is ambiguous.

        Called at Provision time and again before every delivery attempt (aiohttp does not resolve
        IP literals, so the resolver never sees them). Names that are not localhost pass here and
        are checked after resolution by ``GuardedResolver``.
        """
        host = target_host(url)
        if addresses.is_localhost_name(host):
            if not self.allow_loopback:
                raise _forbidden(
                    f"callback host {host!r} is a loopback name; it is allowed only with allow_loopback"
                )
            return
        if addresses.literal(host) is not None:
            self.check_address(host)


def target_host(url: str) -> str:
    """The host aiohttp will connect to, after checking that urllib reads the same URL alike.

    aiohttp parses with yarl; validation and older code read with urllib. A URL the two read
    differently (a different host, port or userinfo) is refused: which reading would the connection
    follow? The host is also put through ``addresses.host_problem``, for URLs stored before it
    existed.
    """
    try:
        split = urllib.parse.urlsplit(url)
        split_port = split.port
        parsed = yarl.URL(url)
    except ValueError as e:
        raise _forbidden(f"callback URL cannot be parsed: {e}") from e
    if parsed.scheme not in ("http", "https"):
        raise _forbidden("callback URL must be http:// or https://")
    host = parsed.raw_host or ""
    plain = split.hostname or ""
    problem = addresses.host_problem(plain, bracketed=split.netloc.rpartition("@")[2].startswith("["))
    if problem:
        raise _forbidden(problem)
    same = (
        _host_key(host) == _host_key(plain)
        and parsed.explicit_port == split_port
        and parsed.scheme == split.scheme
        and parsed.raw_user is None
        and split.username is None
    )
    if not same:
        raise _forbidden(
            "callback URL is read differently by different URL parsers "
            f"(host {host!r} or {plain!r}); write it plainly"
        )
    return host


def _host_key(host: str) -> str | addresses.IpAddress:
    if ":" in host:
        with contextlib.suppress(ValueError):
            return addresses.parse(host)
    return host.lower()


class ForbiddenDestination(OSError):
    """A name resolved to an address the policy forbids.

    An OSError because that is what aiohttp lets a resolver raise: it wraps it in a connection error
    whose ``os_error`` the dispatcher unwraps to record the refusal.
    """

    def __init__(self, denied: errors.PermissionDenied) -> None:
        super().__init__(denied.message)
        self.denied = denied


AddrInfo = tuple[socket.AddressFamily, socket.SocketKind, int, str, tuple[Any, ...]]


class GetAddrInfo(Protocol):
    """``loop.getaddrinfo``'s shape: the seam tests use to make a name resolve where they want."""

    async def __call__(
        self, host: str, port: int, *, family: int = 0, type: int = 0, flags: int = 0
    ) -> list[AddrInfo]:
        """Resolve ``host`` like ``socket.getaddrinfo``."""
        ...


class GuardedResolver(aiohttp.abc.AbstractResolver):
    """aiohttp's resolver for callbacks: resolves, then refuses if any address is forbidden.

    Being the connector's resolver is what closes the DNS-rebinding window: aiohttp connects to the
    addresses this returns, the very ones checked, with no second lookup.
    """

    def __init__(self, *, policy: CallbackPolicy, getaddrinfo: GetAddrInfo | None = None) -> None:
        self._policy = policy
        self._getaddrinfo = getaddrinfo

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[aiohttp.abc.ResolveResult]:
        """Every address of ``host``, each checked; ForbiddenDestination if any is forbidden."""
        getaddrinfo = self._getaddrinfo or asyncio.get_running_loop().getaddrinfo
        infos = await getaddrinfo(
            host, port, family=family, type=socket.SOCK_STREAM, flags=socket.AI_ADDRCONFIG
        )
        results: list[aiohttp.abc.ResolveResult] = []
        for info_family, _, proto, _, sockaddr in infos:
            if info_family not in (socket.AF_INET, socket.AF_INET6):
                continue
            address = str(sockaddr[0])
            try:
                self._policy.check_address(address)
            except errors.PermissionDenied as e:
                raise ForbiddenDestination(
                    _forbidden(f"callback host {host!r} resolves to {address}: {e.message}")
                ) from e
            if info_family == socket.AF_INET6 and len(sockaddr) > 3 and sockaddr[3]:
                address = f"{address.split('%', 1)[0]}%{sockaddr[3]}"
            results.append(
                aiohttp.abc.ResolveResult(
                    hostname=host,
                    host=address,
                    port=int(sockaddr[1]),
                    family=info_family,
                    proto=proto,
                    flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV,
                )
            )
        if not results:
            raise OSError(f"callback host {host!r} has no IPv4 or IPv6 address")
        return results

    async def close(self) -> None:
        """Nothing to release: lookups run on the event loop's executor."""


class Dispatcher:
    """Delivers due outbox entries until cancelled."""

    def __init__(
        self,
        *,
        store: port.Outbox,
        key: bytes,
        policy: CallbackPolicy,
        max_attempts: int = 25,
        base_delay: float = 1.0,
        max_delay: float = 300.0,
        poll_interval: float = 1.0,
        timeout: float = 10.0,
        getaddrinfo: GetAddrInfo | None = None,
    ) -> None:
        self._store = store
        self._key = key
        self._policy = policy
        self._max_attempts = max_attempts
        self._base_delay = base_delay
        self._max_delay = max_delay
        self._poll_interval = poll_interval
        self._timeout = timeout
        self._getaddrinfo = getaddrinfo
        self._wake = workers.Wakeup()
        self.delivered = 0
        self.failed = 0

    def kick(self) -> None:
        """New entries were enqueued."""
        self._wake.set()

    async def run(self) -> None:
        """Deliver forever."""
        timeout = aiohttp.ClientTimeout(total=self._timeout)
        # No DNS cache: every attempt resolves and checks afresh. No proxies from the environment
        # (trust_env is off): a proxy would do the resolving, out of the resolver's sight.
        connector = aiohttp.TCPConnector(
            resolver=GuardedResolver(policy=self._policy, getaddrinfo=self._getaddrinfo),
            use_dns_cache=False,
        )
        async with aiohttp.ClientSession(
            connector=connector,
            timeout=timeout,
            headers={"User-Agent": "resource-broker-callbacks"},
            trust_env=False,
        ) as http:

            async def deliver_due() -> float | None:
                try:
                    due = await self._store.due_callbacks()
                except errors.BrokerError as e:
                    log.warning("cannot read the callback outbox", extra={"error": e.message})
                    return None
                if not due:
                    return None
                await asyncio.gather(*(self._deliver(http, entry) for entry in due))
                return 0.0  # more may be due already

            await workers.run_forever(deliver_due, interval=self._poll_interval, wake=self._wake)

    async def _deliver(self, http: aiohttp.ClientSession, delivery: port.Delivery) -> None:
        delivery_id, url, attempts = delivery.delivery_id, delivery.url, delivery.attempts
        body = delivery.payload.encode()
        timestamp = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            DELIVERY_HEADER: delivery_id,
            TIMESTAMP_HEADER: timestamp,
            SIGNATURE_HEADER: sign(self._key, delivery_id, timestamp, body),
        }
        error = ""
        try:
            self._policy.check_literal(url)
            async with http.post(url, data=body, headers=headers, allow_redirects=False) as response:
                if 200 <= response.status < 300:
                    await self._store.callback_attempted(delivery_id, delivered=True)
                    self.delivered += 1
                    log.info(
                        "callback delivered", extra={"delivery_id": delivery_id, "attempts": attempts + 1}
                    )
                    return
                error = f"HTTP {response.status}"
        except errors.BrokerError as e:
            error = e.message
        except aiohttp.ClientConnectorError as e:
            if isinstance(e.os_error, ForbiddenDestination):
                error = e.os_error.denied.message
            else:
                error = f"{type(e).__name__}: {e}"[:300]
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            error = f"{type(e).__name__}: {e}"[:300]
        self.failed += 1
        if attempts + 1 >= self._max_attempts:
            retry_at = datetime.datetime.max.replace(tzinfo=datetime.UTC)
            log.error(
                "callback abandoned",
                extra={"delivery_id": delivery_id, "attempts": attempts + 1, "error": error},
            )
        else:
            delay = min(self._max_delay, self._base_delay * 2**attempts) * random.uniform(0.5, 1.0)  # noqa: S311
            retry_at = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=delay)
            log.warning(
                "callback failed; will retry",
                extra={
                    "delivery_id": delivery_id,
                    "attempts": attempts + 1,
                    "error": error,
                    "retry_in_s": round(delay, 1),
                },
            )
        await self._store.callback_attempted(delivery_id, delivered=False, error=error, retry_at=retry_at)

"""Delivery of provisioning outcomes to managers: the callback outbox dispatcher.

At least once: every outbox entry is POSTed until a 2xx answer, with exponential backoff and jitter,
across restarts (the outbox is in the store). Each delivery carries headers a manager verifies and
de-duplicates on:

- ``X-Broker-Delivery-Id``: stable across retries of one delivery;
- ``X-Broker-Timestamp``: unix seconds of this attempt;
- ``X-Broker-Signature``: ``v1=`` + hex HMAC-SHA256 over ``"{delivery_id}.{timestamp}.{body}"``
  with the shared callback key.

The URL is user input that the broker calls, so it is an SSRF risk: its host must resolve only to
addresses the allow-list permits. Loopback, link-local (cloud metadata included), multicast and
unspecified addresses are refused unless configured; the check runs on every attempt, against the
addresses actually resolved, so DNS cannot swap them in later.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import hashlib
import hmac
import ipaddress
import logging
import random
import socket
import time
import urllib.parse

import aiohttp

from broker import errors
from broker.store import sqlite

log = logging.getLogger(__name__)

DELIVERY_HEADER = "X-Broker-Delivery-Id"
TIMESTAMP_HEADER = "X-Broker-Timestamp"
SIGNATURE_HEADER = "X-Broker-Signature"

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def sign(key: bytes, delivery_id: str, timestamp: str, body: bytes) -> str:
    """The signature header value of one delivery attempt."""
    mac = hmac.new(key, f"{delivery_id}.{timestamp}.".encode() + body, hashlib.sha256)
    return "v1=" + mac.hexdigest()


@dataclasses.dataclass(frozen=True)
class CallbackPolicy:
    """Which callback destinations are allowed."""

    allow_loopback: bool = False
    allow_link_local: bool = False
    denied_networks: tuple[IpNetwork, ...] = ()

    def check_address(self, address: str) -> None:
        """Raise PermissionDenied for an address the policy forbids."""
        ip = ipaddress.ip_address(address)
        if ip.is_loopback and not self.allow_loopback:
            raise errors.PermissionDenied(
                f"callback address {ip} is a loopback address", reason="CALLBACK_FORBIDDEN"
            )
        if ip.is_link_local and not self.allow_link_local:
            raise errors.PermissionDenied(
                f"callback address {ip} is link-local (cloud metadata lives there)",
                reason="CALLBACK_FORBIDDEN",
            )
        if ip.is_multicast or ip.is_unspecified:
            raise errors.PermissionDenied(
                f"callback address {ip} cannot be called", reason="CALLBACK_FORBIDDEN"
            )
        if any(ip in net for net in self.denied_networks):
            raise errors.PermissionDenied(
                f"callback address {ip} is in a denied network", reason="CALLBACK_FORBIDDEN"
            )

    def check_literal(self, url: str) -> None:
        """At Provision time: refuse URLs whose host is a forbidden literal address or localhost."""
        host = urllib.parse.urlsplit(url).hostname or ""
        if host in ("localhost", "localhost.localdomain") or host.endswith(".localhost"):
            host = "127.0.0.1"
        with contextlib.suppress(ValueError):
            self.check_address(host)

    async def resolve(self, url: str) -> None:
        """At delivery time: every address the host resolves to must be allowed."""
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as e:
            raise errors.Unavailable(f"cannot resolve callback host {host!r}: {e}") from e
        for info in infos:
            self.check_address(str(info[4][0]))


class Dispatcher:
    """Delivers due outbox entries until cancelled."""

    def __init__(
        self,
        *,
        store: sqlite.Store,
        key: bytes,
        policy: CallbackPolicy,
        max_attempts: int = 25,
        base_delay: float = 1.0,
        max_delay: float = 300.0,
        poll_interval: float = 1.0,
        timeout: float = 10.0,
    ) -> None:
        self._store = store
        self._key = key
        self._policy = policy
        self._max_attempts = max_attempts
        self._base_delay = base_delay
        self._max_delay = max_delay
        self._poll_interval = poll_interval
        self._timeout = timeout
        self._wake = asyncio.Event()
        self.delivered = 0
        self.failed = 0

    def kick(self) -> None:
        """New entries were enqueued."""
        self._wake.set()

    async def run(self) -> None:
        """Deliver forever."""
        timeout = aiohttp.ClientTimeout(total=self._timeout)
        async with aiohttp.ClientSession(
            timeout=timeout, headers={"User-Agent": "resource-broker-callbacks"}
        ) as http:
            while True:
                self._wake.clear()
                try:
                    due = await self._store.due_callbacks()
                except errors.BrokerError as e:
                    log.warning("cannot read the callback outbox", extra={"error": e.message})
                    due = []
                if due:
                    await asyncio.gather(*(self._deliver(http, *entry) for entry in due))
                    continue
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._poll_interval):
                        await self._wake.wait()

    async def _deliver(
        self, http: aiohttp.ClientSession, delivery_id: str, url: str, payload: str, attempts: int
    ) -> None:
        body = payload.encode()
        timestamp = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            DELIVERY_HEADER: delivery_id,
            TIMESTAMP_HEADER: timestamp,
            SIGNATURE_HEADER: sign(self._key, delivery_id, timestamp, body),
        }
        error = ""
        try:
            await self._policy.resolve(url)
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

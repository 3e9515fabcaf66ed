"""Connection limits of the HTTP port: a deadline for request headers and a bound on open connections.

aiohttp closes idle keep-alive connections (``keepalive_timeout``; a later request trickled onto
such a connection is cut by the same timer), but nothing bounds how long a *new* connection may
take to send its first request head, nor how many connections are open: a slowloris client that
opens thousands of connections and sends one header byte every few seconds holds them all.
``LimitedSite`` listens like aiohttp's ``TCPSite`` and puts a guard in front of each connection's
aiohttp protocol:

- a connection over ``max_connections`` is answered ``503`` with a JSON error and closed at once;
- a connection that has not sent a complete request head (up to the blank line) within
  ``header_timeout`` seconds of connecting is closed (``408`` when it sent something).

Both refusals are counted (``refused``, by reason) for ``/metrics``.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import logging
from typing import Any

from aiohttp import web

log = logging.getLogger(__name__)

_HEAD_END = b"\r\n\r\n"


@dataclasses.dataclass(frozen=True)
class Limits:
    """Bounds of the HTTP port."""

    max_connections: int = 1000
    header_timeout: float = 10.0
    keepalive_timeout: float = 60.0


class Counters:
    """Open connections and refusals by reason, read by the metrics collector."""

    def __init__(self) -> None:
        self.open = 0
        self.refused: collections.Counter[str] = collections.Counter()


def _answer(status: int, reason: str, message: str) -> bytes:
    body = json.dumps({"error": {"code": status, "status": reason, "message": message}}).encode()
    phrase = {408: "Request Timeout", 503: "Service Unavailable"}[status]
    head = (
        f"HTTP/1.1 {status} {phrase}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


_FULL = _answer(503, "UNAVAILABLE", "too many open connections to the broker's HTTP port; retry later")
_SLOW = _answer(408, "DEADLINE_EXCEEDED", "the request headers did not arrive in time")


class _Guard(asyncio.Protocol):
    """Sits between the transport and aiohttp's protocol until the first request head is complete."""

    def __init__(self, inner: asyncio.Protocol, limits: Limits, counters: Counters) -> None:
        self._inner = inner
        self._limits = limits
        self._counters = counters
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._tail = b""
        self._received = False
        self._counted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        if self._counters.open >= self._limits.max_connections:
            self._counters.refused["max_connections"] += 1
            transport.write(_FULL)
            transport.close()
            return
        self._counters.open += 1
        self._counted = True
        self._timer = asyncio.get_running_loop().call_later(self._limits.header_timeout, self._too_slow)
        self._inner.connection_made(transport)

    def _too_slow(self) -> None:
        self._timer = None
        self._counters.refused["header_timeout"] += 1
        if self._transport is not None and not self._transport.is_closing():
            if self._received:
                self._transport.write(_SLOW)
            self._transport.close()

    def data_received(self, data: bytes) -> None:
        if not self._counted:
            return
        if self._timer is not None:
            self._received = True
            window = self._tail + data
            if _HEAD_END in window:
                self._timer.cancel()
                self._timer = None
            else:
                self._tail = window[-3:]
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._counted else None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._counted:
            self._counted = False
            self._counters.open -= 1
            self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


class LimitedSite(web.BaseSite):
    """A TCP site of an aiohttp runner whose connections are guarded by ``Limits``."""

    __slots__ = ("_counters", "_host", "_limits", "_port")

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        *,
        limits: Limits,
        counters: Counters,
        ssl_context: Any = None,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=1024)
        self._host = host
        self._port = port
        self._limits = limits
        self._counters = counters

    @property
    def name(self) -> str:
        """The site's URL, for aiohttp's logs."""
        scheme = "https" if self._ssl_context else "http"
        return f"{scheme}://{self._host}:{self._port}"

    async def start(self) -> None:
        """Listen; each accepted connection gets a guard in front of aiohttp's protocol."""
        await super().start()
        server = self._runner.server
        assert server is not None

        def guarded() -> asyncio.Protocol:
            return _Guard(server(), self._limits, self._counters)

        self._server = await asyncio.get_running_loop().create_server(
            guarded, self._host, self._port, ssl=self._ssl_context, backlog=self._backlog
        )

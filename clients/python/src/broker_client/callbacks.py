"""Receiving the broker's provisioning callbacks: verify the signature, drop duplicates.

The broker delivers each callback at least once, so a manager sees retries. Each delivery carries
``X-Broker-Delivery-Id`` (the same on every retry), ``X-Broker-Timestamp`` and
``X-Broker-Signature: v1=<hex HMAC-SHA256 of "{id}.{timestamp}.{body}">``. ``CallbackVerifier``
checks all three and remembers recent ids; ``CallbackServer`` is a small stdlib HTTP endpoint around
it for managers that have no web framework at hand.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hashlib
import hmac
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

# The path managers give the broker for callbacks (``http://manager:8080/v1/callback``), as in the
# original design. ``CallbackServer`` answers POSTs on any path, so a proxy may rewrite it.
CALLBACK_PATH = "/v1/callback"

DELIVERY_HEADER = "x-broker-delivery-id"
TIMESTAMP_HEADER = "x-broker-timestamp"
SIGNATURE_HEADER = "x-broker-signature"


class InvalidSignature(Exception):
    """The delivery is not signed with the shared key, or is too old: reject it."""


@dataclasses.dataclass(frozen=True)
class Delivery:
    """One verified callback."""

    delivery_id: str
    timestamp: int
    payload: dict[str, Any]


class CallbackVerifier:
    """Verifies signatures and de-duplicates deliveries by id."""

    def __init__(self, key: bytes, *, tolerance: float = 300.0, remember: int = 10_000) -> None:
        self._key = key
        self._tolerance = tolerance
        self._seen: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._remember = remember

    def verify(self, headers: Mapping[str, str], body: bytes, *, now: float | None = None) -> Delivery | None:
        """The delivery, or None for a duplicate; InvalidSignature when it must be rejected.

        The id counts as handled from here on; a caller whose handling then fails calls ``forget``.
        ``CallbackServer`` instead uses ``check`` and ``remember`` around its handler.
        """
        delivery = self.check(headers, body, now=now)
        if self.seen(delivery.delivery_id):
            return None
        self.remember(delivery.delivery_id)
        return delivery

    def seen(self, delivery_id: str) -> bool:
        """Whether ``delivery_id`` was handled already."""
        return delivery_id in self._seen

    def remember(self, delivery_id: str) -> None:
        """Record ``delivery_id`` as handled (bounded memory, oldest forgotten first)."""
        self._seen[delivery_id] = None
        while len(self._seen) > self._remember:
            self._seen.popitem(last=False)

    def check(self, headers: Mapping[str, str], body: bytes, *, now: float | None = None) -> Delivery:
        """Verify signature and age and parse the body, without de-duplicating."""
        lowered = {k.lower(): v for k, v in headers.items()}
        delivery_id = lowered.get(DELIVERY_HEADER, "")
        timestamp = lowered.get(TIMESTAMP_HEADER, "")
        signature = lowered.get(SIGNATURE_HEADER, "")
        if not delivery_id or not timestamp.isdigit() or not signature:
            raise InvalidSignature("missing delivery id, timestamp or signature header")
        if abs((now if now is not None else time.time()) - int(timestamp)) > self._tolerance:
            raise InvalidSignature("timestamp outside the tolerated window (replayed or clock skew)")
        mac = hmac.new(self._key, f"{delivery_id}.{timestamp}.".encode() + body, hashlib.sha256)
        if not hmac.compare_digest("v1=" + mac.hexdigest(), signature):
            raise InvalidSignature("signature does not match")
        try:
            payload = json.loads(body)
        except ValueError as e:
            raise InvalidSignature("body is not JSON") from e
        return Delivery(delivery_id=delivery_id, timestamp=int(timestamp), payload=payload)

    def forget(self, delivery_id: str) -> None:
        """Accept ``delivery_id`` again (its handling failed, so the broker's retry must get through)."""
        self._seen.pop(delivery_id, None)


Handler = Callable[[Delivery], Awaitable[None]]


class CallbackServer:
    """A minimal HTTP/1.1 endpoint: POST bodies are verified, new deliveries go to ``handler``.

    Answers 204 for handled and duplicate deliveries (so the broker stops retrying), 401 for a bad
    signature, 409 while the same delivery is still being handled (a retry that overtook a slow
    handler must not be acknowledged before the handling succeeded), and 500 when the handler
    fails, so the broker retries later.
    """

    def __init__(self, verifier: CallbackVerifier, handler: Handler, *, max_body: int = 1 << 20) -> None:
        self._verifier = verifier
        self._handler = handler
        self._max_body = max_body
        self._server: asyncio.AbstractServer | None = None
        self._in_progress: set[str] = set()
        self.port = 0

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Listen; ``port`` 0 picks a free one (see ``self.port``)."""
        self._server = await asyncio.start_server(self._serve, host, port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            status = await self._handle(reader)
        except (ValueError, asyncio.IncompleteReadError, ConnectionError):
            status = 400
        reasons = {
            204: "No Content",
            400: "Bad Request",
            401: "Unauthorized",
            405: "Method Not Allowed",
            409: "Conflict",
            413: "Payload Too Large",
            500: "Internal Server Error",
        }
        writer.write(
            f"HTTP/1.1 {status} {reasons[status]}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode()
        )
        try:
            await writer.drain()
        finally:
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader) -> int:
        request_line = (await reader.readline()).decode("latin-1").split()
        headers: dict[str, str] = {}
        while line := (await reader.readline()).decode("latin-1").strip():
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if len(request_line) < 2 or request_line[0] != "POST":
            return 405
        length = int(headers.get("content-length", "0"))
        if length > self._max_body:
            return 413
        body = await reader.readexactly(length)
        try:
            delivery = self._verifier.check(headers, body)
        except InvalidSignature:
            return 401
        if self._verifier.seen(delivery.delivery_id):
            return 204
        if delivery.delivery_id in self._in_progress:
            return 409
        self._in_progress.add(delivery.delivery_id)
        try:
            await self._handler(delivery)
        except Exception:
            return 500
        finally:
            self._in_progress.discard(delivery.delivery_id)
        self._verifier.remember(delivery.delivery_id)
        return 204

"""The manager side of provisioning callbacks (``broker_client.callbacks``).

``CallbackVerifier`` must accept exactly what the broker signs (``broker.callbacks.sign``) and refuse
anything else; ``CallbackServer`` is checked over real HTTP with an aiohttp client, the way the
broker's dispatcher posts, and finally end to end with the broker's own dispatcher.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from broker_client import callbacks as client_callbacks
from broker_client.callbacks import CallbackServer, CallbackVerifier, Delivery, InvalidSignature
from broker_client.client import BrokerClient
from conftest import PLATFORM_TOKEN, RunningBroker

from broker import callbacks as broker_callbacks

KEY = b"3f1d2c0b9a8e7f6d5c4b3a2918171615"
PAYLOAD = {
    "deploymentId": "deploy-0123456789ab",
    "namespace": "team-platform",
    "resourceName": "postgres-app-db",
    "status": "Ready",
    "message": "Database is running and healthy",
}


def signed(
    payload: dict[str, Any] | None = None,
    *,
    key: bytes = KEY,
    delivery_id: str | None = None,
    timestamp: int | None = None,
) -> tuple[dict[str, str], bytes]:
    """Headers and body exactly as the broker's dispatcher sends them."""
    body = json.dumps(payload if payload is not None else PAYLOAD).encode()
    delivery_id = delivery_id or f"dlv-{uuid.uuid4().hex[:16]}"
    ts = str(int(time.time()) if timestamp is None else timestamp)
    headers = {
        "Content-Type": "application/json",
        broker_callbacks.DELIVERY_HEADER: delivery_id,
        broker_callbacks.TIMESTAMP_HEADER: ts,
        broker_callbacks.SIGNATURE_HEADER: broker_callbacks.sign(key, delivery_id, ts, body),
    }
    return headers, body


# CallbackVerifier ---------------------------------------------------------------------------------


def test_the_header_names_agree_with_the_broker() -> None:
    assert broker_callbacks.DELIVERY_HEADER.lower() == client_callbacks.DELIVERY_HEADER
    assert broker_callbacks.TIMESTAMP_HEADER.lower() == client_callbacks.TIMESTAMP_HEADER
    assert broker_callbacks.SIGNATURE_HEADER.lower() == client_callbacks.SIGNATURE_HEADER


def test_the_brokers_real_signature_is_accepted() -> None:
    headers, body = signed(delivery_id="dlv-aaaaaaaaaaaaaaaa")

    delivery = CallbackVerifier(KEY).verify(headers, body)

    assert delivery == Delivery(
        delivery_id="dlv-aaaaaaaaaaaaaaaa",
        timestamp=int(headers[broker_callbacks.TIMESTAMP_HEADER]),
        payload=PAYLOAD,
    )


def test_header_names_are_matched_case_insensitively() -> None:
    headers, body = signed()
    shouted = {k.upper(): v for k, v in headers.items()}
    assert CallbackVerifier(KEY).verify(shouted, body) is not None


def test_a_tampered_body_is_rejected() -> None:
    headers, body = signed()
    tampered = body.replace(b'"Ready"', b'"Failed"')
    assert tampered != body

    with pytest.raises(InvalidSignature, match="signature does not match"):
        CallbackVerifier(KEY).verify(headers, tampered)


def test_a_tampered_delivery_id_or_timestamp_is_rejected() -> None:
    verifier = CallbackVerifier(KEY)
    headers, body = signed()
    other_id = {**headers, broker_callbacks.DELIVERY_HEADER: "dlv-ffffffffffffffff"}
    with pytest.raises(InvalidSignature, match="signature does not match"):
        verifier.verify(other_id, body)
    shifted = {
        **headers,
        broker_callbacks.TIMESTAMP_HEADER: str(int(headers[broker_callbacks.TIMESTAMP_HEADER]) - 1),
    }
    with pytest.raises(InvalidSignature, match="signature does not match"):
        verifier.verify(shifted, body)


def test_a_signature_made_with_another_key_is_rejected() -> None:
    headers, body = signed(key=b"not-the-shared-key-0000000000000")
    with pytest.raises(InvalidSignature, match="signature does not match"):
        CallbackVerifier(KEY).verify(headers, body)


@pytest.mark.parametrize(
    "missing",
    [
        broker_callbacks.DELIVERY_HEADER,
        broker_callbacks.TIMESTAMP_HEADER,
        broker_callbacks.SIGNATURE_HEADER,
    ],
)
def test_a_missing_header_is_rejected(missing: str) -> None:
    headers, body = signed()
    del headers[missing]
    with pytest.raises(InvalidSignature, match="missing"):
        CallbackVerifier(KEY).verify(headers, body)


def test_a_non_numeric_timestamp_is_rejected() -> None:
    headers, body = signed()
    headers[broker_callbacks.TIMESTAMP_HEADER] = "yesterday"
    with pytest.raises(InvalidSignature):
        CallbackVerifier(KEY).verify(headers, body)


def test_a_delivery_older_or_newer_than_the_tolerance_is_rejected() -> None:
    now = 1_800_000_000
    verifier = CallbackVerifier(KEY, tolerance=300)

    old_headers, old_body = signed(timestamp=now - 301)
    with pytest.raises(InvalidSignature, match="tolerated window"):
        verifier.verify(old_headers, old_body, now=now)
    future_headers, future_body = signed(timestamp=now + 301)
    with pytest.raises(InvalidSignature, match="tolerated window"):
        verifier.verify(future_headers, future_body, now=now)

    # Just inside the window is fine, on either side.
    inside_old = signed(timestamp=now - 299)
    inside_new = signed(timestamp=now + 299)
    assert verifier.verify(*inside_old, now=now) is not None
    assert verifier.verify(*inside_new, now=now) is not None


def test_a_duplicate_delivery_id_returns_none_and_forget_lets_it_through_again() -> None:
    verifier = CallbackVerifier(KEY)
    first = signed(delivery_id="dlv-1111111111111111")
    # The broker's retry of the same delivery: same id, new timestamp, new signature.
    retry = signed(delivery_id="dlv-1111111111111111", timestamp=int(time.time()) - 5)

    assert verifier.verify(*first) is not None
    assert verifier.verify(*first) is None
    assert verifier.verify(*retry) is None
    # A forged copy of a seen id is still rejected, not silently dropped as a duplicate.
    forged_headers, body = signed(delivery_id="dlv-1111111111111111", key=b"wrong-key")
    with pytest.raises(InvalidSignature):
        verifier.verify(forged_headers, body)

    verifier.forget("dlv-1111111111111111")
    assert verifier.verify(*retry) is not None


def test_the_memory_of_delivery_ids_is_bounded() -> None:
    verifier = CallbackVerifier(KEY, remember=2)
    a, b, c = (signed(delivery_id=f"dlv-{n * 16}") for n in "abc")
    for d in (a, b, c):
        assert verifier.verify(*d) is not None
    assert verifier.verify(*c) is None
    assert verifier.verify(*b) is None
    assert verifier.verify(*a) is not None  # the oldest was forgotten


# CallbackServer over real HTTP --------------------------------------------------------------------


class Handler:
    """Records deliveries; fails the next ``fail`` calls."""

    def __init__(self) -> None:
        self.calls: list[Delivery] = []
        self.fail = 0

    async def __call__(self, delivery: Delivery) -> None:
        self.calls.append(delivery)
        if self.fail:
            self.fail -= 1
            raise RuntimeError("the manager's database is down")


@pytest.fixture
async def endpoint() -> AsyncIterator[tuple[CallbackServer, Handler, str]]:
    handler = Handler()
    server = CallbackServer(CallbackVerifier(KEY), handler)
    await server.start("127.0.0.1", 0)
    try:
        yield server, handler, f"http://127.0.0.1:{server.port}/v1/callback"
    finally:
        await server.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


async def post(http: aiohttp.ClientSession, url: str, headers: dict[str, str], body: bytes) -> int:
    async with http.post(url, data=body, headers=headers) as response:
        assert await response.read() == b""
        return response.status


async def test_a_good_delivery_is_answered_204_and_handed_to_the_handler(
    endpoint: tuple[CallbackServer, Handler, str], http: aiohttp.ClientSession
) -> None:
    server, handler, url = endpoint
    assert server.port > 0
    headers, body = signed(delivery_id="dlv-2222222222222222")

    assert await post(http, url, headers, body) == 204

    assert [(d.delivery_id, d.payload) for d in handler.calls] == [("dlv-2222222222222222", PAYLOAD)]


async def test_a_bad_signature_is_answered_401_and_never_reaches_the_handler(
    endpoint: tuple[CallbackServer, Handler, str], http: aiohttp.ClientSession
) -> None:
    _, handler, url = endpoint
    headers, body = signed()
    assert await post(http, url, headers, body + b" ") == 401
    wrong_key = signed(key=b"an-attackers-key")
    assert await post(http, url, *wrong_key) == 401
    stale = signed(timestamp=int(time.time()) - 3600)
    assert await post(http, url, *stale) == 401
    no_signature = {k: v for k, v in headers.items() if k != broker_callbacks.SIGNATURE_HEADER}
    assert await post(http, url, no_signature, body) == 401

    assert handler.calls == []


async def test_a_duplicate_delivery_is_acknowledged_but_handled_once(
    endpoint: tuple[CallbackServer, Handler, str], http: aiohttp.ClientSession
) -> None:
    _, handler, url = endpoint
    first = signed(delivery_id="dlv-3333333333333333")
    retry = signed(delivery_id="dlv-3333333333333333")

    assert await post(http, url, *first) == 204
    assert await post(http, url, *retry) == 204  # 2xx so the broker stops retrying
    assert await post(http, url, *first) == 204

    assert [d.delivery_id for d in handler.calls] == ["dlv-3333333333333333"]


async def test_a_failing_handler_answers_500_and_the_retry_gets_through(
    endpoint: tuple[CallbackServer, Handler, str], http: aiohttp.ClientSession
) -> None:
    _, handler, url = endpoint
    handler.fail = 1
    headers, body = signed(delivery_id="dlv-4444444444444444")

    assert await post(http, url, headers, body) == 500
    # The broker's retry: same delivery id, fresh timestamp and signature.
    assert await post(http, url, *signed(delivery_id="dlv-4444444444444444")) == 204
    assert await post(http, url, *signed(delivery_id="dlv-4444444444444444")) == 204

    assert [d.delivery_id for d in handler.calls] == ["dlv-4444444444444444"] * 2


async def test_a_retry_arriving_while_the_first_attempt_is_still_handled_is_not_acknowledged_before_success(
    http: aiohttp.ClientSession,
) -> None:
    """The broker gives up on a slow attempt (its POST times out) and retries while the manager is
    still handling the first one. If that handling then fails, the delivery must not be lost: the
    retry may only be acknowledged (2xx) once the delivery was handled successfully."""
    release = asyncio.Event()
    calls: list[str] = []

    async def handler(delivery: Delivery) -> None:
        calls.append(delivery.delivery_id)
        if len(calls) == 1:
            await release.wait()
            raise RuntimeError("the manager's database went away mid-way")

    server = CallbackServer(CallbackVerifier(KEY), handler)
    await server.start("127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.port}/v1/callback"
    try:
        # Attempt 1 reaches the handler, which is slow; the broker stops waiting for it.
        first = asyncio.create_task(post(http, url, *signed(delivery_id="dlv-5555555555555555")))
        deadline = time.monotonic() + 10
        while not calls:
            assert time.monotonic() < deadline, "the first attempt never reached the handler"
            await asyncio.sleep(0.01)
        first.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await first

        # Attempt 2, the broker's retry, while attempt 1 is still being handled.
        retry = asyncio.create_task(post(http, url, *signed(delivery_id="dlv-5555555555555555")))
        await asyncio.wait({retry}, timeout=1.0)  # give it time to reach the endpoint
        release.set()  # ... and now attempt 1's handling fails
        status = await retry

        if 200 <= status < 300:
            assert len(calls) == 2, (
                f"the retry was answered {status} (the broker stops retrying) although the only "
                "handling of the delivery failed: the callback is lost"
            )
        else:
            # Not acknowledged: the broker retries once more, and that one is handled.
            assert await post(http, url, *signed(delivery_id="dlv-5555555555555555")) == 204
            assert calls == ["dlv-5555555555555555"] * 2
    finally:
        release.set()
        await server.stop()


async def test_other_methods_and_malformed_requests_are_refused(
    endpoint: tuple[CallbackServer, Handler, str], http: aiohttp.ClientSession
) -> None:
    _, handler, url = endpoint
    async with http.get(url) as response:
        assert response.status == 405
    # Signed, but not JSON: refused rather than handed over.
    assert await post(http, url, *signed_raw(b"not json")) == 401
    assert handler.calls == []


def signed_raw(body: bytes) -> tuple[dict[str, str], bytes]:
    delivery_id, ts = f"dlv-{uuid.uuid4().hex[:16]}", str(int(time.time()))
    return {
        broker_callbacks.DELIVERY_HEADER: delivery_id,
        broker_callbacks.TIMESTAMP_HEADER: ts,
        broker_callbacks.SIGNATURE_HEADER: broker_callbacks.sign(KEY, delivery_id, ts, body),
    }, body


async def test_the_brokers_dispatcher_delivers_to_the_callback_server_on_the_sandbox(
    cluster_broker: RunningBroker,
) -> None:
    """The whole path: a real broker signs with its key, the manager verifies with the same key."""
    key = (cluster_broker.data_dir / "callback.key").read_bytes().strip()
    handler = Handler()
    handler.fail = 1  # the first attempt fails: the broker must retry, and the retry must get through
    server = CallbackServer(CallbackVerifier(key), handler)
    await server.start("127.0.0.1", 0)
    try:
        async with await BrokerClient.connect(cluster_broker.grpc_target, token=PLATFORM_TOKEN) as client:
            reply = await client.provision(
                namespace="team-platform",
                resource_type="database",
                resource_name="callback-db",
                engine="postgresql",
                version="15",
                size="small",
                callback_url=f"http://127.0.0.1:{server.port}/v1/callback",
            )
        deadline = time.monotonic() + 30
        while len(handler.calls) < 2:
            assert time.monotonic() < deadline, f"deliveries so far: {handler.calls}"
            await asyncio.sleep(0.05)
        first, second = handler.calls
        assert first.delivery_id == second.delivery_id
        assert second.payload["deploymentId"] == reply.deployment_id
        assert second.payload["status"] == "Ready"
        assert second.payload["resourceName"] == "callback-db"
        # Delivered: no third call arrives.
        await asyncio.sleep(0.5)
        assert len(handler.calls) == 2
    finally:
        await server.stop()

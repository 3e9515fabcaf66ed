"""Shared fixtures: a real broker on ephemeral loopback ports, real gRPC channels, real HTTP.

Principals in the token file (tokens are the fixture constants below):

- ``admin``: every namespace
- ``platform``: team-platform only
- ``other``: team-other only
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import pathlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar

import aiohttp
import grpc
import pytest
import throwaway_postgres
from aiohttp import web
from broker_client.v1 import broker_pb2_grpc
from kube_sandbox import cluster as sandbox_cluster
from kube_sandbox import profiles

from broker import callbacks, server

# The sandbox's fixtures come from its pytest plugin (the kube-sandbox distribution registers it).
PLATFORM_PROFILE = profiles.platform(("team-platform", "team-other"))

ADMIN_TOKEN = "admin-token-0123456789abcdef"
PLATFORM_TOKEN = "platform-token-0123456789abcdef"
OTHER_TOKEN = "other-token-0123456789abcdef"

TOKENS_YAML = f"""
principals:
  - name: admin
    token: {ADMIN_TOKEN}
    namespaces: ["*"]
  - name: platform
    token: {PLATFORM_TOKEN}
    namespaces: [team-platform]
  - name: other
    token: {OTHER_TOKEN}
    namespaces: [team-other]
"""


T = TypeVar("T")


async def until(
    fetch: Callable[[], Awaitable[T]], ok: Callable[[T], object], *, within: float, what: str
) -> T:
    """Poll ``fetch`` until ``ok`` holds for its value and return it; fail with the last value after ``within`` s."""
    deadline = time.monotonic() + within
    while True:
        value = await fetch()
        if ok(value):
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {within:g}s waiting for {what}; last seen:\n{value}")
        await asyncio.sleep(0.05)


def bearer(token: str) -> tuple[tuple[str, str]]:
    """gRPC call metadata carrying a bearer token."""
    return (("authorization", f"Bearer {token}"),)


@dataclasses.dataclass
class RunningBroker:
    """A broker started in-process for one test, with its addresses."""

    broker: server.Broker
    data_dir: pathlib.Path

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.broker.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.broker.http_port}"


@pytest.fixture
def sandbox_options() -> dict[str, object]:
    """Pods become ready quickly; a platform cluster's namespaces and Strimzi's CRD are there.

    Tests that need slower pods override this fixture.
    """
    return {"ready_delay": 0.05, "crash_interval": 0.2, "profile": PLATFORM_PROFILE}


@dataclasses.dataclass
class Delivery:
    """One callback POST as the receiver got it."""

    delivery_id: str
    timestamp: str
    signature: str
    body: bytes

    @property
    def payload(self) -> dict[str, object]:
        return dict(json.loads(self.body))


class CallbackReceiver:
    """A manager's callback endpoint on loopback that records every delivery; can be told to fail."""

    def __init__(self) -> None:
        self.deliveries: list[Delivery] = []
        self.failing = False
        self.arrived = asyncio.Condition()
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        if self.failing:
            return web.Response(status=503)
        delivery = Delivery(
            delivery_id=request.headers.get(callbacks.DELIVERY_HEADER, ""),
            timestamp=request.headers.get(callbacks.TIMESTAMP_HEADER, ""),
            signature=request.headers.get(callbacks.SIGNATURE_HEADER, ""),
            body=await request.read(),
        )
        async with self.arrived:
            self.deliveries.append(delivery)
            self.arrived.notify_all()
        return web.Response(status=204)

    async def wait_for(self, count: int, within: float = 20.0) -> list[Delivery]:
        """Wait until ``count`` deliveries arrived; fails the test otherwise."""
        async with asyncio.timeout(within), self.arrived:
            await self.arrived.wait_for(lambda: len(self.deliveries) >= count)
        return list(self.deliveries)


@pytest.fixture
async def callback_receiver() -> AsyncIterator[CallbackReceiver]:
    receiver = CallbackReceiver()
    app = web.Application()
    app.router.add_post("/v1/callback", receiver.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    receiver.url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1/callback"
    try:
        yield receiver
    finally:
        await runner.cleanup()


def cluster_settings(
    data_dir: pathlib.Path, tokens: pathlib.Path, kubeconfig: pathlib.Path, **overrides: Any
) -> server.Settings:
    """Settings of a broker that manages workloads in the test's sandbox.

    Remediation is off unless a test turns it on: most tests induce drift and check how it is
    reported, which an eager broker would undo before they look.
    """
    settings = server.Settings(
        grpc_addr="127.0.0.1:0",
        http_addr="127.0.0.1:0",
        data_dir=data_dir,
        tokens_file=tokens,
        shutdown_grace=1.0,
        kubeconfig=kubeconfig,
        ready_timeout=20.0,
        callback_allow_loopback=True,
        remediate=False,
    )
    return dataclasses.replace(settings, **overrides)


@pytest.fixture
async def cluster_broker(
    tmp_path: pathlib.Path,
    tokens_file: pathlib.Path,
    sandbox: sandbox_cluster.Sandbox,
    sandbox_kubeconfig: pathlib.Path,
) -> AsyncIterator[RunningBroker]:
    """A broker with token auth that provisions into the ``sandbox`` fixture's cluster."""
    data_dir = tmp_path / "data"
    broker = server.Broker(cluster_settings(data_dir, tokens_file, sandbox_kubeconfig))
    await broker.start()
    assert broker.cluster is not None
    assert await broker.cluster.wait_synced(10.0)
    try:
        yield RunningBroker(broker=broker, data_dir=data_dir)
    finally:
        await broker.stop()


@pytest.fixture
def tokens_file(tmp_path: pathlib.Path) -> pathlib.Path:
    path = tmp_path / "tokens.yaml"
    path.write_text(TOKENS_YAML)
    return path


@pytest.fixture
async def running_broker(tmp_path: pathlib.Path, tokens_file: pathlib.Path) -> AsyncIterator[RunningBroker]:
    """A broker with token authentication, its store in a temporary directory."""
    async with broker_running(tmp_path / "data", tokens_file) as running:
        yield running


@contextlib.asynccontextmanager
async def broker_running(
    data_dir: pathlib.Path, tokens_file: pathlib.Path, **overrides: Any
) -> AsyncIterator[RunningBroker]:
    """A started broker without a cluster on ephemeral loopback ports; ``overrides`` change settings."""
    settings = server.Settings(
        grpc_addr="127.0.0.1:0",
        http_addr="127.0.0.1:0",
        data_dir=data_dir,
        tokens_file=tokens_file,
        shutdown_grace=1.0,
    )
    broker = server.Broker(dataclasses.replace(settings, **overrides))
    await broker.start()
    try:
        yield RunningBroker(broker=broker, data_dir=data_dir)
    finally:
        await broker.stop()


@pytest.fixture
async def channel(running_broker: RunningBroker) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(running_broker.grpc_target) as ch:
        yield ch


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> broker_pb2_grpc.BrokerServiceStub:
    return broker_pb2_grpc.BrokerServiceStub(channel)


@pytest.fixture
async def http(running_broker: RunningBroker) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(base_url=running_broker.http_url) as session:
        yield session


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[throwaway_postgres.Cluster]:
    """A throwaway PostgreSQL cluster on loopback for the whole session (see ``throwaway_postgres``)."""
    try:
        cluster = throwaway_postgres.Cluster.start()
    except throwaway_postgres.Unusable as e:
        pytest.fail(f"cannot start PostgreSQL for the tests: {e}", pytrace=False)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def postgres_url(postgres_cluster: throwaway_postgres.Cluster) -> str:
    """The URL of a fresh, empty schema in the session's cluster, for one test."""
    return postgres_cluster.new_store_url()

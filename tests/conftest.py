"""Shared fixtures: a real broker on ephemeral loopback ports, real gRPC channels, real HTTP.

Principals in the token file (tokens are the fixture constants below):

- ``admin``: every namespace
- ``platform``: team-platform only
- ``other``: team-other only
"""

from __future__ import annotations

import dataclasses
import importlib.util
import pathlib
from collections.abc import AsyncIterator

import aiohttp
import grpc
import pytest
from broker_client.v1 import broker_pb2_grpc

from broker import server

# The sandbox package is being built alongside; register its fixtures once it exists.
pytest_plugins = (
    ["broker.sandbox.pytest_plugin"] if importlib.util.find_spec("broker.sandbox.pytest_plugin") else []
)

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
def tokens_file(tmp_path: pathlib.Path) -> pathlib.Path:
    path = tmp_path / "tokens.yaml"
    path.write_text(TOKENS_YAML)
    return path


@pytest.fixture
async def running_broker(tmp_path: pathlib.Path, tokens_file: pathlib.Path) -> AsyncIterator[RunningBroker]:
    """A broker with token authentication, its store in a temporary directory."""
    data_dir = tmp_path / "data"
    broker = server.Broker(
        server.Settings(
            grpc_addr="127.0.0.1:0",
            http_addr="127.0.0.1:0",
            data_dir=data_dir,
            tokens_file=tokens_file,
            shutdown_grace=1.0,
        )
    )
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

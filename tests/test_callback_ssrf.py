"""SSRF: callback URLs may not point the broker at its own host, cloud metadata or other internal
addresses, in any spelling, at Provision time or at any delivery attempt.

Hostile URLs point at a real TCP listener on 127.0.0.1 (its real port, wherever the host is
loopback in some spelling); it must never see a connection. Only loopback addresses are ever the
target of real traffic here: names are resolved through the dispatcher's own resolver seam
(``getaddrinfo=``), never through DNS, and URLs with non-loopback targets only go to brokers that have
no cluster, so nothing they accept is ever delivered.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import pathlib
import re
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import grpc
import pytest
import pytest_asyncio
from broker_client.v1 import broker_pb2 as pb
from broker_client.v1 import broker_pb2_grpc
from conftest import ADMIN_TOKEN, TOKENS_YAML, RunningBroker, bearer, until
from google.protobuf import json_format
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from broker import callbacks, errors, server
from broker.domain import addresses, model, validation
from broker.domain import catalog as catalog_mod
from broker.store import sqlite

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
AUTH = bearer(ADMIN_TOKEN)
HTTP_AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


class Listener:
    """A TCP listener on 127.0.0.1 that counts every connection and answers any request with 204."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.connections = 0
        self.requests: list[bytes] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self, port: int = 0) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            self.requests.append(head)
            writer.write(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@dataclasses.dataclass(frozen=True)
class Hostile:
    """A hostile callback URL; ``{port}`` is the listener's port. ``always``: refused even when
    loopback callbacks are allowed. ``fragment``: what the field violation must say."""

    id: str
    url: str
    fragment: str
    always: bool


AMBIGUOUS = "ambiguous IPv4 address"
EMBEDS_LOOPBACK = "embeds the IPv4 address 127.0.0.1"

# fmt: off
HOSTILE: list[Hostile] = [
    # IPv4 in decimal, octal, hex, short and mixed forms: refused as ambiguous, whatever the policy.
    Hostile("ipv4-decimal-integer", "http://2130706433:{port}/cb", AMBIGUOUS, always=True),
    Hostile("ipv4-octal-dotted", "http://0177.0.0.1:{port}/cb", AMBIGUOUS, always=True),
    Hostile("ipv4-octal-integer", "http://017700000001:{port}/cb", AMBIGUOUS, always=True),
    Hostile("ipv4-hex-dotted", "http://0x7f.0.0.1:{port}/cb", AMBIGUOUS, always=True),
    Hostile("ipv4-hex-integer", "http://0x7f000001:{port}/cb", AMBIGUOUS, always=True),
    Hostile("ipv4-short-two-parts", "http://127.1:{port}/cb", AMBIGUOUS, always=True),
    Hostile("ipv4-short-three-parts", "http://127.0.1:{port}/cb", AMBIGUOUS, always=True),
    Hostile("ipv4-mixed-hex-octal", "http://0x7f.0.00.01:{port}/cb", AMBIGUOUS, always=True),
    Hostile("ipv4-mixed-hex-short", "http://0x7F.1:{port}/cb", AMBIGUOUS, always=True),
    Hostile("ipv4-leading-zeros", "http://127.000.000.001:{port}/cb", AMBIGUOUS, always=True),
    Hostile("ipv4-zero-integer", "http://0:{port}/cb", AMBIGUOUS, always=True),
    Hostile("ipv4-metadata-integer", "http://2852039166/latest/meta-data/", AMBIGUOUS, always=True),
    Hostile("ipv4-trailing-dot", "http://127.0.0.1.:{port}/cb", AMBIGUOUS, always=True),
    Hostile("ipv4-fullwidth-digits", "http://\uff11\uff12\uff17.0.0.1:{port}/cb", "not ASCII", always=True),
    Hostile("ipv4-ideographic-dots", "http://127\u30020\u30020\u30021:{port}/cb", "not ASCII", always=True),
    Hostile("ipv4-percent-encoded", "http://%31%32%37.0.0.1:{port}/cb", "not a valid host name", always=True),
    # Plain loopback and localhost names: refused unless loopback callbacks are allowed.
    Hostile("loopback-ipv4", "http://127.0.0.1:{port}/cb", "loopback address", always=False),
    Hostile("loopback-ipv4-other", "http://127.8.9.10:{port}/cb", "loopback address", always=False),
    Hostile("loopback-ipv6", "http://[::1]:{port}/cb", "loopback address", always=False),
    Hostile("loopback-scheme-uppercase", "HTTP://127.0.0.1:{port}/cb", "loopback address", always=False),
    Hostile("localhost", "http://localhost:{port}/cb", "loopback name", always=False),
    Hostile("localhost-uppercase-trailing-dot", "http://LOCALHOST.:{port}/cb", "loopback name", always=False),
    Hostile("localhost-subdomain", "http://foo.localhost:{port}/cb", "loopback name", always=False),
    Hostile("localhost-localdomain", "http://localhost.localdomain:{port}/cb", "loopback name", always=False),
    Hostile("localhost-ip6", "http://ip6-localhost:{port}/cb", "loopback name", always=False),
    # Userinfo, fragment and backslash tricks: the host a reader sees is not the one called.
    Hostile("userinfo-good-at-loopback", "http://good.example@127.0.0.1:{port}/cb", "credentials", always=True),
    Hostile("userinfo-password-at-loopback", "http://good.example:pw@127.0.0.1:{port}/cb", "credentials",
            always=True),
    Hostile("userinfo-fragment-at", "http://127.0.0.1:{port}#@good.example/", "fragment", always=True),
    Hostile("userinfo-backslash-at", "http://127.0.0.1:{port}\\@good.example/", "backslash", always=True),
    Hostile("userinfo-encoded-at", "http://good.example%40127.0.0.1:{port}/cb", "not a valid host name",
            always=True),
    Hostile("whitespace-tab-in-host", "http://127.0.0.1\t:{port}/cb", "whitespace or control", always=True),
    Hostile("control-crlf-injection", "http://127.0.0.1:{port}/cb\r\nHost: good.example",
            "whitespace or control", always=True),
    Hostile("bracketed-ipvfuture", "http://[v1.127.0.0.1]:{port}/cb", "brackets are for IPv6", always=True),
    # Every IPv6 embedding of an IPv4 address.
    Hostile("ipv6-mapped-dotted", "http://[::ffff:127.0.0.1]:{port}/cb", EMBEDS_LOOPBACK, always=False),
    Hostile("ipv6-mapped-hex", "http://[::ffff:7f00:1]:{port}/cb", EMBEDS_LOOPBACK, always=False),
    Hostile("ipv6-mapped-uncompressed", "http://[0:0:0:0:0:ffff:127.0.0.1]:{port}/cb", EMBEDS_LOOPBACK,
            always=False),
    Hostile("ipv6-mapped-unspecified-dotted", "http://[::ffff:0.0.0.0]:{port}/cb", "unspecified", always=True),
    Hostile("ipv6-mapped-unspecified-hex", "http://[::ffff:0:0]:{port}/cb", "unspecified", always=True),
    Hostile("ipv6-mapped-metadata", "http://[::ffff:169.254.169.254]/latest/meta-data/", "cloud metadata",
            always=True),
    Hostile("ipv6-mapped-multicast", "http://[::ffff:224.0.0.1]:{port}/cb", "multicast", always=True),
    Hostile("ipv6-translated", "http://[::ffff:0:127.0.0.1]:{port}/cb", EMBEDS_LOOPBACK, always=False),
    Hostile("ipv6-compatible-dotted", "http://[::127.0.0.1]:{port}/cb", EMBEDS_LOOPBACK, always=False),
    Hostile("ipv6-compatible-hex", "http://[::7f00:1]:{port}/cb", EMBEDS_LOOPBACK, always=False),
    Hostile("ipv6-6to4-loopback", "http://[2002:7f00:1::]:{port}/cb", EMBEDS_LOOPBACK, always=False),
    Hostile("ipv6-6to4-metadata", "http://[2002:a9fe:a9fe::1]/latest/meta-data/", "cloud metadata", always=True),
    Hostile("ipv6-nat64-loopback", "http://[64:ff9b::127.0.0.1]:{port}/cb", EMBEDS_LOOPBACK, always=False),
    Hostile("ipv6-nat64-metadata", "http://[64:ff9b::a9fe:a9fe]/latest/meta-data/", "cloud metadata",
            always=True),
    # A /48-format address reads as 0.0.0.0 in the /96 format: refused whatever the settings.
    Hostile("ipv6-local-nat64-48", "http://[64:ff9b:1:7f00:0:100::]:{port}/cb", "(local-use NAT64)", always=True),
    Hostile("ipv6-local-nat64-96", "http://[64:ff9b:1::7f00:1]:{port}/cb", EMBEDS_LOOPBACK, always=False),
    Hostile("ipv6-teredo-client", "http://[2001:0:4136:e378:8000:63bf:80ff:fffe]:{port}/cb", EMBEDS_LOOPBACK,
            always=False),
    Hostile("ipv6-teredo-server", "http://[2001:0:7f00:1:0:0:f5ff:fffe]:{port}/cb", EMBEDS_LOOPBACK,
            always=False),
    Hostile("ipv6-zone-link-local", "http://[fe80::1%25eth0]:{port}/cb", "zone id", always=True),
    Hostile("ipv6-zone-loopback", "http://[::1%25lo]:{port}/cb", "zone id", always=True),
    # Metadata, link-local and addresses nothing legitimate listens on.
    Hostile("metadata-aws-gcp-azure", "http://169.254.169.254/latest/meta-data/", "cloud metadata", always=True),
    Hostile("metadata-aws-ecs", "http://169.254.170.2/v2/credentials", "cloud metadata", always=True),
    Hostile("metadata-aws-ipv6", "http://[fd00:ec2::254]/latest/meta-data/", "cloud metadata", always=True),
    Hostile("metadata-alibaba", "http://100.100.100.200/latest/meta-data/", "cloud metadata", always=True),
    Hostile("link-local-ipv4", "http://169.254.1.1/cb", "link-local", always=True),
    Hostile("link-local-ipv6", "http://[fe80::1]/cb", "link-local", always=True),
    Hostile("unspecified-ipv4", "http://0.0.0.0:{port}/cb", "unspecified", always=True),
    Hostile("unspecified-this-network", "http://0.1.2.3:{port}/cb", "unspecified", always=True),
    Hostile("unspecified-ipv6", "http://[::]:{port}/cb", "unspecified", always=True),
    Hostile("multicast-ipv4", "http://224.0.0.1/cb", "multicast", always=True),
    Hostile("multicast-ipv6", "http://[ff02::1]/cb", "multicast", always=True),
    Hostile("broadcast", "http://255.255.255.255/cb", "broadcast", always=True),
    Hostile("reserved-class-e", "http://240.0.0.1/cb", "reserved", always=True),
    # Other schemes.
    Hostile("scheme-file", "file:///etc/passwd", "http:// or https://", always=True),
    Hostile("scheme-gopher", "gopher://127.0.0.1:{port}/_POST", "http:// or https://", always=True),
    Hostile("scheme-ftp", "ftp://127.0.0.1:{port}/cb", "http:// or https://", always=True),
    Hostile("scheme-ws", "ws://127.0.0.1:{port}/cb", "http:// or https://", always=True),
    Hostile("scheme-dict", "dict://127.0.0.1:{port}/info", "http:// or https://", always=True),
    Hostile("scheme-javascript", "javascript:alert(1)", "http:// or https://", always=True),
    Hostile("scheme-missing-slashes", "http:127.0.0.1:{port}/cb", "http:// or https://", always=True),
]
# fmt: on

ALLOWED = [
    "http://10.1.2.3:8080/v1/callback",
    "http://172.16.5.4/v1/callback",
    "https://192.168.0.10:8443/v1/callback",
    "http://100.64.0.9/v1/callback",
    "http://[fd12:3456::1]:8080/v1/callback",
    "http://[::ffff:10.0.0.7]:8080/v1/callback",
    "http://db-manager.platform-system.svc:8080/v1/callback",
    "http://db-manager.platform-system.svc.cluster.local.:8080/v1/callback",
]


def provision_body(callback_url: str, *, name: str = "ssrf-db") -> dict[str, Any]:
    return {
        "namespace": "team-platform",
        "resourceType": "RESOURCE_TYPE_DATABASE",
        "resourceName": name,
        "spec": {"engine": "postgresql", "version": "15", "size": "small", "replicas": 1},
        "callbackUrl": callback_url,
    }


@dataclasses.dataclass
class Api:
    """One running broker, reached over gRPC and over the /v1 gateway."""

    broker: server.Broker
    stub: broker_pb2_grpc.BrokerServiceStub
    http: aiohttp.ClientSession


@dataclasses.dataclass
class Env:
    """The module's brokers (default policy and loopback allowed) and the listener they must not reach."""

    listener: Listener
    strict: Api
    lenient: Api


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    """Brokers without a cluster: a Provision they accepted would be stored but never called back."""
    root = tmp_path_factory.mktemp("ssrf")
    tokens = root / "tokens.yaml"
    tokens.write_text(TOKENS_YAML)
    listener = Listener()
    await listener.start()
    apis: list[Api] = []
    closers: list[Any] = []
    try:
        for name, allow_loopback in (("strict", False), ("lenient", True)):
            broker = server.Broker(
                server.Settings(
                    grpc_addr="127.0.0.1:0",
                    http_addr="127.0.0.1:0",
                    data_dir=root / name,
                    tokens_file=tokens,
                    shutdown_grace=1.0,
                    callback_allow_loopback=allow_loopback,
                )
            )
            await broker.start()
            closers.append(broker.stop)
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{broker.grpc_port}")
            closers.append(channel.close)
            http = aiohttp.ClientSession(base_url=f"http://127.0.0.1:{broker.http_port}")
            closers.append(http.close)
            apis.append(Api(broker=broker, stub=broker_pb2_grpc.BrokerServiceStub(channel), http=http))
        yield Env(listener=listener, strict=apis[0], lenient=apis[1])
    finally:
        for close in reversed(closers):
            await close()
        await listener.stop()


def field_violations(err: grpc.aio.AioRpcError) -> list[tuple[str, str]]:
    status = rpc_status.from_call(err)
    assert status is not None, "no google.rpc.Status in the trailers"
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            return [(v.field, v.description) for v in bad.field_violations]
    raise AssertionError(f"no BadRequest detail in {status}")


async def assert_refused(api: Api, url: str, fragment: str) -> None:
    """Provision with ``url`` is INVALID_ARGUMENT over gRPC and 400 over HTTP, naming callback_url."""
    stored = await api.broker.store.count_deployments()
    request = json_format.ParseDict(provision_body(url), pb.ProvisionRequest())
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await api.stub.Provision(request, metadata=AUTH)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    violations = field_violations(info.value)
    assert [field for field, _ in violations] == ["callback_url"], violations
    assert fragment in violations[0][1], violations

    body = {**provision_body(url), "resourceType": "database"}
    async with api.http.post("/v1/provision", json=body, headers=HTTP_AUTH) as response:
        status, answer = response.status, await response.json()
    assert status == 400, answer
    assert answer["error"]["status"] == "INVALID_ARGUMENT"
    assert [v["field"] for v in answer["error"]["fieldViolations"]] == ["callback_url"], answer
    assert fragment in answer["error"]["fieldViolations"][0]["description"]
    # Nothing stored, so nothing can ever be called back.
    assert await api.broker.store.count_deployments() == stored


def test_the_table_has_at_least_forty_distinct_hostile_urls():
    assert len(HOSTILE) >= 40
    assert len({case.url for case in HOSTILE}) == len({case.id for case in HOSTILE}) == len(HOSTILE)


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("case", HOSTILE, ids=[case.id for case in HOSTILE])
async def test_a_hostile_callback_url_is_refused_at_provision(env: Env, case: Hostile):
    url = case.url.replace("{port}", str(env.listener.port))

    await assert_refused(env.strict, url, case.fragment)

    assert env.listener.connections == 0


ALWAYS = [case for case in HOSTILE if case.always]


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("case", ALWAYS, ids=[case.id for case in ALWAYS])
async def test_allowing_loopback_does_not_allow_the_other_hostile_urls(env: Env, case: Hostile):
    url = case.url.replace("{port}", str(env.listener.port))

    await assert_refused(env.lenient, url, case.fragment)

    assert env.listener.connections == 0


@pytest.mark.asyncio(loop_scope="module")
async def test_allowing_loopback_allows_the_loopback_spellings(env: Env):
    # The counterpart of the table: ``always=False`` cases are refused for being loopback, nothing else.
    accepted = []
    for case in HOSTILE:
        if case.always:
            continue
        url = case.url.replace("{port}", str(env.listener.port))
        request = json_format.ParseDict(
            provision_body(url, name=f"lb-{len(accepted)}"), pb.ProvisionRequest()
        )
        reply = await env.lenient.stub.Provision(request, metadata=AUTH)
        accepted.append(reply.deployment_id)

    assert len(accepted) == len(HOSTILE) - len(ALWAYS)


@pytest.mark.parametrize("url", ALLOWED)
async def test_private_range_and_cluster_callbacks_are_accepted(
    stub: broker_pb2_grpc.BrokerServiceStub, running_broker: RunningBroker, url: str
):
    # Managers run in the cluster and are called on pod and Service addresses: these must keep working.
    reply = await stub.Provision(
        json_format.ParseDict(provision_body(url), pb.ProvisionRequest()), metadata=AUTH
    )

    deployment = await running_broker.broker.store.deployment_by_id(reply.deployment_id)
    assert deployment is not None
    assert deployment.callback_url == url


async def test_an_accepted_loopback_callback_does_reach_the_listener(cluster_broker: RunningBroker):
    # Guards the tests above: the listener does see a broker's callback when one is allowed through.
    listener = Listener()
    await listener.start()
    try:
        async with grpc.aio.insecure_channel(cluster_broker.grpc_target) as channel:
            url = f"http://[::ffff:127.0.0.1]:{listener.port}/cb"
            body = provision_body(url)
            await broker_pb2_grpc.BrokerServiceStub(channel).Provision(
                json_format.ParseDict(body, pb.ProvisionRequest()), metadata=AUTH
            )

        async def requests() -> list[bytes]:
            return listener.requests

        await until(requests, bool, within=30, what="a callback at the listener")
    finally:
        await listener.stop()

    assert listener.requests[0].startswith(b"POST /cb HTTP/1.1\r\n")


# Delivery time: URLs already in the outbox, resolved through the dispatcher's seam -------------------


class FakeDns:
    """A getaddrinfo for the dispatcher's resolver: fixed answers per name, and a count of lookups."""

    def __init__(self, answers: dict[str, list[list[str]]]) -> None:
        # Each name maps to the answers of successive lookups; the last one repeats.
        self.answers = answers
        self.lookups: dict[str, int] = {}

    async def __call__(
        self, host: str, port: int, *, family: int = 0, type: int = 0, flags: int = 0
    ) -> list[callbacks.AddrInfo]:
        calls = self.lookups.get(host, 0)
        self.lookups[host] = calls + 1
        if host not in self.answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        answers = self.answers[host]
        infos: list[callbacks.AddrInfo] = []
        for address in answers[min(calls, len(answers) - 1)]:
            if ":" in address:
                infos.append((socket.AF_INET6, socket.SOCK_STREAM, 6, "", (address, port, 0, 0)))
            else:
                infos.append((socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port)))
        return infos


async def enqueue(store: sqlite.Store, urls: list[str]) -> None:
    """Outbox entries for ``urls`` as a finished provisioning leaves them, bypassing Provision's checks
    (as URLs stored before those checks existed would)."""
    for index, url in enumerate(urls):
        command = validation.provision_command(
            namespace="team-platform",
            resource_type=model.ResourceType.DATABASE,
            resource_name=f"db-{index}",
            spec=model.ResourceSpec(engine="postgresql", version="15", size="small"),
            callback_url="",
            request_id="",
            catalog=catalog_mod.DEFAULT_CATALOG,
        )
        result = await store.provision(command)
        deployment = await store.deployment_by_id(result.deployment_id)
        assert deployment is not None
        started = await store.start_operation(deployment)
        assert started is not None
        assert await store.finish_operation(
            started, succeeded=True, message="ready", event=None, callback=(url, {"status": "Ready"})
        )


async def deliver(
    tmp_path: pathlib.Path, urls: list[str], *, policy: callbacks.CallbackPolicy, dns: FakeDns, attempts: int
) -> callbacks.Dispatcher:
    """Run a dispatcher over ``urls`` until every entry was delivered or abandoned."""
    store = await sqlite.Store.open(tmp_path / "outbox")
    try:
        await enqueue(store, urls)
        dispatcher = callbacks.Dispatcher(
            store=store,
            key=b"k" * 32,
            policy=policy,
            max_attempts=attempts,
            base_delay=0.001,
            max_delay=0.001,
            poll_interval=0.01,
            timeout=5.0,
            getaddrinfo=dns,
        )
        task = asyncio.create_task(dispatcher.run())
        try:
            await until(
                lambda: store.due_callbacks(),
                lambda due: not due and dispatcher.delivered + dispatcher.failed > 0,
                within=30,
                what="every callback delivered or abandoned",
            )
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        return dispatcher
    finally:
        await store.close()


def abandoned(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.error for r in caplog.records if r.getMessage() == "callback abandoned"]


# What the name resolves to, and the policy. Every answer reaches this host if connected to, so even a
# broken check sends traffic nowhere but loopback.
DENY_127_0_0_2 = callbacks.CallbackPolicy(
    allow_loopback=True, denied_networks=(ipaddress.ip_network("127.0.0.2/32"),)
)
FORBIDDEN_ANSWERS: dict[str, tuple[list[str], callbacks.CallbackPolicy, str]] = {
    "ipv4-loopback": (["127.0.0.1"], callbacks.CallbackPolicy(), "loopback address"),
    "ipv4-loopback-other": (["127.0.0.2"], callbacks.CallbackPolicy(), "loopback address"),
    "ipv6-mapped-loopback": (["::ffff:127.0.0.1"], callbacks.CallbackPolicy(), EMBEDS_LOOPBACK),
    "ipv6-mapped-unspecified": (["::ffff:0.0.0.0"], callbacks.CallbackPolicy(), "unspecified"),
    "unspecified": (["0.0.0.0"], callbacks.CallbackPolicy(), "unspecified"),
    "unspecified-with-loopback-allowed": (
        ["0.0.0.0"],
        callbacks.CallbackPolicy(allow_loopback=True),
        "unspecified",
    ),
    "one-denied-among-allowed": (["127.0.0.1", "127.0.0.2"], DENY_127_0_0_2, "denied network"),
}


@pytest.mark.parametrize("answer", list(FORBIDDEN_ANSWERS))
async def test_a_name_resolving_to_a_forbidden_address_is_refused_at_every_attempt(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture, answer: str
):
    addresses_, policy, fragment = FORBIDDEN_ANSWERS[answer]
    listener = Listener()
    await listener.start()
    dns = FakeDns({"manager.test": [addresses_]})
    try:
        with caplog.at_level(logging.WARNING, logger="broker.callbacks"):
            dispatcher = await deliver(
                tmp_path, [f"http://manager.test:{listener.port}/cb"], policy=policy, dns=dns, attempts=3
            )
    finally:
        await listener.stop()

    assert listener.connections == 0  # not even to the allowed address of a mixed answer
    assert (dispatcher.delivered, dispatcher.failed) == (0, 3)
    assert dns.lookups == {"manager.test": 3}  # resolved, and refused, at each attempt
    [error] = abandoned(caplog)
    assert "callback host 'manager.test' resolves to" in error
    assert fragment in error


# Literal hosts that aiohttp connects to without resolving, each of which reaches 127.0.0.1 here.
STORED_LOOPBACK_URLS = [
    "http://127.0.0.1:{port}/cb",
    "http://[::ffff:127.0.0.1]:{port}/cb",
    "http://[::ffff:7f00:1]:{port}/cb",
    "http://[0:0:0:0:0:ffff:127.0.0.1]:{port}/cb",
    "http://[::ffff:0.0.0.0]:{port}/cb",
    "http://[::ffff:0:0]:{port}/cb",
    "http://0.0.0.0:{port}/cb",
    "http://2130706433:{port}/cb",
    "http://127.1:{port}/cb",
    "http://localhost:{port}/cb",
]


async def test_urls_stored_before_the_checks_are_refused_at_delivery(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
):
    listener = Listener()
    await listener.start()
    dns = FakeDns({"localhost": [["127.0.0.1"]]})
    try:
        with caplog.at_level(logging.WARNING, logger="broker.callbacks"):
            dispatcher = await deliver(
                tmp_path,
                [url.replace("{port}", str(listener.port)) for url in STORED_LOOPBACK_URLS],
                policy=callbacks.CallbackPolicy(),
                dns=dns,
                attempts=2,
            )
    finally:
        await listener.stop()

    assert listener.connections == 0
    assert (dispatcher.delivered, dispatcher.failed) == (0, 2 * len(STORED_LOOPBACK_URLS))
    errors_ = abandoned(caplog)
    assert len(errors_) == len(STORED_LOOPBACK_URLS)
    assert all(re.search(r"loopback|unspecified|ambiguous", e) for e in errors_), errors_


async def test_with_loopback_allowed_the_same_paths_reach_the_listener(tmp_path: pathlib.Path):
    # Guards the two tests above: the resolver seam and the embedded form really lead to the listener.
    listener = Listener()
    await listener.start()
    dns = FakeDns({"manager.test": [["127.0.0.1"]]})
    try:
        dispatcher = await deliver(
            tmp_path,
            [f"http://manager.test:{listener.port}/cb", f"http://[::ffff:127.0.0.1]:{listener.port}/cb"],
            policy=callbacks.CallbackPolicy(allow_loopback=True),
            dns=dns,
            attempts=1,
        )
    finally:
        await listener.stop()

    assert (dispatcher.delivered, dispatcher.failed) == (2, 0)
    assert len(listener.requests) == 2
    assert dns.lookups == {"manager.test": 1}


async def test_the_connection_goes_to_the_address_that_was_checked(tmp_path: pathlib.Path):
    # DNS rebinding: the first lookup answers an allowed address, any later one a denied address. A
    # check that resolves on its own and lets the HTTP client resolve again would connect to the
    # denied one; the guarded resolver's one lookup is the one connected to.
    allowed, denied = Listener("127.0.0.1"), Listener("127.0.0.2")
    await allowed.start()
    await denied.start(allowed.port)  # the same port: the URL names one
    dns = FakeDns({"manager.test": [["127.0.0.1"], ["127.0.0.2"]]})
    policy = callbacks.CallbackPolicy(
        allow_loopback=True, denied_networks=(ipaddress.ip_network("127.0.0.2/32"),)
    )
    try:
        dispatcher = await deliver(
            tmp_path, [f"http://manager.test:{allowed.port}/cb"], policy=policy, dns=dns, attempts=1
        )
    finally:
        await allowed.stop()
        await denied.stop()

    assert dispatcher.delivered == 1
    assert len(allowed.requests) == 1
    assert denied.connections == 0
    assert dns.lookups == {"manager.test": 1}


# The pure table ------------------------------------------------------------------------------------

# (address, category of the refusal or None, the embedded address that matched or None)
# fmt: off
ADDRESSES: list[tuple[str, str | None, str | None]] = [
    ("127.0.0.1", "loopback", None),
    ("127.255.255.254", "loopback", None),
    ("::1", "loopback", None),
    ("::", "unspecified / this network", None),
    ("0.0.0.0", "unspecified / this network", None),
    ("0.255.255.255", "unspecified / this network", None),
    ("169.254.169.254", "cloud metadata", None),
    ("169.254.170.2", "cloud metadata", None),
    ("fd00:ec2::254", "cloud metadata", None),
    ("100.100.100.200", "cloud metadata", None),
    ("169.254.0.1", "link-local", None),
    ("fe80::1", "link-local", None),
    ("224.0.0.251", "multicast", None),
    ("239.255.255.250", "multicast", None),
    ("ff02::1", "multicast", None),
    ("255.255.255.255", "limited broadcast", None),
    ("240.0.0.1", "reserved", None),
    ("::ffff:127.0.0.1", "loopback", "127.0.0.1"),
    ("::ffff:0:0", "unspecified / this network", "0.0.0.0"),
    ("::ffff:169.254.169.254", "cloud metadata", "169.254.169.254"),
    ("::ffff:0:7f00:1", "loopback", "127.0.0.1"),
    ("::7f00:1", "loopback", "127.0.0.1"),
    ("::a9fe:a9fe", "cloud metadata", "169.254.169.254"),
    ("2002:7f00:1::", "loopback", "127.0.0.1"),
    ("2002:a9fe:a9fe:1234::1", "cloud metadata", "169.254.169.254"),
    ("64:ff9b::7f00:1", "loopback", "127.0.0.1"),
    ("64:ff9b::e000:1", "multicast", "224.0.0.1"),
    ("64:ff9b:1:7f00:0:100::", "loopback", "127.0.0.1"),     # /48 format
    ("64:ff9b:1:7f:0:1::", "loopback", "127.0.0.1"),          # /56 format
    ("64:ff9b:1:0:7f:0:100:0", "loopback", "127.0.0.1"),        # /64 format
    ("64:ff9b:1::7f00:1", "loopback", "127.0.0.1"),           # /96 format
    ("2001:0:4136:e378:8000:63bf:80ff:fffe", "loopback", "127.0.0.1"),  # Teredo client
    ("2001:0:7f00:1:0:0:f5ff:fffe", "loopback", "127.0.0.1"),           # Teredo server
    # Allowed: private and shared ranges, public addresses and their embeddings.
    ("10.0.0.1", None, None),
    ("172.16.0.1", None, None),
    ("192.168.1.1", None, None),
    ("100.64.0.1", None, None),
    ("fd12:3456::1", None, None),
    ("fd00:ec2::253", None, None),
    ("::ffff:10.0.0.1", None, None),
    ("2002:0a00:0001::1", None, None),
    ("64:ff9b::808:808", None, None),
    ("64:ff9b:1::a00:1", None, None),  # local-use NAT64, /96 format, 10.0.0.1
    ("2001:0:4136:e378:8000:63bf:f5ff:fffe", None, None),
    ("2606:4700::1111", None, None),
    ("8.8.8.8", None, None),
]
# fmt: on


@pytest.mark.parametrize(("text", "category", "matched"), ADDRESSES, ids=[a[0] for a in ADDRESSES])
def test_the_table_classifies_every_spelling(text: str, category: str | None, matched: str | None):
    refusal = addresses.refusal(ipaddress.ip_address(text))

    if category is None:
        assert refusal is None, refusal and refusal.message
        return
    assert refusal is not None
    assert refusal.rule.category == category
    assert refusal.matched == ipaddress.ip_address(matched or text)
    assert (refusal.embedding != "") == (matched is not None)
    assert str(refusal.matched) in refusal.message


def test_each_embedding_is_extracted():
    cases = {
        "::ffff:1.2.3.4": ("IPv4-mapped", "1.2.3.4"),
        "::ffff:0:1.2.3.4": ("IPv4-translated", "1.2.3.4"),
        "::1.2.3.4": ("IPv4-compatible", "1.2.3.4"),
        "64:ff9b::1.2.3.4": ("NAT64", "1.2.3.4"),
        "2002:102:304::": ("6to4", "1.2.3.4"),
    }
    for text, (name, v4) in cases.items():
        assert addresses.embedded(ipaddress.IPv6Address(text)) == ((name, ipaddress.IPv4Address(v4)),), text
    assert addresses.embedded(ipaddress.IPv6Address("2001:0:4136:e378:8000:63bf:3fff:fdd2")) == (
        ("Teredo", ipaddress.IPv4Address("65.54.227.120")),  # the server
        ("Teredo", ipaddress.IPv4Address("192.0.2.45")),  # the client, de-obfuscated
    )
    # Only the valid RFC 6052 readings of a local-use NAT64 address count.
    assert addresses.embedded(ipaddress.IPv6Address("64:ff9b:1::a00:1")) == (
        ("local-use NAT64", ipaddress.IPv4Address("10.0.0.1")),
    )
    # :: and ::1 are themselves unspecified and loopback, not the IPv4 addresses 0.0.0.0 and 0.0.0.1.
    assert addresses.embedded(ipaddress.IPv6Address("::")) == ()
    assert addresses.embedded(ipaddress.IPv6Address("::1")) == ()
    assert addresses.embedded(ipaddress.IPv4Address("127.0.0.1")) == ()


def test_settings_open_only_their_own_rows():
    def refused(text: str, **allow: bool) -> str | None:
        refusal = addresses.refusal(addresses.parse(text), **allow)
        return refusal.rule.category if refusal else None

    assert refused("127.0.0.1", allow_loopback=True) is None
    assert refused("::ffff:127.0.0.1", allow_loopback=True) is None
    assert refused("fe80::1%eth0", allow_link_local=True) is None
    assert refused("169.254.169.254", allow_link_local=True) == "cloud metadata"
    assert refused("169.254.169.254", allow_loopback=True, allow_link_local=True) == "cloud metadata"
    assert refused("0.0.0.0", allow_loopback=True) == "unspecified / this network"
    assert refused("127.0.0.1", allow_link_local=True) == "loopback"
    # Only metadata and the never-routable rows have no setting.
    never = {rule.category for rule in addresses.RULES if rule.permitted_by is None}
    assert never == {
        "cloud metadata",
        "unspecified / this network",
        "multicast",
        "limited broadcast",
        "reserved",
    }


def test_the_policy_deny_list_also_applies_to_embedded_forms():
    policy = callbacks.CallbackPolicy(denied_networks=(ipaddress.ip_network("10.9.0.0/16"),))

    for address in ("10.9.1.1", "::ffff:10.9.1.1", "64:ff9b::a09:101"):
        with pytest.raises(errors.PermissionDenied, match="denied network") as info:
            policy.check_address(address)
        assert info.value.reason == "CALLBACK_FORBIDDEN"
    policy.check_address("10.8.1.1")


@pytest.mark.parametrize(
    ("host", "bracketed", "fragment"),
    [
        ("db-manager.platform-system.svc", False, None),
        ("db-manager.platform-system.svc.cluster.local.", False, None),
        ("10.0.0.1", False, None),
        ("xn--n3h.example", False, None),
        ("::ffff:10.0.0.1", True, None),
        ("1.2.3.4.5", False, "ambiguous"),
        ("999.0.0.1", False, "ambiguous"),
        ("example.0x10", False, "ambiguous"),
        ("01.2.3.4", False, "ambiguous"),
        ("a..b", False, "not a valid host name"),
        ("-a.example", False, "not a valid host name"),
        ("a b", False, "not a valid host name"),
        ("\u2603.example", False, "not ASCII"),
        ("fe80::1%eth0", True, "zone id"),
        ("example.com", True, "brackets are for IPv6"),
    ],
)
def test_hosts_are_read_strictly(host: str, bracketed: bool, fragment: str | None):
    problem = addresses.host_problem(host, bracketed=bracketed)

    if fragment is None:
        assert problem is None
    else:
        assert problem is not None
        assert fragment in problem


@pytest.mark.parametrize(
    "url",
    ["http://[::ffff:127.0.0.1]:1/cb", "http://127.0.0.1:1/cb", "http://localhost./cb", "http://[::1]/cb"],
)
def test_the_delivery_time_check_refuses_loopback_unless_allowed(url: str):
    with pytest.raises(errors.PermissionDenied) as info:
        callbacks.CallbackPolicy().check_literal(url)
    assert info.value.reason == "CALLBACK_FORBIDDEN"
    callbacks.CallbackPolicy(allow_loopback=True).check_literal(url)


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("http://127.0.0.1\\@good.example/", "cannot be parsed"),  # yarl refuses; urllib reads good.example
        ("http://\uff11\uff12\uff17.0.0.1/", "not ASCII"),  # yarl reads 127.0.0.1; urllib does not
        ("http://2130706433/", "ambiguous"),
        ("http://[fe80::1%25eth0]/", "zone id"),
        ("http://[::ffff:169.254.169.254]/", "cloud metadata"),
        ("gopher://127.0.0.1/", "http:// or https://"),
    ],
)
def test_the_delivery_time_check_refuses_the_rest_whatever_the_settings(url: str, fragment: str):
    # URLs stored before Provision checked them still never reach the HTTP client.
    policy = callbacks.CallbackPolicy(allow_loopback=True, allow_link_local=True)
    with pytest.raises(errors.PermissionDenied, match=re.escape(fragment)) as info:
        policy.check_literal(url)
    assert info.value.reason == "CALLBACK_FORBIDDEN"


def test_the_readme_table_is_the_code_table():
    text = README.read_text()
    start = text.index("<!-- callback-address-table")
    start = text.index("\n", start) + 1
    end = text.index("<!-- /callback-address-table -->")

    assert text[start:end] == addresses.markdown_tables(), (
        "README's callback address table differs from broker/domain/addresses.py; regenerate it with "
        "python -c 'from broker.domain import addresses; print(addresses.markdown_tables(), end="
        ")'"
    )

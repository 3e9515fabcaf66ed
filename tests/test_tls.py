"""TLS and mTLS on both ports, with certificates made by openssl for the test."""

from __future__ import annotations

import asyncio
import dataclasses
import pathlib
import shutil
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator

import aiohttp
import grpc
import pytest
from broker_client import errors as client_errors
from broker_client.client import BrokerClient
from broker_client.v1 import broker_pb2 as pb
from broker_client.v1 import broker_pb2_grpc
from conftest import PLATFORM_TOKEN, bearer

from broker import server

pytestmark = pytest.mark.skipif(
    shutil.which("openssl") is None, reason="openssl is needed to make certificates"
)


@dataclasses.dataclass(frozen=True)
class Pki:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files."""

    ca: pathlib.Path
    server_cert: pathlib.Path
    server_key: pathlib.Path
    client_cert: pathlib.Path
    client_key: pathlib.Path


def _openssl(*args: str, cwd: pathlib.Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "1",
        "-subj",
        "/CN=test-ca",
        cwd=d,
    )
    for name, extra in (
        ("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
        ("client", "extendedKeyUsage=clientAuth"),
    ):
        _openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN={name}",
            cwd=d,
        )
        (d / f"{name}.ext").write_text(extra + "\n")
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.pem",
            "-days",
            "1",
            "-extfile",
            f"{name}.ext",
            cwd=d,
        )
    return Pki(d / "ca.pem", d / "server.pem", d / "server.key", d / "client.pem", d / "client.key")


@pytest.fixture
async def mtls_broker(
    tmp_path: pathlib.Path, tokens_file: pathlib.Path, pki: Pki
) -> AsyncIterator[server.Broker]:
    broker = server.Broker(
        server.Settings(
            grpc_addr="127.0.0.1:0",
            http_addr="127.0.0.1:0",
            data_dir=tmp_path / "data",
            tokens_file=tokens_file,
            shutdown_grace=1.0,
            tls_cert=pki.server_cert,
            tls_key=pki.server_key,
            tls_client_ca=pki.ca,
        )
    )
    await broker.start()
    try:
        yield broker
    finally:
        await broker.stop()


def _credentials(pki: Pki, *, client_cert: bool) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=pki.ca.read_bytes(),
        private_key=pki.client_key.read_bytes() if client_cert else None,
        certificate_chain=pki.client_cert.read_bytes() if client_cert else None,
    )


async def _state(target: str, credentials: grpc.ChannelCredentials | None) -> pb.GetResourceStateResponse:
    channel = (
        grpc.aio.secure_channel(target, credentials) if credentials else grpc.aio.insecure_channel(target)
    )
    async with channel:
        stub = broker_pb2_grpc.BrokerServiceStub(channel)
        reply: pb.GetResourceStateResponse = await stub.GetResourceState(
            pb.GetResourceStateRequest(namespace="team-platform"), metadata=bearer(PLATFORM_TOKEN), timeout=5
        )
        return reply


async def test_grpc_needs_a_client_certificate_and_still_a_token(
    mtls_broker: server.Broker, pki: Pki
) -> None:
    target = f"127.0.0.1:{mtls_broker.grpc_port}"
    reply = await _state(target, _credentials(pki, client_cert=True))
    assert reply.namespace == "team-platform"
    for credentials in (_credentials(pki, client_cert=False), None):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _state(target, credentials)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    # TLS secures the channel; the bearer token still decides who the caller is.
    async with grpc.aio.secure_channel(target, _credentials(pki, client_cert=True)) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await broker_pb2_grpc.BrokerServiceStub(channel).GetResourceState(
                pb.GetResourceStateRequest(namespace="team-platform"), timeout=5
            )
    assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_the_gateway_needs_a_client_certificate_too(mtls_broker: server.Broker, pki: Pki) -> None:
    url = f"https://127.0.0.1:{mtls_broker.http_port}/v1/resources?namespace=team-platform"
    headers = {"Authorization": f"Bearer {PLATFORM_TOKEN}"}
    with_cert = ssl.create_default_context(cafile=str(pki.ca))
    with_cert.load_cert_chain(pki.client_cert, pki.client_key)
    async with aiohttp.ClientSession() as http:
        async with http.get(url, headers=headers, ssl=with_cert) as response:
            assert response.status == 200
            assert (await response.json())["namespace"] == "team-platform"
        with pytest.raises(aiohttp.ClientError):
            async with http.get(
                url, headers=headers, ssl=ssl.create_default_context(cafile=str(pki.ca))
            ) as r:
                await r.read()


async def test_the_client_library_speaks_mtls(mtls_broker: server.Broker, pki: Pki) -> None:
    target = f"127.0.0.1:{mtls_broker.grpc_port}"
    async with await BrokerClient.connect(
        target,
        token=PLATFORM_TOKEN,
        tls=True,
        root_certificates=pki.ca.read_bytes(),
        certificate_chain=pki.client_cert.read_bytes(),
        private_key=pki.client_key.read_bytes(),
        deadline=5,
    ) as client:
        assert await client.get_resource_state("team-platform") == []
    async with await BrokerClient.connect(
        target, token=PLATFORM_TOKEN, tls=True, root_certificates=pki.ca.read_bytes(), deadline=5
    ) as anonymous:
        with pytest.raises(client_errors.Unavailable):
            await anonymous.get_resource_state("team-platform")


async def test_grpcurl_lists_the_service_over_mtls(mtls_broker: server.Broker, pki: Pki) -> None:
    grpcurl = pathlib.Path(sys.executable).parent / "grpcurl"
    proc = await asyncio.create_subprocess_exec(
        str(grpcurl),
        "-cacert",
        str(pki.ca),
        "-cert",
        str(pki.client_cert),
        "-key",
        str(pki.client_key),
        f"127.0.0.1:{mtls_broker.grpc_port}",
        "list",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    assert "broker.v1.BrokerService" in out.decode().split()


def test_incomplete_tls_settings_refuse_to_start(tmp_path: pathlib.Path, pki: Pki) -> None:
    for settings in (
        server.Settings(insecure=True, tls_cert=pki.server_cert),
        server.Settings(insecure=True, tls_client_ca=pki.ca),
        server.Settings(insecure=True, tls_cert=tmp_path / "missing.pem", tls_key=tmp_path / "missing.key"),
    ):
        with pytest.raises(ValueError, match=r"TLS|tls"):
            server.Broker(settings)

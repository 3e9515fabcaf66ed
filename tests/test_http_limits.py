"""The HTTP port under slowloris: request heads have a deadline, open connections a bound, and both
refusals are clean answers that /metrics counts, while ordinary requests keep working.
"""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
from collections.abc import AsyncIterator

import aiohttp
from conftest import ADMIN_TOKEN, until

from broker import server
from broker.api import connections


@contextlib.asynccontextmanager
async def broker_with(
    tmp_path: pathlib.Path, tokens: pathlib.Path, limits: connections.Limits
) -> AsyncIterator[server.Broker]:
    broker = server.Broker(
        server.Settings(
            grpc_addr="127.0.0.1:0",
            http_addr="127.0.0.1:0",
            data_dir=tmp_path / "data",
            tokens_file=tokens,
            shutdown_grace=1.0,
            http=limits,
        )
    )
    await broker.start()
    try:
        yield broker
    finally:
        await broker.stop()


async def metric(broker: server.Broker, name: str) -> float:
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{broker.http_port}/metrics", headers=headers) as response,
    ):
        text = await response.text()
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} is not in /metrics")


async def healthz(broker: server.Broker) -> int:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{broker.http_port}/healthz") as r:
        return r.status


async def test_slowloris_connections_are_closed_at_the_header_deadline(
    tmp_path: pathlib.Path, tokens_file: pathlib.Path
) -> None:
    limits = connections.Limits(header_timeout=2.0, max_connections=1000)
    async with broker_with(tmp_path, tokens_file, limits) as broker:
        count = 200
        streams = [await asyncio.open_connection("127.0.0.1", broker.http_port) for _ in range(count)]
        try:
            # Each sends part of a request head, a byte at a time, and never finishes it.
            for _reader, writer in streams:
                writer.write(b"GET /v1/resources?namespace=team-platform HTTP/1.1\r\nHost: x\r\n")
            for _ in range(3):
                for _reader, writer in streams:
                    with contextlib.suppress(ConnectionError):
                        writer.write(b"X")
                        await writer.drain()
                await asyncio.sleep(0.05)
            # The server ends every one of them: each reads a 408 answer (or EOF), then nothing.
            answers = await asyncio.wait_for(
                asyncio.gather(*(reader.read() for reader, _ in streams), return_exceptions=True), 30
            )
            assert all(isinstance(a, bytes) for a in answers), [
                a for a in answers if not isinstance(a, bytes)
            ][:3]
            assert all(a.startswith(b"HTTP/1.1 408") for a in answers if isinstance(a, bytes) and a)
            assert (
                await metric(broker, 'broker_http_connections_refused_total{reason="header_timeout"}')
                >= count
            )
            assert await healthz(broker) == 200
        finally:
            for _reader, writer in streams:
                writer.close()


async def test_a_complete_request_is_not_cut_by_the_header_deadline(
    tmp_path: pathlib.Path, tokens_file: pathlib.Path
) -> None:
    limits = connections.Limits(header_timeout=0.3)
    async with broker_with(tmp_path, tokens_file, limits) as broker:
        reader, writer = await asyncio.open_connection("127.0.0.1", broker.http_port)
        # Headers in time, then a body that takes longer than the header deadline.
        body = b'{"namespace": "team-platform"}'
        writer.write(
            b"POST /v1/resources HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + ADMIN_TOKEN.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(body)
        )
        await writer.drain()
        await asyncio.sleep(0.6)
        writer.write(body)
        await writer.drain()
        head = await asyncio.wait_for(reader.readline(), 10)
        writer.close()
        assert head.startswith(b"HTTP/1.1 200"), head


async def test_connections_over_the_bound_are_answered_503_and_counted(
    tmp_path: pathlib.Path, tokens_file: pathlib.Path
) -> None:
    limits = connections.Limits(max_connections=20, header_timeout=30)
    async with broker_with(tmp_path, tokens_file, limits) as broker:
        held = [await asyncio.open_connection("127.0.0.1", broker.http_port) for _ in range(20)]
        try:
            await until(lambda: value_of(broker), lambda n: n == 20, within=10, what="20 open connections")
            reader, writer = await asyncio.open_connection("127.0.0.1", broker.http_port)
            answer = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            assert answer.startswith(b"HTTP/1.1 503"), answer
            assert b'"UNAVAILABLE"' in answer
            assert broker.http_connections.refused["max_connections"] >= 1
        finally:
            for _reader, writer in held:
                writer.close()
        await until(
            lambda: value_of(broker), lambda n: n < 20, within=10, what="the held connections to close"
        )
        assert await healthz(broker) == 200
        assert await metric(broker, 'broker_http_connections_refused_total{reason="max_connections"}') >= 1


async def value_of(broker: server.Broker) -> int:
    return broker.http_connections.open

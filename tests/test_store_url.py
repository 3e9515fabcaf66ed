"""``--store-url``: which store a broker opens, how a bad URL is refused, and that SQLite is one replica.

The default is the SQLite file in ``--data-dir`` (the one-replica quick start, unchanged); a
``postgresql://`` URL puts the store in PostgreSQL, where several replicas share it. A second broker
on a SQLite file that one already has open refuses to start.
"""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import re
import sqlite3
import sys
from collections.abc import AsyncIterator

import grpc
import pytest
from broker_client.v1 import broker_pb2 as pb
from broker_client.v1 import broker_pb2_grpc
from conftest import ADMIN_TOKEN, bearer, broker_running

from broker import cli, errors, server, settings
from broker.store import sqlite


def resolved(
    *argv: str, environ: dict[str, str] | None = None, file: dict[str, object] | None = None
) -> object:
    values = settings.resolve(cli._parser().parse_args(["serve", *argv]), file or {}, environ or {})
    return settings.build(server.Settings, values)


def test_the_default_store_is_the_sqlite_file_in_the_data_dir() -> None:
    built = resolved("--data-dir", "/var/lib/broker")
    assert built.store_url is None
    assert server.store_url_of(built) == "sqlite:////var/lib/broker/broker.db"
    assert sqlite.path_of(server.store_url_of(built)) == pathlib.Path("/var/lib/broker/broker.db")
    relative = server.store_url_of(server.Settings())
    assert sqlite.path_of(relative) == pathlib.Path(".broker/broker.db")


@pytest.mark.parametrize(
    "url",
    [
        "sqlite:///data/broker.db",
        "sqlite:////var/lib/broker/broker.db",
        "postgresql://broker:pw@db.example:5432/broker",
        "postgres://broker@db.example/broker?sslmode=require",
        "postgresql:///broker?host=/run/postgresql",
    ],
)
def test_a_store_url_is_taken_from_the_flag_the_environment_or_the_file(url: str) -> None:
    assert resolved("--store-url", url).store_url == url
    assert resolved(environ={"BROKER_STORE_URL": url}).store_url == url
    assert resolved(file={"store_url": url}).store_url == url


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("mysql://broker:hunter2@db.example/broker", "'mysql' is not a store this broker knows"),
        ("/var/lib/broker/broker.db", "is not a store URL"),
        ("sqlite://broker.db", "names a file after its third slash"),
        ("sqlite:///", "names a file after its third slash"),
        ("postgresql://broker:hunter2@db.example:fivefour/broker", "port of the postgresql:// URL"),
        ("postgresql:///broker", "names no server"),
    ],
)
def test_a_bad_store_url_is_refused_with_the_setting_name_and_without_the_password(
    url: str, message: str
) -> None:
    for argv, environ, where in (
        (("--store-url", url), {}, "--store-url"),
        ((), {"BROKER_STORE_URL": url}, "BROKER_STORE_URL"),
    ):
        with pytest.raises(ValueError, match=re.escape(message)) as info:
            resolved(*argv, environ=environ)
        assert str(info.value).startswith(f"{where}: ")
        assert "hunter2" not in str(info.value)
        assert "sqlite:///PATH" in str(info.value) or "port" in str(info.value)


async def provision(target: str, name: str) -> pb.ProvisionResponse:
    async with grpc.aio.insecure_channel(target) as channel:
        response: pb.ProvisionResponse = await broker_pb2_grpc.BrokerServiceStub(channel).Provision(
            pb.ProvisionRequest(
                namespace="team-platform",
                resource_type=pb.RESOURCE_TYPE_CACHE,
                resource_name=name,
                spec=pb.ResourceSpec(engine="redis", version="7", size="small", replicas=1),
            ),
            metadata=bearer(ADMIN_TOKEN),
        )
        return response


async def test_a_broker_keeps_its_state_in_the_sqlite_file_its_url_names(
    tmp_path: pathlib.Path, tokens_file: pathlib.Path
) -> None:
    elsewhere = tmp_path / "elsewhere" / "state.db"
    async with broker_running(tmp_path / "data", tokens_file, store_url=sqlite.url_of(elsewhere)) as running:
        await provision(running.grpc_target, "sessions")
    with sqlite3.connect(elsewhere) as conn:
        names = conn.execute("SELECT resource_name FROM deployments").fetchall()
    assert names == [("sessions",)]
    assert not (tmp_path / "data" / sqlite.DB_FILENAME).exists()


async def test_two_brokers_share_one_postgresql_store(
    tmp_path: pathlib.Path, tokens_file: pathlib.Path, postgres_url: str
) -> None:
    """What one replica accepted, the other reads; neither writes a SQLite file."""
    async with contextlib.AsyncExitStack() as stack:
        first, second = [
            await stack.enter_async_context(
                broker_running(tmp_path / f"replica-{i}", tokens_file, store_url=postgres_url)
            )
            for i in range(2)
        ]
        accepted = await provision(first.grpc_target, "sessions")
        async with grpc.aio.insecure_channel(second.grpc_target) as channel:
            got = await broker_pb2_grpc.BrokerServiceStub(channel).GetDeployment(
                pb.GetDeploymentRequest(namespace="team-platform", deployment_id=accepted.deployment_id),
                metadata=bearer(ADMIN_TOKEN),
            )
        assert await second.broker.store.count_deployments() == 1
    assert got.deployment.resource_name == "sessions"
    assert not (tmp_path / "replica-0" / sqlite.DB_FILENAME).exists()
    assert not (tmp_path / "replica-1" / sqlite.DB_FILENAME).exists()


async def test_a_second_store_on_one_sqlite_file_is_refused_until_the_first_closes(
    tmp_path: pathlib.Path,
) -> None:
    first = await sqlite.Store.open(tmp_path)
    try:
        with pytest.raises(errors.Unavailable) as refused:
            await sqlite.Store.open(tmp_path)
    finally:
        await first.close()
    message = str(refused.value)
    assert str(tmp_path / sqlite.DB_FILENAME) in message
    assert "SQLite is single-replica" in message
    assert "--store-url postgresql://" in message
    reopened = await sqlite.Store.open(tmp_path)  # the lock went with the first store
    await reopened.close()


@contextlib.asynccontextmanager
async def serving(data_dir: pathlib.Path) -> AsyncIterator[asyncio.subprocess.Process]:
    """``broker serve`` on free loopback ports, once it serves."""
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "broker", "serve", "--insecure", "--data-dir", str(data_dir)),
        *("--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"),
        stderr=asyncio.subprocess.PIPE,
        env={"PATH": "/usr/bin:/bin"},
    )
    try:
        assert proc.stderr is not None
        async with asyncio.timeout(30):
            while b"broker serving" not in (line := await proc.stderr.readline()):
                assert line, "the first broker exited before serving"
        yield proc
    finally:
        proc.kill()  # its shutdown is tested elsewhere; the lock goes with the process either way
        await proc.wait()


async def test_a_second_broker_on_the_same_data_dir_refuses_to_start(tmp_path: pathlib.Path) -> None:
    async with serving(tmp_path) as first:
        second = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "broker", "serve", "--insecure", "--data-dir", str(tmp_path)),
            *("--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"),
            stderr=asyncio.subprocess.PIPE,
            env={"PATH": "/usr/bin:/bin"},
        )
        _, err = await asyncio.wait_for(second.communicate(), 30)
        assert first.returncode is None  # the first one goes on serving
    assert second.returncode == 2
    message = err.decode()
    assert (
        f"the store {tmp_path / sqlite.DB_FILENAME} is in use by another broker (process {first.pid}"
        in message
    )
    assert "SQLite is single-replica" in message

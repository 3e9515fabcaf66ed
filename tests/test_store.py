"""The SQLite store on a real temporary file: migrations, durability settings, and that one request's
writes are all or nothing."""

from __future__ import annotations

import asyncio
import pathlib
import sqlite3
import sys

import pytest

from broker import errors
from broker.domain import catalog, model, validation
from broker.store import migrations, sqlite


def command(
    name: str = "orders-db", *, engine: str = "postgresql", size: str = "small", request_id: str = ""
):
    return validation.provision_command(
        namespace="team-platform",
        resource_type=model.ResourceType.DATABASE,
        resource_name=name,
        spec=model.ResourceSpec(engine=engine, version="15" if engine == "postgresql" else "8.0", size=size),
        callback_url="",
        request_id=request_id,
        catalog=catalog.DEFAULT_CATALOG,
    )


LATEST = migrations.MIGRATIONS[-1][0]


def table_count(db_file: pathlib.Path, table: str) -> int:
    with sqlite3.connect(db_file) as conn:
        return conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]  # noqa: S608 - fixed names


async def test_opening_twice_applies_the_migrations_once(tmp_path: pathlib.Path):
    first = await sqlite.Store.open(tmp_path)
    assert await first.schema_version() == LATEST
    await first.close()

    second = await sqlite.Store.open(tmp_path)
    try:
        assert await second.schema_version() == LATEST
    finally:
        await second.close()

    with sqlite3.connect(tmp_path / sqlite.DB_FILENAME) as conn:
        rows = conn.execute("SELECT version FROM schema_migrations ORDER BY version").fetchall()
    assert rows == [(version,) for version, _, _ in migrations.MIGRATIONS]


async def test_reopening_keeps_what_was_written(tmp_path: pathlib.Path):
    store = await sqlite.Store.open(tmp_path)
    result = await store.provision(command())
    await store.close()

    reopened = await sqlite.Store.open(tmp_path)
    try:
        deployment = await reopened.get_deployment(model.Namespace("team-platform"), result.deployment_id)
        assert await reopened.count_deployments() == 1
    finally:
        await reopened.close()

    assert deployment.resource_name == "orders-db"
    assert deployment.desired_spec.replicas == 1
    assert deployment.desired_spec.resources == catalog.DEFAULT_SIZES["small"]


async def test_the_database_file_uses_the_wal_journal(tmp_path: pathlib.Path):
    store = await sqlite.Store.open(tmp_path)
    await store.close()

    with sqlite3.connect(tmp_path / sqlite.DB_FILENAME) as conn:
        (mode,) = conn.execute("PRAGMA journal_mode").fetchone()

    assert mode == "wal"


async def test_connections_sync_fully_and_enforce_foreign_keys(tmp_path: pathlib.Path):
    store = await sqlite.Store.open(tmp_path)
    try:
        for conn in (store._writer, store._reader):
            assert conn is not None
            synchronous = await (await conn.execute("PRAGMA synchronous")).fetchone()
            foreign_keys = await (await conn.execute("PRAGMA foreign_keys")).fetchone()
            assert synchronous[0] == 2, "synchronous must be FULL"
            assert foreign_keys[0] == 1, "foreign keys must be enforced"
        # And they really are: an operation of a deployment that does not exist is refused.
        with pytest.raises(sqlite3.IntegrityError):
            await store._writer.execute(
                "INSERT INTO operations (operation_id, deployment_id, type, state, generation, message, "
                "create_time, update_time) VALUES ('op-x', 'deploy-missing', 'provision', 'accepted', 1, '', "
                "'2025-01-01T00:00:00+00:00', '2025-01-01T00:00:00+00:00')"
            )
    finally:
        await store.close()


async def test_a_rejected_request_writes_nothing(tmp_path: pathlib.Path):
    store = await sqlite.Store.open(tmp_path)
    try:
        first = await store.provision(command(request_id="req-1"))
        db_file = tmp_path / sqlite.DB_FILENAME
        before = {t: table_count(db_file, t) for t in ("deployments", "operations", "idempotency_keys")}

        with pytest.raises(errors.FailedPrecondition):
            await store.provision(command(engine="mysql", request_id="req-2"))
        with pytest.raises(errors.AlreadyExists):
            await store.provision(command(size="large", request_id="req-1"))

        after = {t: table_count(db_file, t) for t in ("deployments", "operations", "idempotency_keys")}
        deployment = await store.get_deployment(model.Namespace("team-platform"), first.deployment_id)
    finally:
        await store.close()

    assert after == before
    assert deployment.generation == 1
    assert deployment.desired_spec.engine == "postgresql"


async def test_concurrent_provisions_of_one_resource_make_one_deployment(tmp_path: pathlib.Path):
    store = await sqlite.Store.open(tmp_path)
    try:
        results = await asyncio.gather(*(store.provision(command()) for _ in range(20)))
        count = await store.count_deployments()
    finally:
        await store.close()

    assert count == 1
    assert len({r.deployment_id for r in results}) == 1
    assert sum(r.changed for r in results) == 1


async def test_a_closed_store_is_unavailable(tmp_path: pathlib.Path):
    store = await sqlite.Store.open(tmp_path)
    await store.close()
    await store.close()  # safe twice

    with pytest.raises(errors.Unavailable):
        await store.count_deployments()
    with pytest.raises(errors.Unavailable):
        await store.provision(command())


async def test_an_unusable_data_dir_is_unavailable_with_the_path(tmp_path: pathlib.Path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")

    with pytest.raises((errors.Unavailable, OSError)) as info:
        await sqlite.Store.open(not_a_dir)

    assert str(not_a_dir) in str(info.value)


async def test_broker_migrate_prepares_the_store(tmp_path: pathlib.Path):
    data_dir = tmp_path / "data"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "broker",
        "migrate",
        "--data-dir",
        str(data_dir),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=30)

    assert proc.returncode == 0, err.decode()
    assert f"schema version {LATEST}" in out.decode()
    with sqlite3.connect(data_dir / sqlite.DB_FILENAME) as conn:
        assert conn.execute("SELECT MAX(version) FROM schema_migrations").fetchone() == (LATEST,)


async def test_reads_see_every_commit_while_other_reads_run(tmp_path: pathlib.Path):
    """A read that spans two awaits must not leave another coroutine's read in an older snapshot.

    Polling readers (GetResourceState, the detector) share the reader connection with the
    provisioner, which looks up each deployment right after its commit; it must always find it.
    """
    store = await sqlite.Store.open(tmp_path)
    spec = model.ResourceSpec(engine="postgresql", version="15", size="medium", replicas=1)
    stop = asyncio.Event()

    async def poll() -> None:
        query = model.ResourceQuery(namespace=model.Namespace("team-platform"))
        while not stop.is_set():
            await store.list_deployments(query, model.PageRequest(size=100))

    pollers = [asyncio.create_task(poll()) for _ in range(4)]
    try:
        for index in range(150):
            command = validation.provision_command(
                namespace="team-platform",
                resource_type=model.ResourceType.DATABASE,
                resource_name=f"db-{index}",
                spec=spec,
                callback_url="",
                request_id="",
                catalog=catalog.DEFAULT_CATALOG,
            )
            result = await store.provision(command)
            assert await store.deployment_by_id(result.deployment_id) is not None, f"commit {index} not seen"
    finally:
        stop.set()
        await asyncio.gather(*pollers)
        await store.close()

"""The PostgreSQL store where it differs from SQLite: several writers at once, from several processes.

The contract suite (``test_store_contract``) runs every behaviour against both adapters; these tests
are about what only a store shared by replicas must get right: the event log's order under
concurrent commits, migrations raced by replicas starting together, one deployment per name when
two replicas provision it at once, and a server that cannot be reached.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import pathlib
import sys

import asyncpg
import pytest
from test_store_contract import NS, command, event_about, ready

from broker import errors, events
from broker.domain import model
from broker.store import migrations, postgres

WRITER = pathlib.Path(__file__).with_name("event_log_writer.py")


async def tail_until(
    store: postgres.Store, writers_done: asyncio.Event, *, limit: int
) -> list[model.DriftEvent]:
    """Read ``events_after(last seen)`` over and over, as the fan-out does, until the writers are
    done and nothing more comes; every event in the order it was handed out."""
    seen: list[model.DriftEvent] = []
    position = 0
    while True:
        finished = writers_done.is_set()  # read before the query: a last commit is still found
        batch = await store.events_after(position, limit)
        seen.extend(batch)
        if batch:
            position = batch[-1].sequence
        elif finished:
            return seen
        else:
            await asyncio.sleep(0.001)


async def audit_until(store: postgres.Store, writers_done: asyncio.Event) -> int:
    """Read the whole visible log over and over until the writers are done; how many reads showed
    a hole, a sequence not yet visible below one that is (sequences here have none once committed)."""
    holes = 0
    while not writers_done.is_set():
        visible = [e.sequence for e in await store.events_after(0, 1_000_000)]
        holes += visible != list(range(1, len(visible) + 1))
        await asyncio.sleep(0.001)
    return holes


async def test_tailers_miss_nothing_while_writers_in_several_processes_commit_in_any_order(
    postgres_url: str,
) -> None:
    """Three processes of three concurrent writers each commit verdicts and appends while three
    tailers read ``events_after(last seen)`` and an auditor reads the whole log. Each tailer must be
    handed every committed event exactly once, in increasing sequence, and no read may show a later
    sequence before an earlier one: that one would become visible below a tailer's position."""
    setup = await postgres.Store.open(postgres_url)
    deployment = await ready(setup)
    processes, writers, transactions = 3, 3, 16
    tailers = [await postgres.Store.open(postgres_url, pool_size=1) for _ in range(4)]
    done = asyncio.Event()
    try:
        tails = [asyncio.create_task(tail_until(t, done, limit=3 + 2 * i)) for i, t in enumerate(tailers[1:])]
        audit = asyncio.create_task(audit_until(tailers[0], done))
        procs = [
            await asyncio.create_subprocess_exec(
                sys.executable,
                str(WRITER),
                postgres_url,
                deployment.deployment_id,
                f"p{p}",
                str(writers),
                str(transactions),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            for p in range(processes)
        ]
        outputs = [await proc.communicate() for proc in procs]
        done.set()
        seen_by_tailer = await asyncio.gather(*tails)
        holes = await audit
        committed = await setup.events_after(0, 1_000_000)
    finally:
        done.set()
        for store in (setup, *tailers):
            await store.close()

    for proc, (_out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err.decode()
    written = sum(int(out) for out, _ in outputs)
    sequences = [e.sequence for e in committed]
    assert len(committed) == written  # no acknowledged event lost
    assert sequences == list(range(1, written + 1))  # sequences are the commit order, without holes

    assert holes == 0
    for seen in seen_by_tailer:
        order = [e.sequence for e in seen]
        gaps = sum(1 for before, after in itertools.pairwise(order) if after <= before)
        missing = sorted(set(sequences) - set(order))
        assert (gaps, missing, len(order)) == (0, [], written)

    # One writer's transactions follow each other, so its events keep their order in the log.
    by_writer: dict[str, list[int]] = {}
    for event in committed:
        process, writer, _transaction, _index = event.message.split("/")
        by_writer.setdefault(f"{process}/{writer}", []).append(event.sequence)
    assert len(by_writer) == processes * writers
    assert all(s == sorted(s) for s in by_writer.values())


async def test_replicas_starting_together_apply_each_migration_once(postgres_url: str) -> None:
    stores = await asyncio.gather(*(postgres.Store.open(postgres_url, pool_size=1) for _ in range(4)))
    try:
        versions = {await s.schema_version() for s in stores}
    finally:
        for store in stores:
            await store.close()
    conn = await asyncpg.connect(postgres_url)
    try:
        rows = await conn.fetch("SELECT version, description FROM schema_migrations ORDER BY version")
    finally:
        await conn.close()
    assert versions == {migrations.POSTGRESQL[-1][0]}
    assert [(r["version"], r["description"]) for r in rows] == [(v, d) for v, d, _ in migrations.POSTGRESQL]


def test_both_dialects_have_the_same_schema_versions() -> None:
    assert [(v, d) for v, d, _ in migrations.POSTGRESQL] == [(v, d) for v, d, _ in migrations.MIGRATIONS]


async def test_two_replicas_provisioning_one_resource_at_once_make_one_deployment(postgres_url: str) -> None:
    replicas = [await postgres.Store.open(postgres_url) for _ in range(2)]
    try:
        results = await asyncio.gather(*(replicas[i % 2].provision(command()) for i in range(20)))
        retried = await asyncio.gather(
            *(replicas[i % 2].provision(command(replicas=2, request_id="r-1")) for i in range(10))
        )
        count = await replicas[0].count_deployments()
        listed = await replicas[1].list_deployments(
            model.ResourceQuery(namespace=NS), model.PageRequest(size=10)
        )
    finally:
        for store in replicas:
            await store.close()

    assert count == 1
    assert len({r.deployment_id for r in results}) == 1
    assert sum(r.changed for r in results) == 1
    # One request id, sent to both replicas at once: one update, and the same answer for all.
    assert sum(r.changed for r in retried) == 1
    assert len({(r.deployment_id, r.generation, r.operation.operation_id) for r in retried}) == 1
    assert [d.generation for d in listed.items] == [2]


async def test_an_unreachable_server_is_unavailable_and_the_message_keeps_the_password(
    postgres_url: str,
) -> None:
    # The cluster's own address with a wrong password, and a port where nothing listens.
    wrong = postgres_url.replace("postgres:", "postgres:not-the-password-", 1)
    with pytest.raises(errors.Unavailable) as refused:
        await postgres.Store.open(wrong)
    assert "not-the-password" not in str(refused.value)
    assert "***" in str(refused.value)

    with pytest.raises(errors.Unavailable) as unreachable:
        await postgres.Store.open("postgresql://broker:s3cret-pw@127.0.0.1:9/broker")
    assert "s3cret-pw" not in str(unreachable.value)
    assert "127.0.0.1:9" in str(unreachable.value)


def test_a_password_is_redacted_and_the_rest_of_the_url_kept() -> None:
    assert (
        postgres.redacted("postgresql://broker:p%40ss@db.example:5432/broker?sslmode=require")
        == "postgresql://broker:***@db.example:5432/broker?sslmode=require"
    )
    assert postgres.redacted("postgresql://db.example/broker") == "postgresql://db.example/broker"


async def test_a_commit_on_one_replica_wakes_the_fan_out_of_another(postgres_url: str) -> None:
    """LISTEN/NOTIFY: replica B's stream gets replica A's event without waiting for B's poll.

    B's tailer polls only once a minute here, so the event can reach B's subscriber within the
    wait below only through the notification; the log is still what it reads.
    """
    a, b = await postgres.Store.open(postgres_url), await postgres.Store.open(postgres_url)
    hub = events.EventHub(poll_interval=60.0)
    b.wakers.append(hub.notify)
    try:
        deployment = await ready(a, "db-notified")
        _, newest = await b.event_bounds()
        subscription = hub.subscribe(lambda e: True, limit=100)
        tail = asyncio.create_task(hub.tail(b.events_after, start=newest))
        await asyncio.sleep(0.2)  # the tailer has read once and waits for a wake-up now
        await a.append_events([event_about(deployment, 1)])
        got = await subscription.next(10.0)
        assert got is not None, "replica B was not woken by replica A's commit"
        assert got.sequence == newest + 1
        assert got.deployment_id == deployment.deployment_id
        tail.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await tail
    finally:
        await a.close()
        await b.close()


async def test_work_accepted_on_one_replica_is_announced_to_the_others_with_its_deployment(
    postgres_url: str,
) -> None:
    """A Provision or Deprovision that changed something, committed by replica A, reaches B's
    ``changed`` (the leader's provisioner) at once; one that changed nothing is not announced."""
    a, b = await postgres.Store.open(postgres_url), await postgres.Store.open(postgres_url)
    heard: asyncio.Queue[str] = asyncio.Queue()
    b.changed.append(heard.put_nowait)
    try:
        created = await a.provision(command("db-announced"))
        assert await asyncio.wait_for(heard.get(), 10) == created.deployment_id
        again = await a.provision(command("db-announced"))  # the same spec: nothing to do
        assert not again.changed
        updated = await a.provision(command("db-announced", replicas=2))
        assert await asyncio.wait_for(heard.get(), 10) == created.deployment_id
        assert updated.generation == 2
        deleted = await a.deprovision(
            model.DeprovisionCommand(
                namespace=NS,
                deployment_id=created.deployment_id,
                data_policy=model.DataPolicy.KEEP,
                request_id="",
            )
        )
        assert deleted.changed
        assert await asyncio.wait_for(heard.get(), 10) == created.deployment_id
        await asyncio.sleep(0.2)
        assert heard.empty()  # the unchanged Provision announced nothing
    finally:
        await a.close()
        await b.close()

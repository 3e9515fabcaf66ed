"""Resuming WatchDrift: a manager that reconnects with the last sequence it saw misses nothing and
gets nothing twice, across random disconnects and broker restarts; a resume point the log no longer
holds is refused explicitly, never answered with a silent gap.
"""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import random
import shutil

import grpc
import pytest
from broker_client.v1 import broker_pb2 as pb
from broker_client.v1 import broker_pb2_grpc
from conftest import ADMIN_TOKEN, PLATFORM_TOKEN, bearer
from kubernetes_asyncio import client as k8s
from test_watch_support import (
    OTHER,
    PLATFORM,
    Kubectl,
    broker_on,
    client_of,
    error_info,
    until,
    value,
)

from broker import server

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not on PATH")

K = pb.DriftEventKind


def event_key(e: pb.DriftEvent) -> tuple[int, int, str, str, str]:
    return (e.sequence, e.kind, e.deployment_id, e.namespace, e.message)


async def log_of(broker: server.Broker) -> list[tuple[int, int, str, str, str]]:
    """The whole event log as the store has it, in the stream's terms."""
    from broker.api import convert

    return [event_key(convert.event_to_proto(e)) for e in await broker.store.events_after(0, 1_000_000)]


class Resumer:
    """A manager that keeps reconnecting, each time with after_sequence = the last sequence it saw."""

    def __init__(self, stub: broker_pb2_grpc.BrokerServiceStub, token: str, seed_: int) -> None:
        self.stub = stub
        self.token = token
        self.random = random.Random(seed_)
        self.received: list[pb.DriftEvent] = []
        self.connections = 0
        self.fruitful = 0  # connections that received events before being dropped

    @property
    def last(self) -> int:
        return self.received[-1].sequence if self.received else 0

    async def session(self, duration: float) -> None:
        """One connection, read for ``duration`` seconds and then dropped, at whatever point it is."""
        self.connections += 1
        after = self.last
        call = self.stub.WatchDrift(pb.WatchDriftRequest(after_sequence=after), metadata=bearer(self.token))

        async def read() -> None:
            async for message in call:
                if message.WhichOneof("message") == "event":
                    self.received.append(message.event)

        reader = asyncio.create_task(read())
        done, _ = await asyncio.wait({reader}, timeout=duration)
        if done:
            reader.result()  # a stream that ended by itself is a failure: raise its error
            pytest.fail("the stream ended by itself")
        call.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        if self.received and self.received[-1].sequence > after:
            self.fruitful += 1


async def _provisions(manager: object, names: list[str], namespace: str, rnd: random.Random) -> list[str]:
    ids = []
    for name in names:
        ids.append(await manager.provision(name, namespace))  # type: ignore[attr-defined]
        await asyncio.sleep(rnd.uniform(0.0, 0.15))
    return ids


async def _scales(api: k8s.ApiClient, names: list[str], rounds: int, rnd: random.Random) -> None:
    apps = k8s.AppsV1Api(api)
    for _ in range(rounds):
        name = rnd.choice(names)
        with contextlib.suppress(k8s.ApiException):  # not created yet
            await apps.patch_namespaced_stateful_set_scale(
                name, PLATFORM, {"spec": {"replicas": rnd.choice([2, 3, 4])}}, field_manager="chaos"
            )
        await asyncio.sleep(rnd.uniform(0.02, 0.2))


async def test_a_subscriber_reconnecting_at_random_moments_gets_every_event_once_in_order(
    tmp_path: pathlib.Path,
    tokens_file: pathlib.Path,
    sandbox_kubeconfig: pathlib.Path,
    kube_api: k8s.ApiClient,
) -> None:
    rnd = random.Random(20240611)
    async with (
        broker_on(
            tmp_path / "data", tokens_file, sandbox_kubeconfig, remediate=True, remediation_base_delay=0.1
        ) as broker,
        client_of(broker, ADMIN_TOKEN) as admin,
    ):
        subscriber = Resumer(admin.stub, ADMIN_TOKEN, seed_=7)
        platform_names = [f"db-r{i}" for i in range(8)]
        other_names = [f"db-o{i}" for i in range(4)]
        producers = asyncio.gather(
            _provisions(admin, platform_names, PLATFORM, rnd),
            _provisions(admin, other_names, OTHER, rnd),
            _scales(kube_api, platform_names, 40, rnd),
        )
        try:
            while not producers.done() or subscriber.connections < 25:
                await subscriber.session(rnd.choice([0.0, 0.01, 0.05, 0.1, 0.2, 0.4]))
            await producers
        finally:
            if not producers.done():
                producers.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await producers

        # One last connection catches up with the end of the log (remediations may still add to it).
        final = admin.watch(after_sequence=subscriber.last)
        for _ in range(100):
            log = await log_of(broker)
            if subscriber.last < log[-1][0]:
                await final.reach(log[-1][0], within=30)
            seen = [event_key(e) for e in subscriber.received + final.events]
            if len(seen) == len(log) and await log_of(broker) == log:
                break
            assert seen == (await log_of(broker))[: len(seen)]  # always exactly a prefix of the log
            await asyncio.sleep(0.3)

        assert subscriber.connections >= 25
        assert subscriber.fruitful >= 5, "most reconnects should happen while events flow"
        kinds = {k for _, k, _, _, _ in log}
        assert {K.DRIFT_EVENT_KIND_PROVISIONING_SUCCEEDED, K.DRIFT_EVENT_KIND_DRIFT_DETECTED} <= kinds, kinds
        assert len(log) >= 30, len(log)
        sequences = [s for s, *_ in seen]
        duplicates = sorted({s for s in sequences if sequences.count(s) > 1})
        missing = sorted({s for s, *_ in log} - set(sequences))
        assert not duplicates, f"delivered twice: {duplicates}"
        assert not missing, f"never delivered: {missing}"
        assert seen == log  # every event once, in order, with the content the log has


async def test_a_resume_point_older_than_the_retained_log_is_refused_explicitly(
    tmp_path: pathlib.Path, tokens_file: pathlib.Path, sandbox_kubeconfig: pathlib.Path
) -> None:
    async with (
        broker_on(tmp_path / "data", tokens_file, sandbox_kubeconfig) as broker,
        client_of(broker, PLATFORM_TOKEN) as manager,
    ):
        ids = [await manager.provision(f"db-p{i}") for i in range(4)]
        for deployment_id in ids:
            await manager.wait_ready(deployment_id)
        # Pruning "all but 2" must not count an event that came in between.
        oldest, newest = await quiet_bounds(broker)
        assert oldest == 1
        assert newest >= 4

        # Before pruning, every resume point in the log works.
        replay = manager.watch(after_sequence=0)
        await replay.wait(lambda w: len(w.events) == newest, within=10, what="the whole log")
        assert replay.sequences == list(range(1, newest + 1))

        assert await broker.store.prune_events(keep=2) == newest - 2
        retained = list(range(newest - 1, newest + 1))

        async def refused(after: int) -> grpc.aio.AioRpcError:
            w = manager.watch(after_sequence=after)
            err = await w.ended_with()
            assert w.events == [], "a refused resume must not deliver anything"
            return err

        for after in (0, 1, newest - 3):
            err = await refused(after)
            assert err.code() == grpc.StatusCode.OUT_OF_RANGE, (after, err)
            info = error_info(err)
            assert info.reason == "SEQUENCE_EXPIRED"
            assert info.metadata["oldest_sequence"] == str(newest - 1)
            assert info.metadata["newest_sequence"] == str(newest)
            assert "re-read the state" in (err.details() or "")

        # Ahead of the log is as wrong as behind it.
        for after in (newest + 1, newest + 1000):
            err = await refused(after)
            assert err.code() == grpc.StatusCode.OUT_OF_RANGE, (after, err)
            assert error_info(err).reason == "SEQUENCE_EXPIRED"

        # The oldest resumable point is just before the oldest retained event.
        ok = manager.watch(after_sequence=newest - 2)
        await ok.wait(lambda w: len(w.events) == 2, within=10, what="the retained events")
        assert ok.sequences == retained
        at_end = manager.watch(after_sequence=newest)
        await manager.provision("db-after-prune")
        await at_end.wait(lambda w: len(w.events) >= 1, within=20, what="the next event")
        assert at_end.sequences[0] == newest + 1

        # A fully pruned log still knows where it ended: resuming there works, before it does not.
        await broker.store.prune_events(keep=0)
        _, last = await broker.store.event_bounds()
        assert last > newest
        err = await refused(last - 1)
        assert err.code() == grpc.StatusCode.OUT_OF_RANGE
        assert error_info(err).reason == "SEQUENCE_EXPIRED"
        fine = manager.watch(after_sequence=last)
        await manager.provision("db-final")
        await fine.wait(lambda w: len(w.events) >= 1, within=20, what="the next event")
        assert fine.sequences[0] == last + 1
        # A negative sequence is not a position at all.
        err = await refused(-1)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


async def quiet_bounds(broker: server.Broker) -> tuple[int, int]:
    """The log's bounds once it is quiet: events may still follow Ready for a moment (the
    detector's first verdicts), and a test that counts events must not race them."""
    bounds = (-1, -1)
    while True:
        latest = await broker.store.event_bounds()
        if latest == bounds:
            return bounds
        bounds = latest
        await asyncio.sleep(1.5)


async def test_a_broker_restart_ends_streams_resumably_and_the_new_broker_continues_without_loss(
    tmp_path: pathlib.Path, tokens_file: pathlib.Path, sandbox_kubeconfig: pathlib.Path
) -> None:
    kubectl = Kubectl(sandbox_kubeconfig, tmp_path / "kube-cache")
    data_dir = tmp_path / "data"
    async with (
        broker_on(data_dir, tokens_file, sandbox_kubeconfig) as first,
        client_of(first, PLATFORM_TOKEN) as manager,
    ):
        first_id = await manager.provision("db-before")
        await manager.wait_ready(first_id)
        watch = manager.watch(after_sequence=0)
        idle = manager.watch()  # a live-only stream that has seen nothing yet
        _, newest = await quiet_bounds(first)
        await watch.wait(lambda w: w.sequences[-1:] == [newest], within=10, what="the log so far")
        await until(lambda: value(len(first.hub)), lambda n: n == 2, within=10, what="2 streams")

        await first.stop()

        err = await watch.ended_with()
        assert err.code() == grpc.StatusCode.UNAVAILABLE
        info = error_info(err)
        assert info.reason == "SHUTTING_DOWN"
        assert info.metadata["resume_after_sequence"] == str(newest)
        idle_err = await idle.ended_with()
        assert idle_err.code() == grpc.StatusCode.UNAVAILABLE
        assert error_info(idle_err).reason == "SHUTTING_DOWN"
        assert error_info(idle_err).metadata["resume_after_sequence"] == str(newest)
        before = list(watch.events)
        resume_after = int(info.metadata["resume_after_sequence"])

    # While no broker runs, someone scales the old resource by hand.
    await kubectl.scale("db-before", 3)

    async with (
        broker_on(data_dir, tokens_file, sandbox_kubeconfig) as second,
        client_of(second, PLATFORM_TOKEN) as manager,
    ):
        resumed = manager.watch(after_sequence=resume_after)
        # New events after the restart: drift on the old resource (found by the new broker), a new one.
        second_id = await manager.provision("db-after")
        await manager.wait_ready(second_id)
        await resumed.wait_kinds([K.DRIFT_EVENT_KIND_DRIFT_DETECTED], deployment_id=first_id)
        await resumed.wait_kinds([K.DRIFT_EVENT_KIND_PROVISIONING_SUCCEEDED], deployment_id=second_id)
        # Quiet first: the detector's first verdict on db-after (its expected patch drift) may follow.
        _, newest_after = await quiet_bounds(second)
        await resumed.wait(
            lambda w: w.sequences[-1:] == [newest_after], within=10, what="the log after the restart"
        )

        combined = [event_key(e) for e in before + resumed.events]
        log = [event_key(e) for e in await manager.events(PLATFORM, page_size=3)]
        assert combined == log
        # The old resource's state was not re-announced by the new broker (no duplicate news).
        provisioned = [
            e for e in before + resumed.events if e.kind == K.DRIFT_EVENT_KIND_PROVISIONING_SUCCEEDED
        ]
        assert [e.deployment_id for e in provisioned] == [first_id, second_id]

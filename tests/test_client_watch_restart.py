"""``BrokerClient.watch_drift`` is one unbroken stream across broker restarts.

A manager subscribes once and keeps iterating. The broker is stopped (its streams end resumably)
and a new broker is started on the same data directory and the same gRPC port, twice: once before
the subscriber has seen any event, once after it has seen several. Events are produced the way they
happen in a cluster (provisioning, and ``kubectl scale`` with remediation off). The iterator must
yield every event of the log exactly once and in order, with nothing skipped across either restart.

To make the gap deterministic, the manager stops pulling from the iterator just before each restart
(the async generator then sits at its ``yield`` and cannot reconnect), and pulls again only after the
new broker has already recorded events: those can only arrive by resuming after the last sequence
the iterator saw, never by a live-only re-subscription.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib
import shutil
from collections.abc import Callable
from typing import TypeVar

import pytest
from broker_client.client import BrokerClient, Page
from broker_client.v1 import broker_pb2 as pb
from conftest import PLATFORM_TOKEN, cluster_settings, until

from broker import server

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not on PATH")

NS = "team-platform"
K = pb.DriftEventKind
T = TypeVar("T")


async def kubectl(kubeconfig: pathlib.Path, cache: pathlib.Path, *args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        "kubectl",
        f"--kubeconfig={kubeconfig}",
        f"--cache-dir={cache}",
        "-n",
        NS,
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=dict(os.environ),
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    if proc.returncode != 0:
        pytest.fail(f"kubectl {' '.join(args)} failed ({proc.returncode}): {err.decode()}")
    return out.decode()


Key = tuple[int, str, str, str, str]


def key(e: pb.DriftEvent) -> Key:
    return (e.sequence, pb.DriftEventKind.Name(e.kind), e.deployment_id, e.resource_name, e.message)


class Subscriber:
    """A manager iterating ``watch_drift`` in a background task, recording everything it yields.

    ``pause_after_next`` makes it stop pulling after the next message of the given kind it gets
    (``paused`` is then set) until ``resume``.
    """

    def __init__(self, client: BrokerClient) -> None:
        self.events: list[pb.DriftEvent] = []
        self.heartbeats = 0
        self.paused = asyncio.Event()
        self._pause: tuple[str, ...] = ()
        self._go = asyncio.Event()
        self._task = asyncio.create_task(self._run(client))

    def pause_after_next(self, *which: str) -> None:
        self.paused.clear()
        self._go.clear()
        self._pause = which

    def resume(self) -> None:
        self._pause = ()
        self._go.set()

    async def _run(self, client: BrokerClient) -> None:
        async for message in client.watch_drift(namespaces=[NS], heartbeats=True, max_backoff=0.5):
            which = message.WhichOneof("message")
            if which == "event":
                self.events.append(message.event)
            elif which == "heartbeat":
                self.heartbeats += 1
            if which in self._pause:
                self.paused.set()
                await self._go.wait()

    def check(self) -> None:
        """Fail at once if the iterator ended or raised: it must survive restarts."""
        if self._task.done():
            exc = None if self._task.cancelled() else self._task.exception()
            pytest.fail(f"watch_drift ended instead of resuming: {exc!r}")

    async def wait(self, ok: Callable[[Subscriber], object], *, within: float, what: str) -> None:
        async def probe() -> Subscriber:
            self.check()
            return self

        await until(probe, ok, within=within, what=f"{what} (events: {[key(e) for e in self.events]})")

    async def wait_paused(self) -> None:
        async def probe() -> bool:
            self.check()
            return self.paused.is_set()

        await until(probe, bool, within=30, what="the subscriber to pause")

    def kinds_of(self, name: str) -> list[str]:
        return [pb.DriftEventKind.Name(e.kind) for e in self.events if e.resource_name == name]

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


async def test_watch_drift_yields_every_event_once_in_order_across_two_broker_restarts(
    tmp_path: pathlib.Path, tokens_file: pathlib.Path, sandbox_kubeconfig: pathlib.Path
) -> None:
    data_dir = tmp_path / "data"
    cache = tmp_path / "kube-cache"

    async def start(addr: str) -> server.Broker:
        broker = server.Broker(cluster_settings(data_dir, tokens_file, sandbox_kubeconfig, grpc_addr=addr))
        await broker.start()
        assert broker.cluster is not None
        assert await broker.cluster.wait_synced(10.0)
        return broker

    broker = await start("127.0.0.1:0")
    port = broker.grpc_port
    same_port = f"127.0.0.1:{port}"
    client = await BrokerClient.connect(same_port, token=PLATFORM_TOKEN)
    subscriber: Subscriber | None = None

    async def provision(name: str) -> str:
        reply = await client.provision(
            namespace=NS,
            resource_type="database",
            resource_name=name,
            engine="postgresql",
            version="15",
            size="small",
        )
        return reply.deployment_id

    async def logged(ok: Callable[[Page[pb.DriftEvent]], object], what: str) -> Page[pb.DriftEvent]:
        """Wait until the broker's log (read with the client) satisfies ``ok``."""
        return await until(lambda: client.list_drift_events(NS), ok, within=30, what=what)

    def has(log: Page[pb.DriftEvent], name: str, kind: int) -> bool:
        return any(e.resource_name == name and e.kind == kind for e in log)

    try:
        subscriber = Subscriber(client)
        # A live-only stream starts with a heartbeat naming the log position: the subscriber stops
        # pulling right after it, so it is subscribed but has seen no event.
        subscriber.pause_after_next("heartbeat")
        await subscriber.wait_paused()
        assert subscriber.heartbeats == 1
        assert subscriber.events == []

        # Restart 1, before any event. The new broker records events while the iterator is parked.
        await broker.stop()
        broker = await start(same_port)
        assert broker.grpc_port == port
        a_id = await provision("db-a")
        b_id = await provision("db-b")
        await logged(
            lambda log: (
                has(log, "db-a", K.DRIFT_EVENT_KIND_PROVISIONING_SUCCEEDED)
                and has(log, "db-b", K.DRIFT_EVENT_KIND_PROVISIONING_SUCCEEDED)
            ),
            "db-a and db-b provisioned",
        )
        assert len(broker.hub) == 0  # the iterator has not reconnected yet
        subscriber.resume()
        await subscriber.wait(
            lambda s: (
                "DRIFT_EVENT_KIND_PROVISIONING_SUCCEEDED" in s.kinds_of("db-a")
                and "DRIFT_EVENT_KIND_PROVISIONING_SUCCEEDED" in s.kinds_of("db-b")
            ),
            within=30,
            what="db-a and db-b provisioned, seen by the iterator",
        )

        # Live events on the resumed stream.
        await kubectl(sandbox_kubeconfig, cache, "scale", "statefulset", "db-a", "--replicas=3")
        await subscriber.wait(
            lambda s: "DRIFT_EVENT_KIND_DRIFT_DETECTED" in s.kinds_of("db-a"),
            within=30,
            what="drift on db-a",
        )

        # Restart 2, after several events. Park the iterator on the next event first.
        subscriber.pause_after_next("event")
        await kubectl(sandbox_kubeconfig, cache, "scale", "statefulset", "db-b", "--replicas=2")
        await subscriber.wait_paused()
        seen_before = len(subscriber.events)
        last_before = subscriber.events[-1].sequence

        await broker.stop()
        broker = await start(same_port)
        assert broker.grpc_port == port
        c_id = await provision("db-c")
        await logged(
            lambda log: has(log, "db-c", K.DRIFT_EVENT_KIND_PROVISIONING_SUCCEEDED), "db-c provisioned"
        )
        await kubectl(sandbox_kubeconfig, cache, "scale", "statefulset", "db-c", "--replicas=4")
        await logged(lambda log: has(log, "db-c", K.DRIFT_EVENT_KIND_DRIFT_DETECTED), "drift on db-c")
        assert len(broker.hub) == 0
        subscriber.resume()

        # And live again after the replay.
        await subscriber.wait(
            lambda s: "DRIFT_EVENT_KIND_DRIFT_DETECTED" in s.kinds_of("db-c"),
            within=30,
            what="the events recorded while the iterator was parked",
        )
        await kubectl(sandbox_kubeconfig, cache, "scale", "statefulset", "db-a", "--replicas=1")
        await subscriber.wait(
            lambda s: "DRIFT_EVENT_KIND_DRIFT_RESOLVED" in s.kinds_of("db-a"),
            within=30,
            what="drift on db-a resolved by scaling back",
        )

        # The iterator matches the whole log of the namespace, event by event.
        async def both() -> tuple[list[Key], list[Key]]:
            subscriber.check()
            return [key(e) for e in await client.list_drift_events(NS)], [key(e) for e in subscriber.events]

        log, got = await until(
            both, lambda lg: lg[0] == lg[1], within=30, what="the iterator to match the log"
        )
        sequences = [s for s, *_ in got]
        assert sequences == sorted(set(sequences)), "out of order or duplicated"
        assert got == log
        assert len(got) > seen_before
        assert sequences[seen_before] > last_before
        assert {d for _, _, d, _, _ in got} == {a_id, b_id, c_id}
        provisioned = [d for _, k, d, _, _ in got if k == "DRIFT_EVENT_KIND_PROVISIONING_SUCCEEDED"]
        assert sorted(provisioned) == sorted([a_id, b_id, c_id])
        detected = [n for _, k, _, n, _ in got if k == "DRIFT_EVENT_KIND_DRIFT_DETECTED"]
        assert sorted(detected) == ["db-a", "db-b", "db-c"]
        # The iterator is subscribed to the third broker: it resumed each time, it did not give up.
        assert len(broker.hub) == 1
    finally:
        if subscriber is not None:
            await subscriber.close()
        await client.close()
        await broker.stop()

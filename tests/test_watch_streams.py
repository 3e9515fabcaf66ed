"""WatchDrift as a manager relies on it: snapshots, heartbeats, namespace scoping, bounded buffers
and stream limits; plus the event history (ListDriftEvents, GET /v1/events) and /metrics.
"""

from __future__ import annotations

import asyncio
import pathlib
import random
import shutil
from typing import Any

import aiohttp
import grpc
import pytest
from broker_client.v1 import broker_pb2 as pb
from broker_client.v1 import broker_pb2_grpc
from conftest import ADMIN_TOKEN, OTHER_TOKEN, PLATFORM_TOKEN, bearer
from test_watch_support import (
    OTHER,
    PLATFORM,
    Client,
    Kubectl,
    Watch,
    broker_on,
    client_of,
    error_info,
    filler_event,
    until,
    value,
)

from broker import service

needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not on PATH")

K = pb.DriftEventKind


@pytest.fixture
def kubectl(sandbox_kubeconfig: pathlib.Path, tmp_path: pathlib.Path) -> Kubectl:
    return Kubectl(sandbox_kubeconfig, tmp_path / "kube-cache")


async def pending_deployment(client: Client, name: str = "filler") -> str:
    """A deployment to hang events on, on a broker without a cluster (it stays Pending)."""
    return await client.provision(name)


# Snapshots and namespace scoping -------------------------------------------------------------------


@needs_kubectl
async def test_a_snapshot_is_the_current_state_then_a_marker_then_live_events(
    tmp_path: pathlib.Path, tokens_file: pathlib.Path, sandbox_kubeconfig: pathlib.Path, kubectl: Kubectl
) -> None:
    async with (
        broker_on(tmp_path / "data", tokens_file, sandbox_kubeconfig) as broker,
        client_of(broker, ADMIN_TOKEN) as admin,
    ):
        ids = {
            "db-a": await admin.provision("db-a"),
            "db-b": await admin.provision("db-b"),
            "db-c": await admin.provision("db-c", OTHER),
        }
        for name, deployment_id in ids.items():
            await admin.wait_ready(deployment_id, OTHER if name == "db-c" else PLATFORM)
        _, newest = await broker.store.event_bounds()

        watch = admin.watch(send_initial_state=True)
        await watch.wait(lambda w: w.of("snapshot_complete"), within=10, what="snapshot_complete")
        kinds = [m.WhichOneof("message") for m in watch.messages]
        assert kinds == ["initial_state"] * 3 + ["snapshot_complete"], kinds
        states = {s.resource_name: s for s in watch.of("initial_state")}
        assert {n: s.deployment_id for n, s in states.items()} == ids
        assert states["db-c"].namespace == OTHER
        for state in states.values():
            assert state.phase == pb.STATE_READY
            assert state.health_status == pb.HEALTH_STATUS_HEALTHY
            assert state.actual_spec.replicas == 1
            assert state.desired_spec.engine == "postgresql"
        (complete,) = watch.of("snapshot_complete")
        assert complete.sequence == newest

        # Live events follow, after the snapshot's sequence.
        await kubectl.scale("db-a", 3)
        events = await watch.wait_kinds([K.DRIFT_EVENT_KIND_DRIFT_DETECTED], deployment_id=ids["db-a"])
        assert all(e.sequence > newest for e in events)
        assert watch.sequences == sorted(set(watch.sequences))

        # A snapshot follows the stream's filters.
        only_b = admin.watch(send_initial_state=True, resource_name="db-b", namespaces=[PLATFORM])
        await only_b.wait(lambda w: w.of("snapshot_complete"), within=10, what="snapshot_complete")
        assert [s.resource_name for s in only_b.of("initial_state")] == ["db-b"]
        # A snapshot of the drifted resource shows its drift.
        drifted = admin.watch(send_initial_state=True, deployment_id=ids["db-a"])
        await drifted.wait(lambda w: w.of("snapshot_complete"), within=10, what="snapshot_complete")
        (state,) = drifted.of("initial_state")
        assert state.phase == pb.STATE_DRIFT_DETECTED
        assert "replicas.changed" in [i.rule_id for i in state.drift_items]
        assert drifted.of("snapshot_complete")[0].sequence >= events[-1].sequence


@needs_kubectl
async def test_a_caller_limited_to_one_namespace_sees_only_its_events(
    tmp_path: pathlib.Path, tokens_file: pathlib.Path, sandbox_kubeconfig: pathlib.Path, kubectl: Kubectl
) -> None:
    async with (
        broker_on(tmp_path / "data", tokens_file, sandbox_kubeconfig) as broker,
        client_of(broker, PLATFORM_TOKEN) as platform,
        client_of(broker, OTHER_TOKEN) as other,
        client_of(broker, ADMIN_TOKEN) as admin,
    ):
        mine = await platform.provision("db-mine")
        theirs = await other.provision("db-theirs", OTHER)
        await platform.wait_ready(mine)
        await other.wait_ready(theirs, OTHER)

        # Asking for a namespace the caller is not granted is refused, alone or among granted ones.
        for namespaces in ([OTHER], [PLATFORM, OTHER]):
            refused = platform.watch(namespaces=namespaces, send_initial_state=True)
            err = await refused.ended_with()
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED, namespaces
            assert error_info(err).reason == "NAMESPACE_NOT_GRANTED"
            assert refused.messages == []
        refused = platform.watch(namespaces=[OTHER], after_sequence=0)
        assert (await refused.ended_with()).code() == grpc.StatusCode.PERMISSION_DENIED

        watch = platform.watch(send_initial_state=True)
        explicit = platform.watch(namespaces=[PLATFORM])
        await watch.wait(lambda w: w.of("snapshot_complete"), within=10, what="snapshot_complete")
        assert [s.resource_name for s in watch.of("initial_state")] == ["db-mine"]
        start = watch.of("snapshot_complete")[0].sequence
        await until(lambda: value(len(broker.hub)), lambda n: n >= 2, within=10, what="both streams")

        # Things happen in both namespaces.
        mine2 = await platform.provision("db-mine-2")
        theirs2 = await other.provision("db-theirs-2", OTHER)
        await kubectl.scale("db-theirs", 3, namespace=OTHER)
        await kubectl.scale("db-mine", 2)
        await watch.wait_kinds([K.DRIFT_EVENT_KIND_DRIFT_DETECTED], deployment_id=mine)
        await watch.wait_kinds([K.DRIFT_EVENT_KIND_PROVISIONING_SUCCEEDED], deployment_id=mine2)
        await other.wait_ready(theirs2, OTHER)
        log_other = await until(
            lambda: admin.events(OTHER),
            lambda es: (
                {K.DRIFT_EVENT_KIND_DRIFT_DETECTED, K.DRIFT_EVENT_KIND_PROVISIONING_SUCCEEDED}
                <= {e.kind for e in es if e.sequence > start}
            ),
            within=20,
            what="team-other's events",
        )
        assert any(e.sequence > start for e in log_other)
        log_mine = [e for e in await admin.events(PLATFORM) if e.sequence > start]
        await watch.wait(
            lambda w: len(w.events) >= len(log_mine), within=10, what="every team-platform event"
        )
        assert {e.namespace for e in watch.events} == {PLATFORM}
        assert watch.events == log_mine
        await explicit.wait(lambda w: len(w.events) >= len(log_mine), within=10, what="the same events")
        assert explicit.events == log_mine

        # Replaying the log shows the same scope: only team-platform's part of it.
        replay = platform.watch(after_sequence=0)
        everything = await admin.events(PLATFORM)
        await replay.wait(lambda w: len(w.events) >= len(everything), within=10, what="the replay")
        assert replay.events == everything
        assert {e.namespace for e in replay.events} == {PLATFORM}
        # The other principal sees the mirror image.
        theirs_replay = other.watch(after_sequence=0, send_initial_state=False)
        their_log = await admin.events(OTHER)
        await theirs_replay.wait(lambda w: len(w.events) >= len(their_log), within=10, what="their replay")
        assert theirs_replay.events == their_log


# Heartbeats, limits, slow subscribers --------------------------------------------------------------


async def test_an_idle_stream_gets_heartbeats_carrying_the_log_position(
    tmp_path: pathlib.Path, tokens_file: pathlib.Path
) -> None:
    limits = service.WatchLimits(heartbeat_interval=0.3)
    async with (
        broker_on(tmp_path / "data", tokens_file, None, watch=limits) as broker,
        client_of(broker, PLATFORM_TOKEN) as manager,
    ):
        deployment_id = await pending_deployment(manager)
        await broker.store.append_events([filler_event(deployment_id, i) for i in range(3)])
        _, newest = await broker.store.event_bounds()

        watch = manager.watch()
        await watch.wait(lambda w: len(w.of("heartbeat")) >= 3, within=15, what="three heartbeats")
        assert watch.events == []
        beats = watch.of("heartbeat")
        assert {b.sequence for b in beats} == {newest}
        assert all(b.send_time.seconds > 0 for b in beats)
        assert [b.send_time.ToDatetime() for b in beats] == sorted(b.send_time.ToDatetime() for b in beats)

        # An event interrupts the silence; later heartbeats carry its sequence.
        await broker.store.append_events([filler_event(deployment_id, 99)])
        await watch.wait(lambda w: len(w.events) == 1, within=10, what="the event")
        count = len(watch.of("heartbeat"))
        await watch.wait(lambda w: len(w.of("heartbeat")) >= count + 2, within=15, what="two more heartbeats")
        assert watch.of("heartbeat")[-1].sequence == newest + 1
        assert watch.events[0].sequence == newest + 1

        # A snapshot stream that has nothing to say is kept alive the same way.
        snap = manager.watch(send_initial_state=True)
        await snap.wait(lambda w: len(w.of("heartbeat")) >= 2, within=15, what="heartbeats after a snapshot")
        assert snap.messages[0].WhichOneof("message") == "initial_state"
        assert [m.WhichOneof("message") for m in snap.messages][:2] == ["initial_state", "snapshot_complete"]


async def test_heartbeats_of_a_namespace_scoped_stream_carry_the_log_position(
    tmp_path: pathlib.Path, tokens_file: pathlib.Path
) -> None:
    """Heartbeat.sequence is "the latest sequence in the log when the heartbeat was sent" (broker.proto).

    A manager scoped to a quiet namespace while another namespace is busy relies on it to know how
    far the log has come, and to resume from there instead of from a point that retention will
    eventually drop (which would force it to re-read all state for nothing).
    """
    limits = service.WatchLimits(heartbeat_interval=0.3)
    async with (
        broker_on(tmp_path / "data", tokens_file, None, watch=limits) as broker,
        client_of(broker, PLATFORM_TOKEN) as manager,
        client_of(broker, ADMIN_TOKEN) as admin,
    ):
        mine = await pending_deployment(manager, "quiet")
        theirs = await admin.provision("busy", OTHER)
        await broker.store.append_events([filler_event(mine, 0, name="quiet")])
        watch = manager.watch(after_sequence=0)
        await watch.wait(lambda w: len(w.events) == 1, within=10, what="the team-platform event")

        # Only team-other is busy; the team-platform stream stays idle.
        await broker.store.append_events(
            [filler_event(theirs, i, name="busy", namespace=OTHER) for i in range(5)]
        )
        _, newest = await broker.store.event_bounds()
        count = len(watch.of("heartbeat"))
        await watch.wait(lambda w: len(w.of("heartbeat")) >= count + 2, within=15, what="two more heartbeats")
        assert len(watch.events) == 1  # none of team-other's events
        assert watch.of("heartbeat")[-1].sequence == newest, (
            f"heartbeat says {watch.of('heartbeat')[-1].sequence}, the log is at {newest}"
        )


async def test_a_principal_may_hold_only_so_many_streams(
    tmp_path: pathlib.Path, tokens_file: pathlib.Path
) -> None:
    limits = service.WatchLimits(streams_per_principal=2)
    rnd = random.Random(3)
    async with (
        broker_on(tmp_path / "data", tokens_file, None, watch=limits) as broker,
        client_of(broker, PLATFORM_TOKEN) as manager,
        client_of(broker, OTHER_TOKEN) as other,
    ):
        # Streams opened and dropped at random moments leave nothing behind.
        for _ in range(12):
            w = manager.watch(send_initial_state=rnd.random() < 0.5)
            await asyncio.sleep(rnd.choice([0.0, 0.005, 0.02, 0.05]))
            await w.close()
        await until(lambda: value(len(broker.hub)), lambda n: n == 0, within=10, what="no subscribers")

        first, second = manager.watch(), manager.watch()
        await until(lambda: value(len(broker.hub)), lambda n: n == 2, within=10, what="two streams")
        third = manager.watch()
        err = await third.ended_with()
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # Not the resumable cut-off of a slow reader: a client must not simply retry at once.
        assert error_info(err).reason != "SUBSCRIBER_TOO_SLOW"
        assert "2" in (err.details() or "")
        assert not first.ended
        assert not second.ended

        # Another principal is not limited by this one's streams.
        theirs = other.watch()
        await until(lambda: value(len(broker.hub)), lambda n: n == 3, within=10, what="the other's stream")
        assert not theirs.ended

        # Closing a stream frees its place.
        await first.close()

        async def reopened() -> Watch | None:
            w = manager.watch()
            await until(
                lambda: value(w.ended or len(broker.hub) == 3), bool, within=10, what="the stream to settle"
            )
            if w.ended:
                return None
            return w

        again = await until(reopened, lambda w: w is not None, within=10, what="a freed place")
        assert again is not None
        assert not again.ended
        assert not second.ended


async def test_a_subscriber_that_does_not_read_is_cut_off_while_the_others_get_every_event(
    tmp_path: pathlib.Path, tokens_file: pathlib.Path
) -> None:
    buffer = 20
    async with (
        broker_on(tmp_path / "data", tokens_file, None, watch=service.WatchLimits(buffer=buffer)) as broker,
        client_of(broker, ADMIN_TOKEN) as manager,
    ):
        deployment_id = await pending_deployment(manager)
        _, start = await broker.store.event_bounds()
        fast = manager.watch(after_sequence=start)
        # The slow one: a call whose responses nobody reads (gRPC flow control then stalls the
        # server's writes, and the broker-side buffer fills).
        slow_channel = grpc.aio.insecure_channel(f"127.0.0.1:{broker.grpc_port}")
        slow = broker_pb2_grpc.BrokerServiceStub(slow_channel).WatchDrift(
            pb.WatchDriftRequest(after_sequence=start), metadata=bearer(ADMIN_TOKEN)
        )
        try:
            await until(lambda: value(len(broker.hub)), lambda n: n == 2, within=10, what="both subscribers")
            produced = start
            extra = 0
            while extra < 200:
                if len(broker.hub) < 2:
                    extra += 15  # keep going a little after the cut-off
                assert produced - start < 10_000, "the slow subscriber was never cut off"
                await broker.store.append_events(
                    [filler_event(deployment_id, i, size=4000) for i in range(15)]
                )
                produced += 15
                # The fast subscriber keeps up (the producer waits for it: it is not what is tested).
                await fast.reach(produced)
            # Cut off on the broker's side while the client has still read nothing: the subscription
            # and its buffer are gone, so the server holds no more than ``buffer`` events for it.
            assert len(broker.hub) == 1
            assert not fast.ended
            assert fast.sequences == list(range(start + 1, produced + 1))

            # When the slow client reads at last, it gets what was in flight, then the resumable error.
            received: list[int] = []

            async def read_all() -> None:
                async for message in slow:
                    if message.WhichOneof("message") == "event":
                        received.append(message.event.sequence)

            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await read_all()
            err = caught.value
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            info = error_info(err)
            assert info.reason == "SUBSCRIBER_TOO_SLOW"
            resume = int(info.metadata["resume_after_sequence"])
            assert received == list(range(start + 1, resume + 1))  # nothing skipped before the cut
            assert resume < produced

            # Resuming from there delivers the rest: nothing lost.
            rest = manager.watch(after_sequence=resume)
            await rest.wait(lambda w: w.sequences[-1:] == [produced], within=20, what="the rest")
            assert received + rest.sequences == list(range(start + 1, produced + 1))
            assert not fast.ended
        finally:
            slow.cancel()
            await slow_channel.close()


# History and metrics --------------------------------------------------------------------------------


@needs_kubectl
async def test_the_history_is_listed_in_order_over_grpc_and_http(
    tmp_path: pathlib.Path, tokens_file: pathlib.Path, sandbox_kubeconfig: pathlib.Path, kubectl: Kubectl
) -> None:
    async with (
        broker_on(tmp_path / "data", tokens_file, sandbox_kubeconfig) as broker,
        client_of(broker, PLATFORM_TOKEN) as manager,
        client_of(broker, ADMIN_TOKEN) as admin,
    ):
        ids = [await manager.provision(f"db-h{i}") for i in range(3)]
        for deployment_id in ids:
            await manager.wait_ready(deployment_id)
        await admin.wait_ready(await admin.provision("db-elsewhere", OTHER), OTHER)
        watch = manager.watch(after_sequence=0)
        await kubectl.scale("db-h1", 3)
        # Three replicas cost three times one: past the cost-alert threshold, a CostAlert follows.
        await watch.wait_kinds(
            [K.DRIFT_EVENT_KIND_DRIFT_DETECTED, K.DRIFT_EVENT_KIND_COST_ALERT], deployment_id=ids[1]
        )

        from broker.api import convert

        log = [
            convert.event_to_proto(e)
            for e in await broker.store.events_after(0, 10_000)
            if e.namespace == PLATFORM
        ]
        assert len(log) >= 4
        listed = await manager.events(PLATFORM, page_size=2)
        assert listed == log
        assert [e.sequence for e in listed] == sorted({e.sequence for e in listed})
        assert watch.events == log  # the stream and the history agree
        only_detected = manager.watch(after_sequence=0, kinds=[K.DRIFT_EVENT_KIND_DRIFT_DETECTED])
        detected_log = [e for e in log if e.kind == K.DRIFT_EVENT_KIND_DRIFT_DETECTED]
        await only_detected.reach(detected_log[-1].sequence)
        assert only_detected.events == detected_log
        one = await manager.events(PLATFORM, deployment_id=ids[1], page_size=1)
        assert one == [e for e in log if e.deployment_id == ids[1]]
        assert [e.kind for e in one] == [
            K.DRIFT_EVENT_KIND_PROVISIONING_SUCCEEDED,
            K.DRIFT_EVENT_KIND_EXPECTED_DRIFT,  # the seed's 15 running as 15.2: a trace, no alarm
            K.DRIFT_EVENT_KIND_DRIFT_DETECTED,
            K.DRIFT_EVENT_KIND_COST_ALERT,
        ]

        # GET /v1/events, page by page, in the seed's spelling.
        pages: list[dict[str, Any]] = []
        token = ""
        for _ in range(100):
            params = {"namespace": PLATFORM, "pageSize": "2"}
            if token:
                params["pageToken"] = token
            async with manager.http.get("/v1/events", params=params) as r:
                assert r.status == 200, await r.text()
                body = await r.json()
            pages.extend(body["events"])
            token = body.get("nextPageToken", "")
            if not token:
                break
        assert [int(e["sequence"]) for e in pages] == [e.sequence for e in log]
        assert [e["deploymentId"] for e in pages] == [e.deployment_id for e in log]
        assert pages[0]["kind"] == "ProvisioningSucceeded"
        detected = [e for e in pages if e["kind"] == "DriftDetected"]
        assert [e["resourceName"] for e in detected] == ["db-h1"]
        assert "Replica count mismatch: desired=1, actual=3" in str(detected[0]["message"])
        async with manager.http.get(
            "/v1/events", params={"namespace": PLATFORM, "kinds": "DriftDetected"}
        ) as r:
            assert r.status == 200
            only = (await r.json())["events"]
        assert [e["sequence"] for e in only] == [e["sequence"] for e in detected]
        async with manager.http.get("/v1/events", params={"namespace": OTHER}) as r:
            assert r.status == 403


async def test_metrics_count_events_and_subscribers_for_admins_only(
    tmp_path: pathlib.Path, tokens_file: pathlib.Path
) -> None:
    async with (
        broker_on(tmp_path / "data", tokens_file, None) as broker,
        client_of(broker, ADMIN_TOKEN) as admin,
    ):
        deployment_id = await pending_deployment(admin)
        await broker.store.append_events([filler_event(deployment_id, i) for i in range(3)])
        first, second = admin.watch(), admin.watch(send_initial_state=True)
        await until(lambda: value(len(broker.hub)), lambda n: n == 2, within=10, what="two subscribers")

        async def scrape(headers: dict[str, str]) -> tuple[int, str]:
            async with (
                aiohttp.ClientSession() as http,
                http.get(f"http://127.0.0.1:{broker.http_port}/metrics", headers=headers) as r,
            ):
                return r.status, await r.text()

        status, text = await scrape({"Authorization": f"Bearer {ADMIN_TOKEN}"})
        assert status == 200
        lines = text.splitlines()
        assert 'broker_drift_events_total{kind="RemediationFailed"} 3.0' in lines, text
        assert "broker_watch_subscribers 2.0" in lines, text

        await first.close()
        await second.close()
        await until(lambda: value(len(broker.hub)), lambda n: n == 0, within=10, what="no subscribers")
        _, text = await scrape({"Authorization": f"Bearer {ADMIN_TOKEN}"})
        assert "broker_watch_subscribers 0.0" in text.splitlines()

        status, _ = await scrape({})
        assert status == 401
        status, _ = await scrape({"Authorization": f"Bearer {PLATFORM_TOKEN}"})
        assert status == 403

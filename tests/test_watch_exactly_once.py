"""WatchDrift delivers every event exactly once, even when heartbeats race events, and cuts off a
subscriber that stopped reading, however much the transport buffered for it.
"""

from __future__ import annotations

import asyncio
import datetime
import pathlib
import random
import time

import grpc
import pytest
from broker_client.v1 import broker_pb2 as pb
from broker_client.v1 import broker_pb2_grpc
from conftest import ADMIN_TOKEN, bearer
from test_watch_support import OTHER, PLATFORM, broker_on, client_of, error_info, filler_event, until, value

from broker import events, service
from broker.domain import model


def event(sequence: int, namespace: str = PLATFORM) -> model.DriftEvent:
    return model.DriftEvent(
        sequence=sequence,
        kind=model.EventKind.DRIFT_DETECTED,
        deployment_id=model.DeploymentId("dep-1"),
        namespace=model.Namespace(namespace),
        resource_type=model.ResourceType.DATABASE,
        resource_name=model.ResourceName("db"),
        event_time=datetime.datetime.now(datetime.UTC),
        message="m",
        phase=model.Phase.DRIFT_DETECTED,
        health=None,
        generation=1,
    )


async def test_an_event_buffered_in_the_step_the_heartbeat_timer_fires_is_still_delivered() -> None:
    """The race of issue 9: the timer and the event land in one event-loop step.

    Both callbacks are made due together by blocking the loop past both deadlines; the timeout's
    callback runs first (it was due first), then the event is buffered, then the waiting task
    resumes. The event must come out, and the resume position must not pass it meanwhile.
    """
    hub = events.EventHub()
    subscription = hub.subscribe(lambda e: True, limit=10)
    loop = asyncio.get_running_loop()
    waiting = asyncio.create_task(subscription.next(0.05))
    await asyncio.sleep(0)  # the task now waits with its timer armed
    loop.call_later(0.06, hub.publish, [event(7)])
    time.sleep(0.1)  # noqa: ASYNC251 - blocking on purpose: both deadlines pass before the loop runs again
    delivered = await waiting
    assert delivered is not None
    assert delivered.sequence == 7
    assert subscription.idle_position() == 7


async def test_a_heartbeat_never_carries_the_sequence_of_an_undelivered_event() -> None:
    hub = events.EventHub()
    subscription = hub.subscribe(lambda e: e.namespace == PLATFORM, limit=10)
    hub.publish([event(1, OTHER), event(2), event(3, OTHER)])
    assert subscription.idle_position() is None  # event 2 waits: no heartbeat may pass it
    delivered = await subscription.next(0.01)
    assert delivered is not None
    assert delivered.sequence == 2
    assert subscription.idle_position() == 3  # the filtered-out 3 is passed, nothing is skipped
    assert (await subscription.next(0.01)) is None


async def test_very_short_heartbeats_under_churn_lose_and_repeat_nothing(
    tmp_path: pathlib.Path, tokens_file: pathlib.Path
) -> None:
    """End to end: heartbeats every millisecond, events in small bursts, filtered and unfiltered
    subscribers, and one that keeps resuming from the last heartbeat it saw."""
    limits = service.WatchLimits(heartbeat_interval=0.001)
    async with (
        broker_on(tmp_path / "data", tokens_file, None, watch=limits) as broker,
        client_of(broker, ADMIN_TOKEN) as admin,
    ):
        mine = await admin.provision("mine")
        theirs = await admin.provision("theirs", OTHER)
        _, start = await broker.store.event_bounds()
        everything = admin.watch(after_sequence=start)
        filtered = admin.watch(after_sequence=start, namespaces=[PLATFORM])
        rng = random.Random(9)
        produced: list[tuple[int, str]] = []
        broker.store.listeners.append(
            lambda appended: produced.extend((e.sequence, e.namespace) for e in appended)
        )

        async def produce(count: int) -> None:
            for i in range(count):
                batch = [
                    filler_event(mine, i, name="mine", size=10)
                    if rng.random() < 0.5
                    else filler_event(theirs, i, name="theirs", namespace=OTHER, size=10)
                    for _ in range(rng.randint(1, 3))
                ]
                await broker.store.append_events(batch)
                await asyncio.sleep(rng.choice([0, 0, 0.001, 0.002]))

        # A subscriber that reconnects from its last heartbeat (never from its last event).
        resumed: list[int] = []

        async def resume_from_heartbeats() -> None:
            after = start
            while not finished.is_set() or after < max(s for s, n in produced if n == PLATFORM):
                w = admin.watch(after_sequence=after, namespaces=[PLATFORM])
                await asyncio.sleep(rng.uniform(0.01, 0.05))
                await w.close()
                beats = [h.sequence for h in w.of("heartbeat")]
                seen = w.sequences
                if beats:
                    last_beat = beats[-1]
                    # What arrived up to that heartbeat is kept; what came after is read again.
                    resumed.extend(s for s in seen if s <= last_beat)
                    after = last_beat

        finished = asyncio.Event()
        resumer = asyncio.create_task(resume_from_heartbeats())
        await produce(400)
        finished.set()
        final = produced[-1][0]
        await everything.reach(final)
        last_platform = max(s for s, n in produced if n == PLATFORM)
        await filtered.reach(last_platform)
        await asyncio.wait_for(resumer, 30)

        all_sequences = [s for s, _ in produced]
        platform = [s for s, n in produced if n == PLATFORM]
        assert everything.sequences == all_sequences
        assert filtered.sequences == platform
        assert resumed == platform
        assert len(everything.of("heartbeat")) > 0


async def test_a_subscriber_that_stopped_reading_is_cut_off_by_lag_in_seconds(
    tmp_path: pathlib.Path, tokens_file: pathlib.Path
) -> None:
    """A huge buffer, so only the time bound can cut: the transport fills up, the writes stall,
    and the subscriber is cut off within ``max_lag_seconds``, with the exact resume sequence."""
    # A bound well above what a reader that does read needs on a loaded machine.
    limits = service.WatchLimits(buffer=1_000_000, max_lag_seconds=3.0)
    async with (
        broker_on(tmp_path / "data", tokens_file, None, watch=limits) as broker,
        client_of(broker, ADMIN_TOKEN) as manager,
    ):
        deployment_id = await manager.provision("filler")
        _, start = await broker.store.event_bounds()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{broker.grpc_port}")
        stopped = broker_pb2_grpc.BrokerServiceStub(channel).WatchDrift(
            pb.WatchDriftRequest(after_sequence=start), metadata=bearer(ADMIN_TOKEN)
        )
        try:
            await until(lambda: value(len(broker.hub)), lambda n: n == 1, within=10, what="the subscriber")
            produced = start
            # 16 MB: more than HTTP/2 windows and socket buffers hold, far less than the buffer bound.
            while produced - start < 4_000:
                await broker.store.append_events(
                    [filler_event(deployment_id, i, size=4000) for i in range(50)]
                )
                produced += 50
                await asyncio.sleep(0)
            # Then nothing more happens: the old broker kept such a subscriber forever.
            await until(lambda: value(len(broker.hub)), lambda n: n == 0, within=20, what="the cut-off")

            received: list[int] = []

            async def read_all() -> None:
                async for message in stopped:
                    if message.WhichOneof("message") == "event":
                        received.append(message.event.sequence)

            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await read_all()
            err = caught.value
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            info = error_info(err)
            assert info.reason == "SUBSCRIBER_TOO_SLOW"
            resume = int(info.metadata["resume_after_sequence"])
            assert received == list(range(start + 1, resume + 1))  # the transport's share arrived, in order
            assert resume < produced

            rest = manager.watch(after_sequence=resume)
            await rest.reach(produced, within=60)
            assert received + rest.sequences == list(range(start + 1, produced + 1))
        finally:
            stopped.cancel()
            await channel.close()

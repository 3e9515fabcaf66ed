"""slow-consumer: a WatchDrift subscriber that never reads is cut off; the others are not slowed.

``normal`` subscribers read live streams. ``resources`` Kafka topics are provisioned and their
replication factor is then edited by hand through the sandbox's Kubernetes API, each edit to a
value that topic never had (the broker runs with ``--no-remediation``, so every edit the broker
sees is one DriftDetected/DriftChanged event naming the new value). Each edit's change-to-receive
latency is measured at every normal subscriber: from the API accepting the edit to the subscriber
receiving the event that names the value. Topics rather than StatefulSets: an edit costs the
sandbox no pods, so the events come several times faster.

First a baseline of ``baseline_flips`` edits. Then a slow subscriber opens a stream on its own
connection and never reads, and edits go on until ``slow_events`` more events are in the log: more
than a subscriber's buffer holds (1000, the broker's ``WatchLimits.buffer``) on top of what its
connection absorbs. That connection announces a 4 KiB HTTP/2 window without BDP probing, so the
broker's writes to it block after a few events; with gRPC's defaults the window grows to
megabytes and thousands of events would have to pass before the broker's buffer fills at all.
Broker RSS is sampled throughout.

Goals: the slow stream is cut off while it still does not read: the broker drops its subscription
(``broker_watch_subscribers`` on ``/metrics`` goes back to the normal ones) and ends its RPC (the
WatchDrift count with code RESOURCE_EXHAUSTED on ``/metrics`` rises); when the slow client finally
reads what reached it, the stream ends with RESOURCE_EXHAUSTED, ErrorInfo reason
SUBSCRIBER_TOO_SLOW and ``resume_after_sequence`` equal to the last event it got, from where a new
stream resumes without a gap; broker RSS grows by less than ``rss_bound_mb`` during the slow phase;
the normal subscribers receive every event (no gap, no duplicate). Figures: RSS growth, normal
subscribers' latency p50/p99 without and with the slow one, and the p99 ratio (reported, not
judged: it is a timing on a shared machine).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import pathlib
import re

import aiohttp
import grpc
from broker_client.v1 import broker_pb2 as pb
from broker_client.v1 import broker_pb2_grpc

from chaos import harness

NAME = "slow-consumer"
SLOW_CHANNEL_OPTIONS = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 4096)]
TOO_SLOW = "SUBSCRIBER_TOO_SLOW"


@dataclasses.dataclass
class Reader:
    """A normal subscriber: reads a live stream into (sequence, kind, deployment id, received at)."""

    stub: broker_pb2_grpc.BrokerServiceStub
    events: list[tuple[int, str, str, float]] = dataclasses.field(default_factory=list)
    start: int = -1  # the sequence of the first heartbeat: the stream has everything after it
    error: str = ""

    async def read(self, started: asyncio.Event) -> None:
        """Read until cancelled; ``started`` is set at the stream's first message (its heartbeat)."""
        call = self.stub.WatchDrift(pb.WatchDriftRequest())
        try:
            async for message in call:
                which = message.WhichOneof("message")
                if which == "heartbeat" and self.start < 0:
                    self.start = message.heartbeat.sequence
                    started.set()
                elif which == "event":
                    e = message.event
                    actual = next((i.actual for i in e.drift_items if i.field == "replicas"), "")
                    self.events.append((e.sequence, e.deployment_id, actual, harness.monotonic()))
        except grpc.aio.AioRpcError as e:
            self.error = f"{e.code().name}: {e.details()}"
        finally:
            call.cancel()

    def sequences(self, until: int) -> list[int]:
        """The sequences received, up to ``until``."""
        return [q for q, _, _, _ in self.events if q <= until]


@dataclasses.dataclass(frozen=True)
class Flip:
    """One change: a topic's replication factor set to a value it never had, when the API took it."""

    deployment_id: str
    replicas: int
    at: float


def latencies(flips: list[Flip], events: list[tuple[int, str, str, float]]) -> list[float]:
    """Change-to-receive seconds of each flip and subscriber that got an event naming its value.

    Every flip sets a new value, so the event reporting it (drift item ``replicas`` with that
    actual value) is unambiguous; flips the broker never saw on their own (the next one came
    first) have no event and no latency.
    """
    received: dict[tuple[str, str], list[float]] = {}
    for _, deployment_id, actual, at in events:
        received.setdefault((deployment_id, actual), []).append(at)
    return [
        at - flip.at for flip in flips for at in received.get((flip.deployment_id, str(flip.replicas)), [])
    ]


async def _metric(http: aiohttp.ClientSession, url: str, name: str, **labels: str) -> int:
    """The sum of the ``/metrics`` samples called ``name`` that carry ``labels`` (0 when none)."""
    async with http.get(f"{url}/metrics") as r:
        text = await r.text()
    total = 0.0
    for line in text.splitlines():
        sample, _, value = line.rpartition(" ")
        metric, _, label_text = sample.partition("{")
        if metric != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', label_text))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(value)
    return int(total)


async def _subscribers(http: aiohttp.ClientSession, url: str) -> int:
    return await _metric(http, url, "broker_watch_subscribers")


async def _cut_off_streams(http: aiohttp.ClientSession, url: str) -> int:
    """WatchDrift RPCs the broker finished with RESOURCE_EXHAUSTED (counted when the RPC ends)."""
    return await _metric(
        http, url, "broker_rpc_requests_total", method="WatchDrift", code="RESOURCE_EXHAUSTED"
    )


async def run(
    workdir: pathlib.Path,
    *,
    resources: int = 40,
    normal: int = 3,
    baseline_flips: int = 400,
    slow_events: int = 3000,
    flippers: int = 4,
    rss_bound_mb: float = 64.0,
    cut_off_within: float = 10.0,
    drain_within: float = 30.0,
) -> harness.Result:
    """Run the scenario; see the module docstring."""
    async with (
        harness.cluster(workdir, broker_args=["--no-remediation"]) as (sandbox, broker),
        harness.channel(broker.target) as channel,
        # Its own connection, as another manager's, with a small fixed flow-control window (4 KiB,
        # no BDP probing, which would grow it to megabytes): the broker's writes to it block after
        # a few events, so the buffer of 1000 behind them is what fills.
        grpc.aio.insecure_channel(broker.target, options=SLOW_CHANNEL_OPTIONS) as slow_channel,
        harness.http_session() as http,
    ):
        stub = broker_pb2_grpc.BrokerServiceStub(channel)
        kube = harness.Kube(sandbox.url, http)
        names = [f"slow-{i:03d}" for i in range(resources)]
        ids = {}
        for name in names:
            ids[name] = (await stub.Provision(harness.topic_request(name), timeout=30)).deployment_id
        ok, _ = await harness.poll(
            lambda: harness.resource_states(stub),
            lambda states: sum(s.health_status == pb.HEALTH_STATUS_HEALTHY for s in states) == resources,
            within=60,
        )
        if not ok:
            raise harness.ChaosError("resources not Healthy before the flips")

        replicas = dict.fromkeys(names, 1)
        order = itertools.count()
        rss_samples: list[int] = []

        async def flip(*, count: int = 0, until_events: int = 0, within: float = 300.0) -> list[Flip]:
            """Edits, ``flippers`` at a time, round robin over the topics: ``count`` of them, or
            until the log grew by ``until_events`` (bounded by ``within`` seconds)."""
            done: list[Flip] = []
            start = await harness.newest_sequence(stub)
            deadline = harness.monotonic() + within
            enough = asyncio.Event()

            async def flipper() -> None:
                while not enough.is_set() and harness.monotonic() < deadline:
                    if count and len(done) >= count:
                        enough.set()
                        return
                    name = names[next(order) % resources]
                    replicas[name] = want = replicas[name] + 1
                    await kube.set_topic_replicas(harness.NAMESPACE, name, want)
                    done.append(Flip(ids[name], want, harness.monotonic()))
                    rss_samples.append(broker.rss_bytes())

            async def counter() -> None:
                while until_events and not enough.is_set() and harness.monotonic() < deadline:
                    await asyncio.sleep(0.5)
                    if await harness.newest_sequence(stub) - start >= until_events:
                        enough.set()

            await asyncio.gather(counter(), *(flipper() for _ in range(flippers)))
            return done

        readers = [Reader(stub) for _ in range(normal)]
        started = [asyncio.Event() for _ in readers]
        tasks = [asyncio.create_task(r.read(s)) for r, s in zip(readers, started, strict=True)]
        slow_call: grpc.aio.UnaryStreamCall[pb.WatchDriftRequest, pb.WatchDriftResponse] | None = None
        try:
            await harness.settle(stub)
            for event in started:
                await asyncio.wait_for(event.wait(), timeout=30)
            baseline = await flip(count=baseline_flips)
            before_slow = await harness.settle(stub)

            # The slow one: opens its stream and does not read a single message.
            slow_call = broker_pb2_grpc.BrokerServiceStub(slow_channel).WatchDrift(pb.WatchDriftRequest())
            registered, _ = await harness.poll(
                lambda: _subscribers(http, broker.http_url), lambda n: n == normal + 1, within=30
            )
            rss_samples.clear()
            rss_before = broker.rss_bytes()
            slow = await flip(until_events=slow_events)
            newest = await harness.settle(stub)
            rss_peak = max([broker.rss_bytes(), *rss_samples])
            # Cut off while it still does not read: the broker forgets its subscription, and ends
            # its stream (the RPC counts as finished with RESOURCE_EXHAUSTED).
            dropped, subscribed = await harness.poll(
                lambda: _subscribers(http, broker.http_url), lambda n: n == normal, within=cut_off_within
            )
            ended, _ = await harness.poll(
                lambda: _cut_off_streams(http, broker.http_url), lambda n: n >= 1, within=cut_off_within
            )

            # Now it reads what reached it, and how its stream ended.
            slow_got: list[int] = []
            ending, reason, resume_after = "", "", ""

            async def drain() -> None:
                assert slow_call is not None
                async for message in slow_call:
                    if message.WhichOneof("message") == "event":
                        slow_got.append(message.event.sequence)

            try:
                await asyncio.wait_for(drain(), timeout=drain_within)
                ending = "OK"
            except TimeoutError:
                ending = "OPEN"
            except grpc.aio.AioRpcError as e:
                ending = e.code().name
                info = harness.error_info(e)
                if info is not None:
                    reason = info.reason
                    resume_after = info.metadata.get("resume_after_sequence", "")
            log = [e.sequence for e in await harness.drift_events(stub)]

            # A new stream resumes from the sequence the cut-off named, without a gap.
            resumed_ok = False
            counted_after_read = 0
            if resume_after.isdigit():
                resumed = await harness.catch_up(stub, after=int(resume_after), until=newest, within=30)
                first = slow_got[0] if slow_got else int(resume_after) + 1
                expected = [q for q in log if first <= q <= newest]
                resumed_ok = slow_got + [q for q in resumed if q <= newest] == expected
            # Sanity check of the metric read above: the drained stream has ended by now.
            counted_after_read = await _cut_off_streams(http, broker.http_url)
        finally:
            if slow_call is not None:
                slow_call.cancel()
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await t

    # The normal subscribers got every event of the log after their start, once and in order.
    incomplete = [
        i for i, r in enumerate(readers) if r.sequences(newest) != [q for q in log if r.start < q <= newest]
    ]
    events_normal = [e for r in readers for e in r.events]
    lat_base = latencies(baseline, events_normal)
    lat_slow = latencies(slow, events_normal)
    p50_base, p99_base = harness.percentile(lat_base, 0.5), harness.percentile(lat_base, 0.99)
    p50_slow, p99_slow = harness.percentile(lat_slow, 0.5), harness.percentile(lat_slow, 0.99)
    growth_mb = (rss_peak - rss_before) / 2**20
    slow_phase_events = sum(1 for q in log if before_slow < q <= newest)
    cut_off = ending == "RESOURCE_EXHAUSTED" and reason == TOO_SLOW
    resume_named = resume_after.isdigit() and (not slow_got or int(resume_after) == slow_got[-1])
    figures: dict[str, harness.Figure] = {
        "events_while_slow": slow_phase_events,
        "rss_growth_mb": round(growth_mb, 1),
        "p50_ms": f"{p50_base * 1000:.0f}->{p50_slow * 1000:.0f}",
        "p99_ms": f"{p99_base * 1000:.0f}->{p99_slow * 1000:.0f}",
        "p99_ratio": round(p99_slow / p99_base, 2) if p99_base > 0 else "n/a",
        "slow_received": len(slow_got),
        "slow_dropped_by_hub": "yes" if dropped else f"no({subscribed} subscribers)",
        "slow_ended_by_broker": "yes" if ended else "no",
        "slow_end": f"{ending}/{reason or '-'}",
        "resume_seq": resume_after or "-",
    }
    problems, notes = [], []
    if not registered:
        problems.append("the slow subscriber never showed up in broker_watch_subscribers")
    if not dropped:
        problems.append(
            f"the broker kept the non-reading subscriber ({subscribed} subscribers for {normal} readers)"
        )
    if not ended and cut_off and not counted_after_read:
        problems.append(
            "cannot tell when the stream ended: /metrics has no WatchDrift RESOURCE_EXHAUSTED count"
        )
    elif not ended:
        problems.append(
            "the broker did not end the non-reading subscriber's stream (no WatchDrift RPC finished "
            "with RESOURCE_EXHAUSTED while it stalled): its server-side stream stays open until it reads"
        )
    if not cut_off:
        problems.append(
            f"the slow stream ended with {ending}/{reason or 'no reason'} after {len(slow_got)} events, "
            f"not RESOURCE_EXHAUSTED/{TOO_SLOW}"
        )
    elif not resume_named:
        problems.append(
            f"resume_after_sequence={resume_after or 'absent'}, last event received "
            f"{slow_got[-1] if slow_got else 'none'}"
        )
    elif not resumed_ok:
        problems.append("resuming after the named sequence left a gap or repeated events")
    if growth_mb >= rss_bound_mb:
        problems.append(f"broker RSS grew {growth_mb:.0f} MB (bound {rss_bound_mb:g} MB)")
    if incomplete:
        problems.append(f"normal subscribers {incomplete} missed or repeated events")
    if any(r.error for r in readers):
        problems.append(f"normal streams ended: {[r.error for r in readers if r.error]}")
    notes.append(
        f"latency samples {len(lat_base)} without, {len(lat_slow)} with the slow subscriber "
        f"({len(baseline)} and {len(slow)} edits, {normal} subscribers; edits the broker coalesced have none)"
    )
    return harness.Result(NAME, figures, tuple(problems), tuple(notes))

"""resume-under-churn: WatchDrift subscribers that keep reconnecting miss nothing and see nothing twice.

``subscribers`` streams (no namespace filter: the insecure principal sees every namespace) each
read for a random ``reconnect_every`` seconds, drop the connection wherever it is, and reconnect
with ``after_sequence`` = the last sequence they saw (an event's, or a heartbeat's, which says
"everything up to here was sent"). Meanwhile drift churns: StatefulSets are scaled by hand through
the sandbox's Kubernetes API (field manager ``kubectl``), the broker detects and remediates, and
new resources are provisioned. At the end every subscriber catches up to the log's newest sequence,
and its received sequence is compared with the full log (ListDriftEvents, all pages).

Goals, per subscriber: 0 gaps (log events never received), 0 duplicates, 0 out of order, and each
received event equal (kind, deployment) to the log's event of that sequence.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import pathlib
import random

import grpc
from broker_client.v1 import broker_pb2 as pb
from broker_client.v1 import broker_pb2_grpc

from chaos import harness

NAME = "resume-under-churn"
EventKey = tuple[int, int, str]  # sequence, kind, deployment id


@dataclasses.dataclass
class Subscriber:
    """One manager that drops its stream now and then and resumes after its last sequence."""

    stub: broker_pb2_grpc.BrokerServiceStub
    rnd: random.Random
    received: list[EventKey] = dataclasses.field(default_factory=list)
    last: int = 0  # start with the whole log: after_sequence=0
    connections: int = 0
    server_ends: list[str] = dataclasses.field(default_factory=list)

    async def session(self, duration: float, *, until_sequence: int | None = None) -> None:
        """One connection, read for ``duration`` s (or until ``until_sequence``), then dropped."""
        self.connections += 1
        call = self.stub.WatchDrift(pb.WatchDriftRequest(after_sequence=self.last))

        async def read() -> None:
            async for message in call:
                which = message.WhichOneof("message")
                if which == "event":
                    e = message.event
                    self.received.append((e.sequence, int(e.kind), e.deployment_id))
                    self.last = max(self.last, e.sequence)
                elif which == "heartbeat":
                    self.last = max(self.last, message.heartbeat.sequence)
                if until_sequence is not None and self.last >= until_sequence:
                    return

        reader = asyncio.create_task(read())
        done, _ = await asyncio.wait({reader}, timeout=duration)
        call.cancel()
        if not done:
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await reader
            return
        error = reader.exception()
        if isinstance(error, grpc.aio.AioRpcError):
            # The broker ended the stream; a resumable end is fine, the next session resumes.
            self.server_ends.append(error.code().name)
        elif error is not None:
            raise error

    async def churn(self, stop: asyncio.Event, reconnect_every: tuple[float, float]) -> None:
        """Sessions of random length until ``stop``."""
        while not stop.is_set():
            await self.session(self.rnd.uniform(*reconnect_every))


def compare(received: list[EventKey], log: list[EventKey]) -> dict[str, int]:
    """Gaps, duplicates, out-of-order deliveries and content mismatches of one subscriber."""
    sequences = [s for s, _, _ in received]
    by_sequence = {s: (k, d) for s, k, d in log}
    return {
        "gaps": len(set(by_sequence) - set(sequences)),
        "dups": len(sequences) - len(set(sequences)),
        "disorder": sum(1 for a, b in itertools.pairwise(sequences) if b <= a),
        "mismatch": sum(1 for s, k, d in received if by_sequence.get(s, (k, d)) != (k, d)),
        "unknown": sum(1 for s in sequences if s not in by_sequence),
    }


async def run(
    workdir: pathlib.Path,
    *,
    subscribers: int = 5,
    duration: float = 60.0,
    reconnect_every: tuple[float, float] = (2.0, 10.0),
    resources: int = 12,
    new_during_churn: int = 8,
    scale_every: tuple[float, float] = (0.05, 0.4),
    catch_up_within: float = 60.0,
    seed: int = 2,
) -> harness.Result:
    """Run the scenario; see the module docstring."""
    rnd = random.Random(seed)  # noqa: S311 - picks fault moments, not secrets
    async with (
        harness.cluster(workdir) as (sandbox, broker),
        harness.channel(broker.target) as channel,
        harness.http_session() as http,
    ):
        stub = broker_pb2_grpc.BrokerServiceStub(channel)
        kube = harness.Kube(sandbox.url, http)
        subs = [Subscriber(stub, random.Random(seed * 100 + i)) for i in range(subscribers)]  # noqa: S311
        stop = asyncio.Event()
        churning = [asyncio.create_task(s.churn(stop, reconnect_every)) for s in subs]
        names = [f"churn-{i:02d}" for i in range(resources)]
        scales = 0
        try:
            for index, name in enumerate(names):
                await stub.Provision(harness.provision_request(name, index), timeout=30)
            end = harness.monotonic() + duration
            provision_at = sorted(rnd.uniform(0, duration) for _ in range(new_during_churn))
            start = harness.monotonic()
            while harness.monotonic() < end:
                if provision_at and harness.monotonic() - start >= provision_at[0]:
                    provision_at.pop(0)
                    name = f"churn-{len(names):02d}"
                    await stub.Provision(harness.provision_request(name, len(names)), timeout=30)
                    names.append(name)
                if await kube.scale(harness.NAMESPACE, rnd.choice(names), rnd.choice([2, 3, 4])):
                    scales += 1
                await asyncio.sleep(rnd.uniform(*scale_every))
        finally:
            stop.set()
            results = await asyncio.gather(*churning, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]

        # The log as it stands after the churn stopped; everyone catches up to its newest event.
        await asyncio.sleep(1.0)
        log = [(e.sequence, int(e.kind), e.deployment_id) for e in await harness.drift_events(stub)]
        newest = log[-1][0] if log else 0
        for s in subs:
            deadline = harness.monotonic() + catch_up_within
            while s.last < newest and harness.monotonic() < deadline:
                await s.session(max(0.1, deadline - harness.monotonic()), until_sequence=newest)

    totals = {"gaps": 0, "dups": 0, "disorder": 0, "mismatch": 0, "unknown": 0}
    for s in subs:
        for key, count in compare([r for r in s.received if r[0] <= newest], log).items():
            totals[key] += count
    behind = [i for i, s in enumerate(subs) if s.last < newest]
    reconnects = sum(s.connections for s in subs) - len(subs)
    server_ends = [end for s in subs for end in s.server_ends]
    figures: dict[str, harness.Figure] = {
        "subscribers": subscribers,
        "events": len(log),
        "reconnects": reconnects,
        "gaps": totals["gaps"],
        "dups": totals["dups"],
        "disorder": totals["disorder"],
        "mismatch": totals["mismatch"] + totals["unknown"],
        "scales": scales,
        "server_ends": len(server_ends),
    }
    problems, notes = [], []
    if errors:
        problems.append(f"subscriber errors: {errors[:3]}")
    if behind:
        problems.append(f"subscribers {behind} did not catch up to sequence {newest}")
    if any(totals.values()):
        problems.append(f"stream vs log: {totals}")
    if server_ends:
        notes.append(f"streams the broker ended, resumed: {sorted(set(server_ends))}")
    if len(log) < 2 * resources:
        problems.append(f"only {len(log)} events: the churn did not produce drift")
    if reconnects < 2 * subscribers:
        problems.append(f"only {reconnects} reconnects: the subscribers did not churn")
    return harness.Result(NAME, figures, tuple(problems), tuple(notes))

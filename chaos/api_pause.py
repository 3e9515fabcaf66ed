"""api-pause: while the cluster API refuses connections, the broker never claims Healthy, and what
changed behind its back meanwhile is reported once the API is back.

The sandbox runs in ``chaos.sandbox_host``, whose control port stays open while the API listener
is paused. ``resources`` resources are provisioned and Ready; a live WatchDrift subscriber listens.
Then the API is paused for ``pause_for`` seconds. During the pause each resource's StatefulSet is
scaled once (to a replica count of its own), through the control port, in the sandbox's store
directly, at moments spread over the pause; and GetResourceState is read all the time. Then the
API resumes.

Goals: the broker notices the pause within ``notice_within`` seconds (a reading says Unknown: the
honest answer), and once it has, no reading during the pause reports a resource Healthy; after
recovery, every change is reported (a DriftDetected, or DriftChanged, event whose replicas drift
item shows the new count) within ``report_within`` seconds (30, the product requirement).
No client can know of an outage before a request of its own fails: the readings before the first
Unknown are the time the broker took to notice, a figure, not a failure.
Figures: seconds until the pause was noticed; seconds from recovery to the last change reported;
Healthy readings during the pause after it was noticed.
"""

from __future__ import annotations

import asyncio
import contextlib
import pathlib

import aiohttp
import grpc
from broker_client.v1 import broker_pb2 as pb
from broker_client.v1 import broker_pb2_grpc

from chaos import harness

NAME = "api-pause"
REPORTED = (pb.DRIFT_EVENT_KIND_DRIFT_DETECTED, pb.DRIFT_EVENT_KIND_DRIFT_CHANGED)


async def _control(http: aiohttp.ClientSession, url: str, body: dict[str, object] | None = None) -> bool:
    """POST to the sandbox host's control port; whether the API was paused after it."""
    async with http.post(url, json=body or {}) as r:
        if r.status != 200:
            raise harness.ChaosError(f"{url}: {r.status} {await r.text()}")
        return bool((await r.json())["paused"])


async def run(
    workdir: pathlib.Path,
    *,
    resources: int = 6,
    pause_for: float = 60.0,
    report_within: float = 30.0,
    late_for: float = 70.0,
    read_every: float = 0.2,
    notice_within: float = 5.0,
) -> harness.Result:
    """Run the scenario; see the module docstring."""
    readings = {"healthy": 0, "unknown": 0, "other": 0, "failed_calls": 0, "healthy_before_noticed": 0}
    noticed_after: float | None = None
    reported: dict[str, float] = {}  # deployment id -> when its change was reported
    changed_while_paused = 0
    recovery = 0.0
    async with (
        harness.cluster(workdir, controlled=True, broker_args=["--no-remediation"]) as (sandbox, broker),
        harness.channel(broker.target) as channel,
        harness.http_session() as http,
    ):
        stub = broker_pb2_grpc.BrokerServiceStub(channel)
        names = [f"pause-{i}" for i in range(resources)]
        ids = {}
        for index, name in enumerate(names):
            reply = await stub.Provision(harness.provision_request(name, index), timeout=30)
            ids[name] = reply.deployment_id
        healthy, states = await harness.poll(
            lambda: harness.resource_states(stub),
            lambda states: sum(s.health_status == pb.HEALTH_STATUS_HEALTHY for s in states) == resources,
            within=60,
        )
        if not healthy:
            raise harness.ChaosError(f"resources not Healthy before the pause: {states}")
        target = {ids[name]: 2 + index for index, name in enumerate(names)}  # replicas per deployment

        call = stub.WatchDrift(pb.WatchDriftRequest())

        async def listen() -> None:
            async for message in call:
                if message.WhichOneof("message") != "event":
                    continue
                event = message.event
                if event.kind in REPORTED and event.deployment_id in target:
                    wanted = str(target[event.deployment_id])
                    if any(i.field == "replicas" and i.actual == wanted for i in event.drift_items):
                        reported.setdefault(event.deployment_id, harness.monotonic())

        listener = asyncio.create_task(listen())
        try:
            await _control(http, f"{sandbox.control_url}/pause")
            ok, _ = await harness.poll(
                lambda: harness.refuses_connections(sandbox.url), lambda refused: refused, within=10
            )
            if not ok:
                raise harness.ChaosError("the sandbox API still accepts connections after the pause")
            paused_at = harness.monotonic()
            change_at = [paused_at + pause_for * (i + 0.5) / resources for i in range(resources)]
            while harness.monotonic() < paused_at + pause_for:
                if change_at and harness.monotonic() >= change_at[0]:
                    change_at.pop(0)
                    name = names[resources - len(change_at) - 1]
                    body = {"namespace": harness.NAMESPACE, "name": name, "replicas": target[ids[name]]}
                    if await _control(http, f"{sandbox.control_url}/scale", body):
                        changed_while_paused += 1
                try:
                    states = await harness.resource_states(stub, deadline=5)
                except grpc.aio.AioRpcError:
                    readings["failed_calls"] += 1
                    states = []
                for s in states:
                    if s.health_status == pb.HEALTH_STATUS_UNKNOWN and noticed_after is None:
                        noticed_after = harness.monotonic() - paused_at
                    if s.health_status == pb.HEALTH_STATUS_HEALTHY:
                        readings["healthy" if noticed_after is not None else "healthy_before_noticed"] += 1
                    elif s.health_status == pb.HEALTH_STATUS_UNKNOWN:
                        readings["unknown"] += 1
                    else:
                        readings["other"] += 1
                await asyncio.sleep(read_every)
            await _control(http, f"{sandbox.control_url}/resume")
            recovery = harness.monotonic()
            await harness.poll(
                lambda: harness.value(len(reported)),
                lambda n: n == len(target),
                within=report_within + late_for,  # measure a late report too, up to a point
                interval=0.05,
            )
        finally:
            call.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await listener

    waited = report_within + late_for
    last_report = max(reported.values()) - recovery if len(reported) == resources else float("inf")
    figures: dict[str, harness.Figure] = {
        "pause_s": pause_for,
        "changes": f"{changed_while_paused}/{resources}",
        "reported": f"{len(reported)}/{resources}",
        "last_report_after_recovery_s": round(last_report, 2)
        if len(reported) == resources
        else f">{waited:g}",
        "noticed_after_s": round(noticed_after, 2) if noticed_after is not None else "never",
        "healthy_before_noticed": readings["healthy_before_noticed"],
        "healthy_during_pause": readings["healthy"],
        "unknown_during_pause": readings["unknown"],
    }
    problems, notes = [], []
    if readings["healthy"]:
        problems.append(
            f"{readings['healthy']} readings said Healthy while the API was paused, after the broker noticed"
        )
    if noticed_after is None:
        problems.append("no reading said Unknown during the pause")
    elif noticed_after > notice_within:
        problems.append(f"the pause was noticed after {noticed_after:.1f}s (required: {notice_within:g}s)")
    if changed_while_paused < resources:
        problems.append(f"only {changed_while_paused} changes were made while the API was paused")
    if len(reported) < resources:
        problems.append(
            f"{resources - len(reported)} of {resources} changes not reported within {waited:g}s of recovery"
        )
    elif last_report > report_within:
        problems.append(
            f"the last change was reported {last_report:.1f}s after recovery (required: {report_within:g}s)"
        )
    if readings["other"] or readings["failed_calls"]:
        notes.append(f"other health readings: {readings['other']}, failed reads: {readings['failed_calls']}")
    return harness.Result(NAME, figures, tuple(problems), tuple(notes))

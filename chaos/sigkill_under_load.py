"""sigkill-under-load: acknowledged Provisions survive SIGKILLs that land in the middle of the load.

``provisions`` Provisions with distinct names go out ``in_flight`` at a time. Whenever the number
acknowledged crosses one of ``kills`` random thresholds, the broker is SIGKILLed with calls in
flight, its data file is checked (``PRAGMA integrity_check``, ``foreign_key_check``), and it is
restarted on the same data directory and ports. A call that failed is retried with the same
request id, as a manager would, so a Provision that was committed but whose answer was lost gets
the first answer back instead of a second deployment.

Goals: every Provision that got an OK answer has its deployment afterwards (GetDeployment by id,
and GetResourceState lists it under its name): 0 lost; the data file is intact after every kill and
at the end; every deployment reaches Ready after the last restart within ``ready_within`` seconds.
"""

from __future__ import annotations

import asyncio
import collections
import pathlib
import random

import grpc
from broker_client.v1 import broker_pb2 as pb
from broker_client.v1 import broker_pb2_grpc

from chaos import harness

NAME = "sigkill-under-load"


async def run(
    workdir: pathlib.Path,
    *,
    provisions: int = 1000,
    in_flight: int = 64,
    kills: int = 3,
    load_within: float = 600.0,
    ready_within: float = 300.0,
    seed: int = 1,
) -> harness.Result:
    """Run the scenario; see the module docstring."""
    rnd = random.Random(seed)  # noqa: S311 - picks fault moments, not secrets
    acknowledged: dict[str, str] = {}  # resource name -> deployment id of the OK answer
    failures: collections.Counter[str] = collections.Counter()
    unacknowledged: list[str] = []
    integrity: list[str] = []
    in_flight_at_kill: list[int] = []
    restarts = 0
    calls = 0
    # Kill while the load runs: not so late that only a few calls are left in flight.
    low = max(1, provisions // 20)
    high = max(low + kills, min(provisions * 19 // 20, provisions - 2 * in_flight))
    thresholds = sorted(rnd.sample(range(low, high), kills))

    async with (
        harness.cluster(workdir, broker_args=["--ready-timeout", "900", "--shutdown-grace", "2"]) as (
            _,
            broker,
        ),
        harness.channel(broker.target) as channel,
    ):
        stub = broker_pb2_grpc.BrokerServiceStub(channel)
        todo = list(range(provisions))
        load_deadline = harness.monotonic() + load_within

        async def worker() -> None:
            nonlocal calls
            while todo:
                index = todo.pop(0)
                name = f"load-{index:04d}"
                request = harness.provision_request(name, index)
                while harness.monotonic() < load_deadline:
                    calls += 1
                    try:
                        reply = await stub.Provision(request, timeout=10)
                    except grpc.aio.AioRpcError as e:
                        failures[e.code().name] += 1
                        await asyncio.sleep(rnd.uniform(0.05, 0.3))
                        continue
                    finally:
                        calls -= 1
                    acknowledged[name] = reply.deployment_id
                    break
                else:
                    unacknowledged.append(name)

        async def acknowledged_at_least(count: int) -> None:
            await harness.poll(
                lambda: harness.value(len(acknowledged)),
                lambda n: n >= count,
                within=max(0.0, load_deadline - harness.monotonic()),
                interval=0.01,
            )

        async def killer() -> None:
            nonlocal restarts
            for threshold in thresholds:
                await acknowledged_at_least(threshold)
                await asyncio.sleep(rnd.uniform(0.0, 0.05))
                in_flight_at_kill.append(calls)
                await broker.sigkill()
                integrity.append(await asyncio.to_thread(harness.integrity_check, broker.db_path))
                await asyncio.sleep(rnd.uniform(0.1, 1.0))  # calls meanwhile fail: retried later
                await broker.start()
                restarts += 1

        await asyncio.gather(killer(), *(worker() for _ in range(in_flight)))

        # Every acknowledged deployment, by id and by name.
        lost: list[str] = []
        why: collections.Counter[str] = collections.Counter()  # how each loss showed
        check = asyncio.Semaphore(32)

        async def look_up(name: str, deployment_id: str) -> None:
            async with check:
                try:
                    reply = await stub.GetDeployment(
                        pb.GetDeploymentRequest(namespace=harness.NAMESPACE, deployment_id=deployment_id),
                        timeout=30,
                    )
                except grpc.aio.AioRpcError as e:
                    lost.append(name)
                    why[f"GetDeployment {e.code().name}"] += 1
                    return
                if reply.deployment.resource_name != name:
                    lost.append(name)
                    why["GetDeployment names another resource"] += 1

        await asyncio.gather(*(look_up(n, d) for n, d in acknowledged.items()))
        states = await harness.resource_states(stub)
        listed = {s.resource_name: s.deployment_id for s in states}
        unlisted = [n for n, d in acknowledged.items() if listed.get(n) != d and n not in lost]
        why["not in GetResourceState under its name and id"] += len(unlisted)
        lost += unlisted

        def ready_count(states: list[pb.ResourceState]) -> int:
            return sum(1 for s in states if s.phase == pb.STATE_READY and s.resource_name in acknowledged)

        _, states = await harness.poll(
            lambda: harness.resource_states(stub),
            lambda states: ready_count(states) >= len(acknowledged),
            within=ready_within,
            interval=1.0,
        )
        ready = ready_count(states)
        failed = sum(1 for s in states if s.phase == pb.STATE_FAILED)

    # The file as the last process left it (the cluster context SIGKILLed it on the way out).
    integrity.append(await asyncio.to_thread(harness.integrity_check, broker.db_path))
    integrity_ok = all(i == "ok" for i in integrity)
    figures: dict[str, harness.Figure] = {
        "lost": f"{len(lost)}/{len(acknowledged)}",
        "integrity": "ok" if integrity_ok else "BROKEN",
        "ready": f"{ready}/{len(acknowledged)}",
        "restarts": restarts,
        "acked": f"{len(acknowledged)}/{provisions}",
        "failed_calls_retried": sum(failures.values()),
        "in_flight_at_kills": ",".join(str(n) for n in in_flight_at_kill),
    }
    problems, notes = [], []
    if lost:
        problems.append(f"acknowledged but lost: {sorted(lost)[:5]}... ({dict(+why)})")
    if not integrity_ok:
        problems.append(f"integrity: {[i for i in integrity if i != 'ok']}")
    if unacknowledged:
        problems.append(f"{len(unacknowledged)} Provisions never acknowledged within {load_within:g}s")
    if ready < len(acknowledged):
        problems.append(f"{len(acknowledged) - ready} not Ready within {ready_within:g}s ({failed} Failed)")
    if restarts != kills:
        problems.append(f"{restarts} restarts of {kills} planned kills")
    if failures:
        notes.append(f"failed calls, retried with the same request id: {dict(failures)}")
    return harness.Result(NAME, figures, tuple(problems), tuple(notes))

"""failover: three replicas on one PostgreSQL lose their leader to SIGKILL and behave as one broker.

``replicas`` ``broker serve`` processes share one throwaway PostgreSQL (``tests/throwaway_postgres``,
Debian's server on loopback) with ``--store-url`` and campaign for one Lease with
``--leader-election`` (identities ``replica-0``...), next to one standalone sandbox. While
Provisions go to every replica in turn (a failed call is retried on the next replica with the same
request id, as a manager behind a Service would), StatefulSets are scaled by hand (field manager
``kubectl``) and WatchDrift subscribers read on every replica, the leader (the Lease's holder) is
SIGKILLed, ``kills`` times; each killed replica is started again as a follower once another leads.
A subscriber whose replica died resumes on another one with ``after_sequence`` = the last sequence
it saw.

At the moment of each kill a canary StatefulSet is scaled: only a detector that runs can report it,
so the time from the kill to its DriftDetected event (as the first subscriber receives it) is the
**takeover** time: a new leader holds the Lease and its detector works. ``lease_takeover`` is the
part until the Lease names another live replica (polled through the sandbox API).

Goals: takeover <= lease duration + 5 s each time (the issue's goal); 0 acknowledged Provisions
lost (GetDeployment by id and GetResourceState by name, on a surviving replica); 0 events lost,
duplicated, out of order or different from the log (ListDriftEvents) for every subscriber, wherever
it resumed; 0 double remediations (per scaled StatefulSet, at most one remediation that ran to its
end; a REMEDIATION_STARTED with no end is counted apart, as ``unclosed``: a kill in between, or a
backed-off retry that found the drift gone, which the remediator ends without an event);
every scaled StatefulSet back at its desired replicas in the cluster; every acknowledged Provision
Ready (through the API and in the cluster), the ones in flight at a kill included.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import importlib.util
import pathlib
import random
import statistics
import sys
from types import ModuleType
from typing import Any

import aiohttp
import grpc
from broker_client.v1 import broker_pb2 as pb
from broker_client.v1 import broker_pb2_grpc

from chaos import harness, resume_under_churn

NAME = "failover"
LEASE = "resource-broker"
EXTRA = 5.0  # the goal: takeover within the lease duration plus this

K = pb.DriftEventKind


def _throwaway_postgres() -> ModuleType:
    """``tests/throwaway_postgres.py``, the suite's PostgreSQL on loopback (tests/ is no package)."""
    path = harness.REPO / "tests" / "throwaway_postgres.py"
    spec = importlib.util.spec_from_file_location("throwaway_postgres", path)
    if spec is None or spec.loader is None:
        raise harness.ChaosError(f"cannot load {path}")
    module = sys.modules.get("throwaway_postgres") or importlib.util.module_from_spec(spec)
    if "throwaway_postgres" not in sys.modules:
        sys.modules["throwaway_postgres"] = module
        spec.loader.exec_module(module)
    return module


@dataclasses.dataclass
class Replica:
    """One ``broker serve`` of the group, its identity and its stub."""

    identity: str
    process: harness.BrokerProcess
    channel: grpc.aio.Channel | None = None
    stub: broker_pb2_grpc.BrokerServiceStub | None = None

    def connect(self) -> None:
        self.channel = harness.channel(self.process.target)
        self.stub = broker_pb2_grpc.BrokerServiceStub(self.channel)


class Group:
    """The replicas; calls go to the next live one, in turn."""

    def __init__(self, replicas: list[Replica]) -> None:
        self.replicas = replicas
        self._turn = 0

    def live(self) -> list[Replica]:
        return [r for r in self.replicas if r.process.running]

    def next(self, *, avoid: Replica | None = None) -> Replica:
        live = [r for r in self.live() if r is not avoid] or self.live()
        if not live:
            raise harness.ChaosError("no replica runs")
        self._turn += 1
        return live[self._turn % len(live)]

    def by_identity(self, identity: str) -> Replica | None:
        return next((r for r in self.replicas if r.identity == identity), None)


@dataclasses.dataclass
class Roamer:
    """A WatchDrift subscriber that resumes on another replica when its replica goes away."""

    group: Group
    home: Replica
    arrivals: dict[tuple[str, int], float]  # (deployment id, kind) -> first arrival, shared
    received: list[resume_under_churn.EventKey] = dataclasses.field(default_factory=list)
    last: int = 0
    sessions: int = 0
    moved: int = 0  # resumed on a replica other than the one whose stream ended
    ends: list[str] = dataclasses.field(default_factory=list)

    def _note(self, message: pb.WatchDriftResponse) -> None:
        which = message.WhichOneof("message")
        if which == "event":
            e = message.event
            self.received.append((e.sequence, int(e.kind), e.deployment_id))
            self.last = max(self.last, e.sequence)
            self.arrivals.setdefault((e.deployment_id, int(e.kind)), harness.monotonic())
        elif which == "heartbeat":
            self.last = max(self.last, message.heartbeat.sequence)

    async def follow(self, stop: asyncio.Event, *, until: int | None = None) -> None:
        """Read, resuming elsewhere whenever a stream ends, until ``stop`` (or sequence ``until``)."""
        replica = self.home
        while not stop.is_set() and (until is None or self.last < until):
            if not replica.process.running:
                replica = self.group.next(avoid=replica)
                self.moved += 1
            assert replica.stub is not None
            self.sessions += 1
            call = replica.stub.WatchDrift(pb.WatchDriftRequest(after_sequence=self.last))

            async def read(call: Any = call) -> None:
                async for message in call:
                    self._note(message)
                    if until is not None and self.last >= until:
                        return

            reader = asyncio.create_task(read())
            stopping = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait({reader, stopping}, return_when=asyncio.FIRST_COMPLETED)
            call.cancel()
            stopping.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await reader
            if (
                reader in done
                and not reader.cancelled()
                and isinstance(reader.exception(), grpc.aio.AioRpcError)
            ):
                error = reader.exception()
                assert isinstance(error, grpc.aio.AioRpcError)
                self.ends.append(error.code().name)
                await asyncio.sleep(0.1)
                if replica.process.running:
                    continue  # a resumable end on a live replica: resume there
                replica = self.group.next(avoid=replica)
                self.moved += 1


async def _lease_holder(http: aiohttp.ClientSession, url: str) -> str:
    path = f"{url}/apis/coordination.k8s.io/v1/namespaces/{harness.NAMESPACE}/leases/{LEASE}"
    try:
        async with http.get(path, timeout=aiohttp.ClientTimeout(total=5)) as r:
            if r.status != 200:
                return ""
            return str(((await r.json()).get("spec") or {}).get("holderIdentity") or "")
    except (aiohttp.ClientError, OSError, TimeoutError):
        return ""


async def _statefulset(http: aiohttp.ClientSession, url: str, name: str) -> dict[str, Any] | None:
    path = f"{url}/apis/apps/v1/namespaces/{harness.NAMESPACE}/statefulsets/{name}"
    async with http.get(path, timeout=aiohttp.ClientTimeout(total=10)) as r:
        if r.status != 200:
            return None
        body: dict[str, Any] = await r.json()
        return body


async def _call(group: Group, method: str, request: Any, *, within: float = 60.0) -> Any:
    """A unary call on the next live replica, retried on another while replicas die."""
    deadline = harness.monotonic() + within
    replica = group.next()
    while True:
        assert replica.stub is not None
        try:
            return await getattr(replica.stub, method)(request, timeout=10)
        except grpc.aio.AioRpcError as e:
            if e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise
            if harness.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)
            replica = group.next(avoid=replica)


def remediations(log: list[pb.DriftEvent], deployment_id: str) -> tuple[int, int]:
    """(completed, interrupted) remediations of one deployment's log, oldest first.

    A REMEDIATION_STARTED followed by SUCCEEDED or FAILED completed; one followed by another
    STARTED (or by nothing) was interrupted: a kill of the leader in between, or a backed-off retry
    that found the drift gone when its wait was over (the remediator then says nothing more).
    """
    completed = interrupted = 0
    open_start = False
    for e in log:
        if e.deployment_id != deployment_id:
            continue
        if e.kind == K.DRIFT_EVENT_KIND_REMEDIATION_STARTED:
            if open_start:
                interrupted += 1
            open_start = True
        elif e.kind in (K.DRIFT_EVENT_KIND_REMEDIATION_SUCCEEDED, K.DRIFT_EVENT_KIND_REMEDIATION_FAILED):
            if open_start:
                completed += 1
            open_start = False
    return completed, interrupted + (1 if open_start else 0)


async def run(
    workdir: pathlib.Path,
    *,
    replicas: int = 3,
    lease_duration: int = 15,
    renew_deadline: float = 10.0,
    retry_period: float = 2.0,
    kills: int = 2,
    workers: int = 3,
    pace: float = 0.5,
    warm_up: float = 10.0,
    between_kills: float = 10.0,
    after: float = 10.0,
    pool: int = 12,
    scale_every: float = 2.0,
    subscribers_per_replica: int = 2,
    takeover_within: float = 90.0,
    ready_within: float = 180.0,
    seed: int = 3,
) -> harness.Result:
    """Run the scenario; see the module docstring."""
    rnd = random.Random(seed)  # noqa: S311 - picks fault moments, not secrets
    throwaway = _throwaway_postgres()
    try:
        database = await asyncio.to_thread(throwaway.Cluster.start)
    except throwaway.Unusable as e:
        raise harness.ChaosError(f"no PostgreSQL: {e}") from e
    sandbox = harness.SandboxProcess(workdir)
    group = Group([])
    try:
        store_url = await asyncio.to_thread(database.new_store_url)
        await sandbox.start()
        async with harness.http_session() as http:
            kube = harness.Kube(sandbox.url, http)
            await kube.create_kafka_topic_crd()
            await kube.create_namespace(harness.NAMESPACE)
            for i in range(replicas):
                (workdir / f"replica-{i}").mkdir(parents=True, exist_ok=True)
                identity = f"replica-{i}"
                args = [
                    "--store-url",
                    store_url,
                    "--leader-election",
                    "--leader-election-namespace",
                    harness.NAMESPACE,
                    "--leader-election-identity",
                    identity,
                    "--leader-election-lease-duration",
                    str(lease_duration),
                    "--leader-election-renew-deadline",
                    f"{renew_deadline:g}",
                    "--leader-election-retry-period",
                    f"{retry_period:g}",
                    "--heartbeat-interval",
                    "1",
                    "--ready-timeout",
                    "900",
                    "--shutdown-grace",
                    "2",
                ]
                process = harness.BrokerProcess(
                    workdir / f"replica-{i}", kubeconfig=sandbox.kubeconfig, args=args
                )
                group.replicas.append(Replica(identity, process))
            # One after the other: they migrate the schema one after the other anyway.
            for replica in group.replicas:
                await replica.process.start()
                replica.connect()
            return await _scenario(
                group,
                kube=kube,
                http=http,
                sandbox_url=sandbox.url,
                rnd=rnd,
                lease_duration=lease_duration,
                kills=kills,
                workers=workers,
                pace=pace,
                warm_up=warm_up,
                between_kills=between_kills,
                after=after,
                pool=pool,
                scale_every=scale_every,
                subscribers_per_replica=subscribers_per_replica,
                takeover_within=takeover_within,
                ready_within=ready_within,
            )
    finally:
        for replica in group.replicas:
            if replica.channel is not None:
                await replica.channel.close()
            await replica.process.stop()
        await sandbox.stop()
        await asyncio.to_thread(database.stop)


async def _scenario(
    group: Group,
    *,
    kube: harness.Kube,
    http: aiohttp.ClientSession,
    sandbox_url: str,
    rnd: random.Random,
    lease_duration: int,
    kills: int,
    workers: int,
    pace: float,
    warm_up: float,
    between_kills: float,
    after: float,
    pool: int,
    scale_every: float,
    subscribers_per_replica: int,
    takeover_within: float,
    ready_within: float,
) -> harness.Result:
    identities = {r.identity for r in group.replicas}
    ok, holder = await harness.poll(
        lambda: _lease_holder(http, sandbox_url), lambda h: h in identities, within=60, interval=0.2
    )
    if not ok:
        raise harness.ChaosError("no replica took the leader lease within 60s")

    # The drift pool (one hand edit each) and the canaries (one per kill), Ready before the load.
    names = [f"pool-{i:02d}" for i in range(pool)] + [f"canary-{k}" for k in range(kills)]
    ids: dict[str, str] = {}
    for index, name in enumerate(names):
        reply = await _call(group, "Provision", harness.provision_request(name, index))
        ids[name] = reply.deployment_id

    async def all_ready(wanted: dict[str, str]) -> tuple[bool, set[str]]:
        states = await _call(
            group, "GetResourceState", pb.GetResourceStateRequest(namespace=harness.NAMESPACE, page_size=1000)
        )
        ready = {
            s.resource_name
            for s in states.resources
            if s.phase == pb.STATE_READY and wanted.get(s.resource_name) == s.deployment_id
        }
        return ready >= set(wanted), ready

    ok, _ = await harness.poll(lambda: all_ready(ids), lambda r: r[0], within=ready_within, interval=0.5)
    if not ok:
        raise harness.ChaosError(f"the pool was not Ready within {ready_within:g}s")

    arrivals: dict[tuple[str, int], float] = {}
    stop = asyncio.Event()
    roamers = [
        Roamer(group, replica, arrivals) for replica in group.replicas for _ in range(subscribers_per_replica)
    ]
    following = [asyncio.create_task(r.follow(stop)) for r in roamers]

    # Steady Provisions on every replica in turn.
    acknowledged: dict[str, str] = {}
    acked_at: dict[str, float] = {}
    retried: collections.Counter[str] = collections.Counter()
    counter = iter(range(1_000_000))

    async def provisioner() -> None:
        while not stop.is_set():
            index = next(counter)
            name = f"load-{index:04d}"
            request = harness.provision_request(name, index)
            replica = group.next()
            while not stop.is_set():
                assert replica.stub is not None
                try:
                    reply = await replica.stub.Provision(request, timeout=10)
                except grpc.aio.AioRpcError as e:
                    retried[e.code().name] += 1
                    await asyncio.sleep(0.2)
                    replica = group.next(avoid=replica)  # the same request id, elsewhere
                    continue
                acknowledged[name] = reply.deployment_id
                acked_at[name] = harness.monotonic()
                break
            await asyncio.sleep(pace * rnd.uniform(0.5, 1.5))

    # Hand edits: each pool StatefulSet scaled once (to 3), a few seconds apart.
    scaled: list[str] = []

    async def drifter() -> None:
        for name in names[:pool]:
            if stop.is_set():
                return
            if await kube.scale(harness.NAMESPACE, name, 3):
                scaled.append(name)
            await asyncio.sleep(scale_every * rnd.uniform(0.5, 1.5))

    load = [asyncio.create_task(provisioner()) for _ in range(workers)]
    drifting = asyncio.create_task(drifter())
    takeovers: list[float] = []
    lease_takeovers: list[float] = []
    in_flight_at_kill: set[str] = set()
    problems: list[str] = []
    first_kill = harness.monotonic() + warm_up
    try:
        await asyncio.sleep(warm_up)
        for k in range(kills):
            holder = await _lease_holder(http, sandbox_url)
            leader = group.by_identity(holder)
            if leader is None or not leader.process.running:
                raise harness.ChaosError(f"no live leader to kill (the lease names {holder!r})")
            in_flight_at_kill |= {
                n
                for n, d in acknowledged.items()
                if (d, K.DRIFT_EVENT_KIND_PROVISIONING_SUCCEEDED) not in arrivals
            }
            await leader.process.sigkill()
            killed_at = harness.monotonic()
            canary = f"canary-{k}"
            if not await kube.scale(harness.NAMESPACE, canary, 2):
                raise harness.ChaosError(f"cannot scale {canary}")
            ok, holder = await harness.poll(
                lambda: _lease_holder(http, sandbox_url),
                lambda h, dead=leader.identity: h in identities and h != dead,
                within=takeover_within,
                interval=0.1,
            )
            if ok:
                lease_takeovers.append(harness.monotonic() - killed_at)
            key = (ids[canary], int(K.DRIFT_EVENT_KIND_DRIFT_DETECTED))
            ok, _ = await harness.poll(
                lambda key=key: harness.value(key in arrivals), bool, within=takeover_within, interval=0.05
            )
            if not ok:
                problems.append(f"kill {k + 1}: no detector reported {canary} within {takeover_within:g}s")
                break
            takeovers.append(arrivals[key] - killed_at)
            # The killed replica comes back as a follower.
            await leader.process.start()
            await asyncio.sleep(between_kills if k + 1 < kills else after)
    finally:
        stop.set()
        await asyncio.gather(drifting, *load, return_exceptions=True)
        await asyncio.gather(*following, return_exceptions=True)

    # Everything acknowledged exists and gets Ready; every hand edit is undone in the cluster.
    lost: list[str] = []
    for name, deployment_id in acknowledged.items():
        try:
            reply = await _call(
                group,
                "GetDeployment",
                pb.GetDeploymentRequest(namespace=harness.NAMESPACE, deployment_id=deployment_id),
            )
        except grpc.aio.AioRpcError:
            lost.append(name)
            continue
        if reply.deployment.resource_name != name:
            lost.append(name)
    ok, (_, ready) = await harness.poll(
        lambda: all_ready(acknowledged), lambda r: r[0], within=ready_within, interval=1.0
    )
    not_ready = sorted(set(acknowledged) - ready)

    async def cluster_ready() -> list[str]:
        missing = []
        for name in acknowledged:
            sts = await _statefulset(http, sandbox_url, name)
            if sts is None or int((sts.get("status") or {}).get("readyReplicas") or 0) < 1:
                missing.append(name)
        return missing

    _, cluster_not_ready = await harness.poll(cluster_ready, lambda m: not m, within=60, interval=1.0)
    canaries = [f"canary-{k}" for k in range(len(takeovers))]

    async def undone() -> list[str]:
        wrong = []
        for name in scaled + canaries:
            sts = await _statefulset(http, sandbox_url, name)
            if sts is None or int(sts["spec"].get("replicas") or 0) != 1:
                wrong.append(name)
        return wrong

    _, still_drifted = await harness.poll(undone, lambda w: not w, within=ready_within, interval=1.0)

    # The log once quiet; every subscriber catches up to it, on whichever replica it ended.
    await harness.settle(group.next().stub, quiet=2.0, within=60)  # type: ignore[arg-type]
    log = await harness.drift_events(group.next().stub)  # type: ignore[arg-type]
    newest = log[-1].sequence if log else 0
    caught = asyncio.Event()
    await asyncio.gather(
        *(asyncio.wait_for(r.follow(caught, until=newest), timeout=60) for r in roamers),
        return_exceptions=True,
    )
    keys = [(e.sequence, int(e.kind), e.deployment_id) for e in log]
    totals = {"gaps": 0, "dups": 0, "disorder": 0, "mismatch": 0, "unknown": 0}
    for r in roamers:
        for what, count in resume_under_churn.compare(
            [x for x in r.received if x[0] <= newest], keys
        ).items():
            totals[what] += count
    behind = [i for i, r in enumerate(roamers) if r.last < newest]

    double = unclosed = 0
    doubled: list[str] = []
    for name in scaled + canaries:
        completed, interrupted = remediations(log, ids[name])
        double += max(0, completed - 1)
        unclosed += interrupted
        if completed > 1:
            story = [
                f"{e.sequence} {K.Name(e.kind).removeprefix('DRIFT_EVENT_KIND_')}: {e.message[:80]}"
                for e in log
                if e.deployment_id == ids[name]
            ]
            doubled.append(f"{name}: " + " | ".join(story))
    succeeded_at = {e.deployment_id: e for e in log if e.kind == K.DRIFT_EVENT_KIND_PROVISIONING_SUCCEEDED}
    in_flight_done = sum(1 for n in in_flight_at_kill if acknowledged[n] in succeeded_at and n in ready)
    ready_after = [
        arrivals[(d, int(K.DRIFT_EVENT_KIND_PROVISIONING_SUCCEEDED))] - acked_at[n]
        for n, d in acknowledged.items()
        if (d, int(K.DRIFT_EVENT_KIND_PROVISIONING_SUCCEEDED)) in arrivals
    ]
    # Before the first kill: whether the load is one the replicas keep up with (else every figure
    # grows with the backlog, takeover included).
    steady = [
        arrivals[(d, int(K.DRIFT_EVENT_KIND_PROVISIONING_SUCCEEDED))] - acked_at[n]
        for n, d in acknowledged.items()
        if (d, int(K.DRIFT_EVENT_KIND_PROVISIONING_SUCCEEDED)) in arrivals and acked_at[n] < first_kill - 5
    ]

    goal = lease_duration + EXTRA
    figures: dict[str, harness.Figure] = {
        "takeover_s": ",".join(f"{t:.1f}" for t in takeovers) or "-",
        "lease_takeover_s": ",".join(f"{t:.1f}" for t in lease_takeovers) or "-",
        "goal_s": goal,
        "lost": f"{len(lost)}/{len(acknowledged)}",
        "events_lost": totals["gaps"],
        "dups": totals["dups"],
        "disorder": totals["disorder"] + totals["mismatch"] + totals["unknown"],
        "double_remediations": double,
        "unclosed_remediations": unclosed,
        "drifts_undone": f"{len(scaled) + len(canaries) - len(still_drifted)}/{len(scaled) + len(canaries)}",
        "in_flight_finished": f"{in_flight_done}/{len(in_flight_at_kill)}",
        "ready": f"{len(ready & set(acknowledged))}/{len(acknowledged)}",
        "steady_ready_p50_s": statistics.median(steady) if steady else float("nan"),
        "ready_p50_s": statistics.median(ready_after) if ready_after else float("nan"),
        "ready_max_s": max(ready_after) if ready_after else float("nan"),
        "subscribers": len(roamers),
        "resumed_elsewhere": sum(r.moved for r in roamers),
        "events": len(log),
    }
    notes: list[str] = []
    if len(takeovers) < kills and not problems:
        problems.append(f"only {len(takeovers)} of {kills} takeovers measured")
    slow = [t for t in takeovers if t > goal]
    if slow:
        problems.append(f"takeover {', '.join(f'{t:.1f}s' for t in slow)} over the goal of {goal:g}s")
    if lost:
        problems.append(f"acknowledged but lost: {sorted(lost)[:5]}")
    if any(totals.values()):
        problems.append(f"subscribers vs the log: {totals}")
    if behind:
        problems.append(f"subscribers {behind} did not catch up to sequence {newest}")
    if double:
        problems.append(f"{double} double remediations: {'; '.join(doubled[:3])}")
    if still_drifted:
        problems.append(f"not back at desired replicas in the cluster: {still_drifted[:5]}")
    if not_ready or cluster_not_ready:
        problems.append(
            f"not Ready within {ready_within:g}s: {not_ready[:5]} (API), {cluster_not_ready[:5]} (cluster)"
        )
    if in_flight_done < len(in_flight_at_kill):
        problems.append(f"in flight at a kill and never finished: {len(in_flight_at_kill) - in_flight_done}")
    if len(scaled) < 2:
        problems.append(f"only {len(scaled)} hand edits: the scenario made no drift")
    if not any(r.moved for r in roamers):
        problems.append("no subscriber resumed on another replica")
    if retried:
        notes.append(f"Provisions retried on another replica: {dict(retried)}")
    return harness.Result(NAME, figures, tuple(problems), tuple(notes))

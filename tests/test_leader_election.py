"""Leader election with a Lease: who leads, when a leader stops, when another takes over.

Electors talk to the sandbox over real HTTP, some of them through a loopback TCP proxy that can
stop forwarding: a network partition of one replica, while the other still reaches the API. Times
are the test's event loop clock (the electors run on it); the assertions are about the order of
events (a leader's work stops, then the lease could expire, then another replica acquires it) and
about the Lease record, never about how fast anything is. Durations are short (lease 3 s, renew
deadline 2 s, retry period 0.25 s) to keep the suite quick; the semantics are client-go's at any
scale.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import pathlib
import re
import signal
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from conftest import ADMIN_TOKEN, cluster_settings
from kube_sandbox import kubeconfig as sandbox_kubeconfig_mod

from broker import callbacks, server
from broker.kube import client as kube_client
from broker.kube import lease

FAST = lease.Timing(lease_duration=3, renew_deadline=2, retry_period=0.25)
NAMESPACE = "default"
LEASE = "broker-test-leader"
MICRO_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


# ----- helpers ------------------------------------------------------------------------------------


async def eventually(check: Callable[[], object], *, within: float = 10.0, what: str) -> None:
    """Poll ``check`` (every 20 ms) until it is true; fail after ``within`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not check():
        if loop.time() > deadline:
            pytest.fail(f"timed out after {within:g}s waiting for {what}")
        await asyncio.sleep(0.02)


@dataclasses.dataclass
class Trace:
    """What every elector of a test did, in order, stamped with the event loop's clock."""

    events: list[tuple[float, str, str]] = dataclasses.field(default_factory=list)

    def add(self, identity: str, what: str) -> None:
        self.events.append((asyncio.get_running_loop().time(), identity, what))

    def times(self, identity: str, what: str) -> list[float]:
        return [t for t, who, w in self.events if who == identity and w == what]

    def when(self, identity: str, what: str) -> float:
        [at] = self.times(identity, what)
        return at

    def of(self, identity: str) -> list[str]:
        return [w for _, who, w in self.events if who == identity]


class Electors:
    """Runs electors for one test (each with its own API client) and stops what is left at the end."""

    def __init__(self, kubeconfig: pathlib.Path, trace: Trace) -> None:
        self.kubeconfig = kubeconfig
        self.trace = trace
        self._tasks: list[asyncio.Task[None]] = []
        self._clients: list[kube_client.Client] = []

    async def start(
        self,
        identity: str,
        *,
        kubeconfig: pathlib.Path | None = None,
        release: bool = True,
        timing: lease.Timing = FAST,
    ) -> tuple[lease.LeaderElector, asyncio.Task[None]]:
        client = await kube_client.Client.connect(kubeconfig or self.kubeconfig)
        self._clients.append(client)
        trace = self.trace

        async def work() -> None:
            trace.add(identity, "work started")
            try:
                await asyncio.Event().wait()
            finally:
                trace.add(identity, "work stopped")

        elector = lease.LeaderElector(
            client=client,
            namespace=NAMESPACE,
            name=LEASE,
            identity=identity,
            timing=timing,
            release_on_cancel=release,
            on_started_leading=lambda: trace.add(identity, "started leading"),
            on_stopped_leading=lambda reason: trace.add(identity, f"stopped leading: {reason}"),
        )
        task = asyncio.create_task(elector.run(work), name=f"elector-{identity}")
        self._tasks.append(task)
        return elector, task

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for client in self._clients:
            await client.close()


@pytest.fixture
async def electors(sandbox_kubeconfig: pathlib.Path) -> AsyncIterator[Electors]:
    running = Electors(sandbox_kubeconfig, Trace())
    try:
        yield running
    finally:
        await running.close()


async def stop(task: asyncio.Task[None]) -> None:
    """Cancel an elector's run and wait for it (a clean stop: it releases if configured to)."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


class LeaseHistory:
    """Every version of the Lease, from a watch on the sandbox: the sequence of records written."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.records: list[dict[str, Any]] = []
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        path = f"{self.url}/apis/coordination.k8s.io/v1/namespaces/{NAMESPACE}/leases"
        ready = asyncio.Event()

        async def watch() -> None:
            async with aiohttp.ClientSession() as http:
                async with http.get(path) as r:
                    version = (await r.json())["metadata"]["resourceVersion"]
                query = {
                    "watch": "true",
                    "resourceVersion": version,
                    "fieldSelector": f"metadata.name={LEASE}",
                }
                async with http.get(path, params=query, timeout=aiohttp.ClientTimeout(total=None)) as r:
                    ready.set()
                    async for line in r.content:
                        event = json.loads(line)
                        if event["type"] in ("ADDED", "MODIFIED"):
                            self.records.append(event["object"]["spec"])

        self._task = asyncio.create_task(watch())
        await asyncio.wait_for(ready.wait(), 5)

    def holders(self) -> list[str]:
        """The holders in order, each run of renewals by one holder counted once."""
        out: list[str] = []
        for record in self.records:
            if not out or out[-1] != record["holderIdentity"]:
                out.append(record["holderIdentity"])
        return out

    async def seen(self, *holders: str) -> None:
        """Wait until the watch has delivered these holders, in this order (it lags the writes)."""
        await eventually(lambda: self.holders() == list(holders), what=f"the lease to pass {holders}")

    def first_of(self, holder: str) -> dict[str, Any]:
        return next(r for r in self.records if r["holderIdentity"] == holder)

    def last_of(self, holder: str) -> dict[str, Any]:
        return [r for r in self.records if r["holderIdentity"] == holder][-1]

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


@pytest.fixture
async def history(sandbox) -> AsyncIterator[LeaseHistory]:
    watched = LeaseHistory(sandbox.url)
    await watched.start()
    try:
        yield watched
    finally:
        await watched.close()


class Partition:
    """A loopback TCP proxy in front of the sandbox; ``cut()`` swallows everything from then on.

    Requests through it hang rather than fail fast, the harder case for a leader: its renewal is
    still in flight when the renew deadline comes. ``heal()`` drops the connections that lost bytes.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.cut_off = False
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self._writers |= {writer, up_writer}
        try:
            await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer))
        except (ConnectionError, OSError):
            pass
        finally:
            for w in (writer, up_writer):
                self._writers.discard(w)
                w.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            if not self.cut_off:
                writer.write(data)
                await writer.drain()
        writer.close()

    def cut(self) -> None:
        self.cut_off = True

    def heal(self) -> None:
        self.cut_off = False
        for writer in list(self._writers):
            writer.close()

    async def close(self) -> None:
        self.heal()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@pytest.fixture
async def partition(sandbox, tmp_path: pathlib.Path) -> AsyncIterator[tuple[Partition, pathlib.Path]]:
    """A partitionable path to the sandbox and a kubeconfig that goes through it."""
    proxy = Partition(sandbox.port)
    await proxy.start()
    config = sandbox_kubeconfig_mod.write(
        tmp_path / "through-proxy.kubeconfig", server=f"http://127.0.0.1:{proxy.port}"
    )
    try:
        yield proxy, config
    finally:
        await proxy.close()


async def read_lease(sandbox_kubeconfig: pathlib.Path) -> dict[str, Any]:
    client = await kube_client.Client.connect(sandbox_kubeconfig)
    try:
        return await client.get("Lease", NAMESPACE, LEASE)
    finally:
        await client.close()


# ----- the elector --------------------------------------------------------------------------------


async def test_of_two_candidates_one_leads_and_renews_while_the_other_waits(
    electors, history, sandbox_kubeconfig
) -> None:
    a, _ = await electors.start("replica-a")
    await eventually(lambda: a.is_leader, what="a to lead")
    b, _ = await electors.start("replica-b")
    # Several renewals by a, each seen by b, who never leads meanwhile.
    await eventually(lambda: len(history.records) >= 5, what="a few renewals")
    assert a.is_leader
    assert not b.is_leader
    assert b.leader == "replica-a"
    assert history.holders() == ["replica-a"]
    assert electors.trace.of("replica-b") == []
    renewals = history.records[:5]
    assert len({r["renewTime"] for r in renewals}) == 5  # every renewal moved renewTime on
    assert {r["acquireTime"] for r in renewals} == {renewals[0]["acquireTime"]}
    assert {(r["leaseDurationSeconds"], r["leaseTransitions"]) for r in renewals} == {(3, 0)}
    assert all(MICRO_TIME.match(r["renewTime"]) and MICRO_TIME.match(r["acquireTime"]) for r in renewals)
    live = await read_lease(sandbox_kubeconfig)
    assert live["spec"]["holderIdentity"] == "replica-a"
    assert electors.trace.of("replica-a") == ["started leading", "work started"]


async def test_a_leader_stopped_without_release_is_replaced_only_after_its_lease_expires(
    electors, history
) -> None:
    a, a_task = await electors.start("replica-a", release=False)
    await eventually(lambda: a.is_leader, what="a to lead")
    b, _ = await electors.start("replica-b")
    await eventually(lambda: b.leader == "replica-a", what="b to see a's lease")
    await stop(a_task)  # as if the process died: nothing released
    last_renewal = a.renewed_at
    assert last_renewal is not None
    await eventually(lambda: b.is_leader, what="b to take over")
    # b acquired no earlier than a full lease duration after a's last renewal was sent.
    assert electors.trace.when("replica-b", "started leading") >= last_renewal + FAST.lease_duration
    await history.seen("replica-a", "replica-b")
    taken = history.first_of("replica-b")
    assert taken["leaseTransitions"] == history.last_of("replica-a")["leaseTransitions"] + 1 == 1
    assert taken["acquireTime"] == taken["renewTime"] > history.last_of("replica-a")["renewTime"]


async def test_a_candidate_tries_again_when_the_lease_it_saw_expires_not_a_jittered_retry_later(
    electors,
) -> None:
    # A retry period long next to the lease: client-go's next jittered retry after the expiry comes
    # up to 2.2 retry periods (5.3 s) later; this candidate wakes at the expiry itself.
    slow = lease.Timing(lease_duration=3, renew_deadline=2.9, retry_period=2.4)
    a, a_task = await electors.start("replica-a", release=False, timing=slow)
    await eventually(lambda: a.is_leader, what="a to lead")
    b, _ = await electors.start("replica-b", timing=slow)
    await eventually(lambda: b.leader == "replica-a", what="b to see a's lease")
    await stop(a_task)  # as if the process died: nothing released
    seen_last = b.observed_at
    while not b.is_leader:
        if b.leader == "replica-a":
            seen_last = b.observed_at  # when b first saw a's last renewal
        await asyncio.sleep(0.01)
    started = electors.trace.when("replica-b", "started leading")
    assert started >= seen_last + slow.lease_duration  # the lease was expired by b's clock
    assert started - (seen_last + slow.lease_duration) < 0.3


async def test_a_restarted_replica_takes_its_unreleased_lease_back_at_once(electors, history) -> None:
    first, first_task = await electors.start("replica-a", release=False)
    await eventually(lambda: first.is_leader, what="a to lead")
    await stop(first_task)
    last_renewal = first.renewed_at
    assert last_renewal is not None
    again, _ = await electors.start("replica-a")  # the same pod name after a restart
    await eventually(lambda: again.is_leader, what="a to lead again")
    [_, restarted] = electors.trace.times("replica-a", "started leading")
    assert restarted < last_renewal + FAST.lease_duration  # it did not wait for its own lease to expire
    taken_back = again.record
    assert taken_back is not None
    await eventually(
        lambda: any(r["renewTime"] == taken_back.renew_time for r in history.records),
        what="the watch to see the restarted replica's write",
    )
    assert history.holders() == ["replica-a"]
    assert {(r["acquireTime"], r["leaseTransitions"]) for r in history.records} == {
        (history.records[0]["acquireTime"], 0)
    }


async def test_a_partitioned_leader_stops_its_work_at_the_renew_deadline_before_the_other_takes_over(
    electors, history, partition
) -> None:
    proxy, through_proxy = partition
    a, _ = await electors.start("replica-a", kubeconfig=through_proxy)
    await eventually(lambda: a.is_leader, what="a to lead")
    b, _ = await electors.start("replica-b")
    await eventually(lambda: b.leader == "replica-a", what="b to see a's lease")
    proxy.cut()
    await eventually(lambda: b.is_leader, what="b to take over")
    last_renewal = a.renewed_at
    assert last_renewal is not None
    trace = electors.trace
    [stopped] = [
        t for t, who, what in trace.events if who == "replica-a" and what.startswith("stopped leading")
    ]
    # a kept trying until its deadline, not longer: its work had stopped before the lease could
    # expire for anyone, and b acquired only after that.
    assert last_renewal + FAST.renew_deadline <= trace.when("replica-a", "work stopped") <= stopped
    assert stopped < last_renewal + FAST.lease_duration <= trace.when("replica-b", "started leading")
    assert "renew deadline" in trace.of("replica-a")[-1]
    assert not a.is_leader
    # Healed, a finds b's lease and stays a follower.
    proxy.heal()
    await eventually(lambda: a.leader == "replica-b", what="a to see b's lease")
    assert not a.is_leader
    assert trace.of("replica-a") == [
        "started leading",
        "work started",
        "work stopped",
        "stopped leading: the lease could not be renewed within the renew deadline (2s)",
    ]
    await history.seen("replica-a", "replica-b")
    assert history.first_of("replica-b")["leaseTransitions"] == 1


async def test_with_the_api_paused_the_leader_stops_at_its_deadline_and_one_replica_leads_after(
    electors, sandbox
) -> None:
    a, _ = await electors.start("replica-a")
    await eventually(lambda: a.is_leader, what="a to lead")
    b, _ = await electors.start("replica-b")
    await eventually(lambda: b.leader == "replica-a", what="b to see a's lease")
    await sandbox.faults.pause()
    trace = electors.trace
    await eventually(lambda: not a.is_leader, what="a to stop leading")
    last_renewal = a.renewed_at
    assert last_renewal is not None
    [stopped] = [
        t for t, who, what in trace.events if who == "replica-a" and what.startswith("stopped leading")
    ]
    assert last_renewal + FAST.renew_deadline <= stopped < last_renewal + FAST.lease_duration
    await sandbox.faults.resume()
    await eventually(lambda: a.is_leader or b.is_leader, what="someone to lead again")
    await asyncio.sleep(4 * FAST.retry_period)
    assert [a.is_leader, b.is_leader].count(True) == 1
    # Whoever leads now started after a's work had stopped.
    starts = [t for t, _, what in trace.events if what == "started leading"]
    assert starts[-1] > trace.when("replica-a", "work stopped")


async def test_a_clean_stop_releases_the_lease_and_the_other_takes_over_without_waiting(
    electors, history
) -> None:
    a, a_task = await electors.start("replica-a")
    await eventually(lambda: a.is_leader, what="a to lead")
    b, b_task = await electors.start("replica-b")
    await eventually(lambda: b.leader == "replica-a", what="b to see a's lease")
    await stop(a_task)
    last_renewal = a.renewed_at
    assert last_renewal is not None
    trace = electors.trace
    assert trace.of("replica-a")[-2:] == ["work stopped", "stopped leading: shutting down"]
    assert a.transitions == {"acquired": 1, "lost": 0, "released": 1}
    await eventually(lambda: b.is_leader, what="b to take over")
    assert trace.when("replica-b", "started leading") < last_renewal + FAST.lease_duration
    await history.seen("replica-a", "", "replica-b")
    released = history.first_of("")
    assert released["leaseDurationSeconds"] == 1
    assert released["leaseTransitions"] == 0
    assert history.first_of("replica-b")["leaseTransitions"] == 1
    # And back: leaseTransitions counts every change of holder.
    a_again, _ = await electors.start("replica-a")
    await eventually(lambda: a_again.leader == "replica-b", what="a to see b's lease")
    await stop(b_task)
    await eventually(lambda: a_again.is_leader, what="a to lead again")
    await history.seen("replica-a", "", "replica-b", "", "replica-a")
    assert history.last_of("replica-a")["leaseTransitions"] == 2
    assert b.transitions == {"acquired": 1, "lost": 0, "released": 1}


def test_durations_that_could_let_two_leaders_overlap_are_refused() -> None:
    for lease_duration, renew_deadline, retry_period in ((10, 10, 2), (15, 10, 9), (1.5, 1, 0.2), (15, 0, 2)):
        with pytest.raises(ValueError, match="leader election"):
            lease.Timing(lease_duration, renew_deadline, retry_period)
    assert lease.Timing() == lease.Timing(15, 10, 2)  # client-go's defaults


def test_the_identity_is_the_pod_name_unless_set() -> None:
    settings = lease.ElectionSettings()
    assert settings.resolved_identity({"POD_NAME": "broker-7c9-x", "HOSTNAME": "h"}) == "broker-7c9-x"
    assert settings.resolved_identity({"HOSTNAME": "broker-7c9-y"}) == "broker-7c9-y"
    assert settings.resolved_identity({}).endswith(f"_{os.getpid()}")
    assert lease.ElectionSettings(identity="me").resolved_identity({"POD_NAME": "p"}) == "me"


# ----- the broker ---------------------------------------------------------------------------------


def elected(**overrides: Any) -> lease.ElectionSettings:
    return lease.ElectionSettings(
        enabled=True,
        namespace=NAMESPACE,
        lease_name=LEASE,
        lease_duration=FAST.lease_duration,
        renew_deadline=FAST.renew_deadline,
        retry_period=FAST.retry_period,
        **overrides,
    )


async def metric_values(http_url: str, token: str | None = ADMIN_TOKEN) -> dict[str, float]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as http, http.get(f"{http_url}/metrics", headers=headers) as r:
        assert r.status == 200
        text = await r.text()
    return {m[1]: float(m[2]) for m in re.finditer(r"^(broker_leader\S*) (\S+)$", text, re.M)}


async def test_without_leader_election_the_workers_run_at_once_and_broker_leader_is_1(cluster_broker) -> None:
    broker = cluster_broker.broker
    assert {"callback-dispatcher", "detector", "provisioner"} <= set(broker.supervisor.names)
    assert "leader-election" not in broker.supervisor.names
    values = await metric_values(cluster_broker.http_url)
    assert values["broker_leader"] == 1
    assert values['broker_leader_transitions_total{transition="acquired"}'] == 0


async def test_a_broker_that_loses_the_lease_keeps_serving_and_leads_again_when_it_can(
    tmp_path, tokens_file, partition, sandbox_kubeconfig
) -> None:
    proxy, through_proxy = partition
    settings = cluster_settings(
        tmp_path / "data", tokens_file, through_proxy, leader_election=elected(identity="broker-a")
    )
    broker = server.Broker(settings)
    await broker.start()
    try:
        url = f"http://127.0.0.1:{broker.http_port}"
        await eventually(lambda: broker.leader_only.running, what="the broker to lead")
        names = set(broker.supervisor.names)
        assert "leader-election" in names
        assert not names & {"callback-dispatcher", "detector", "provisioner"}  # they run in the term
        assert (await metric_values(url))["broker_leader"] == 1
        lease_now = await read_lease(sandbox_kubeconfig)
        assert lease_now["spec"]["holderIdentity"] == "broker-a"
        proxy.cut()
        await eventually(lambda: not broker.leader_only.running, what="the broker to stop leading")
        values = await metric_values(url)
        assert values["broker_leader"] == 0
        assert values['broker_leader_transitions_total{transition="lost"}'] == 1
        assert not broker.failed.is_set()
        assert broker.supervisor.failure is None
        proxy.heal()
        # Nobody else campaigns: the lease is still the broker's, and it leads again, workers restarted.
        await eventually(lambda: broker.leader_only.running, what="the broker to lead again")
        values = await metric_values(url)
        assert values["broker_leader"] == 1
        assert values['broker_leader_transitions_total{transition="acquired"}'] == 2
        assert broker.supervisor.failure is None
    finally:
        await broker.stop()
    released = await read_lease(sandbox_kubeconfig)
    assert released["spec"]["holderIdentity"] == ""


async def test_a_failing_leader_only_worker_stops_the_broker_and_releases_the_lease(
    tmp_path, tokens_file, sandbox_kubeconfig, monkeypatch
) -> None:
    async def bug(self: callbacks.Dispatcher) -> None:
        await asyncio.sleep(0.1)
        raise RuntimeError("a bug in the dispatcher")

    monkeypatch.setattr(callbacks.Dispatcher, "run", bug)
    settings = cluster_settings(
        tmp_path / "data", tokens_file, sandbox_kubeconfig, leader_election=elected(identity="broker-a")
    )
    broker = server.Broker(settings)
    await broker.start()
    try:
        await asyncio.wait_for(broker.failed.wait(), 10)
        assert broker.supervisor.failure is not None
        name, exc = broker.supervisor.failure
        assert name == "leader-election"
        assert "leader-only worker callback-dispatcher failed: RuntimeError: a bug in the dispatcher" in str(
            exc
        )
        await eventually(lambda: not broker.leader_only.running, what="the term to end")
        await eventually(lambda: broker.leader_only.elector.transitions["released"] == 1, what="the release")
    finally:
        await broker.stop()
    assert (await read_lease(sandbox_kubeconfig))["spec"]["holderIdentity"] == ""


async def test_broker_serve_requires_a_cluster_for_leader_election(tmp_path, tokens_file) -> None:
    settings = server.Settings(
        grpc_addr="127.0.0.1:0",
        http_addr="127.0.0.1:0",
        data_dir=tmp_path / "data",
        tokens_file=tokens_file,
        leader_election=elected(),
    )
    with pytest.raises(ValueError, match="--leader-election needs a cluster"):
        await server.Broker(settings).start()


class ServeProcess:
    """A real ``broker serve`` process with JSON logs read as they come."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process) -> None:
        self.name = name
        self.proc = proc
        self.lines: list[dict[str, Any]] = []
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        async for raw in self.proc.stderr:
            with contextlib.suppress(ValueError):
                self.lines.append(json.loads(raw))

    def messages(self) -> list[str]:
        return [line["message"] for line in self.lines]

    def first(self, message: str) -> dict[str, Any] | None:
        return next((line for line in self.lines if line["message"] == message), None)

    @property
    def http_url(self) -> str:
        serving = self.first("broker serving")
        assert serving is not None
        return f"http://{serving['http']}"

    async def stop(self) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(self.proc.wait(), 20)
        await asyncio.wait_for(self._reader, 5)
        return code


@pytest.mark.slow
async def test_two_broker_serve_processes_run_the_leader_only_workers_on_one_only(
    tmp_path, sandbox_kubeconfig
) -> None:
    async def serve(name: str) -> ServeProcess:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "broker",
            "--log-format",
            "json",
            "serve",
            "--insecure",
            "--grpc-addr",
            "127.0.0.1:0",
            "--http-addr",
            "127.0.0.1:0",
            "--data-dir",
            str(tmp_path / name),
            "--kubeconfig",
            str(sandbox_kubeconfig),
            "--drain-accept",
            "0.1",
            "--leader-election",
            "--leader-election-namespace",
            NAMESPACE,
            "--leader-election-lease-name",
            LEASE,
            "--leader-election-identity",
            name,
            "--leader-election-lease-duration",
            str(FAST.lease_duration),
            "--leader-election-renew-deadline",
            str(FAST.renew_deadline),
            "--leader-election-retry-period",
            str(FAST.retry_period),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        return ServeProcess(name, proc)

    a = await serve("broker-a")
    b: ServeProcess | None = None
    try:
        await eventually(lambda: a.first("leader-only workers started"), within=30, what="a to lead")
        b = await serve("broker-b")
        await eventually(lambda: b.first("broker serving"), within=30, what="b to serve")
        await eventually(
            lambda: any(line.get("leader") == "broker-a" for line in b.lines),
            within=10,
            what="b to see a lead",
        )
        assert (await metric_values(a.http_url, None))["broker_leader"] == 1
        assert (await metric_values(b.http_url, None))["broker_leader"] == 0
        # b serves while it follows: a provision is accepted, and its provisioner does not run.
        async with aiohttp.ClientSession() as http:
            body = {
                "namespace": "team-platform",
                "resourceType": "database",
                "resourceName": "orders-db",
                "spec": {"engine": "postgresql", "version": "15", "size": "small", "replicas": 1},
            }
            async with http.post(f"{b.http_url}/v1/provision", json=body) as r:
                assert r.status == 202, await r.text()
        assert await a.stop() == 0
        assert a.messages().index("released the leader lease") > a.messages().index(
            "leader-only workers stopped"
        )
        await eventually(lambda: b.first("operation started"), within=15, what="b to provision as the leader")
        messages = b.messages()
        assert messages.index("became the leader") < messages.index("leader-only workers started")
        assert messages.index("leader-only workers started") < messages.index("operation started")
        assert [line["identity"] for line in b.lines if line["message"] == "became the leader"] == [
            "broker-b"
        ]
        values = await metric_values(b.http_url, None)
        assert values["broker_leader"] == 1
        assert values['broker_leader_transitions_total{transition="acquired"}'] == 1
        assert "operation started" not in a.messages()
    finally:
        for proc in (a, b):
            if proc is not None and proc.proc.returncode is None:
                proc.proc.kill()
                await proc.proc.wait()
    assert b is not None

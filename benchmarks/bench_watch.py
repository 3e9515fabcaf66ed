"""WatchDrift: latency from a change in the sandbox to each subscriber, fan-out rate, memory per stream.

Not a test: it prints figures. Run with ``.venv/bin/python benchmarks/bench_watch.py`` (about 3
minutes on 2 cores; ``--help`` for the knobs).

Processes (each in its own, so subscriber CPU is not counted as server time; on 2 cores they still
share the machine):

* this process: the sandbox cluster (``Sandbox(ready_delay=0.05)``) and the driver, which makes the
  changes through the sandbox's HTTP API;
* the broker: ``server.Broker`` (insecure, remediation off, so every change stays reported drift;
  per-principal stream limit raised to 5,000 since all subscribers are one principal), see
  ``_common.spawn_broker``;
* the baseline: a bare ``grpc.aio`` server implementing the same generated ``WatchDrift`` method, a
  tiny servicer that puts each message it is told about into one ``asyncio.Queue`` per stream (the
  message: a copy of a real event the broker sent, so the sizes match);
* two subscriber processes, one per server, each holding that server's streams over
  ``--channels`` connections and recording ``time.time()`` when each event arrives (the same clock
  in every process of one machine).

A change: a merge PATCH of a managed StatefulSet's ``app.kubernetes.io/name`` label to a new value
(a token), timestamped just before the request. The broker sees it through its watch, finds label
drift, records it and streams ``DriftDetected``/``DriftChanged`` with the token in the drift item's
actual value. Changes go round-robin over ``--deployments`` resources, so no deployment is changed
twice within a second and no change is coalesced with the next. For the baseline, the driver writes
the token to the bare server's stdin, timestamped the same way; the baseline therefore has no
sandbox, watch, detection or SQLite commit in its path: it is the floor that fan-out alone costs.

Measured (subscriptions filtered to DriftDetected/DriftChanged in the namespace):

* memory per idle subscriber: server RSS before and after ``--many`` streams are open, each having
  received one event, divided by their number;
* ``--many`` (1,000) subscribers at ``--many-rate`` changes/s: latency of every delivery and of the
  last subscriber per change, p50/p99, broker vs bare, medians of ``--repeats`` runs;
* fan-out rate: ``--burst`` changes at once to ``--many`` subscribers, deliveries/s, and the server's
  CPU per delivery;
* ``--few`` (100) subscribers at ``--few-rate`` (100) changes/s, as above.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import gc
import json
import os
import pathlib
import shutil
import tempfile
import time
from typing import Any

import _common
import aiohttp
import bench_resource_state
import grpc
from broker_client.v1 import broker_pb2 as pb
from broker_client.v1 import broker_pb2_grpc

NAMESPACE = "bench-watch"
LABEL = "app.kubernetes.io/name"
WANTED_KINDS = (pb.DRIFT_EVENT_KIND_DRIFT_DETECTED, pb.DRIFT_EVENT_KIND_DRIFT_CHANGED)
GOAL_FEW_P99_MS = 25.0
GOAL_FEW_RATIO = 1.2  # issue 12: with 10,000 managed and a resync running
GOAL_MANY_RATIO = 1.3
GOAL_IDLE_KB = 50.0


def _token_of(event: pb.DriftEvent) -> str:
    """The token a change wrote, as the drift item's actual value carries it (empty if none)."""
    for item in event.drift_items:
        if item.field == "labels" and item.actual.startswith(f"{LABEL}="):
            return item.actual.split("=", 1)[1]
    return ""


# Subscribers (child process) --------------------------------------------------------------------------


class _Subscribers:
    """Streams to one server; when each token arrived on each stream."""

    def __init__(self) -> None:
        self.channels: list[grpc.aio.Channel] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.arrivals: dict[str, list[float]] = collections.defaultdict(list)
        self.recorded: dict[str, float] = {}  # token: the event_time the server gave its event
        self.warm: set[int] = set()
        self.sample = b""
        self.errors: list[str] = []

    async def open(self, target: str, count: int, channels: int) -> None:
        self.channels = [grpc.aio.insecure_channel(target) for _ in range(channels)]
        request = pb.WatchDriftRequest(namespaces=[NAMESPACE], kinds=WANTED_KINDS)
        for index in range(count):
            stub = broker_pb2_grpc.BrokerServiceStub(self.channels[index % channels])
            self.tasks.append(asyncio.create_task(self._stream(stub, request, index)))

    async def _stream(self, stub: Any, request: pb.WatchDriftRequest, index: int) -> None:
        arrivals, warm = self.arrivals, self.warm
        try:
            async for message in stub.WatchDrift(request):
                now = time.time()
                if message.WhichOneof("message") != "event" or message.event.kind not in WANTED_KINDS:
                    continue
                token = _token_of(message.event)
                if not token:
                    continue
                arrivals[token].append(now)
                if token not in self.recorded:
                    stamp = message.event.event_time
                    self.recorded[token] = stamp.seconds + stamp.nanos / 1e9
                if index not in warm:
                    warm.add(index)
                    if not self.sample:
                        self.sample = message.SerializeToString()
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED:
                self.errors.append(f"stream {index}: {e.code().name} {e.details()}")

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for channel in self.channels:
            await channel.close()
        self.tasks, self.channels = [], []
        self.arrivals.clear()
        self.recorded.clear()
        self.warm.clear()

    async def collect(self, sent: dict[str, float], within: float) -> dict[str, Any]:
        """Latencies of the tokens in ``sent`` (token: send time), once all arrived or time is up."""
        streams = len(self.tasks)
        deadline = time.monotonic() + within
        while any(len(self.arrivals.get(t, ())) < streams for t in sent):
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        every: list[float] = []
        last: list[float] = []
        to_record: list[float] = []  # change made -> event recorded by the server (its event_time)
        to_deliver: list[float] = []  # event recorded -> arrival, every delivery
        missing = 0
        first_arrival, last_arrival = float("inf"), 0.0
        for token, at in sent.items():
            got = self.arrivals.pop(token, [])
            every.extend(t - at for t in got)
            if token in self.recorded:
                recorded = self.recorded.pop(token)
                to_record.append(recorded - at)
                to_deliver.extend(t - recorded for t in got)
            missing += streams - len(got)
            if got:
                first_arrival, last_arrival = min(first_arrival, min(got)), max(last_arrival, max(got))
            if len(got) >= streams:
                last.append(max(got) - at)
        self.arrivals.clear()
        self.recorded.clear()
        pct = _common.percentile
        return {
            "deliveries": len(every),
            "missing": missing,
            "every_p50": pct(every, 50) * 1000,
            "every_p99": pct(every, 99) * 1000,
            "last_p50": pct(last, 50) * 1000,
            "last_p99": pct(last, 99) * 1000,
            "last_max": max(last, default=float("nan")) * 1000,
            "record_p50": pct(to_record, 50) * 1000,
            "record_p99": pct(to_record, 99) * 1000,
            "deliver_p50": pct(to_deliver, 50) * 1000,
            "deliver_p99": pct(to_deliver, 99) * 1000,
            "first_sent": min(sent.values()),
            "last_arrival": last_arrival,
            "errors": self.errors[:3],
        }


def _quiet_gc() -> None:
    """For the measuring processes (driver with sandbox, subscribers): collect now, then not at all.

    Their own full collections (100-200 ms with the sandbox's objects, measured) would otherwise
    show up as server latency. Called between runs; the servers under test are left alone.
    """
    gc.enable()
    gc.collect()
    gc.freeze()
    gc.disable()


async def _subscriber_child() -> None:
    subscribers = _Subscribers()
    reader = await _common.stdin_lines()
    _common.answer({"ready": True})
    while line := await reader.readline():
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "open":
            await subscribers.open(cmd["target"], cmd["count"], cmd["channels"])
            _common.answer({"opened": len(subscribers.tasks)})
        elif op == "warm":
            subscribers.arrivals.clear()
            _quiet_gc()
            _common.answer(
                {
                    "warm": len(subscribers.warm),
                    "sample": base64.b64encode(subscribers.sample).decode(),
                    "errors": subscribers.errors[:3],
                }
            )
        elif op == "collect":
            _common.answer(await subscribers.collect(cmd["sent"], cmd["within"]))
            _quiet_gc()
        elif op == "close":
            await subscribers.close()
            _common.answer({"closed": True})
    await subscribers.close()


# The bare fan-out server (child process) -----------------------------------------------------------------


class _BareFanOut(broker_pb2_grpc.BrokerServiceServicer):
    """WatchDrift and nothing else: every message goes into one queue per open stream."""

    def __init__(self) -> None:
        self.queues: set[asyncio.Queue[pb.WatchDriftResponse]] = set()

    async def WatchDrift(self, request: pb.WatchDriftRequest, context: grpc.aio.ServicerContext) -> Any:
        queue: asyncio.Queue[pb.WatchDriftResponse] = asyncio.Queue()
        self.queues.add(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            self.queues.discard(queue)

    def publish(self, message: pb.WatchDriftResponse) -> None:
        for queue in self.queues:
            queue.put_nowait(message)


async def _bare_child() -> None:
    from broker import server as broker_server

    pauses = _common.GcPauses()
    servicer = _BareFanOut()  # type: ignore[abstract]  # the other RPCs stay UNIMPLEMENTED
    grpc_server = grpc.aio.server(options=broker_server.GRPC_OPTIONS)
    broker_pb2_grpc.add_BrokerServiceServicer_to_server(servicer, grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    await grpc_server.start()
    _common.answer({"grpc_port": port})
    template = pb.WatchDriftResponse()
    reader = await _common.stdin_lines()
    try:
        while line := await reader.readline():
            cmd = json.loads(line)
            if cmd.get("op") == "stats":
                _common.answer({"gc": pauses.summary(), "rss": _common.rss_bytes(os.getpid())})
                continue
            if "template" in cmd:
                template = pb.WatchDriftResponse.FromString(base64.b64decode(cmd["template"]))
                continue
            message = pb.WatchDriftResponse()
            message.CopyFrom(template)
            message.event.sequence += 1
            message.event.event_time.FromNanoseconds(time.time_ns())
            for item in message.event.drift_items:
                if item.field == "labels":
                    item.actual = f"{LABEL}={cmd['token']}"
            servicer.publish(message)
    finally:
        await grpc_server.stop(0)


# The driver ---------------------------------------------------------------------------------------------


class _Server:
    """One server under test: how to make a change reach it, and its subscribers."""

    def __init__(self, label: str, pid: int, target: str, subscribers: _common.Child) -> None:
        self.label = label
        self.pid = pid
        self.target = target
        self.subscribers = subscribers
        self.results: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
        self.sample = b""  # one event as the subscribers received it
        self.round_trips: list[float] = []  # how long each change took to make (PATCH request to response)

    async def change(self, token: str, index: int) -> float:
        """Make one change; returns its timestamp (taken just before it is made)."""
        raise NotImplementedError

    async def open(self, count: int, channels: int, warmup_prefix: str) -> None:
        """Open ``count`` streams and wait until every one has received an event."""
        await self.subscribers.ask(
            {"op": "open", "target": self.target, "count": count, "channels": channels}
        )
        deadline = time.monotonic() + 120
        for attempt in range(10_000):
            await self.change(f"{warmup_prefix}{attempt:05d}", attempt)
            await asyncio.sleep(0.3)
            state = await self.subscribers.ask({"op": "warm"})
            if state["errors"]:
                raise RuntimeError(f"{self.label} streams failed: {state['errors']}")
            if state["warm"] >= count:
                self.sample = base64.b64decode(state["sample"])
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {state['warm']} of {count} {self.label} streams got an event")

    async def close(self) -> None:
        await self.subscribers.ask({"op": "close"})

    async def paced(self, prefix: str, count: int, rate: float) -> dict[str, Any]:
        """``count`` changes at ``rate``/s; returns the subscribers' latencies."""
        sent: dict[str, float] = {}
        self.round_trips = []
        meter = _common.CpuMeter({"server": self.pid, "subscribers": self.subscribers.pid})
        meter.start()
        started = time.monotonic()
        tasks = []
        for i in range(count):
            delay = started + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            token = f"{prefix}{i:05d}"
            tasks.append(asyncio.create_task(self._timed(token, i, sent)))
        await asyncio.gather(*tasks)
        achieved = count / (time.monotonic() - started)
        result = await self.subscribers.ask({"op": "collect", "sent": sent, "within": 60}, within=120)
        used = meter.stop()
        result["server_cpu"] = used["server"] / meter.wall * 100
        result["subscribers_cpu"] = used["subscribers"] / meter.wall * 100
        result["rate"] = achieved
        result["change_p50"] = _common.percentile(self.round_trips, 50) * 1000
        result["change_p99"] = _common.percentile(self.round_trips, 99) * 1000
        return result

    async def burst(self, prefix: str, count: int) -> dict[str, Any]:
        """``count`` changes at once; deliveries per second and server CPU per delivery."""
        sent: dict[str, float] = {}
        cpu_before = _common.cpu_seconds(self.pid)
        await asyncio.gather(*(self._timed(f"{prefix}{i:05d}", i, sent) for i in range(count)))
        result = await self.subscribers.ask({"op": "collect", "sent": sent, "within": 120}, within=180)
        result["cpu_s"] = _common.cpu_seconds(self.pid) - cpu_before
        span = result["last_arrival"] - result["first_sent"]
        result["per_s"] = result["deliveries"] / span if span > 0 else float("nan")
        result["cpu_us_per_delivery"] = result["cpu_s"] / max(1, result["deliveries"]) * 1e6
        return result

    async def _timed(self, token: str, index: int, sent: dict[str, float]) -> None:
        sent[token] = await self.change(token, index)


class _BrokerServer(_Server):
    def __init__(self, *args: Any, http: aiohttp.ClientSession, sandbox_url: str, names: list[str]) -> None:
        super().__init__(*args)
        self.http = http
        self.sandbox_url = sandbox_url
        self.names = names

    async def change(self, token: str, index: int) -> float:
        name = self.names[index % len(self.names)]
        url = f"{self.sandbox_url}/apis/apps/v1/namespaces/{NAMESPACE}/statefulsets/{name}"
        body = json.dumps({"metadata": {"labels": {LABEL: token}}})
        at = time.time()
        async with self.http.patch(
            url,
            data=body,
            params={"fieldManager": "bench-patch"},
            headers={"Content-Type": "application/merge-patch+json"},
        ) as response:
            if response.status != 200:
                raise RuntimeError(f"PATCH {name}: {response.status} {await response.text()}")
        self.round_trips.append(time.time() - at)
        return at


class _BareServer(_Server):
    def __init__(self, *args: Any, child: _common.Child) -> None:
        super().__init__(*args)
        self.child = child

    async def change(self, token: str, index: int) -> float:
        at = time.time()
        await self.child.send({"token": token})
        self.round_trips.append(time.time() - at)
        return at


async def _provision(grpc_target: str, names: list[str], db_path: pathlib.Path) -> float:
    import sqlite3

    started = time.monotonic()
    async with grpc.aio.insecure_channel(grpc_target) as channel:
        stub = broker_pb2_grpc.BrokerServiceStub(channel)
        for start in range(0, len(names), 32):
            await asyncio.gather(
                *(
                    stub.Provision(
                        pb.ProvisionRequest(
                            namespace=NAMESPACE,
                            resource_type=pb.RESOURCE_TYPE_DATABASE,
                            resource_name=name,
                            spec=pb.ResourceSpec(engine="postgresql", version="15", size="small", replicas=1),
                        )
                    )
                    for name in names[start : start + 32]
                )
            )
    db = sqlite3.connect(db_path, timeout=10)
    try:
        ready = "SELECT COUNT(*) FROM deployments WHERE phase = 'Ready' AND namespace = ?"
        while db.execute(ready, (NAMESPACE,)).fetchone()[0] < len(names):
            if time.monotonic() - started > 300:
                raise TimeoutError("the watch benchmark's deployments did not become Ready")
            await asyncio.sleep(0.25)
        # Wait for the detector's first verdict on each (health), so it stays quiet afterwards.
        judged = (
            "SELECT COUNT(*) FROM drift_state s JOIN deployments d ON d.deployment_id = s.deployment_id "
            "WHERE d.namespace = ?"
        )
        while db.execute(judged, (NAMESPACE,)).fetchone()[0] < len(names):
            if time.monotonic() - started > 300:
                raise TimeoutError("the detector did not evaluate the watch benchmark's deployments")
            await asyncio.sleep(0.25)
    finally:
        db.close()
    return time.monotonic() - started


def _fmt_ms(value: float) -> str:
    return f"{value:7.1f}"


async def _main(args: argparse.Namespace) -> None:
    from kube_sandbox import Sandbox, profiles

    tmp = pathlib.Path(tempfile.mkdtemp(prefix="bench-watch-"))
    print(f"bench_watch: work dir {tmp} (removed at exit without --keep)")
    # --managed: more databases the broker manages (in namespaces of their own), loaded in bulk
    # before it starts, as bench_resource_state does: what a sweep of them costs the streams.
    bulk = [(f"bench-bulk-{i // 1000:02d}", f"db-{i:05d}") for i in range(args.managed)]
    namespaces = (NAMESPACE, *sorted({ns for ns, _ in bulk}))
    sandbox = Sandbox(
        ready_delay=0.05,
        profile=profiles.platform(namespaces),
        # A bulk load must stay resumable for the broker's informers (as in bench_resource_state).
        watch_window=200_000 if bulk else 10_000,
        watch_window_bytes=1 << 31 if bulk else 32 << 20,
        watch_queue_size=200_000 if bulk else 10_000,
    )
    await sandbox.start()
    children: list[_common.Child] = []
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64))
    try:
        kubeconfig = sandbox.write_kubeconfig(tmp / "sandbox.kubeconfig")
        if bulk:
            took = await bench_resource_state.bulk_setup(sandbox, tmp / "data", bulk)
            await bench_resource_state.wait_until(
                "bulk pods ready", lambda: bench_resource_state.ready_pods(sandbox) >= len(bulk), within=300
            )
            print(f"setup: {len(bulk):,} more databases managed, loaded in bulk in {took:.0f} s")
        broker, grpc_port, _ = await _common.spawn_broker(
            _common.BrokerOptions(
                kubeconfig=str(kubeconfig),
                data_dir=str(tmp / "data"),
                remediate=False,
                streams_per_principal=5_000,
                profile=args.profile_broker,
                resync_interval=args.resync_interval,
            ),
            log_file=tmp / "broker.log",
        )
        children.append(broker)
        names = [f"db-{i:04d}" for i in range(args.deployments)]
        took = await _provision(f"127.0.0.1:{grpc_port}", names, tmp / "data" / "broker.db")
        print(f"setup: {len(names)} databases provisioned and Ready in {took:.0f} s")

        bare = await _common.Child.spawn("bare", __file__, "--child", "bare")
        children.append(bare)
        bare_port = (await bare.read())["grpc_port"]
        subs = []
        for name in ("broker-subscribers", "bare-subscribers"):
            child = await _common.Child.spawn(name, __file__, "--child", "subscribers")
            children.append(child)
            await child.read()
            subs.append(child)
        servers: list[_Server] = [
            _BrokerServer(
                "broker",
                broker.pid,
                f"127.0.0.1:{grpc_port}",
                subs[0],
                http=http,
                sandbox_url=sandbox.url,
                names=names,
            ),
            _BareServer("bare grpc.aio", bare.pid, f"127.0.0.1:{bare_port}", subs[1], child=bare),
        ]

        # The sandbox lives in this process, and its full collections stop it for 100-200 ms (measured),
        # which would show up as broker latency: no collections here while measuring.
        _quiet_gc()

        # Memory per idle subscriber, on servers that have not had streams before.
        memory: dict[str, float] = {}
        for server in servers:
            before = _common.rss_bytes(server.pid)
            started = time.monotonic()
            await server.open(args.many, args.channels, "w")
            await asyncio.sleep(1)
            memory[server.label] = (_common.rss_bytes(server.pid) - before) / args.many
            print(
                f"{server.label}: {args.many} streams open and warm in {time.monotonic() - started:.0f} s; "
                f"RSS {before / 1e6:.0f} MB -> {_common.rss_bytes(server.pid) / 1e6:.0f} MB"
            )
            if server.label == "broker":
                await bare.send({"template": base64.b64encode(server.sample).decode()})
                print(f"  event size: {len(server.sample)} bytes (the bare server sends a copy)")

        for rep in range(args.repeats):
            for server in servers:
                result = await server.paced(f"m{rep}x", args.many_count, args.many_rate)
                server.results["many"].append(result)
                _quiet_gc()
            print(f"  {args.many} subscribers, run {rep + 1}/{args.repeats} done", flush=True)
        for rep in range(args.burst_repeats):
            for server in servers:
                server.results["burst"].append(await server.burst(f"b{rep}x", args.burst))
                _quiet_gc()
            print(f"  burst {rep + 1}/{args.burst_repeats} done", flush=True)
        for server in servers:
            await server.close()
            await server.open(args.few, args.channels, "v")
        for rep in range(args.repeats):
            for server in servers:
                server.results["few"].append(await server.paced(f"f{rep}x", args.few_count, args.few_rate))
                _quiet_gc()
            print(f"  {args.few} subscribers, run {rep + 1}/{args.repeats} done", flush=True)
        gc_stats = {
            "broker": await broker.ask({"op": "stats"}),
            "bare grpc.aio": await bare.ask({"op": "stats"}),
        }
        _report(args, servers, memory, gc_stats)
    finally:
        await http.close()
        for child in reversed(children):
            await child.stop()
        await sandbox.stop()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


def _report(
    args: argparse.Namespace, servers: list[_Server], memory: dict[str, float], gc_stats: dict[str, Any]
) -> None:
    broker, bare = servers

    def med(server: _Server, scenario: str, key: str) -> float:
        return _common.median([r[key] for r in server.results[scenario]])

    def problems(server: _Server, scenario: str) -> str:
        missing = sum(r["missing"] for r in server.results[scenario])
        errors = [e for r in server.results[scenario] for e in r["errors"]]
        return f"  ({missing} deliveries MISSING {errors[:2]})" if missing or errors else ""

    for scenario, subscribers, rate, count in (
        ("few", args.few, args.few_rate, args.few_count),
        ("many", args.many, args.many_rate, args.many_count),
    ):
        print(
            f"\n{subscribers} subscribers, {count} changes at {rate:g}/s "
            f"(achieved {med(broker, scenario, 'rate'):.0f}/s), latency in ms, medians of {args.repeats} runs"
        )
        print(f"  {'':<16} {'every delivery':>19}   {'last subscriber per change':>30}")
        print(
            f"  {'':<16} {'p50':>9} {'p99':>9}   {'p50':>9} {'p99':>9} {'max':>9}   "
            "CPU % of a core: server, subscribers; p99 of each run (last)"
        )
        for server in servers:
            runs = _common.runs([r["last_p99"] for r in server.results[scenario]], "{:.1f}")
            print(
                f"  {server.label:<16} {med(server, scenario, 'every_p50'):>9.1f} "
                f"{med(server, scenario, 'every_p99'):>9.1f}   {med(server, scenario, 'last_p50'):>9.1f} "
                f"{med(server, scenario, 'last_p99'):>9.1f} {med(server, scenario, 'last_max'):>9.1f}   "
                f"{med(server, scenario, 'server_cpu'):>3.0f}, "
                f"{med(server, scenario, 'subscribers_cpu'):>3.0f}; {runs}" + problems(server, scenario)
            )
        print("  where the time goes (event_time: the server's stamp as it records or publishes the event):")
        print(
            f"    broker: change -> recorded p50 {med(broker, scenario, 'record_p50'):.1f} / p99 "
            f"{med(broker, scenario, 'record_p99'):.1f}; recorded -> delivered p50 "
            f"{med(broker, scenario, 'deliver_p50'):.1f} / p99 {med(broker, scenario, 'deliver_p99'):.1f}"
        )
        print(
            "            (of which the sandbox's PATCH request -> response p50 "
            f"{med(broker, scenario, 'change_p50'):.1f}"
            f" / p99 {med(broker, scenario, 'change_p99'):.1f})"
        )
        print(
            f"    bare:   told -> published p50 {med(bare, scenario, 'record_p50'):.1f} / p99 "
            f"{med(bare, scenario, 'record_p99'):.1f}; published -> delivered p50 "
            f"{med(bare, scenario, 'deliver_p50'):.1f} / p99 {med(bare, scenario, 'deliver_p99'):.1f}"
        )

    print(
        f"\nfan-out: {args.burst} changes at once to {args.many} subscribers, medians of {args.burst_repeats}"
    )
    for server in servers:
        print(
            f"  {server.label:<16} {med(server, 'burst', 'per_s'):>10,.0f} deliveries/s, last delivery after "
            f"{med(server, 'burst', 'last_max'):,.0f} ms, server CPU "
            f"{med(server, 'burst', 'cpu_us_per_delivery'):.0f} "
            f"us per delivery" + problems(server, "burst")
        )

    print("\nmemory per idle subscriber (RSS growth / streams)")
    for server in servers:
        print(f"  {server.label:<16} {memory[server.label] / 1024:>8.1f} KB")

    print("\ngarbage-collection pauses of the servers over the whole run")
    for server in servers:
        print(f"  {server.label:<16} {_common.describe_gc(gc_stats[server.label])}")

    few_p99 = med(broker, "few", "every_p99")
    few_ratio = few_p99 / med(bare, "few", "every_p99")
    many_ratio = med(broker, "many", "last_p99") / med(bare, "many", "last_p99")
    kb = memory["broker"] / 1024
    print("\ngoals")
    print(
        f"  p99 with {args.few} subscribers (every delivery)    {few_p99:>7.1f} ms   "
        f"goal <= {GOAL_FEW_P99_MS:g} ms: "
        f"{_common.verdict(few_p99 <= GOAL_FEW_P99_MS)}"
    )
    print(
        f"  p99 with {args.few} subscribers / bare fan-out's  {few_ratio:>7.2f}x   "
        f"goal <= {GOAL_FEW_RATIO:g}x"
        f" ({args.managed:,} more managed, resync every {args.resync_interval:g} s): "
        f"{_common.verdict(few_ratio <= GOAL_FEW_RATIO)}"
    )
    print(
        f"  {args.many} subscribers, last subscriber's p99   {many_ratio:>7.2f}x the bare fan-out's   "
        f"goal <= {GOAL_MANY_RATIO:g}x: {_common.verdict(many_ratio <= GOAL_MANY_RATIO)}"
    )
    print(
        f"  memory per idle subscriber                {kb:>7.1f} KB   goal <= {GOAL_IDLE_KB:g} KB: "
        f"{_common.verdict(kb <= GOAL_IDLE_KB)}"
    )
    print(
        "  fan-out: broker / bare deliveries/s        "
        f"{med(broker, 'burst', 'per_s') / med(bare, 'burst', 'per_s'):>7.2f}"
    )


def main() -> None:
    """Run the benchmark (or, with --child, one of its child processes)."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--deployments", type=int, default=200, help="resources the changes go round-robin over"
    )
    parser.add_argument(
        "--managed", type=int, default=0, help="more databases managed, in bulk (each resync sweeps them)"
    )
    parser.add_argument(
        "--resync-interval", type=float, default=60.0, help="the broker's full re-evaluation period (s)"
    )
    parser.add_argument("--few", type=int, default=100, help="subscribers in the first scenario")
    parser.add_argument("--few-rate", type=float, default=100.0, help="changes/s with --few subscribers")
    parser.add_argument("--few-count", type=int, default=1000, help="changes per run with --few subscribers")
    parser.add_argument("--many", type=int, default=1000, help="subscribers in the second scenario")
    parser.add_argument("--many-rate", type=float, default=10.0, help="changes/s with --many subscribers")
    parser.add_argument("--many-count", type=int, default=150, help="changes per run with --many subscribers")
    parser.add_argument("--burst", type=int, default=200, help="changes at once for the fan-out rate")
    parser.add_argument("--burst-repeats", type=int, default=1, help="fan-out rate runs")
    parser.add_argument("--channels", type=int, default=10, help="connections the subscribers use")
    parser.add_argument("--repeats", type=int, default=3, help="runs per latency scenario")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (broker log, database)")
    parser.add_argument(
        "--profile-broker", default="", metavar="FILE", help="run the broker under cProfile, stats to FILE"
    )
    parser.add_argument("--child", choices=["subscribers", "bare"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "subscribers":
        asyncio.run(_subscriber_child())
    elif args.child == "bare":
        asyncio.run(_bare_child())
    else:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_main(args))


if __name__ == "__main__":
    main()

"""GetResourceState and GET /v1/resources with 10k managed resources, and provisioning to Ready.

Not a test: it prints figures. Run with ``.venv/bin/python benchmarks/bench_resource_state.py``
(about 3-4 minutes on 2 cores; ``--help`` for the knobs).

Processes (each server and the load generator in its own process, so that client CPU is not
counted as server time; on 2 cores they still share the machine):

* this process: the sandbox cluster (``Sandbox(ready_delay=0.05)``, simulator on) and the driver;
* the broker: ``server.Broker`` on loopback (insecure, remediation off), see ``_common.spawn_broker``;
* the baselines: a bare ``grpc.aio`` server (an echo method, and ``GetResourceState`` answering
  with cached bytes: the broker's own answer to the same request, captured once) and a bare aiohttp
  server answering ``GET /v1/resources`` with the broker's cached JSON; same gRPC server options;
* the load generator: ``grpc.aio`` and aiohttp clients, N calls in flight, raw bytes in and out
  (no client-side protobuf/JSON parsing, so the client costs the same for every target).

Setup: ``--resources`` (10,000) managed databases in namespaces of ``--namespace-size`` (1,000).
``--provision`` of them (default 2,000) go through the real gRPC ``Provision`` API, concurrently,
while the broker already manages the others, and the time until all are Ready (phase in the
broker's store, read from another connection) is the provisioning figure. The rest are set up in
bulk before the broker starts: their desired state through the store's own methods (``provision``,
``start_operation``, ``finish_operation``, in a child process) and their objects (the broker's own
manifests, written with its field manager) loaded into the sandbox, whose simulator then creates
and readies their pods. ``--provision 10000`` provisions everything through the API instead (about
2.5 minutes for that alone, 4.5 in all). The broker's periodic full re-evaluation is moved out of
the runs (``--resync-interval 3600``; with ``--resync-interval 60 --idle-seconds 70`` the idle
line shows what one costs).

Measured, each repetition running every target once (interleaved), medians of ``--repeats``:

* QPS and p50/p99 with ``--concurrency`` (16) calls in flight for one resource (namespace, type
  and name: the seed's query), and with ``--namespace-concurrency`` (4) for a whole 1,000-resource
  namespace (``page_size=1000``), over gRPC and the gateway, next to the echo and cached-bytes
  servers; and the server's CPU time per call, less its idle CPU (steadier than QPS on a shared
  machine);
* the unloaded latency of the one-resource query (one call in flight), p50/p99;
* provisioning: accept time, time to all Ready, rate, and the CPU each process used meanwhile;
* the broker's RSS and its full garbage collections (which stop it) per phase.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import math
import os
import pathlib
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import _common
import aiohttp
import grpc
from aiohttp import web
from broker_client.v1 import broker_pb2 as pb

GRPC_METHOD = "/broker.v1.BrokerService/GetResourceState"
ECHO_METHOD = "/bench.v1.EchoService/Echo"
MAX_MESSAGE = 64 * 1024 * 1024
CLIENT_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE)]
# The goals of issue 12, as ratios to the baselines of the same run where they can be.
GOAL_PROVISION_S = 60.0  # 10,000 provisions to Ready
GOAL_RSS_KB = 10.0  # broker RSS per managed resource
GOAL_STARTUP_S = 5.0  # start-up with 10,000 managed until listed and evaluated
GOAL_ONE_QPS = 0.6  # one resource: broker / echo QPS
GOAL_P99_RATIO = 1.5  # one resource, 16 in flight: broker p99 / echo p99
GOAL_NAMESPACE_QPS = 0.5  # namespace of 1,000: broker / cached bytes QPS
GOAL_GATEWAY_QPS = 0.5  # gateway / gRPC QPS
READY_MESSAGE = "Database is running and healthy"  # what the provisioner records for a ready database


def _namespace(i: int, size: int) -> str:
    return f"bench-{i // size:02d}"


def _name(i: int) -> str:
    return f"db-{i:05d}"


# Load generator (child process) ------------------------------------------------------------------------


async def _grpc_load(cmd: dict[str, Any]) -> dict[str, Any]:
    request = base64.b64decode(cmd["request"])
    latencies: list[float] = []
    size = 0
    async with grpc.aio.insecure_channel(cmd["target"], options=CLIENT_OPTIONS) as channel:
        call = channel.unary_unary(cmd["method"])  # bytes in, bytes out: no client-side parsing
        for _ in range(cmd["warmup"]):
            await call(request)
        remaining = cmd["count"]

        async def worker() -> None:
            nonlocal remaining, size
            while remaining > 0:
                remaining -= 1
                started = time.perf_counter()
                reply = await call(request)
                latencies.append(time.perf_counter() - started)
                size = len(reply)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(cmd["concurrency"])))
        elapsed = time.perf_counter() - started
    return _load_result(latencies, elapsed, size)


async def _http_load(cmd: dict[str, Any]) -> dict[str, Any]:
    latencies: list[float] = []
    size = 0
    connector = aiohttp.TCPConnector(limit=cmd["concurrency"])
    async with aiohttp.ClientSession(connector=connector) as http:

        async def get() -> int:
            async with http.get(cmd["url"]) as response:
                body = await response.read()
                if response.status != 200:
                    raise RuntimeError(f"GET {cmd['url']}: {response.status} {body[:200]!r}")
                return len(body)

        for _ in range(cmd["warmup"]):
            await get()
        remaining = cmd["count"]

        async def worker() -> None:
            nonlocal remaining, size
            while remaining > 0:
                remaining -= 1
                started = time.perf_counter()
                size = await get()
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(cmd["concurrency"])))
        elapsed = time.perf_counter() - started
    return _load_result(latencies, elapsed, size)


def _load_result(latencies: list[float], elapsed: float, size: int) -> dict[str, Any]:
    return {
        "qps": len(latencies) / elapsed,
        "p50_ms": _common.percentile(latencies, 50) * 1000,
        "p99_ms": _common.percentile(latencies, 99) * 1000,
        "bytes": size,
    }


async def _provision_load(cmd: dict[str, Any]) -> dict[str, Any]:
    """Provision every (namespace, name) through the real stub, ``concurrency`` calls in flight."""
    return await _common.provision_over([cmd["target"]], cmd["resources"], cmd["concurrency"])


async def _load_child() -> None:
    reader = await _common.stdin_lines()
    _common.answer({"ready": True})
    while line := await reader.readline():
        cmd = json.loads(line)
        handler = {"grpc": _grpc_load, "http": _http_load, "provision": _provision_load}[cmd["op"]]
        _common.answer(await handler(cmd))


# Baseline servers (child process) ---------------------------------------------------------------------


async def _baseline_child() -> None:
    """A bare grpc.aio server (echo; cached GetResourceState bytes) and a bare aiohttp server."""
    from broker import server as broker_server

    grpc_cache: dict[bytes, bytes] = {}
    http_cache: dict[str, bytes] = {}

    async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return request

    async def cached(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return grpc_cache[request]

    handlers = [
        grpc.method_handlers_generic_handler(
            "bench.v1.EchoService", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
        ),
        grpc.method_handlers_generic_handler(
            "broker.v1.BrokerService", {"GetResourceState": grpc.unary_unary_rpc_method_handler(cached)}
        ),
    ]
    grpc_server = grpc.aio.server(options=broker_server.GRPC_OPTIONS, handlers=handlers)
    grpc_port = grpc_server.add_insecure_port("127.0.0.1:0")
    await grpc_server.start()

    async def resources(request: web.Request) -> web.Response:
        return web.Response(body=http_cache[request.query_string], content_type="application/json")

    app = web.Application()
    app.router.add_get("/v1/resources", resources)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    http_port = runner.addresses[0][1]
    _common.answer({"grpc_port": grpc_port, "http_port": http_port})
    reader = await _common.stdin_lines()
    try:
        while line := await reader.readline():
            cmd = json.loads(line)
            if cmd["op"] == "cache_grpc":
                grpc_cache[base64.b64decode(cmd["request"])] = base64.b64decode(cmd["response"])
            else:
                http_cache[cmd["query"]] = base64.b64decode(cmd["body"])
            _common.answer({"ok": True})
    finally:
        await grpc_server.stop(0)
        await runner.cleanup()


# Setup ------------------------------------------------------------------------------------------------


async def _bulk_store_child() -> None:
    """Child: write the desired state of resources into a broker store, streaming their manifests.

    The desired state goes through the store's own methods, as the broker writes it; the manifests
    are the broker's own. Run in a process of its own so the store's writes overlap with the
    sandbox's simulator, which creates the pods in the parent meanwhile.
    """
    from broker.domain import catalog as catalog_mod
    from broker.domain import model, validation
    from broker.kube import manifests
    from broker.store import sqlite as store_mod

    reader = await _common.stdin_lines()
    cmd = json.loads(await reader.readline())
    catalog = catalog_mod.DEFAULT_CATALOG
    kinds = (
        ("v1", "Secret", manifests.secret),
        ("v1", "Service", manifests.service),
        ("apps/v1", "StatefulSet", manifests.statefulset),
    )
    store = await store_mod.Store.open(pathlib.Path(cmd["data_dir"]))
    try:
        batch: list[model.Deployment] = []
        for index, (namespace, name) in enumerate(cmd["resources"]):
            command = validation.provision_command(
                namespace=namespace,
                resource_type=model.ResourceType.DATABASE,
                resource_name=name,
                spec=model.ResourceSpec(engine="postgresql", version="15", size="small", replicas=1),
                callback_url="",
                request_id="",
                catalog=catalog,
            )
            result = await store.provision(command)
            deployment = await store.deployment_by_id(result.deployment_id)
            assert deployment is not None
            in_progress = await store.start_operation(deployment)
            assert in_progress is not None
            await store.finish_operation(
                in_progress, succeeded=True, message=READY_MESSAGE, event=None, callback=None
            )
            batch.append(in_progress)
            if len(batch) == 250 or index == len(cmd["resources"]) - 1:
                _common.answer({"batch": [[v, k, [make(d, catalog) for d in batch]] for v, k, make in kinds]})
                batch = []
    finally:
        await store.close()
    _common.answer({"done": True})


async def bulk_setup(sandbox: Any, data_dir: pathlib.Path, resources: list[tuple[str, str]]) -> float:
    """Managed resources the broker finds at start-up: desired state in its store, objects in the sandbox.

    The objects are written with the broker's field manager, as if the broker had applied them.
    """
    from broker.kube import client as kube_client

    started = time.perf_counter()
    child = await _common.Child.spawn("bulk", __file__, "--child", "bulk")
    try:
        await child.send({"data_dir": str(data_dir), "resources": resources})
        while "batch" in (message := await child.read(within=600)):
            for api_version, kind, objects in message["batch"]:
                rt = sandbox.store.registry.by_kind(api_version=api_version, kind=kind)
                sandbox.store.bulk_load(rt, objects, manager=kube_client.FIELD_MANAGER)
                await asyncio.sleep(0)  # let the simulator's controllers run
    finally:
        await child.stop()
    return time.perf_counter() - started


def ready_pods(sandbox: Any) -> int:
    count = 0
    for pod in sandbox.store.objects(("", "pods")):
        status = pod.get("status") or {}
        if status.get("phase") == "Running" and any(
            c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or []
        ):
            count += 1
    return count


async def wait_until(what: str, check: Callable[[], bool], *, within: float, interval: float = 0.5) -> float:
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > within:
            raise TimeoutError(f"{what} did not happen within {within:g} s")
        await asyncio.sleep(interval)
    return time.monotonic() - started


class _Phases:
    """Reads phase counts from the broker's SQLite file (another connection; the broker is not asked)."""

    def __init__(self, path: pathlib.Path) -> None:
        self._db = sqlite3.connect(path, timeout=10)

    def counts(self) -> dict[str, int]:
        rows = self._db.execute("SELECT phase, COUNT(*) FROM deployments GROUP BY phase").fetchall()
        return {str(phase): int(n) for phase, n in rows}

    def evaluated(self) -> int:
        row = self._db.execute("SELECT COUNT(*) FROM drift_state").fetchone()
        return int(row[0])

    def close(self) -> None:
        self._db.close()


# The benchmark ----------------------------------------------------------------------------------------


class _BrokerHealth:
    """The broker's memory and full garbage collections, phase by phase."""

    def __init__(self) -> None:
        self.started = time.time()
        self.phases: list[tuple[str, float, float, dict[str, Any]]] = []

    async def snapshot(self, broker: _common.Child, label: str) -> None:
        """Close a phase: ask the broker for its figures."""
        start = self.phases[-1][2] if self.phases else self.started
        self.phases.append((label, start, time.time(), await broker.ask({"op": "stats"})))

    def longest(self) -> tuple[float, float]:
        """The longest full collection of all phases: wall and CPU ms."""
        return max(
            (
                (wall, cpu)
                for _, _, _, stats in self.phases
                for _, g, wall, cpu in stats["gc"]["long"]
                if g == 2
            ),
            default=(0.0, 0.0),
        )

    def report(self) -> None:
        """RSS at the end of each phase; full (generation 2) collections in it, which stop the broker."""
        print("\nbroker memory and full garbage collections (they stop the whole process) by phase")
        print(f"  {'phase':<40} {'RSS at end':>10} {'gen2 runs':>10} {'longest (its CPU)':>18} {'total':>9}")
        before = {"count": 0, "total_ms": 0.0}
        for label, start, end, stats in self.phases:
            gen2 = stats["gc"]["gen2"]
            wall, cpu = max(
                ((w, c) for t, g, w, c in stats["gc"]["long"] if g == 2 and start < t <= end),
                default=(0.0, 0.0),
            )
            print(
                f"  {label:<40} {stats['rss'] / 1e6:>7.0f} MB {gen2['count'] - before['count']:>10} "
                f"{wall:>6.0f} ms ({cpu:>4.0f} ms) {gen2['total_ms'] - before['total_ms']:>6.0f} ms"
            )
            before = gen2


class _Target:
    """One load-generator command against one server, and its results over the repetitions."""

    def __init__(self, label: str, server_pid: int, idle_cpu: float, cmd: dict[str, Any]) -> None:
        self.label = label
        self.server_pid = server_pid
        self.idle_cpu = idle_cpu
        self.cmd = cmd
        self.results: list[dict[str, Any]] = []

    async def run(self, load: _common.Child) -> None:
        """Run the command once; adds the server's CPU per call.

        That is the server process's CPU time over the run (warm-up calls included), less what it
        spends when idle (``idle_cpu``, CPU seconds per second), divided by the calls.
        """
        before, started = _common.cpu_seconds(self.server_pid), time.monotonic()
        result = await load.ask(self.cmd, within=600)
        used = _common.cpu_seconds(self.server_pid) - before - self.idle_cpu * (time.monotonic() - started)
        result["cpu_us"] = max(0.0, used) / (self.cmd["count"] + self.cmd["warmup"]) * 1e6
        self.results.append(result)

    def median(self, key: str) -> float:
        return _common.median([r[key] for r in self.results])


async def _provision(
    args: argparse.Namespace, load: _common.Child, grpc_target: str, phases: _Phases, meter: _common.CpuMeter
) -> dict[str, Any]:
    api = [
        (_namespace(i, args.namespace_size), _name(i))
        for i in range(args.resources)
        if i % args.namespace_size >= args.namespace_size - args.provision // args.namespaces
    ]
    total = args.resources
    meter.start()
    started = time.monotonic()
    await load.send(
        {
            "op": "provision",
            "target": grpc_target,
            "resources": api,
            "concurrency": args.provision_concurrency,
        }
    )
    answer_task = asyncio.create_task(load.read(within=900))
    timeline: list[tuple[float, int]] = []
    while True:
        counts = phases.counts()
        done = counts.get("Ready", 0) + counts.get("DriftDetected", 0)
        timeline.append((time.monotonic() - started, done))
        if done >= total or counts.get("Failed", 0):
            break
        if time.monotonic() - started > args.provision_timeout:
            break
        await asyncio.sleep(0.25)
    elapsed = time.monotonic() - started
    meter.stop()
    accepted = await answer_task
    return {"api": len(api), "elapsed": elapsed, "accepted": accepted, "counts": counts, "timeline": timeline}


async def _capture(
    grpc_target: str, http_url: str, baseline: _common.Child, grpc_req: bytes, query: str
) -> tuple[int, int, dict[str, Any]]:
    """The broker's answers to a query; the baseline servers are given the same bytes to serve."""
    async with grpc.aio.insecure_channel(grpc_target, options=CLIENT_OPTIONS) as channel:
        reply = await channel.unary_unary(GRPC_METHOD)(grpc_req)
    async with aiohttp.ClientSession() as http, http.get(f"{http_url}/v1/resources?{query}") as response:
        assert response.status == 200, await response.text()
        body = await response.read()
    await baseline.ask({"op": "cache_grpc", "request": _b64(grpc_req), "response": _b64(reply)})
    await baseline.ask({"op": "cache_http", "query": query, "body": _b64(body)})
    parsed = pb.GetResourceStateResponse.FromString(reply)
    doc = json.loads(body)
    summary = {
        "grpc_resources": len(parsed.resources),
        "http_resources": len(doc["resources"]),
        "phases": sorted({pb.State.Name(r.phase) for r in parsed.resources}),
        "health": sorted({pb.HealthStatus.Name(r.health_status) for r in parsed.resources}),
    }
    return len(reply), len(body), summary


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def _idle_rss(kubeconfig: pathlib.Path, tmp: pathlib.Path) -> float:
    """The RSS of a broker started on the cluster before anything is managed: the same-run baseline."""
    broker, _, _ = await _common.spawn_broker(
        _common.BrokerOptions(kubeconfig=str(kubeconfig), data_dir=str(tmp / "idle-data")),
        log_file=tmp / "idle-broker.log",
    )
    try:
        await asyncio.sleep(3)  # past its start-up (nothing to list or evaluate)
        return float((await broker.ask({"op": "stats"}))["rss"])
    finally:
        await broker.stop()


async def _restart(
    args: argparse.Namespace,
    kubeconfig: pathlib.Path,
    data_dir: pathlib.Path,
    tmp: pathlib.Path,
    managed: int,
) -> _common.Child:
    """Start the broker again on the same store: how long until everything is listed and evaluated.

    The first start above evaluated every bulk-loaded deployment for the first time (a write each);
    a restart finds their reported state in the store and writes only what changed meanwhile.
    """
    broker, _, _ = await _common.spawn_broker(
        _common.BrokerOptions(
            kubeconfig=str(kubeconfig), data_dir=str(data_dir), resync_interval=args.resync_interval
        ),
        log_file=tmp / "broker-restart.log",
    )
    stats: dict[str, Any] = {}

    def started() -> bool:
        return stats.get("startup_s") is not None

    async def poll() -> None:
        while not started():
            stats.update(await broker.ask({"op": "stats"}))
            await asyncio.sleep(0.2)

    await asyncio.wait_for(poll(), 600)
    args.figures.update(restart_s=stats["startup_s"], restart_rss_mb=stats["rss"] / 1e6)
    print(
        f"\nrestart with {managed:,} managed: start-up done (listed, every deployment evaluated) in "
        f"{stats['startup_s']:.1f} s, RSS {stats['rss'] / 1e6:.0f} MB; "
        f"goal <= {GOAL_STARTUP_S:.0f} s: {_common.verdict(stats['startup_s'] <= GOAL_STARTUP_S)}"
    )
    return broker


async def _main(args: argparse.Namespace) -> None:
    from kube_sandbox import Sandbox, profiles

    assert args.resources % args.namespace_size == 0, "--resources must be a multiple of --namespace-size"
    args.namespaces = args.resources // args.namespace_size
    args.provision -= args.provision % args.namespaces  # the same number in every namespace
    namespaces = [f"bench-{n:02d}" for n in range(args.namespaces)]
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="bench-resource-state-"))
    data_dir = tmp / "data"
    print(
        f"bench_resource_state: {args.resources:,} databases in {args.namespaces} namespaces, "
        f"work dir {tmp} (removed at exit without --keep)"
    )

    sandbox = Sandbox(
        ready_delay=0.05,
        watch_window=200_000,
        watch_window_bytes=1 << 31,  # the bulk load must stay resumable for the broker's informers
        watch_queue_size=200_000,
        profile=profiles.platform(tuple(namespaces)),
    )
    await sandbox.start()
    children: list[_common.Child] = []
    try:
        kubeconfig = sandbox.write_kubeconfig(tmp / "sandbox.kubeconfig")
        idle_rss = await _idle_rss(kubeconfig, tmp)
        print(f"baseline: a broker managing nothing, on the same cluster, has RSS {idle_rss / 1e6:.0f} MB")
        per_namespace_api = args.provision // args.namespaces
        bulk = [
            (_namespace(i, args.namespace_size), _name(i))
            for i in range(args.resources)
            if i % args.namespace_size < args.namespace_size - per_namespace_api
        ]
        setup_s = await bulk_setup(sandbox, data_dir, bulk) if bulk else 0.0
        pods_s = await wait_until("bulk pods ready", lambda: ready_pods(sandbox) >= len(bulk), within=300)
        print(
            f"setup (not measured): {len(bulk):,} resources in bulk in {setup_s:.0f} s, "
            f"their pods ready {pods_s:.0f} s later"
        )

        health = _BrokerHealth()
        broker, grpc_port, http_port = await _common.spawn_broker(
            _common.BrokerOptions(
                kubeconfig=str(kubeconfig),
                data_dir=str(data_dir),
                resync_interval=args.resync_interval,
                profile=args.profile_broker,
                tracemalloc=args.tracemalloc,
            ),
            log_file=tmp / "broker.log",
        )
        children.append(broker)
        grpc_target, http_url = f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}"
        phases = _Phases(data_dir / "broker.db")
        evaluated_s = await wait_until(
            "the detector's first pass", lambda: phases.evaluated() >= len(bulk), within=300
        )
        print(
            f"broker started (pid {broker.pid}); its first drift evaluation of all took {evaluated_s:.0f} s"
        )
        await health.snapshot(broker, f"start-up: lists {len(bulk):,}, evaluates them")
        startup = health.phases[-1][3]
        args.figures.update(
            startup_s=evaluated_s,
            startup_rss_mb=startup["rss"] / 1e6,
            rss_per_resource_kb=startup["rss"] / 1e3 / max(1, len(bulk)),
            # Above the same broker managing nothing (the interpreter, its libraries, the servers).
            rss_above_idle_kb=(startup["rss"] - idle_rss) / 1e3 / max(1, len(bulk)),
            startup_full_gcs=startup["gc"]["gen2"]["count"],
        )
        print(
            f"RSS after start-up {startup['rss'] / 1e6:.0f} MB: "
            f"{args.figures['rss_per_resource_kb']:.1f} KB per resource in all, "
            f"{args.figures['rss_above_idle_kb']:.1f} KB above the idle broker; "
            f"goal <= {GOAL_RSS_KB:.0f} KB: "
            f"{_common.verdict(args.figures['rss_per_resource_kb'] <= GOAL_RSS_KB)} in all, "
            f"{_common.verdict(args.figures['rss_above_idle_kb'] <= GOAL_RSS_KB)} above idle"
        )
        if args.tracemalloc:
            os.kill(broker.pid, signal.SIGUSR1)
            print(f"where the broker's memory was allocated after start-up: {args.tracemalloc}")

        load = await _common.Child.spawn("load", __file__, "--child", "load")
        children.append(load)
        await load.read()
        baseline = await _common.Child.spawn("baseline", __file__, "--child", "baseline")
        children.append(baseline)
        ports = await baseline.read()
        meter = _common.CpuMeter({"broker": broker.pid, "sandbox+driver": os.getpid(), "client": load.pid})
        if args.provision:
            await _report_provisioning(args, await _provision(args, load, grpc_target, phases, meter), meter)
            await health.snapshot(broker, f"provisioning {args.provision:,} through the API")
        phases.close()
        await asyncio.sleep(2)  # let the detector's evaluations of the new resources settle

        await _bench_queries(args, load, baseline, ports, broker.pid, grpc_target, http_url)
        await health.snapshot(broker, "queries")
        health.report()
        unfrozen = await broker.ask({"op": "unfrozen"})
        print(
            f"\nwhat a full collection walks now: {unfrozen['total']:,} tracked objects outside the "
            f"{unfrozen['frozen']:,} frozen at start-up; most common: "
            + ", ".join(f"{name} {count:,}" for name, count in unfrozen["top"][:10])
        )
        args.figures["longest_full_gc_ms"], args.figures["longest_full_gc_cpu_ms"] = health.longest()
        await broker.stop()
        children.remove(broker)
        restarted = await _restart(args, kubeconfig, data_dir, tmp, len(bulk) + args.provision)
        children.append(restarted)
    finally:
        for child in reversed(children):
            await child.stop()
        await sandbox.stop()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


async def _report_provisioning(
    args: argparse.Namespace, result: dict[str, Any], meter: _common.CpuMeter
) -> None:
    n, elapsed = result["api"], result["elapsed"]
    accepted = result["accepted"]
    done = result["counts"].get("Ready", 0) + result["counts"].get("DriftDetected", 0)
    print(
        f"\nprovisioning {n:,} databases through the gRPC API "
        f"({args.provision_concurrency} calls in flight), with {args.resources - n:,} already managed"
    )
    if accepted["failed"]:
        print(f"  {accepted['failed']} Provision calls FAILED, e.g. {accepted['failures']}")
    print(
        f"  all accepted after       {accepted['accepted_s']:>7.1f} s  ({n / accepted['accepted_s']:,.0f}/s)"
    )
    print(
        f"  all Ready after          {elapsed:>7.1f} s  ({n / elapsed:,.1f}/s)   phases: {result['counts']}"
    )
    # The rate in the last half, to show whether it degrades as the backlog and the caches grow.
    timeline = result["timeline"]
    start_done = timeline[0][1]
    half = next((t for t, d in timeline if d - start_done >= n / 2), math.nan)
    if not math.isnan(half) and elapsed > half:
        print(f"  first half Ready in      {half:>7.1f} s, second half in {elapsed - half:.1f} s")
    print(f"  CPU meanwhile: {meter.describe()}")
    rate = n / elapsed
    projected = args.goal_resources / rate
    args.figures["provisions_per_s"] = rate
    print(
        f"  {args.goal_resources:,} at this rate         {projected:>7.0f} s (extrapolated linearly)  "
        f"goal < {GOAL_PROVISION_S:.0f} s: {_common.verdict(projected < GOAL_PROVISION_S)}"
    )
    if done < args.resources:
        print(f"  NOT ALL READY: {done:,} of {args.resources:,} after {elapsed:.0f} s")


async def _bench_queries(
    args: argparse.Namespace,
    load: _common.Child,
    baseline: _common.Child,
    ports: dict[str, Any],
    broker_pid: int,
    grpc_target: str,
    http_url: str,
) -> None:
    one_ns, one_name = "bench-00", _name(args.namespace_size - 1)
    one_req = pb.GetResourceStateRequest(
        namespace=one_ns, resource_type=pb.RESOURCE_TYPE_DATABASE, resource_name=one_name
    ).SerializeToString()
    one_query = f"namespace={one_ns}&resourceType=database&resourceName={one_name}"
    ns_req = pb.GetResourceStateRequest(namespace=one_ns, page_size=1000).SerializeToString()
    ns_query = f"namespace={one_ns}&pageSize=1000"
    one_sizes = await _capture(grpc_target, http_url, baseline, one_req, one_query)
    ns_sizes = await _capture(grpc_target, http_url, baseline, ns_req, ns_query)
    one_summary, ns_summary = one_sizes[2], ns_sizes[2]
    print(
        f"\nqueries: one resource ({one_sizes[0]:,} B protobuf, {one_sizes[1]:,} B JSON), namespace of "
        f"{ns_summary['grpc_resources']:,} ({ns_sizes[0] / 1e6:.2f} MB protobuf, {ns_sizes[1] / 1e6:.2f} MB "
        f"JSON); states {ns_summary['phases']} {ns_summary['health']}"
    )
    assert one_summary["grpc_resources"] == one_summary["http_resources"] == 1
    assert ns_summary["grpc_resources"] == ns_summary["http_resources"] == args.namespace_size

    base_grpc, base_http = f"127.0.0.1:{ports['grpc_port']}", f"http://127.0.0.1:{ports['http_port']}"
    c, nc = args.concurrency, args.namespace_concurrency
    small, heavy = args.count, args.namespace_count

    def grpc_cmd(target: str, method: str, req: bytes, count: int, concurrency: int) -> dict[str, Any]:
        return {
            "op": "grpc",
            "target": target,
            "method": method,
            "request": _b64(req),
            "count": count,
            "concurrency": concurrency,
            "warmup": max(2, min(50, count // 20)),
        }

    def http_cmd(url: str, count: int, concurrency: int) -> dict[str, Any]:
        return {
            "op": "http",
            "url": url,
            "count": count,
            "concurrency": concurrency,
            "warmup": max(2, min(50, count // 20)),
        }

    # What the servers burn when nobody calls (the broker polls pod metrics every 15 s, re-evaluates
    # everything every --resync-interval s), subtracted from the CPU per call below: the median of
    # one-second windows, so that one full garbage collection (over a second with 10k resources)
    # does not pass for background work.
    pids = {"broker": broker_pid, "baseline": baseline.pid}
    windows: dict[str, list[float]] = {name: [] for name in pids}
    total = _common.CpuMeter(pids)
    total.start()
    for _ in range(max(1, round(args.idle_seconds))):
        meter = _common.CpuMeter(pids)
        meter.start()
        await asyncio.sleep(1.0)
        for name, used in meter.stop().items():
            windows[name].append(used / meter.wall)
    total.stop()
    idle = {name: _common.median(rates) for name, rates in windows.items()}
    print(
        f"idle for {total.wall:.0f} s: {total.describe()}; median of 1-s windows: "
        + ", ".join(f"{name} {100 * rate:.0f} %" for name, rate in idle.items())
    )

    def on_broker(label: str, cmd: dict[str, Any]) -> _Target:
        return _Target(label, broker_pid, idle["broker"], cmd)

    def on_baseline(label: str, cmd: dict[str, Any]) -> _Target:
        return _Target(label, baseline.pid, idle["baseline"], cmd)

    one_url, ns_url = f"/v1/resources?{one_query}", f"/v1/resources?{ns_query}"
    targets = {
        "echo": on_baseline("bare grpc.aio echo", grpc_cmd(base_grpc, ECHO_METHOD, one_req, small, c)),
        "cached1": on_baseline(
            "bare grpc.aio, cached bytes", grpc_cmd(base_grpc, GRPC_METHOD, one_req, small, c)
        ),
        "grpc1": on_broker("broker gRPC", grpc_cmd(grpc_target, GRPC_METHOD, one_req, small // 2, c)),
        "http1": on_broker("broker gateway", http_cmd(http_url + one_url, small // 2, c)),
        "cachedhttp1": on_baseline("bare aiohttp, cached JSON", http_cmd(base_http + one_url, small, c)),
        "serial1": on_broker(
            "broker gRPC, 1 in flight", grpc_cmd(grpc_target, GRPC_METHOD, one_req, small // 8, 1)
        ),
        "cachedns": on_baseline(
            "bare grpc.aio, cached bytes", grpc_cmd(base_grpc, GRPC_METHOD, ns_req, heavy * 40, nc)
        ),
        "grpcns": on_broker("broker gRPC", grpc_cmd(grpc_target, GRPC_METHOD, ns_req, heavy, nc)),
        "httpns": on_broker("broker gateway", http_cmd(http_url + ns_url, heavy, nc)),
        "cachedhttpns": on_baseline(
            "bare aiohttp, cached JSON", http_cmd(base_http + ns_url, heavy * 20, nc)
        ),
    }
    for rep in range(args.repeats):
        started = time.monotonic()
        for target in targets.values():
            await target.run(load)
        print(f"  repetition {rep + 1}/{args.repeats}: {time.monotonic() - started:.0f} s", flush=True)

    header = f"  {'':<28} {'QPS':>8} {'p50 ms':>8} {'p99 ms':>8} {'server CPU/call':>16}   QPS of each run"

    def row(key: str) -> str:
        t = targets[key]
        cpu = t.median("cpu_us")
        cpu_text = f"{cpu:,.0f} us" if cpu < 10_000 else f"{cpu / 1000:,.1f} ms"
        return (
            f"  {t.label:<28} {t.median('qps'):>8,.0f} {t.median('p50_ms'):>8.2f} {t.median('p99_ms'):>8.2f}"
            f" {cpu_text:>16}   {_common.runs([r['qps'] for r in t.results])}"
        )

    print(f"\none resource ({one_ns}/{one_name}), {c} calls in flight, medians of {args.repeats}")
    print(header)
    for key in ("echo", "cached1", "grpc1", "http1", "cachedhttp1", "serial1"):
        print(row(key))
    print(f"\nwhole namespace ({args.namespace_size:,} resources, page_size=1000), {nc} calls in flight")
    print(header)
    for key in ("cachedns", "grpcns", "httpns", "cachedhttpns"):
        print(row(key))

    q = {k: t.median("qps") for k, t in targets.items()}
    cpu = {k: t.median("cpu_us") for k, t in targets.items()}
    p99_one, p99_serial = targets["grpc1"].median("p99_ms"), targets["serial1"].median("p99_ms")
    print("\ngoals (ratios of medians; server CPU per call in brackets, which the noise of a shared machine")
    print("disturbs less than QPS)")
    p99_echo = targets["echo"].median("p99_ms")
    args.figures.update(
        one_cpu_us=cpu["grpc1"],
        namespace_cpu_ms=cpu["grpcns"] / 1000,
        one_qps_ratio=q["grpc1"] / q["echo"],
        namespace_qps_ratio=q["grpcns"] / q["cachedns"],
    )
    print(
        f"  one resource: broker gRPC / echo QPS      {q['grpc1'] / q['echo']:>5.2f}  "
        f"goal >= {GOAL_ONE_QPS}: "
        f"{_common.verdict(q['grpc1'] >= GOAL_ONE_QPS * q['echo'])}   "
        f"[CPU/call {_times(cpu['grpc1'], cpu['echo'])} echo's, "
        f"{_times(cpu['grpc1'], cpu['cached1'])} cached bytes']"
    )
    print(
        f"  one resource: p99, {c} in flight / echo's {p99_one / p99_echo:>5.2f}  "
        f"goal <= {GOAL_P99_RATIO}: "
        f"{_common.verdict(p99_one <= GOAL_P99_RATIO * p99_echo)}   ({p99_one:.2f} ms vs {p99_echo:.2f} ms; "
        f"with 1 in flight: {p99_serial:.2f} ms)"
    )
    print(
        f"  namespace: broker gRPC / cached bytes QPS {q['grpcns'] / q['cachedns']:>5.2f}  goal >= "
        f"{GOAL_NAMESPACE_QPS}: {_common.verdict(q['grpcns'] >= GOAL_NAMESPACE_QPS * q['cachedns'])}   "
        f"[CPU/call {cpu['grpcns'] / 1000:.1f} ms vs {cpu['cachedns'] / 1000:.2f} ms]"
    )
    for label, g, h, j in (
        ("one resource", "grpc1", "http1", "cachedhttp1"),
        ("namespace   ", "grpcns", "httpns", "cachedhttpns"),
    ):
        print(
            f"  {label}: gateway / gRPC QPS         {q[h] / q[g]:>5.2f}  goal >= {GOAL_GATEWAY_QPS}: "
            f"{_common.verdict(q[h] >= GOAL_GATEWAY_QPS * q[g])}   [gateway / cached JSON QPS "
            f"{q[h] / q[j]:.2f}; CPU/call {_times(cpu[h], cpu[g])} gRPC's]"
        )


def _times(a: float, b: float) -> str:
    """``a`` as a multiple of ``b``; "n/a" when the idle CPU subtracted from them left nothing."""
    return f"{a / b:.1f}x" if a > 0 and b > 0 else "n/a (idle CPU exceeded it)"


def main() -> None:
    """Run the benchmark (or, with --child, one of its child processes)."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--resources", type=int, default=10_000, help="managed resources in total")
    parser.add_argument("--namespace-size", type=int, default=1_000, help="resources per namespace")
    parser.add_argument("--provision", type=int, default=2_000, help="how many go through the Provision API")
    parser.add_argument("--provision-concurrency", type=int, default=64, help="Provision calls in flight")
    parser.add_argument("--provision-timeout", type=float, default=600.0, help="give up waiting after (s)")
    parser.add_argument("--goal-resources", type=int, default=10_000, help="the goal's provisioning count")
    parser.add_argument("--concurrency", type=int, default=16, help="query calls in flight")
    parser.add_argument("--count", type=int, default=4_000, help="calls per run for the small queries")
    parser.add_argument("--namespace-count", type=int, default=12, help="calls per run, namespace query")
    parser.add_argument("--namespace-concurrency", type=int, default=4, help="namespace calls in flight")
    parser.add_argument(
        "--resync-interval",
        type=float,
        default=3600.0,
        help="the broker's full re-evaluation period (s); the default keeps it out of the runs",
    )
    parser.add_argument("--idle-seconds", type=float, default=10.0, help="idle CPU measurement window")
    parser.add_argument("--repeats", type=int, default=3, help="repetitions (medians are reported)")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (broker log, database)")
    parser.add_argument(
        "--profile-broker", default="", metavar="FILE", help="run the broker under cProfile, stats to FILE"
    )
    parser.add_argument(
        "--tracemalloc",
        default="",
        metavar="FILE",
        help="trace the broker's allocations (slow) and write where its memory is after start-up to FILE",
    )
    parser.add_argument(
        "--scales",
        default="",
        metavar="N,N,...",
        help="run once per number of managed resources (a fifth of them provisioned through the API, "
        "--repeats each) and print the scaling table",
    )
    parser.add_argument("--summary", default="", help=argparse.SUPPRESS)  # where a run of --scales writes
    parser.add_argument("--child", choices=["load", "baseline", "bulk"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.figures = {}
    if args.child == "load":
        asyncio.run(_load_child())
    elif args.child == "baseline":
        asyncio.run(_baseline_child())
    elif args.child == "bulk":
        asyncio.run(_bulk_store_child())
    elif args.scales:
        _scaling_table(args)
    else:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_main(args))
        if args.summary:
            pathlib.Path(args.summary).write_text(json.dumps(args.figures))


# The scaling table: figure key, heading, format.
_SCALE_COLUMNS = (
    ("rss_per_resource_kb", "RSS/resource", "{:,.0f} KB"),
    ("rss_above_idle_kb", "above idle/resource", "{:,.1f} KB"),
    ("startup_s", "first start-up", "{:,.0f} s"),
    ("restart_s", "restart", "{:,.1f} s"),
    ("startup_full_gcs", "full GCs at start", "{:,.0f}"),
    ("longest_full_gc_ms", "longest full GC", "{:,.0f} ms"),
    ("longest_full_gc_cpu_ms", "its CPU", "{:,.0f} ms"),
    ("one_cpu_us", "one: CPU/call", "{:,.0f} us"),
    ("one_qps_ratio", "one: QPS/echo", "{:.2f}"),
    ("namespace_cpu_ms", "namespace: CPU/call", "{:,.1f} ms"),
    ("namespace_qps_ratio", "ns: QPS/cached", "{:.2f}"),
    ("provisions_per_s", "provisions/s", "{:,.1f}"),
)


def _scaling_table(args: argparse.Namespace) -> None:
    """Run the whole benchmark once per scale (its output as it goes), then print one row per scale."""
    rows: list[tuple[int, dict[str, float]]] = []
    for resources in (int(n) for n in args.scales.split(",")):
        namespaces = max(1, resources // args.namespace_size)
        with tempfile.NamedTemporaryFile(suffix=".json") as summary:
            command = [
                sys.executable, __file__, "--resources", str(resources),
                "--namespace-size", str(min(args.namespace_size, resources)),
                "--provision", str(max(namespaces, resources // 5)),
                "--repeats", str(args.repeats), "--summary", summary.name,
            ]  # fmt: skip
            print(f"\n=== {resources:,} managed resources: {' '.join(command[2:])}", flush=True)
            if subprocess.run(command, check=False).returncode != 0:
                print(f"=== {resources:,}: the run FAILED (the machine may not allow this scale)")
                continue
            rows.append((resources, json.loads(pathlib.Path(summary.name).read_text() or "{}")))
    print("\nscaling (each row its own run; ratios are to the baselines of the same run)")
    print(f"  {'managed':>8}" + "".join(f" {heading:>20}" for _, heading, _ in _SCALE_COLUMNS))
    for resources, figures in rows:
        cells = (fmt.format(figures[key]) if key in figures else "-" for key, _, fmt in _SCALE_COLUMNS)
        print(f"  {resources:>8,}" + "".join(f" {cell:>20}" for cell in cells))


if __name__ == "__main__":
    main()

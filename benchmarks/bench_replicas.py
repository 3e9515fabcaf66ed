"""One replica against three on one PostgreSQL: GetResourceState QPS and provisions per second.

Not a test: it prints figures. Run with ``.venv/bin/python benchmarks/bench_replicas.py`` (about
3-4 minutes on 2 cores; ``--help`` for the knobs).

Processes: this process runs the driver and a sandbox cluster (``Sandbox(ready_delay=0.05)``), a
fresh one per configuration; a throwaway PostgreSQL (``tests/throwaway_postgres.py``, Debian's
server on loopback, a fresh schema per configuration); ``--replicas`` (1, then 3) ``broker serve``
processes with ``--store-url`` and ``--leader-election`` (remediation off, the periodic full
re-evaluation out of the runs), exactly as several replicas run; and one load generator process,
which sends raw bytes (no client-side parsing) and spreads its calls over the replicas in turn.

Measured per configuration, ``--rounds`` times, the configurations interleaved (1, 3, 1, 3, ...):

* provisioning: ``--provision`` databases through ``Provision``, ``--provision-concurrency`` calls
  in flight spread over the replicas, until all are Ready (GetResourceState of the namespace, on
  the first replica): provisions per second;
* reads: the seed's one-resource query (namespace, type and name, over ``--names`` resources in
  turn) with ``--concurrency`` calls in flight in total, spread over the replicas, for
  ``--seconds``; QPS and p50/p99, median of ``--repeats``.

The one-replica figures are the baseline; the three-replica figures are printed as ratios of them.
On 2 shared cores three replicas do not get more CPU than one: what the ratio shows is what the
replicas cost each other (followers evaluate reads from their own caches; the leader alone does the
provisioning work), not the gain of machines of their own.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import importlib.util
import json
import pathlib
import shutil
import socket
import sys
import tempfile
import time
from types import ModuleType
from typing import Any

import _common
import grpc
from broker_client.v1 import broker_pb2 as pb
from broker_client.v1 import broker_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

GRPC_METHOD = "/broker.v1.BrokerService/GetResourceState"
NAMESPACE = "bench"


def _throwaway_postgres() -> ModuleType:
    """``tests/throwaway_postgres.py`` (tests/ is no package)."""
    path = _common.REPO / "tests" / "throwaway_postgres.py"
    spec = importlib.util.spec_from_file_location("throwaway_postgres", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["throwaway_postgres"] = module
    spec.loader.exec_module(module)
    return module


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# Load generator (child process) ------------------------------------------------------------------------


async def _reads(cmd: dict[str, Any]) -> dict[str, Any]:
    requests = [base64.b64decode(r) for r in cmd["requests"]]
    targets = cmd["targets"]
    channels = [grpc.aio.insecure_channel(t) for t in targets]
    calls = [c.unary_unary(GRPC_METHOD) for c in channels]  # bytes in, bytes out
    latencies: list[float] = []
    per_target = [0] * len(targets)
    try:
        for call in calls:
            for request in requests[:20]:
                await call(request)  # warm-up: connections, the replicas' first encodings
        deadline = time.perf_counter() + cmd["seconds"]

        async def worker(w: int) -> None:
            t, i = w % len(calls), w
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                await calls[t](requests[i % len(requests)])
                latencies.append(time.perf_counter() - started)
                per_target[t] += 1
                i += cmd["concurrency"]

        started = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(cmd["concurrency"])))
        elapsed = time.perf_counter() - started
    finally:
        for channel in channels:
            await channel.close()
    return {
        "qps": len(latencies) / elapsed,
        "p50_ms": _common.percentile(latencies, 50) * 1000,
        "p99_ms": _common.percentile(latencies, 99) * 1000,
        "per_target": per_target,
    }


async def _provisions(cmd: dict[str, Any]) -> dict[str, Any]:
    return await _common.provision_over(
        cmd["targets"], [(NAMESPACE, name) for name in cmd["names"]], cmd["concurrency"]
    )


async def _load_child() -> None:
    reader = await _common.stdin_lines()
    _common.answer({"ready": True})
    while line := await reader.readline():
        cmd = json.loads(line)
        handler = {"reads": _reads, "provisions": _provisions}[cmd["op"]]
        _common.answer(await handler(cmd))


# Driver ---------------------------------------------------------------------------------------------


class Replicas:
    """``count`` ``broker serve`` processes on one store URL, with leader election, on a sandbox."""

    def __init__(
        self, count: int, *, store_url: str, kubeconfig: pathlib.Path, workdir: pathlib.Path
    ) -> None:
        self.count = count
        self.store_url = store_url
        self.kubeconfig = kubeconfig
        self.workdir = workdir
        self.targets = [f"127.0.0.1:{_free_port()}" for _ in range(count)]
        self.procs: list[asyncio.subprocess.Process] = []

    async def start(self) -> None:
        for i, target in enumerate(self.targets):
            log = (self.workdir / f"replica-{i}.log").open("ab")
            self.procs.append(
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "broker",
                    "--log-level",
                    "warning",
                    "serve",
                    "--insecure",
                    "--kubeconfig",
                    str(self.kubeconfig),
                    "--data-dir",
                    str(self.workdir / f"replica-{i}"),
                    "--grpc-addr",
                    target,
                    "--http-addr",
                    f"127.0.0.1:{_free_port()}",
                    "--store-url",
                    self.store_url,
                    "--leader-election",
                    "--leader-election-namespace",
                    NAMESPACE,
                    "--leader-election-identity",
                    f"replica-{i}",
                    "--no-remediation",
                    "--resync-interval",
                    "3600",
                    "--ready-timeout",
                    "600",
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    cwd=_common.REPO,
                )
            )
            log.close()
            await self._serving(target)

    async def _serving(self, target: str) -> None:
        deadline = time.monotonic() + 120
        async with grpc.aio.insecure_channel(target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                with contextlib.suppress(grpc.aio.AioRpcError):
                    reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"the broker at {target} did not serve within 120 s (see {self.workdir})"
                    )
                await asyncio.sleep(0.2)

    async def ready_count(self) -> int:
        async with grpc.aio.insecure_channel(self.targets[0]) as channel:
            stub = broker_pb2_grpc.BrokerServiceStub(channel)
            reply = await stub.GetResourceState(
                pb.GetResourceStateRequest(namespace=NAMESPACE, page_size=1000), timeout=60
            )
        return sum(1 for s in reply.resources if s.phase == pb.STATE_READY)

    async def stop(self) -> None:
        for proc in self.procs:
            if proc.returncode is None:
                proc.terminate()
        for proc in self.procs:
            try:
                await asyncio.wait_for(proc.wait(), 20)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def _configuration(
    args: argparse.Namespace, count: int, database: Any, load: _common.Child, workdir: pathlib.Path
) -> dict[str, Any]:
    """Start ``count`` replicas on a fresh sandbox and schema; provision, then read."""
    from kube_sandbox import Sandbox, profiles

    workdir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - once, before anything runs
    sandbox = Sandbox(ready_delay=0.05, profile=profiles.platform((NAMESPACE,)))
    await sandbox.start()
    replicas: Replicas | None = None
    try:
        kubeconfig = sandbox.write_kubeconfig(workdir / "sandbox.kubeconfig")
        store_url = await asyncio.to_thread(database.new_store_url)
        replicas = Replicas(count, store_url=store_url, kubeconfig=kubeconfig, workdir=workdir)
        await replicas.start()
        names = [f"db-{i:04d}" for i in range(args.provision)]
        started = time.perf_counter()
        await load.send(
            {
                "op": "provisions",
                "targets": replicas.targets,
                "names": names,
                "concurrency": args.provision_concurrency,
            }
        )
        accepted = await load.read(within=600)
        if accepted["failed"]:
            raise RuntimeError(f"{accepted['failed']} Provisions failed: {accepted['failures']}")
        while await replicas.ready_count() < len(names):
            if time.perf_counter() - started > args.provision_timeout:
                raise RuntimeError(f"not all Ready within {args.provision_timeout:g} s")
            await asyncio.sleep(0.5)
        ready_s = time.perf_counter() - started
        await asyncio.sleep(2)  # the detector's first evaluations of the new resources settle
        requests = [
            base64.b64encode(
                pb.GetResourceStateRequest(
                    namespace=NAMESPACE, resource_type=pb.RESOURCE_TYPE_DATABASE, resource_name=name
                ).SerializeToString()
            ).decode()
            for name in names[: args.names]
        ]
        reads = []
        for _ in range(args.repeats):
            await load.send(
                {
                    "op": "reads",
                    "targets": replicas.targets,
                    "requests": requests,
                    "concurrency": args.concurrency,
                    "seconds": args.seconds,
                }
            )
            reads.append(await load.read(within=args.seconds + 120))
        return {
            "provisions_per_s": len(names) / ready_s,
            "ready_s": ready_s,
            "accepted_s": accepted["accepted_s"],
            "reads": reads,
        }
    finally:
        if replicas is not None:
            await replicas.stop()
        await sandbox.stop()


async def _main(args: argparse.Namespace) -> None:
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="bench-replicas-"))
    print(
        f"bench_replicas: 1 and {args.replicas} replicas on one PostgreSQL, {args.provision} databases "
        f"provisioned, one-resource reads with {args.concurrency} in flight; work dir {tmp}"
    )
    throwaway = _throwaway_postgres()
    database = await asyncio.to_thread(throwaway.Cluster.start)
    load = await _common.Child.spawn("load", __file__, "--child", "load")
    results: dict[int, list[dict[str, Any]]] = {1: [], args.replicas: []}
    try:
        await load.read()
        for round_ in range(args.rounds):
            for count in (1, args.replicas):
                result = await _configuration(args, count, database, load, tmp / f"round-{round_}-{count}")
                results[count].append(result)
                qps = _common.median([r["qps"] for r in result["reads"]])
                print(
                    f"  round {round_ + 1}, {count} replica(s): "
                    f"{result['provisions_per_s']:.1f} provisions/s "
                    f"(all Ready in {result['ready_s']:.1f} s, accepted in {result['accepted_s']:.1f} s); "
                    f"reads {qps:,.0f} QPS (runs {_common.runs([r['qps'] for r in result['reads']])}), "
                    f"calls per replica {result['reads'][-1]['per_target']}",
                    flush=True,
                )
    finally:
        await load.stop()
        await asyncio.to_thread(database.stop)
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    def summary(count: int) -> dict[str, float]:
        reads = [r for result in results[count] for r in result["reads"]]
        return {
            "qps": _common.median([r["qps"] for r in reads]),
            "p50": _common.median([r["p50_ms"] for r in reads]),
            "p99": _common.median([r["p99_ms"] for r in reads]),
            "prov": _common.median([r["provisions_per_s"] for r in results[count]]),
        }

    one, many = summary(1), summary(args.replicas)
    print(f"medians over {args.rounds} rounds ({args.rounds * args.repeats} read runs each):")
    for count, s in ((1, one), (args.replicas, many)):
        print(
            f"  {count} replica(s): reads {s['qps']:,.0f} QPS, p50 {s['p50']:.1f} ms, p99 {s['p99']:.1f} ms; "
            f"{s['prov']:.1f} provisions/s"
        )
    print(
        f"  {args.replicas} replicas / 1: read QPS x{many['qps'] / one['qps']:.2f}, "
        f"p99 x{many['p99'] / one['p99']:.2f}, provisions/s x{many['prov'] / one['prov']:.2f}"
    )


def main() -> None:
    """Run the benchmark (or, with --child, its load generator)."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--replicas", type=int, default=3, help="the replicas compared with one")
    parser.add_argument("--provision", type=int, default=200, help="databases provisioned per configuration")
    parser.add_argument("--provision-concurrency", type=int, default=16, help="Provision calls in flight")
    parser.add_argument("--provision-timeout", type=float, default=300.0, help="give up waiting after (s)")
    parser.add_argument("--names", type=int, default=100, help="resources the reads go round")
    parser.add_argument("--concurrency", type=int, default=24, help="read calls in flight, in total")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of one read run")
    parser.add_argument("--repeats", type=int, default=3, help="read runs per configuration and round")
    parser.add_argument("--rounds", type=int, default=2, help="times each configuration is set up and run")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (replica logs)")
    parser.add_argument("--child", choices=["load"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "load":
        asyncio.run(_load_child())
    else:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_main(args))


if __name__ == "__main__":
    main()

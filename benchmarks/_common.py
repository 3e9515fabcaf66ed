"""Shared helpers of the broker benchmarks: child processes, a broker in its own process, statistics.

Not a benchmark itself (running this file does nothing). The benchmarks run every server and every
load generator in a process of its own, so that the CPU a client spends does not show up as server
time; on a 2-core machine they still share the cores, which is why every figure is a median and
every goal is a ratio against a baseline measured in the same run.

Children speak JSON lines: the parent writes commands to the child's stdin, the child answers on its
stdout. A child exits when its stdin closes, so an interrupted benchmark leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import json
import math
import os
import pathlib
import signal
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable, Sequence
from typing import Any

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


# Statistics ---------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(values: Sequence[float]) -> float:
    """The median; NaN for no values."""
    return statistics.median(values) if values else math.nan


def runs(values: Sequence[float], fmt: str = "{:,.0f}") -> str:
    """The individual runs, for the reader to judge the noise."""
    return ", ".join(fmt.format(v) for v in values)


def verdict(ok: bool) -> str:
    """The word printed next to a goal."""
    return "meets" if ok else "MISSES"


# Processes ----------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used so far (Linux ``/proc``)."""
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (Linux ``/proc``)."""
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


class Child:
    """A subprocess of ours speaking JSON lines; stopped by closing its stdin, then SIGTERM by pid."""

    def __init__(self, proc: asyncio.subprocess.Process, name: str) -> None:
        self.proc = proc
        self.name = name

    @classmethod
    async def spawn(cls, name: str, *args: str, stderr: pathlib.Path | None = None) -> Child:
        """Start ``python <args>`` with pipes for stdin and stdout (stderr to a file or inherited)."""
        err: Any = None
        if stderr is not None:
            err = stderr.open("ab")  # the child inherits it; our copy is closed below
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            *args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=err,
            cwd=REPO,
            limit=64 * 1024 * 1024,
        )
        if err is not None:
            err.close()
        return cls(proc, name)

    @property
    def pid(self) -> int:
        """The child's process id."""
        return self.proc.pid

    async def send(self, message: dict[str, Any]) -> None:
        """Write one command."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(message).encode() + b"\n")
        await self.proc.stdin.drain()

    async def read(self, within: float = 300.0) -> dict[str, Any]:
        """Read one answer; fails if the child dies or stays silent for ``within`` seconds."""
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), within)
        if not line:
            code = await self.proc.wait()
            raise RuntimeError(f"{self.name} exited with status {code} before answering")
        return dict(json.loads(line))

    async def ask(self, message: dict[str, Any], within: float = 300.0) -> dict[str, Any]:
        """Send a command and read its answer."""
        await self.send(message)
        return await self.read(within)

    async def stop(self, grace: float = 15.0) -> None:
        """Close stdin (the child's cue to exit); SIGTERM, then SIGKILL, this pid if it lingers."""
        if self.proc.returncode is not None:
            return
        if self.proc.stdin is not None:
            with contextlib.suppress(Exception):
                self.proc.stdin.close()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                await asyncio.wait_for(self.proc.wait(), grace)
                return
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.proc.pid, sig)
        await self.proc.wait()


async def stdin_lines() -> asyncio.StreamReader:
    """The child side: an asyncio reader of this process's stdin."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=64 * 1024 * 1024)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


def answer(message: dict[str, Any]) -> None:
    """The child side: write one answer line."""
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


# The broker in its own process ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BrokerOptions:
    """What a benchmark may set on the broker it starts (everything else is ``Settings``' default)."""

    kubeconfig: str
    data_dir: str
    remediate: bool = False
    streams_per_principal: int = 100
    watch_buffer: int = 1000
    heartbeat_interval: float = 15.0
    ready_timeout: float = 600.0
    resync_interval: float = 60.0
    log_level: str = "info"
    profile: str = ""
    # Trace allocations from the start (slow) and write where the live memory was allocated to
    # this file at each SIGUSR1: a diagnosis, not a figure.
    tracemalloc: str = ""


async def spawn_broker(options: BrokerOptions, *, log_file: pathlib.Path) -> tuple[Child, int, int]:
    """Start a broker in a child process; returns it with its gRPC and HTTP ports once it serves."""
    child = await Child.spawn(
        "broker",
        str(HERE / "_common.py"),
        "--broker",
        json.dumps(dataclasses.asdict(options)),
        stderr=log_file,
    )
    ready = await child.read(within=120)
    return child, int(ready["grpc_port"]), int(ready["http_port"])


class GcPauses:
    """Records how long the garbage collector stops this process, per generation (via ``gc.callbacks``).

    Servers under test install it to report their own pauses: with tens of thousands of cached
    objects a full (generation 2) collection takes long enough to show in tail latencies.
    """

    def __init__(self) -> None:
        self.pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
        # (time.time() at the end, generation, wall ms, CPU ms) of pauses >= 20 ms. The CPU time is
        # the collector's own work; on a shared machine the wall time also counts waiting for a core.
        self.long: list[tuple[float, int, float, float]] = []
        self._started = self._started_cpu = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        # The CPU clock is a system call: read only around full collections (young ones are many).
        full = info["generation"] == 2
        if phase == "start":
            self._started = time.perf_counter()
            self._started_cpu = time.thread_time() if full else 0.0
        else:
            pause = time.perf_counter() - self._started
            cpu = time.thread_time() - self._started_cpu if full else 0.0
            self.pauses[info["generation"]].append(pause)
            if pause >= 0.02:
                self.long.append((time.time(), info["generation"], pause * 1000, cpu * 1000))

    def summary(self) -> dict[str, Any]:
        """Count, total and longest pause (ms) per generation since the start."""
        summary: dict[str, Any] = {
            f"gen{g}": {"count": len(p), "total_ms": sum(p) * 1000, "max_ms": max(p, default=0.0) * 1000}
            for g, p in self.pauses.items()
        }
        summary["long"] = self.long[-200:]
        return summary


async def serve_stats(pauses: GcPauses, extra: Callable[[], dict[str, Any]] = dict) -> None:
    """The child side of a server under test: answer ``{"op": "stats"}`` until stdin closes."""
    reader = await stdin_lines()
    while line := await reader.readline():
        op = json.loads(line).get("op")
        if op == "stats":
            answer({"gc": pauses.summary(), "rss": rss_bytes(os.getpid()), **extra()})
        elif op == "unfrozen":
            # What a full collection walks: the tracked objects of the oldest generation, by type.
            counts: dict[str, int] = {}
            for obj in gc.get_objects(generation=2):
                name = type(obj).__qualname__
                counts[name] = counts.get(name, 0) + 1
            top = sorted(counts.items(), key=lambda kv: -kv[1])[:15]
            answer({"total": sum(counts.values()), "frozen": gc.get_freeze_count(), "top": top})


async def _broker_child(options: BrokerOptions) -> None:
    """The child side of ``spawn_broker``: a ``server.Broker`` on loopback until stdin closes."""
    from broker import logs, server, service

    pauses = GcPauses()
    if options.tracemalloc:
        tracemalloc.start(1)

    logs.configure(level=options.log_level, fmt="text")
    settings = server.Settings(
        grpc_addr="127.0.0.1:0",
        http_addr="127.0.0.1:0",
        data_dir=pathlib.Path(options.data_dir),
        insecure=True,
        kubeconfig=pathlib.Path(options.kubeconfig),
        callback_allow_loopback=True,
        remediate=options.remediate,
        ready_timeout=options.ready_timeout,
        shutdown_grace=1.0,
        resync_interval=options.resync_interval,
        watch=service.WatchLimits(
            buffer=options.watch_buffer,
            streams_per_principal=options.streams_per_principal,
            heartbeat_interval=options.heartbeat_interval,
        ),
    )
    broker = server.Broker(settings, freeze_heap=True)  # as ``broker serve`` runs
    await broker.start()
    try:
        if broker.cluster is not None:
            await broker.cluster.wait_synced(120)
        answer({"grpc_port": broker.grpc_port, "http_port": broker.http_port, "pid": os.getpid()})
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        if options.tracemalloc:
            loop.add_signal_handler(signal.SIGUSR1, _write_allocations, pathlib.Path(options.tracemalloc))
        stats = asyncio.create_task(serve_stats(pauses, lambda: {"startup_s": broker.startup_seconds}))
        waiter = asyncio.create_task(stop.wait())
        await asyncio.wait({stats, waiter}, return_when=asyncio.FIRST_COMPLETED)
        stats.cancel()
        waiter.cancel()
    finally:
        await broker.stop()


def describe_gc(stats: dict[str, Any]) -> str:
    """A server's garbage-collection pauses in one line."""
    parts = []
    for gen in ("gen1", "gen2"):
        g = stats["gc"][gen]
        parts.append(f"{gen} {g['count']}x, longest {g['max_ms']:.0f} ms, total {g['total_ms']:.0f} ms")
    return "; ".join(parts)


class CpuMeter:
    """CPU seconds each of some processes used between ``start`` and ``stop``, next to wall time."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self._before: dict[str, float] = {}
        self._started = 0.0
        self.wall = 0.0
        self.used: dict[str, float] = {}

    def start(self) -> None:
        """Take the first reading."""
        self._before = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        self._started = time.monotonic()

    def stop(self) -> dict[str, float]:
        """Take the second reading; returns CPU seconds per process."""
        self.wall = time.monotonic() - self._started
        self.used = {name: cpu_seconds(pid) - self._before[name] for name, pid in self.pids.items()}
        return self.used

    def describe(self) -> str:
        """``name 12.3 s (85 %)`` per process, the share being of one core over the wall time."""
        return ", ".join(
            f"{name} {used:.1f} s ({100 * used / self.wall:.0f} % of a core)"
            for name, used in self.used.items()
        )


async def provision_over(
    targets: Sequence[str], resources: Sequence[Sequence[str]], concurrency: int
) -> dict[str, Any]:
    """Provision every (namespace, name) as a small database through the real stubs of ``targets``
    (calls spread over them in turn), ``concurrency`` in flight; how long until all were accepted."""
    import grpc
    from broker_client.v1 import broker_pb2 as pb
    from broker_client.v1 import broker_pb2_grpc

    pending = [(str(namespace), str(name)) for namespace, name in resources]
    failures: list[str] = []
    channels = [grpc.aio.insecure_channel(t) for t in targets]
    stubs = [broker_pb2_grpc.BrokerServiceStub(c) for c in channels]
    turn = 0

    async def worker() -> None:
        nonlocal turn
        while pending:
            namespace, name = pending.pop()
            turn += 1
            try:
                await stubs[turn % len(stubs)].Provision(
                    pb.ProvisionRequest(
                        namespace=namespace,
                        resource_type=pb.RESOURCE_TYPE_DATABASE,
                        resource_name=name,
                        spec=pb.ResourceSpec(engine="postgresql", version="15", size="small", replicas=1),
                        request_id=f"bench-{namespace}-{name}",
                    ),
                    timeout=60,
                )
            except grpc.aio.AioRpcError as e:
                failures.append(f"{name}: {e.code().name} {e.details()}")

    try:
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    finally:
        for channel in channels:
            await channel.close()
    return {"accepted_s": elapsed, "failed": len(failures), "failures": failures[:5]}


def _write_allocations(path: pathlib.Path) -> None:
    """Where the live memory was allocated: by file, then the top lines."""
    snapshot = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
    total = sum(s.size for s in snapshot.statistics("filename"))
    lines = [f"live traced memory {total / 1e6:.1f} MB", "", "by file:"]
    lines += [
        f"  {s.size / 1e6:8.1f} MB {s.count:>9,} {s.traceback[0].filename}"
        for s in snapshot.statistics("filename")[:25]
    ]
    lines += ["", "by line:"]
    lines += [
        f"  {s.size / 1e6:8.1f} MB {s.count:>9,} {s.traceback[0]}" for s in snapshot.statistics("lineno")[:50]
    ]
    path.write_text("\n".join(lines) + "\n")


def _run_broker_child(options: BrokerOptions) -> None:
    """Run the broker child, under cProfile (stats written to ``options.profile``) if asked."""
    if not options.profile:
        asyncio.run(_broker_child(options))
        return
    import cProfile

    profiler = cProfile.Profile()
    profiler.enable()
    try:
        asyncio.run(_broker_child(options))
    finally:
        profiler.disable()
        profiler.dump_stats(options.profile)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--broker":
    _run_broker_child(BrokerOptions(**json.loads(sys.argv[2])))

"""What every scenario needs: real processes on loopback, bounded waits, cluster and broker helpers.

- :class:`Result`: one scenario's outcome and its one-line rendering;
- :class:`SandboxProcess`: ``python -m broker sandbox`` (or ``python -m chaos.sandbox_host``, which
  adds a control port the pause fault does not close) in its own process, so killing the broker
  never touches the cluster;
- :class:`BrokerProcess`: ``python -m broker serve`` against that sandbox, restartable on the same
  data directory and ports, with SIGKILL and SIGTERM;
- small clients for the sandbox's Kubernetes API (namespaces, scale) and for the broker (paged
  reads, status details of failed calls).

Every wait has a deadline; every process is killed by its own pid when its context exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import pathlib
import shutil
import signal
import socket
import sqlite3
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import aiohttp
import grpc
from broker_client.v1 import broker_pb2 as pb
from broker_client.v1 import broker_pb2_grpc
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from kube_sandbox import profiles

from broker.store import sqlite as broker_store

REPO = pathlib.Path(__file__).resolve().parents[1]
LOOPBACK = "127.0.0.1"
START_TIMEOUT = 60.0
NAMESPACE = "chaos"

T = TypeVar("T")
Figure = int | float | str


class ChaosError(Exception):
    """A scenario could not run (a process did not start, a wait ran out): the scenario fails."""


@dataclasses.dataclass(frozen=True)
class Result:
    """One scenario's outcome: its figures, the goals it missed, and notes that are no verdict."""

    name: str
    figures: dict[str, Figure]
    problems: tuple[str, ...] = ()  # one sentence per goal not met; the scenario passed iff none
    notes: tuple[str, ...] = ()  # context for a reader (what was retried, which flag was absent)

    @property
    def passed(self) -> bool:
        """Whether every goal was met."""
        return not self.problems

    @property
    def detail(self) -> str:
        """The problems, then the notes in parentheses, in one line."""
        return "; ".join([*self.problems, *(f"({n})" for n in self.notes)])

    def line(self) -> str:
        """``name  key=value ...  PASS`` (or FAIL), as ``./dev.sh chaos`` prints it."""
        figures = " ".join(f"{k}={_render(v)}" for k, v in self.figures.items())
        return f"{self.name:<24}{figures}  {'PASS' if self.passed else 'FAIL'}"


def _render(value: Figure) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def monotonic() -> float:
    """The clock every scenario measures with."""
    return time.monotonic()


async def poll(
    fetch: Callable[[], Awaitable[T]],
    ok: Callable[[T], bool],
    *,
    within: float,
    interval: float = 0.2,
) -> tuple[bool, T]:
    """Call ``fetch`` until ``ok`` holds or ``within`` seconds pass; (held, last value)."""
    deadline = monotonic() + within
    while True:
        value = await fetch()
        if ok(value):
            return True, value
        if monotonic() >= deadline:
            return False, value
        await asyncio.sleep(interval)


async def value(x: T) -> T:
    """An awaitable of a plain value, for :func:`poll` on in-memory state."""
    return x


def free_port() -> int:
    """A loopback port nothing listens on right now (bound to 0 and released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        port: int = s.getsockname()[1]
        return port


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment without broker settings a developer may have exported, plus ``extra``.

    The repository root is put on PYTHONPATH so that ``python -m chaos.sandbox_host`` resolves.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.update(extra or {})
    return env


class Process:
    """One subprocess whose output goes to a log file; killed by its pid, never by name."""

    def __init__(self, argv: Sequence[str], *, log_path: pathlib.Path, env: dict[str, str]) -> None:
        self.argv = list(argv)
        self.log_path = log_path
        self.env = env
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        """Spawn it (stdin closed, stdout and stderr appended to the log)."""
        with self.log_path.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=self.env,
                cwd=REPO,
            )

    @property
    def pid(self) -> int:
        """The running process's id."""
        if self.proc is None:
            raise ChaosError("the process was never started")
        return self.proc.pid

    @property
    def running(self) -> bool:
        """Whether it was started and has not exited."""
        return self.proc is not None and self.proc.returncode is None

    def log(self, tail: int = 4000) -> str:
        """The end of its log."""
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def signal(self, sig: signal.Signals) -> None:
        """Send ``sig`` to this process (and only it)."""
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(sig)

    async def wait(self, within: float) -> int | None:
        """Its exit code, or None if it is still running after ``within`` seconds."""
        if self.proc is None:
            return None
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout=within)
        except TimeoutError:
            return None

    async def kill(self) -> None:
        """SIGKILL and reap it (a no-op when it already exited)."""
        if self.proc is None:
            return
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        await self.proc.wait()


# The sandbox --------------------------------------------------------------------------------------


class SandboxProcess:
    """The sandbox cluster in its own process.

    ``controlled=False`` runs the stock ``python -m broker sandbox``. ``controlled=True`` runs
    ``python -m chaos.sandbox_host``: the same sandbox plus a control port (see that module) for
    faults and for changing workloads while the API port is paused.
    """

    def __init__(self, workdir: pathlib.Path, *, controlled: bool = False) -> None:
        self.dir = workdir / "sandbox"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.controlled = controlled
        argv = [sys.executable, "-m", "chaos.sandbox_host" if controlled else "broker"]
        if not controlled:
            argv += ["--log-level", "warning", "sandbox"]
        argv += ["--addr", f"{LOOPBACK}:0", "--data-dir", str(self.dir)]
        self.process = Process(argv, log_path=workdir / "sandbox.log", env=child_env())
        self.url = ""
        self.control_url = ""

    @property
    def kubeconfig(self) -> pathlib.Path:
        """The kubeconfig the sandbox wrote."""
        return self.dir / "sandbox.kubeconfig"

    async def start(self) -> None:
        """Start it and wait until it printed its URL and answers ``/version``."""
        await self.process.start()
        deadline = monotonic() + START_TIMEOUT
        while not self.url or (self.controlled and not self.control_url):
            if not self.process.running:
                raise ChaosError(f"the sandbox exited while starting:\n{self.process.log()}")
            if monotonic() > deadline:
                raise ChaosError(f"the sandbox did not start within {START_TIMEOUT:g}s")
            for line in self.process.log(tail=100_000).splitlines():
                if line.startswith("sandbox API server: "):
                    self.url = line.split(": ", 1)[1].strip()
                elif line.startswith("sandbox control: "):
                    self.control_url = line.split(": ", 1)[1].strip()
            await asyncio.sleep(0.05)
        async with aiohttp.ClientSession() as http:
            ok, _ = await poll(lambda: _status(http, f"{self.url}/version"), lambda s: s == 200, within=20)
        if not ok or not self.kubeconfig.exists():
            raise ChaosError(f"the sandbox at {self.url} does not answer:\n{self.process.log()}")

    async def stop(self) -> None:
        """Stop it (SIGTERM, then SIGKILL if it lingers)."""
        self.process.signal(signal.SIGTERM)
        if await self.process.wait(5.0) is None:
            await self.process.kill()


async def _status(http: aiohttp.ClientSession, url: str) -> int:
    try:
        async with http.get(url, timeout=aiohttp.ClientTimeout(total=2)) as r:
            return r.status
    except (aiohttp.ClientError, OSError, TimeoutError):
        return 0


def http_session() -> aiohttp.ClientSession:
    """An HTTP client session with a deadline on every request."""
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))


class Kube:
    """The few Kubernetes API calls the scenarios make, over plain HTTP like kubectl."""

    def __init__(self, url: str, http: aiohttp.ClientSession) -> None:
        self.url = url
        self.http = http

    async def create_namespace(self, name: str) -> None:
        """Create a namespace (fine if it exists)."""
        body = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
        async with self.http.post(f"{self.url}/api/v1/namespaces", json=body) as r:
            if r.status not in (200, 201, 409):
                raise ChaosError(f"cannot create namespace {name}: {r.status} {await r.text()}")

    async def create_kafka_topic_crd(self) -> None:
        """Install Strimzi's KafkaTopic CRD, as a platform cluster has it (fine if it exists)."""
        url = f"{self.url}/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
        async with self.http.post(url, json=profiles.STRIMZI_KAFKA_TOPIC_CRD) as r:
            if r.status not in (200, 201, 409):
                raise ChaosError(f"cannot create the KafkaTopic CRD: {r.status} {await r.text()}")

    async def set_topic_replicas(
        self, namespace: str, name: str, replicas: int, *, manager: str = "kubectl-edit"
    ) -> bool:
        """``kubectl edit kafkatopic NAME`` changing spec.replicas; False when it does not exist."""
        path = f"/apis/kafka.strimzi.io/v1beta2/namespaces/{namespace}/kafkatopics/{name}"
        return await self._merge_patch(path, {"spec": {"replicas": replicas}}, manager=manager)

    async def scale(self, namespace: str, name: str, replicas: int, *, manager: str = "kubectl") -> bool:
        """``kubectl scale sts NAME --replicas=N``; False when it does not exist (yet)."""
        path = f"/apis/apps/v1/namespaces/{namespace}/statefulsets/{name}/scale"
        return await self._merge_patch(path, {"spec": {"replicas": replicas}}, manager=manager)

    async def _merge_patch(self, path: str, body: dict[str, object], *, manager: str) -> bool:
        async with self.http.patch(
            f"{self.url}{path}",
            params={"fieldManager": manager},
            data=json.dumps(body),
            headers={"Content-Type": "application/merge-patch+json"},
            timeout=aiohttp.ClientTimeout(total=10),
        ) as r:
            if r.status == 404:
                return False
            if r.status != 200:
                raise ChaosError(f"PATCH {path}: {r.status} {await r.text()}")
            return True


async def refuses_connections(url: str) -> bool:
    """Whether the API at ``url`` refuses TCP connections (a paused sandbox)."""
    host, _, port = url.removeprefix("http://").partition(":")
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), timeout=1)
    except (OSError, TimeoutError):
        return True
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return False


# The broker ---------------------------------------------------------------------------------------

_HELP: dict[str, str] = {}


async def serve_help() -> str:
    """``broker serve --help``, to find out which flags this checkout's broker has."""
    if "serve" not in _HELP:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "broker",
            "serve",
            "--help",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=child_env(),
            cwd=REPO,
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), timeout=START_TIMEOUT)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise ChaosError("broker serve --help did not answer") from None
        _HELP["serve"] = out.decode(errors="replace")
    return _HELP["serve"]


async def serve_has_flag(flag: str) -> bool:
    """Whether ``broker serve`` accepts ``flag``."""
    return flag in (await serve_help()).split()


class BrokerProcess:
    """``python -m broker serve`` on fixed loopback ports and one data directory, restartable."""

    def __init__(
        self,
        workdir: pathlib.Path,
        *,
        kubeconfig: pathlib.Path,
        args: Sequence[str] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.workdir = workdir
        self.data_dir = workdir / "broker-data"
        self.grpc_port = free_port()
        self.http_port = free_port()
        self.kubeconfig = kubeconfig
        self.args = list(args)
        self.env = child_env(env)
        self.starts = 0
        self.process: Process | None = None

    @property
    def target(self) -> str:
        """The gRPC address."""
        return f"{LOOPBACK}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        """The HTTP gateway's base URL."""
        return f"http://{LOOPBACK}:{self.http_port}"

    @property
    def db_path(self) -> pathlib.Path:
        """The broker's SQLite file."""
        return self.data_dir / broker_store.DB_FILENAME

    def argv(self) -> list[str]:
        """The command line of ``broker serve`` with this broker's settings."""
        return [
            sys.executable,
            "-m",
            "broker",
            "serve",
            "--insecure",
            "--kubeconfig",
            str(self.kubeconfig),
            "--data-dir",
            str(self.data_dir),
            "--grpc-addr",
            self.target,
            "--http-addr",
            f"{LOOPBACK}:{self.http_port}",
            *self.args,
        ]

    async def start(self, *, within: float = START_TIMEOUT) -> None:
        """Start (or restart) it and wait until gRPC health says SERVING and ``/readyz`` is 200."""
        if self.process is not None and self.process.running:
            raise ChaosError("the broker is already running")
        self.starts += 1
        self.process = Process(self.argv(), log_path=self.workdir / f"broker-{self.starts}.log", env=self.env)
        await self.process.start()
        deadline = monotonic() + within
        async with grpc.aio.insecure_channel(self.target) as channel, aiohttp.ClientSession() as http:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                if not self.process.running:
                    raise ChaosError(f"the broker exited while starting:\n{self.process.log()}")
                if await self._serving(health) and await _status(http, f"{self.http_url}/readyz") == 200:
                    return
                if monotonic() > deadline:
                    raise ChaosError(f"the broker was not ready within {within:g}s:\n{self.process.log()}")
                await asyncio.sleep(0.1)

    @staticmethod
    async def _serving(health: health_pb2_grpc.HealthStub) -> bool:
        try:
            reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
        except grpc.aio.AioRpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    @property
    def running(self) -> bool:
        """Whether the current process runs."""
        return self.process is not None and self.process.running

    async def sigkill(self) -> int | None:
        """SIGKILL it and reap it; its exit code (``-9``)."""
        if self.process is None:
            return None
        self.process.signal(signal.SIGKILL)
        return await self.process.wait(10.0)

    def sigterm(self) -> None:
        """Send SIGTERM (the caller waits for the exit)."""
        if self.process is not None:
            self.process.signal(signal.SIGTERM)

    async def wait(self, within: float) -> int | None:
        """The exit code, or None while it still runs after ``within`` seconds."""
        return None if self.process is None else await self.process.wait(within)

    def rss_bytes(self) -> int:
        """Resident memory of the broker process, from /proc."""
        if self.process is None:
            return 0
        try:
            status = pathlib.Path(f"/proc/{self.process.pid}/status").read_text()
        except OSError:
            return 0
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def log(self, tail: int = 4000) -> str:
        """The end of the current process's log."""
        return "" if self.process is None else self.process.log(tail)

    async def stop(self) -> None:
        """Kill it if it still runs (the scenario's ``finally``)."""
        if self.process is not None:
            await self.process.kill()


@contextlib.asynccontextmanager
async def cluster(
    workdir: pathlib.Path,
    *,
    controlled: bool = False,
    broker_args: Sequence[str] = (),
    broker_env: dict[str, str] | None = None,
    namespaces: Sequence[str] = (NAMESPACE,),
) -> AsyncIterator[tuple[SandboxProcess, BrokerProcess]]:
    """A sandbox process with ``namespaces`` and a ready broker process on it; both killed on exit."""
    sandbox = SandboxProcess(workdir, controlled=controlled)  # creates workdir
    broker: BrokerProcess | None = None
    try:
        await sandbox.start()
        async with aiohttp.ClientSession() as http:
            kube = Kube(sandbox.url, http)
            await kube.create_kafka_topic_crd()
            for name in namespaces:
                await kube.create_namespace(name)
        broker = BrokerProcess(workdir, kubeconfig=sandbox.kubeconfig, args=broker_args, env=broker_env)
        await broker.start()
        yield sandbox, broker
    finally:
        if broker is not None:
            await broker.stop()
        await sandbox.stop()


# Talking to the broker ----------------------------------------------------------------------------

# A restarted broker is back within a second or two: reconnect that fast, not after gRPC's default
# backoff of up to two minutes.
CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)


def channel(target: str) -> grpc.aio.Channel:
    """A plaintext channel to a broker on loopback that reconnects quickly after restarts."""
    return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)


ENGINES: tuple[tuple[int, str, str], ...] = (
    (pb.RESOURCE_TYPE_DATABASE, "postgresql", "15"),
    (pb.RESOURCE_TYPE_DATABASE, "mysql", "8.0"),
    (pb.RESOURCE_TYPE_CACHE, "redis", "7"),
)


def provision_request(
    name: str, index: int, *, namespace: str = NAMESPACE, callback_url: str = "", request_id: str = ""
) -> pb.ProvisionRequest:
    """A Provision of a one-replica database or cache (engines take turns), small size."""
    resource_type, engine, version = ENGINES[index % len(ENGINES)]
    return pb.ProvisionRequest(
        namespace=namespace,
        resource_type=resource_type,  # type: ignore[arg-type]
        resource_name=name,
        spec=pb.ResourceSpec(engine=engine, version=version, size="small", replicas=1),
        callback_url=callback_url,
        request_id=request_id or f"chaos-{name}",
    )


def topic_request(name: str, *, namespace: str = NAMESPACE) -> pb.ProvisionRequest:
    """A Provision of a Kafka topic with 3 partitions and replication factor 1."""
    return pb.ProvisionRequest(
        namespace=namespace,
        resource_type=pb.RESOURCE_TYPE_TOPIC,
        resource_name=name,
        spec=pb.ResourceSpec(engine="kafka", replicas=1, topic=pb.TopicSpec(partitions=3)),
        request_id=f"chaos-{name}",
    )


async def _all_pages(call: Any, request: Any, field: str, deadline: float) -> list[Any]:
    """Every item of a paginated list RPC, following ``next_page_token``."""
    items: list[Any] = []
    while True:
        reply = await call(request, timeout=deadline)
        items.extend(getattr(reply, field))
        if not reply.next_page_token:
            return items
        request.page_token = reply.next_page_token


async def resource_states(
    stub: broker_pb2_grpc.BrokerServiceStub, namespace: str = NAMESPACE, *, deadline: float = 30.0
) -> list[pb.ResourceState]:
    """Every resource of a namespace, all pages of GetResourceState."""
    request = pb.GetResourceStateRequest(namespace=namespace, page_size=1000)
    return await _all_pages(stub.GetResourceState, request, "resources", deadline)


async def drift_events(
    stub: broker_pb2_grpc.BrokerServiceStub, namespace: str = NAMESPACE, *, deadline: float = 30.0
) -> list[pb.DriftEvent]:
    """The whole recorded event log of a namespace, all pages of ListDriftEvents, oldest first."""
    request = pb.ListDriftEventsRequest(namespace=namespace, page_size=1000)
    return await _all_pages(stub.ListDriftEvents, request, "events", deadline)


async def newest_sequence(stub: broker_pb2_grpc.BrokerServiceStub, *, within: float = 10.0) -> int:
    """The log's newest sequence, as the first heartbeat of a live-only WatchDrift tells it."""
    call = stub.WatchDrift(pb.WatchDriftRequest())
    try:
        async with asyncio.timeout(within):
            async for message in call:
                if message.WhichOneof("message") == "heartbeat":
                    return int(message.heartbeat.sequence)
    finally:
        call.cancel()
    raise ChaosError("WatchDrift ended without its first heartbeat")


async def settle(stub: broker_pb2_grpc.BrokerServiceStub, *, quiet: float = 1.0, within: float = 60.0) -> int:
    """Wait until the event log has not grown for ``quiet`` seconds (bounded); its newest sequence."""
    deadline = monotonic() + within
    last = await newest_sequence(stub)
    while monotonic() < deadline:
        await asyncio.sleep(quiet)
        newest = await newest_sequence(stub)
        if newest == last:
            break
        last = newest
    return last


async def catch_up(
    stub: broker_pb2_grpc.BrokerServiceStub, *, after: int, until: int, within: float
) -> list[int]:
    """The event sequences of a WatchDrift resumed after ``after``, read until ``until`` (bounded)."""
    sequences: list[int] = []
    call = stub.WatchDrift(pb.WatchDriftRequest(after_sequence=after))

    async def read() -> None:
        async for message in call:
            if message.WhichOneof("message") == "event":
                sequences.append(message.event.sequence)
            elif message.WhichOneof("message") == "heartbeat" and message.heartbeat.sequence >= until:
                return
            if sequences and sequences[-1] >= until:
                return

    try:
        if after < until:
            await asyncio.wait_for(read(), timeout=within)
    except (TimeoutError, grpc.aio.AioRpcError):
        pass
    finally:
        call.cancel()
    return sequences


def error_info(err: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo | None:
    """The google.rpc ErrorInfo detail of a failed call, or None."""
    try:
        status = rpc_status.from_call(err)
    except ValueError:
        return None
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    return None


def integrity_check(db_path: pathlib.Path) -> str:
    """``PRAGMA integrity_check`` and ``foreign_key_check`` of a stopped broker's file: "ok" or the
    problems.

    It checks a copy of the file and its write-ahead log, as the crash left them, so the check
    (which replays the log, as the next broker would) leaves the originals untouched for the next
    broker to recover by itself.
    """
    if not db_path.exists():
        return f"missing {db_path}"
    with tempfile.TemporaryDirectory(prefix="chaos-integrity-") as scratch:
        copy = pathlib.Path(scratch) / db_path.name
        shutil.copyfile(db_path, copy)
        wal = db_path.with_name(db_path.name + "-wal")
        if wal.exists():
            shutil.copyfile(wal, copy.with_name(copy.name + "-wal"))
        return _check(copy)


def _check(db_path: pathlib.Path) -> str:
    connection = sqlite3.connect(db_path, timeout=30)
    try:
        rows = [str(r[0]) for r in connection.execute("PRAGMA integrity_check")]
        foreign = list(connection.execute("PRAGMA foreign_key_check"))
    except sqlite3.DatabaseError as e:  # not even readable as a database
        return f"{type(e).__name__}: {e}"
    finally:
        connection.close()
    problems = [r for r in rows if r != "ok"]
    if foreign:
        problems.append(f"{len(foreign)} foreign key violations")
    return "ok" if not problems else "; ".join(problems)[:300]


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values`` by nearest rank; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]

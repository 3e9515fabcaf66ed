"""``broker get`` and ``broker watch``: the client library's command line, run as subprocesses
against a running broker with ``--target`` and ``--token``, the way a person would.

Subprocesses are run with asyncio so that the in-process broker keeps serving meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import shutil
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

import pytest
from broker_client.client import BrokerClient, Page
from broker_client.v1 import broker_pb2 as pb
from conftest import ADMIN_TOKEN, PLATFORM_TOKEN, RunningBroker, until

NS = "team-platform"
T = TypeVar("T")
needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not on PATH")


def clean_env() -> dict[str, str]:
    """The environment without BROKER_* variables, so only the flags count."""
    return {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}


async def broker_cli(*args: str, limit: float = 60) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "broker",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=clean_env(),
    )
    out, err = await asyncio.wait_for(proc.communicate(), limit)
    return proc.returncode or 0, out.decode(), err.decode()


async def kubectl(kubeconfig: pathlib.Path, cache: pathlib.Path, *args: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        "kubectl",
        f"--kubeconfig={kubeconfig}",
        f"--cache-dir={cache}",
        "-n",
        NS,
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    if proc.returncode != 0:
        pytest.fail(f"kubectl {' '.join(args)} failed: {err.decode()}")


@pytest.fixture
async def client(cluster_broker: RunningBroker) -> AsyncIterator[BrokerClient]:
    async with await BrokerClient.connect(cluster_broker.grpc_target, token=PLATFORM_TOKEN) as c:
        yield c


async def provision_ready(client: BrokerClient, name: str) -> str:
    reply = await client.provision(
        namespace=NS,
        resource_type="database",
        resource_name=name,
        engine="postgresql",
        version="15",
        size="medium",
    )

    async def phase() -> int:
        return (await client.get_deployment(NS, reply.deployment_id)).phase

    await until(phase, lambda p: p == pb.STATE_READY, within=30, what=f"{name} to be Ready")
    return reply.deployment_id


# broker get ---------------------------------------------------------------------------------------


@needs_kubectl
async def test_broker_get_prints_a_table_with_the_header_and_a_row_per_resource(
    cluster_broker: RunningBroker,
    client: BrokerClient,
    sandbox_kubeconfig: pathlib.Path,
    tmp_path: pathlib.Path,
) -> None:
    deployment_id = await provision_ready(client, "orders-db")
    await kubectl(
        sandbox_kubeconfig, tmp_path / "kube-cache", "scale", "statefulset", "orders-db", "--replicas=3"
    )

    async def drifted() -> Page[pb.ResourceState]:
        return await client.get_resource_state(NS, deployment_id=deployment_id)

    await until(drifted, lambda s: s and s[0].phase == pb.STATE_DRIFT_DETECTED, within=30, what="drift")

    code, out, err = await broker_cli(
        "get", "--target", cluster_broker.grpc_target, "--token", PLATFORM_TOKEN, "-n", NS
    )

    assert code == 0, err
    table, _, costs = out.partition("\n\n")
    lines = table.splitlines()
    assert lines[0].split() == [
        "NAME",
        "TYPE",
        "PHASE",
        "HEALTH",
        "DRIFT",
        "COST/MONTH",
        "WINDOW",
        "DEPLOYMENT",
    ]
    [row] = [line for line in lines[1:] if line.strip()]
    # Below the table, the namespace's cost: desired against actual (3 replicas), and no budget.
    assert costs.strip() == "COST/MONTH  desired 45.50  actual 136.50  budget none"
    assert row.startswith("orders-db ")
    assert row.endswith(deployment_id)
    assert " database " in row
    assert "DriftDetected" in row
    assert "Replica count mismatch: desired=1, actual=3" in row
    # Columns line up under the header.
    assert row.index(deployment_id) == lines[0].index("DEPLOYMENT")
    assert row.index("database") == lines[0].index("TYPE")


async def test_broker_get_json_parses_and_carries_the_resource(running_broker: RunningBroker) -> None:
    async with await BrokerClient.connect(running_broker.grpc_target, token=PLATFORM_TOKEN) as client:
        reply = await client.provision(
            namespace=NS,
            resource_type="cache",
            resource_name="session-cache",
            engine="redis",
            version="7",
            size="small",
        )

    code, out, err = await broker_cli(
        "get", "--target", running_broker.grpc_target, "--token", PLATFORM_TOKEN, "-n", NS, "-o", "json"
    )

    assert code == 0, err
    states = json.loads(out)
    assert isinstance(states, list)
    [state] = states
    assert state["deploymentId"] == reply.deployment_id
    assert state["resourceName"] == "session-cache"
    assert state["resourceType"] == "RESOURCE_TYPE_CACHE"
    assert state["namespace"] == NS
    assert state["desiredSpec"]["engine"] == "redis"

    # The filters reach the broker: no database by that name.
    code, out, err = await broker_cli(
        "get",
        "--target",
        running_broker.grpc_target,
        "--token",
        PLATFORM_TOKEN,
        "-n",
        NS,
        "--type",
        "database",
        "-o",
        "json",
    )
    assert code == 0, err
    assert json.loads(out) == []


async def test_broker_get_of_an_empty_namespace_says_so(running_broker: RunningBroker) -> None:
    code, out, err = await broker_cli(
        "get", "--target", running_broker.grpc_target, "--token", ADMIN_TOKEN, "-n", NS
    )
    assert code == 0, err
    assert out.strip() == f"no resources in namespace {NS}"


async def test_broker_get_of_an_unauthorized_namespace_exits_1_with_a_readable_message(
    running_broker: RunningBroker,
) -> None:
    code, out, err = await broker_cli(
        "get", "--target", running_broker.grpc_target, "--token", PLATFORM_TOKEN, "-n", "team-other"
    )
    assert code == 1
    assert out == ""
    assert err.startswith("broker get: PERMISSION_DENIED: ")
    assert "'team-other'" in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


async def test_broker_get_without_a_token_exits_1_unauthenticated(running_broker: RunningBroker) -> None:
    code, _, err = await broker_cli("get", "--target", running_broker.grpc_target, "-n", NS)
    assert code == 1
    assert err.startswith("broker get: UNAUTHENTICATED: ")
    assert "Traceback" not in err


async def test_broker_watch_of_an_unauthorized_namespace_exits_1_with_a_readable_message(
    running_broker: RunningBroker,
) -> None:
    code, out, err = await broker_cli(
        "watch",
        "--target",
        running_broker.grpc_target,
        "--token",
        PLATFORM_TOKEN,
        "-n",
        "team-other",
        limit=30,
    )
    assert code == 1
    assert out == ""
    assert err.startswith("broker watch: PERMISSION_DENIED: ")
    assert "'team-other'" in err
    assert "Traceback" not in err


# broker watch -------------------------------------------------------------------------------------


class WatchProcess:
    """A running ``broker watch``; its stdout lines are collected as they come."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []

    async def line_where(self, ok: Callable[[str], bool], *, within: float = 30) -> str:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + within
        for line in self.lines:
            if ok(line):
                return line
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"no such line within {within:g}s; got:\n" + "\n".join(self.lines))
            try:
                raw = await asyncio.wait_for(self.proc.stdout.readline(), remaining)
            except TimeoutError:
                continue
            if not raw:
                err = await self.proc.stderr.read() if self.proc.stderr else b""
                pytest.fail(
                    f"broker watch ended ({await self.proc.wait()}): {err.decode()}\n" + "\n".join(self.lines)
                )
            line = raw.decode().rstrip("\n")
            self.lines.append(line)
            if ok(line):
                return line

    async def interrupt(self, *, within: float = 30) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            return await asyncio.wait_for(self.proc.wait(), within)
        except TimeoutError:
            self.proc.kill()
            return await self.proc.wait()


# Starts ``python -m broker ...`` with SIGINT ignored, as a background job of a non-interactive
# shell (``broker watch &`` in a script, or a test suite run that way) inherits it: Python then keeps
# it ignored, and ``asyncio.run`` installs no handler of its own.
SIGINT_IGNORED = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
    "os.execv(sys.executable, [sys.executable, '-m', 'broker', *sys.argv[1:]])"
)


async def start_watch(broker: RunningBroker, *args: str, sigint_ignored: bool = False) -> WatchProcess:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *(("-c", SIGINT_IGNORED) if sigint_ignored else ("-m", "broker")),
        "watch",
        "--target",
        broker.grpc_target,
        "--token",
        PLATFORM_TOKEN,
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=clean_env(),
    )
    watch = WatchProcess(proc)

    # Live only: wait until its stream is subscribed before making news.
    async def subscribers() -> int:
        if proc.returncode is not None:
            pytest.fail(f"broker watch exited early ({proc.returncode})")
        return len(broker.broker.hub)

    await until(subscribers, lambda n: n >= 1, within=30, what="broker watch to subscribe")
    return watch


@needs_kubectl
async def test_broker_watch_prints_events_as_they_happen(
    cluster_broker: RunningBroker,
    client: BrokerClient,
    sandbox_kubeconfig: pathlib.Path,
    tmp_path: pathlib.Path,
) -> None:
    watch = await start_watch(cluster_broker, "-n", NS)
    try:
        deployment_id = await provision_ready(client, "orders-db")
        ready = await watch.line_where(lambda line: "ProvisioningSucceeded" in line)
        assert f"{NS}/orders-db" in ready
        await kubectl(
            sandbox_kubeconfig, tmp_path / "kube-cache", "scale", "statefulset", "orders-db", "--replicas=3"
        )
        drift = await watch.line_where(lambda line: "DriftDetected" in line)
        assert f"{NS}/orders-db" in drift
        assert drift.endswith("Replica count mismatch: desired=1, actual=3")
        [event] = [
            e
            for e in await client.list_drift_events(NS, deployment_id=deployment_id)
            if e.kind == pb.DRIFT_EVENT_KIND_DRIFT_DETECTED
        ]
        assert f"#{event.sequence} " in drift
    finally:
        code = await watch.interrupt()
    assert code == 130  # Ctrl-C is a normal way to stop watching, without a traceback
    assert watch.proc.stderr is not None
    assert "Traceback" not in (await watch.proc.stderr.read()).decode()


@needs_kubectl
async def test_broker_watch_json_prints_one_parsable_event_per_line(
    cluster_broker: RunningBroker, client: BrokerClient
) -> None:
    watch = await start_watch(cluster_broker, "-n", NS, "-o", "json")
    try:
        deployment_id = await provision_ready(client, "json-db")
        line = await watch.line_where(lambda line: "json-db" in line)
    finally:
        await watch.interrupt()
    event = json.loads(line)
    assert event["deploymentId"] == deployment_id
    assert event["resourceName"] == "json-db"
    assert event["namespace"] == NS
    assert event["kind"] == "DRIFT_EVENT_KIND_PROVISIONING_SUCCEEDED"
    assert int(event["sequence"]) >= 1
    for other in watch.lines:
        json.loads(other)


@pytest.mark.parametrize("sigint_ignored", [False, True], ids=["sigint-default", "sigint-inherited-ignored"])
async def test_ctrl_c_ends_broker_watch_at_once_with_130_whatever_sigint_it_inherited(
    running_broker: RunningBroker, sigint_ignored: bool
) -> None:
    watch = await start_watch(running_broker, "-n", NS, sigint_ignored=sigint_ignored)
    started = time.monotonic()
    code = await watch.interrupt(within=10)
    assert code == 130
    assert time.monotonic() - started < 5
    assert watch.proc.stderr is not None
    assert (await watch.proc.stderr.read()).decode() == ""  # no traceback, nothing at all


async def test_ctrl_c_ends_broker_watch_while_it_waits_to_reconnect(running_broker: RunningBroker) -> None:
    watch = await start_watch(running_broker, "-n", NS)
    await running_broker.broker.stop()  # the stream ends resumably; it retries with backoff
    await asyncio.sleep(1.5)
    assert watch.proc.returncode is None  # still trying, as it should

    started = time.monotonic()
    code = await watch.interrupt(within=10)
    assert code == 130
    assert time.monotonic() - started < 5
    assert watch.proc.stderr is not None
    assert "Traceback" not in (await watch.proc.stderr.read()).decode()


# The flags: the same in broker get, broker watch and the example manager ------------------------


async def help_of(*command: str) -> dict[str, str]:
    """``--help`` of a client program: each option's synopsis and help text, unwrapped."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *command,
        "--help",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**clean_env(), "COLUMNS": "250"},
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    options: dict[str, str] = {}
    last = ""
    for line in out.decode().splitlines():
        if line.startswith("  -"):
            last, _, text = line.strip().partition("  ")
            options[last] = text.strip()
        elif last and line.startswith("    "):  # a help text below a long synopsis
            options[last] = f"{options[last]} {line.strip()}".strip()
        else:
            last = ""
    return options


async def test_get_watch_and_the_example_manager_spell_the_connection_flags_the_same() -> None:
    get = await help_of("-m", "broker", "get")
    watch = await help_of("-m", "broker", "watch")
    manager = await help_of("-m", "broker_client.examples.database_manager")
    costs = await help_of("-m", "broker", "costs")

    shared = {
        "--target HOST:PORT": "broker gRPC address (default $BROKER_TARGET, else localhost:50051)",
        "--token TOKEN": "bearer token (default $BROKER_TOKEN)",
        "--tls": "the broker's gRPC port is behind TLS",
    }
    for name, options in (("get", get), ("watch", watch), ("manager", manager), ("costs", costs)):
        for synopsis, text in shared.items():
            assert options.get(synopsis) == text, (name, synopsis, options)
        assert "-n NAMESPACE, --namespace NAMESPACE" in options, (name, options)
        assert not [o for o in options if "--broker" in o], (name, options)  # a hidden, deprecated alias
    assert "repeatable" in watch["-n NAMESPACE, --namespace NAMESPACE"]
    assert "repeatable" in manager["-n NAMESPACE, --namespace NAMESPACE"]


async def test_broker_get_requires_a_namespace_and_takes_target_from_the_environment(
    running_broker: RunningBroker,
) -> None:
    code, _, err = await broker_cli("get", "--target", running_broker.grpc_target, "--token", PLATFORM_TOKEN)
    assert code == 2
    assert "the following arguments are required: -n/--namespace" in err

    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "broker",
        "get",
        "-n",
        NS,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**clean_env(), "BROKER_TARGET": running_broker.grpc_target, "BROKER_TOKEN": PLATFORM_TOKEN},
    )
    out, err_bytes = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err_bytes.decode()
    assert out.decode().strip() == f"no resources in namespace {NS}"

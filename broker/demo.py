"""``broker demo``: the original design's whole story in one command, on the sandbox.

It starts the sandbox cluster, the broker and the example Database manager. Then it does what a
person would: creates a ``Database`` with kubectl, waits until it is Ready, and scales its
StatefulSet to 3. It shows the drift being detected, the Kubernetes Event the manager emits, the
broker's remediation back to 1 replica, and the drift resolved. It exits 0 when all of that was
seen, and 1 with the reason when not.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import pathlib
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

from broker_client import callbacks
from broker_client.client import BrokerClient
from broker_client.examples import database_manager
from broker_client.v1 import broker_pb2 as pb

from broker import server

NAMESPACE = "team-platform"
NAME = "postgres-app-db"
DATABASE_YAML = f"""\
apiVersion: platform.company.com/v1
kind: Database
metadata:
  name: {NAME}
  namespace: {NAMESPACE}
spec:
  engine: postgresql
  version: "15"
  size: medium
  replicas: 1
"""


class DemoFailed(Exception):
    """A step of the story did not happen in time."""


class Story:
    """Prints the story as it happens, with elapsed time."""

    def __init__(self) -> None:
        self._start = time.monotonic()
        self.bold = sys.stdout.isatty()

    def say(self, text: str, *, mark: str = "  ") -> None:
        elapsed = time.monotonic() - self._start
        print(f"[{elapsed:6.2f}s] {mark} {text}", flush=True)

    def step(self, text: str) -> None:
        print(flush=True)
        self.say(f"\033[1m{text}\033[0m" if self.bold else text, mark="==>")


async def _kubectl(kubeconfig: pathlib.Path, *args: str, stdin: str | None = None) -> str:
    proc = await asyncio.create_subprocess_exec(
        "kubectl",
        "--kubeconfig",
        str(kubeconfig),
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate(stdin.encode() if stdin else None)
    if proc.returncode != 0:
        raise DemoFailed(f"kubectl {' '.join(args)} failed: {err.decode().strip()}")
    return out.decode()


async def _until(what: str, check: Callable[[], Awaitable[bool]], within: float) -> None:
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise DemoFailed(f"{what} did not happen within {within:g}s")
        await asyncio.sleep(0.1)


async def run(*, data_dir: pathlib.Path, within: float = 60.0) -> int:
    """Tell the story; 0 when everything was seen, 1 otherwise."""
    story = Story()
    if shutil.which("kubectl") is None:
        print(
            "broker demo: kubectl is not on PATH; the demo drives the cluster with kubectl as a person would"
        )
        return 1
    for name in ("broker", "aiohttp", "kubernetes_asyncio", "database-manager"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        await _story(story, data_dir, within)
    except DemoFailed as e:
        story.say(f"FAILED: {e}", mark="✗ ")
        return 1
    story.step("Done: provisioned, drift detected, Event emitted, remediated, drift resolved.")
    return 0


async def _story(story: Story, data_dir: pathlib.Path, within: float) -> None:
    story.step("Starting the sandbox cluster (in memory, on loopback), the broker and the Database manager")
    kube_sandbox = server.load_sandbox()
    async with kube_sandbox.Sandbox(
        ready_delay=0.5, profile=kube_sandbox.profiles.platform((NAMESPACE,))
    ) as cluster:
        kubeconfig = cluster.write_kubeconfig(data_dir / "sandbox.kubeconfig")
        story.say(f"sandbox API {cluster.url}; kubeconfig {kubeconfig}")
        broker = server.Broker(
            server.Settings(
                grpc_addr="127.0.0.1:0",
                http_addr="127.0.0.1:0",
                data_dir=data_dir / "broker",
                insecure=True,
                kubeconfig=kubeconfig,
                callback_allow_loopback=True,
                ready_timeout=within,
            )
        )
        await broker.start()
        target = f"127.0.0.1:{broker.grpc_port}"
        story.say(f"broker gRPC {target}, HTTP http://127.0.0.1:{broker.http_port}")
        seen: list[tuple[str, str, str]] = []
        tasks: list[asyncio.Task[None]] = []

        def record(kind: str, reason: str, message: str) -> None:
            seen.append((kind, reason, message))
            story.say(f"Kubernetes Event from the manager: {kind} {reason}: {message}", mark="ev")

        try:
            async with (
                database_manager.kubernetes(str(kubeconfig)) as kube,
                await BrokerClient.connect(target) as client,
            ):
                key = (data_dir / "broker" / "callback.key").read_bytes().strip()
                manager: database_manager.DatabaseManager | None = None

                async def on_callback(delivery: callbacks.Delivery) -> None:
                    story.say(
                        f"callback to the manager: {delivery.payload['status']} "
                        f"(delivery {delivery.delivery_id}, signature verified)",
                        mark="cb",
                    )
                    assert manager is not None
                    await manager.on_callback(delivery)

                receiver = callbacks.CallbackServer(callbacks.CallbackVerifier(key), on_callback)
                await receiver.start("127.0.0.1", 0)
                manager = database_manager.DatabaseManager(
                    broker=client,
                    kube=kube,
                    callback_url=f"http://127.0.0.1:{receiver.port}/v1/callback",
                    namespaces=[NAMESPACE],
                    on_event=record,
                )
                tasks.append(asyncio.create_task(manager.run()))
                drift_events: list[pb.DriftEvent] = []

                async def follow() -> None:
                    async for message in client.watch_drift(namespaces=[NAMESPACE]):
                        if message.WhichOneof("message") == "event":
                            e = message.event
                            drift_events.append(e)
                            kind = pb.DriftEventKind.Name(e.kind).removeprefix("DRIFT_EVENT_KIND_")
                            story.say(f"WatchDrift #{e.sequence} {kind}: {e.message}", mark="<<")

                tasks.append(asyncio.create_task(follow()))
                try:
                    await _scenes(story, kubeconfig, drift_events, seen, within)
                finally:
                    await receiver.stop()
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            await broker.stop()


async def _scenes(
    story: Story,
    kubeconfig: pathlib.Path,
    drift_events: list[Any],
    seen: list[tuple[str, str, str]],
    within: float,
) -> None:
    async def database_phase() -> str:
        out = await _kubectl(kubeconfig, "-n", NAMESPACE, "get", "database", NAME, "-o", "json")
        return str((json.loads(out).get("status") or {}).get("phase", ""))

    def kinds() -> list[int]:
        return [e.kind for e in drift_events if e.resource_name == NAME]

    story.step(f"A person creates a Database with kubectl (postgresql 15, medium) in {NAMESPACE}")
    story.say("$ kubectl apply -f database.yaml")
    story.say((await _kubectl(kubeconfig, "apply", "-f", "-", stdin=DATABASE_YAML)).strip(), mark="  ")

    story.step("The manager provisions it through the broker; the broker calls back when it is Ready")

    async def ready() -> bool:
        return await database_phase() == "Ready"

    await _until("Database Ready", ready, within)
    story.say("$ kubectl get database,sts,pods -n team-platform")
    print(await _kubectl(kubeconfig, "-n", NAMESPACE, "get", "database,sts,pods"), flush=True)

    story.step("A person scales the StatefulSet to 3 by hand")
    story.say(f"$ kubectl -n {NAMESPACE} scale statefulset {NAME} --replicas=3")
    story.say(
        (await _kubectl(kubeconfig, "-n", NAMESPACE, "scale", "statefulset", NAME, "--replicas=3")).strip()
    )

    async def detected() -> bool:
        return pb.DRIFT_EVENT_KIND_DRIFT_DETECTED in kinds()

    await _until("drift detection", detected, within)
    detected_event = next(e for e in drift_events if e.kind == pb.DRIFT_EVENT_KIND_DRIFT_DETECTED)
    for item in detected_event.drift_items:
        story.say(
            f"drift: {item.message} ({pb.DriftClass.Name(item.drift_class).removeprefix('DRIFT_CLASS_')}, "
            f"{pb.RecommendedAction.Name(item.recommended_action).removeprefix('RECOMMENDED_ACTION_')}, "
            f"changed by {item.changed_by or 'unknown'}, {item.monthly_cost_delta:+.2f}/month)",
            mark="!!",
        )

    async def event_emitted() -> bool:
        return any(reason == "DriftDetected" for _, reason, _ in seen)

    await _until("the manager's Kubernetes Event", event_emitted, within)

    async def resolved() -> bool:
        return pb.DRIFT_EVENT_KIND_DRIFT_RESOLVED in kinds()

    async def remediated() -> bool:
        # Succeeded is said once an observation shows the drift gone: after the resolution, or
        # at the same moment.
        return pb.DRIFT_EVENT_KIND_REMEDIATION_SUCCEEDED in kinds()

    await _until("the drift resolved", resolved, within)
    await _until("the broker's remediation confirmed", remediated, within)
    if pb.DRIFT_EVENT_KIND_REMEDIATION_STARTED not in kinds():
        raise DemoFailed("the drift resolved without the broker's remediation")
    replicas = json.loads(await _kubectl(kubeconfig, "-n", NAMESPACE, "get", "sts", NAME, "-o", "json"))[
        "spec"
    ]["replicas"]
    if replicas != 1:
        raise DemoFailed(f"the StatefulSet has {replicas} replicas after remediation, not 1")
    story.say("the broker scaled the StatefulSet back to 1 replica", mark="ok")
    await _until("Database back to Ready", ready, within)
    story.say("$ kubectl get events -n team-platform --field-selector involvedObject.kind=Database")
    print(
        await _kubectl(
            kubeconfig, "-n", NAMESPACE, "get", "events", "--field-selector", "involvedObject.kind=Database"
        ),
        flush=True,
    )


def main(data_dir: pathlib.Path | None) -> int:
    """Run the demo in ``data_dir`` (a temporary directory when None)."""
    if data_dir is not None:
        data_dir.mkdir(parents=True, exist_ok=True)
        return asyncio.run(run(data_dir=data_dir))
    with tempfile.TemporaryDirectory(prefix="broker-demo-") as tmp:
        return asyncio.run(run(data_dir=pathlib.Path(tmp)))

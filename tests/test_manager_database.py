"""The example Database manager (``broker_client.examples.database_manager``) end to end on the sandbox.

A person drives it with stock kubectl, as in the original design: creates a ``Database``, sees it
become Ready (the broker's signed callback, verified by the manager's ``CallbackServer``), scales its
StatefulSet by hand, sees the manager's Kubernetes Event for the drift and the broker's remediation
back to 1 replica, and deletes the ``Database``: the finalizer makes the manager deprovision.

Also: ``deploy/database-crd.yaml`` is the CRD the manager serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pathlib
import shutil
from collections.abc import AsyncIterator
from typing import Any, TypeVar

import pytest
import yaml
from broker_client import callbacks
from broker_client.client import BrokerClient
from broker_client.examples import database_manager
from broker_client.v1 import broker_pb2 as pb
from conftest import PLATFORM_TOKEN, cluster_settings, seed_cluster, until

from broker import server
from broker.kube import client as kube_client

REPO = pathlib.Path(__file__).resolve().parents[1]
NS = "team-platform"
NAME = "orders-db"
DATABASE_YAML = f"""\
apiVersion: platform.company.com/v1
kind: Database
metadata:
  name: {NAME}
  namespace: {NS}
spec:
  engine: postgresql
  version: "15"
  size: medium
  replicas: 1
"""
T = TypeVar("T")


def test_the_deployable_crd_is_the_one_the_manager_serves() -> None:
    on_disk = yaml.safe_load((REPO / "deploy" / "database-crd.yaml").read_text())
    assert on_disk == database_manager.DATABASE_CRD


class Kubectl:
    """Stock kubectl against the sandbox, as a subprocess so the in-process servers keep serving."""

    def __init__(self, kubeconfig: pathlib.Path, cache: pathlib.Path) -> None:
        self.base = ["kubectl", f"--kubeconfig={kubeconfig}", f"--cache-dir={cache}", "-n", NS]

    async def run(self, *args: str, stdin: str | None = None, check: bool = True) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            *self.base,
            *args,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=dict(os.environ),
        )
        out, err = await asyncio.wait_for(proc.communicate(stdin.encode() if stdin else None), 30)
        code = proc.returncode or 0
        if check and code != 0:
            pytest.fail(f"kubectl {' '.join(args)} failed ({code}): {err.decode()}")
        return code, out.decode(), err.decode()

    async def get(self, kind: str, name: str) -> dict[str, Any] | None:
        """The object as JSON, or None when it does not exist."""
        code, out, err = await self.run("get", kind, name, "-o", "json", check=False)
        if code != 0:
            if "NotFound" in err or "not found" in err:
                return None
            pytest.fail(f"kubectl get {kind} {name} failed ({code}): {err}")
        return dict(json.loads(out))

    async def events_of(self, kind: str, name: str) -> list[dict[str, Any]]:
        _, out, _ = await self.run(
            "get",
            "events",
            "--field-selector",
            f"involvedObject.kind={kind},involvedObject.name={name}",
            "-o",
            "json",
        )
        return list(json.loads(out)["items"])


def status_of(db: dict[str, Any] | None) -> dict[str, Any]:
    return dict((db or {}).get("status") or {})


def reasons(events: list[dict[str, Any]]) -> list[str]:
    return [e.get("reason", "") for e in events]


@pytest.fixture
async def manager_setup(
    tmp_path: pathlib.Path,
    tokens_file: pathlib.Path,
    sandbox_kubeconfig: pathlib.Path,
    kube_api: Any,
) -> AsyncIterator[dict[str, Any]]:
    """Sandbox with the Database CRD, a broker that remediates, and the manager running as a task."""
    await seed_cluster(sandbox_kubeconfig)
    adapter = await kube_client.Client.connect(sandbox_kubeconfig)
    try:
        await adapter.apply(database_manager.DATABASE_CRD)
    finally:
        await adapter.close()

    data_dir = tmp_path / "data"
    broker = server.Broker(cluster_settings(data_dir, tokens_file, sandbox_kubeconfig, remediate=True))
    await broker.start()
    client: BrokerClient | None = None
    receiver: callbacks.CallbackServer | None = None
    task: asyncio.Task[None] | None = None
    try:
        assert broker.cluster is not None
        assert await broker.cluster.wait_synced(10.0)
        key = (data_dir / "callback.key").read_bytes().strip()
        client = await BrokerClient.connect(f"127.0.0.1:{broker.grpc_port}", token=PLATFORM_TOKEN)
        emitted: list[tuple[str, str, str]] = []
        deliveries: list[callbacks.Delivery] = []
        manager: database_manager.DatabaseManager | None = None

        async def on_callback(delivery: callbacks.Delivery) -> None:
            deliveries.append(delivery)
            assert manager is not None
            await manager.on_callback(delivery)

        receiver = callbacks.CallbackServer(callbacks.CallbackVerifier(key), on_callback)
        await receiver.start("127.0.0.1", 0)
        manager = database_manager.DatabaseManager(
            broker=client,
            kube=kube_api,
            callback_url=f"http://127.0.0.1:{receiver.port}/v1/callback",
            namespaces=[NS],
            on_event=lambda kind, reason, message: emitted.append((kind, reason, message)),
        )
        task = asyncio.create_task(manager.run(), name="database-manager")
        yield {
            "broker": broker,
            "client": client,
            "emitted": emitted,
            "deliveries": deliveries,
            "task": task,
            "kubectl": Kubectl(sandbox_kubeconfig, tmp_path / "kube-cache"),
        }
    finally:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if receiver is not None:
            await receiver.stop()
        if client is not None:
            await client.close()
        await broker.stop()


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not on PATH")
async def test_the_database_manager_end_to_end_create_ready_drift_event_remediation_delete(
    manager_setup: dict[str, Any],
) -> None:
    kubectl: Kubectl = manager_setup["kubectl"]
    client: BrokerClient = manager_setup["client"]
    emitted: list[tuple[str, str, str]] = manager_setup["emitted"]
    task: asyncio.Task[None] = manager_setup["task"]

    def alive() -> None:
        if task.done():
            pytest.fail(f"the manager stopped: {task.exception() if not task.cancelled() else 'cancelled'}")

    async def database() -> dict[str, Any] | None:
        alive()
        return await kubectl.get("database", NAME)

    # 1. A person creates a Database.
    _, out, _ = await kubectl.run("apply", "-f", "-", stdin=DATABASE_YAML)
    assert f"database.platform.company.com/{NAME} created" in out

    # 2. The manager provisions it; the broker's callback makes it Ready.
    db = await until(
        database,
        lambda d: status_of(d).get("phase") == "Ready" and status_of(d).get("deploymentId"),
        within=30,
        what="the Database to be Ready with a deploymentId",
    )
    assert db is not None
    deployment_id = status_of(db)["deploymentId"]
    assert deployment_id.startswith("deploy-")
    assert status_of(db)["observedGeneration"] == db["metadata"]["generation"]
    assert database_manager.FINALIZER in db["metadata"]["finalizers"]
    uid = db["metadata"]["uid"]
    deployment = await client.get_deployment(NS, deployment_id)
    assert deployment.resource_name == NAME
    assert deployment.resource_type == pb.RESOURCE_TYPE_DATABASE
    assert deployment.phase == pb.STATE_READY
    assert deployment.desired_spec.engine == "postgresql"
    assert deployment.desired_spec.version == "15"
    sts = await kubectl.get("statefulset", NAME)
    assert sts is not None
    assert sts["spec"]["replicas"] == 1
    [delivery] = manager_setup["deliveries"]  # signed by the broker, verified by the manager
    assert delivery.payload["deploymentId"] == deployment_id
    assert delivery.payload["status"] == "Ready"

    # 3. A person scales the StatefulSet behind everyone's back.
    await kubectl.run("scale", "statefulset", NAME, "--replicas=3")

    # 4. The manager emits a Kubernetes Event about the drift, on the Database.
    async def drift_events() -> list[dict[str, Any]]:
        alive()
        return [e for e in await kubectl.events_of("Database", NAME) if e.get("reason") == "DriftDetected"]

    [event] = await until(drift_events, bool, within=30, what="a DriftDetected Event for the Database")
    assert event["type"] == "Warning"
    assert event["involvedObject"]["uid"] == uid
    assert event["involvedObject"]["apiVersion"] == "platform.company.com/v1"
    assert event["involvedObject"]["namespace"] == NS
    assert "Replica count mismatch: desired=1, actual=3" in event["message"]
    assert event["source"]["component"] == database_manager.COMPONENT

    # 5. The broker remediates: back at 1 replica, and the Database is Ready again.
    async def replicas() -> int | None:
        alive()
        s = await kubectl.get("statefulset", NAME)
        return None if s is None else int(s["spec"]["replicas"])

    await until(replicas, lambda r: r == 1, within=30, what="the StatefulSet back at 1 replica")
    db = await until(
        database,
        lambda d: status_of(d).get("phase") == "Ready" and status_of(d).get("message") == "Drift resolved",
        within=30,
        what="the Database Ready again after the drift",
    )
    assert status_of(db)["deploymentId"] == deployment_id
    all_reasons = reasons(await kubectl.events_of("Database", NAME))
    for expected in ("Provisioning", "Ready", "DriftDetected", "Remediated", "DriftResolved"):
        assert expected in all_reasons, all_reasons
    drift_log = [
        pb.DriftEventKind.Name(e.kind)
        for e in await client.list_drift_events(NS, deployment_id=deployment_id)
    ]
    for kind in ("DRIFT_DETECTED", "REMEDIATION_SUCCEEDED", "DRIFT_RESOLVED"):
        assert f"DRIFT_EVENT_KIND_{kind}" in drift_log, drift_log
    [state] = await client.get_resource_state(NS, deployment_id=deployment_id)
    assert state.phase == pb.STATE_READY
    assert not state.drift_detected or all(
        i.drift_class == pb.DRIFT_CLASS_EXPECTED for i in state.drift_items
    )

    # 6. A person deletes the Database: the finalizer holds it until the manager has deprovisioned.
    await kubectl.run("delete", "database", NAME, "--wait=false")

    async def leftovers() -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        alive()
        return await kubectl.get("statefulset", NAME), await kubectl.get("database", NAME)

    await until(
        leftovers,
        lambda pair: pair == (None, None),
        within=30,
        what="the StatefulSet and the Database to be gone",
    )

    async def phase() -> int:
        return (await client.get_deployment(NS, deployment_id)).phase

    await until(
        phase, lambda p: p == pb.STATE_DELETED, within=30, what="the broker's deployment to be Deleted"
    )
    deleted = await client.get_deployment(NS, deployment_id)
    assert deleted.last_operation.type == pb.OPERATION_TYPE_DEPROVISION
    assert "Deprovisioned" in [reason for _, reason, _ in emitted]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not on PATH")
async def test_a_database_created_while_the_broker_is_down_is_provisioned_once_it_is_back(
    tmp_path: pathlib.Path,
    tokens_file: pathlib.Path,
    sandbox_kubeconfig: pathlib.Path,
    kube_api: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A broker restart (or any UNAVAILABLE) while a Database is created must only delay it: the
    manager retries the Provision (same request id, so it is safe) instead of forgetting it."""
    await seed_cluster(sandbox_kubeconfig)
    adapter = await kube_client.Client.connect(sandbox_kubeconfig)
    try:
        await adapter.apply(database_manager.DATABASE_CRD)
    finally:
        await adapter.close()
    data_dir = tmp_path / "data"
    kubectl = Kubectl(sandbox_kubeconfig, tmp_path / "kube-cache")

    def settings(addr: str) -> server.Settings:
        return cluster_settings(data_dir, tokens_file, sandbox_kubeconfig, remediate=True, grpc_addr=addr)

    broker = server.Broker(settings("127.0.0.1:0"))
    await broker.start()
    target = f"127.0.0.1:{broker.grpc_port}"
    key = (data_dir / "callback.key").read_bytes().strip()
    client = await BrokerClient.connect(target, token=PLATFORM_TOKEN)
    manager: database_manager.DatabaseManager | None = None

    async def on_callback(delivery: callbacks.Delivery) -> None:
        assert manager is not None
        await manager.on_callback(delivery)

    receiver = callbacks.CallbackServer(callbacks.CallbackVerifier(key), on_callback)
    await receiver.start("127.0.0.1", 0)
    manager = database_manager.DatabaseManager(
        broker=client,
        kube=kube_api,
        callback_url=f"http://127.0.0.1:{receiver.port}/v1/callback",
        namespaces=[NS],
    )
    task = asyncio.create_task(manager.run(), name="database-manager")
    try:
        # The broker goes away; meanwhile a person creates a Database.
        await broker.stop()
        await kubectl.run("apply", "-f", "-", stdin=DATABASE_YAML)

        # The manager saw it (it added its finalizer) and its Provision failed: UNAVAILABLE.
        async def attempted() -> tuple[bool, list[str]]:
            db = await kubectl.get("database", NAME)
            failed = [r.getMessage() for r in caplog.records if r.name == "database-manager"]
            return database_manager.FINALIZER in (
                (db or {}).get("metadata", {}).get("finalizers") or []
            ), failed

        await until(attempted, lambda a: a[0] and a[1], within=30, what="the manager's failed Provision")

        # The broker is back, on the same address.
        broker = server.Broker(settings(target))
        await broker.start()

        async def database() -> dict[str, Any] | None:
            if task.done():
                pytest.fail(
                    f"the manager stopped: {task.exception() if not task.cancelled() else 'cancelled'}"
                )
            return await kubectl.get("database", NAME)

        db = await until(
            database,
            lambda d: status_of(d).get("phase") == "Ready",
            within=20,
            what="the Database to be provisioned once the broker is back",
        )
        assert db is not None
        assert status_of(db)["deploymentId"].startswith("deploy-")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await receiver.stop()
        await client.close()
        await broker.stop()


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not on PATH")
async def test_with_an_alert_only_policy_the_manager_raises_a_drift_alert_and_nothing_is_changed(
    manager_setup: dict[str, Any],
) -> None:
    kubectl: Kubectl = manager_setup["kubectl"]
    client: BrokerClient = manager_setup["client"]
    policy = await client.set_remediation_policy(NS, mode="alert", resource_type="database")
    assert policy.mode == pb.REMEDIATION_MODE_ALERT

    await kubectl.run("apply", "-f", "-", stdin=DATABASE_YAML)
    await until(
        lambda: kubectl.get("database", NAME),
        lambda d: status_of(d).get("phase") == "Ready",
        within=30,
        what="the Database to be Ready",
    )
    await kubectl.run("scale", "statefulset", NAME, "--replicas=2")

    async def alerts() -> list[dict[str, Any]]:
        return [e for e in await kubectl.events_of("Database", NAME) if e.get("reason") == "DriftAlert"]

    [alert] = await until(alerts, bool, within=30, what="a DriftAlert Event for the Database")
    assert alert["type"] == "Warning"
    assert "Replica count mismatch: desired=1, actual=2" in alert["message"]
    db = await kubectl.get("database", NAME)
    assert status_of(db)["phase"] == "DriftDetected"
    assert "Replica count mismatch: desired=1, actual=2" in status_of(db)["message"]
    # Alert only: the broker left the StatefulSet as the person made it.
    sts = await kubectl.get("statefulset", NAME)
    assert sts is not None
    assert sts["spec"]["replicas"] == 2
    assert "DriftDetected" not in reasons(await kubectl.events_of("Database", NAME))

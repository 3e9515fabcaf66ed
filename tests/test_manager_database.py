"""The example Database manager (``broker_client.examples.database_manager``) end to end on the sandbox.

A person drives it with stock kubectl, as in the original design: creates a ``Database``, sees it
become Ready (the broker's signed callback, verified by the manager's ``CallbackServer``), scales its
StatefulSet by hand, sees the manager's Kubernetes Event for the drift and the broker's remediation
back to 1 replica, and deletes the ``Database``: the finalizer makes the manager deprovision.

The sandbox starts without the ``Database`` CRD: the manager installs it (server-side apply), or,
behind an API that forbids it to write CRDs (a proxy answering 403 as RBAC would), uses the one
installed or stops with a message saying how to install it. A Database whose spec the broker
refuses is reported as a failed Provision on the Database, not as a failed watch. ``--advertise``
makes the callback URL, and the flags are those of ``broker get``/``broker watch``.

Also: ``deploy/database-crd.yaml`` is the CRD the manager serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pathlib
import re
import shutil
import socket
import sys
from collections.abc import AsyncIterator
from typing import Any, TypeVar

import aiohttp
import grpc
import pytest
import yaml
from aiohttp import web
from broker_client import callbacks
from broker_client.client import BrokerClient
from broker_client.examples import database_manager
from broker_client.v1 import broker_pb2 as pb
from conftest import PLATFORM_TOKEN, cluster_settings, until
from kube_sandbox import cluster as sandbox_cluster
from kube_sandbox import kubeconfig as sandbox_kubeconfig_file
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio import config as k8s_config
from kubernetes_asyncio.client.exceptions import ApiException

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


async def crd_of(kube_api: Any) -> dict[str, Any] | None:
    """The Database CRD as the API serves it, or None."""
    try:
        found = await k8s.ApiextensionsV1Api(kube_api).read_custom_resource_definition(
            database_manager.CRD_NAME
        )
    except ApiException as e:
        if e.status == 404:
            return None
        raise
    return dict(found.to_dict())


@contextlib.asynccontextmanager
async def running_manager(
    *, tmp_path: pathlib.Path, tokens_file: pathlib.Path, sandbox_kubeconfig: pathlib.Path, kube: Any
) -> AsyncIterator[dict[str, Any]]:
    """A broker that remediates and the manager running as a task, talking to Kubernetes via ``kube``."""
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
            kube=kube,
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


def stopped(task: asyncio.Task[None]) -> None:
    """Fail the test if the manager's task ended (it runs until cancelled)."""
    if task.done():
        pytest.fail(f"the manager stopped: {task.exception() if not task.cancelled() else 'cancelled'}")


@pytest.fixture
async def manager_setup(
    tmp_path: pathlib.Path,
    tokens_file: pathlib.Path,
    sandbox_kubeconfig: pathlib.Path,
    kube_api: Any,
) -> AsyncIterator[dict[str, Any]]:
    """Sandbox *without* the Database CRD, a broker that remediates, and the manager running as a
    task; by the time the test starts the manager has installed the CRD itself."""
    assert await crd_of(kube_api) is None
    async with running_manager(
        tmp_path=tmp_path, tokens_file=tokens_file, sandbox_kubeconfig=sandbox_kubeconfig, kube=kube_api
    ) as setup:

        async def installed() -> dict[str, Any] | None:
            stopped(setup["task"])
            return await crd_of(kube_api)

        await until(installed, bool, within=10, what="the manager to install the Database CRD")
        yield setup


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


# The CRD: installed by the manager, or required with a message that says how -------------------


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not on PATH")
async def test_the_manager_installs_its_crd_with_server_side_apply_on_a_cluster_without_it(
    manager_setup: dict[str, Any], kube_api: Any, caplog: pytest.LogCaptureFixture
) -> None:
    kubectl: Kubectl = manager_setup["kubectl"]
    crd = await crd_of(kube_api)
    assert crd is not None
    assert crd["spec"]["group"] == database_manager.GROUP
    assert any(c["type"] == "Established" and c["status"] == "True" for c in crd["status"]["conditions"])
    managers = {(f["manager"], f["operation"]) for f in crd["metadata"]["managed_fields"]}
    assert (database_manager.COMPONENT, "Apply") in managers

    # A person can use it at once, and the manager never logged a 404 or a failed watch.
    _, out, _ = await kubectl.run("apply", "-f", "-", stdin=DATABASE_YAML)
    assert f"database.platform.company.com/{NAME} created" in out
    await until(
        lambda: kubectl.get("database", NAME),
        lambda d: status_of(d).get("phase") == "Ready",
        within=30,
        what="the Database to be Ready",
    )
    warnings = [r.getMessage() for r in caplog.records if r.name == "database-manager" and r.levelno >= 30]
    assert warnings == []


class ForbiddingApi:
    """A Kubernetes API in front of the sandbox that answers 403 Forbidden to every write of a
    CustomResourceDefinition, as RBAC does for a service account granted only its Databases.
    Everything else is passed through, watches streamed."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.forbidden: list[str] = []
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._session: Any = None
        self._handlers: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        self._session = aiohttp.ClientSession()
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self.handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    async def stop(self) -> None:
        for task in self._handlers:  # watches still streaming through
            task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            return await self._handle(request)
        finally:
            self._handlers.discard(task)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.path.startswith("/apis/apiextensions.k8s.io/") and request.method not in ("GET", "HEAD"):
            self.forbidden.append(f"{request.method} {request.path}")
            return web.json_response(
                {
                    "kind": "Status",
                    "apiVersion": "v1",
                    "status": "Failure",
                    "message": (
                        'customresourcedefinitions.apiextensions.k8s.io "databases.platform.company.com" '
                        'is forbidden: User "system:serviceaccount:team-platform:database-manager" cannot '
                        'patch resource "customresourcedefinitions" in API group "apiextensions.k8s.io" '
                        "at the cluster scope"
                    ),
                    "reason": "Forbidden",
                    "code": 403,
                },
                status=403,
            )
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        async with self._session.request(
            request.method, self.upstream + request.path_qs, headers=headers, data=await request.read()
        ) as upstream:
            response = web.StreamResponse(
                status=upstream.status,
                headers={"Content-Type": upstream.headers.get("Content-Type", "application/json")},
            )
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response


@pytest.fixture
async def forbidding_api(
    sandbox: sandbox_cluster.Sandbox, tmp_path: pathlib.Path
) -> AsyncIterator[tuple[ForbiddingApi, pathlib.Path, Any]]:
    """The proxy, a kubeconfig for it, and a kubernetes-asyncio client through it."""
    proxy = ForbiddingApi(sandbox.url)
    await proxy.start()
    path = sandbox_kubeconfig_file.write(tmp_path / "forbidden.kubeconfig", server=proxy.url)
    configuration = k8s.Configuration()
    await k8s_config.load_kube_config(config_file=str(path), client_configuration=configuration)
    api = k8s.ApiClient(configuration)
    try:
        yield proxy, path, api
    finally:
        await api.close()
        await proxy.stop()


def assert_says_how_to_install(message: str) -> None:
    assert f"the Database CRD {database_manager.CRD_NAME} is not installed" in message
    assert "may not install it (403 Forbidden: " in message
    assert "cannot patch resource" in message  # the API's own reason, trimmed
    assert "kubectl apply -f deploy/database-crd.yaml" in message
    assert "--print-crd | kubectl apply -f -" in message


async def test_without_the_permission_and_without_the_crd_the_manager_stops_saying_how_to_install_it(
    sandbox_kubeconfig: pathlib.Path,
    kube_api: Any,
    forbidding_api: tuple[ForbiddingApi, pathlib.Path, Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    proxy, _, api = forbidding_api
    async with BrokerClient(_unreachable_channel(), token=None, deadline=1.0) as broker:
        manager = database_manager.DatabaseManager(
            broker=broker, kube=api, callback_url="http://127.0.0.1:1/v1/callback", namespaces=[NS]
        )
        with pytest.raises(database_manager.CrdNotInstalled) as info:
            await asyncio.wait_for(manager.run(), 10)

    assert_says_how_to_install(str(info.value))
    assert proxy.forbidden == [
        f"PATCH /apis/apiextensions.k8s.io/v1/customresourcedefinitions/{database_manager.CRD_NAME}"
    ]
    assert await crd_of(kube_api) is None
    assert not [r for r in caplog.records if "404" in r.getMessage() or "watch" in r.getMessage()]


async def test_the_manager_command_exits_1_with_the_message_and_no_traceback(
    sandbox_kubeconfig: pathlib.Path,
    forbidding_api: tuple[ForbiddingApi, pathlib.Path, Any],
    tmp_path: pathlib.Path,
) -> None:
    _, forbidden_kubeconfig, _ = forbidding_api
    key = tmp_path / "callback.key"
    key.write_text("not-the-brokers-key\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "broker_client.examples.database_manager",
        "--target",
        "127.0.0.1:1",
        "-n",
        NS,
        "--callback-key-file",
        str(key),
        "--kubeconfig",
        str(forbidden_kubeconfig),
        "--listen",
        "127.0.0.1:0",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={k: v for k, v in os.environ.items() if not k.startswith("BROKER_")},
    )
    _out, err = await asyncio.wait_for(proc.communicate(), 60)
    text = err.decode()
    assert proc.returncode == 1, text
    assert "Traceback" not in text
    [line] = [line for line in text.splitlines() if "error:" in line]
    assert line.startswith("python -m broker_client.examples.database_manager: error: ")
    assert_says_how_to_install(line)


async def test_print_crd_prints_what_kubectl_applies() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "broker_client.examples.database_manager",
        "--print-crd",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    assert json.loads(out) == database_manager.DATABASE_CRD


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not on PATH")
async def test_without_the_permission_but_with_the_crd_installed_the_manager_uses_it(
    tmp_path: pathlib.Path,
    tokens_file: pathlib.Path,
    sandbox_kubeconfig: pathlib.Path,
    forbidding_api: tuple[ForbiddingApi, pathlib.Path, Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    proxy, _, api = forbidding_api
    caplog.set_level(logging.INFO, logger="database-manager")
    adapter = await kube_client.Client.connect(sandbox_kubeconfig)  # a cluster admin installed it
    try:
        await adapter.apply(database_manager.DATABASE_CRD)
    finally:
        await adapter.close()

    async with running_manager(
        tmp_path=tmp_path, tokens_file=tokens_file, sandbox_kubeconfig=sandbox_kubeconfig, kube=api
    ) as setup:
        kubectl: Kubectl = setup["kubectl"]
        await kubectl.run("apply", "-f", "-", stdin=DATABASE_YAML)

        async def database() -> dict[str, Any] | None:
            stopped(setup["task"])
            return await kubectl.get("database", NAME)

        await until(
            database,
            lambda d: status_of(d).get("phase") == "Ready",
            within=30,
            what="the Database to be Ready",
        )
    assert len(proxy.forbidden) == 1
    [note] = [r.getMessage() for r in caplog.records if "may not update it" in r.getMessage()]
    assert f"the Database CRD {database_manager.CRD_NAME} is installed" in note
    assert "403 Forbidden" in note


def _unreachable_channel() -> Any:
    return grpc.aio.insecure_channel("127.0.0.1:1")


# A Provision the broker refuses -----------------------------------------------------------------


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not on PATH")
async def test_a_database_the_broker_refuses_is_a_failed_provision_on_the_database_not_a_failed_watch(
    manager_setup: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    kubectl: Kubectl = manager_setup["kubectl"]
    client: BrokerClient = manager_setup["client"]
    bad = DATABASE_YAML.replace(f"name: {NAME}", "name: bad-db").replace("size: medium", "size: gigantic")
    await kubectl.run("apply", "-f", "-", stdin=bad)

    async def database() -> dict[str, Any] | None:
        stopped(manager_setup["task"])
        return await kubectl.get("database", "bad-db")

    db = await until(database, lambda d: status_of(d).get("phase") == "Failed", within=30, what="Failed")
    assert db is not None
    message = status_of(db)["message"]
    assert message.startswith("Provision failed: INVALID_ARGUMENT: ")
    assert "spec.size" in message
    assert "'gigantic' is not a size tier" in message
    assert status_of(db)["observedGeneration"] == db["metadata"]["generation"]
    assert "deploymentId" not in status_of(db)
    [event] = [e for e in await kubectl.events_of("Database", "bad-db") if e["reason"] == "ProvisionFailed"]
    assert event["type"] == "Warning"
    assert "'gigantic' is not a size tier" in event["message"]
    assert list(await client.get_resource_state(NS, resource_name="bad-db")) == []

    # A person fixes the spec: the new generation is provisioned.
    await kubectl.run("apply", "-f", "-", stdin=bad.replace("size: gigantic", "size: medium"))
    fixed = await until(database, lambda d: status_of(d).get("phase") == "Ready", within=30, what="Ready")
    assert fixed is not None
    assert status_of(fixed)["deploymentId"].startswith("deploy-")

    logged = [r.getMessage() for r in caplog.records if r.name == "database-manager"]
    failed = [m for m in logged if m.startswith(f"provision of {NS}/bad-db failed: ")]
    assert len(failed) == 1, logged  # said once, not retried in a loop
    assert "INVALID_ARGUMENT" in failed[0]
    assert "'gigantic' is not a size tier" in failed[0]
    assert not [m for m in logged if "watch" in m], logged


# --advertise and the callback URL ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("advertise", "url"),
    [
        ("http://database-manager:8080", "http://database-manager:8080/v1/callback"),
        ("database-manager:8080", "http://database-manager:8080/v1/callback"),
        (
            "https://db-manager.team-platform.svc:8443/",
            "https://db-manager.team-platform.svc:8443/v1/callback",
        ),
        ("http://database-manager", "http://database-manager/v1/callback"),
        ("10.0.3.7:8080", "http://10.0.3.7:8080/v1/callback"),
        ("[fd00::7]:8080", "http://[fd00::7]:8080/v1/callback"),
        ("HTTP://Manager:8080", "http://Manager:8080/v1/callback"),
    ],
)
def test_advertise_becomes_the_callback_url(advertise: str, url: str) -> None:
    assert database_manager.callback_url(advertise) == url


@pytest.mark.parametrize(
    ("advertise", "says"),
    [
        ("http://database-manager:8080:8080", "the port must be one number between 1 and 65535"),
        ("database-manager:8080:8080", "the port must be one number between 1 and 65535"),
        ("database-manager:http", "the port must be one number between 1 and 65535"),
        ("http://database-manager:99999", "the port must be one number between 1 and 65535"),
        ("database-manager:0", "the port must be between 1 and 65535"),
        ("database-manager", "has no port: give host:port or a URL"),
        ("http://database-manager:8080/v1/callback", "has a path (/v1/callback)"),
        ("ftp://database-manager:21", "the scheme must be http or https"),
        ("http://user:pw@database-manager:8080", "user info is not allowed"),
        ("http://database-manager:8080?x=1", "a query or fragment is not allowed"),
        ("http://:8080", "is not a host name"),
        ("http://data base:8080", "is not a URL"),
        ("", "is not a URL"),
    ],
)
def test_a_bad_advertise_is_a_clear_error(advertise: str, says: str) -> None:
    with pytest.raises(ValueError, match=re.escape(says)):
        database_manager.callback_url(advertise)


def test_a_bad_advertise_flag_is_a_usage_error_naming_the_flag(
    capsys: pytest.CaptureFixture[str], tmp_path: pathlib.Path
) -> None:
    with pytest.raises(SystemExit) as info:
        database_manager.build_parser().parse_args(
            ["-n", NS, "--callback-key-file", "k", "--advertise", "http://manager:8080:8080"]
        )
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "error: argument --advertise: 'http://manager:8080:8080': the port must be one number" in err


@contextlib.asynccontextmanager
async def run_manager_task(
    tmp_path: pathlib.Path, tokens_file: pathlib.Path, sandbox_kubeconfig: pathlib.Path, **kwargs: Any
) -> AsyncIterator[tuple[BrokerClient, Kubectl]]:
    """``run_manager`` (what the command runs) as a task, with a broker, on the seeded sandbox."""
    data_dir = tmp_path / "data"
    broker = server.Broker(cluster_settings(data_dir, tokens_file, sandbox_kubeconfig))
    await broker.start()
    target = f"127.0.0.1:{broker.grpc_port}"
    task = asyncio.create_task(
        database_manager.run_manager(
            broker_target=target,
            token=PLATFORM_TOKEN,
            namespaces=[NS],
            callback_key=(data_dir / "callback.key").read_bytes().strip(),
            kubeconfig=str(sandbox_kubeconfig),
            callback_host="127.0.0.1",
            **kwargs,
        )
    )
    try:
        async with await BrokerClient.connect(target, token=PLATFORM_TOKEN) as client:
            yield client, Kubectl(sandbox_kubeconfig, tmp_path / "kube-cache")
        if task.done():
            task.result()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await broker.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not on PATH")
async def test_the_manager_is_called_back_on_the_advertised_host_port(
    tmp_path: pathlib.Path, tokens_file: pathlib.Path, sandbox_kubeconfig: pathlib.Path
) -> None:
    port = free_port()
    async with run_manager_task(
        tmp_path, tokens_file, sandbox_kubeconfig, callback_port=port, advertise=f"127.0.0.1:{port}"
    ) as (client, kubectl):
        await until(
            lambda: kubectl.run("get", "crd", database_manager.CRD_NAME, check=False),
            lambda r: r[0] == 0,
            within=10,
            what="the CRD",
        )
        await kubectl.run("apply", "-f", "-", stdin=DATABASE_YAML)
        db = await until(
            lambda: kubectl.get("database", NAME),
            lambda d: status_of(d).get("phase") == "Ready",  # only the callback makes it Ready
            within=30,
            what="the Database to be Ready",
        )
        deployment = await client.get_deployment(NS, status_of(db)["deploymentId"])
    assert deployment.callback_url == f"http://127.0.0.1:{port}/v1/callback"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not on PATH")
async def test_without_advertise_the_callback_url_names_the_manager_service_and_the_port_listened_on(
    tmp_path: pathlib.Path, tokens_file: pathlib.Path, sandbox_kubeconfig: pathlib.Path
) -> None:
    async with run_manager_task(
        tmp_path, tokens_file, sandbox_kubeconfig, callback_port=0, advertise=None
    ) as (client, kubectl):
        await until(
            lambda: kubectl.run("get", "crd", database_manager.CRD_NAME, check=False),
            lambda r: r[0] == 0,
            within=10,
            what="the CRD",
        )
        await kubectl.run("apply", "-f", "-", stdin=DATABASE_YAML)
        db = await until(
            lambda: kubectl.get("database", NAME),
            lambda d: bool(status_of(d).get("deploymentId")),
            within=30,
            what="the Database to be handed to the broker",
        )
        deployment = await client.get_deployment(NS, status_of(db)["deploymentId"])
    found = re.fullmatch(r"http://database-manager:(\d+)/v1/callback", deployment.callback_url)
    assert found, deployment.callback_url
    assert int(found.group(1)) > 0


# The flags: those of broker get / broker watch ----------------------------------------------------


def test_the_manager_takes_target_token_and_repeatable_namespace_flags(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("BROKER_TARGET", raising=False)
    monkeypatch.delenv("BROKER_TOKEN", raising=False)
    args = database_manager.build_parser().parse_args(
        [
            "--target",
            "broker:50051",
            "--token",
            "t0k",
            "-n",
            "a",
            "--namespace",
            "b",
            "--callback-key-file",
            "k",
        ]
    )
    assert (args.target, args.token, args.namespace, args.tls) == ("broker:50051", "t0k", ["a", "b"], False)
    assert args.listen == ("0.0.0.0", 8080)

    defaults = database_manager.build_parser().parse_args(["-n", "a", "--callback-key-file", "k"])
    assert (defaults.target, defaults.token) == ("localhost:50051", None)

    monkeypatch.setenv("BROKER_TARGET", "from-env:1")
    monkeypatch.setenv("BROKER_TOKEN", "env-token")
    from_env = database_manager.build_parser().parse_args(["-n", "a", "--callback-key-file", "k"])
    assert (from_env.target, from_env.token) == ("from-env:1", "env-token")


def test_the_old_broker_flag_still_works_hidden_and_says_it_is_deprecated(
    capsys: pytest.CaptureFixture[str],
) -> None:
    parser = database_manager.build_parser()
    args = parser.parse_args(["--broker", "old:50051", "-n", "a", "--callback-key-file", "k"])
    assert args.target == "old:50051"
    assert "--broker is deprecated; use --target" in capsys.readouterr().err
    assert "--broker" not in parser.format_help()

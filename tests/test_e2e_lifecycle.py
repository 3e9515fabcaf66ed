"""End to end: a resource's life on an imperfect cluster, as a manager and an operator see it.

Crashing pods and healing, an API outage, missed watches, a broker restarted in the middle of
provisioning, a callback receiver that is down for a while, deprovisioning with either data policy,
and an update of the spec. Every wait polls against a deadline.
"""

from __future__ import annotations

import asyncio
import gc
import pathlib
import shutil
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import grpc
import pytest
from aiohttp import web
from broker_client.v1 import broker_pb2 as pb
from broker_client.v1 import broker_pb2_grpc
from conftest import PLATFORM_PROFILE, CallbackReceiver, Delivery, RunningBroker, cluster_settings
from test_e2e_drift import AUTH, HTTP_HEADERS, NS, Kubectl, Manager, item_of, unexpected_rules, until

from broker import callbacks, server

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not on PATH")


@pytest.fixture
def kubectl(sandbox_kubeconfig: pathlib.Path, tmp_path: pathlib.Path) -> Kubectl:
    return Kubectl(sandbox_kubeconfig, tmp_path / "kube-cache")


@pytest.fixture
async def manager(cluster_broker: RunningBroker) -> AsyncIterator[Manager]:
    async with (
        grpc.aio.insecure_channel(cluster_broker.grpc_target) as channel,
        aiohttp.ClientSession(base_url=cluster_broker.http_url, headers=HTTP_HEADERS) as http,
    ):
        yield Manager(broker_pb2_grpc.BrokerServiceStub(channel), http)


async def health_of(
    manager: Manager, deployment_id: str, health: int, *, within: float = 10
) -> pb.ResourceState:
    state = await until(
        lambda: manager.state(deployment_id),
        lambda s: s is not None and s.health_status == health,
        within=within,
        what=f"health {pb.HealthStatus.Name(health)}",  # type: ignore[arg-type]
    )
    assert state is not None
    return state


# Health -------------------------------------------------------------------------------------------


async def test_a_crashing_pod_makes_the_resource_unhealthy_and_healing_brings_healthy_back(
    manager: Manager, sandbox: Any
) -> None:
    deployment_id = (await manager.provision("db-crash")).deployment_id
    await manager.wait_ready(deployment_id)

    sandbox.faults.crash_pod(namespace=NS, name="db-crash-0")
    state = await until(
        lambda: manager.state(deployment_id),
        lambda s: (
            s is not None and s.health_status in (pb.HEALTH_STATUS_UNHEALTHY, pb.HEALTH_STATUS_DEGRADED)
        ),
        within=10,
        what="the crash to show in health",
    )
    assert state is not None
    # The only replica is not ready: DESIGN 5 says Unhealthy.
    assert state.health_status == pb.HEALTH_STATUS_UNHEALTHY
    doc = await manager.http_state(deployment_id)
    assert doc is not None
    assert doc["healthStatus"] == "Unhealthy"
    assert "Unhealthy" in doc["message"]

    sandbox.faults.heal_pod(namespace=NS, name="db-crash-0")
    state = await health_of(manager, deployment_id, pb.HEALTH_STATUS_HEALTHY)
    assert state.phase == pb.STATE_READY
    doc = await manager.http_state(deployment_id)
    assert doc is not None
    assert doc["healthStatus"] == "Healthy"


async def test_one_of_two_replicas_crashing_is_degraded(manager: Manager, sandbox: Any) -> None:
    spec = {"engine": "postgresql", "version": "15", "size": "small", "replicas": 2}
    deployment_id = (await manager.provision("db-pair", spec)).deployment_id
    await manager.wait_ready(deployment_id)

    sandbox.faults.crash_pod(namespace=NS, name="db-pair-1")
    state = await health_of(manager, deployment_id, pb.HEALTH_STATUS_DEGRADED)
    assert state.resource_usage.replicas == 2
    doc = await manager.http_state(deployment_id)
    assert doc is not None
    assert doc["healthStatus"] == "Degraded"

    sandbox.faults.heal_pod(namespace=NS, name="db-pair-1")
    await health_of(manager, deployment_id, pb.HEALTH_STATUS_HEALTHY)


async def test_an_api_outage_is_unknown_not_made_up_and_the_truth_comes_back(
    manager: Manager, sandbox: Any
) -> None:
    deployment_id = (await manager.provision("db-outage")).deployment_id
    await manager.wait_ready(deployment_id)

    await sandbox.faults.pause()
    try:
        state = await health_of(manager, deployment_id, pb.HEALTH_STATUS_UNKNOWN)
        assert not state.HasField("actual_spec")
        assert not state.HasField("resource_usage")
        assert not state.HasField("estimated_monthly_cost")
        assert state.desired_spec.version == "15"  # the desired side is still known
        doc = await manager.http_state(deployment_id)
        assert doc is not None
        assert doc["healthStatus"] == "Unknown"
        assert "actualSpec" not in doc
        assert "resourceUsage" not in doc
        assert "estimatedMonthlyCost" not in doc
        assert doc["desiredSpec"]["engine"] == "postgresql"
    finally:
        await sandbox.faults.resume()

    # The informers reconnect with backoff.
    state = await health_of(manager, deployment_id, pb.HEALTH_STATUS_HEALTHY, within=20)
    assert state.HasField("actual_spec")
    assert state.actual_spec.version == "15.2"
    assert state.actual_spec.replicas == 1
    assert state.phase == pb.STATE_READY
    doc = await manager.http_state(deployment_id)
    assert doc is not None
    assert doc["healthStatus"] == "Healthy"
    assert doc["actualSpec"]["version"] == "15.2"


# Missed watches -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["drop", "expire", "blocked-while-changed"])
async def test_a_change_made_around_a_missed_watch_is_still_seen(
    manager: Manager, kubectl: Kubectl, sandbox: Any, cluster_broker: RunningBroker, fault: str
) -> None:
    deployment_id = (await manager.provision("db-watch")).deployment_id
    await manager.wait_ready(deployment_id)
    cluster = cluster_broker.broker.cluster
    assert cluster is not None
    sts_informer = cluster.informers["StatefulSet"]
    relists = sts_informer.relists

    if fault == "drop":
        assert sandbox.faults.drop_watches() >= len(cluster.informers) - 1
        await kubectl.run("scale", "statefulset", "db-watch", "--replicas=3")
    elif fault == "expire":
        # Every re-watch gets 410 Gone: the informers must relist to catch up.
        sandbox.faults.expire_watches(len(cluster.informers))
        sandbox.faults.drop_watches()
        await kubectl.run("scale", "statefulset", "db-watch", "--replicas=3")
    else:
        # The broker's (cluster-wide) StatefulSet list and watch fail while kubectl's namespaced
        # scale goes through: the change happens while nothing watches.
        sandbox.faults.fail_requests(status=500, path_prefix="/apis/apps/v1/statefulsets")
        sandbox.faults.drop_watches()
        await until(
            lambda: asyncio.sleep(0, sts_informer.last_error),
            bool,
            within=10,
            what="the StatefulSet informer to fail",
        )
        await kubectl.run("scale", "statefulset", "db-watch", "--replicas=3")
        sandbox.faults.clear()

    state = await until(
        lambda: manager.state(deployment_id),
        lambda s: (i := item_of(s, "replicas.changed")) is not None and i.actual == "3",
        within=20,
        what="the scale to be seen",
    )
    assert state is not None
    assert unexpected_rules(state) == ["replicas.changed"]
    assert state.actual_spec.replicas == 3
    if fault != "drop":
        assert sts_informer.relists > relists


# Callbacks ----------------------------------------------------------------------------------------


class RecordingReceiver(CallbackReceiver):
    """A callback receiver that also records every attempt, failed ones included."""

    def __init__(self) -> None:
        super().__init__()
        self.attempts: list[tuple[Delivery, int]] = []

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        attempt = Delivery(
            delivery_id=request.headers.get(callbacks.DELIVERY_HEADER, ""),
            timestamp=request.headers.get(callbacks.TIMESTAMP_HEADER, ""),
            signature=request.headers.get(callbacks.SIGNATURE_HEADER, ""),
            body=body,
        )
        self.attempts.append((attempt, 503 if self.failing else 204))
        if self.failing:
            return web.Response(status=503)
        async with self.arrived:
            self.deliveries.append(attempt)
            self.arrived.notify_all()
        return web.Response(status=204)


@pytest.fixture
async def recording_receiver() -> AsyncIterator[RecordingReceiver]:
    receiver = RecordingReceiver()
    app = web.Application()
    app.router.add_post("/v1/callback", receiver.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    receiver.url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1/callback"
    try:
        yield receiver
    finally:
        await runner.cleanup()


async def test_a_callback_receiver_down_for_a_while_gets_the_callback_once_back(
    manager: Manager, recording_receiver: RecordingReceiver, cluster_broker: RunningBroker
) -> None:
    recording_receiver.failing = True
    deployment_id = (
        await manager.provision("db-callback", callback_url=recording_receiver.url)
    ).deployment_id
    await manager.wait_ready(deployment_id)
    # The outbox retries with backoff starting at 1 s: wait for two refused attempts.
    await until(
        lambda: asyncio.sleep(0, len(recording_receiver.attempts)),
        lambda n: n >= 2,
        within=10,
        what="two failed delivery attempts",
    )
    recording_receiver.failing = False

    (delivery,) = await recording_receiver.wait_for(1, within=15)
    key = (cluster_broker.data_dir / "callback.key").read_bytes().strip()
    assert delivery.signature == callbacks.sign(key, delivery.delivery_id, delivery.timestamp, delivery.body)
    assert delivery.payload["deploymentId"] == deployment_id
    assert delivery.payload["status"] == "Ready"
    # Every attempt carried the same delivery id and body, so the manager can de-duplicate.
    assert {a.delivery_id for a, _ in recording_receiver.attempts} == {delivery.delivery_id}
    assert {a.body for a, _ in recording_receiver.attempts} == {delivery.body}
    assert [code for _, code in recording_receiver.attempts][-1] == 204
    assert [code for _, code in recording_receiver.attempts].count(204) == 1

    # Delivered means done: no further attempt comes after the success (the dispatcher polls every 1 s).
    dispatcher = cluster_broker.broker.dispatcher
    assert dispatcher is not None
    await until(lambda: asyncio.sleep(0, dispatcher.delivered), lambda n: n == 1, within=5, what="delivered")
    attempts = len(recording_receiver.attempts)
    await asyncio.sleep(1.5)
    assert len(recording_receiver.attempts) == attempts
    assert len(recording_receiver.deliveries) == 1


# Deprovision --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("transport", "policy"), [("grpc", "keep"), ("http", "delete"), ("grpc", "delete"), ("http", "keep")]
)
async def test_deprovision_removes_the_workload_and_keeps_or_deletes_the_data(
    manager: Manager, kubectl: Kubectl, transport: str, policy: str
) -> None:
    name = f"db-gone-{transport}-{policy}"
    deployment_id = (await manager.provision(name)).deployment_id
    await manager.wait_ready(deployment_id)
    claim = f"data-{name}-0"
    assert await kubectl.get("persistentvolumeclaim", claim) is not None
    assert await kubectl.get("secret", f"{name}-credentials") is not None

    if transport == "grpc":
        data_policy = {"keep": pb.DATA_POLICY_KEEP, "delete": pb.DATA_POLICY_DELETE}[policy]
        reply = await manager.stub.Deprovision(
            pb.DeprovisionRequest(namespace=NS, deployment_id=deployment_id, data_policy=data_policy),
            metadata=AUTH,
        )
        assert reply.phase == pb.STATE_DELETING
    else:
        params = {"namespace": NS, "dataPolicy": policy}
        async with manager.http.delete(f"/v1/deployments/{deployment_id}", params=params) as r:
            assert r.status == 202, await r.text()
            assert (await r.json())["phase"] == "Deleting"

    deployment = await until(
        lambda: manager.deployment(deployment_id),
        lambda d: d.phase == pb.STATE_DELETED,
        within=15,
        what="the deployment to be Deleted",
    )
    assert deployment.last_operation.type == pb.OPERATION_TYPE_DEPROVISION
    assert deployment.last_operation.state == pb.OPERATION_STATE_SUCCEEDED
    for kind, obj in (("statefulset", name), ("service", name), ("secret", f"{name}-credentials")):
        assert await kubectl.get(kind, obj) is None, f"{kind} {obj} is still there"
    pods = await until(
        lambda: kubectl.run("get", "pods", "-l", f"app.kubernetes.io/name={name}", "-o", "name"),
        lambda out: out[1].strip() == "",
        within=10,
        what="the pods to go",
    )
    assert pods[1].strip() == ""
    if policy == "keep":
        assert await kubectl.get("persistentvolumeclaim", claim) is not None
    else:
        await until(
            lambda: kubectl.get("persistentvolumeclaim", claim),
            lambda c: c is None,
            within=10,
            what=f"{claim} to be deleted",
        )
    assert await manager.state(deployment_id) is None
    assert await manager.http_state(deployment_id) is None
    async with manager.http.get(f"/v1/deployments/{deployment_id}", params={"namespace": NS}) as r:
        assert r.status == 200
        assert (await r.json())["deployment"]["phase"] == "Deleted"


# Update -------------------------------------------------------------------------------------------


async def test_an_update_accepted_while_provisioning_waits_is_carried_out_at_once(
    manager: Manager, kubectl: Kubectl, sandbox: Any
) -> None:
    """The operation under way gives way to the newer one, which starts then, not at the next
    sweep of unfinished operations (30 s): the workload read back has the update's replicas."""
    sandbox.faults.fail_readiness(namespace=NS, name="db-early-0")  # the first operation waits
    try:
        first = await manager.provision("db-early")
        await until(
            lambda: kubectl.get("statefulset", "db-early"), lambda s: s is not None, within=10, what="applied"
        )
        spec = {"engine": "postgresql", "version": "15", "size": "medium", "replicas": 2}
        second = await manager.provision("db-early", spec)
        assert second.generation == 2
        sts = await until(
            lambda: kubectl.get("statefulset", "db-early"),
            lambda s: s is not None and s["spec"]["replicas"] == 2,
            within=10,
            what="the update applied",
        )
        assert sts["metadata"]["annotations"]["broker.platform/generation"] == "2"
    finally:
        sandbox.faults.heal_pod(namespace=NS, name="db-early-0")
    deployment = await until(
        lambda: manager.deployment(first.deployment_id),
        lambda d: d.phase == pb.STATE_READY and d.last_operation.generation == 2,
        within=15,
        what="generation 2 Ready",
    )
    assert deployment.desired_spec.replicas == 2


async def test_reprovisioning_with_two_replicas_updates_the_workload(
    manager: Manager, kubectl: Kubectl, recording_receiver: RecordingReceiver
) -> None:
    first = await manager.provision("db-grow", callback_url=recording_receiver.url)
    await manager.wait_ready(first.deployment_id)
    await recording_receiver.wait_for(1)

    spec = {"engine": "postgresql", "version": "15", "size": "medium", "replicas": 2}
    second = await manager.provision("db-grow", spec, callback_url=recording_receiver.url)
    assert second.deployment_id == first.deployment_id
    assert second.generation == 2
    assert second.operation.type == pb.OPERATION_TYPE_UPDATE

    deployment = await until(
        lambda: manager.deployment(first.deployment_id),
        lambda d: d.phase == pb.STATE_READY and d.last_operation.generation == 2,
        within=15,
        what="generation 2 to be Ready",
    )
    assert deployment.generation == 2
    assert deployment.desired_spec.replicas == 2
    assert deployment.last_operation.state == pb.OPERATION_STATE_SUCCEEDED
    sts = await kubectl.get("statefulset", "db-grow")
    assert sts is not None
    assert sts["spec"]["replicas"] == 2
    assert sts["metadata"]["annotations"]["broker.platform/generation"] == "2"

    state = await until(
        lambda: manager.state(first.deployment_id),
        lambda s: (
            s is not None
            and s.phase == pb.STATE_READY
            and s.health_status == pb.HEALTH_STATUS_HEALTHY
            and s.actual_spec.replicas == 2
        ),
        within=15,
        what="the state to return to Ready with 2 replicas",
    )
    assert state is not None
    assert state.generation == 2
    assert [i.rule_id for i in state.drift_items] == ["version.patch"]
    assert state.resource_usage.replicas == 2
    assert state.estimated_monthly_cost == pytest.approx(91.0)
    doc = await manager.http_state(first.deployment_id)
    assert doc is not None
    assert doc["phase"] == "Ready"
    assert doc["driftDetails"] == [
        "Version mismatch: desired=15, actual=15.2",
        "This is expected patch version drift",
    ]
    assert int(doc["generation"]) == 2

    # The manager hears about generation 2 too.
    deliveries = await recording_receiver.wait_for(2)
    assert [d.payload["generation"] for d in deliveries] == [1, 2]
    assert deliveries[1].payload["status"] == "Ready"
    assert deliveries[0].delivery_id != deliveries[1].delivery_id


# Restart ------------------------------------------------------------------------------------------


class TestABrokerStoppedMidProvision:
    @pytest.fixture
    def sandbox_options(self) -> dict[str, object]:
        """Pods take 3 s to become ready, so there is time to stop the broker in between."""
        return {"ready_delay": 3.0, "crash_interval": 0.2, "profile": PLATFORM_PROFILE}

    async def test_finishes_the_provisioning_after_restart(
        self,
        tmp_path: pathlib.Path,
        tokens_file: pathlib.Path,
        sandbox_kubeconfig: pathlib.Path,
        kubectl: Kubectl,
        recording_receiver: RecordingReceiver,
    ) -> None:
        settings = cluster_settings(tmp_path / "data", tokens_file, sandbox_kubeconfig)

        first = server.Broker(settings)
        await first.start()
        try:
            assert first.cluster is not None
            assert await first.cluster.wait_synced(10.0)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{first.grpc_port}") as channel:
                stub = broker_pb2_grpc.BrokerServiceStub(channel)
                reply = await stub.Provision(
                    pb.ProvisionRequest(
                        namespace=NS,
                        resource_type=pb.RESOURCE_TYPE_DATABASE,
                        resource_name="db-restart",
                        spec=pb.ResourceSpec(engine="postgresql", version="15", size="medium"),
                        callback_url=recording_receiver.url,
                    ),
                    metadata=AUTH,
                )
                deployment_id = reply.deployment_id
                # Stop once the objects are applied and the pod is still starting.
                await until(
                    lambda: kubectl.get("pod", "db-restart-0"),
                    lambda p: p is not None,
                    within=10,
                    what="the pod to be created",
                )
                got = await stub.GetDeployment(
                    pb.GetDeploymentRequest(namespace=NS, deployment_id=deployment_id), metadata=AUTH
                )
                assert got.deployment.phase == pb.STATE_PROVISIONING
            secret = await kubectl.get("secret", "db-restart-credentials")
            assert secret is not None
        finally:
            await first.stop()
        pod = await kubectl.get("pod", "db-restart-0")
        assert pod is not None
        assert not any(
            c["type"] == "Ready" and c["status"] == "True"
            for c in pod.get("status", {}).get("conditions", [])
        ), "the pod became ready before the broker was stopped; the test proves nothing"
        assert recording_receiver.attempts == []

        second = server.Broker(settings)
        await second.start()
        try:
            async with (
                grpc.aio.insecure_channel(f"127.0.0.1:{second.grpc_port}") as channel,
                aiohttp.ClientSession(
                    base_url=f"http://127.0.0.1:{second.http_port}", headers=HTTP_HEADERS
                ) as http,
            ):
                manager = Manager(broker_pb2_grpc.BrokerServiceStub(channel), http)
                deployment = await until(
                    lambda: manager.deployment(deployment_id),
                    lambda d: d.phase == pb.STATE_READY,
                    within=20,
                    what="the restarted broker to finish provisioning",
                )
                assert deployment.last_operation.state == pb.OPERATION_STATE_SUCCEEDED
                assert deployment.generation == 1
                (delivery,) = await recording_receiver.wait_for(1, within=15)
                assert delivery.payload["deploymentId"] == deployment_id
                assert delivery.payload["status"] == "Ready"
                assert delivery.payload["message"] == "Database is running and healthy"
                state = await manager.wait_ready(deployment_id)
                assert state.actual_spec.version == "15.2"
            # Resuming re-applied, but did not rotate the credentials under the starting database.
            again = await kubectl.get("secret", "db-restart-credentials")
            assert again is not None
            assert again["data"] == secret["data"]
        finally:
            await second.stop()


async def test_finished_operations_leave_nothing_behind_in_the_broker(manager: Manager) -> None:
    """An operation's task is let go once it finished: a broker that provisioned 10,000 resources
    must not hold 10,000 finished tasks (and their coroutines) for the rest of its life."""
    replies = [await manager.provision(f"db-done-{i}") for i in range(3)]
    for reply in replies:
        await until(
            lambda reply=reply: manager.deployment(reply.deployment_id),
            lambda d: d.phase == pb.STATE_READY,
            within=15,
            what="Ready",
        )
    names = {f"op-{reply.deployment_id}" for reply in replies}

    async def kept() -> list[str]:
        gc.collect()
        return [
            o.get_name() for o in gc.get_objects() if isinstance(o, asyncio.Task) and o.get_name() in names
        ]

    # Ready is recorded before the operation's last steps (its log line) are done.
    assert await until(kept, lambda tasks: not tasks, within=5, what="the tasks let go") == []

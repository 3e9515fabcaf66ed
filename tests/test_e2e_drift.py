"""End to end: every row of DESIGN section 5's drift table, induced the way a person would.

A broker provisions into the sandbox; once the resource is Ready, stock ``kubectl`` changes the
cluster behind the broker's back, and the drift must show through ``GetResourceState`` (gRPC) and
``GET /v1/resources`` (the seed's JSON) with the rule, class, action, sentence and who did it.
There is no auto-remediation yet, so the drift simply stays reported.

The helpers at the top (kubectl runner, polling, a manager-side client) are shared with
``test_e2e_lifecycle.py``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import pathlib
import shutil
import time
from collections.abc import AsyncIterator
from typing import Any, TypeVar

import aiohttp
import grpc
import pytest
from broker_client.v1 import broker_pb2 as pb
from broker_client.v1 import broker_pb2_grpc
from conftest import PLATFORM_TOKEN, RunningBroker, bearer, until

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not on PATH")

NS = "team-platform"
AUTH = bearer(PLATFORM_TOKEN)
HTTP_HEADERS = {"Authorization": f"Bearer {PLATFORM_TOKEN}"}
POSTGRES_15 = {"engine": "postgresql", "version": "15", "size": "medium"}

T = TypeVar("T")


# Shared helpers -----------------------------------------------------------------------------------


class Kubectl:
    """Stock kubectl against the sandbox, run as a subprocess so the in-process servers keep serving."""

    def __init__(self, kubeconfig: pathlib.Path, cache: pathlib.Path) -> None:
        self.base = ["kubectl", f"--kubeconfig={kubeconfig}", f"--cache-dir={cache}", "-n", NS]

    async def run(self, *args: str, check: bool = True) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            *self.base,
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=dict(os.environ),
        )
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        code = proc.returncode or 0
        if check and code != 0:
            pytest.fail(f"kubectl {' '.join(args)} failed ({code}): {err.decode()}")
        return code, out.decode(), err.decode()

    async def get(self, kind: str, name: str) -> dict[str, Any] | None:
        """The object as JSON (managed fields included), or None when it does not exist."""
        code, out, err = await self.run("get", kind, name, "-o", "json", "--show-managed-fields", check=False)
        if code != 0:
            if "NotFound" in err or "not found" in err:
                return None
            pytest.fail(f"kubectl get {kind} {name} failed ({code}): {err}")
        return dict(json.loads(out))


@pytest.fixture
def kubectl(sandbox_kubeconfig: pathlib.Path, tmp_path: pathlib.Path) -> Kubectl:
    return Kubectl(sandbox_kubeconfig, tmp_path / "kube-cache")


class Manager:
    """What a manager holds: a gRPC stub and an HTTP session on one broker, as the platform principal."""

    def __init__(self, stub: broker_pb2_grpc.BrokerServiceStub, http: aiohttp.ClientSession) -> None:
        self.stub = stub
        self.http = http

    async def provision(
        self,
        name: str,
        spec: dict[str, Any] | None = None,
        *,
        resource_type: int = pb.RESOURCE_TYPE_DATABASE,
        callback_url: str = "",
        topic: pb.TopicSpec | None = None,
    ) -> pb.ProvisionResponse:
        fields = dict(POSTGRES_15 if spec is None else spec)
        if topic is not None:
            fields["topic"] = topic
        reply: pb.ProvisionResponse = await self.stub.Provision(
            pb.ProvisionRequest(
                namespace=NS,
                resource_type=resource_type,  # type: ignore[arg-type]
                resource_name=name,
                spec=pb.ResourceSpec(**fields),
                callback_url=callback_url,
            ),
            metadata=AUTH,
        )
        return reply

    async def state(self, deployment_id: str) -> pb.ResourceState | None:
        reply = await self.stub.GetResourceState(
            pb.GetResourceStateRequest(namespace=NS, deployment_id=deployment_id), metadata=AUTH
        )
        return reply.resources[0] if reply.resources else None

    async def http_state(self, deployment_id: str) -> dict[str, Any] | None:
        async with self.http.get(
            "/v1/resources", params={"namespace": NS, "deploymentId": deployment_id}
        ) as r:
            assert r.status == 200, await r.text()
            listing = await r.json()
        assert listing["namespace"] == NS
        resources = listing["resources"]
        assert listing["total"] == len(resources)
        return dict(resources[0]) if resources else None

    async def deployment(self, deployment_id: str) -> pb.Deployment:
        reply: pb.GetDeploymentResponse = await self.stub.GetDeployment(
            pb.GetDeploymentRequest(namespace=NS, deployment_id=deployment_id), metadata=AUTH
        )
        return reply.deployment

    async def wait_ready(self, deployment_id: str, *, within: float = 15.0) -> pb.ResourceState:
        """Until the resource is Ready and Healthy (the seed's expected patch drift aside)."""
        state = await until(
            lambda: self.state(deployment_id),
            lambda s: (
                s is not None and s.phase == pb.STATE_READY and s.health_status == pb.HEALTH_STATUS_HEALTHY
            ),
            within=within,
            what=f"{deployment_id} to be Ready and Healthy",
        )
        assert state is not None
        return state


@pytest.fixture
async def manager(cluster_broker: RunningBroker) -> AsyncIterator[Manager]:
    async with (
        grpc.aio.insecure_channel(cluster_broker.grpc_target) as channel,
        aiohttp.ClientSession(base_url=cluster_broker.http_url, headers=HTTP_HEADERS) as http,
    ):
        yield Manager(broker_pb2_grpc.BrokerServiceStub(channel), http)


def unexpected_rules(state: pb.ResourceState) -> list[str]:
    return sorted(i.rule_id for i in state.drift_items if i.drift_class == pb.DRIFT_CLASS_UNEXPECTED)


def item_of(state: pb.ResourceState | None, rule_id: str) -> pb.DriftItem | None:
    if state is None:
        return None
    return next((i for i in state.drift_items if i.rule_id == rule_id), None)


def manager_of(obj: dict[str, Any], marker: str, section: str = "f:spec") -> str:
    """Who the cluster records for a field (``"f:replicas"`` under ``f:spec``), the broker aside."""
    for entry in obj["metadata"].get("managedFields") or []:
        part = (entry.get("fieldsV1") or {}).get(section) or {}
        if entry.get("manager") != "resource-broker" and f'"{marker}"' in json.dumps(part):
            return str(entry["manager"])
    return ""


# The drift table ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of the drift table and the kubectl command that causes it on resource ``{name}``."""

    id: str
    command: tuple[str, ...]
    rule: str
    action: int
    message: str
    changed_by: str | None  # None: the cluster records no manager for the change (a removal)

    @property
    def seed_action(self) -> str:
        return {
            int(pb.RECOMMENDED_ACTION_AUTO_REMEDIATE): "AutoRemediate",
            int(pb.RECOMMENDED_ACTION_ALERT_ONLY): "AlertOnly",
        }[self.action]


AUTO, ALERT = pb.RECOMMENDED_ACTION_AUTO_REMEDIATE, pb.RECOMMENDED_ACTION_ALERT_ONLY

ROWS = {
    r.id: r
    for r in [
        Row(
            "scale",
            ("scale", "statefulset", "{name}", "--replicas=3"),
            "replicas.changed",
            AUTO,
            "Replica count mismatch: desired=1, actual=3",
            "kubectl",
        ),
        Row(
            "delete-service",
            ("delete", "service", "{name}"),
            "object.missing",
            AUTO,
            "Service {name} is missing",
            "",
        ),
        Row(
            "set-image-major",
            ("set", "image", "statefulset/{name}", "postgresql=postgres:16"),
            "version.major",
            ALERT,
            "Version mismatch: desired=15, actual=16",
            "kubectl-set",
        ),
        Row(
            "set-resources-odd",
            (
                "set",
                "resources",
                "statefulset/{name}",
                "--requests=cpu=300m,memory=700Mi",
                "--limits=cpu=700m,memory=1500Mi",
            ),
            "size.changed",
            ALERT,
            "Size mismatch: desired=medium, actual=custom (cpu 300m/700m, memory 700Mi/1500Mi, storage 20Gi)",
            "kubectl-set",
        ),
        Row(
            "delete-statefulset",
            ("delete", "statefulset", "{name}"),
            "object.missing",
            AUTO,
            "StatefulSet {name} is missing",
            "",
        ),
        Row(
            "edit-secret",
            (
                "patch",
                "secret",
                "{name}-credentials",
                "--type",
                "merge",
                "-p",
                '{"data":{"password":"aGFja2Vk"}}',
            ),
            "secret.changed",
            ALERT,
            "Secret {name}-credentials was changed outside the broker",
            "kubectl-patch",  # the cluster records who wrote data.password
        ),
        Row(
            "delete-secret",
            ("delete", "secret", "{name}-credentials"),
            "secret.missing",
            ALERT,
            "Secret {name}-credentials is missing",
            "",
        ),
        Row(
            "remove-owned-label",
            ("label", "statefulset", "{name}", "app.kubernetes.io/name-"),
            "labels.changed",
            AUTO,
            "Labels changed: app.kubernetes.io/name",
            None,
        ),
        # Relabelled so that a watch by managed-by would lose it: labels drifted, nothing is missing.
        Row(
            "relabel-managed-by",
            ("label", "statefulset", "{name}", "app.kubernetes.io/managed-by=someone-else", "--overwrite"),
            "labels.changed",
            AUTO,
            "Labels changed: app.kubernetes.io/managed-by",
            None,
        ),
        # Relabelled to another deployment's id: still the broker's object (its owner annotation).
        Row(
            "relabel-deployment-id",
            ("label", "statefulset", "{name}", "broker.platform/deployment-id=someone-elses", "--overwrite"),
            "labels.changed",
            AUTO,
            "Labels changed: broker.platform/deployment-id",
            None,
        ),
        # Given to another deployment by hand (the owner annotation the broker reads first): its own
        # deployment has lost it, and hears so from the watch event of the object's new owner.
        Row(
            "give-to-another-deployment",
            ("annotate", "statefulset", "{name}", "broker.platform/owner=someone-elses", "--overwrite"),
            "object.missing",
            AUTO,
            "StatefulSet {name} is missing",
            "",
        ),
        # The selection's own label removed: the object leaves the watch and is found by name.
        Row(
            "remove-deployment-label",
            ("label", "statefulset", "{name}", "broker.platform/deployment-id-"),
            "labels.changed",
            AUTO,
            "Labels changed: broker.platform/deployment-id",
            None,
        ),
    ]
}
# Rows with a test of their own below (which checks more than the common part).
OWN_TESTS = ("scale", "delete-service", "set-image-major")


async def assert_reported(manager: Manager, deployment_id: str, row: Row, name: str) -> pb.ResourceState:
    """The row's drift, and only it, is reported the same way over gRPC and in the seed's JSON."""
    message = row.message.replace("{name}", name)
    state = await until(
        lambda: manager.state(deployment_id),
        lambda s: (i := item_of(s, row.rule)) is not None and i.message == message,
        within=15,
        what=f"{row.rule} with {message!r}",
    )
    assert state is not None
    item = item_of(state, row.rule)
    assert item is not None
    assert item.drift_class == pb.DRIFT_CLASS_UNEXPECTED
    assert item.recommended_action == row.action
    assert unexpected_rules(state) == [row.rule], state
    assert state.phase == pb.STATE_DRIFT_DETECTED
    assert state.drift_detected
    assert message in state.drift_details
    assert state.message.startswith("Unexpected drift: ")
    assert message in state.message

    doc = await manager.http_state(deployment_id)
    assert doc is not None
    assert doc["phase"] == "DriftDetected"
    assert doc["driftDetected"] is True
    assert message in doc["driftDetails"]
    (entry,) = [i for i in doc["driftItems"] if i["ruleId"] == row.rule]
    assert entry["driftClass"] == "Unexpected"
    assert entry["recommendedAction"] == row.seed_action
    assert entry["message"] == message
    assert entry["changedBy"] == item.changed_by
    assert entry["field"] == item.field
    assert (entry["desired"], entry["actual"]) == (item.desired, item.actual)
    if row.changed_by is not None:
        assert item.changed_by == row.changed_by, f"changedBy of {row.rule}"
    return state


@pytest.mark.parametrize("row", [r for r in ROWS.values() if r.id not in OWN_TESTS], ids=lambda r: r.id)
async def test_a_hand_made_change_is_reported_as_its_drift_row(
    manager: Manager, kubectl: Kubectl, row: Row
) -> None:
    name = f"db-{row.id}"
    deployment_id = (await manager.provision(name)).deployment_id
    ready = await manager.wait_ready(deployment_id)
    assert unexpected_rules(ready) == []

    await kubectl.run(*(part.replace("{name}", name) for part in row.command))
    if row.id == "edit-secret":
        secret = await kubectl.get("secret", f"{name}-credentials")
        assert secret is not None
        assert manager_of(secret, "f:password", "f:data") == "kubectl-patch"

    await assert_reported(manager, deployment_id, row, name)


async def test_scaling_by_hand_is_attributed_to_the_manager_the_cluster_records(
    manager: Manager, kubectl: Kubectl
) -> None:
    deployment_id = (await manager.provision("postgres-app-db")).deployment_id
    await manager.wait_ready(deployment_id)

    await kubectl.run("scale", "statefulset", "postgres-app-db", "--replicas=3")

    state = await assert_reported(manager, deployment_id, ROWS["scale"], "postgres-app-db")
    sts = await kubectl.get("statefulset", "postgres-app-db")
    assert sts is not None
    # kubectl 1.32 sends no fieldManager for scale: the API server names it after the User-Agent.
    recorded = manager_of(sts, "f:replicas")
    assert recorded == "kubectl"
    item = item_of(state, "replicas.changed")
    assert item is not None
    assert item.changed_by == recorded
    assert (item.desired, item.actual) == ("1", "3")
    # Two more medium replicas at 45.50 each.
    assert item.HasField("monthly_cost_delta")
    assert item.monthly_cost_delta == pytest.approx(91.0)
    # The seed's wording of this very case.
    doc = await manager.http_state(deployment_id)
    assert doc is not None
    assert "Replica count mismatch: desired=1, actual=3" in doc["driftDetails"]
    assert doc["actualSpec"]["replicas"] == 3
    assert doc["desiredSpec"]["replicas"] == 1


async def test_a_deleted_service_makes_the_resource_unhealthy(manager: Manager, kubectl: Kubectl) -> None:
    deployment_id = (await manager.provision("db-no-service")).deployment_id
    await manager.wait_ready(deployment_id)

    await kubectl.run("delete", "service", "db-no-service")

    row = ROWS["delete-service"]
    state = await assert_reported(manager, deployment_id, row, "db-no-service")
    # DESIGN 5: Unhealthy when a required object is missing.
    assert state.health_status == pb.HEALTH_STATUS_UNHEALTHY
    doc = await manager.http_state(deployment_id)
    assert doc is not None
    assert doc["healthStatus"] == "Unhealthy"


async def test_a_major_version_set_by_hand_is_what_runs(
    manager: Manager, kubectl: Kubectl, sandbox: Any
) -> None:
    # Report what the pod runs as what its spec names (a real kubelet's containerStatuses do);
    # the sandbox's default resolution would turn postgres:16 into 16.4.
    sandbox.faults.set_image_resolution({})
    deployment_id = (await manager.provision("db-major")).deployment_id
    await manager.wait_ready(deployment_id)

    await kubectl.run("set", "image", "statefulset/db-major", "postgresql=postgres:16")

    row = ROWS["set-image-major"]
    state = await assert_reported(manager, deployment_id, row, "db-major")
    assert state.actual_spec.version == "16"
    assert state.desired_spec.version == "15"
    item = item_of(state, "version.major")
    assert item is not None
    assert item.severity == pb.SEVERITY_CRITICAL
    doc = await manager.http_state(deployment_id)
    assert doc is not None
    assert doc["actualSpec"]["version"] == "16"
    assert "Version mismatch: desired=15, actual=16" in doc["driftDetails"]
    # Unexpected drift gets no "this is expected" explanation.
    assert "This is expected patch version drift" not in doc["driftDetails"]


async def test_resources_set_to_a_larger_tier_cost_more_and_only_alert(
    manager: Manager, kubectl: Kubectl
) -> None:
    deployment_id = (await manager.provision("db-bigger")).deployment_id
    await manager.wait_ready(deployment_id)

    # The large tier's cpu and memory figures (DEFAULT_SIZES["large"]).
    await kubectl.run(
        "set",
        "resources",
        "statefulset/db-bigger",
        "--requests=cpu=1,memory=4Gi",
        "--limits=cpu=2,memory=8Gi",
    )

    state = await until(
        lambda: manager.state(deployment_id),
        lambda s: item_of(s, "size.changed") is not None,
        within=15,
        what="size.changed",
    )
    assert state is not None
    item = item_of(state, "size.changed")
    assert item is not None
    assert item.drift_class == pb.DRIFT_CLASS_UNEXPECTED
    assert item.recommended_action == pb.RECOMMENDED_ACTION_ALERT_ONLY
    assert item.severity == pb.SEVERITY_CRITICAL
    assert item.changed_by == "kubectl-set"
    assert item.desired == "medium"
    # kubectl cannot change a StatefulSet's claim template, so the storage stays the medium tier's 20Gi:
    # the figures match the large tier in cpu and memory only, which is no tier at all.
    assert item.actual == "custom (cpu 1/2, memory 4Gi/8Gi, storage 20Gi)", item.actual
    assert item.message == f"Size mismatch: desired=medium, actual={item.actual}"
    # Cost-impacting: 1 core (56.00) + 4 GiB (38.00) + 20 GiB (8.00) = 102.00 against 45.50.
    assert item.HasField("monthly_cost_delta")
    assert item.monthly_cost_delta > 0
    assert item.monthly_cost_delta == pytest.approx(56.5)
    assert state.estimated_monthly_cost == pytest.approx(102.0)
    assert unexpected_rules(state) == ["size.changed"]
    assert state.phase == pb.STATE_DRIFT_DETECTED

    doc = await manager.http_state(deployment_id)
    assert doc is not None
    assert doc["phase"] == "DriftDetected"
    (entry,) = [i for i in doc["driftItems"] if i["ruleId"] == "size.changed"]
    assert (entry["driftClass"], entry["recommendedAction"], entry["changedBy"]) == (
        "Unexpected",
        "AlertOnly",
        "kubectl-set",
    )
    assert entry["monthlyCostDelta"] == pytest.approx(56.5)
    assert item.message in doc["driftDetails"]
    assert doc["actualSpec"]["resources"]["cpuRequest"] == "1"
    assert doc["actualSpec"]["resources"]["memoryLimit"] == "8Gi"


async def test_decreasing_a_topics_partitions_by_hand_only_alerts(manager: Manager, kubectl: Kubectl) -> None:
    reply = await manager.provision(
        "orders",
        {"engine": "kafka"},
        resource_type=pb.RESOURCE_TYPE_TOPIC,
        topic=pb.TopicSpec(partitions=6),
    )
    deployment_id = reply.deployment_id
    ready = await manager.wait_ready(deployment_id)
    assert ready.actual_spec.topic.partitions == 6
    assert list(ready.drift_items) == []

    await kubectl.run("patch", "kafkatopic", "orders", "--type", "merge", "-p", '{"spec":{"partitions":3}}')

    row = Row(
        "topic-partitions",
        (),
        "topic.partitions.decreased",
        ALERT,
        "Partition count mismatch: desired=6, actual=3",
        "kubectl-patch",
    )
    state = await assert_reported(manager, deployment_id, row, "orders")
    assert state.actual_spec.topic.partitions == 3
    assert state.desired_spec.topic.partitions == 6
    topic = await kubectl.get("kafkatopic", "orders")
    assert topic is not None
    assert manager_of(topic, "f:partitions") == "kubectl-patch"
    doc = await manager.http_state(deployment_id)
    assert doc is not None
    assert doc["resourceType"] == "topic"
    assert doc["actualSpec"]["topic"]["partitions"] == 3


async def test_who_scaled_stays_known_when_the_statefulset_controller_updates_the_status_later(
    manager: Manager, kubectl: Kubectl, sandbox: Any, cluster_broker: RunningBroker
) -> None:
    """status.replicas is the controller's, spec.replicas kubectl's: only the latter says who scaled."""
    deployment_id = (await manager.provision("db-attribution")).deployment_id
    await manager.wait_ready(deployment_id)
    await kubectl.run("scale", "statefulset", "db-attribution", "--replicas=3")
    await assert_reported(manager, deployment_id, ROWS["scale"], "db-attribution")
    sts = await kubectl.get("statefulset", "db-attribution")
    assert sts is not None
    scaled_at = next(e["time"] for e in sts["metadata"]["managedFields"] if e["manager"] == "kubectl")

    # managedFields times have one-second resolution: let the controller's next status write come later.
    await until(
        lambda: asyncio.sleep(0, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())),
        lambda now: now > scaled_at,
        within=3,
        what="the next second",
    )
    sandbox.faults.fail_readiness(namespace=NS, name="db-attribution-2")
    sts = await until(
        lambda: kubectl.get("statefulset", "db-attribution"),
        lambda s: s is not None and s.get("status", {}).get("readyReplicas") == 2,
        within=10,
        what="the controller to report 2 ready replicas",
    )
    assert sts is not None
    assert manager_of(sts, "f:replicas") == "kubectl"  # the cluster still says kubectl set spec.replicas

    informer = cluster_broker.broker.cluster.informers["StatefulSet"]  # type: ignore[union-attr]
    await until(
        lambda: asyncio.sleep(0, informer.get(NS, "db-attribution")),
        # The cache keeps only what the broker reads (no status): caught up when its version is.
        lambda s: s is not None and s.resource_version == sts["metadata"]["resourceVersion"],
        within=10,
        what="the broker's cache to hold the controller's status write",
    )
    state = await manager.state(deployment_id)
    assert state is not None
    item = item_of(state, "replicas.changed")
    assert item is not None
    assert item.changed_by == "kubectl"


async def test_an_environment_variable_changed_by_hand_is_configuration_drift(
    manager: Manager, kubectl: Kubectl
) -> None:
    """DESIGN 5: "configuration changed (labels the broker owns, env, ...)": unexpected, auto-remediate."""
    deployment_id = (await manager.provision("db-env")).deployment_id
    await manager.wait_ready(deployment_id)

    await kubectl.run("set", "env", "statefulset/db-env", "POSTGRES_USER=admin")
    sts = await kubectl.get("statefulset", "db-env")
    assert sts is not None
    assert manager_of(sts, "f:env") == "kubectl-set"

    state = await until(
        lambda: manager.state(deployment_id),
        lambda s: s is not None and unexpected_rules(s) != [],
        within=5,
        what="the changed environment to be reported",
    )
    assert state is not None
    (item,) = [i for i in state.drift_items if i.drift_class == pb.DRIFT_CLASS_UNEXPECTED]
    assert item.recommended_action == pb.RECOMMENDED_ACTION_AUTO_REMEDIATE
    assert item.changed_by == "kubectl-set"
    assert state.phase == pb.STATE_DRIFT_DETECTED
    assert item.message in state.drift_details


@pytest.mark.parametrize(
    ("command", "rule", "action", "message", "changed_by"),
    [
        (
            (
                "patch",
                "kafkatopic",
                "events",
                "--type",
                "merge",
                "-p",
                '{"spec":{"config":{"retention.ms":3600000}}}',
            ),
            "topic.retention.shortened",
            ALERT,
            "Retention mismatch: desired=604800000ms, actual=3600000ms",
            "kubectl-patch",
        ),
        (("delete", "kafkatopic", "events"), "object.missing", AUTO, "KafkaTopic events is missing", ""),
    ],
    ids=["retention-shortened", "topic-deleted"],
)
async def test_a_topic_changed_by_hand_is_reported(
    manager: Manager,
    kubectl: Kubectl,
    command: tuple[str, ...],
    rule: str,
    action: int,
    message: str,
    changed_by: str,
) -> None:
    reply = await manager.provision(
        "events", {"engine": "kafka"}, resource_type=pb.RESOURCE_TYPE_TOPIC, topic=pb.TopicSpec(partitions=3)
    )
    await manager.wait_ready(reply.deployment_id)

    await kubectl.run(*command)

    await assert_reported(
        manager, reply.deployment_id, Row(rule, (), rule, action, message, changed_by), "events"
    )


async def test_an_expected_patch_change_leaves_a_trace_in_the_history_and_no_alarm(
    manager: Manager, kubectl: Kubectl, sandbox: Any
) -> None:
    sandbox.faults.set_image_resolution({})
    deployment_id = (await manager.provision("db-patch")).deployment_id
    await manager.wait_ready(deployment_id)
    await kubectl.run("set", "image", "statefulset/db-patch", "postgresql=postgres:15.6")

    async def traces() -> list[pb.DriftEvent]:
        reply = await manager.stub.ListDriftEvents(
            pb.ListDriftEventsRequest(
                namespace=NS, deployment_id=deployment_id, kinds=[pb.DRIFT_EVENT_KIND_EXPECTED_DRIFT]
            ),
            metadata=AUTH,
        )
        return list(reply.events)

    events = await until(
        traces, lambda es: any("actual=15.6" in e.message for e in es), within=15, what="the 15.6 trace"
    )
    assert {e.kind for e in events} == {pb.DRIFT_EVENT_KIND_EXPECTED_DRIFT}  # the kind filter works
    latest = events[-1]
    assert (
        "Version mismatch: desired=15, actual=15.6 (This is expected patch version drift)" in latest.message
    )
    assert [i.drift_class for i in latest.drift_items] == [pb.DRIFT_CLASS_EXPECTED]
    state = await manager.state(deployment_id)
    assert state is not None
    assert state.phase == pb.STATE_READY  # expected drift raises no alarm
    assert unexpected_rules(state) == []


async def test_a_value_the_broker_cannot_read_is_drift_and_detection_goes_on(
    manager: Manager, kubectl: Kubectl, cluster_broker: RunningBroker
) -> None:
    """kubectl patch ... partitions "three": reported as unreadable, and a later real change still is."""
    reply = await manager.provision(
        "events", {"engine": "kafka"}, resource_type=pb.RESOURCE_TYPE_TOPIC, topic=pb.TopicSpec(partitions=3)
    )
    deployment_id = reply.deployment_id
    await manager.wait_ready(deployment_id)

    await kubectl.run(
        "patch", "kafkatopic", "events", "--type", "merge", "-p", '{"spec":{"partitions":"three"}}'
    )
    state = await until(
        lambda: manager.state(deployment_id),
        lambda s: item_of(s, "field.unreadable") is not None,
        within=15,
        what="the unreadable partition count",
    )
    item = item_of(state, "field.unreadable")
    assert item is not None
    assert (item.field, item.desired, item.actual) == ("partitions", "3", "'three'")
    # Still serving: the namespace read answers, and the broker says it is ready.
    async with manager.http.get("/readyz") as r:
        assert r.status == 200

    await kubectl.run("patch", "kafkatopic", "events", "--type", "merge", "-p", '{"spec":{"partitions":5}}')
    state = await until(
        lambda: manager.state(deployment_id),
        lambda s: item_of(s, "topic.partitions.increased") is not None,
        within=15,
        what="the real change after the unreadable one",
    )
    assert item_of(state, "field.unreadable") is None
    assert state.actual_spec.topic.partitions == 5

"""The workload simulator seen through the API: StatefulSets, pods, claims, topics and metrics."""

from __future__ import annotations

import pytest
from kube_sandbox import DEFAULT_IMAGE_RESOLUTION
from kubernetes_asyncio import client
from sandbox_support import KAFKA_TOPIC_CRD, eventually, statefulset

# A runtime that reports what a floating tag resolved to (the fault; the default is the spec image).
RESOLVING = {"ready_delay": 0.05, "image_resolution": DEFAULT_IMAGE_RESOLUTION}


async def _pods(core, selector: str) -> list:
    return sorted(
        (await core.list_namespaced_pod("default", label_selector=selector)).items,
        key=lambda p: p.metadata.name,
    )


def _ready(pod) -> bool:
    return pod.status.phase == "Running" and any(
        c.type == "Ready" and c.status == "True" for c in pod.status.conditions or []
    )


@pytest.mark.parametrize("sandbox_options", [RESOLVING])
async def test_statefulset_pods_become_ready_with_status_and_resolved_image(kube_api) -> None:
    apps = client.AppsV1Api(kube_api)
    core = client.CoreV1Api(kube_api)
    created = await apps.create_namespaced_stateful_set(
        "default", statefulset("pg", replicas=3, image="postgres:15")
    )

    async def ready_sts():
        sts = await apps.read_namespaced_stateful_set("pg", "default")
        return sts if sts.status.ready_replicas == 3 else None

    sts = await eventually(ready_sts, what="3 ready replicas")
    assert sts.status.replicas == 3
    assert sts.status.current_replicas == 3
    assert sts.status.updated_replicas == 3
    assert sts.status.available_replicas == 3
    assert sts.status.observed_generation == created.metadata.generation
    assert sts.status.current_revision == sts.status.update_revision
    pods = await _pods(core, "app=pg")
    assert [p.metadata.name for p in pods] == ["pg-0", "pg-1", "pg-2"]
    for ordinal, pod in enumerate(pods):
        assert _ready(pod)
        [owner] = pod.metadata.owner_references
        assert (owner.kind, owner.name, owner.uid, owner.controller) == (
            "StatefulSet",
            "pg",
            created.metadata.uid,
            True,
        )
        assert pod.metadata.labels["statefulset.kubernetes.io/pod-name"] == f"pg-{ordinal}"
        assert pod.metadata.labels["controller-revision-hash"] == sts.status.update_revision
        assert pod.spec.containers[0].image == "postgres:15"
        [container] = pod.status.container_statuses
        assert container.image == DEFAULT_IMAGE_RESOLUTION["postgres:15"] == "postgres:15.2"
        assert container.ready is True
        assert container.restart_count == 0
        assert container.state.running.started_at is not None
        assert pod.spec.volumes[0].persistent_volume_claim.claim_name == f"data-pg-{ordinal}"
        assert pod.status.pod_ip
        assert pod.spec.node_name == "sandbox-node"


@pytest.mark.parametrize("sandbox_options", [{"ready_delay": 0.05, "image_resolution": {}}])
async def test_identity_image_resolution_reports_the_spec_image(kube_api) -> None:
    apps = client.AppsV1Api(kube_api)
    core = client.CoreV1Api(kube_api)
    await apps.create_namespaced_stateful_set("default", statefulset("id", replicas=1, image="postgres:15"))

    async def running_image():
        pods = await _pods(core, "app=id")
        return pods and _ready(pods[0]) and pods[0].status.container_statuses[0].image

    assert await eventually(running_image) == "postgres:15"


async def test_scale_subresource_scales_pods_and_keeps_claims(kube_api) -> None:
    apps = client.AppsV1Api(kube_api)
    core = client.CoreV1Api(kube_api)
    await apps.create_namespaced_stateful_set("default", statefulset("sc", replicas=1, storage="5Gi"))

    async def ready(count: int):
        sts = await apps.read_namespaced_stateful_set("sc", "default")
        pods = await _pods(core, "app=sc")
        return (sts.status.ready_replicas or 0) == count and len(pods) == count and all(map(_ready, pods))

    await eventually(lambda: ready(1), what="1 replica")
    scale = await apps.patch_namespaced_stateful_set_scale("sc", "default", {"spec": {"replicas": 3}})
    assert scale.spec.replicas == 3
    assert scale.status.selector == "app=sc"
    await eventually(lambda: ready(3), what="3 replicas")
    claims = {
        c.metadata.name: c for c in (await core.list_namespaced_persistent_volume_claim("default")).items
    }
    assert sorted(claims) == ["data-sc-0", "data-sc-1", "data-sc-2"]
    for claim in claims.values():
        assert claim.status.phase == "Bound"
        assert claim.status.capacity == {"storage": "5Gi"}
        assert claim.spec.volume_name
    await apps.patch_namespaced_stateful_set_scale("sc", "default", {"spec": {"replicas": 1}})
    await eventually(lambda: ready(1), what="scaled down")
    assert [p.metadata.name for p in await _pods(core, "app=sc")] == ["sc-0"]
    still = await core.list_namespaced_persistent_volume_claim("default")
    assert len(still.items) == 3
    scaled = await apps.read_namespaced_stateful_set_scale("sc", "default")
    assert (scaled.spec.replicas, scaled.status.replicas) == (1, 1)


@pytest.mark.parametrize("sandbox_options", [RESOLVING])
async def test_template_change_rolls_the_pods(kube_api) -> None:
    apps = client.AppsV1Api(kube_api)
    core = client.CoreV1Api(kube_api)
    await apps.create_namespaced_stateful_set("default", statefulset("roll", replicas=2, image="redis:7"))

    async def images():
        sts = await apps.read_namespaced_stateful_set("roll", "default")
        pods = await _pods(core, "app=roll")
        if len(pods) != 2 or not all(map(_ready, pods)) or sts.status.updated_replicas != 2:
            return None
        if sts.status.current_revision != sts.status.update_revision:
            return None
        return sorted(p.status.container_statuses[0].image for p in pods), sts

    before, sts_before = await eventually(images, what="first rollout")
    assert before == ["redis:7.2.4", "redis:7.2.4"]
    uids = {p.metadata.uid for p in await _pods(core, "app=roll")}
    await apps.patch_namespaced_stateful_set(
        "roll",
        "default",
        {"spec": {"template": {"spec": {"containers": [{"name": "main", "image": "redis:6"}]}}}},
    )

    async def rolled():
        result = await images()
        return result if result and result[0] == ["redis:6.2.14", "redis:6.2.14"] else None

    _, sts_after = await eventually(rolled, what="rolling update")
    assert sts_after.status.update_revision != sts_before.status.update_revision
    assert sts_after.status.observed_generation == 2
    assert uids.isdisjoint({p.metadata.uid for p in await _pods(core, "app=roll")})


async def test_deleted_pod_is_recreated_by_the_controller(kube_api) -> None:
    apps = client.AppsV1Api(kube_api)
    core = client.CoreV1Api(kube_api)
    await apps.create_namespaced_stateful_set("default", statefulset("re", replicas=1))

    async def ready_pod():
        pods = await _pods(core, "app=re")
        return pods[0] if pods and _ready(pods[0]) else None

    first = await eventually(ready_pod)
    await core.delete_namespaced_pod("re-0", "default")

    async def replaced():
        pod = await ready_pod()
        return pod if pod and pod.metadata.uid != first.metadata.uid else None

    assert (await eventually(replaced)).metadata.name == "re-0"


@pytest.mark.parametrize("sandbox_options", [RESOLVING])
async def test_plain_pods_are_scheduled_and_started(kube_api) -> None:
    core = client.CoreV1Api(kube_api)
    await core.create_namespaced_pod(
        "default",
        {"metadata": {"name": "solo"}, "spec": {"containers": [{"name": "c", "image": "mysql:8.0"}]}},
    )

    async def running():
        pod = await core.read_namespaced_pod("solo", "default")
        return pod if _ready(pod) else None

    pod = await eventually(running)
    assert pod.status.container_statuses[0].image == "mysql:8.0.36"
    assert pod.status.qos_class == "BestEffort"


async def test_kafka_topics_become_ready(kube_api) -> None:
    await client.ApiextensionsV1Api(kube_api).create_custom_resource_definition(KAFKA_TOPIC_CRD)
    custom = client.CustomObjectsApi(kube_api)
    args = ("kafka.strimzi.io", "v1beta2", "default", "kafkatopics")
    await custom.create_namespaced_custom_object(
        *args,
        {
            "apiVersion": "kafka.strimzi.io/v1beta2",
            "kind": "KafkaTopic",
            "metadata": {"name": "orders"},
            "spec": {"partitions": 3, "replicas": 1, "config": {"retention.ms": 604800000}},
        },
    )

    async def ready(generation: int):
        topic = await custom.get_namespaced_custom_object(*args, "orders")
        status = topic.get("status") or {}
        conditions = {c["type"]: c["status"] for c in status.get("conditions", [])}
        return (
            topic
            if conditions.get("Ready") == "True" and status.get("observedGeneration") == generation
            else None
        )

    topic = await eventually(lambda: ready(1), what="topic ready")
    assert topic["status"]["topicName"] == "orders"
    await custom.patch_namespaced_custom_object(
        *args, "orders", {"spec": {"partitions": 6}}, _content_type="application/merge-patch+json"
    )
    topic = await eventually(lambda: ready(2), what="topic re-observed")
    assert topic["spec"]["partitions"] == 6


async def test_pod_metrics_follow_requests(kube_api) -> None:
    apps = client.AppsV1Api(kube_api)
    core = client.CoreV1Api(kube_api)
    await apps.create_namespaced_stateful_set("default", statefulset("met", replicas=2))
    custom = client.CustomObjectsApi(kube_api)

    async def metrics():
        listed = await custom.list_namespaced_custom_object("metrics.k8s.io", "v1beta1", "default", "pods")
        return listed if len(listed["items"]) == 2 else None

    listed = await eventually(metrics, what="pod metrics")
    assert listed["kind"] == "PodMetricsList"
    for item in listed["items"]:
        [container] = item["containers"]
        cpu_nanos = int(container["usage"]["cpu"].removesuffix("n"))
        memory_ki = int(container["usage"]["memory"].removesuffix("Ki"))
        assert 0.25 * 500e6 <= cpu_nanos <= 0.5 * 500e6
        assert 0.45 * 1024 * 1024 <= memory_ki <= 0.55 * 1024 * 1024
        assert item["window"] == "30s"
    one = await custom.get_namespaced_custom_object("metrics.k8s.io", "v1beta1", "default", "pods", "met-0")
    assert one["metadata"]["name"] == "met-0"
    selected = await custom.list_namespaced_custom_object(
        "metrics.k8s.io",
        "v1beta1",
        "default",
        "pods",
        label_selector="statefulset.kubernetes.io/pod-name=met-1",
    )
    assert [i["metadata"]["name"] for i in selected["items"]] == ["met-1"]
    assert (await core.list_namespaced_pod("default")).items

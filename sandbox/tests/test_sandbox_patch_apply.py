"""Patches (merge, JSON, strategic), server-side apply with conflicts, and managedFields attribution."""

from __future__ import annotations

import json

import aiohttp
import pytest
from kubernetes_asyncio import client
from sandbox_support import KAFKA_TOPIC_CRD, statefulset, status_of

pytestmark = pytest.mark.parametrize("sandbox_options", [{"simulate": False}])

MERGE = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
APPLY = "application/apply-patch+yaml"


def _managers(obj) -> dict[tuple[str, str, str], dict]:
    entries = (
        obj["metadata"]["managedFields"]
        if isinstance(obj, dict)
        else [e.to_dict() for e in obj.metadata.managed_fields]
    )
    out = {}
    for e in entries:
        fields = e.get("fieldsV1") or e.get("fields_v1")
        out[(e["manager"], e["operation"], e.get("subresource") or "")] = fields
    return out


async def _apply(sandbox, path: str, body: dict, *, manager: str, force: bool = False) -> tuple[int, dict]:
    query = f"?fieldManager={manager}" + ("&force=true" if force else "")
    async with (
        aiohttp.ClientSession() as http,
        http.patch(
            f"{sandbox.url}{path}{query}", data=json.dumps(body), headers={"Content-Type": APPLY}
        ) as resp,
    ):
        return resp.status, await resp.json()


async def test_json_merge_patch_merges_maps_and_deletes_nulls(kube_api) -> None:
    core = client.CoreV1Api(kube_api)
    await core.create_namespaced_config_map(
        "default", {"metadata": {"name": "m"}, "data": {"a": "1", "b": "2"}}
    )
    patched = await core.patch_namespaced_config_map(
        "m", "default", {"data": {"a": None, "c": "3"}}, _content_type=MERGE
    )
    assert patched.data == {"b": "2", "c": "3"}
    sts = await client.AppsV1Api(kube_api).create_namespaced_stateful_set(
        "default", statefulset("mp", replicas=0)
    )
    assert len(sts.spec.template.spec.containers[0].ports) == 1
    replaced = await client.AppsV1Api(kube_api).patch_namespaced_stateful_set(
        "mp",
        "default",
        {"spec": {"template": {"spec": {"containers": [{"name": "main", "image": "postgres:16"}]}}}},
        _content_type=MERGE,
    )
    assert replaced.spec.template.spec.containers[0].image == "postgres:16"
    assert replaced.spec.template.spec.containers[0].ports is None


async def test_json_patch_operations_and_failed_test(kube_api) -> None:
    core = client.CoreV1Api(kube_api)
    await core.create_namespaced_config_map("default", {"metadata": {"name": "j"}, "data": {"a": "1"}})
    patched = await core.patch_namespaced_config_map(
        "j",
        "default",
        [
            {"op": "test", "path": "/data/a", "value": "1"},
            {"op": "add", "path": "/data/b", "value": "2"},
            {"op": "replace", "path": "/data/a", "value": "9"},
            {"op": "copy", "from": "/data/b", "path": "/data/c"},
            {"op": "move", "from": "/data/c", "path": "/data/d"},
            {"op": "remove", "path": "/data/b"},
        ],
    )
    assert patched.data == {"a": "9", "d": "2"}
    with pytest.raises(client.ApiException) as info:
        await core.patch_namespaced_config_map(
            "j", "default", [{"op": "test", "path": "/data/a", "value": "1"}]
        )
    assert info.value.status == 422
    assert (await core.read_namespaced_config_map("j", "default")).data == {"a": "9", "d": "2"}


async def test_strategic_merge_patch_merges_lists_by_key(kube_api) -> None:
    apps = client.AppsV1Api(kube_api)
    manifest = statefulset("sm", replicas=0)
    manifest["spec"]["template"]["spec"]["containers"].append({"name": "sidecar", "image": "envoy:1.30"})
    manifest["spec"]["template"]["spec"]["containers"][0]["env"] = [{"name": "A", "value": "1"}]
    await apps.create_namespaced_stateful_set("default", manifest)
    patched = await apps.patch_namespaced_stateful_set(
        "sm",
        "default",
        {
            "spec": {
                "template": {
                    "spec": {
                        "$setElementOrder/containers": [{"name": "main"}, {"name": "sidecar"}],
                        "containers": [
                            {"name": "main", "image": "postgres:16", "env": [{"name": "B", "value": "2"}]},
                        ],
                    }
                }
            }
        },
    )
    containers = patched.spec.template.spec.containers
    assert [c.name for c in containers] == ["main", "sidecar"]
    assert containers[0].image == "postgres:16"
    assert [(e.name, e.value) for e in containers[0].env] == [("A", "1"), ("B", "2")]
    assert containers[0].ports[0].container_port == 5432
    removed = await apps.patch_namespaced_stateful_set(
        "sm",
        "default",
        {
            "spec": {
                "template": {
                    "spec": {
                        "containers": [{"name": "sidecar", "$patch": "delete"}],
                    }
                }
            }
        },
    )
    assert [c.name for c in removed.spec.template.spec.containers] == ["main"]


async def test_strategic_merge_patch_is_refused_for_custom_resources(kube_api) -> None:
    await client.ApiextensionsV1Api(kube_api).create_custom_resource_definition(KAFKA_TOPIC_CRD)
    custom = client.CustomObjectsApi(kube_api)
    args = ("kafka.strimzi.io", "v1beta2", "default", "kafkatopics")
    await custom.create_namespaced_custom_object(
        *args,
        {
            "apiVersion": "kafka.strimzi.io/v1beta2",
            "kind": "KafkaTopic",
            "metadata": {"name": "t"},
            "spec": {"partitions": 3},
        },
    )
    with pytest.raises(client.ApiException) as info:
        await custom.patch_namespaced_custom_object(
            *args, "t", {"spec": {"partitions": 6}}, _content_type="application/strategic-merge-patch+json"
        )
    assert info.value.status == 415
    assert status_of(info.value)["reason"] == "UnsupportedMediaType"
    merged = await custom.patch_namespaced_custom_object(
        *args, "t", {"spec": {"partitions": 6}}, _content_type=MERGE
    )
    assert merged["spec"]["partitions"] == 6


async def test_server_side_apply_creates_tracks_and_conflicts(sandbox, kube_api) -> None:
    path = "/apis/apps/v1/namespaces/default/statefulsets/ssa"
    manifest = statefulset("ssa", replicas=2)
    code, created = await _apply(sandbox, path, manifest, manager="broker")
    assert code == 201
    assert created["spec"]["replicas"] == 2
    owned = _managers(created)[("broker", "Apply", "")]
    assert owned["f:spec"]["f:replicas"] == {}
    assert 'k:{"name":"main"}' in owned["f:spec"]["f:template"]["f:spec"]["f:containers"]

    apps = client.AppsV1Api(kube_api)
    await apps.patch_namespaced_stateful_set_scale(
        "ssa", "default", {"spec": {"replicas": 5}}, field_manager="kubectl-scale"
    )
    code, conflict = await _apply(sandbox, path, manifest, manager="broker")
    assert code == 409
    assert conflict["reason"] == "Conflict"
    assert conflict["message"] == (
        'Apply failed with 1 conflict: conflict with "kubectl-scale" with subresource "scale" using apps/v1: '
        ".spec.replicas"
    )
    assert conflict["details"]["causes"] == [
        {
            "reason": "FieldManagerConflict",
            "message": 'conflict with "kubectl-scale" with subresource "scale" using apps/v1',
            "field": ".spec.replicas",
        }
    ]
    assert (await apps.read_namespaced_stateful_set("ssa", "default")).spec.replicas == 5

    code, same_value = await _apply(
        sandbox, path, {**manifest, "spec": {**manifest["spec"], "replicas": 5}}, manager="broker"
    )
    assert code == 200
    assert same_value["spec"]["replicas"] == 5

    code, forced = await _apply(sandbox, path, manifest, manager="broker", force=True)
    assert code == 200
    assert forced["spec"]["replicas"] == 2
    managers = _managers(forced)
    assert "f:replicas" in managers[("broker", "Apply", "")]["f:spec"]
    assert ("kubectl-scale", "Update", "scale") not in managers


async def test_apply_removes_fields_dropped_from_the_configuration(sandbox) -> None:
    path = "/api/v1/namespaces/default/configmaps/cfg"
    body = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "cfg", "labels": {"a": "1", "b": "2"}},
        "data": {"x": "1", "y": "2"},
    }
    assert (await _apply(sandbox, path, body, manager="one"))[0] == 201
    shared = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg"}, "data": {"y": "2"}}
    assert (await _apply(sandbox, path, shared, manager="two"))[0] == 200
    smaller = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "cfg", "labels": {"a": "1"}},
        "data": {},
    }
    code, result = await _apply(sandbox, path, smaller, manager="one")
    assert code == 200
    assert result["metadata"]["labels"] == {"a": "1"}
    assert result["data"] == {"y": "2"}


async def test_apply_needs_a_field_manager(sandbox) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.patch(
            f"{sandbox.url}/api/v1/namespaces/default/configmaps/nofm",
            data=json.dumps({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "nofm"}}),
            headers={"Content-Type": APPLY},
        ) as resp,
    ):
        body = await resp.json()
    assert resp.status == 422
    assert "fieldManager" in body["message"]


async def test_apply_accepts_yaml_bodies(sandbox, kube_api) -> None:
    yaml_body = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: yml\ndata:\n  key: value\n"
    async with (
        aiohttp.ClientSession() as http,
        http.patch(
            f"{sandbox.url}/api/v1/namespaces/default/configmaps/yml?fieldManager=yaml-user",
            data=yaml_body,
            headers={"Content-Type": APPLY},
        ) as resp,
    ):
        assert resp.status == 201
    got = await client.CoreV1Api(kube_api).read_namespaced_config_map("yml", "default")
    assert got.data == {"key": "value"}
    assert got.metadata.managed_fields[0].manager == "yaml-user"
    assert got.metadata.managed_fields[0].operation == "Apply"


async def test_manager_comes_from_field_manager_or_user_agent(sandbox, kube_api) -> None:
    core = client.CoreV1Api(kube_api)
    await core.create_namespaced_config_map(
        "default", {"metadata": {"name": "ua"}, "data": {"a": "1"}}, field_manager="creator"
    )
    async with (
        aiohttp.ClientSession(
            headers={"User-Agent": "kubectl-edit/v1.32.4 (linux/amd64) kubernetes/abc"}
        ) as http,
        http.patch(
            f"{sandbox.url}/api/v1/namespaces/default/configmaps/ua",
            data=json.dumps({"data": {"b": "2"}}),
            headers={"Content-Type": MERGE},
        ) as resp,
    ):
        assert resp.status == 200
    got = await core.read_namespaced_config_map("ua", "default")
    managers = {(m.manager, m.operation): m.fields_v1 for m in got.metadata.managed_fields}
    assert managers[("creator", "Update")] == {"f:data": {".": {}, "f:a": {}}}
    assert managers[("kubectl-edit", "Update")] == {"f:data": {"f:b": {}}}
    assert all(m.time is not None and m.api_version == "v1" for m in got.metadata.managed_fields)


async def test_status_and_scale_writes_are_attributed_to_their_subresource(kube_api) -> None:
    apps = client.AppsV1Api(kube_api)
    await apps.create_namespaced_stateful_set(
        "default", statefulset("sub", replicas=1), field_manager="broker"
    )
    scale = await apps.read_namespaced_stateful_set_scale("sub", "default")
    assert scale.spec.replicas == 1
    assert scale.status.selector == "app=sub"
    await apps.replace_namespaced_stateful_set_scale(
        "sub", "default", {"metadata": {"name": "sub"}, "spec": {"replicas": 3}}, field_manager="hpa"
    )
    await apps.patch_namespaced_stateful_set_status(
        "sub", "default", {"status": {"replicas": 3}}, field_manager="controller"
    )
    got = await apps.read_namespaced_stateful_set("sub", "default")
    managers = {(m.manager, m.operation, m.subresource): m.fields_v1 for m in got.metadata.managed_fields}
    assert managers[("hpa", "Update", "scale")] == {"f:spec": {"f:replicas": {}}}
    assert managers[("controller", "Update", "status")] == {"f:status": {"f:replicas": {}}}
    assert "f:replicas" not in managers[("broker", "Update", None)]["f:spec"]
    assert got.spec.replicas == 3

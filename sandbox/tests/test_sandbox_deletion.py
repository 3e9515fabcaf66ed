"""Owner references and cascading deletion (background, foreground, orphan), finalizers, namespaces."""

from __future__ import annotations

import asyncio
import json

import pytest
from kubernetes_asyncio import client, watch
from sandbox_support import eventually, statefulset, status_of


def _owned_config_map(name: str, owner) -> dict:
    return {
        "metadata": {
            "name": name,
            "ownerReferences": [
                {
                    "apiVersion": "v1",
                    "kind": "ConfigMap",
                    "name": owner.metadata.name,
                    "uid": owner.metadata.uid,
                    "blockOwnerDeletion": True,
                }
            ],
        }
    }


async def _names(core) -> set[str]:
    return {c.metadata.name for c in (await core.list_namespaced_config_map("default")).items}


async def test_background_deletion_removes_pods_but_keeps_claims(kube_api) -> None:
    apps = client.AppsV1Api(kube_api)
    core = client.CoreV1Api(kube_api)
    await apps.create_namespaced_stateful_set("default", statefulset("bg", replicas=2))

    async def two_pods():
        pods = await core.list_namespaced_pod("default", label_selector="app=bg")
        return len(pods.items) == 2

    await eventually(two_pods, what="two pods")
    status = await apps.delete_namespaced_stateful_set(
        "bg", "default", body=client.V1DeleteOptions(propagation_policy="Background")
    )
    assert status.status == "Success"
    assert status.details.name == "bg"

    async def no_pods():
        pods = await core.list_namespaced_pod("default", label_selector="app=bg")
        return pods.items == []

    await eventually(no_pods, what="pods collected")
    claims = await core.list_namespaced_persistent_volume_claim("default")
    assert sorted(c.metadata.name for c in claims.items) == ["data-bg-0", "data-bg-1"]


async def test_foreground_deletion_keeps_the_owner_until_dependents_are_gone(kube_api) -> None:
    core = client.CoreV1Api(kube_api)
    owner = await core.create_namespaced_config_map("default", {"metadata": {"name": "owner"}})
    await core.create_namespaced_config_map("default", _owned_config_map("dep-1", owner))
    await core.create_namespaced_config_map("default", _owned_config_map("dep-2", owner))
    stream = watch.Watch()
    events: list[tuple[str, str, bool]] = []

    async def record() -> None:
        async for e in stream.stream(
            core.list_namespaced_config_map,
            "default",
            resource_version=owner.metadata.resource_version,
            timeout_seconds=10,
        ):
            obj = e["object"]
            events.append((e["type"], obj.metadata.name, obj.metadata.deletion_timestamp is not None))
            if e["type"] == "DELETED" and obj.metadata.name == "owner":
                return

    task = asyncio.create_task(record())
    await asyncio.sleep(0)
    await core.delete_namespaced_config_map(
        "owner", "default", body=client.V1DeleteOptions(propagation_policy="Foreground")
    )
    await asyncio.wait_for(task, 5)
    await stream.close()
    deletes = [name for kind, name, _ in events if kind == "DELETED"]
    assert deletes[-1] == "owner"
    assert sorted(deletes[:-1]) == ["dep-1", "dep-2"]
    marked = [(name, marked) for kind, name, marked in events if kind == "MODIFIED" and name == "owner"]
    assert marked
    assert marked[0] == ("owner", True)
    assert await _names(core) == set()


async def test_foreground_delete_returns_the_object_with_its_finalizer(kube_api) -> None:
    core = client.CoreV1Api(kube_api)
    owner = await core.create_namespaced_config_map(
        "default", {"metadata": {"name": "fg", "finalizers": ["x/y"]}}
    )
    await core.create_namespaced_config_map("default", _owned_config_map("fg-dep", owner))
    response = await core.delete_namespaced_config_map(
        "fg", "default", propagation_policy="Foreground", _preload_content=False
    )
    held = json.loads(await response.read())
    assert held["kind"] == "ConfigMap"
    assert held["metadata"]["deletionTimestamp"]
    assert held["metadata"]["finalizers"] == ["x/y", "foregroundDeletion"]

    async def dependent_gone():
        return "fg-dep" not in await _names(core)

    await eventually(dependent_gone, what="dependent deleted")
    still = await core.read_namespaced_config_map("fg", "default")
    assert still.metadata.finalizers == ["x/y"]
    await core.patch_namespaced_config_map(
        "fg", "default", {"metadata": {"finalizers": None}}, _content_type="application/merge-patch+json"
    )
    assert await _names(core) == set()


async def test_orphan_deletion_keeps_dependents_without_owner_references(kube_api) -> None:
    core = client.CoreV1Api(kube_api)
    owner = await core.create_namespaced_config_map("default", {"metadata": {"name": "parent"}})
    await core.create_namespaced_config_map("default", _owned_config_map("child", owner))
    await core.delete_namespaced_config_map("parent", "default", propagation_policy="Orphan")
    child = await core.read_namespaced_config_map("child", "default")
    assert child.metadata.owner_references is None
    await asyncio.sleep(0.1)
    assert await _names(core) == {"child"}


async def test_objects_with_a_missing_owner_are_collected(kube_api) -> None:
    core = client.CoreV1Api(kube_api)
    ghost = client.V1ObjectMeta(name="ghost", uid="00000000-0000-0000-0000-000000000000")
    await core.create_namespaced_config_map(
        "default", _owned_config_map("stray", client.V1ConfigMap(metadata=ghost))
    )

    async def collected():
        return "stray" not in await _names(core)

    await eventually(collected, what="stray collected")


async def test_namespace_deletion_removes_its_objects(kube_api) -> None:
    core = client.CoreV1Api(kube_api)
    apps = client.AppsV1Api(kube_api)
    await core.create_namespace({"metadata": {"name": "team-x"}})
    await core.create_namespaced_config_map("team-x", {"metadata": {"name": "c"}})
    await core.create_namespaced_secret("team-x", {"metadata": {"name": "s"}})
    await apps.create_namespaced_stateful_set("team-x", statefulset("db", replicas=1))
    await core.create_namespaced_config_map("default", {"metadata": {"name": "survivor"}})
    response = await core.delete_namespace("team-x", _preload_content=False)
    terminating = json.loads(await response.read())
    assert terminating["status"] == {"phase": "Terminating"}
    assert terminating["metadata"]["deletionTimestamp"]

    async def gone():
        names = [n.metadata.name for n in (await core.list_namespace()).items]
        return "team-x" not in names

    await eventually(gone, what="namespace removed")
    assert (await core.list_namespaced_config_map("team-x")).items == []
    assert (await core.list_namespaced_pod("team-x")).items == []
    assert (await apps.list_namespaced_stateful_set("team-x")).items == []
    assert [c.metadata.name for c in (await core.list_namespaced_config_map("default")).items] == ["survivor"]
    with pytest.raises(client.ApiException) as info:
        await core.create_namespaced_config_map("team-x", {"metadata": {"name": "late"}})
    assert info.value.status == 404
    with pytest.raises(client.ApiException) as info:
        await core.delete_namespace("default")
    assert info.value.status == 403
    assert status_of(info.value)["reason"] == "Forbidden"


async def test_delete_collection_by_label(kube_api) -> None:
    core = client.CoreV1Api(kube_api)
    for name, team in (("a", "x"), ("b", "x"), ("c", "y")):
        await core.create_namespaced_config_map(
            "default", {"metadata": {"name": name, "labels": {"team": team}}}
        )
    await core.delete_collection_namespaced_config_map("default", label_selector="team=x")
    assert await _names(core) == {"c"}

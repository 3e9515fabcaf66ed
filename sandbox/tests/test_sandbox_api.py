"""The sandbox API through kubernetes-asyncio: discovery, CRUD, errors, concurrency, selectors, paging."""

from __future__ import annotations

import aiohttp
import pytest
from kubernetes_asyncio import client
from sandbox_support import DATABASE_CRD, eventually, statefulset, status_of


async def test_discovery_describes_groups_resources_and_subresources(sandbox, kube_api) -> None:
    versions = await client.CoreApi(kube_api).get_api_versions()
    assert versions.versions == ["v1"]
    groups = await client.ApisApi(kube_api).get_api_versions()
    names = [g.name for g in groups.groups]
    assert names[:5] == [
        "apps",
        "coordination.k8s.io",
        "admissionregistration.k8s.io",
        "apiextensions.k8s.io",
        "metrics.k8s.io",
    ]
    apps = await client.AppsV1Api(kube_api).get_api_resources()
    by_name = {r.name: r for r in apps.resources}
    assert by_name["statefulsets"].short_names == ["sts"]
    assert by_name["statefulsets"].namespaced is True
    assert by_name["statefulsets/scale"].group == "autoscaling"
    assert by_name["statefulsets/scale"].kind == "Scale"
    assert "statefulsets/status" in by_name
    core = await client.CoreV1Api(kube_api).get_api_resources()
    assert {
        "pods",
        "services",
        "secrets",
        "configmaps",
        "events",
        "namespaces",
        "persistentvolumeclaims",
    } <= {r.name for r in core.resources}
    async with aiohttp.ClientSession() as http, http.get(f"{sandbox.url}/version") as resp:
        version = await resp.json()
    assert version["major"] == "1"
    assert version["gitVersion"].startswith("v1.32")


async def test_crd_kinds_appear_in_discovery_and_disappear_with_the_crd(kube_api) -> None:
    ext = client.ApiextensionsV1Api(kube_api)
    crd = await ext.create_custom_resource_definition(DATABASE_CRD)
    assert {c.type: c.status for c in crd.status.conditions} == {
        "NamesAccepted": "True",
        "Established": "True",
    }
    groups = await client.ApisApi(kube_api).get_api_versions()
    assert "platform.company.com" in [g.name for g in groups.groups]
    custom = client.CustomObjectsApi(kube_api)
    await custom.create_namespaced_custom_object(
        "platform.company.com",
        "v1",
        "default",
        "databases",
        {
            "apiVersion": "platform.company.com/v1",
            "kind": "Database",
            "metadata": {"name": "orders"},
            "spec": {"engine": "postgresql", "version": "15"},
        },
    )
    got = await custom.get_namespaced_custom_object(
        "platform.company.com", "v1", "default", "databases", "orders"
    )
    assert got["spec"]["engine"] == "postgresql"
    assert got["metadata"]["generation"] == 1
    await ext.delete_custom_resource_definition("databases.platform.company.com")
    groups = await client.ApisApi(kube_api).get_api_versions()
    assert "platform.company.com" not in [g.name for g in groups.groups]
    with pytest.raises(client.ApiException) as info:
        await custom.list_namespaced_custom_object("platform.company.com", "v1", "default", "databases")
    assert info.value.status == 404


async def test_writes_get_uid_timestamp_and_one_global_resource_version(kube_api) -> None:
    core = client.CoreV1Api(kube_api)
    first = await core.create_namespaced_config_map(
        "default", {"metadata": {"name": "a"}, "data": {"k": "v"}}
    )
    second = await core.create_namespaced_secret(
        "default", {"metadata": {"name": "b"}, "stringData": {"pw": "x"}}
    )
    third = await client.AppsV1Api(kube_api).create_namespaced_stateful_set(
        "default", statefulset("c", replicas=0)
    )
    rvs = [int(o.metadata.resource_version) for o in (first, second, third)]
    assert rvs == sorted(rvs)
    assert len(set(rvs)) == 3
    assert first.metadata.uid != second.metadata.uid
    assert first.metadata.creation_timestamp is not None
    assert second.data == {"pw": "eA=="}
    assert second.type == "Opaque"
    listed = await core.list_namespaced_config_map("default")
    assert int(listed.metadata.resource_version) >= rvs[-1]
    assert [c.metadata.name for c in listed.items] == ["a"]


async def test_missing_object_is_a_not_found_status(kube_api) -> None:
    with pytest.raises(client.ApiException) as info:
        await client.CoreV1Api(kube_api).read_namespaced_config_map("nope", "default")
    assert info.value.status == 404
    body = status_of(info.value)
    assert body["reason"] == "NotFound"
    assert body["code"] == 404
    assert body["message"] == 'configmaps "nope" not found'
    assert body["details"] == {"name": "nope", "kind": "configmaps"}
    with pytest.raises(client.ApiException) as info:
        await client.AppsV1Api(kube_api).read_namespaced_stateful_set("nope", "default")
    assert status_of(info.value)["message"] == 'statefulsets.apps "nope" not found'


async def test_duplicate_create_is_already_exists(kube_api) -> None:
    core = client.CoreV1Api(kube_api)
    await core.create_namespaced_config_map("default", {"metadata": {"name": "dup"}})
    with pytest.raises(client.ApiException) as info:
        await core.create_namespaced_config_map("default", {"metadata": {"name": "dup"}})
    assert info.value.status == 409
    body = status_of(info.value)
    assert body["reason"] == "AlreadyExists"
    assert body["message"] == 'configmaps "dup" already exists'


async def test_invalid_objects_are_rejected_with_field_causes(kube_api) -> None:
    apps = client.AppsV1Api(kube_api)
    bad = statefulset("bad")
    bad["spec"]["template"]["metadata"]["labels"] = {"app": "other"}
    with pytest.raises(client.ApiException) as info:
        await apps.create_namespaced_stateful_set("default", bad)
    assert info.value.status == 422
    body = status_of(info.value)
    assert body["reason"] == "Invalid"
    assert body["message"].startswith('StatefulSet.apps "bad" is invalid: spec.template.metadata.labels')
    assert body["details"]["causes"][0]["field"] == "spec.template.metadata.labels"
    with pytest.raises(client.ApiException) as info:
        await client.CoreV1Api(kube_api).create_namespaced_config_map(
            "default", {"metadata": {"name": "Bad_Name"}}
        )
    assert info.value.status == 422
    assert status_of(info.value)["details"]["causes"][0]["field"] == "metadata.name"
    await apps.create_namespaced_stateful_set("default", statefulset("good", replicas=0))
    with pytest.raises(client.ApiException) as info:
        await apps.patch_namespaced_stateful_set("good", "default", {"spec": {"serviceName": "changed"}})
    assert info.value.status == 422
    assert "updates to statefulset spec for fields other than" in status_of(info.value)["message"]


async def test_namespaced_create_needs_an_existing_namespace(kube_api) -> None:
    with pytest.raises(client.ApiException) as info:
        await client.CoreV1Api(kube_api).create_namespaced_config_map("missing", {"metadata": {"name": "x"}})
    assert info.value.status == 404
    assert status_of(info.value)["message"] == 'namespaces "missing" not found'


async def test_update_with_stale_resource_version_conflicts(kube_api) -> None:
    core = client.CoreV1Api(kube_api)
    created = await core.create_namespaced_config_map(
        "default", {"metadata": {"name": "cc"}, "data": {"v": "1"}}
    )
    created.data = {"v": "2"}
    updated = await core.replace_namespaced_config_map("cc", "default", created)
    assert int(updated.metadata.resource_version) > int(created.metadata.resource_version)
    created.data = {"v": "3"}
    with pytest.raises(client.ApiException) as info:
        await core.replace_namespaced_config_map("cc", "default", created)
    assert info.value.status == 409
    body = status_of(info.value)
    assert body["reason"] == "Conflict"
    assert "the object has been modified; please apply your changes to the latest version" in body["message"]
    current = await core.read_namespaced_config_map("cc", "default")
    assert current.data == {"v": "2"}


@pytest.mark.parametrize("sandbox_options", [{"simulate": False}])
async def test_generation_moves_with_spec_changes_only(kube_api) -> None:
    apps = client.AppsV1Api(kube_api)
    created = await apps.create_namespaced_stateful_set("default", statefulset("gen", replicas=0))
    assert created.metadata.generation == 1
    labelled = await apps.patch_namespaced_stateful_set(
        "gen", "default", {"metadata": {"labels": {"x": "y"}}}
    )
    assert labelled.metadata.generation == 1
    assert int(labelled.metadata.resource_version) > int(created.metadata.resource_version)
    status = await apps.patch_namespaced_stateful_set_status(
        "gen", "default", {"status": {"replicas": 0, "collisionCount": 7}}
    )
    assert status.metadata.generation == 1
    assert status.status.collision_count == 7
    scaled = await apps.patch_namespaced_stateful_set(
        "gen", "default", {"spec": {"replicas": 0, "minReadySeconds": 3}}
    )
    assert scaled.metadata.generation == 2
    same = await apps.patch_namespaced_stateful_set("gen", "default", {"spec": {"minReadySeconds": 3}})
    assert same.metadata.generation == 2
    assert same.metadata.resource_version == scaled.metadata.resource_version
    ignored = await apps.patch_namespaced_stateful_set("gen", "default", {"status": {"collisionCount": 1}})
    assert ignored.status.collision_count == 7
    config_map = await client.CoreV1Api(kube_api).create_namespaced_config_map(
        "default", {"metadata": {"name": "g"}}
    )
    assert config_map.metadata.generation is None


async def test_custom_objects_bump_generation_on_spec_but_not_status(kube_api) -> None:
    await client.ApiextensionsV1Api(kube_api).create_custom_resource_definition(DATABASE_CRD)
    custom = client.CustomObjectsApi(kube_api)
    args = ("platform.company.com", "v1", "default", "databases")
    await custom.create_namespaced_custom_object(
        *args,
        {
            "apiVersion": "platform.company.com/v1",
            "kind": "Database",
            "metadata": {"name": "d"},
            "spec": {"size": "small"},
        },
    )
    merge = "application/merge-patch+json"
    status = await custom.patch_namespaced_custom_object_status(
        *args, "d", {"status": {"phase": "Ready"}}, _content_type=merge
    )
    assert status["metadata"]["generation"] == 1
    assert status["status"] == {"phase": "Ready"}
    changed = await custom.patch_namespaced_custom_object(
        *args, "d", {"spec": {"size": "large"}}, _content_type=merge
    )
    assert changed["metadata"]["generation"] == 2
    assert changed["status"] == {"phase": "Ready"}


async def test_label_selectors_equality_and_set_based(kube_api) -> None:
    core = client.CoreV1Api(kube_api)
    for name, labels in {
        "a": {"env": "prod", "tier": "db"},
        "b": {"env": "dev", "tier": "db"},
        "c": {"env": "staging"},
        "d": {},
    }.items():
        await core.create_namespaced_config_map("default", {"metadata": {"name": name, "labels": labels}})

    async def names(selector: str) -> list[str]:
        found = await core.list_namespaced_config_map("default", label_selector=selector)
        return [c.metadata.name for c in found.items]

    assert await names("env=prod") == ["a"]
    assert await names("env==dev") == ["b"]
    assert await names("env!=prod") == ["b", "c", "d"]
    assert await names("env in (prod, staging)") == ["a", "c"]
    assert await names("env notin (prod,staging)") == ["b", "d"]
    assert await names("tier") == ["a", "b"]
    assert await names("!tier") == ["c", "d"]
    assert await names("tier=db,env!=dev") == ["a"]
    with pytest.raises(client.ApiException) as info:
        await names("env in prod")
    assert info.value.status == 400


async def test_field_selectors_by_name_namespace_and_pod_phase(kube_api) -> None:
    core = client.CoreV1Api(kube_api)
    await core.create_namespace({"metadata": {"name": "other"}})
    pod = {"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "busybox:1.36"}]}}
    await core.create_namespaced_pod("default", pod)
    await core.create_namespaced_pod("other", pod)
    by_name = await core.list_pod_for_all_namespaces(
        field_selector="metadata.name=p,metadata.namespace=other"
    )
    assert [(p.metadata.namespace, p.metadata.name) for p in by_name.items] == [("other", "p")]
    not_default = await core.list_pod_for_all_namespaces(field_selector="metadata.namespace!=default")
    assert [p.metadata.namespace for p in not_default.items] == ["other"]

    async def running() -> list[str] | None:
        found = await core.list_pod_for_all_namespaces(field_selector="status.phase=Running")
        namespaces = [p.metadata.namespace for p in found.items]
        return namespaces if len(namespaces) >= 2 else None  # the kubelet starts them one by one

    assert await eventually(running, what="both pods running", within=15) == ["default", "other"]
    pending = await core.list_pod_for_all_namespaces(field_selector="status.phase=Pending")
    assert pending.items == []
    with pytest.raises(client.ApiException) as info:
        await core.list_namespaced_pod("default", field_selector="spec.bogus=1")
    assert info.value.status == 400
    assert "field label not supported: spec.bogus" in status_of(info.value)["message"]


async def test_list_paging_with_limit_and_continue(kube_api) -> None:
    core = client.CoreV1Api(kube_api)
    for i in range(7):
        await core.create_namespaced_config_map("default", {"metadata": {"name": f"cm-{i}"}})
    seen: list[str] = []
    page = await core.list_namespaced_config_map("default", limit=3)
    assert page.metadata.remaining_item_count == 4
    first_rv = page.metadata.resource_version
    while True:
        seen += [c.metadata.name for c in page.items]
        assert len(page.items) <= 3
        if not page.metadata._continue:
            break
        assert page.metadata.resource_version == first_rv
        page = await core.list_namespaced_config_map("default", limit=3, _continue=page.metadata._continue)
    assert seen == [f"cm-{i}" for i in range(7)]
    with pytest.raises(client.ApiException) as info:
        await core.list_namespaced_config_map("default", limit=3, _continue="not-a-token")
    assert info.value.status == 400


async def test_paging_a_selection_across_namespaces_visits_each_match_once_in_order(kube_api) -> None:
    """Pages of a label selection over every namespace: each match once, in (namespace, name)
    order, created out of order; no remainingItemCount (kube-apiserver leaves it unset with a
    selector), and a full last page may continue to an empty one."""
    core = client.CoreV1Api(kube_api)
    for ns in ("page-b", "page-a"):
        await core.create_namespace({"metadata": {"name": ns}})
    wanted = []
    for ns in ("page-b", "page-a"):
        for i in (4, 0, 3, 1, 2):
            picked = i % 2 == 0
            labels = {"pick": "yes" if picked else "no"}
            await core.create_namespaced_config_map(ns, {"metadata": {"name": f"cm-{i}", "labels": labels}})
            if picked:
                wanted.append((ns, f"cm-{i}"))
    seen: list[tuple[str, str]] = []
    token = None
    pages = 0
    while True:
        page = await core.list_config_map_for_all_namespaces(
            label_selector="pick=yes", limit=2, **({"_continue": token} if token else {})
        )
        pages += 1
        assert page.metadata.remaining_item_count is None
        assert len(page.items) <= 2
        seen += [(c.metadata.namespace, c.metadata.name) for c in page.items]
        token = page.metadata._continue
        if not token:
            break
    assert seen == sorted(wanted)
    assert pages in (3, 4)  # 6 matches by 2; a full last page may lead to an empty one
    everything = await core.list_namespaced_config_map("page-a", limit=4)
    assert everything.metadata.remaining_item_count == 1  # no selector: counted


async def test_leases_round_trip(kube_api) -> None:
    coordination = client.CoordinationV1Api(kube_api)
    lease = await coordination.create_namespaced_lease(
        "default",
        {"metadata": {"name": "broker-leader"}, "spec": {"holderIdentity": "a", "leaseDurationSeconds": 15}},
    )
    lease.spec.holder_identity = "b"
    renewed = await coordination.replace_namespaced_lease("broker-leader", "default", lease)
    assert renewed.spec.holder_identity == "b"
    lease.spec.holder_identity = "c"
    with pytest.raises(client.ApiException) as info:
        await coordination.replace_namespaced_lease("broker-leader", "default", lease)
    assert info.value.status == 409


async def test_services_get_cluster_ips_and_defaults(kube_api) -> None:
    core = client.CoreV1Api(kube_api)
    svc = await core.create_namespaced_service(
        "default",
        {"metadata": {"name": "db"}, "spec": {"selector": {"app": "db"}, "ports": [{"port": 5432}]}},
    )
    assert svc.spec.type == "ClusterIP"
    assert svc.spec.cluster_ip.startswith("10.96.")
    assert svc.spec.ports[0].protocol == "TCP"
    assert svc.spec.ports[0].target_port == 5432
    headless = await core.create_namespaced_service(
        "default", {"metadata": {"name": "h"}, "spec": {"clusterIP": "None", "selector": {"app": "db"}}}
    )
    assert headless.spec.cluster_ip == "None"
    deleted = await core.delete_namespaced_service("db", "default")
    assert deleted.metadata.name == "db"
    with pytest.raises(client.ApiException) as info:
        await core.read_namespaced_service("db", "default")
    assert info.value.status == 404

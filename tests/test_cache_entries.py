"""What the informer caches make of the JSON the API server sends: records, decoded at ingest.

Pure: no cluster. The end-to-end tests (test_e2e_drift, test_read_model) show the same records at
work against the sandbox; these pin the decoding rules that a cluster rarely exercises: objects with
fields of unexpected types, bookmarks, other managers' fieldsV1, a list page against single objects.
"""

from __future__ import annotations

import json
from typing import Any

from broker.kube import entries, manifests

OWNER = "deploy-0123456789ab"


def meta(name: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": "team-a",
        "resourceVersion": "42",
        "labels": {"broker.platform/deployment-id": OWNER, "app.kubernetes.io/name": name},
        "annotations": {manifests.OWNER_ANNOTATION: OWNER},
        **extra,
    }


def statefulset(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": meta(
            "db",
            managedFields=[
                {
                    "manager": "resource-broker",
                    "operation": "Apply",
                    "time": "2026-12-01T10:00:00Z",
                    "fieldsV1": {"f:spec": {"f:replicas": {}}},
                },
                {
                    "manager": "kubectl",
                    "operation": "Update",
                    "time": "2026-12-01T11:00:00Z",
                    "fieldsV1": {"f:spec": {"f:replicas": {}}},
                },
                {
                    "manager": "kube-controller-manager",
                    "operation": "Update",
                    "subresource": "status",
                    "time": "2026-12-01T12:00:00Z",
                    "fieldsV1": {"f:status": {"f:replicas": {}}},
                },
            ],
        ),
        "spec": {
            "replicas": 3,
            "template": {
                "spec": {
                    "containers": [
                        {
                            "name": "postgresql",
                            "image": "postgres:15.2",
                            "resources": {
                                "requests": {"cpu": "500m", "memory": "1Gi"},
                                "limits": {"cpu": "1"},
                            },
                            "env": [
                                {"name": "PGDATA", "value": "/data"},
                                {
                                    "name": "POSTGRES_PASSWORD",
                                    "valueFrom": {
                                        "secretKeyRef": {"name": "db-credentials", "key": "password"}
                                    },
                                },
                            ],
                        }
                    ],
                    "volumes": [{"name": "scratch", "emptyDir": {}}],
                }
            },
            "volumeClaimTemplates": [{"spec": {"resources": {"requests": {"storage": "10Gi"}}}}],
            **spec,
        },
        "status": {"replicas": 3, "readyReplicas": 3},
    }


def test_a_statefulset_is_reduced_to_what_observing_reads() -> None:
    record = entries.project("StatefulSet", statefulset())
    assert isinstance(record, entries.Workload)
    assert (record.namespace, record.name, record.resource_version, record.owner) == (
        "team-a",
        "db",
        "42",
        OWNER,
    )
    assert (record.replicas, record.image, record.cpu_request, record.cpu_limit) == (
        3,
        "postgres:15.2",
        "500m",
        "1",
    )
    assert (record.memory_request, record.memory_limit, record.storage) == ("1Gi", "", "10Gi")
    assert record.env == {"PGDATA": "/data", "POSTGRES_PASSWORD": "secret db-credentials/password"}
    # The latest manager other than the broker that set spec.replicas; status reports do not count.
    assert dict(record.field_managers) == {"replicas": "kubectl"}
    assert record.unreadable == ()


def test_a_list_page_decodes_to_the_records_of_its_objects() -> None:
    objects = [statefulset(), {**statefulset(), "metadata": {**meta("db2"), "resourceVersion": "43"}}]
    body = json.dumps(
        {
            "kind": "StatefulSetList",
            "metadata": {"resourceVersion": "99", "continue": "abc"},
            "items": objects,
        }
    )
    page = entries.kind("StatefulSet").page(body.encode())
    assert (page.resource_version, page.continue_token) == ("99", "abc")
    assert page.items == [entries.project("StatefulSet", o) for o in objects]


def test_an_object_with_fields_of_odd_types_is_read_leniently_not_failing_its_page() -> None:
    """A custom resource without a schema, or a lax cluster: the page still lists every object."""
    unreadable = statefulset(replicas="three")  # noted as unreadable, the rest read as usual
    odd = statefulset()
    odd["metadata"]["name"] = "db-odd"
    odd["spec"]["template"]["spec"]["containers"][0]["image"] = 15  # not even the API's types
    body = json.dumps(
        {"metadata": {"resourceVersion": "7"}, "items": [statefulset(), unreadable, odd]}
    ).encode()
    page = entries.kind("StatefulSet").page(body)
    assert [r.name for r in page.items] == ["db", "db", "db-odd"]
    noted = page.items[1]
    assert isinstance(noted, entries.Workload)
    assert dict(noted.unreadable) == {"replicas": "'three'"}
    assert noted.image == "postgres:15.2"
    lax = page.items[2]
    assert isinstance(lax, entries.Workload)
    assert (lax.owner, lax.resource_version) == (OWNER, "42")  # still known to be the deployment's
    assert lax.storage == "10Gi"  # read leniently: what has the right type still counts


def test_an_unreadable_object_keeps_at_least_its_identity() -> None:
    body = json.dumps(
        {"metadata": meta("db"), "spec": {"template": {"spec": {"containers": "none"}}}}
    ).encode()
    record = entries.kind("StatefulSet").decode(body)
    assert (record.name, record.owner) == ("db", OWNER)


def test_a_bookmark_is_a_record_with_only_its_version() -> None:
    record = entries.kind("Pod").decode(b'{"kind": "Pod", "metadata": {"resourceVersion": "1234"}}')
    assert (record.resource_version, record.name, record.owner) == ("1234", "", "")


def test_a_pod_record() -> None:
    pod = {
        "metadata": meta("db-0", deletionTimestamp="2026-12-01T12:00:00Z"),
        "spec": {
            "containers": [{"name": "postgresql", "image": "postgres:15.2"}],
            "volumes": [{"name": "x"}],
        },
        "status": {
            "phase": "Running",
            "conditions": [{"type": "Ready", "status": "False"}],
            "containerStatuses": [
                {
                    "image": "docker.io/library/postgres:15.2",
                    "restartCount": 4,
                    "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                    "lastState": {"terminated": {"exitCode": 1, "finishedAt": "2026-12-01T11:59:00Z"}},
                }
            ],
        },
    }
    record = entries.project("Pod", pod)
    assert isinstance(record, entries.Pod)
    assert record.deleting
    assert not record.ready
    assert (record.phase, record.restart_count, record.waiting_reason) == ("Running", 4, "CrashLoopBackOff")
    assert record.image == "postgres:15.2"  # the spec's, not the runtime's spelling
    assert record.last_restart is not None
    assert record.last_restart.isoformat() == "2026-12-01T11:59:00+00:00"


def test_a_secret_record_says_whether_its_data_changed_and_keeps_none_of_it() -> None:
    data = {"password": "c2VjcmV0LXZhbHVl"}
    annotations = {
        manifests.OWNER_ANNOTATION: OWNER,
        manifests.CHECKSUM_ANNOTATION: manifests.data_checksum(data),
    }
    secret = {"metadata": {**meta("db-credentials"), "annotations": annotations}, "data": data}
    record = entries.project("Secret", secret)
    assert isinstance(record, entries.Secret)
    assert not record.changed
    assert "c2VjcmV0" not in repr(record)
    assert "secret-value" not in repr(record)
    changed = entries.project("Secret", {**secret, "data": {"password": "b3RoZXI="}})
    assert isinstance(changed, entries.Secret)
    assert changed.changed


def test_pod_usage_is_summed_over_containers() -> None:
    body = json.dumps(
        {
            "metadata": {"resourceVersion": "5"},
            "items": [
                {
                    "metadata": meta("db-0"),
                    "containers": [
                        {"name": "a", "usage": {"cpu": "250m", "memory": "64Mi"}},
                        {"name": "b", "usage": {"cpu": "0.25", "memory": "64Mi"}},
                    ],
                }
            ],
        }
    ).encode()
    (usage,) = entries.USAGE.page(body).items
    assert (usage.namespace, usage.name) == ("team-a", "db-0")
    assert (str(usage.cpu), int(usage.memory)) == ("0.500", 128 * 2**20)


def test_no_input_fails_a_page_or_an_event() -> None:
    """Odd objects a lax cluster could hold: each is read as far as it can be, none stops the cache."""
    out_of_range = {"metadata": meta("data-db-0"), "status": {"capacity": {"storage": "1e9999999"}}}
    claim = entries.kind("PersistentVolumeClaim").decode(json.dumps(out_of_range).encode())
    assert isinstance(claim, entries.Claim)
    assert (claim.name, claim.capacity) == ("data-db-0", None)
    odd_managers = statefulset()
    odd_managers["metadata"]["managedFields"] = 5
    workload = entries.kind("StatefulSet").decode(json.dumps(odd_managers).encode())
    assert (workload.name, workload.owner) == ("db", OWNER)
    not_an_object = b'{"metadata": {"resourceVersion": "3"}, "items": [7, {"metadata": {"name": "ok"}}]}'
    page = entries.kind("Service").page(not_an_object)
    assert [r.name for r in page.items] == ["ok"]  # the unreadable item has no name to cache it under
    assert entries.kind("Pod").decode(b"[1, 2]").name == ""


def test_usage_figures_do_not_evict_the_catalog_quantities_from_the_cache() -> None:
    from broker.domain import quantity

    quantity.parse("512Mi")
    hits = quantity.parse.cache_info().hits
    body = json.dumps(
        {
            "items": [
                {
                    "metadata": meta(f"db-{i}-0"),
                    "containers": [{"usage": {"cpu": f"{i}n", "memory": f"{i}Ki"}}],
                }
                for i in range(5000)
            ]
        }
    ).encode()
    assert len(entries.USAGE.page(body).items) == 5000
    quantity.parse("512Mi")
    assert quantity.parse.cache_info().hits == hits + 1


def test_an_environment_of_odd_shapes_is_rendered_not_raised() -> None:
    container = {
        "env": [
            {"name": "PGDATA", "value": "/data"},
            {"name": "ODD", "value": {"nested": True}},
            {"name": "REF", "valueFrom": {"secretKeyRef": {"name": "db-credentials", "key": "password"}}},
            "not a variable",
        ]
    }
    assert entries.env(container) == {
        "PGDATA": "/data",
        "ODD": "(unreadable)",
        "REF": "secret db-credentials/password",
        "": "(unreadable)",
    }
    assert entries.env({"env": "none"}) == {}

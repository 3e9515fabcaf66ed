"""Stock kubectl against the sandbox, as a user would drive it."""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import shutil

import pytest
import yaml
from kubernetes_asyncio import client
from sandbox_support import KAFKA_TOPIC_CRD, eventually, statefulset

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not on PATH")


class Kubectl:
    """Runs kubectl against one sandbox without blocking the event loop that serves it."""

    def __init__(self, kubeconfig: pathlib.Path, cache: pathlib.Path) -> None:
        self.base = ["kubectl", f"--kubeconfig={kubeconfig}", f"--cache-dir={cache}"]

    async def __call__(
        self, *args: str, stdin: str | None = None, env: dict[str, str] | None = None, check: bool = True
    ) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            *self.base,
            *args,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, **(env or {})},
        )
        out, err = await asyncio.wait_for(proc.communicate(stdin.encode() if stdin is not None else None), 30)
        code = proc.returncode or 0
        if check and code != 0:
            pytest.fail(f"kubectl {' '.join(args)} failed ({code}): {err.decode()}")
        return code, out.decode(), err.decode()

    async def json(self, *args: str) -> dict:
        _, out, _ = await self(*args, "-o", "json", "--show-managed-fields")
        return json.loads(out)


@pytest.fixture
def kubectl(sandbox_kubeconfig: pathlib.Path, tmp_path: pathlib.Path) -> Kubectl:
    return Kubectl(sandbox_kubeconfig, tmp_path / "kube-cache")


def _rows(table: str) -> list[list[str]]:
    return [line.split() for line in table.strip().splitlines()]


def _manifest(tmp_path: pathlib.Path, *docs: dict) -> str:
    path = tmp_path / "manifest.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    return str(path)


async def _wait_ready(kubectl: Kubectl, name: str, replicas: int) -> None:
    async def ready():
        sts = await kubectl.json("get", "statefulset", name)
        return (
            sts.get("status", {}).get("readyReplicas", 0) == replicas
            and sts["status"]["replicas"] == replicas
        )

    await eventually(ready, within=10, what=f"{name} to have {replicas} ready replicas")


async def test_api_resources_lists_builtin_and_crd_kinds(kubectl, kube_api) -> None:
    await client.ApiextensionsV1Api(kube_api).create_custom_resource_definition(KAFKA_TOPIC_CRD)
    _, out, _ = await kubectl("api-resources")
    rows = {r[0]: r for r in _rows(out)[1:] if len(r) >= 4}
    assert rows["statefulsets"][1:] == ["sts", "apps/v1", "true", "StatefulSet"]
    assert rows["namespaces"][1:] == ["ns", "v1", "false", "Namespace"]
    assert rows["kafkatopics"][1:] == ["kt", "kafka.strimzi.io/v1beta2", "true", "KafkaTopic"]
    assert rows["leases"][1:] == ["coordination.k8s.io/v1", "true", "Lease"]


async def test_get_leases_shows_who_holds_each(kubectl, kube_api) -> None:
    coordination = client.CoordinationV1Api(kube_api)
    for name, holder in (("resource-broker", "broker-7f9c-0"), ("released", "")):
        await coordination.create_namespaced_lease(
            "default",
            {"metadata": {"name": name}, "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15}},
        )
    _, out, _ = await kubectl("get", "leases")
    rows = _rows(out)
    assert rows[0] == ["NAME", "HOLDER", "AGE"]
    released, held = rows[1:]
    assert held[:2] == ["resource-broker", "broker-7f9c-0"]
    assert released[0] == "released"
    assert len(released) == len(held) - 1  # an empty holder is an empty column
    _, out, _ = await kubectl(
        "get",
        "lease",
        "resource-broker",
        "-o",
        "jsonpath={.spec.holderIdentity} {.spec.leaseDurationSeconds}",
    )
    assert out == "broker-7f9c-0 15"


async def test_apply_server_side_then_get_shows_ready_pods(kubectl, tmp_path) -> None:
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "pg"},
        "spec": {"selector": {"app": "pg"}, "ports": [{"port": 5432}]},
    }
    _, out, _ = await kubectl(
        "apply", "--server-side", "-f", _manifest(tmp_path, statefulset("pg", replicas=2), service)
    )
    assert "statefulset.apps/pg serverside-applied" in out
    assert "service/pg serverside-applied" in out
    await _wait_ready(kubectl, "pg", 2)
    _, out, _ = await kubectl("get", "pods")
    rows = _rows(out)
    assert rows[0] == ["NAME", "READY", "STATUS", "RESTARTS", "AGE"]
    assert [r[:4] for r in rows[1:]] == [["pg-0", "1/1", "Running", "0"], ["pg-1", "1/1", "Running", "0"]]
    _, out, _ = await kubectl("get", "sts")
    assert [r[:2] for r in _rows(out)] == [["NAME", "READY"], ["pg", "2/2"]]
    _, out, _ = await kubectl("get", "svc", "pg")
    header, row = _rows(out)
    assert header == ["NAME", "TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)", "AGE"]
    assert row[:2] == ["pg", "ClusterIP"]
    assert row[2].startswith("10.96.")
    assert row[4] == "5432/TCP"
    _, out, _ = await kubectl("get", "pvc")
    assert _rows(out)[1][:2] == ["data-pg-0", "Bound"]
    _, out, _ = await kubectl("get", "pods", "-l", "app=pg", "-o", "name")
    assert out.split() == ["pod/pg-0", "pod/pg-1"]


async def test_apply_server_side_conflict_and_force(kubectl, tmp_path) -> None:
    manifest = _manifest(tmp_path, statefulset("cf", replicas=1, storage=None))
    await kubectl("apply", "--server-side", "-f", manifest)
    await kubectl("scale", "statefulset", "cf", "--replicas=3")
    code, _, err = await kubectl("apply", "--server-side", "-f", manifest, check=False)
    assert code != 0
    assert 'conflict with "kubectl" with subresource "scale" using apps/v1: .spec.replicas' in err
    await kubectl("apply", "--server-side", "--force-conflicts", "-f", manifest)
    sts = await kubectl.json("get", "sts", "cf")
    assert sts["spec"]["replicas"] == 1


async def test_scale_is_recorded_in_managed_fields(kubectl, tmp_path) -> None:
    await kubectl(
        "apply", "--server-side", "-f", _manifest(tmp_path, statefulset("sc", replicas=1, storage=None))
    )
    _, out, _ = await kubectl("scale", "statefulset", "sc", "--replicas=2")
    assert "statefulset.apps/sc scaled" in out
    await _wait_ready(kubectl, "sc", 2)
    _, out, _ = await kubectl("get", "sts", "sc", "-o", "yaml", "--show-managed-fields")
    managed = yaml.safe_load(out)["metadata"]["managedFields"]
    entries = {(m["manager"], m["operation"], m.get("subresource", "")): m for m in managed}
    # kubectl 1.32 sends no fieldManager for scale; the manager is its User-Agent prefix, "kubectl".
    scale = entries[("kubectl", "Update", "scale")]
    assert scale["fieldsV1"] == {"f:spec": {"f:replicas": {}}}
    assert "f:replicas" not in entries[("kubectl", "Apply", "")]["fieldsV1"]["f:spec"]
    assert ("kube-controller-manager", "Update", "status") in entries


async def test_patch_merge_and_strategic(kubectl, kube_api) -> None:
    await client.AppsV1Api(kube_api).create_namespaced_stateful_set("default", statefulset("pt", replicas=0))
    await kubectl("patch", "statefulset", "pt", "--type=merge", "-p", '{"metadata":{"labels":{"tier":"db"}}}')
    await kubectl(
        "patch",
        "statefulset",
        "pt",
        "-p",
        json.dumps(
            {
                "spec": {
                    "template": {
                        "spec": {"containers": [{"name": "main", "env": [{"name": "MODE", "value": "fast"}]}]}
                    }
                }
            }
        ),
    )
    await kubectl(
        "patch",
        "statefulset",
        "pt",
        "--type=json",
        "-p",
        '[{"op":"add","path":"/spec/minReadySeconds","value":5}]',
    )
    sts = await kubectl.json("get", "sts", "pt")
    container = sts["spec"]["template"]["spec"]["containers"][0]
    assert sts["metadata"]["labels"] == {"app": "pt", "tier": "db"}
    assert container["image"] == "postgres:15"
    assert container["ports"] == [{"containerPort": 5432, "protocol": "TCP"}]
    assert container["env"] == [{"name": "MODE", "value": "fast"}]
    assert sts["spec"]["minReadySeconds"] == 5
    managers = {m["manager"] for m in sts["metadata"]["managedFields"]}
    assert "kubectl-patch" in managers


async def test_label_annotate_and_set_commands_are_attributed(kubectl, kube_api) -> None:
    await client.AppsV1Api(kube_api).create_namespaced_stateful_set(
        "default", statefulset("attr", replicas=1)
    )
    await kubectl("label", "statefulset", "attr", "owner=team-a")
    await kubectl("annotate", "statefulset", "attr", "note=hello")
    await kubectl("set", "image", "statefulset/attr", "main=postgres:16")
    await kubectl("set", "resources", "statefulset/attr", "-c", "main", "--limits=cpu=2,memory=2Gi")
    sts = await kubectl.json("get", "sts", "attr")
    assert sts["metadata"]["labels"]["owner"] == "team-a"
    assert sts["metadata"]["annotations"]["note"] == "hello"
    container = sts["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "postgres:16"
    assert container["resources"]["limits"] == {"cpu": "2", "memory": "2Gi"}
    assert container["resources"]["requests"] == {"cpu": "500m", "memory": "1Gi"}
    fields = {m["manager"]: m["fieldsV1"] for m in sts["metadata"]["managedFields"]}
    assert fields["kubectl-label"] == {"f:metadata": {"f:labels": {"f:owner": {}}}}
    assert fields["kubectl-annotate"] == {"f:metadata": {"f:annotations": {".": {}, "f:note": {}}}}
    containers = fields["kubectl-set"]["f:spec"]["f:template"]["f:spec"]["f:containers"]
    assert set(containers['k:{"name":"main"}']) >= {"f:image", "f:resources"}

    async def rolled():
        pods = (await kubectl.json("get", "pods", "-l", "app=attr"))["items"]
        statuses = [p.get("status", {}).get("containerStatuses", [{}])[0] for p in pods]
        return (
            len(statuses) == 1 and statuses[0].get("ready") and statuses[0].get("image") == "postgres:16"
        )  # the spec image, as kubelet reports it

    await eventually(rolled, within=10, what="the new image to roll out")


async def test_edit_with_an_editor(kubectl, kube_api, tmp_path) -> None:
    await client.AppsV1Api(kube_api).create_namespaced_stateful_set("default", statefulset("ed", replicas=0))
    editor = tmp_path / "editor.sh"
    editor.write_text('#!/bin/sh\nsed -i "s/replicas: 0/replicas: 4/" "$1"\n')
    editor.chmod(0o755)
    _, out, _ = await kubectl("edit", "statefulset", "ed", env={"KUBE_EDITOR": str(editor)})
    assert "statefulset.apps/ed edited" in out
    sts = await kubectl.json("get", "sts", "ed")
    assert sts["spec"]["replicas"] == 4
    assert any(m["manager"] == "kubectl-edit" for m in sts["metadata"]["managedFields"])


async def test_replace_and_stale_replace(kubectl, kube_api, tmp_path) -> None:
    core = client.CoreV1Api(kube_api)
    await core.create_namespaced_config_map("default", {"metadata": {"name": "rep"}, "data": {"v": "1"}})
    current = await kubectl.json("get", "configmap", "rep")
    current["data"] = {"v": "2"}
    path = tmp_path / "rep.json"
    path.write_text(json.dumps(current))
    _, out, _ = await kubectl("replace", "-f", str(path))
    assert "configmap/rep replaced" in out
    assert (await core.read_namespaced_config_map("rep", "default")).data == {"v": "2"}
    code, _, err = await kubectl("replace", "-f", str(path), check=False)
    assert code != 0
    assert "the object has been modified" in err


async def test_get_watch_prints_changes(kubectl, kube_api, sandbox_kubeconfig, tmp_path) -> None:
    core = client.CoreV1Api(kube_api)
    await core.create_namespaced_config_map("default", {"metadata": {"name": "first"}})
    proc = await asyncio.create_subprocess_exec(
        *kubectl.base,
        "get",
        "configmaps",
        "-w",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    try:
        header = (await asyncio.wait_for(proc.stdout.readline(), 10)).decode().split()
        assert header == ["NAME", "DATA", "AGE"]
        first = (await asyncio.wait_for(proc.stdout.readline(), 10)).decode().split()
        assert first[:2] == ["first", "0"]
        await core.create_namespaced_config_map(
            "default", {"metadata": {"name": "second"}, "data": {"a": "b"}}
        )
        line = (await asyncio.wait_for(proc.stdout.readline(), 10)).decode().split()
        assert line[:2] == ["second", "1"]
    finally:
        proc.kill()
        await proc.wait()


async def test_delete_cascades_and_service_delete(kubectl, tmp_path) -> None:
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "gone"},
        "spec": {"selector": {"app": "gone"}, "ports": [{"port": 80}]},
    }
    await kubectl(
        "apply", "--server-side", "-f", _manifest(tmp_path, statefulset("gone", replicas=2), service)
    )
    await _wait_ready(kubectl, "gone", 2)
    _, out, _ = await kubectl("delete", "statefulset", "gone")
    assert 'statefulset.apps "gone" deleted' in out

    async def no_pods():
        return (await kubectl.json("get", "pods", "-l", "app=gone"))["items"] == []

    await eventually(no_pods, what="pods cascaded")
    claims = (await kubectl.json("get", "pvc"))["items"]
    assert sorted(c["metadata"]["name"] for c in claims) == ["data-gone-0", "data-gone-1"]
    _, out, _ = await kubectl("delete", "service", "gone")
    assert 'service "gone" deleted' in out
    code, _, err = await kubectl("get", "service", "gone", check=False)
    assert code != 0
    assert 'services "gone" not found' in err


async def test_get_custom_resources_uses_printer_columns(kubectl, kube_api) -> None:
    await client.ApiextensionsV1Api(kube_api).create_custom_resource_definition(KAFKA_TOPIC_CRD)
    await client.CustomObjectsApi(kube_api).create_namespaced_custom_object(
        "kafka.strimzi.io",
        "v1beta2",
        "default",
        "kafkatopics",
        {
            "apiVersion": "kafka.strimzi.io/v1beta2",
            "kind": "KafkaTopic",
            "metadata": {"name": "events"},
            "spec": {"partitions": 12},
        },
    )

    async def ready_row():
        _, out, _ = await kubectl("get", "kafkatopics")
        rows = _rows(out)
        return rows if rows[1][-1] == "True" else None

    rows = await eventually(ready_row, what="topic ready column")
    assert rows[0] == ["NAME", "PARTITIONS", "READY"]
    assert rows[1] == ["events", "12", "True"]


async def test_top_pods_reads_metrics(kubectl, kube_api) -> None:
    await client.AppsV1Api(kube_api).create_namespaced_stateful_set("default", statefulset("top", replicas=1))
    await _wait_ready(kubectl, "top", 1)

    async def top():
        code, out, _ = await kubectl("top", "pod", "top-0", check=False)
        return out if code == 0 else None

    out = await eventually(top, what="kubectl top")
    header, row = _rows(out)
    assert header == ["NAME", "CPU(cores)", "MEMORY(bytes)"]
    assert row[0] == "top-0"
    assert 125 <= int(row[1].removesuffix("m")) <= 250


async def test_create_generators_send_protobuf_that_the_sandbox_decodes(kubectl, kube_api) -> None:
    await kubectl("create", "namespace", "team-a")
    await kubectl("create", "configmap", "settings", "-n", "team-a", "--from-literal=mode=fast")
    await kubectl("create", "secret", "generic", "creds", "-n", "team-a", "--from-literal=password=s3cret")
    core = client.CoreV1Api(kube_api)
    namespace = await core.read_namespace("team-a")
    assert namespace.metadata.labels == {"kubernetes.io/metadata.name": "team-a"}
    config_map = await core.read_namespaced_config_map("settings", "team-a")
    assert config_map.data == {"mode": "fast"}
    assert config_map.metadata.generate_name is None
    assert config_map.metadata.managed_fields[0].manager == "kubectl-create"
    secret = await core.read_namespaced_secret("creds", "team-a")
    assert secret.data == {"password": "czNjcmV0"}
    assert secret.type == "Opaque"

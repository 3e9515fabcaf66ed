"""The sandbox across restarts: objects keep their identity, versions never go back, watches relist.

Each test starts sandboxes of its own on one state directory (the ``sandbox`` fixture is a
throwaway one without persistence) and talks to them over real HTTP, as clients of a restarted
API server would.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import pathlib
import shutil
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import yaml
from kube_sandbox import Sandbox, StateError, persistence, run_standalone
from kubernetes_asyncio import client, config
from sandbox_support import DATABASE_CRD, eventually, statefulset

PLATFORM = "team-platform"


@contextlib.asynccontextmanager
async def running(state_dir: pathlib.Path, **options: Any) -> AsyncIterator[tuple[Sandbox, client.ApiClient]]:
    """A started sandbox keeping its state in ``state_dir``, and an API client for it; stopped after."""
    sandbox = Sandbox(state_dir=state_dir, ready_delay=0.02, **options)
    await sandbox.start()
    kubeconfig = sandbox.write_kubeconfig(state_dir.parent / f"kc-{sandbox.port}.yaml")
    configuration = client.Configuration()
    await config.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)
    api = client.ApiClient(configuration)
    try:
        yield sandbox, api
    finally:
        await api.close()
        await sandbox.stop()


async def _raw_get(sandbox: Sandbox, path: str) -> Any:
    async with aiohttp.ClientSession() as http, http.get(f"{sandbox.url}{path}") as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def _first_watch_line(sandbox: Sandbox, path: str) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{sandbox.url}{path}", timeout=aiohttp.ClientTimeout(total=5)) as resp,
    ):
        assert resp.status == 200
        return dict(json.loads(await resp.content.readline()))


def _pods_ready(pods: dict[str, Any]) -> bool:
    return bool(pods["items"]) and all(
        any(
            c["type"] == "Ready" and c["status"] == "True"
            for c in (p.get("status") or {}).get("conditions", [])
        )
        for p in pods["items"]
    )


SNAPSHOT_PATHS = (
    "/api/v1/namespaces/team-a",
    "/api/v1/namespaces/team-a/secrets/db-credentials",
    "/api/v1/namespaces/team-a/configmaps/settings",
    "/api/v1/namespaces/team-a/services/db",
    "/apis/apps/v1/namespaces/team-a/statefulsets/db",
    "/api/v1/namespaces/team-a/pods/db-0",
    "/api/v1/namespaces/team-a/pods/db-1",
    "/api/v1/namespaces/team-a/persistentvolumeclaims/data-db-0",
    "/apis/coordination.k8s.io/v1/namespaces/team-a/leases/leader",
    "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/databases.platform.company.com",
    "/apis/platform.company.com/v1/namespaces/team-a/databases/orders",
)


async def _populate(api: client.ApiClient) -> None:
    core = client.CoreV1Api(api)
    await core.create_namespace({"metadata": {"name": "team-a"}})
    await core.create_namespaced_secret(
        "team-a", {"metadata": {"name": "db-credentials"}, "stringData": {"password": "s3cret"}}
    )
    await core.create_namespaced_config_map("team-a", {"metadata": {"name": "settings"}, "data": {"a": "1"}})
    await core.create_namespaced_service(
        "team-a", {"metadata": {"name": "db"}, "spec": {"selector": {"app": "db"}, "ports": [{"port": 5432}]}}
    )
    await client.AppsV1Api(api).create_namespaced_stateful_set("team-a", statefulset("db", replicas=2))
    await client.CoordinationV1Api(api).create_namespaced_lease(
        "team-a", {"metadata": {"name": "leader"}, "spec": {"holderIdentity": "me"}}
    )
    await client.ApiextensionsV1Api(api).create_custom_resource_definition(DATABASE_CRD)
    custom = client.CustomObjectsApi(api)
    await eventually(lambda: _served(api, "platform.company.com", "v1"), what="the Database CRD to be served")
    await custom.create_namespaced_custom_object(
        "platform.company.com",
        "v1",
        "team-a",
        "databases",
        {"apiVersion": "platform.company.com/v1", "kind": "Database", "metadata": {"name": "orders"}},
    )


async def _served(api: client.ApiClient, group: str, version: str) -> bool:
    try:
        await client.CustomObjectsApi(api).list_cluster_custom_object(group, version, "databases")
    except client.ApiException:
        return False
    return True


async def test_objects_come_back_after_a_restart_with_their_uids_and_versions(tmp_path: pathlib.Path) -> None:
    state = tmp_path / "state"
    async with running(state) as (sandbox, api):
        await _populate(api)
        await eventually(
            lambda: _ready_pods(sandbox, "team-a", 2), what="both pods of the StatefulSet to be Ready"
        )
        before = {path: await _raw_get(sandbox, path) for path in SNAPSHOT_PATHS}
        events_before = await _raw_get(sandbox, "/api/v1/namespaces/team-a/events")
        last_rv = sandbox.store.resource_version
    assert (state / "state.json").stat().st_mode & 0o777 == 0o600

    async with running(state) as (sandbox, api):
        assert sandbox.restored is not None
        assert sandbox.restored.existed
        assert sandbox.restored.clean
        assert sandbox.store.resource_version == last_rv
        after = {path: await _raw_get(sandbox, path) for path in SNAPSHOT_PATHS}
        # The very same objects: uid, creationTimestamp, resourceVersion, managedFields, status.
        assert after == before
        assert after["/api/v1/namespaces/team-a/secrets/db-credentials"]["data"] == {"password": "czNjcmV0"}
        events_after = await _raw_get(sandbox, "/api/v1/namespaces/team-a/events")
        assert events_after["items"] == events_before["items"]

        # New writes continue above every version handed out before the restart.
        core = client.CoreV1Api(api)
        created = await core.create_namespaced_config_map("team-a", {"metadata": {"name": "later"}})
        assert int(created.metadata.resource_version) > last_rv
        patched = await core.patch_namespaced_secret(
            "db-credentials", "team-a", {"metadata": {"labels": {"x": "y"}}}
        )
        assert int(patched.metadata.resource_version) > int(created.metadata.resource_version)
        assert (
            patched.metadata.uid
            == before["/api/v1/namespaces/team-a/secrets/db-credentials"]["metadata"]["uid"]
        )
        listed = await core.list_namespaced_config_map("team-a")
        assert int(listed.metadata.resource_version) >= int(patched.metadata.resource_version)
        # The restored CRD serves its kind, and the StatefulSet controller still owns its pods.
        await client.AppsV1Api(api).patch_namespaced_stateful_set_scale(
            "db", "team-a", {"spec": {"replicas": 3}}
        )
        await eventually(
            lambda: _ready_pods(sandbox, "team-a", 3), what="the restored StatefulSet to scale to 3"
        )


async def _ready_pods(sandbox: Sandbox, namespace: str, count: int) -> bool:
    pods = await _raw_get(sandbox, f"/api/v1/namespaces/{namespace}/pods")
    return len(pods["items"]) == count and _pods_ready(pods)


async def test_restored_pods_stay_ready_and_the_simulator_rewrites_nothing(tmp_path: pathlib.Path) -> None:
    state = tmp_path / "state"
    async with running(state) as (sandbox, api):
        await client.AppsV1Api(api).create_namespaced_stateful_set("default", statefulset("db", replicas=2))
        await eventually(lambda: _ready_pods(sandbox, "default", 2), what="two Ready pods")
        await asyncio.sleep(0.1)  # let the controllers finish the status they write after Ready
        pods_before = await _raw_get(sandbox, "/api/v1/namespaces/default/pods")
        rv = sandbox.store.resource_version

    async with running(state) as (sandbox, api):
        # Longer than ready_delay: a kubelet that did not take the pods over would have written
        # Pending and then Running again, each a new resourceVersion.
        await asyncio.sleep(0.3)
        assert sandbox.store.resource_version == rv
        assert await _raw_get(sandbox, "/api/v1/namespaces/default/pods") == pods_before
        # A new pod gets an IP no restored pod holds.
        await client.AppsV1Api(api).patch_namespaced_stateful_set_scale(
            "db", "default", {"spec": {"replicas": 3}}
        )
        await eventually(lambda: _ready_pods(sandbox, "default", 3), what="a third Ready pod")
        pods = await _raw_get(sandbox, "/api/v1/namespaces/default/pods")
        ips = [p["status"]["podIP"] for p in pods["items"]]
        assert len(set(ips)) == 3


async def test_a_watch_from_before_the_restart_gets_410_and_one_from_the_restored_version_resumes(
    tmp_path: pathlib.Path,
) -> None:
    state = tmp_path / "state"
    async with running(state, simulate=False) as (sandbox, api):
        core = client.CoreV1Api(api)
        first = await core.create_namespaced_config_map("default", {"metadata": {"name": "one"}})
        await core.create_namespaced_config_map("default", {"metadata": {"name": "two"}})
        old_rv = int(first.metadata.resource_version)
        page = await core.list_namespaced_config_map("default", limit=1)
        token = page.metadata._continue
        assert token
        # A change after the page: the token's version is older than the one restored.
        await core.create_namespaced_config_map("default", {"metadata": {"name": "after-the-page"}})
        restored_rv = sandbox.store.resource_version

    async with running(state, simulate=False) as (sandbox, api):
        # Older than the restored window: the changes between it and the restart are not in any
        # history any more, so the client must relist rather than silently miss them.
        gone = await _first_watch_line(
            sandbox, f"/api/v1/namespaces/default/configmaps?watch=1&resourceVersion={old_rv}"
        )
        assert gone["type"] == "ERROR"
        assert gone["object"]["code"] == 410
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{sandbox.url}/api/v1/namespaces/default/configmaps?limit=1&continue={token}") as resp,
        ):
            assert resp.status == 410
        # From the restored version itself nothing was missed: the watch resumes.
        watch = asyncio.create_task(
            _first_watch_line(
                sandbox, f"/api/v1/namespaces/default/configmaps?watch=1&resourceVersion={restored_rv}"
            )
        )
        await asyncio.sleep(0.1)
        await client.CoreV1Api(api).create_namespaced_config_map("default", {"metadata": {"name": "three"}})
        event = await asyncio.wait_for(watch, 5)
        assert event["type"] == "ADDED"
        assert event["object"]["metadata"]["name"] == "three"
        assert int(event["object"]["metadata"]["resourceVersion"]) == restored_rv + 1


async def test_after_a_crash_versions_continue_above_everything_handed_out(tmp_path: pathlib.Path) -> None:
    """A kill -9 leaves the last debounced snapshot: older objects, but a ceiling above every version."""
    state = tmp_path / "state"
    crashed = tmp_path / "as-left-by-a-crash.json"
    sandbox = Sandbox(state_dir=state, simulate=False, save_interval=3600.0)
    assert sandbox.persistence is not None
    sandbox.persistence.reserve = 20  # small, so this test crosses the ceiling many times
    await sandbox.start()
    try:
        async with aiohttp.ClientSession() as http:
            for i in range(75):
                async with http.post(
                    f"{sandbox.url}/api/v1/namespaces/default/configmaps",
                    json={"metadata": {"name": f"c{i}"}},
                ) as resp:
                    assert resp.status == 201
        handed_out = sandbox.store.resource_version
        # No debounced snapshot ran (an hour's interval): only the ceiling forced writes.
        on_disk = json.loads((state / "state.json").read_bytes())
        assert on_disk["clean"] is False
        assert int(on_disk["resourceVersionCeiling"]) >= handed_out
        assert int(on_disk["resourceVersion"]) < handed_out
        shutil.copy(state / "state.json", crashed)
    finally:
        await sandbox.stop()
    shutil.copy(crashed, state / "state.json")  # as if the process had died instead of stopping

    async with running(state, simulate=False) as (sandbox, api):
        assert sandbox.restored is not None
        assert not sandbox.restored.clean
        assert sandbox.store.resource_version >= handed_out
        created = await client.CoreV1Api(api).create_namespaced_config_map(
            "default", {"metadata": {"name": "new"}}
        )
        assert int(created.metadata.resource_version) > handed_out


async def test_changes_reach_the_state_file_while_the_sandbox_runs(tmp_path: pathlib.Path) -> None:
    state = tmp_path / "state"
    async with running(state, simulate=False, save_interval=0.05) as (_, api):
        await client.CoreV1Api(api).create_namespaced_config_map("default", {"metadata": {"name": "saved"}})

        async def saved() -> bool:
            doc = json.loads((state / "state.json").read_bytes())
            names = [
                item["metadata"]["name"]
                for group in doc["objects"]
                if group["resource"] == "configmaps"
                for item in group["items"]
            ]
            return "saved" in names

        await eventually(saved, what="the debounced snapshot to include the new ConfigMap")


async def test_the_start_up_log_names_the_state_file_and_what_it_restored(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="kube_sandbox")
    state = tmp_path / "state"
    async with running(state, simulate=False) as (_, api):
        await client.CoreV1Api(api).create_namespaced_config_map("default", {"metadata": {"name": "x"}})
    assert f"sandbox state: {state / 'state.json'} (none yet; starting empty)" in caplog.messages
    caplog.clear()
    async with running(state, simulate=False):
        pass
    # The four system namespaces and the ConfigMap.
    assert any(
        m.startswith(f"sandbox state: restored 5 objects from {state / 'state.json'}")
        for m in caplog.messages
    ), caplog.messages


async def test_a_damaged_state_file_is_refused_and_left_as_it_is(tmp_path: pathlib.Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "state.json").write_text('{"kind": "SandboxState", "version": 1, "objects": [')
    sandbox = Sandbox(state_dir=state)
    with pytest.raises(StateError, match="not valid JSON"):
        await sandbox.start()
    assert (state / "state.json").read_text() == '{"kind": "SandboxState", "version": 1, "objects": ['
    # The directory lock was released: fixing the file lets a sandbox start.
    (state / "state.json").unlink()
    async with running(state, simulate=False) as (sandbox, _):
        assert sandbox.restored is not None
        assert not sandbox.restored.existed


async def test_two_sandboxes_cannot_share_a_state_directory(tmp_path: pathlib.Path) -> None:
    state = tmp_path / "state"
    async with running(state, simulate=False):
        with pytest.raises(StateError, match="in use by another sandbox"):
            await Sandbox(state_dir=state).start()


def test_a_state_file_of_another_format_version_is_refused(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "state.json"
    with pytest.raises(StateError, match="format version 2"):
        persistence._decode(path, b'{"kind": "SandboxState", "version": 2, "objects": []}')


async def _standalone_once(data_dir: pathlib.Path, capsys: pytest.CaptureFixture[str], body: Any) -> str:
    """Run ``broker sandbox --data-dir`` (``run_standalone``) until ``body(url)`` is done; its output."""
    task = asyncio.create_task(run_standalone(host="127.0.0.1", port=0, data_dir=data_dir))
    printed: list[str] = []

    async def serving() -> bool:
        if task.done():
            task.result()  # it failed to start: say why
        printed.append(capsys.readouterr().out)
        return "sandbox API server:" in "".join(printed)

    try:
        await eventually(serving, what="the standalone sandbox to serve")
        kubeconfig = yaml.safe_load((data_dir / "sandbox.kubeconfig").read_text())
        await body(kubeconfig["clusters"][0]["cluster"]["server"])
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    return "".join(printed)


async def test_broker_sandbox_keeps_its_objects_in_the_data_dir_across_runs(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = tmp_path / "data"
    created: dict[str, Any] = {}

    async def create(url: str) -> None:
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                f"{url}/api/v1/namespaces/default/configmaps", json={"metadata": {"name": "kept"}}
            ) as resp,
        ):
            assert resp.status == 201
            created.update(await resp.json())

    first = await _standalone_once(data_dir, capsys, create)
    assert f"sandbox state: {data_dir / 'sandbox' / 'state.json'} (none yet; starting empty)" in first

    async def read(url: str) -> None:
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{url}/api/v1/namespaces/default/configmaps/kept") as resp,
        ):
            assert resp.status == 200
            assert await resp.json() == created

    second = await _standalone_once(data_dir, capsys, read)
    assert f"sandbox state: restored 5 objects from {data_dir / 'sandbox' / 'state.json'}" in second

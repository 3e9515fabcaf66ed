"""Fault injection, observed the way a client of a misbehaving cluster would observe it."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from kubernetes_asyncio import client, watch
from sandbox_support import eventually, statefulset, status_of


async def test_injected_500s_are_status_errors_for_a_number_of_requests(sandbox, kube_api) -> None:
    core = client.CoreV1Api(kube_api)
    sandbox.faults.fail_requests(status=500, count=2)
    for _ in range(2):
        with pytest.raises(client.ApiException) as info:
            await core.list_namespace()
        assert info.value.status == 500
        assert status_of(info.value)["reason"] == "InternalError"
    assert len((await core.list_namespace()).items) == 4


async def test_injected_429s_carry_retry_after(sandbox, kube_api) -> None:
    sandbox.faults.fail_requests(status=429, retry_after=7)
    with pytest.raises(client.ApiException) as info:
        await client.CoreV1Api(kube_api).list_namespaced_pod("default")
    assert info.value.status == 429
    assert info.value.headers["Retry-After"] == "7"
    body = status_of(info.value)
    assert body["reason"] == "TooManyRequests"
    assert body["details"]["retryAfterSeconds"] == 7
    sandbox.faults.clear()
    await client.CoreV1Api(kube_api).list_namespaced_pod("default")


async def test_a_fraction_of_requests_fails(sandbox, kube_api) -> None:
    core = client.CoreV1Api(kube_api)
    sandbox.faults.fail_requests(status=500, fraction=0.5)
    outcomes = []
    for _ in range(60):
        try:
            await core.list_namespaced_config_map("default")
            outcomes.append("ok")
        except client.ApiException as exc:
            outcomes.append(exc.status)
    assert 10 <= outcomes.count(500) <= 50
    assert set(outcomes) == {"ok", 500}


async def test_errors_for_a_time_window_then_recovery(sandbox, kube_api) -> None:
    core = client.CoreV1Api(kube_api)
    sandbox.faults.fail_requests(status=500, duration=0.3)
    with pytest.raises(client.ApiException):
        await core.list_namespace()

    async def recovered():
        try:
            return await core.list_namespace()
        except client.ApiException:
            return None

    await eventually(recovered, what="window to close")


async def test_faults_over_http(sandbox) -> None:
    base = f"{sandbox.url}/sandbox/v1/faults"
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{base}/errors", json={"status": 429, "count": 1, "retryAfterSeconds": 2}
        ) as resp:
            assert resp.status == 200
            assert (await resp.json())["requestErrors"]["status"] == 429
        async with http.get(f"{sandbox.url}/api/v1/namespaces") as resp:
            assert resp.status == 429
            assert resp.headers["Retry-After"] == "2"
        async with http.get(f"{sandbox.url}/api/v1/namespaces") as resp:
            assert resp.status == 200
        async with http.post(f"{base}/errors", json={"status": 500}) as resp:
            assert resp.status == 200
        async with http.get(base) as resp:
            assert (await resp.json())["requestErrors"]["status"] == 500
        async with http.delete(base) as resp:
            assert (await resp.json())["requestErrors"] is None
        async with http.get(f"{sandbox.url}/api/v1/namespaces") as resp:
            assert resp.status == 200
        async with http.post(f"{base}/errors", json={"status": 418}) as resp:
            assert resp.status == 400
        async with http.post(f"{base}/pause", json={}) as resp:
            assert resp.status == 400


async def test_paused_api_refuses_connections_until_resumed_on_the_same_port(sandbox, kube_api) -> None:
    core = client.CoreV1Api(kube_api)
    port = sandbox.port
    await sandbox.faults.pause()
    assert sandbox.paused
    with pytest.raises(aiohttp.ClientConnectorError):
        await core.list_namespace()
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientConnectorError):
            await http.get(f"{sandbox.url}/version")
    await sandbox.faults.resume()
    assert sandbox.port == port
    assert len((await core.list_namespace()).items) == 4


async def test_pause_over_http_resumes_after_its_duration(sandbox) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{sandbox.url}/sandbox/v1/faults/pause", json={"durationSeconds": 0.5}) as resp:
            assert resp.status == 200

        async def refused():
            try:
                async with http.get(f"{sandbox.url}/version"):
                    return False
            except aiohttp.ClientConnectorError:
                return True

        await eventually(refused, what="pause to take effect")

        async def back():
            try:
                async with http.get(f"{sandbox.url}/version") as resp:
                    return resp.status == 200
            except aiohttp.ClientConnectorError:
                return False

        await eventually(back, what="resume")


async def test_forced_gone_on_the_next_watch(sandbox, kube_api) -> None:
    core = client.CoreV1Api(kube_api)
    listed = await core.list_namespaced_config_map("default")
    sandbox.faults.expire_watches(1)
    stream = watch.Watch()
    with pytest.raises(client.ApiException) as info:
        async for _ in stream.stream(
            core.list_namespaced_config_map,
            "default",
            resource_version=listed.metadata.resource_version,
            timeout_seconds=5,
        ):
            pass
    await stream.close()
    assert info.value.status == 410
    assert "Expired" in info.value.reason
    stream = watch.Watch()
    task = asyncio.create_task(
        anext(
            stream.stream(
                core.list_namespaced_config_map,
                "default",
                resource_version=listed.metadata.resource_version,
                timeout_seconds=5,
            )
        )
    )
    await core.create_namespaced_config_map("default", {"metadata": {"name": "after-gone"}})
    event = await asyncio.wait_for(task, 5)
    assert event["object"].metadata.name == "after-gone"
    await stream.close()


async def test_dropped_watches_end_and_a_resuming_client_misses_nothing(sandbox, kube_api) -> None:
    core = client.CoreV1Api(kube_api)
    listed = await core.list_namespaced_config_map("default")
    url = (
        f"{sandbox.url}/api/v1/namespaces/default/configmaps?watch=1"
        f"&resourceVersion={listed.metadata.resource_version}"
    )
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        await core.create_namespaced_config_map("default", {"metadata": {"name": "d1"}})
        first = json.loads(await resp.content.readline())
        assert first["object"]["metadata"]["name"] == "d1"
        assert sandbox.faults.drop_watches() >= 1
        assert await asyncio.wait_for(resp.content.readline(), 5) == b""

    stream = watch.Watch()
    names: list[str] = []

    async def consume() -> None:
        async for event in stream.stream(
            core.list_namespaced_config_map, "default", resource_version=listed.metadata.resource_version
        ):
            names.append(event["object"].metadata.name)
            if len(names) == 3:
                return

    task = asyncio.create_task(consume())
    await eventually(lambda: asyncio.sleep(0, result=names == ["d1"]), what="first event")
    assert sandbox.faults.drop_watches() == 1
    await core.create_namespaced_config_map("default", {"metadata": {"name": "d2"}})
    await core.create_namespaced_config_map("default", {"metadata": {"name": "d3"}})
    await asyncio.wait_for(task, 5)
    await stream.close()
    assert names == ["d1", "d2", "d3"]


@pytest.mark.parametrize("sandbox_options", [{"ready_delay": 0.05, "crash_interval": 0.1}])
async def test_crashed_pod_loops_with_rising_restarts_and_recovers(sandbox, kube_api) -> None:
    apps = client.AppsV1Api(kube_api)
    core = client.CoreV1Api(kube_api)
    await apps.create_namespaced_stateful_set("default", statefulset("cr", replicas=2))

    async def ready_replicas(count: int):
        sts = await apps.read_namespaced_stateful_set("cr", "default")
        return (sts.status.ready_replicas or 0) == count and sts.status.replicas == 2

    await eventually(lambda: ready_replicas(2), what="two ready")
    sandbox.faults.crash_pod(namespace="default", name="cr-1")

    async def crash_looping():
        pod = await core.read_namespaced_pod("cr-1", "default")
        [status] = pod.status.container_statuses
        if status.state.waiting is None or status.restart_count < 3:
            return None
        return pod

    pod = await eventually(crash_looping, what="CrashLoopBackOff with restarts")
    [status] = pod.status.container_statuses
    assert status.state.waiting.reason == "CrashLoopBackOff"
    assert status.ready is False
    assert status.last_state.terminated.exit_code == 1
    assert pod.status.phase == "Running"
    assert {c.type: c.status for c in pod.status.conditions}["Ready"] == "False"
    await eventually(lambda: ready_replicas(1), what="readyReplicas to drop")
    restarts = status.restart_count
    sandbox.faults.clear()
    await eventually(lambda: ready_replicas(2), what="recovery")
    healed = await core.read_namespaced_pod("cr-1", "default")
    assert healed.status.container_statuses[0].state.running is not None
    assert healed.status.container_statuses[0].restart_count >= restarts


async def test_failing_readiness_keeps_the_pod_running_but_unready(sandbox, kube_api) -> None:
    core = client.CoreV1Api(kube_api)
    await core.create_namespaced_pod(
        "default",
        {"metadata": {"name": "probe"}, "spec": {"containers": [{"name": "c", "image": "redis:7"}]}},
    )

    async def state(ready: bool):
        pod = await core.read_namespaced_pod("probe", "default")
        statuses = pod.status.container_statuses or []
        if pod.status.phase == "Running" and statuses and statuses[0].ready is ready:
            return pod
        return None

    await eventually(lambda: state(True), what="ready")
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{sandbox.url}/sandbox/v1/faults/fail-readiness", json={"namespace": "default", "name": "probe"}
        ) as resp,
    ):
        assert resp.status == 200
    pod = await eventually(lambda: state(False), what="unready")
    assert pod.status.container_statuses[0].restart_count == 0
    assert pod.status.container_statuses[0].state.running is not None
    sandbox.faults.heal_pod(namespace="default", name="probe")
    await eventually(lambda: state(True), what="ready again")


async def test_image_resolution_can_be_changed_at_run_time(sandbox, kube_api) -> None:
    sandbox.faults.set_image_resolution({"postgres:15": "postgres:15.7"})
    core = client.CoreV1Api(kube_api)
    await core.create_namespaced_pod(
        "default",
        {"metadata": {"name": "img"}, "spec": {"containers": [{"name": "c", "image": "postgres:15"}]}},
    )

    async def image():
        pod = await core.read_namespaced_pod("img", "default")
        statuses = pod.status.container_statuses or []
        return statuses and statuses[0].ready and statuses[0].image

    assert await eventually(image) == "postgres:15.7"

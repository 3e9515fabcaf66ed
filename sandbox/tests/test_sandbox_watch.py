"""Watches: resume from a resourceVersion, 410 Gone and relist, bookmarks, timeouts, filtered watches."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from kubernetes_asyncio import client, watch


async def _collect(stream: watch.Watch, count: int) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    async for event in stream:
        out.append((event["type"], event["object"].metadata.name))
        if len(out) == count:
            break
    return out


async def _raw_watch_lines(url: str, *, count: int, within: float = 5.0) -> list[dict]:
    lines: list[dict] = []
    async with (
        aiohttp.ClientSession() as http,
        http.get(url, timeout=aiohttp.ClientTimeout(total=within)) as resp,
    ):
        assert resp.status == 200
        async for raw in resp.content:
            lines.append(json.loads(raw))
            if len(lines) == count:
                break
    return lines


async def test_watch_from_list_version_sees_later_changes_in_order(kube_api) -> None:
    core = client.CoreV1Api(kube_api)
    await core.create_namespaced_config_map("default", {"metadata": {"name": "before"}})
    listed = await core.list_namespaced_config_map("default")
    stream = watch.Watch()
    task = asyncio.create_task(
        _collect(
            stream.stream(
                core.list_namespaced_config_map,
                "default",
                resource_version=listed.metadata.resource_version,
                timeout_seconds=10,
            ),
            3,
        )
    )
    await core.create_namespaced_config_map("default", {"metadata": {"name": "w"}})
    await core.patch_namespaced_config_map("w", "default", {"data": {"a": "b"}})
    await core.delete_namespaced_config_map("w", "default")
    events = await asyncio.wait_for(task, 5)
    await stream.close()
    assert events == [("ADDED", "w"), ("MODIFIED", "w"), ("DELETED", "w")]


async def test_watch_without_version_starts_with_current_state(kube_api) -> None:
    core = client.CoreV1Api(kube_api)
    await core.create_namespaced_config_map("default", {"metadata": {"name": "x1"}})
    await core.create_namespaced_config_map("default", {"metadata": {"name": "x2"}})
    stream = watch.Watch()
    events = await asyncio.wait_for(
        _collect(stream.stream(core.list_namespaced_config_map, "default", timeout_seconds=10), 2), 5
    )
    await stream.close()
    assert events == [("ADDED", "x1"), ("ADDED", "x2")]


async def test_watch_resumes_after_a_given_version(kube_api) -> None:
    core = client.CoreV1Api(kube_api)
    first = await core.create_namespaced_config_map("default", {"metadata": {"name": "r1"}})
    await core.create_namespaced_config_map("default", {"metadata": {"name": "r2"}})
    await core.create_namespaced_config_map("default", {"metadata": {"name": "r3"}})
    stream = watch.Watch()
    events = await asyncio.wait_for(
        _collect(
            stream.stream(
                core.list_namespaced_config_map,
                "default",
                resource_version=first.metadata.resource_version,
                timeout_seconds=10,
            ),
            2,
        ),
        5,
    )
    await stream.close()
    assert events == [("ADDED", "r2"), ("ADDED", "r3")]


@pytest.mark.parametrize("sandbox_options", [{"watch_window": 5, "simulate": False}])
async def test_too_old_version_is_410_gone_then_relist_and_watch_works(sandbox, kube_api) -> None:
    core = client.CoreV1Api(kube_api)
    first = await core.create_namespaced_config_map("default", {"metadata": {"name": "old"}})
    for i in range(10):
        await core.create_namespaced_config_map("default", {"metadata": {"name": f"n{i}"}})
    url = (
        f"{sandbox.url}/api/v1/namespaces/default/configmaps?watch=true"
        f"&resourceVersion={first.metadata.resource_version}"
    )
    [event] = await _raw_watch_lines(url, count=1)
    assert event["type"] == "ERROR"
    assert event["object"]["kind"] == "Status"
    assert event["object"]["code"] == 410
    assert event["object"]["reason"] == "Expired"
    assert event["object"]["message"].startswith(
        f"too old resource version: {first.metadata.resource_version}"
    )
    stream = watch.Watch()
    with pytest.raises(client.ApiException) as info:
        async for _ in stream.stream(
            core.list_namespaced_config_map,
            "default",
            resource_version=first.metadata.resource_version,
            timeout_seconds=5,
        ):
            pass
    assert info.value.status == 410
    await stream.close()
    relisted = await core.list_namespaced_config_map("default")
    assert len(relisted.items) == 11
    stream = watch.Watch()
    task = asyncio.create_task(
        _collect(
            stream.stream(
                core.list_namespaced_config_map,
                "default",
                resource_version=relisted.metadata.resource_version,
                timeout_seconds=10,
            ),
            1,
        )
    )
    await core.create_namespaced_config_map("default", {"metadata": {"name": "after"}})
    assert await asyncio.wait_for(task, 5) == [("ADDED", "after")]
    await stream.close()


@pytest.mark.parametrize("sandbox_options", [{"bookmark_interval": 0.1, "simulate": False}])
async def test_bookmarks_carry_only_the_resource_version(sandbox, kube_api) -> None:
    core = client.CoreV1Api(kube_api)
    created = await core.create_namespaced_config_map("default", {"metadata": {"name": "bm"}})
    url = (
        f"{sandbox.url}/api/v1/namespaces/default/configmaps?watch=1&allowWatchBookmarks=true"
        f"&resourceVersion={created.metadata.resource_version}"
    )
    lines = await _raw_watch_lines(url, count=2)
    assert [e["type"] for e in lines] == ["BOOKMARK", "BOOKMARK"]
    bookmark = lines[0]["object"]
    assert bookmark["kind"] == "ConfigMap"
    assert bookmark["apiVersion"] == "v1"
    assert set(bookmark["metadata"]) <= {"resourceVersion", "creationTimestamp"}
    assert int(bookmark["metadata"]["resourceVersion"]) >= int(created.metadata.resource_version)
    stream = watch.Watch()
    seen = []
    async for event in stream.stream(
        core.list_namespaced_config_map,
        "default",
        allow_watch_bookmarks=True,
        resource_version=created.metadata.resource_version,
        timeout_seconds=5,
    ):
        seen.append(event["type"])
        break
    assert seen == ["BOOKMARK"]
    assert stream.resource_version == bookmark["metadata"]["resourceVersion"]
    await stream.close()


async def test_without_allow_bookmarks_no_bookmarks_are_sent(sandbox) -> None:
    url = f"{sandbox.url}/api/v1/namespaces/default/configmaps?watch=1&resourceVersion=1&timeoutSeconds=1"
    lines = await _raw_watch_lines(url, count=100, within=5)
    assert lines == []


async def test_timeout_seconds_ends_the_watch(kube_api) -> None:
    core = client.CoreV1Api(kube_api)
    stream = watch.Watch()
    # The watch must end by itself (timeoutSeconds=1); the outer timeout only fails a watch that never does.
    async with asyncio.timeout(30):
        events = [
            e
            async for e in stream.stream(
                core.list_namespaced_config_map, "default", timeout_seconds=1, resource_version="1"
            )
        ]
    await stream.close()
    assert events == []


async def test_label_filtered_watch_sees_objects_leave_and_enter_the_selection(kube_api) -> None:
    core = client.CoreV1Api(kube_api)
    created = await core.create_namespaced_config_map(
        "default", {"metadata": {"name": "sel", "labels": {"team": "a"}}}
    )
    stream = watch.Watch()
    task = asyncio.create_task(
        _collect(
            stream.stream(
                core.list_namespaced_config_map,
                "default",
                label_selector="team=a",
                resource_version=created.metadata.resource_version,
                timeout_seconds=10,
            ),
            2,
        )
    )
    await core.create_namespaced_config_map(
        "default", {"metadata": {"name": "ignored", "labels": {"team": "b"}}}
    )
    await core.patch_namespaced_config_map("sel", "default", {"metadata": {"labels": {"team": "b"}}})
    await core.patch_namespaced_config_map("ignored", "default", {"metadata": {"labels": {"team": "a"}}})
    assert await asyncio.wait_for(task, 5) == [("DELETED", "sel"), ("ADDED", "ignored")]
    await stream.close()


async def test_legacy_watch_path_and_single_object_watch(sandbox, kube_api) -> None:
    core = client.CoreV1Api(kube_api)
    created = await core.create_namespaced_config_map("default", {"metadata": {"name": "one"}})
    await core.create_namespaced_config_map("default", {"metadata": {"name": "two"}})
    url = f"{sandbox.url}/api/v1/watch/namespaces/default/configmaps/one?resourceVersion=0&timeoutSeconds=1"
    lines = await _raw_watch_lines(url, count=5)
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in lines] == [("ADDED", "one")]
    assert lines[0]["object"]["metadata"]["uid"] == created.metadata.uid


async def test_watch_list_initial_events_end_with_annotated_bookmark(sandbox, kube_api) -> None:
    core = client.CoreV1Api(kube_api)
    await core.create_namespaced_config_map("default", {"metadata": {"name": "i1"}})
    url = (
        f"{sandbox.url}/api/v1/namespaces/default/configmaps?watch=1&sendInitialEvents=true"
        "&resourceVersionMatch=NotOlderThan&allowWatchBookmarks=true&timeoutSeconds=5"
    )
    lines = await _raw_watch_lines(url, count=2)
    assert [e["type"] for e in lines] == ["ADDED", "BOOKMARK"]
    assert lines[1]["object"]["metadata"]["annotations"] == {"k8s.io/initial-events-end": "true"}

"""The sandbox's memory stays bounded under steady churn: history, Events, managedFields, watchers.

A sandbox runs for hours inside a broker that watches and remediates while someone scales a
StatefulSet up and down; everything it keeps per change must have a bound. The growth test counts
(never times): it measures the sandbox's structures after a warm-up long enough to reach every
bound, then again after twice as many changes, and they must not have grown.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import tracemalloc
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from kube_sandbox import Sandbox, apply
from sandbox_support import eventually, statefulset

KUBECTL = {"User-Agent": "kubectl/v1.32.4 (linux/amd64) kubernetes/0000000"}
MERGE = {**KUBECTL, "Content-Type": "application/merge-patch+json"}


def _sizes(sandbox: Sandbox) -> dict[str, int]:
    """Everything in the sandbox that could grow with the number of changes, as counts."""
    st = sandbox.store
    history, history_bytes = st.history_size
    kubelet = sandbox._kubelet
    assert kubelet is not None
    managed = 0
    for rt in st.registry.storage_types():
        for obj in st.objects(rt.storage_key):
            managed += len(obj["metadata"].get("managedFields") or [])
    return {
        "history_bytes_over_budget": max(0, history_bytes - st.watch_window_bytes),
        "history_over_window": max(0, history - st.watch_window),
        "objects": st.count(),
        "events": st.count(("", "events")),
        "managed_fields_entries": managed,
        "client_watchers": len(st.watchers()),
        "undelivered_to_controllers": sum(w.pending for w in st._fanout.subscribers),
        "uid_index": len(st._uids),
        "owner_index": sum(len(d) for d in st._dependents.values()),
        "kubelet_state": sum(
            len(t)
            for t in (kubelet._started, kubelet._images, kubelet._restarts, kubelet._ips, kubelet._timers)
        ),
    }


async def _follow(http: aiohttp.ClientSession, url: str, seen: list[int]) -> None:
    """A watcher that keeps up, as the broker's informers do (counting, not keeping, what it gets)."""
    async with http.get(url) as resp:
        async for line in resp.content:
            json.loads(line)
            seen[0] += 1


async def _abandon_a_watch(http: aiohttp.ClientSession, url: str) -> None:
    """Open a watch, read one event and drop the connection, as a killed client would."""
    resp = await http.get(url)
    await resp.content.readline()
    resp.close()


@contextlib.asynccontextmanager
async def _scaled(sandbox: Sandbox) -> AsyncIterator[Any]:
    """A Parallel StatefulSet, a client following its pods, and a function doing one scale change."""
    manifest = statefulset("db", replicas=1)
    manifest["spec"]["podManagementPolicy"] = "Parallel"
    base = f"{sandbox.url}/apis/apps/v1/namespaces/default/statefulsets"
    pods_watch = f"{sandbox.url}/api/v1/namespaces/default/pods?watch=1&allowWatchBookmarks=true"
    async with aiohttp.ClientSession() as http:
        async with http.post(base, json=manifest) as resp:
            assert resp.status == 201
        seen = [0]
        follower = asyncio.create_task(_follow(http, pods_watch, seen))
        counter = [0]

        async def change() -> None:
            counter[0] += 1
            replicas = 3 if counter[0] % 2 else 1
            body = json.dumps({"spec": {"replicas": replicas}})
            async with http.patch(f"{base}/db/scale", data=body, headers=MERGE) as resp:
                assert resp.status == 200, await resp.text()
            if counter[0] % 10 == 0:
                await _abandon_a_watch(http, pods_watch)
            await asyncio.sleep(0.005)  # the controllers react between changes

        try:
            yield change
        finally:
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follower
        assert seen[0], "the following watcher received nothing"


async def _settled(sandbox: Sandbox) -> None:
    """Wait until the StatefulSet is at rest (1 ready replica, status written, watches gone)."""

    async def quiet() -> bool:
        sts = sandbox.store.find(("apps", "statefulsets"), "default", "db")
        assert sts is not None
        status = sts.get("status") or {}
        return (
            sts["spec"]["replicas"] == 1
            and status.get("readyReplicas") == 1
            and status.get("replicas") == 1
            and len(sandbox.store.watchers()) == 1
        )

    await eventually(quiet, within=10, what="the StatefulSet to settle at 1 replica")
    gc.collect()


@pytest.mark.parametrize(
    "sandbox_options",
    [{"ready_delay": 0.0, "watch_window_bytes": 128 * 1024, "event_limit": 20}],
)
async def test_steady_scale_changes_leave_the_sandbox_no_bigger(sandbox: Sandbox) -> None:
    warm_up = 20  # past every bound: ~200 writes to the store, ~600 kB of serializations
    tracemalloc.start()
    try:
        async with _scaled(sandbox) as change:
            for _ in range(warm_up):
                await change()
            await _settled(sandbox)
            after_warm_up = _sizes(sandbox)
            traced_after_warm_up = tracemalloc.get_traced_memory()[0]
            rv_after_warm_up = sandbox.store.resource_version
            for _ in range(2 * warm_up):
                await change()
            await _settled(sandbox)
            after_more = _sizes(sandbox)
            traced_after_more = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    # Each scale change is several writes (the StatefulSet, its pods, their status, Events).
    assert sandbox.store.resource_version - rv_after_warm_up > 5 * 2 * warm_up
    assert after_warm_up["history_bytes_over_budget"] == 0
    assert after_warm_up["history_over_window"] == 0
    assert after_more == after_warm_up
    # Whatever the counts above miss: 40 more scale changes (about 400 writes, each a few kB of
    # JSON and several times that parsed) may not leave more than a small, fixed amount behind
    # (measured: about 10 kB, the allocator's and aiohttp's noise).
    assert traced_after_more - traced_after_warm_up < 1_000_000, (traced_after_warm_up, traced_after_more)


@pytest.mark.parametrize("sandbox_options", [{"ready_delay": 0.0}])
async def test_a_repeated_event_is_counted_on_one_event_object(sandbox: Sandbox) -> None:
    async with _scaled(sandbox) as change:
        for _ in range(5):
            await change()  # to 3
            await eventually(lambda: _pods(sandbox, 3), within=10, what="three pods")
            await change()  # to 1
            await eventually(lambda: _pods(sandbox, 1), within=10, what="one pod")
        await _settled(sandbox)
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{sandbox.url}/api/v1/namespaces/default/events") as resp,
    ):
        events = (await resp.json())["items"]
    counted = {(e["reason"], e["message"]): e["count"] for e in events}
    assert counted == {
        ("SuccessfulCreate", "create Pod db-0 in StatefulSet db successful"): 1,
        ("SuccessfulCreate", "create Pod db-1 in StatefulSet db successful"): 5,
        ("SuccessfulCreate", "create Pod db-2 in StatefulSet db successful"): 5,
        ("SuccessfulDelete", "delete Pod db-1 in StatefulSet db successful"): 5,
        ("SuccessfulDelete", "delete Pod db-2 in StatefulSet db successful"): 5,
    }
    repeated = next(e for e in events if e["message"] == "create Pod db-1 in StatefulSet db successful")
    assert repeated["lastTimestamp"] >= repeated["firstTimestamp"]
    assert repeated["involvedObject"]["kind"] == "StatefulSet"


async def _pods(sandbox: Sandbox, count: int) -> bool:
    return sandbox.store.count(("", "pods")) == count


@pytest.mark.parametrize("sandbox_options", [{"simulate": False, "event_limit": 5}])
async def test_events_beyond_the_limit_expire_least_recently_written_first(sandbox: Sandbox) -> None:
    events_url = f"{sandbox.url}/api/v1/namespaces/default/events"

    def event(name: str) -> dict[str, Any]:
        return {
            "metadata": {"name": name},
            "involvedObject": {"kind": "Pod", "namespace": "default", "name": "p"},
            "reason": "Test",
            "message": name,
        }

    async with aiohttp.ClientSession() as http:
        for i in range(5):
            async with http.post(events_url, json=event(f"e{i}")) as resp:
                assert resp.status == 201
        listed_rv = sandbox.store.resource_version
        # Writing e0 again makes it the most recent: e1 is the oldest now.
        async with http.patch(
            f"{events_url}/e0",
            data=json.dumps({"count": 2}),
            headers={"Content-Type": "application/merge-patch+json"},
        ) as resp:
            assert resp.status == 200
        for i in range(5, 12):
            async with http.post(events_url, json=event(f"e{i}")) as resp:
                assert resp.status == 201
        async with http.get(events_url) as resp:
            names = sorted(e["metadata"]["name"] for e in (await resp.json())["items"])
        assert names == ["e10", "e11", "e7", "e8", "e9"]
        async with http.get(f"{events_url}/e1") as resp:
            assert resp.status == 404
        # Watchers are told, as they are when kube-apiserver's event TTL removes one.
        async with http.get(
            f"{events_url}?watch=1&resourceVersion={listed_rv}", timeout=aiohttp.ClientTimeout(total=5)
        ) as resp:
            lines = []
            async for raw in resp.content:
                lines.append(json.loads(raw))
                if len(lines) == 1 + 7 + 7:  # e0 modified, e5..e11 added, 7 expired
                    break
    deleted = [e["object"]["metadata"]["name"] for e in lines if e["type"] == "DELETED"]
    assert deleted == ["e1", "e2", "e3", "e4", "e0", "e5", "e6"][: len(deleted)]
    assert len(deleted) == 7


@pytest.mark.parametrize("sandbox_options", [{"simulate": False}])
async def test_managed_fields_keep_at_most_ten_update_managers(sandbox: Sandbox) -> None:
    url = f"{sandbox.url}/api/v1/namespaces/default/configmaps"
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{url}?fieldManager=creator", json={"metadata": {"name": "cm"}}) as resp:
            assert resp.status == 201
        apply_body = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "cm"},
            "data": {"applied": "y"},
        }
        async with http.patch(
            f"{url}/cm?fieldManager=applier",
            data=json.dumps(apply_body),
            headers={"Content-Type": "application/apply-patch+yaml"},
        ) as resp:
            assert resp.status == 200
        for i in range(25):
            async with http.patch(
                f"{url}/cm?fieldManager=m{i}",
                data=json.dumps({"data": {f"k{i}": "v"}}),
                headers={"Content-Type": "application/merge-patch+json"},
            ) as resp:
                assert resp.status == 200
        async with http.get(f"{url}/cm") as resp:
            managed = (await resp.json())["metadata"]["managedFields"]
    updaters = [m["manager"] for m in managed if m["operation"] == "Update"]
    assert len(updaters) == apply.MAX_UPDATE_MANAGERS
    assert updaters == ["ancient-changes", *[f"m{i}" for i in range(16, 25)]]
    # Apply entries are never merged: they decide what an applier's next apply removes.
    assert [m["manager"] for m in managed if m["operation"] == "Apply"] == ["applier"]
    ancient = next(m for m in managed if m["manager"] == "ancient-changes")
    # Ownership is kept, only under one name: the merged managers' fields are all still owned.
    assert set(ancient["fieldsV1"]["f:data"]) == {f"f:k{i}" for i in range(16)}


@pytest.mark.parametrize("sandbox_options", [{"simulate": False, "watch_window_bytes": 64 * 1024}])
async def test_the_watch_window_is_bounded_by_bytes_and_resumes_within_it_are_exact(sandbox: Sandbox) -> None:
    url = f"{sandbox.url}/api/v1/namespaces/default/configmaps"
    big = "x" * 10_000
    async with aiohttp.ClientSession() as http:
        async with http.post(
            url, json={"metadata": {"name": "big", "labels": {"keep": "yes"}}, "data": {"v": big}}
        ) as resp:
            first_rv = int((await resp.json())["metadata"]["resourceVersion"])
        versions = []
        for i in range(20):
            labels = {"keep": "yes"} if i != 18 else {"keep": "no"}
            body = {"metadata": {"labels": labels}, "data": {"v": big, "i": str(i)}}
            async with http.patch(
                f"{url}/big", data=json.dumps(body), headers={"Content-Type": "application/merge-patch+json"}
            ) as resp:
                versions.append(int((await resp.json())["metadata"]["resourceVersion"]))
        count, size = sandbox.store.history_size
        assert size <= 64 * 1024
        assert count < 21
        # The first versions fell out of the window: resuming there is 410, not a silent gap.
        async with http.get(f"{url}?watch=1&resourceVersion={first_rv}") as resp:
            assert json.loads(await resp.content.readline())["object"]["code"] == 410
        # Within the window every change comes back, and a filtered watch sees the object leave
        # and come back (which needs the object before each change, kept serialized).
        since = versions[-4]
        async with http.get(
            f"{url}?watch=1&resourceVersion={since}&labelSelector=keep%3Dyes",
            timeout=aiohttp.ClientTimeout(total=5),
        ) as resp:
            lines = [json.loads(await resp.content.readline()) for _ in range(3)]
    assert [(e["type"], e["object"]["data"]["i"]) for e in lines] == [
        ("MODIFIED", "17"),
        ("DELETED", "17"),
        ("ADDED", "19"),
    ]
    assert [int(e["object"]["metadata"]["resourceVersion"]) for e in lines] == versions[-3:]

"""coordination.k8s.io/v1 Leases as leader election uses them: optimistic concurrency, MicroTime
decoding, validation, watches.

Over raw HTTP, as client-go's LeaseLock talks to kube-apiserver: the point is the wire format
(kubernetes-asyncio would turn the times into datetimes before the test could look at them).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest

LEASES = "/apis/coordination.k8s.io/v1/namespaces/default/leases"


def _lease(name: str = "leader", **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": name}, "spec": spec}


@pytest.fixture
async def api(sandbox):
    async with aiohttp.ClientSession(base_url=sandbox.url) as session:
        yield session


async def _send(api: aiohttp.ClientSession, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    async with api.request(method, path, json=body) as response:
        return response.status, await response.json()


async def test_a_lease_is_taken_over_only_from_the_version_the_taker_read(api) -> None:
    status, created = await _send(
        api,
        "POST",
        LEASES,
        _lease(
            holderIdentity="a",
            leaseDurationSeconds=15,
            acquireTime="2025-03-01T10:00:00.000001Z",
            renewTime="2025-03-01T10:00:00.000001Z",
            leaseTransitions=0,
        ),
    )
    assert status == 201
    read_by_b = created
    # a renews: a new resourceVersion ...
    renewed = dict(created, spec=dict(created["spec"], renewTime="2025-03-01T10:00:02.000000Z"))
    status, after_renewal = await _send(api, "PUT", f"{LEASES}/leader", renewed)
    assert status == 200
    assert int(after_renewal["metadata"]["resourceVersion"]) > int(created["metadata"]["resourceVersion"])
    # ... so b's takeover, computed from what it read before the renewal, is refused.
    takeover = dict(read_by_b, spec=dict(read_by_b["spec"], holderIdentity="b", leaseTransitions=1))
    status, refused = await _send(api, "PUT", f"{LEASES}/leader", takeover)
    assert status == 409
    assert refused["reason"] == "Conflict"
    assert "the object has been modified" in refused["message"]
    status, current = await _send(api, "GET", f"{LEASES}/leader")
    assert current["spec"]["holderIdentity"] == "a"
    assert current["spec"]["renewTime"] == "2025-03-01T10:00:02.000000Z"
    # From the current version the takeover goes through.
    takeover = dict(current, spec=dict(current["spec"], holderIdentity="b", leaseTransitions=1))
    status, taken = await _send(api, "PUT", f"{LEASES}/leader", takeover)
    assert status == 200
    assert (taken["spec"]["holderIdentity"], taken["spec"]["leaseTransitions"]) == ("b", 1)


async def test_lease_times_are_micro_times_re_encoded_in_utc(api) -> None:
    status, created = await _send(
        api,
        "POST",
        LEASES,
        _lease(
            holderIdentity="a",
            acquireTime="2025-03-01T12:00:00.250000+02:00",
            renewTime="2025-03-01T10:00:01.000000Z",
        ),
    )
    assert status == 201
    assert created["spec"]["acquireTime"] == "2025-03-01T10:00:00.250000Z"
    assert created["spec"]["renewTime"] == "2025-03-01T10:00:01.000000Z"


@pytest.mark.parametrize(
    "bad_time",
    [
        "2025-03-01T10:00:00Z",
        "2025-03-01T10:00:00.123Z",
        "2025-03-01T10:00:00.000000",
        "yesterday",
        1740823200,
    ],
)
async def test_a_time_kube_apiserver_cannot_decode_is_a_bad_request(api, bad_time) -> None:
    status, body = await _send(api, "POST", LEASES, _lease(holderIdentity="a", renewTime=bad_time))
    assert status == 400
    assert body["reason"] == "BadRequest"
    assert "cannot be handled as a Lease" in body["message"]
    assert "2006-01-02T15:04:05.000000Z07:00" in body["message"]
    status, _ = await _send(api, "GET", f"{LEASES}/leader")
    assert status == 404


@pytest.mark.parametrize(
    ("spec", "field", "message"),
    [
        ({"leaseDurationSeconds": 0}, "spec.leaseDurationSeconds", "must be greater than 0"),
        ({"leaseTransitions": -1}, "spec.leaseTransitions", "must be greater than or equal to 0"),
        ({"preferredHolder": "b"}, "spec.preferredHolder", "may only be specified if `strategy` is defined"),
    ],
)
async def test_an_invalid_lease_spec_is_refused_as_kube_apiserver_does(api, spec, field, message) -> None:
    status, body = await _send(api, "POST", LEASES, _lease(holderIdentity="a", **spec))
    assert status == 422
    assert body["reason"] == "Invalid"
    assert [(c["field"], message in c["message"]) for c in body["details"]["causes"]] == [(field, True)]


async def test_a_lease_duration_must_be_a_whole_number(api) -> None:
    status, body = await _send(api, "POST", LEASES, _lease(holderIdentity="a", leaseDurationSeconds=1.5))
    assert status == 400
    assert "of type int32" in body["message"]


async def test_an_update_that_breaks_a_valid_lease_is_refused_and_leaves_it_alone(api) -> None:
    _, created = await _send(api, "POST", LEASES, _lease(holderIdentity="a", leaseDurationSeconds=15))
    status, _ = await _send(
        api, "PUT", f"{LEASES}/leader", dict(created, spec=dict(created["spec"], leaseDurationSeconds=-3))
    )
    assert status == 422
    async with api.patch(
        f"{LEASES}/leader",
        data=json.dumps({"spec": {"renewTime": "now"}}),
        headers={"Content-Type": "application/merge-patch+json"},
    ) as response:
        assert response.status == 400
    _, current = await _send(api, "GET", f"{LEASES}/leader")
    assert current["spec"] == {"holderIdentity": "a", "leaseDurationSeconds": 15}
    assert current["metadata"]["resourceVersion"] == created["metadata"]["resourceVersion"]


async def test_a_watch_on_leases_sees_each_holder_change_in_order(api) -> None:
    status, listed = await _send(api, "GET", LEASES)
    assert status == 200
    assert listed["kind"] == "LeaseList"
    seen: list[tuple[str, str]] = []

    async def watch() -> None:
        query = {
            "watch": "true",
            "resourceVersion": listed["metadata"]["resourceVersion"],
            "timeoutSeconds": "5",
        }
        async with api.get(LEASES, params=query) as response:
            async for line in response.content:
                event = json.loads(line)
                seen.append((event["type"], event["object"]["spec"].get("holderIdentity", "")))
                if len(seen) == 4:
                    return

    watcher = asyncio.create_task(watch())
    _, lease = await _send(api, "POST", LEASES, _lease(holderIdentity="a", leaseDurationSeconds=15))
    for holder in ("b", ""):
        _, lease = await _send(
            api, "PUT", f"{LEASES}/leader", dict(lease, spec=dict(lease["spec"], holderIdentity=holder))
        )
    status, _ = await _send(api, "DELETE", f"{LEASES}/leader")
    assert status == 200
    await asyncio.wait_for(watcher, 5)
    assert seen == [("ADDED", "a"), ("MODIFIED", "b"), ("MODIFIED", ""), ("DELETED", "")]

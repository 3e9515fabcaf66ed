"""The /v1 HTTP/JSON paths of the original design: a manager written against the seed document must
work unchanged, and the gateway must tell the same story as gRPC."""

from __future__ import annotations

import io
import json
import pathlib
import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import grpc
import pytest
from broker_client.v1 import broker_pb2 as pb
from conftest import ADMIN_TOKEN, PLATFORM_TOKEN, RunningBroker, bearer, broker_running
from google.protobuf import json_format
from test_watch_support import filler_event

from broker import server

NS = "team-platform"
HEADERS = {"Authorization": f"Bearer {PLATFORM_TOKEN}"}


@pytest.fixture
async def running_broker(tmp_path: pathlib.Path, tokens_file: pathlib.Path) -> AsyncIterator[RunningBroker]:
    """The shared fixture's broker, configured to allow loopback callbacks.

    The issue's body calls back on ``http://127.0.0.1:9/cb``; the broker refuses loopback callbacks
    unless configured (DESIGN section 8, SSRF), and a test on loopback is exactly where one configures
    it. ``stub``, ``channel`` and ``http`` of conftest use this broker in this module.
    """
    async with broker_running(tmp_path / "data", tokens_file, callback_allow_loopback=True) as running:
        yield running


def issue_body(request_id: str | None = None) -> dict[str, Any]:
    """Exactly the provision body of the issue."""
    return {
        "namespace": "team-platform",
        "resourceType": "database",
        "resourceName": "postgres-app-db",
        "spec": {"engine": "postgresql", "version": "15", "size": "medium", "replicas": 1},
        "callbackUrl": "http://127.0.0.1:9/cb",
        "requestId": request_id or str(uuid.uuid4()),
    }


async def request(http, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
    kwargs.setdefault("headers", HEADERS)
    async with http.request(method, path, **kwargs) as r:
        assert r.content_type == "application/json", await r.text()
        return r.status, await r.json()


async def provision(http, body: dict[str, Any] | None = None) -> str:
    status, answer = await request(http, "POST", "/v1/provision", json=body or issue_body())
    assert status == 202, answer
    return answer["deploymentId"]


# POST /v1/provision -------------------------------------------------------------------------------


async def test_provision_with_the_issue_body_is_202_with_a_deployment_id(http, stub):
    status, answer = await request(http, "POST", "/v1/provision", json=issue_body())

    assert status == 202
    assert re.fullmatch(r"deploy-[a-z0-9]+", answer["deploymentId"])
    assert answer["phase"] == "Pending"
    assert answer["operation"]["state"] == "Accepted"
    assert answer["operation"]["type"] == "Provision"
    # The deployment is really there, as gRPC sees it.
    reply = await stub.GetDeployment(
        pb.GetDeploymentRequest(namespace=NS, deployment_id=answer["deploymentId"]),
        metadata=bearer(PLATFORM_TOKEN),
    )
    assert reply.deployment.resource_name == "postgres-app-db"
    assert reply.deployment.desired_spec.size == "medium"
    assert reply.deployment.callback_url == "http://127.0.0.1:9/cb"


async def test_provision_retried_with_the_same_request_id_gives_the_same_answer(http, running_broker):
    body = issue_body("c0ffee00-0000-4000-8000-000000000001")

    first = await request(http, "POST", "/v1/provision", json=body)
    second = await request(http, "POST", "/v1/provision", json=body)

    assert first == second
    assert first[0] == 202
    assert await running_broker.broker.store.count_deployments() == 1


async def test_provision_accepts_the_proto_enum_spelling(http, stub):
    body = issue_body()
    body["resourceType"] = "RESOURCE_TYPE_DATABASE"

    deployment_id = await provision(http, body)

    reply = await stub.GetDeployment(
        pb.GetDeploymentRequest(namespace=NS, deployment_id=deployment_id), metadata=bearer(PLATFORM_TOKEN)
    )
    assert reply.deployment.resource_type == pb.RESOURCE_TYPE_DATABASE


async def test_provision_accepts_snake_case_field_names_too(http):
    body = issue_body()
    body["resource_type"] = body.pop("resourceType")
    body["resource_name"] = body.pop("resourceName")

    await provision(http, body)


# GET|POST /v1/resources ---------------------------------------------------------------------------


def assert_seed_shape(answer: dict[str, Any], deployment_id: str) -> None:
    """The seed document's response shape, field names and value spellings, for a new resource."""
    assert set(answer) >= {"resources", "total", "namespace"}
    assert answer["namespace"] == "team-platform"
    assert answer["total"] == 1
    assert type(answer["total"]) is int
    [resource] = answer["resources"]
    assert resource["deploymentId"] == deployment_id
    assert resource["resourceType"] == "database"
    assert resource["resourceName"] == "postgres-app-db"
    assert resource["namespace"] == "team-platform"
    assert resource["phase"] == "Pending"
    assert resource["endpoint"] == "postgres-app-db.team-platform.svc.cluster.local"
    assert resource["port"] == 5432
    assert type(resource["port"]) is int
    assert resource["connectionSecret"] == "postgres-app-db-credentials"
    desired = resource["desiredSpec"]
    assert desired["engine"] == "postgresql"
    assert desired["version"] == "15"
    assert desired["size"] == "medium"
    assert desired["replicas"] == 1
    assert type(desired["replicas"]) is int
    assert resource["driftDetected"] is False
    assert resource["driftDetails"] == []
    assert isinstance(resource["message"], str)
    assert resource["message"]
    # Not observed yet: the actual side is absent, not invented.
    for absent in ("actualSpec", "lastChecked", "resourceUsage", "estimatedMonthlyCost"):
        assert absent not in resource, absent
    # Health is not known before the workload is observed; never an invented "Healthy".
    assert resource.get("healthStatus") in (None, "Unknown")


async def test_get_resources_answers_in_the_seed_shape(http):
    deployment_id = await provision(http)

    status, answer = await request(
        http, "GET", "/v1/resources", params={"namespace": "team-platform", "resourceType": "database"}
    )

    assert status == 200
    assert_seed_shape(answer, deployment_id)


async def test_post_resources_answers_in_the_seed_shape(http):
    deployment_id = await provision(http)

    status, answer = await request(
        http,
        "POST",
        "/v1/resources",
        json={"namespace": "team-platform", "resourceType": "database", "resourceName": "postgres-app-db"},
    )

    assert status == 200
    assert_seed_shape(answer, deployment_id)


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({}, {"postgres-app-db", "sessions"}),
        ({"resourceType": "database"}, {"postgres-app-db"}),
        ({"resourceType": "RESOURCE_TYPE_CACHE"}, {"sessions"}),
        ({"resourceType": "topic"}, set()),
        ({"resourceName": "sessions"}, {"sessions"}),
        ({"resourceName": "nothing-here"}, set()),
    ],
)
@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_resources_filters(http, method, filters, expected):
    await provision(http)
    cache = {
        "namespace": NS,
        "resourceType": "cache",
        "resourceName": "sessions",
        "spec": {"engine": "redis", "version": "7", "size": "small"},
    }
    await provision(http, cache)
    query = {"namespace": NS, **filters}

    if method == "GET":
        status, answer = await request(http, "GET", "/v1/resources", params=query)
    else:
        status, answer = await request(http, "POST", "/v1/resources", json=query)

    assert status == 200
    assert {r["resourceName"] for r in answer["resources"]} == expected
    assert answer["total"] == len(expected)


async def test_resources_filter_by_deployment_id(http):
    deployment_id = await provision(http)
    await provision(
        http,
        {
            "namespace": NS,
            "resourceType": "cache",
            "resourceName": "sessions",
            "spec": {"engine": "redis", "version": "7", "size": "small"},
        },
    )

    status, answer = await request(
        http, "GET", "/v1/resources", params={"namespace": NS, "deploymentId": deployment_id}
    )

    assert status == 200
    assert [r["deploymentId"] for r in answer["resources"]] == [deployment_id]


async def test_resources_pages_over_http(http):
    for i in range(5):
        body = issue_body()
        body["resourceName"] = f"db-{i}"
        await provision(http, body)

    seen, token = [], ""
    for _ in range(10):
        params = {"namespace": NS, "pageSize": "2", **({"pageToken": token} if token else {})}
        status, answer = await request(http, "GET", "/v1/resources", params=params)
        assert status == 200
        assert answer["total"] == 5
        seen += [r["resourceName"] for r in answer["resources"]]
        token = answer.get("nextPageToken", "")
        if not token:
            break

    assert seen == [f"db-{i}" for i in range(5)]


async def test_gateway_and_grpc_return_the_same_data(http, stub):
    await provision(http)
    await provision(
        http,
        {
            "namespace": NS,
            "resourceType": "cache",
            "resourceName": "sessions",
            "spec": {"engine": "redis", "version": "7.2", "size": "small", "replicas": 2},
        },
    )

    status, answer = await request(http, "GET", "/v1/resources", params={"namespace": NS})
    reply = await stub.GetResourceState(
        pb.GetResourceStateRequest(namespace=NS), metadata=bearer(PLATFORM_TOKEN)
    )

    assert status == 200
    assert answer["total"] == reply.total == 2
    assert answer["namespace"] == reply.namespace
    type_names = {pb.RESOURCE_TYPE_DATABASE: "database", pb.RESOURCE_TYPE_CACHE: "cache"}
    assert len(answer["resources"]) == len(reply.resources)
    for from_http, from_grpc in zip(answer["resources"], reply.resources, strict=True):
        assert from_http["deploymentId"] == from_grpc.deployment_id
        assert from_http["resourceType"] == type_names[from_grpc.resource_type]
        assert from_http["resourceName"] == from_grpc.resource_name
        assert from_http["namespace"] == from_grpc.namespace
        assert from_http["phase"] == "Pending"
        assert from_grpc.phase == pb.STATE_PENDING
        assert from_http["message"] == from_grpc.message
        assert from_http["endpoint"] == from_grpc.endpoint
        assert from_http["port"] == from_grpc.port
        assert from_http["connectionSecret"] == from_grpc.connection_secret
        assert from_http["driftDetected"] == from_grpc.drift_detected
        assert from_http["desiredSpec"] == json_format.MessageToDict(from_grpc.desired_spec)


# Deployments, deprovision and events --------------------------------------------------------------


async def test_get_deployment_path(http):
    deployment_id = await provision(http)

    status, answer = await request(http, "GET", f"/v1/deployments/{deployment_id}", params={"namespace": NS})

    assert status == 200
    deployment = answer["deployment"]
    assert deployment["deploymentId"] == deployment_id
    assert deployment["resourceType"] == "database"
    assert deployment["phase"] == "Pending"
    assert deployment["desiredSpec"]["replicas"] == 1
    assert deployment["desiredSpec"]["resources"]["storage"] == "20Gi"
    assert deployment["lastOperation"]["type"] == "Provision"
    assert deployment["lastOperation"]["state"] == "Accepted"
    assert deployment["callbackUrl"] == "http://127.0.0.1:9/cb"


async def test_get_deployment_path_of_an_unknown_id_is_404(http):
    status, answer = await request(
        http, "GET", "/v1/deployments/deploy-000000000000", params={"namespace": NS}
    )

    assert status == 404
    assert answer["error"]["status"] == "NOT_FOUND"
    assert "deploy-000000000000" in answer["error"]["message"]


async def test_delete_deployment_path_deprovisions_with_202(http, stub):
    deployment_id = await provision(http)

    status, answer = await request(
        http, "DELETE", f"/v1/deployments/{deployment_id}", params={"namespace": NS, "dataPolicy": "delete"}
    )
    again = await request(http, "DELETE", f"/v1/deployments/{deployment_id}", params={"namespace": NS})

    assert status == 202
    assert answer["deploymentId"] == deployment_id
    assert answer["phase"] == "Deleting"
    assert answer["operation"]["type"] == "Deprovision"
    assert again[0] == 202
    assert again[1]["phase"] == "Deleting"
    assert again[1]["operation"]["operationId"] == answer["operation"]["operationId"]
    reply = await stub.GetDeployment(
        pb.GetDeploymentRequest(namespace=NS, deployment_id=deployment_id), metadata=bearer(PLATFORM_TOKEN)
    )
    assert reply.deployment.phase == pb.STATE_DELETING


async def test_post_deprovision_is_202_deleting(http):
    deployment_id = await provision(http)

    status, answer = await request(
        http,
        "POST",
        "/v1/deprovision",
        json={"namespace": NS, "deploymentId": deployment_id, "dataPolicy": "keep"},
    )
    _, listed = await request(http, "GET", "/v1/resources", params={"namespace": NS})

    assert status == 202
    assert answer["phase"] == "Deleting"
    assert [r["phase"] for r in listed["resources"]] == ["Deleting"]


async def test_provision_while_deleting_is_400_failed_precondition(http):
    deployment_id = await provision(http)
    await request(http, "POST", "/v1/deprovision", json={"namespace": NS, "deploymentId": deployment_id})

    status, answer = await request(http, "POST", "/v1/provision", json=issue_body())

    assert status == 400
    assert answer["error"]["status"] == "FAILED_PRECONDITION"
    assert answer["error"]["reason"] == "DEPLOYMENT_DELETING"


async def test_events_path_answers_an_empty_history(http):
    await provision(http)

    status, answer = await request(http, "GET", "/v1/events", params={"namespace": NS})

    assert status == 200
    assert answer["events"] == []


# Malformed requests -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/provision", "/v1/resources", "/v1/deprovision"])
async def test_an_unknown_json_field_is_400_naming_it(http, running_broker, path):
    body = issue_body() if path == "/v1/provision" else {"namespace": NS}
    body["colour"] = "blue"

    status, answer = await request(http, "POST", path, json=body)

    assert status == 400
    assert answer["error"]["status"] == "INVALID_ARGUMENT"
    assert "colour" in answer["error"]["message"]
    assert [v["field"] for v in answer["error"]["fieldViolations"]] == ["colour"]
    assert await running_broker.broker.store.count_deployments() == 0


async def test_an_unknown_query_parameter_is_400_naming_it(http):
    status, answer = await request(http, "GET", "/v1/resources", params={"namespace": NS, "colour": "blue"})

    assert status == 400
    assert "colour" in answer["error"]["message"]


async def test_a_query_parameter_given_twice_is_400(http):
    status, answer = await request(http, "GET", "/v1/resources?namespace=team-platform&namespace=team-other")

    assert status == 400
    assert [v["field"] for v in answer["error"]["fieldViolations"]] == ["namespace"]


@pytest.mark.parametrize("path", ["/v1/provision", "/v1/resources", "/v1/deprovision"])
@pytest.mark.parametrize(
    "raw",
    [b'{"namespace": "team-platform",', b"namespace=team-platform", b'{"namespace": "\xc3\x28"}'],
    ids=["cut", "form", "bytes"],
)
async def test_invalid_json_is_400(http, running_broker, path, raw):
    status, answer = await request(
        http, "POST", path, data=raw, headers={**HEADERS, "Content-Type": "application/json"}
    )

    assert status == 400
    assert answer["error"]["status"] == "INVALID_ARGUMENT"
    assert "JSON" in answer["error"]["message"]
    assert await running_broker.broker.store.count_deployments() == 0


@pytest.mark.parametrize("path", ["/v1/provision", "/v1/resources", "/v1/deprovision"])
@pytest.mark.parametrize("value", [[], ["team-platform"], "team-platform", 42, None, True])
async def test_a_body_that_is_not_an_object_is_400(http, path, value):
    status, answer = await request(
        http,
        "POST",
        path,
        data=json.dumps(value).encode(),
        headers={**HEADERS, "Content-Type": "application/json"},
    )

    assert status == 400
    assert answer["error"]["status"] == "INVALID_ARGUMENT"
    assert "JSON object" in answer["error"]["message"]


async def test_a_missing_body_is_400(http):
    status, answer = await request(http, "POST", "/v1/provision")

    assert status == 400
    assert "body" in answer["error"]["message"]


@pytest.mark.parametrize("path", ["/v2/resources", "/v1/resource", "/", "/v1/deployments"])
async def test_an_unknown_path_is_a_404_json_error(http, path):
    status, answer = await request(http, "GET", path)

    assert status == 404
    assert answer["error"]["code"] == 404
    assert answer["error"]["status"] == "NOT_FOUND"
    assert path in answer["error"]["message"]


async def test_a_wrong_method_is_a_405_json_error(http):
    status, answer = await request(http, "PUT", "/v1/provision", json=issue_body())

    assert status == 405
    assert answer["error"]["code"] == 405


JSON_HEADERS = {**HEADERS, "Content-Type": "application/json"}


def as_stream(body: Any) -> io.BytesIO:
    # A stream, as aiohttp recommends for large bodies (raw bytes would block its event loop).
    return io.BytesIO(json.dumps(body).encode())


async def test_a_body_over_one_mebibyte_is_a_413_json_error(http, running_broker):
    body = issue_body()
    body["callbackUrl"] = "http://127.0.0.1:9/" + "a" * (1 << 20)

    status, answer = await request(http, "POST", "/v1/provision", data=as_stream(body), headers=JSON_HEADERS)

    assert status == 413
    assert answer["error"]["code"] == 413
    assert set(answer["error"]) >= {"code", "status", "message", "reason"}
    assert await running_broker.broker.store.count_deployments() == 0


async def test_a_body_just_under_the_limit_is_read(http, running_broker):
    # Large but allowed: the answer is about its content (a too-long callback URL), not its size.
    body = issue_body()
    body["callbackUrl"] = "http://127.0.0.1:9/" + "a" * ((1 << 20) - 1000)
    assert len(json.dumps(body)) < 1 << 20

    status, answer = await request(http, "POST", "/v1/provision", data=as_stream(body), headers=JSON_HEADERS)

    assert status == 400
    assert [v["field"] for v in answer["error"]["fieldViolations"]] == ["callback_url"]


async def test_probes(http):
    for path, expected in (("/healthz", "ok"), ("/readyz", "ready")):
        status, answer = await request(http, "GET", path, headers={})
        assert status == 200
        assert answer["status"] == expected


# One failure, two transports ----------------------------------------------------------------------


async def _existing(http) -> str:
    return await provision(http, issue_body("fixed-request-id"))


FAILURES = {
    # id: (HTTP request maker, gRPC request maker, HTTP status, gRPC code)
    "invalid-argument": (
        lambda dep: ("POST", "/v1/provision", {"json": {**issue_body(), "resourceName": "Bad_Name"}}),
        lambda stub, dep: stub.Provision(
            pb.ProvisionRequest(
                namespace=NS,
                resource_type=pb.RESOURCE_TYPE_DATABASE,
                resource_name="Bad_Name",
                spec=pb.ResourceSpec(engine="postgresql", version="15", size="medium", replicas=1),
                callback_url="http://127.0.0.1:9/cb",
            ),
            metadata=bearer(PLATFORM_TOKEN),
        ),
        400,
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "unauthenticated": (
        lambda dep: ("GET", "/v1/resources", {"params": {"namespace": NS}, "headers": {}}),
        lambda stub, dep: stub.GetResourceState(pb.GetResourceStateRequest(namespace=NS)),
        401,
        grpc.StatusCode.UNAUTHENTICATED,
    ),
    "permission-denied": (
        lambda dep: ("GET", "/v1/resources", {"params": {"namespace": "team-other"}}),
        lambda stub, dep: stub.GetResourceState(
            pb.GetResourceStateRequest(namespace="team-other"), metadata=bearer(PLATFORM_TOKEN)
        ),
        403,
        grpc.StatusCode.PERMISSION_DENIED,
    ),
    "not-found": (
        lambda dep: ("GET", "/v1/deployments/deploy-000000000000", {"params": {"namespace": NS}}),
        lambda stub, dep: stub.GetDeployment(
            pb.GetDeploymentRequest(namespace=NS, deployment_id="deploy-000000000000"),
            metadata=bearer(PLATFORM_TOKEN),
        ),
        404,
        grpc.StatusCode.NOT_FOUND,
    ),
    "already-exists": (
        lambda dep: (
            "POST",
            "/v1/provision",
            {"json": {**issue_body("fixed-request-id"), "resourceName": "another-db"}},
        ),
        lambda stub, dep: stub.Provision(
            pb.ProvisionRequest(
                namespace=NS,
                resource_type=pb.RESOURCE_TYPE_DATABASE,
                resource_name="another-db",
                spec=pb.ResourceSpec(engine="postgresql", version="15", size="medium", replicas=1),
                callback_url="http://127.0.0.1:9/cb",
                request_id="fixed-request-id",
            ),
            metadata=bearer(PLATFORM_TOKEN),
        ),
        409,
        grpc.StatusCode.ALREADY_EXISTS,
    ),
    "failed-precondition": (
        lambda dep: (
            "POST",
            "/v1/provision",
            {"json": {**issue_body(), "spec": {"engine": "mysql", "version": "8", "size": "medium"}}},
        ),
        lambda stub, dep: stub.Provision(
            pb.ProvisionRequest(
                namespace=NS,
                resource_type=pb.RESOURCE_TYPE_DATABASE,
                resource_name="postgres-app-db",
                spec=pb.ResourceSpec(engine="mysql", version="8", size="medium"),
            ),
            metadata=bearer(PLATFORM_TOKEN),
        ),
        400,
        grpc.StatusCode.FAILED_PRECONDITION,
    ),
}


@pytest.mark.parametrize("failure", list(FAILURES))
async def test_error_bodies_match_the_grpc_error_of_the_same_failure(http, stub, failure):
    make_http, make_grpc, http_status, grpc_code = FAILURES[failure]
    deployment_id = await _existing(http)

    method, path, kwargs = make_http(deployment_id)
    status, answer = await request(http, method, path, **kwargs)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await make_grpc(stub, deployment_id)
    err = info.value

    assert err.code() == grpc_code
    assert status == http_status
    assert set(answer) == {"error"}
    error = answer["error"]
    assert {"code", "status", "message", "reason"} <= set(error)
    assert error["code"] == http_status
    assert error["status"] == grpc_code.name
    assert error["message"] == err.details()
    assert error["reason"]


async def test_a_loopback_callback_is_refused_unless_configured(tmp_path, tokens_file):
    # The counterpart of this module's fixture: a broker with default settings refuses the issue's
    # loopback callback as bad input, before anything is stored.
    broker = server.Broker(
        server.Settings(
            grpc_addr="127.0.0.1:0", http_addr="127.0.0.1:0", data_dir=tmp_path / "d", tokens_file=tokens_file
        )
    )
    await broker.start()
    try:
        async with aiohttp.ClientSession(base_url=f"http://127.0.0.1:{broker.http_port}") as http:
            status, answer = await request(http, "POST", "/v1/provision", json=issue_body())
        count = await broker.store.count_deployments()
    finally:
        await broker.stop()

    assert status == 400
    assert [v["field"] for v in answer["error"]["fieldViolations"]] == ["callback_url"]
    assert "loopback" in answer["error"]["message"]
    assert count == 0


async def test_admin_token_works_on_the_gateway_in_any_namespace(http):
    body = issue_body()
    body["namespace"] = "team-other"

    status, answer = await request(
        http, "POST", "/v1/provision", json=body, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
    )

    assert status == 202, answer


async def test_with_no_cluster_connected_health_is_unknown_not_absent(http, stub):
    deployment_id = await provision(http, issue_body())
    reply = await stub.GetResourceState(
        pb.GetResourceStateRequest(namespace=NS, deployment_id=deployment_id), metadata=bearer(PLATFORM_TOKEN)
    )
    assert reply.resources[0].health_status == pb.HEALTH_STATUS_UNKNOWN
    params = {"namespace": NS, "deploymentId": deployment_id}
    async with http.get("/v1/resources", params=params, headers=HEADERS) as r:
        assert r.status == 200
        doc = await r.json()
    assert doc["resources"][0]["healthStatus"] == "Unknown"


async def test_events_take_watch_drifts_filters_after_sequence_type_and_name(http, stub, running_broker):
    first = await provision(http, issue_body())
    other = issue_body()
    other["resourceName"] = "other-db"
    await provision(http, other)
    cache = issue_body()
    cache.update(
        resourceType="cache",
        resourceName="a-cache",
        spec={"engine": "redis", "version": "7", "size": "small"},
    )
    await provision(http, cache)
    appended = [filler_event(first, i, name="postgres-app-db") for i in range(2)]
    appended.append(filler_event(first, 2, name="other-db"))
    await running_broker.broker.store.append_events(appended)

    async def listed(**params: str) -> list[dict[str, Any]]:
        async with http.get("/v1/events", params={"namespace": NS, **params}, headers=HEADERS) as r:
            assert r.status == 200, await r.text()
            return list((await r.json())["events"])

    everything = await listed()
    assert len(everything) >= 3
    middle = int(everything[-2]["sequence"])  # int64 is a string in proto3 JSON
    assert [e["sequence"] for e in await listed(afterSequence=str(middle))] == [everything[-1]["sequence"]]
    assert {e["resourceName"] for e in await listed(resourceName="postgres-app-db")} == {"postgres-app-db"}
    # The same over gRPC, with the proto spelling.
    reply = await stub.ListDriftEvents(
        pb.ListDriftEventsRequest(
            namespace=NS, resource_type=pb.RESOURCE_TYPE_DATABASE, after_sequence=middle
        ),
        metadata=bearer(PLATFORM_TOKEN),
    )
    assert [e.sequence for e in reply.events] == [int(everything[-1]["sequence"])]
    async with http.get("/v1/events", params={"namespace": NS, "afterSequence": "-1"}, headers=HEADERS) as r:
        assert r.status == 400
        assert "after_sequence" in (await r.text())


async def test_put_policies_takes_what_get_policies_returns(http):
    params = {"namespace": NS, "resourceType": "database"}
    async with http.get("/v1/policies", params=params, headers=HEADERS) as r:
        assert r.status == 200
        current = await r.json()
    current["policy"].update(mode="alert", ignoreFields=["replicas"])
    async with http.put("/v1/policies", json=current, headers=HEADERS) as r:
        assert r.status == 200, await r.text()
        assert (await r.json())["policy"]["mode"].lower() == "alert"
    # The bare policy object, as GET shows it inside "policy", is taken too.
    async with http.put("/v1/policies", json={**current["policy"], "mode": "off"}, headers=HEADERS) as r:
        assert r.status == 200, await r.text()
    async with http.get("/v1/policies", params=params, headers=HEADERS) as r:
        got = (await r.json())["policy"]
    assert got["mode"].lower() == "off"
    assert got["ignoreFields"] == ["replicas"]


async def test_gateway_calls_are_counted_like_grpc_calls_with_their_transport(http, stub):
    await provision(http, issue_body())
    await stub.GetResourceState(pb.GetResourceStateRequest(namespace=NS), metadata=bearer(PLATFORM_TOKEN))
    async with http.get("/v1/resources", params={"namespace": NS}, headers=HEADERS) as r:
        assert r.status == 200
    async with http.get("/v1/resources", headers=HEADERS) as r:
        assert r.status == 400  # no namespace: counted with its code
    async with http.get("/metrics", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as r:
        text = await r.text()
    lines = set(text.splitlines())
    assert 'broker_rpc_requests_total{code="OK",method="Provision",transport="http"} 1.0' in lines
    assert 'broker_rpc_requests_total{code="OK",method="GetResourceState",transport="http"} 1.0' in lines
    assert (
        'broker_rpc_requests_total{code="INVALID_ARGUMENT",method="GetResourceState",transport="http"} 1.0'
        in lines
    )
    assert 'broker_rpc_requests_total{code="OK",method="GetResourceState",transport="grpc"} 1.0' in lines


def test_every_v1_path_is_a_route_of_the_rpc_table():
    from broker.api import rpcs

    paths = {(route.method, route.path) for rpc in rpcs.TABLE for route in rpc.routes}
    assert ("POST", "/v1/provision") in paths
    assert ("GET", "/v1/resources") in paths
    assert ("PUT", "/v1/policies") in paths
    assert {rpc.name for rpc in rpcs.TABLE} | rpcs.STREAMING == {
        m.name for m in pb.DESCRIPTOR.services_by_name["BrokerService"].methods
    }

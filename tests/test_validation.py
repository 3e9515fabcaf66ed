"""Bad input, over gRPC and over the /v1 gateway: the same canonical code, the same field paths and a
message a person can act on, and none of it ever reaches the store."""

from __future__ import annotations

import copy
from typing import Any

import grpc
import pytest
from broker_client.v1 import broker_pb2 as pb
from conftest import ADMIN_TOKEN, RunningBroker, bearer
from google.protobuf import json_format
from google.rpc import error_details_pb2
from grpc_status import rpc_status

AUTH = bearer(ADMIN_TOKEN)
HTTP_AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

# A valid Provision body in proto3 JSON; each case below breaks one thing in a copy of it.
VALID_PROVISION: dict[str, Any] = {
    "namespace": "team-platform",
    "resourceType": "RESOURCE_TYPE_DATABASE",
    "resourceName": "postgres-app-db",
    "spec": {"engine": "postgresql", "version": "15", "size": "medium", "replicas": 1},
    "callbackUrl": "http://db-manager.platform-system.svc:8080/cb",
    "requestId": "0b6f6a1e-1c59-4c35-9f0e-3c3b2f7e9d10",
}

# For the gateway, proto3 enum names are written in the original design's spelling.
SEED_TYPES = {
    "RESOURCE_TYPE_DATABASE": "database",
    "RESOURCE_TYPE_CACHE": "cache",
    "RESOURCE_TYPE_TOPIC": "topic",
}


def provision(**changes: Any) -> dict[str, Any]:
    """The valid body with top-level changes; a value of ``...`` removes the key."""
    body = copy.deepcopy(VALID_PROVISION)
    for key, value in changes.items():
        if value is ...:
            body.pop(key, None)
        else:
            body[key] = value
    return body


def spec(**changes: Any) -> dict[str, Any]:
    """The valid spec with changes; a value of ``...`` removes the key."""
    out = dict(VALID_PROVISION["spec"])
    for key, value in changes.items():
        if value is ...:
            out.pop(key, None)
        else:
            out[key] = value
    return out


# (id, rpc, gRPC request as proto3 JSON, HTTP request override or None, violated field, message fragment)
Case = tuple[str, str, dict[str, Any], dict[str, Any] | None, str, str]

# fmt: off
BAD_INPUTS: list[Case] = [
    ("namespace-uppercase", "provision", provision(namespace="Team-Platform"), None, "namespace",
     "not a valid Kubernetes namespace"),
    ("namespace-too-long", "provision", provision(namespace="n" * 64), None, "namespace",
     "at most 63"),
    ("namespace-empty", "provision", provision(namespace=""), None, "namespace", "is required"),
    ("name-underscore", "provision", provision(resourceName="postgres_app_db"), None, "resource_name",
     "not a valid resource name"),
    ("name-starts-with-digit", "provision", provision(resourceName="1st-db"), None, "resource_name",
     "starting with a letter"),
    ("name-too-long", "provision", provision(resourceName="a" * 53), None, "resource_name", "at most 52"),
    ("name-empty", "provision", provision(resourceName=""), None, "resource_name", "is required"),
    # Each transport spells the choices the way it takes them: a pair is (gRPC, HTTP).
    ("type-missing", "provision", provision(resourceType=...), None, "resource_type",
     ("RESOURCE_TYPE_DATABASE, RESOURCE_TYPE_CACHE, RESOURCE_TYPE_TOPIC", "database, cache, topic")),
    ("type-unknown", "provision", provision(resourceType=99), provision(resourceType="queue"),
     "resource_type", ("RESOURCE_TYPE_DATABASE, RESOURCE_TYPE_CACHE, RESOURCE_TYPE_TOPIC", "database, cache, topic")),
    ("engine-unknown", "provision", provision(spec=spec(engine="mongodb")), None, "spec.engine",
     "'mongodb' is not an engine"),
    ("engine-missing", "provision", provision(spec=spec(engine="")), None, "spec.engine", "is required"),
    ("engine-of-another-type", "provision",
     provision(resourceType="RESOURCE_TYPE_CACHE", spec=spec(engine="postgresql")), None, "spec.engine",
     "use one of redis"),
    ("version-with-letters", "provision", provision(spec=spec(version="15.x")), None, "spec.version",
     "is not a version"),
    ("version-v-prefix", "provision", provision(spec=spec(version="v15")), None, "spec.version",
     "is not a version"),
    ("version-missing", "provision", provision(spec=spec(version=...)), None, "spec.version", "is required"),
    ("size-unknown", "provision", provision(spec=spec(size="huge")), None, "spec.size",
     "'huge' is not a size tier"),
    ("replicas-zero", "provision", provision(spec=spec(replicas=0)), None, "spec.replicas",
     "between 1 and 9"),
    ("replicas-ten", "provision", provision(spec=spec(replicas=10)), None, "spec.replicas", "got 10"),
    ("topic-fields-on-a-database", "provision", provision(spec=spec(topic={"partitions": 3})), None,
     "spec.topic", "topics only"),
    ("callback-ftp", "provision", provision(callbackUrl="ftp://127.0.0.1/cb"), None, "callback_url",
     "http:// or https://"),
    ("callback-no-host", "provision", provision(callbackUrl="http:///cb"), None, "callback_url",
     "with a host"),
    ("callback-relative", "provision", provision(callbackUrl="/cb"), None, "callback_url",
     "absolute"),
    ("callback-credentials", "provision", provision(callbackUrl="http://mgr:s3cret@mgr.svc/cb"), None,
     "callback_url", "must not contain credentials"),
    ("callback-cloud-metadata", "provision", provision(callbackUrl="http://169.254.169.254/latest/meta-data"),
     None, "callback_url", "link-local"),
    ("request-id-with-spaces", "provision", provision(requestId="retry number 1"), None, "request_id",
     "letters, digits"),
    ("request-id-too-long", "provision", provision(requestId="r" * 129), None, "request_id", "1-128"),
    ("spec-missing", "provision", provision(spec=...), None, "spec", "is required"),
    ("state-page-size-1001", "state", {"namespace": "team-platform", "pageSize": 1001}, None, "page_size",
     "between 0 and 1000"),
    ("state-bad-deployment-id", "state", {"namespace": "team-platform", "deploymentId": "deploy_1"}, None,
     "deployment_id", "is not a deployment id"),
    ("state-bad-name-filter", "state", {"namespace": "team-platform", "resourceName": "Orders_DB"}, None,
     "resource_name", "not a valid resource name"),
    ("state-bad-namespace", "state", {"namespace": "Team_Platform"}, None, "namespace",
     "not a valid Kubernetes namespace"),
    ("get-bad-deployment-id", "get", {"namespace": "team-platform", "deploymentId": "abc"}, None,
     "deployment_id", "is not a deployment id"),
    ("get-uppercase-deployment-id", "get", {"namespace": "team-platform", "deploymentId": "deploy-ABC"},
     None, "deployment_id", "is not a deployment id"),
    ("get-missing-namespace", "get", {"deploymentId": "deploy-abc123"}, None, "namespace", "is required"),
    ("deprovision-bad-deployment-id", "deprovision", {"namespace": "team-platform", "deploymentId": "x"},
     None, "deployment_id", "is not a deployment id"),
    ("deprovision-bad-request-id", "deprovision",
     {"namespace": "team-platform", "deploymentId": "deploy-abc123", "requestId": "a b"}, None,
     "request_id", "letters, digits"),
    ("events-page-size-1001", "events", {"namespace": "team-platform", "pageSize": 1001}, None, "page_size",
     "between 0 and 1000"),
    ("events-bad-deployment-id", "events", {"namespace": "team-platform", "deploymentId": "nope"}, None,
     "deployment_id", "is not a deployment id"),
]
# fmt: on

RPCS = {
    "provision": ("Provision", pb.ProvisionRequest),
    "state": ("GetResourceState", pb.GetResourceStateRequest),
    "get": ("GetDeployment", pb.GetDeploymentRequest),
    "deprovision": ("Deprovision", pb.DeprovisionRequest),
    "events": ("ListDriftEvents", pb.ListDriftEventsRequest),
}


def grpc_violations(err: grpc.aio.AioRpcError) -> tuple[str, list[tuple[str, str]]]:
    """The ErrorInfo reason and the BadRequest field violations of a gRPC error."""
    status = rpc_status.from_call(err)
    assert status is not None, "no google.rpc.Status in the trailers"
    reason, violations = "", None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations = [(v.field, v.description) for v in bad.field_violations]
    assert violations is not None, "no BadRequest detail"
    return reason, violations


async def call_grpc(stub, rpc: str, body: dict[str, Any]) -> grpc.aio.AioRpcError:
    method, message_type = RPCS[rpc]
    request = json_format.ParseDict(body, message_type())
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await getattr(stub, method)(request, metadata=AUTH)
    return info.value


def seed_spelling(body: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(body)
    if isinstance(out.get("resourceType"), str):
        out["resourceType"] = SEED_TYPES.get(out["resourceType"], out["resourceType"])
    return out


async def call_http(http, rpc: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """The same request over its /v1 path; returns the status and the JSON body."""
    query = {k: str(v) for k, v in body.items() if k != "deploymentId"}
    if rpc == "provision":
        response = http.post("/v1/provision", json=body, headers=HTTP_AUTH)
    elif rpc == "state":
        response = http.get("/v1/resources", params={k: str(v) for k, v in body.items()}, headers=HTTP_AUTH)
    elif rpc == "get":
        response = http.get(f"/v1/deployments/{body['deploymentId']}", params=query, headers=HTTP_AUTH)
    elif rpc == "deprovision":
        response = http.post("/v1/deprovision", json=body, headers=HTTP_AUTH)
    else:
        response = http.get("/v1/events", params={k: str(v) for k, v in body.items()}, headers=HTTP_AUTH)
    async with response as r:
        return r.status, await r.json()


@pytest.mark.parametrize(
    ("rpc", "grpc_body", "http_body", "field", "fragment"),
    [pytest.param(*case[1:], id=case[0]) for case in BAD_INPUTS],
)
async def test_bad_input_is_rejected_alike_over_grpc_and_http(
    stub, http, running_broker: RunningBroker, rpc, grpc_body, http_body, field, fragment
):
    err = await call_grpc(stub, rpc, grpc_body)
    status, body = await call_http(http, rpc, seed_spelling(http_body or grpc_body))
    grpc_fragment, http_fragment = fragment if isinstance(fragment, tuple) else (fragment, fragment)

    # gRPC: INVALID_ARGUMENT with BadRequest naming the field, ErrorInfo with a reason.
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    reason, violations = grpc_violations(err)
    assert reason == "INVALID_ARGUMENT"
    assert [f for f, _ in violations] == [field], violations
    assert grpc_fragment in violations[0][1]
    assert grpc_fragment in err.details()
    # HTTP: 400 with the same field violations.
    assert status == 400, body
    error = body["error"]
    assert error["code"] == 400
    assert error["status"] == "INVALID_ARGUMENT"
    assert [v["field"] for v in error["fieldViolations"]] == [field], error
    assert http_fragment in error["fieldViolations"][0]["description"]
    assert http_fragment in error["message"]
    # Bad input never reaches the store.
    assert await running_broker.broker.store.count_deployments() == 0


async def test_every_violation_is_reported_in_one_answer(stub, http, running_broker: RunningBroker):
    body = provision(resourceName="Bad_Name", spec=spec(size="huge", replicas=0), callbackUrl="ftp://x/")

    err = await call_grpc(stub, "provision", body)
    status, http_body = await call_http(http, "provision", seed_spelling(body))

    expected = {"resource_name", "spec.size", "spec.replicas", "callback_url"}
    _, violations = grpc_violations(err)
    assert {f for f, _ in violations} == expected
    assert status == 400
    assert {v["field"] for v in http_body["error"]["fieldViolations"]} == expected
    assert [(v["field"], v["description"]) for v in http_body["error"]["fieldViolations"]] == violations
    assert await running_broker.broker.store.count_deployments() == 0


async def test_the_valid_body_used_by_the_table_is_accepted(stub, running_broker: RunningBroker):
    # Guards the table above: each case fails for its one change, not for a broken baseline.
    reply = await stub.Provision(json_format.ParseDict(VALID_PROVISION, pb.ProvisionRequest()), metadata=AUTH)

    assert reply.deployment_id.startswith("deploy-")
    assert await running_broker.broker.store.count_deployments() == 1


@pytest.mark.parametrize("version", ["15", "15.2", "15.2.1", "0", "16.10"])
async def test_version_syntax_accepts_major_minor_and_patch(stub, version):
    body = provision(spec=spec(version=version), requestId=...)

    reply = await stub.Provision(json_format.ParseDict(body, pb.ProvisionRequest()), metadata=AUTH)

    assert reply.phase == pb.STATE_PENDING


@pytest.mark.parametrize(
    "name",
    ["a", "db", "postgres-app-db", "a" * 52, "x1-2-3"],
    ids=["1-char", "2-char", "dashes", "52", "digits"],
)
async def test_resource_names_within_the_rules_are_accepted(stub, name):
    body = provision(resourceName=name, requestId=...)

    reply = await stub.Provision(json_format.ParseDict(body, pb.ProvisionRequest()), metadata=AUTH)

    assert reply.deployment_id.startswith("deploy-")


async def test_a_topic_gets_its_defaults_without_version_or_size(stub):
    body = {
        "namespace": "team-platform",
        "resourceType": "RESOURCE_TYPE_TOPIC",
        "resourceName": "orders-events",
        "spec": {"engine": "kafka"},
    }

    reply = await stub.Provision(json_format.ParseDict(body, pb.ProvisionRequest()), metadata=AUTH)
    deployment = (
        await stub.GetDeployment(
            pb.GetDeploymentRequest(namespace="team-platform", deployment_id=reply.deployment_id),
            metadata=AUTH,
        )
    ).deployment

    assert deployment.desired_spec.replicas == 1
    assert deployment.desired_spec.topic.partitions == 1
    assert deployment.desired_spec.topic.retention_ms == 7 * 24 * 3600 * 1000


@pytest.mark.parametrize("query", ["", "?resourceType=database", "?namespace="])
async def test_get_resources_without_a_namespace_says_namespace_is_required(http, query):
    async with http.get(f"/v1/resources{query}", headers=HTTP_AUTH) as r:
        status, body = r.status, await r.json()

    assert status == 400
    assert body["error"]["status"] == "INVALID_ARGUMENT"
    assert "namespace" in body["error"]["message"]
    assert "required" in body["error"]["message"]
    assert [v["field"] for v in body["error"]["fieldViolations"]] == ["namespace"]


async def test_post_resources_without_a_namespace_says_namespace_is_required(http):
    async with http.post("/v1/resources", json={"resourceType": "database"}, headers=HTTP_AUTH) as r:
        status, body = r.status, await r.json()

    assert status == 400
    assert "namespace" in body["error"]["message"]
    assert "required" in body["error"]["message"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        pytest.param({"spec": spec(replicas="three")}, "spec.replicas", id="replicas-not-a-number"),
        pytest.param({"spec": spec(replicas=1.5)}, "spec.replicas", id="replicas-fractional"),
        pytest.param({"resourceName": 42}, "resource_name", id="name-not-a-string"),
    ],
)
async def test_a_json_value_of_the_wrong_type_names_its_field(
    http, running_broker: RunningBroker, change, field
):
    body = seed_spelling(provision(**change))

    async with http.post("/v1/provision", json=body, headers=HTTP_AUTH) as r:
        status, answer = r.status, await r.json()

    assert status == 400
    assert [v["field"] for v in answer["error"]["fieldViolations"]] == [field], answer
    assert await running_broker.broker.store.count_deployments() == 0


async def test_a_grpc_request_over_the_message_limit_is_refused(stub, running_broker: RunningBroker):
    body = provision(callbackUrl="http://127.0.0.1:9/" + "a" * (5 * 1024 * 1024))

    err = await call_grpc(stub, "provision", body)

    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert await running_broker.broker.store.count_deployments() == 0

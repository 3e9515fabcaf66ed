"""Garbage in, a clear refusal out: random and mutated bodies through gRPC and the gateway.

Every method of every service on the gRPC port gets bodies protobuf cannot parse, bodies mutated
from valid requests, and valid requests with nonsense values. None may be answered UNKNOWN or
INTERNAL, none may kill the server, and undecodable bodies must not flood the log with tracebacks.
The gateway gets random paths, methods, queries and bodies: no 5xx.
"""

from __future__ import annotations

import json
import logging
import random
import string

import aiohttp
import grpc
import pytest
from broker_client.v1 import broker_pb2 as pb
from conftest import ADMIN_TOKEN, RunningBroker, bearer
from grpc_health.v1 import health_pb2

SEED = 20261201
FORBIDDEN = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}

# One valid request per method: the mutations start from these.
VALID: dict[str, bytes] = {
    "/broker.v1.BrokerService/Provision": pb.ProvisionRequest(
        namespace="team-platform",
        resource_type=pb.RESOURCE_TYPE_DATABASE,
        resource_name="fuzz-db",
        spec=pb.ResourceSpec(engine="postgresql", version="15", size="small", replicas=1),
    ).SerializeToString(),
    "/broker.v1.BrokerService/GetResourceState": pb.GetResourceStateRequest(
        namespace="team-platform", resource_type=pb.RESOURCE_TYPE_DATABASE, page_size=10
    ).SerializeToString(),
    "/broker.v1.BrokerService/GetDeployment": pb.GetDeploymentRequest(
        namespace="team-platform", deployment_id="dep-0123"
    ).SerializeToString(),
    "/broker.v1.BrokerService/Deprovision": pb.DeprovisionRequest(
        namespace="team-platform", deployment_id="dep-0123"
    ).SerializeToString(),
    "/broker.v1.BrokerService/ListDriftEvents": pb.ListDriftEventsRequest(
        namespace="team-platform", page_size=5
    ).SerializeToString(),
    "/broker.v1.BrokerService/AcceptDrift": pb.AcceptDriftRequest(
        namespace="team-platform", deployment_id="dep-0123", fields=["replicas"]
    ).SerializeToString(),
    "/broker.v1.BrokerService/GetRemediationPolicy": pb.GetRemediationPolicyRequest(
        namespace="team-platform"
    ).SerializeToString(),
    "/broker.v1.BrokerService/SetRemediationPolicy": pb.SetRemediationPolicyRequest(
        policy=pb.RemediationPolicy(namespace="team-platform", mode=pb.REMEDIATION_MODE_ALERT)
    ).SerializeToString(),
    "/broker.v1.BrokerService/GetAdmissionPolicy": pb.GetAdmissionPolicyRequest(
        mode="deny"
    ).SerializeToString(),
    "/broker.v1.BrokerService/SetCostBudget": pb.SetCostBudgetRequest(
        budget=pb.CostBudget(namespace="team-platform", monthly_budget=250.0)
    ).SerializeToString(),
    "/broker.v1.BrokerService/GetCostBudget": pb.GetCostBudgetRequest(
        namespace="team-platform"
    ).SerializeToString(),
    "/broker.v1.BrokerService/GetCostSummary": pb.GetCostSummaryRequest(
        namespace="team-platform", max_drifts=5
    ).SerializeToString(),
    "/broker.v1.BrokerService/ListPendingRemediations": pb.ListPendingRemediationsRequest(
        namespace="team-platform", include_decided=True
    ).SerializeToString(),
    "/broker.v1.BrokerService/ApproveRemediation": pb.ApproveRemediationRequest(
        namespace="team-platform", remediation_id="rem-0123456789abcdef", request_id="r-1"
    ).SerializeToString(),
    "/broker.v1.BrokerService/RejectRemediation": pb.RejectRemediationRequest(
        namespace="team-platform", remediation_id="rem-0123456789abcdef", reason="no"
    ).SerializeToString(),
    "/grpc.health.v1.Health/Check": health_pb2.HealthCheckRequest(service="").SerializeToString(),
}
STREAMING = {"/broker.v1.BrokerService/WatchDrift": pb.WatchDriftRequest().SerializeToString()}


def test_every_broker_method_is_fuzzed() -> None:
    """A method added to the proto must be added to the fuzz table too."""
    methods = {
        f"/broker.v1.BrokerService/{m.name}" for m in pb.DESCRIPTOR.services_by_name["BrokerService"].methods
    }
    assert methods == {m for m in [*VALID, *STREAMING] if m.startswith("/broker.v1.")}


def mutate(rng: random.Random, body: bytes) -> bytes:
    """A random byte-level mutation: flip, insert, delete, truncate, splice garbage."""
    data = bytearray(body)
    for _ in range(rng.randint(1, 4)):
        choice = rng.randrange(5)
        if choice == 0 and data:
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        elif choice == 1:
            data.insert(rng.randrange(len(data) + 1), rng.randrange(256))
        elif choice == 2 and data:
            del data[rng.randrange(len(data))]
        elif choice == 3 and data:
            del data[rng.randrange(len(data)) :]
        else:
            at = rng.randrange(len(data) + 1)
            data[at:at] = rng.randbytes(rng.randint(1, 8))
    return bytes(data)


def bodies(rng: random.Random, valid: bytes, count: int) -> list[bytes]:
    """Random bytes, classic parse-breakers, and mutations of a valid body."""
    fixed = [
        b"\xff\xff\xff\xff\xff",  # a truncated varint
        b"\x0a\xff\x01",  # a length beyond the end
        b"\x0a\x02\xc3\x28",  # invalid UTF-8 in a string field
        b"\x07",  # wire type 7 does not exist
        b"\x00",  # field number 0
    ]
    out = fixed + [rng.randbytes(rng.randint(1, 64)) for _ in range(count // 2)]
    out += [mutate(rng, valid) for _ in range(count - len(out))]
    return out


async def test_grpc_garbage_is_invalid_argument_never_unknown(
    running_broker: RunningBroker, caplog: pytest.LogCaptureFixture
) -> None:
    rng = random.Random(SEED)
    codes: dict[grpc.StatusCode, int] = {}
    undecodable = 0
    calls = 0
    wrong: list[str] = []
    async with grpc.aio.insecure_channel(running_broker.grpc_target) as channel:
        for method, valid in VALID.items():
            call = channel.unary_unary(method)  # raw bytes in, raw bytes out: a generic channel
            for body in bodies(rng, valid, 300):
                calls += 1
                try:
                    await call(body, metadata=bearer(ADMIN_TOKEN), timeout=5)
                    code = grpc.StatusCode.OK
                except grpc.aio.AioRpcError as e:
                    code = e.code()
                    if code in FORBIDDEN:
                        wrong.append(f"{method} answered {code} to {body!r}: {e.details()}")
                    if e.code() is grpc.StatusCode.INVALID_ARGUMENT and "cannot parse" in (e.details() or ""):
                        undecodable += 1
                codes[code] = codes.get(code, 0) + 1
        for method, valid in STREAMING.items():
            stream = channel.unary_stream(method)
            for body in bodies(rng, valid, 200):
                calls += 1
                try:
                    async for _ in stream(body, metadata=bearer(ADMIN_TOKEN), timeout=0.3):
                        pass
                except grpc.aio.AioRpcError as e:
                    if e.code() in FORBIDDEN:
                        wrong.append(f"{method} answered {e.code()} to {body!r}: {e.details()}")
                    codes[e.code()] = codes.get(e.code(), 0) + 1
        # Still serving, and answering properly.
        check = channel.unary_unary("/grpc.health.v1.Health/Check")
        reply = health_pb2.HealthCheckResponse.FromString(
            await check(VALID["/grpc.health.v1.Health/Check"], timeout=5)
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert not wrong, "\n".join(wrong[:20])
    assert calls >= 2500
    assert undecodable >= 1000, codes  # most garbage does not parse; each such call was refused cleanly
    # Bodies that parse but carry nonsense are refused by validation, beyond the undecodable ones.
    assert codes.get(grpc.StatusCode.INVALID_ARGUMENT, 0) > undecodable
    # No traceback per call: a few throttled one-line warnings at most, no errors.
    refused = [r for r in caplog.records if r.name == "broker.api.decoding"]
    assert 1 <= len(refused) <= 5
    assert all(r.exc_info is None for r in refused)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_decode_error_carries_a_field_violation(running_broker: RunningBroker) -> None:
    async with grpc.aio.insecure_channel(running_broker.grpc_target) as channel:
        call = channel.unary_unary("/broker.v1.BrokerService/Provision")
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call(b"\xff\xff\xff\xff\xff", metadata=bearer(ADMIN_TOKEN), timeout=5)
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    trailers = dict(raised.value.trailing_metadata() or ())
    assert trailers["broker-error-reason"] == "MALFORMED_REQUEST"
    details = raised.value.details() or ""
    assert "cannot parse as a Provision request" in details
    assert "(body)" in details


GATEWAY_PATHS = [
    "/v1/provision",
    "/v1/resources",
    "/v1/deployments/dep-0123",
    "/v1/deployments/dep-0123:acceptDrift",
    "/v1/deprovision",
    "/v1/events",
    "/v1/policies",
    "/v1/%00",
    "/v1/deployments/%2e%2e%2f",
    "/v1/deployments/" + "a" * 300,
    "/healthz",
    "/readyz",
]
VALID_JSON: list[object] = [
    {
        "namespace": "team-platform",
        "resourceType": "database",
        "resourceName": "fuzz-db",
        "spec": {"engine": "postgresql", "version": "15", "size": "medium", "replicas": 1},
    },
    {"namespace": "team-platform", "deploymentId": "dep-0123", "dataPolicy": "keep"},
    {"namespace": "team-platform", "resourceType": "cache", "mode": "alert", "ignoreFields": ["replicas"]},
]


def json_noise(rng: random.Random, depth: int = 0) -> object:
    """A random JSON value: wrong types, huge numbers, odd strings, nesting."""
    kinds = ["int", "float", "str", "bool", "null"] + (["list", "dict"] if depth < 3 else [])
    kind = rng.choice(kinds)
    if kind == "int":
        return rng.choice([0, -1, 1, 2**31, 2**63, -(2**64), 10**30])
    if kind == "float":
        return rng.choice([0.5, -1e308, 1e308, 3.14])
    if kind == "str":
        return rng.choice(["", "database", "Ready", "x" * 500, "\u0000", "ñ", "../etc", string.printable])
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "null":
        return None
    if kind == "list":
        return [json_noise(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {rng.choice(["namespace", "spec", "replicas", "resourceType", "x"]): json_noise(rng, depth + 1)}


def json_mutation(rng: random.Random) -> object:
    """A valid body with one field replaced by noise, or removed."""
    body = json.loads(json.dumps(rng.choice(VALID_JSON)))
    target = body["spec"] if "spec" in body and rng.random() < 0.5 else body
    key = rng.choice(list(target))
    if rng.random() < 0.2:
        del target[key]
    else:
        target[key] = json_noise(rng)
    return body


async def test_gateway_garbage_never_answers_5xx(running_broker: RunningBroker) -> None:
    rng = random.Random(SEED)
    statuses: dict[int, int] = {}
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with aiohttp.ClientSession(base_url=running_broker.http_url, headers=headers) as http:
        for _ in range(1500):
            method = rng.choice(["GET", "POST", "PUT", "DELETE", "PATCH"])
            path = rng.choice(GATEWAY_PATHS)
            params = {
                rng.choice(["namespace", "resourceType", "pageSize", "afterSequence", "kind", "x"]): str(
                    json_noise(rng)
                )
                for _ in range(rng.randint(0, 3))
            }
            choice = rng.randrange(3)
            if choice == 0:
                data: bytes = rng.randbytes(rng.randint(0, 64))
            elif choice == 1:
                data = json.dumps(json_noise(rng)).encode()
            else:
                data = json.dumps(json_mutation(rng)).encode()
            async with http.request(method, path, params=params, data=data) as response:
                body = await response.read()
                assert response.status < 500 or path in ("/readyz",), (method, path, params, data, body)
                statuses[response.status] = statuses.get(response.status, 0) + 1
        async with http.get("/healthz") as response:
            assert response.status == 200
    assert statuses.get(400, 0) > 100, statuses

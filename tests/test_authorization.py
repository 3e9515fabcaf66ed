"""Who may do what: bearer tokens on gRPC and HTTP alike, namespace grants on every RPC and path, the
same answer whether or not something exists where the caller may not look, and the insecure mode."""

from __future__ import annotations

import hashlib
import logging
import pathlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import grpc
import pytest
from broker_client.v1 import broker_pb2 as pb
from broker_client.v1 import broker_pb2_grpc
from conftest import ADMIN_TOKEN, OTHER_TOKEN, PLATFORM_TOKEN, RunningBroker, bearer
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from broker import server

FORBIDDEN_NS = "team-other"  # the platform principal is not granted it
MISSING_ID = "deploy-0000deadbeef"

Metadata = tuple[tuple[str, str], ...]
GrpcCall = Callable[[broker_pb2_grpc.BrokerServiceStub, str, str, Metadata], Awaitable[Any]]


def _spec() -> pb.ResourceSpec:
    return pb.ResourceSpec(engine="postgresql", version="15", size="small")


GRPC_CALLS: dict[str, GrpcCall] = {
    "Provision": lambda stub, ns, dep, md: stub.Provision(
        pb.ProvisionRequest(
            namespace=ns, resource_type=pb.RESOURCE_TYPE_DATABASE, resource_name="orders-db", spec=_spec()
        ),
        metadata=md,
    ),
    "GetResourceState": lambda stub, ns, dep, md: stub.GetResourceState(
        pb.GetResourceStateRequest(namespace=ns, deployment_id=dep), metadata=md
    ),
    "GetDeployment": lambda stub, ns, dep, md: stub.GetDeployment(
        pb.GetDeploymentRequest(namespace=ns, deployment_id=dep), metadata=md
    ),
    "Deprovision": lambda stub, ns, dep, md: stub.Deprovision(
        pb.DeprovisionRequest(namespace=ns, deployment_id=dep), metadata=md
    ),
    "ListDriftEvents": lambda stub, ns, dep, md: stub.ListDriftEvents(
        pb.ListDriftEventsRequest(namespace=ns, deployment_id=dep), metadata=md
    ),
}

# (id, metadata, code, message fragment)
BAD_CREDENTIALS = [
    pytest.param((), "missing credentials", id="no-token"),
    pytest.param((("authorization", "Basic YWRtaW46cGFzc3dvcmQ="),), "malformed", id="basic-scheme"),
    pytest.param((("authorization", ADMIN_TOKEN),), "malformed", id="token-without-scheme"),
    pytest.param((("authorization", "Bearer"),), "malformed", id="scheme-without-token"),
    pytest.param(bearer("not-a-known-token-0123456789"), "not valid", id="unknown-token"),
    pytest.param(bearer(ADMIN_TOKEN + "x"), "not valid", id="admin-token-plus-a-char"),
]


def reason_of(err: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(err)
    assert status is not None, "no google.rpc.Status in the trailers"
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason
    raise AssertionError("no ErrorInfo detail")


async def rpc_error(awaitable: Awaitable[Any]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await awaitable
    return info.value


async def provision_in(stub, namespace: str, name: str = "orders-db") -> str:
    reply = await stub.Provision(
        pb.ProvisionRequest(
            namespace=namespace, resource_type=pb.RESOURCE_TYPE_DATABASE, resource_name=name, spec=_spec()
        ),
        metadata=bearer(ADMIN_TOKEN),
    )
    return reply.deployment_id


# gRPC ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rpc", list(GRPC_CALLS))
@pytest.mark.parametrize(("metadata", "fragment"), BAD_CREDENTIALS)
async def test_grpc_without_valid_credentials_is_unauthenticated(
    stub, running_broker: RunningBroker, rpc, metadata, fragment
):
    existing = await provision_in(stub, "team-platform")

    err = await rpc_error(GRPC_CALLS[rpc](stub, "team-platform", existing, metadata))

    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert fragment in err.details()
    assert reason_of(err) == "UNAUTHENTICATED"
    assert ADMIN_TOKEN not in err.details()
    deployment = await stub.GetDeployment(
        pb.GetDeploymentRequest(namespace="team-platform", deployment_id=existing),
        metadata=bearer(ADMIN_TOKEN),
    )
    assert deployment.deployment.phase == pb.STATE_PENDING
    assert await running_broker.broker.store.count_deployments() == 1


@pytest.mark.parametrize("rpc", list(GRPC_CALLS))
async def test_grpc_on_a_namespace_not_granted_is_permission_denied(stub, running_broker: RunningBroker, rpc):
    existing = await provision_in(stub, FORBIDDEN_NS)

    err = await rpc_error(GRPC_CALLS[rpc](stub, FORBIDDEN_NS, existing, bearer(PLATFORM_TOKEN)))

    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert reason_of(err) == "NAMESPACE_NOT_GRANTED"
    assert FORBIDDEN_NS in err.details()
    # Nothing changed in the forbidden namespace.
    deployment = await stub.GetDeployment(
        pb.GetDeploymentRequest(namespace=FORBIDDEN_NS, deployment_id=existing), metadata=bearer(OTHER_TOKEN)
    )
    assert deployment.deployment.phase == pb.STATE_PENDING
    assert deployment.deployment.generation == 1
    assert await running_broker.broker.store.count_deployments() == 1


@pytest.mark.parametrize("rpc", list(GRPC_CALLS))
async def test_grpc_answer_is_the_same_whether_or_not_the_deployment_exists(stub, rpc):
    existing = await provision_in(stub, FORBIDDEN_NS)

    on_existing = await rpc_error(GRPC_CALLS[rpc](stub, FORBIDDEN_NS, existing, bearer(PLATFORM_TOKEN)))
    on_missing = await rpc_error(GRPC_CALLS[rpc](stub, FORBIDDEN_NS, MISSING_ID, bearer(PLATFORM_TOKEN)))

    assert on_existing.code() == on_missing.code() == grpc.StatusCode.PERMISSION_DENIED
    assert on_existing.details() == on_missing.details()
    assert reason_of(on_existing) == reason_of(on_missing)
    assert existing not in on_existing.details()


async def test_grpc_answer_is_the_same_for_an_existing_and_an_empty_namespace(stub):
    await provision_in(stub, FORBIDDEN_NS)

    populated = await rpc_error(
        GRPC_CALLS["GetResourceState"](stub, FORBIDDEN_NS, "", bearer(PLATFORM_TOKEN))
    )
    empty = await rpc_error(GRPC_CALLS["GetResourceState"](stub, "team-empty", "", bearer(PLATFORM_TOKEN)))

    assert populated.code() == empty.code() == grpc.StatusCode.PERMISSION_DENIED
    assert populated.details().replace(FORBIDDEN_NS, "NS") == empty.details().replace("team-empty", "NS")


@pytest.mark.parametrize("namespace", ["team-platform", "team-other", "anything-else"])
@pytest.mark.parametrize("rpc", list(GRPC_CALLS))
async def test_grpc_admin_is_allowed_in_every_namespace(stub, rpc, namespace):
    existing = await provision_in(stub, namespace, name="admin-db")

    await GRPC_CALLS[rpc](stub, namespace, existing, bearer(ADMIN_TOKEN))


@pytest.mark.parametrize(
    ("token", "namespace"), [(PLATFORM_TOKEN, "team-platform"), (OTHER_TOKEN, "team-other")]
)
@pytest.mark.parametrize("rpc", list(GRPC_CALLS))
async def test_grpc_a_principal_may_use_its_own_namespace(stub, rpc, token, namespace):
    existing = await provision_in(stub, namespace, name="own-db")

    await GRPC_CALLS[rpc](stub, namespace, existing, bearer(token))


async def test_a_principal_sees_only_its_namespace_in_resource_state(stub):
    await provision_in(stub, "team-platform", "platform-db")
    await provision_in(stub, "team-other", "other-db")

    own = await stub.GetResourceState(
        pb.GetResourceStateRequest(namespace="team-platform"), metadata=bearer(PLATFORM_TOKEN)
    )

    assert [r.resource_name for r in own.resources] == ["platform-db"]


async def test_watch_drift_without_credentials_is_unauthenticated(stub):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in stub.WatchDrift(pb.WatchDriftRequest(namespaces=["team-platform"])):
            pass

    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


# HTTP ---------------------------------------------------------------------------------------------

HttpCall = Callable[[aiohttp.ClientSession, str, str, dict[str, str]], Any]

HTTP_CALLS: dict[str, HttpCall] = {
    "POST /v1/provision": lambda http, ns, dep, h: http.post(
        "/v1/provision",
        json={
            "namespace": ns,
            "resourceType": "database",
            "resourceName": "orders-db",
            "spec": {"engine": "postgresql", "version": "15", "size": "small"},
        },
        headers=h,
    ),
    "GET /v1/resources": lambda http, ns, dep, h: http.get(
        "/v1/resources", params={"namespace": ns, "deploymentId": dep}, headers=h
    ),
    "POST /v1/resources": lambda http, ns, dep, h: http.post(
        "/v1/resources", json={"namespace": ns, "deploymentId": dep}, headers=h
    ),
    "GET /v1/deployments/{id}": lambda http, ns, dep, h: http.get(
        f"/v1/deployments/{dep}", params={"namespace": ns}, headers=h
    ),
    "DELETE /v1/deployments/{id}": lambda http, ns, dep, h: http.delete(
        f"/v1/deployments/{dep}", params={"namespace": ns}, headers=h
    ),
    "POST /v1/deprovision": lambda http, ns, dep, h: http.post(
        "/v1/deprovision", json={"namespace": ns, "deploymentId": dep}, headers=h
    ),
    "GET /v1/events": lambda http, ns, dep, h: http.get(
        "/v1/events", params={"namespace": ns, "deploymentId": dep}, headers=h
    ),
}

BAD_HTTP_CREDENTIALS = [
    pytest.param({}, "missing credentials", id="no-header"),
    pytest.param({"Authorization": ""}, "missing credentials", id="empty-header"),
    pytest.param({"Authorization": "Basic YWRtaW46cGFzc3dvcmQ="}, "malformed", id="basic-scheme"),
    pytest.param({"Authorization": ADMIN_TOKEN}, "malformed", id="token-without-scheme"),
    pytest.param({"Authorization": "Bearer not-a-known-token-0123456789"}, "not valid", id="unknown-token"),
]


async def http_call(http, path: str, namespace: str, deployment_id: str, headers) -> tuple[int, Any]:
    async with HTTP_CALLS[path](http, namespace, deployment_id, headers) as r:
        return r.status, await r.json()


def http_bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.parametrize("path", list(HTTP_CALLS))
@pytest.mark.parametrize(("headers", "fragment"), BAD_HTTP_CREDENTIALS)
async def test_http_without_valid_credentials_is_401(stub, http, running_broker, path, headers, fragment):
    existing = await provision_in(stub, "team-platform")

    status, body = await http_call(http, path, "team-platform", existing, headers)

    assert status == 401, body
    assert body["error"]["code"] == 401
    assert body["error"]["status"] == "UNAUTHENTICATED"
    assert fragment in body["error"]["message"]
    assert await running_broker.broker.store.count_deployments() == 1


@pytest.mark.parametrize("path", list(HTTP_CALLS))
async def test_http_on_a_namespace_not_granted_is_403(stub, http, running_broker, path):
    existing = await provision_in(stub, FORBIDDEN_NS)

    status, body = await http_call(http, path, FORBIDDEN_NS, existing, http_bearer(PLATFORM_TOKEN))

    assert status == 403, body
    assert body["error"]["status"] == "PERMISSION_DENIED"
    assert body["error"]["reason"] == "NAMESPACE_NOT_GRANTED"
    deployment = await stub.GetDeployment(
        pb.GetDeploymentRequest(namespace=FORBIDDEN_NS, deployment_id=existing), metadata=bearer(ADMIN_TOKEN)
    )
    assert deployment.deployment.phase == pb.STATE_PENDING
    assert await running_broker.broker.store.count_deployments() == 1


@pytest.mark.parametrize("path", list(HTTP_CALLS))
async def test_http_answer_is_the_same_whether_or_not_the_deployment_exists(stub, http, path):
    existing = await provision_in(stub, FORBIDDEN_NS)

    on_existing = await http_call(http, path, FORBIDDEN_NS, existing, http_bearer(PLATFORM_TOKEN))
    on_missing = await http_call(http, path, FORBIDDEN_NS, MISSING_ID, http_bearer(PLATFORM_TOKEN))

    assert on_existing[0] == 403
    assert on_existing == on_missing


@pytest.mark.parametrize("path", list(HTTP_CALLS))
async def test_http_error_matches_the_grpc_error_of_the_same_call(stub, http, path):
    existing = await provision_in(stub, FORBIDDEN_NS)
    rpc = {
        "POST /v1/provision": "Provision",
        "GET /v1/resources": "GetResourceState",
        "POST /v1/resources": "GetResourceState",
        "GET /v1/deployments/{id}": "GetDeployment",
        "DELETE /v1/deployments/{id}": "Deprovision",
        "POST /v1/deprovision": "Deprovision",
        "GET /v1/events": "ListDriftEvents",
    }[path]

    err = await rpc_error(GRPC_CALLS[rpc](stub, FORBIDDEN_NS, existing, bearer(PLATFORM_TOKEN)))
    status, body = await http_call(http, path, FORBIDDEN_NS, existing, http_bearer(PLATFORM_TOKEN))

    assert status == body["error"]["code"] == 403
    assert body["error"]["status"] == err.code().name
    assert body["error"]["message"] == err.details()
    assert body["error"]["reason"] == reason_of(err)


@pytest.mark.parametrize("namespace", ["team-platform", "team-other"])
@pytest.mark.parametrize("path", list(HTTP_CALLS))
async def test_http_admin_is_allowed_in_every_namespace(stub, http, path, namespace):
    existing = await provision_in(stub, namespace, name="admin-db")

    status, body = await http_call(http, path, namespace, existing, http_bearer(ADMIN_TOKEN))

    accepted = {"POST /v1/provision", "DELETE /v1/deployments/{id}", "POST /v1/deprovision"}
    assert status == (202 if path in accepted else 200), body


async def test_probes_need_no_credentials(http):
    async with http.get("/healthz") as healthz, http.get("/readyz") as readyz:
        assert healthz.status == 200
        assert readyz.status == 200


# Modes --------------------------------------------------------------------------------------------


@pytest.fixture
async def insecure_broker(tmp_path: pathlib.Path) -> AsyncIterator[server.Broker]:
    broker = server.Broker(
        server.Settings(
            grpc_addr="127.0.0.1:0",
            http_addr="127.0.0.1:0",
            data_dir=tmp_path / "insecure",
            insecure=True,
            tokens_file=None,
            shutdown_grace=1.0,
        )
    )
    await broker.start()
    try:
        yield broker
    finally:
        await broker.stop()


async def test_an_insecure_broker_accepts_calls_without_a_token(insecure_broker: server.Broker):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{insecure_broker.grpc_port}") as channel:
        stub = broker_pb2_grpc.BrokerServiceStub(channel)
        reply = await GRPC_CALLS["Provision"](stub, "any-namespace", "", ())
        state = await GRPC_CALLS["GetResourceState"](stub, "any-namespace", reply.deployment_id, ())
    async with (
        aiohttp.ClientSession(base_url=f"http://127.0.0.1:{insecure_broker.http_port}") as http,
        http.get("/v1/resources", params={"namespace": "any-namespace"}) as r,
    ):
        status, body = r.status, await r.json()

    assert reply.deployment_id.startswith("deploy-")
    assert [r.deployment_id for r in state.resources] == [reply.deployment_id]
    assert status == 200
    assert [r["deploymentId"] for r in body["resources"]] == [reply.deployment_id]


def test_a_broker_without_tokens_or_insecure_refuses_to_start(tmp_path: pathlib.Path):
    with pytest.raises(ValueError, match="no authentication configured"):
        server.Broker(server.Settings(data_dir=tmp_path / "data", insecure=False, tokens_file=None))


async def test_a_token_file_may_hold_sha256_digests_instead_of_tokens(tmp_path: pathlib.Path):
    token = "hashed-token-0123456789abcdef"
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(
        "principals:\n"
        "  - name: hashed\n"
        f"    token_sha256: {hashlib.sha256(token.encode()).hexdigest()}\n"
        "    namespaces: [team-hashed]\n"
    )
    broker = server.Broker(
        server.Settings(
            grpc_addr="127.0.0.1:0", http_addr="127.0.0.1:0", data_dir=tmp_path / "d", tokens_file=tokens
        )
    )
    await broker.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{broker.grpc_port}") as channel:
            stub = broker_pb2_grpc.BrokerServiceStub(channel)
            allowed = await GRPC_CALLS["GetResourceState"](stub, "team-hashed", "", bearer(token))
            denied = await rpc_error(GRPC_CALLS["GetResourceState"](stub, "team-platform", "", bearer(token)))
    finally:
        await broker.stop()

    assert allowed.namespace == "team-hashed"
    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED


def test_a_token_file_with_a_short_token_is_refused_without_echoing_it(tmp_path: pathlib.Path):
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text("principals:\n  - name: weak\n    token: shortsecret\n    namespaces: ['*']\n")

    with pytest.raises(ValueError, match="at least 16 characters") as info:
        server.Broker(server.Settings(data_dir=tmp_path / "d", tokens_file=tokens))

    assert "shortsecret" not in str(info.value)
    assert "weak" in str(info.value)


async def test_provision_answer_is_the_same_whether_or_not_the_resource_exists(stub):
    await provision_in(stub, FORBIDDEN_NS, name="orders-db")

    def attempt(name: str) -> Awaitable[Any]:
        return stub.Provision(
            pb.ProvisionRequest(
                namespace=FORBIDDEN_NS,
                resource_type=pb.RESOURCE_TYPE_DATABASE,
                resource_name=name,
                spec=_spec(),
            ),
            metadata=bearer(PLATFORM_TOKEN),
        )

    on_existing = await rpc_error(attempt("orders-db"))
    on_missing = await rpc_error(attempt("never-made-db"))

    assert on_existing.code() == on_missing.code() == grpc.StatusCode.PERMISSION_DENIED
    assert on_existing.details() == on_missing.details()


# Audit --------------------------------------------------------------------------------------------


async def test_every_mutating_call_writes_an_audit_line_without_the_token(stub, caplog):
    caplog.set_level(logging.INFO, logger="broker.audit")
    existing = await provision_in(stub, FORBIDDEN_NS)
    caplog.clear()

    accepted = await GRPC_CALLS["Provision"](stub, "team-platform", "", bearer(PLATFORM_TOKEN))
    await rpc_error(GRPC_CALLS["Deprovision"](stub, FORBIDDEN_NS, existing, bearer(PLATFORM_TOKEN)))
    await GRPC_CALLS["GetResourceState"](stub, "team-platform", "", bearer(PLATFORM_TOKEN))

    lines = [r.audit for r in caplog.records if r.name == "broker.audit"]
    assert [(a["principal"], a["action"], a["namespace"], a["result"]) for a in lines] == [
        ("platform", "Provision", "team-platform", "ok"),
        ("platform", "Deprovision", FORBIDDEN_NS, "rejected"),
    ]
    assert lines[0]["deployment_id"] == accepted.deployment_id
    assert lines[1]["resource"] == existing
    for record in caplog.records:
        assert PLATFORM_TOKEN not in record.getMessage()
        assert PLATFORM_TOKEN not in str(vars(record))

"""The one table that maps the broker's exceptions to gRPC codes and HTTP statuses, and what callers
see of an unexpected error: an opaque INTERNAL / 500 with an incident id, never the original text."""

from __future__ import annotations

import logging
import re

import grpc
import pytest
from broker_client.v1 import broker_pb2 as pb
from conftest import PLATFORM_TOKEN, RunningBroker, bearer
from google.rpc import code_pb2, error_details_pb2
from grpc_status import rpc_status

from broker import errors
from broker.api import status

# The documented mapping (google.rpc.Code's HTTP mapping; DESIGN section 3).
EXPECTED = [
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT, 400),
    (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED, 401),
    (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED, 403),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND, 404),
    (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS, 409),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION, 400),
    (errors.OutOfRange, grpc.StatusCode.OUT_OF_RANGE, 400),
    (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE, 503),
    # aiohttp's own refusals on the /v1 port, in the same table.
    (errors.RequestTooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED, 413),
    (errors.MethodNotAllowed, grpc.StatusCode.UNIMPLEMENTED, 405),
]

SECRET_DETAIL = "password=hunter2 at /var/lib/broker"


def make(cls: type[errors.BrokerError]) -> errors.BrokerError:
    if cls is errors.InvalidArgument:
        return errors.InvalidArgument(
            [
                errors.FieldViolation("resource_name", "is required"),
                errors.FieldViolation("spec.replicas", "must be between 1 and 9, got 0"),
            ]
        )
    return cls(f"something about {cls.__name__}")


def unpack(rich, kind):
    found = []
    for detail in rich.details:
        if detail.Is(kind.DESCRIPTOR):
            message = kind()
            detail.Unpack(message)
            found.append(message)
    return found


@pytest.mark.parametrize(("cls", "code", "http_status"), EXPECTED, ids=[c.__name__ for c, _, _ in EXPECTED])
def test_each_exception_maps_to_its_documented_code_and_status(cls, code, http_status):
    exc = make(cls)

    mapping = status.mapping_of(exc)
    http_code, body = status.http_body(exc)
    rich = status.rich_status(exc)

    assert mapping.grpc_code == code
    assert mapping.http_status == http_status
    assert http_code == http_status
    assert body["error"]["code"] == http_status
    assert body["error"]["status"] == code.name
    assert body["error"]["message"] == exc.message
    assert body["error"]["reason"] == exc.reason
    assert rich.code == code.value[0]
    assert rich.message == exc.message
    [info] = unpack(rich, error_details_pb2.ErrorInfo)
    assert info.reason == exc.reason
    assert info.domain


def test_the_table_covers_every_exception_the_broker_defines():
    defined = {
        obj
        for obj in vars(errors).values()
        if isinstance(obj, type) and issubclass(obj, errors.BrokerError) and obj is not errors.BrokerError
    }

    assert set(status.TABLE) == defined
    assert {cls for cls, _, _ in EXPECTED} == defined


def test_reasons_are_stable_upper_snake_identifiers():
    for cls, _, _ in EXPECTED:
        assert re.fullmatch(r"[A-Z][A-Z0-9_]+", make(cls).reason), cls


def test_invalid_argument_carries_every_field_violation():
    exc = make(errors.InvalidArgument)

    rich = status.rich_status(exc)
    _, body = status.http_body(exc)

    [bad] = unpack(rich, error_details_pb2.BadRequest)
    assert [(v.field, v.description) for v in bad.field_violations] == [
        ("resource_name", "is required"),
        ("spec.replicas", "must be between 1 and 9, got 0"),
    ]
    assert body["error"]["fieldViolations"] == [
        {"field": "resource_name", "description": "is required"},
        {"field": "spec.replicas", "description": "must be between 1 and 9, got 0"},
    ]
    assert "resource_name: is required" in exc.message
    assert "spec.replicas" in exc.message


@pytest.mark.parametrize("cls", [c for c, _, _ in EXPECTED if c is not errors.InvalidArgument])
def test_only_invalid_argument_carries_bad_request(cls):
    rich = status.rich_status(make(cls))

    assert unpack(rich, error_details_pb2.BadRequest) == []
    assert "fieldViolations" not in status.http_body(make(cls))[1]["error"]


def test_a_subclass_maps_like_its_nearest_mapped_base():
    class DeploymentGone(errors.NotFound):
        pass

    mapping = status.mapping_of(DeploymentGone("gone"))

    assert mapping.grpc_code == grpc.StatusCode.NOT_FOUND
    assert mapping.http_status == 404


def test_an_unexpected_exception_becomes_internal_with_an_incident_id(caplog):
    caplog.set_level(logging.ERROR, logger="broker.api.status")

    public = status.public_error(RuntimeError(SECRET_DETAIL))
    http_code, body = status.http_body(public)
    rich = status.rich_status(public)

    incident = re.search(r"incident ([0-9a-f]+)", public.message)
    assert incident, public.message
    assert SECRET_DETAIL not in public.message
    assert status.mapping_of(public).grpc_code == grpc.StatusCode.INTERNAL
    assert http_code == 500
    assert body["error"]["status"] == "INTERNAL"
    assert SECRET_DETAIL not in str(body)
    assert rich.code == code_pb2.INTERNAL
    assert SECRET_DETAIL not in str(rich)
    # The operator can find the original error by the incident id.
    logged = [r for r in caplog.records if incident.group(1) in r.getMessage()]
    assert logged
    assert logged[0].exc_info
    assert SECRET_DETAIL in str(logged[0].exc_info[1])


def test_two_unexpected_errors_get_different_incident_ids():
    first = status.public_error(RuntimeError("a"))
    second = status.public_error(RuntimeError("a"))

    assert first.message != second.message


def test_a_broker_error_passes_through_unchanged():
    exc = errors.NotFound("deployment 'deploy-1' not found")

    assert status.public_error(exc) is exc


# End to end ---------------------------------------------------------------------------------------


async def test_an_unexpected_failure_reaches_callers_as_internal_without_its_text(
    stub, http, running_broker: RunningBroker, monkeypatch, caplog
):
    caplog.set_level(logging.ERROR, logger="broker.api.status")

    async def broken(*args, **kwargs):
        raise RuntimeError(SECRET_DETAIL)

    # The project's own seam: the store the service layer reads from.
    monkeypatch.setattr(running_broker.broker.store, "list_deployments", broken)

    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.GetResourceState(
            pb.GetResourceStateRequest(namespace="team-platform"), metadata=bearer(PLATFORM_TOKEN)
        )
    async with http.get(
        "/v1/resources",
        params={"namespace": "team-platform"},
        headers={"Authorization": f"Bearer {PLATFORM_TOKEN}"},
    ) as r:
        http_status, body = r.status, await r.json()

    err = info.value
    assert err.code() == grpc.StatusCode.INTERNAL
    assert re.search(r"incident [0-9a-f]+", err.details())
    assert SECRET_DETAIL not in err.details()
    rich = rpc_status.from_call(err)
    assert rich is not None
    assert SECRET_DETAIL not in str(rich)
    assert http_status == 500
    assert body["error"]["status"] == "INTERNAL"
    assert re.search(r"incident [0-9a-f]+", body["error"]["message"])
    assert SECRET_DETAIL not in str(body)
    assert any(SECRET_DETAIL in str(r.exc_info[1]) for r in caplog.records if r.exc_info)


async def test_a_closed_store_is_unavailable_over_grpc_and_http(stub, http, running_broker: RunningBroker):
    await running_broker.broker.store.close()

    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.GetResourceState(
            pb.GetResourceStateRequest(namespace="team-platform"), metadata=bearer(PLATFORM_TOKEN)
        )
    async with http.get(
        "/v1/resources",
        params={"namespace": "team-platform"},
        headers={"Authorization": f"Bearer {PLATFORM_TOKEN}"},
    ) as r:
        http_status, body = r.status, await r.json()
    async with http.get("/readyz") as r:
        ready_status, ready = r.status, await r.json()

    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert http_status == 503
    assert body["error"]["status"] == "UNAVAILABLE"
    assert body["error"]["message"] == info.value.details()
    assert ready_status == 503
    assert ready["reason"]

"""The client library (``broker_client.client.BrokerClient``) against real brokers.

- typed errors: every failed call surfaces as the right ``broker_client.errors`` subclass, with the
  gRPC code and the broker's readable message;
- the unary round trip (provision, get_resource_state, get_deployment, deprovision) and the
  idempotency of ``request_id``;
- retries: the channel's service config retries UNAVAILABLE for idempotent calls only. A tiny
  in-test gRPC server that fails the first calls proves it by counting server-side attempts.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
import pytest
from broker_client import errors
from broker_client.client import BrokerClient
from broker_client.v1 import broker_pb2 as pb
from broker_client.v1 import broker_pb2_grpc
from conftest import OTHER_TOKEN, PLATFORM_TOKEN, RunningBroker, until

NS = "team-platform"
UNKNOWN_ID = "deploy-000000000000"
T = TypeVar("T")


@pytest.fixture
async def client(running_broker: RunningBroker) -> AsyncIterator[BrokerClient]:
    async with await BrokerClient.connect(running_broker.grpc_target, token=PLATFORM_TOKEN) as c:
        yield c


def assert_typed(
    exc: BaseException, cls: type[errors.BrokerError], code: grpc.StatusCode, *fragments: str
) -> None:
    """``exc`` is exactly ``cls`` (a BrokerError) with ``code`` and a message naming ``fragments``."""
    assert type(exc) is cls, f"{type(exc).__name__}: {exc}"
    assert isinstance(exc, errors.BrokerError)
    assert exc.code == code
    assert exc.message
    assert str(exc) == exc.message
    for fragment in fragments:
        assert fragment in exc.message, (fragment, exc.message)
    # The raw gRPC error stays reachable for callers that want its metadata.
    assert isinstance(exc.__cause__, grpc.RpcError)
    assert exc.__cause__.code() == code


# Typed errors -------------------------------------------------------------------------------------


async def test_an_unknown_deployment_is_not_found(client: BrokerClient) -> None:
    with pytest.raises(errors.BrokerError) as info:
        await client.get_deployment(NS, UNKNOWN_ID)
    assert_typed(info.value, errors.NotFound, grpc.StatusCode.NOT_FOUND, UNKNOWN_ID, NS)

    with pytest.raises(errors.NotFound) as info:
        await client.deprovision(NS, UNKNOWN_ID)
    assert_typed(info.value, errors.NotFound, grpc.StatusCode.NOT_FOUND, UNKNOWN_ID)


async def test_a_namespace_the_token_is_not_granted_is_permission_denied(client: BrokerClient) -> None:
    with pytest.raises(errors.BrokerError) as info:
        await client.get_resource_state("team-other")
    assert_typed(info.value, errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED, "team-other")

    with pytest.raises(errors.PermissionDenied) as info:
        await client.provision(
            namespace="team-other",
            resource_type="database",
            resource_name="sneaky-db",
            engine="postgresql",
            version="15",
            size="medium",
        )
    assert_typed(info.value, errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED, "team-other")


async def test_no_token_or_an_unknown_token_is_unauthenticated(running_broker: RunningBroker) -> None:
    async with await BrokerClient.connect(running_broker.grpc_target) as anonymous:
        with pytest.raises(errors.BrokerError) as info:
            await anonymous.get_resource_state(NS)
    assert_typed(info.value, errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED, "authorization")

    async with await BrokerClient.connect(running_broker.grpc_target, token="no-such-token-000") as wrong:
        with pytest.raises(errors.BrokerError) as info:
            await wrong.get_deployment(NS, UNKNOWN_ID)
    assert_typed(info.value, errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED)
    assert "no-such-token-000" not in info.value.message  # a token is never echoed back


async def test_a_bad_resource_name_is_invalid_argument_naming_the_field(client: BrokerClient) -> None:
    with pytest.raises(errors.BrokerError) as info:
        await client.provision(
            namespace=NS,
            resource_type="database",
            resource_name="Bad_Name",
            engine="postgresql",
            version="15",
            size="medium",
        )
    assert_typed(
        info.value, errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT, "resource_name", "Bad_Name"
    )
    # Nothing was created.
    assert await client.get_resource_state(NS) == []


async def test_a_request_id_reused_for_a_different_request_is_already_exists(client: BrokerClient) -> None:
    first = await client.provision(
        namespace=NS,
        resource_type="database",
        resource_name="orders-db",
        engine="postgresql",
        version="15",
        size="medium",
        request_id="req-reused-0001",
    )
    with pytest.raises(errors.BrokerError) as info:
        await client.provision(
            namespace=NS,
            resource_type="database",
            resource_name="orders-db",
            engine="postgresql",
            version="16",
            size="large",
            request_id="req-reused-0001",
        )
    assert_typed(info.value, errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS)
    deployment = await client.get_deployment(NS, first.deployment_id)
    assert deployment.generation == 1
    assert deployment.desired_spec.version == "15"


async def test_an_unknown_resource_type_name_is_refused_before_any_call(client: BrokerClient) -> None:
    with pytest.raises(ValueError, match="unknown resource type 'queue'"):
        await client.get_resource_state(NS, resource_type="queue")


async def first_message(client: BrokerClient, **kwargs: Any) -> pb.WatchDriftResponse:
    """The first message ``watch_drift`` yields (heartbeats included)."""
    async with contextlib.aclosing(client.watch_drift(heartbeats=True, **kwargs)) as stream:
        async for message in stream:
            return message
    raise AssertionError("the stream ended without a message")


async def test_watch_drift_raises_typed_errors_it_cannot_resume_from(client: BrokerClient) -> None:
    # A resume point the log does not hold: OutOfRange, raised rather than silently retried.
    with pytest.raises(errors.BrokerError) as info:
        await first_message(client, after_sequence=5)
    assert_typed(
        info.value, errors.OutOfRange, grpc.StatusCode.OUT_OF_RANGE, "sequence 5", "re-read the state"
    )

    with pytest.raises(errors.BrokerError) as info:
        await first_message(client, after_sequence=-1)
    assert_typed(info.value, errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT, "after_sequence")

    with pytest.raises(errors.BrokerError) as info:
        await first_message(client, namespaces=["team-other"])
    assert_typed(info.value, errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED, "team-other")

    # A live-only stream starts with a heartbeat naming where it starts.
    message = await first_message(client, namespaces=[NS])
    assert message.WhichOneof("message") == "heartbeat"
    assert message.heartbeat.sequence == 0


# Round trip and idempotency -----------------------------------------------------------------------


async def test_provision_read_and_deprovision_round_trip_on_the_sandbox(
    cluster_broker: RunningBroker,
) -> None:
    async with await BrokerClient.connect(cluster_broker.grpc_target, token=PLATFORM_TOKEN) as client:
        reply = await client.provision(
            namespace=NS,
            resource_type="database",
            resource_name="billing-db",
            engine="postgresql",
            version="15",
            size="medium",
            replicas=1,
        )
        assert reply.deployment_id.startswith("deploy-")
        assert reply.generation == 1
        assert reply.phase in (pb.STATE_PENDING, pb.STATE_PROVISIONING)
        assert reply.operation.type == pb.OPERATION_TYPE_PROVISION

        async def state() -> list[pb.ResourceState]:
            return await client.get_resource_state(NS, deployment_id=reply.deployment_id)

        [ready] = await until(
            state,
            lambda s: len(s) == 1 and s[0].phase == pb.STATE_READY,
            within=30,
            what="billing-db to be Ready",
        )
        assert ready.resource_name == "billing-db"
        assert ready.namespace == NS
        assert ready.resource_type == pb.RESOURCE_TYPE_DATABASE
        assert ready.desired_spec.engine == "postgresql"
        assert ready.desired_spec.version == "15"
        assert ready.desired_spec.size == "medium"
        assert ready.endpoint == f"billing-db.{NS}.svc.cluster.local"
        # Filters by type name and by resource name go through.
        assert [s.deployment_id for s in await client.get_resource_state(NS, resource_type="database")] == [
            reply.deployment_id
        ]
        assert await client.get_resource_state(NS, resource_type="cache") == []
        assert [s.deployment_id for s in await client.get_resource_state(NS, resource_name="billing-db")] == [
            reply.deployment_id
        ]

        deployment = await client.get_deployment(NS, reply.deployment_id)
        assert deployment.deployment_id == reply.deployment_id
        assert deployment.resource_name == "billing-db"
        assert deployment.phase == pb.STATE_READY
        assert deployment.last_operation.state == pb.OPERATION_STATE_SUCCEEDED
        assert deployment.desired_spec.replicas == 1

        gone = await client.deprovision(NS, reply.deployment_id)
        assert gone.deployment_id == reply.deployment_id
        assert gone.operation.type == pb.OPERATION_TYPE_DEPROVISION
        assert gone.phase in (pb.STATE_DELETING, pb.STATE_DELETED)

        async def phase() -> int:
            return (await client.get_deployment(NS, reply.deployment_id)).phase

        await until(phase, lambda p: p == pb.STATE_DELETED, within=30, what="billing-db to be Deleted")
        deleted = await client.get_deployment(NS, reply.deployment_id)
        assert deleted.last_operation.type == pb.OPERATION_TYPE_DEPROVISION
        assert deleted.last_operation.state == pb.OPERATION_STATE_SUCCEEDED


async def test_provision_twice_with_one_request_id_returns_the_same_deployment(client: BrokerClient) -> None:
    kwargs: dict[str, Any] = {
        "namespace": NS,
        "resource_type": "cache",
        "resource_name": "session-cache",
        "engine": "redis",
        "version": "7",
        "size": "small",
        "request_id": "5b0c7d0e-1b1f-4a53-9a39-3c0e0fd9a001",
    }
    first = await client.provision(**kwargs)
    second = await client.provision(**kwargs)

    assert second.deployment_id == first.deployment_id
    assert second.generation == first.generation == 1
    assert second.operation.operation_id == first.operation.operation_id
    states = await client.get_resource_state(NS)
    assert [s.deployment_id for s in states] == [first.deployment_id]

    # Without a request id the client makes one up per call; the same spec is still a no-op.
    third = await client.provision(**{**kwargs, "request_id": None})
    assert third.deployment_id == first.deployment_id
    assert third.generation == 1


async def test_another_principal_cannot_read_a_deployment_by_id(
    running_broker: RunningBroker, client: BrokerClient
) -> None:
    reply = await client.provision(
        namespace=NS,
        resource_type="database",
        resource_name="private-db",
        engine="postgresql",
        version="15",
        size="small",
    )
    async with await BrokerClient.connect(running_broker.grpc_target, token=OTHER_TOKEN) as other:
        with pytest.raises(errors.PermissionDenied):
            await other.get_deployment(NS, reply.deployment_id)
        # In its own namespace the id simply does not exist.
        with pytest.raises(errors.NotFound):
            await other.get_deployment("team-other", reply.deployment_id)


# Retries ------------------------------------------------------------------------------------------


class FlakyBroker(broker_pb2_grpc.BrokerServiceServicer):
    """Answers UNAVAILABLE to the first ``failures`` calls of each method, then succeeds."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.attempts: collections.Counter[str] = collections.Counter()
        self.requests: dict[str, list[Any]] = collections.defaultdict(list)
        self.tokens: list[str] = []

    async def _maybe_fail(self, method: str, request: Any, context: grpc.aio.ServicerContext) -> None:
        self.attempts[method] += 1
        self.requests[method].append(request)
        self.tokens.append(dict(context.invocation_metadata() or ()).get("authorization", ""))
        if self.attempts[method] <= self.failures:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, f"{method} attempt {self.attempts[method]} failed"
            )

    async def GetDeployment(
        self, request: pb.GetDeploymentRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetDeploymentResponse:
        await self._maybe_fail("GetDeployment", request, context)
        return pb.GetDeploymentResponse(
            deployment=pb.Deployment(
                deployment_id=request.deployment_id, namespace=request.namespace, phase=pb.STATE_READY
            )
        )

    async def Provision(
        self, request: pb.ProvisionRequest, context: grpc.aio.ServicerContext
    ) -> pb.ProvisionResponse:
        await self._maybe_fail("Provision", request, context)
        return pb.ProvisionResponse(deployment_id="deploy-0123456789ab", phase=pb.STATE_PENDING, generation=1)

    async def AcceptDrift(
        self, request: pb.AcceptDriftRequest, context: grpc.aio.ServicerContext
    ) -> pb.AcceptDriftResponse:
        await self._maybe_fail("AcceptDrift", request, context)
        return pb.AcceptDriftResponse(deployment=pb.Deployment(deployment_id=request.deployment_id))


async def _serve(servicer: FlakyBroker) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    broker_pb2_grpc.add_BrokerServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture
async def flaky() -> AsyncIterator[Callable[[int], Awaitable[tuple[FlakyBroker, str]]]]:
    servers: list[grpc.aio.Server] = []

    async def start(failures: int) -> tuple[FlakyBroker, str]:
        servicer = FlakyBroker(failures)
        server, target = await _serve(servicer)
        servers.append(server)
        return servicer, target

    try:
        yield start
    finally:
        for server in servers:
            await server.stop(None)


@pytest.mark.parametrize("failures", [1, 3])
async def test_an_idempotent_read_is_retried_on_unavailable_until_it_succeeds(
    flaky: Callable[[int], Awaitable[tuple[FlakyBroker, str]]], failures: int
) -> None:
    servicer, target = await flaky(failures)
    async with await BrokerClient.connect(target, token=PLATFORM_TOKEN) as client:
        deployment = await client.get_deployment(NS, "deploy-0123456789ab")

    assert deployment.deployment_id == "deploy-0123456789ab"
    assert deployment.phase == pb.STATE_READY
    assert servicer.attempts["GetDeployment"] == failures + 1
    assert servicer.tokens == [f"Bearer {PLATFORM_TOKEN}"] * (failures + 1)


async def test_retries_stop_at_the_configured_maximum_and_raise_unavailable(
    flaky: Callable[[int], Awaitable[tuple[FlakyBroker, str]]],
) -> None:
    servicer, target = await flaky(1000)
    async with await BrokerClient.connect(target, token=PLATFORM_TOKEN) as client:
        with pytest.raises(errors.BrokerError) as info:
            await client.get_deployment(NS, "deploy-0123456789ab")

    assert_typed(info.value, errors.Unavailable, grpc.StatusCode.UNAVAILABLE, "GetDeployment attempt 5")
    assert servicer.attempts["GetDeployment"] == 5  # maxAttempts of the service config


async def test_a_retried_provision_resends_the_same_request_id(
    flaky: Callable[[int], Awaitable[tuple[FlakyBroker, str]]],
) -> None:
    servicer, target = await flaky(2)
    async with await BrokerClient.connect(target, token=PLATFORM_TOKEN) as client:
        reply = await client.provision(
            namespace=NS,
            resource_type="database",
            resource_name="retried-db",
            engine="postgresql",
            version="15",
            size="medium",
        )

    assert reply.deployment_id == "deploy-0123456789ab"
    assert servicer.attempts["Provision"] == 3
    ids = {r.request_id for r in servicer.requests["Provision"]}
    assert len(ids) == 1, ids  # one generated id, sent on every attempt
    assert next(iter(ids))


async def test_accept_drift_is_not_idempotent_and_is_not_retried(
    flaky: Callable[[int], Awaitable[tuple[FlakyBroker, str]]],
) -> None:
    servicer, target = await flaky(1)
    async with await BrokerClient.connect(target, token=PLATFORM_TOKEN) as client:
        with pytest.raises(errors.BrokerError) as info:
            await client.accept_drift(NS, "deploy-0123456789ab", ["replicas"])
        assert_typed(info.value, errors.Unavailable, grpc.StatusCode.UNAVAILABLE, "AcceptDrift attempt 1")
        assert servicer.attempts["AcceptDrift"] == 1

        # The caller decides to try again, and then it goes through.
        reply = await client.accept_drift(NS, "deploy-0123456789ab", ["replicas"])
    assert reply.deployment.deployment_id == "deploy-0123456789ab"
    assert servicer.attempts["AcceptDrift"] == 2


async def test_an_unreachable_broker_is_unavailable_within_the_deadline() -> None:
    # A port nothing listens on: bind one, note it, close it.
    server = grpc.aio.server()
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await server.stop(None)
    async with await BrokerClient.connect(f"127.0.0.1:{port}", token=PLATFORM_TOKEN, deadline=5.0) as client:
        with pytest.raises((errors.Unavailable, errors.DeadlineExceeded)) as info:
            await client.get_resource_state(NS)
    assert isinstance(info.value, errors.BrokerError)
    assert info.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)

"""The client library (``broker_client.client.BrokerClient``) against real brokers.

- typed errors: every failed call surfaces as the right ``broker_client.errors`` subclass, with the
  gRPC code and the broker's readable message;
- the unary round trip (provision, get_resource_state, get_deployment, deprovision) and the
  idempotency of ``request_id``;
- retries: the channel's service config retries UNAVAILABLE for idempotent calls only. A tiny
  in-test gRPC server that fails the first calls proves it by counting server-side attempts;
- pages (``Page``: items, next_page_token, total) and enum arguments, which take the seed's
  spelling or the proto value alike, and refuse anything else before a call is made.
"""

from __future__ import annotations

import collections
import contextlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
import pytest
from broker_client import errors
from broker_client.client import BrokerClient, Page
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
    assert (await client.get_resource_state(NS)).items == ()


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

        async def state() -> Page[pb.ResourceState]:
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
        assert not await client.get_resource_state(NS, resource_type="cache")
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

    async def Deprovision(
        self, request: pb.DeprovisionRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeprovisionResponse:
        await self._maybe_fail("Deprovision", request, context)
        return pb.DeprovisionResponse(deployment_id=request.deployment_id, phase=pb.STATE_DELETING)

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


# Pages ------------------------------------------------------------------------------------------


async def test_get_resource_state_returns_pages_with_a_total_and_reads_every_page_by_default(
    client: BrokerClient,
) -> None:
    for name in ("cache-a", "cache-b", "cache-c"):
        await client.provision(
            namespace=NS, resource_type="cache", resource_name=name, engine="redis", version="7", size="small"
        )

    first = await client.get_resource_state(NS, page_size=2)
    assert isinstance(first, Page)
    assert [s.resource_name for s in first] == ["cache-a", "cache-b"]
    assert (len(first), first.total) == (2, 3)
    assert first.next_page_token
    rest = await client.get_resource_state(NS, page_size=2, page_token=first.next_page_token)
    assert [s.resource_name for s in rest.items] == ["cache-c"]
    assert (rest.next_page_token, rest.total) == ("", 3)

    everything = await client.get_resource_state(NS)
    assert [s.resource_name for s in everything] == ["cache-a", "cache-b", "cache-c"]
    assert (everything.next_page_token, everything.total) == ("", 3)
    assert everything[0].resource_name == "cache-a"
    assert everything == list(everything.items)  # what callers of the list-returning version compared

    none = await client.get_resource_state(NS, resource_name="no-such-cache")
    assert (none.items, none.total, bool(none)) == ((), 0, False)
    with pytest.raises(ValueError, match="page_size must be at least 1"):
        await client.get_resource_state(NS, page_size=0)


async def test_list_drift_events_returns_pages_and_filters_kinds_by_either_spelling(
    cluster_broker: RunningBroker,
) -> None:
    async with await BrokerClient.connect(cluster_broker.grpc_target, token=PLATFORM_TOKEN) as client:
        ids = []
        for name in ("events-a", "events-b"):
            reply = await client.provision(
                namespace=NS,
                resource_type="database",
                resource_name=name,
                engine="postgresql",
                version="15",
                size="small",
            )
            ids.append(reply.deployment_id)
        for deployment_id in ids:
            await client.wait_ready(deployment_id, namespace=NS, timeout=30)

        # Paged by hand, then all at once: the pages are the start of the log (it may have grown since).
        one = await client.list_drift_events(NS, page_size=1)
        assert one.next_page_token
        after = await client.list_drift_events(NS, page_size=1000, page_token=one.next_page_token)
        every = await client.list_drift_events(NS)
        assert isinstance(every, Page)
        assert every.total is None  # the broker does not count events
        assert every.next_page_token == ""
        sequences = [e.sequence for e in every]
        assert sequences == sorted(sequences)
        paged = [e.sequence for e in [*one, *after]]
        assert len(one) == 1
        assert paged == sequences[: len(paged)]

        spellings: list[Any] = [
            "provisioning_succeeded",
            "ProvisioningSucceeded",
            "PROVISIONING-SUCCEEDED",
            "DRIFT_EVENT_KIND_PROVISIONING_SUCCEEDED",
            pb.DRIFT_EVENT_KIND_PROVISIONING_SUCCEEDED,
        ]
        found = [
            sorted(e.deployment_id for e in await client.list_drift_events(NS, kinds=[kind]))
            for kind in spellings
        ]
        assert found == [sorted(ids)] * len(spellings)
        assert not await client.list_drift_events(NS, kinds=["drift_detected"])
        of_b = await client.list_drift_events(NS, deployment_id=ids[1])
        expected = [e.sequence for e in every if e.deployment_id == ids[1]]
        assert expected
        assert [e.sequence for e in of_b][: len(expected)] == expected
        assert {e.deployment_id for e in of_b} == {ids[1]}


# Enum arguments ---------------------------------------------------------------------------------


async def test_enum_arguments_take_the_seed_spelling_and_the_proto_value_alike(client: BrokerClient) -> None:
    first = await client.provision(
        namespace=NS,
        resource_type=pb.RESOURCE_TYPE_CACHE,
        resource_name="enum-cache",
        engine="redis",
        version="7",
        size="small",
    )
    again = await client.provision(
        namespace=NS,
        resource_type="CACHE",
        resource_name="enum-cache",
        engine="redis",
        version="7",
        size="small",
    )
    assert again.deployment_id == first.deployment_id
    for spelling in ("cache", "Cache", "RESOURCE_TYPE_CACHE", pb.RESOURCE_TYPE_CACHE):
        assert [s.deployment_id for s in await client.get_resource_state(NS, resource_type=spelling)] == [
            first.deployment_id
        ], spelling
    for spelling in ("database", pb.RESOURCE_TYPE_DATABASE):
        assert not await client.get_resource_state(NS, resource_type=spelling)
    # The proto's UNSPECIFIED is "no filter", like None.
    assert len(await client.get_resource_state(NS, resource_type=pb.RESOURCE_TYPE_UNSPECIFIED)) == 1

    by_name = await client.set_remediation_policy(NS, mode="alert", resource_type="database")
    assert (by_name.mode, by_name.resource_type) == (pb.REMEDIATION_MODE_ALERT, pb.RESOURCE_TYPE_DATABASE)
    by_value = await client.set_remediation_policy(
        NS, mode=pb.REMEDIATION_MODE_OFF, resource_type=pb.RESOURCE_TYPE_DATABASE, ignore_fields=["replicas"]
    )
    assert by_value.mode == pb.REMEDIATION_MODE_OFF
    current = await client.get_remediation_policy(NS, resource_type="database")
    assert (current.mode, list(current.ignore_fields)) == (pb.REMEDIATION_MODE_OFF, ["replicas"])


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda c: c.get_resource_state(NS, resource_type="queue"),
            "unknown resource type 'queue': use one of 'database', 'cache', 'topic' or a ResourceType value",
        ),
        (lambda c: c.get_resource_state(NS, resource_type=99), "unknown resource type 99"),
        (lambda c: c.get_resource_state(NS, resource_type=True), "unknown resource type True"),
        (lambda c: c.get_resource_state(NS, resource_type=1.0), "unknown resource type 1.0"),
        (
            lambda c: c.provision(
                namespace=NS, resource_type=None, resource_name="x", engine="redis", version="7", size="small"
            ),
            "resource type is required",
        ),
        (
            lambda c: c.set_remediation_policy(NS, mode="sometimes"),
            "unknown mode 'sometimes': use one of 'auto'",
        ),
        (lambda c: c.set_remediation_policy(NS, mode=pb.REMEDIATION_MODE_UNSPECIFIED), "mode is required"),
        (lambda c: c.list_drift_events(NS, kinds=["drift"]), "unknown event kind 'drift'"),
        (lambda c: c.deprovision(NS, UNKNOWN_ID, data_policy="shred"), "unknown data policy 'shred'"),
        (
            lambda c: c.deprovision(NS, UNKNOWN_ID, data_policy="keep", delete_data=True),
            "delete_data=True contradicts data_policy='keep'",
        ),
        (lambda c: anext(c.watch_drift(kinds=[42])), "unknown event kind 42"),
    ],
)
async def test_a_bad_enum_argument_is_a_value_error_before_any_call(
    flaky: Callable[[int], Awaitable[tuple[FlakyBroker, str]]],
    call: Callable[[BrokerClient], Awaitable[Any]],
    message: str,
) -> None:
    servicer, target = await flaky(0)
    async with await BrokerClient.connect(target, token=PLATFORM_TOKEN) as client:
        with pytest.raises(ValueError, match=re.escape(message)):
            await call(client)
    assert sum(servicer.attempts.values()) == 0


@pytest.mark.parametrize(
    ("kwargs", "policy"),
    [
        ({}, pb.DATA_POLICY_KEEP),
        ({"data_policy": "keep"}, pb.DATA_POLICY_KEEP),
        ({"data_policy": "delete"}, pb.DATA_POLICY_DELETE),
        ({"data_policy": pb.DATA_POLICY_DELETE}, pb.DATA_POLICY_DELETE),
        ({"delete_data": True}, pb.DATA_POLICY_DELETE),
    ],
)
async def test_deprovision_sends_the_data_policy_however_it_is_spelled(
    flaky: Callable[[int], Awaitable[tuple[FlakyBroker, str]]], kwargs: dict[str, Any], policy: int
) -> None:
    servicer, target = await flaky(0)
    async with await BrokerClient.connect(target, token=PLATFORM_TOKEN) as client:
        await client.deprovision(NS, "deploy-0123456789ab", **kwargs)
    [request] = servicer.requests["Deprovision"]
    assert request.data_policy == policy

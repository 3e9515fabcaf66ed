"""Provisioning over gRPC as a manager sees it: immediate answers, idempotency, updates, deletion,
and reading the desired state back (GetDeployment, GetResourceState with filters and pages)."""

from __future__ import annotations

import asyncio
import base64
import pathlib
import re

import grpc
import pytest
from broker_client.v1 import broker_pb2 as pb
from broker_client.v1 import broker_pb2_grpc
from conftest import ADMIN_TOKEN, PLATFORM_TOKEN, RunningBroker, bearer, until
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from broker.domain import model
from broker.kube import client as kube_client

NS = "team-platform"
AUTH = bearer(PLATFORM_TOKEN)
DEPLOYMENT_ID = re.compile(r"^deploy-[a-z0-9]+$")


def db_request(name: str = "postgres-app-db", **spec_fields: object) -> pb.ProvisionRequest:
    """A valid database ProvisionRequest for team-platform; ``spec_fields`` override the spec."""
    spec: dict[str, object] = {"engine": "postgresql", "version": "15", "size": "medium"}
    spec.update(spec_fields)
    return pb.ProvisionRequest(
        namespace=NS,
        resource_type=pb.RESOURCE_TYPE_DATABASE,
        resource_name=name,
        spec=pb.ResourceSpec(**spec),  # type: ignore[arg-type]
        callback_url="http://db-manager.platform-system.svc:8080/cb",
    )


async def rpc_error(awaitable: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await awaitable  # type: ignore[misc]
    return info.value


def error_reason(err: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(err)
    assert status is not None, "the error carries no google.rpc.Status"
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason
    raise AssertionError("the error carries no ErrorInfo")


async def get_deployment(stub: broker_pb2_grpc.BrokerServiceStub, deployment_id: str) -> pb.Deployment:
    reply = await stub.GetDeployment(
        pb.GetDeploymentRequest(namespace=NS, deployment_id=deployment_id), metadata=AUTH
    )
    return reply.deployment


# Provision ----------------------------------------------------------------------------------------


async def test_provision_answers_at_once_with_a_pending_deployment(stub, running_broker: RunningBroker):
    reply = await stub.Provision(db_request(), metadata=AUTH)

    assert DEPLOYMENT_ID.match(reply.deployment_id), reply.deployment_id
    assert reply.phase == pb.STATE_PENDING
    assert reply.generation == 1
    assert reply.operation.state == pb.OPERATION_STATE_ACCEPTED
    assert reply.operation.type == pb.OPERATION_TYPE_PROVISION
    assert reply.operation.generation == 1
    assert reply.operation.operation_id
    assert await running_broker.broker.store.count_deployments() == 1


async def test_two_resources_get_different_deployment_ids(stub):
    first = await stub.Provision(db_request("db-one"), metadata=AUTH)
    second = await stub.Provision(db_request("db-two"), metadata=AUTH)

    assert first.deployment_id != second.deployment_id


async def test_same_request_id_replays_the_first_answer(stub, running_broker: RunningBroker):
    request = db_request()
    request.request_id = "7f1c9a52-retry"

    first = await stub.Provision(request, metadata=AUTH)
    second = await stub.Provision(request, metadata=AUTH)

    assert second.deployment_id == first.deployment_id
    assert second.generation == first.generation
    assert second.operation.operation_id == first.operation.operation_id
    assert second == first
    assert await running_broker.broker.store.count_deployments() == 1


async def test_request_id_replay_returns_the_first_answer_even_after_an_update(stub):
    request = db_request()
    request.request_id = "first-request"
    first = await stub.Provision(request, metadata=AUTH)
    updated = await stub.Provision(db_request(size="large"), metadata=AUTH)
    assert updated.generation == 2

    replay = await stub.Provision(request, metadata=AUTH)

    assert replay == first


async def test_concurrent_retries_with_one_request_id_create_one_deployment(
    stub, running_broker: RunningBroker
):
    request = db_request()
    request.request_id = "concurrent-retry"

    replies = await asyncio.gather(*(stub.Provision(request, metadata=AUTH) for _ in range(10)))

    assert len({r.deployment_id for r in replies}) == 1
    assert len({r.operation.operation_id for r in replies}) == 1
    assert await running_broker.broker.store.count_deployments() == 1


async def test_request_id_reused_with_a_different_body_is_already_exists(stub, running_broker: RunningBroker):
    request = db_request()
    request.request_id = "reused-id"
    first = await stub.Provision(request, metadata=AUTH)
    other = db_request(size="large")
    other.request_id = "reused-id"

    err = await rpc_error(stub.Provision(other, metadata=AUTH))

    assert err.code() == grpc.StatusCode.ALREADY_EXISTS
    assert error_reason(err) == "REQUEST_ID_REUSED"
    assert "reused-id" in err.details()
    deployment = await get_deployment(stub, first.deployment_id)
    assert deployment.desired_spec.size == "medium"
    assert deployment.generation == 1
    assert await running_broker.broker.store.count_deployments() == 1


async def test_same_identity_and_spec_is_a_no_op(stub, running_broker: RunningBroker):
    first = await stub.Provision(db_request(), metadata=AUTH)

    again = await stub.Provision(db_request(), metadata=AUTH)

    assert again.deployment_id == first.deployment_id
    assert again.generation == 1
    assert again.operation.operation_id == first.operation.operation_id
    assert await running_broker.broker.store.count_deployments() == 1


async def test_spelling_out_the_defaults_is_the_same_spec(stub):
    first = await stub.Provision(db_request(), metadata=AUTH)

    explicit = await stub.Provision(db_request(replicas=1), metadata=AUTH)

    assert explicit.deployment_id == first.deployment_id
    assert explicit.generation == 1


async def test_a_different_spec_is_an_update_with_generation_2(stub, running_broker: RunningBroker):
    first = await stub.Provision(db_request(), metadata=AUTH)

    update = await stub.Provision(db_request(size="large", replicas=3), metadata=AUTH)

    assert update.deployment_id == first.deployment_id
    assert update.generation == 2
    assert update.phase == pb.STATE_PENDING
    assert update.operation.type == pb.OPERATION_TYPE_UPDATE
    assert update.operation.generation == 2
    assert update.operation.operation_id != first.operation.operation_id
    deployment = await get_deployment(stub, first.deployment_id)
    assert deployment.generation == 2
    assert deployment.desired_spec.size == "large"
    assert deployment.desired_spec.replicas == 3
    assert deployment.desired_spec.resources.storage == "100Gi"
    assert deployment.last_operation.operation_id == update.operation.operation_id
    assert await running_broker.broker.store.count_deployments() == 1


async def test_changing_the_engine_is_failed_precondition(stub):
    first = await stub.Provision(db_request(), metadata=AUTH)

    err = await rpc_error(stub.Provision(db_request(engine="mysql", version="8.0"), metadata=AUTH))

    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(err) == "ENGINE_IMMUTABLE"
    assert "postgresql" in err.details()
    assert "mysql" in err.details()
    deployment = await get_deployment(stub, first.deployment_id)
    assert deployment.desired_spec.engine == "postgresql"
    assert deployment.generation == 1


async def test_get_deployment_returns_the_desired_spec_with_defaults_and_last_operation(stub):
    reply = await stub.Provision(db_request(), metadata=AUTH)

    deployment = await get_deployment(stub, reply.deployment_id)

    assert deployment.deployment_id == reply.deployment_id
    assert deployment.namespace == NS
    assert deployment.resource_type == pb.RESOURCE_TYPE_DATABASE
    assert deployment.resource_name == "postgres-app-db"
    assert deployment.phase == pb.STATE_PENDING
    assert deployment.generation == 1
    assert deployment.callback_url == "http://db-manager.platform-system.svc:8080/cb"
    spec = deployment.desired_spec
    assert (spec.engine, spec.version, spec.size) == ("postgresql", "15", "medium")
    assert spec.HasField("replicas")
    assert spec.replicas == 1
    assert spec.resources == pb.ComputeResources(
        cpu_request="500m", cpu_limit="1", memory_request="1Gi", memory_limit="2Gi", storage="20Gi"
    )
    assert deployment.last_operation.operation_id == reply.operation.operation_id
    assert deployment.last_operation.type == pb.OPERATION_TYPE_PROVISION
    assert deployment.last_operation.state == pb.OPERATION_STATE_ACCEPTED
    assert deployment.create_time.seconds > 0


async def test_get_deployment_of_an_unknown_id_is_not_found(stub):
    err = await rpc_error(
        stub.GetDeployment(
            pb.GetDeploymentRequest(namespace=NS, deployment_id="deploy-000000000000"), metadata=AUTH
        )
    )

    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert "deploy-000000000000" in err.details()


async def test_a_deployment_is_not_found_through_another_namespace(stub):
    reply = await stub.Provision(db_request(), metadata=AUTH)

    err = await rpc_error(
        stub.GetDeployment(
            pb.GetDeploymentRequest(namespace="team-other", deployment_id=reply.deployment_id),
            metadata=bearer(ADMIN_TOKEN),
        )
    )

    assert err.code() == grpc.StatusCode.NOT_FOUND


# Deprovision --------------------------------------------------------------------------------------


async def test_deprovision_moves_to_deleting_and_repeating_it_is_a_no_op(stub):
    reply = await stub.Provision(db_request(), metadata=AUTH)
    request = pb.DeprovisionRequest(namespace=NS, deployment_id=reply.deployment_id)

    first = await stub.Deprovision(request, metadata=AUTH)
    again = await stub.Deprovision(request, metadata=AUTH)

    assert first.deployment_id == reply.deployment_id
    assert first.phase == pb.STATE_DELETING
    assert first.operation.type == pb.OPERATION_TYPE_DEPROVISION
    assert first.operation.state == pb.OPERATION_STATE_ACCEPTED
    assert again.phase == pb.STATE_DELETING
    assert again.operation.operation_id == first.operation.operation_id
    deployment = await get_deployment(stub, reply.deployment_id)
    assert deployment.phase == pb.STATE_DELETING
    assert deployment.last_operation.operation_id == first.operation.operation_id


async def test_deprovision_of_an_unknown_deployment_is_not_found(stub):
    err = await rpc_error(
        stub.Deprovision(
            pb.DeprovisionRequest(namespace=NS, deployment_id="deploy-000000000000"), metadata=AUTH
        )
    )

    assert err.code() == grpc.StatusCode.NOT_FOUND


async def test_provisioning_a_resource_that_is_being_deleted_is_failed_precondition(stub):
    reply = await stub.Provision(db_request(), metadata=AUTH)
    await stub.Deprovision(
        pb.DeprovisionRequest(namespace=NS, deployment_id=reply.deployment_id), metadata=AUTH
    )

    err = await rpc_error(stub.Provision(db_request(), metadata=AUTH))

    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(err) == "DEPLOYMENT_DELETING"
    assert reply.deployment_id in err.details()


# GetResourceState ---------------------------------------------------------------------------------


async def resource_state(stub, **fields: object) -> pb.GetResourceStateResponse:
    return await stub.GetResourceState(pb.GetResourceStateRequest(namespace=NS, **fields), metadata=AUTH)


async def test_resource_state_shows_the_desired_side_only(stub):
    reply = await stub.Provision(db_request(), metadata=AUTH)

    state = await resource_state(stub)

    assert state.total == 1
    assert state.namespace == NS
    assert state.next_page_token == ""
    [resource] = state.resources
    assert resource.deployment_id == reply.deployment_id
    assert resource.resource_type == pb.RESOURCE_TYPE_DATABASE
    assert resource.resource_name == "postgres-app-db"
    assert resource.namespace == NS
    assert resource.phase == pb.STATE_PENDING
    assert resource.generation == 1
    assert resource.desired_spec.engine == "postgresql"
    assert resource.desired_spec.version == "15"
    assert resource.desired_spec.replicas == 1
    assert resource.message
    # Nothing has been observed yet, so nothing of the actual side is invented.
    assert not resource.HasField("actual_spec")
    assert not resource.HasField("last_checked")
    assert not resource.HasField("resource_usage")
    assert not resource.HasField("estimated_monthly_cost")
    assert resource.health_status == pb.HEALTH_STATUS_UNKNOWN  # not known: said, not left out
    assert resource.drift_detected is False
    assert list(resource.drift_details) == []
    assert list(resource.drift_items) == []


@pytest.mark.parametrize(
    ("resource_type", "engine", "version", "port"),
    [
        (pb.RESOURCE_TYPE_DATABASE, "postgresql", "15", 5432),
        (pb.RESOURCE_TYPE_DATABASE, "mysql", "8.0", 3306),
        (pb.RESOURCE_TYPE_CACHE, "redis", "7.2", 6379),
    ],
)
async def test_resource_state_gives_connection_details(stub, resource_type, engine, version, port):
    await stub.Provision(
        pb.ProvisionRequest(
            namespace=NS,
            resource_type=resource_type,
            resource_name="app-store",
            spec=pb.ResourceSpec(engine=engine, version=version, size="small"),
        ),
        metadata=AUTH,
    )

    [resource] = (await resource_state(stub)).resources

    assert resource.endpoint == f"app-store.{NS}.svc.cluster.local"
    assert resource.port == port
    assert resource.connection_secret == "app-store-credentials"


async def test_deleting_resources_are_listed_as_deleting(stub):
    reply = await stub.Provision(db_request(), metadata=AUTH)
    await stub.Deprovision(
        pb.DeprovisionRequest(namespace=NS, deployment_id=reply.deployment_id), metadata=AUTH
    )

    [resource] = (await resource_state(stub)).resources

    assert resource.phase == pb.STATE_DELETING


async def seed_resources(stub) -> dict[str, str]:
    """Two databases and a cache in team-platform, one database elsewhere; name -> deployment id."""
    ids = {}
    for name in ("orders-db", "users-db"):
        ids[name] = (await stub.Provision(db_request(name), metadata=AUTH)).deployment_id
    cache = pb.ProvisionRequest(
        namespace=NS,
        resource_type=pb.RESOURCE_TYPE_CACHE,
        resource_name="sessions",
        spec=pb.ResourceSpec(engine="redis", version="7", size="small"),
    )
    ids["sessions"] = (await stub.Provision(cache, metadata=AUTH)).deployment_id
    elsewhere = db_request("orders-db")
    elsewhere.namespace = "team-other"
    await stub.Provision(elsewhere, metadata=bearer(ADMIN_TOKEN))
    return ids


async def test_resource_state_lists_only_the_namespace_asked_for(stub):
    ids = await seed_resources(stub)

    state = await resource_state(stub)

    assert state.total == 3
    assert {r.deployment_id for r in state.resources} == set(ids.values())
    assert {r.namespace for r in state.resources} == {NS}


async def test_resource_state_filters_by_type(stub):
    ids = await seed_resources(stub)

    databases = await resource_state(stub, resource_type=pb.RESOURCE_TYPE_DATABASE)
    caches = await resource_state(stub, resource_type=pb.RESOURCE_TYPE_CACHE)
    topics = await resource_state(stub, resource_type=pb.RESOURCE_TYPE_TOPIC)

    assert [r.resource_name for r in databases.resources] == ["orders-db", "users-db"]
    assert databases.total == 2
    assert [r.deployment_id for r in caches.resources] == [ids["sessions"]]
    assert caches.total == 1
    assert list(topics.resources) == []
    assert topics.total == 0


async def test_resource_state_filters_by_name(stub):
    ids = await seed_resources(stub)

    state = await resource_state(stub, resource_name="users-db")

    assert [r.deployment_id for r in state.resources] == [ids["users-db"]]
    assert state.total == 1


async def test_resource_state_filters_by_deployment_id(stub):
    ids = await seed_resources(stub)

    state = await resource_state(stub, deployment_id=ids["sessions"])
    missing = await resource_state(stub, deployment_id="deploy-000000000000")

    assert [r.resource_name for r in state.resources] == ["sessions"]
    assert state.total == 1
    assert list(missing.resources) == []
    assert missing.total == 0


@pytest.mark.parametrize("page_size", [1, 3, 4, 11, 12])
async def test_pagination_visits_every_resource_exactly_once(stub, page_size):
    expected = {}
    for i in range(8):
        expected[(await stub.Provision(db_request(f"db-{i:02d}"), metadata=AUTH)).deployment_id] = i
    for i in range(3):
        cache = pb.ProvisionRequest(
            namespace=NS,
            resource_type=pb.RESOURCE_TYPE_CACHE,
            resource_name=f"cache-{i}",
            spec=pb.ResourceSpec(engine="redis", version="7", size="small"),
        )
        expected[(await stub.Provision(cache, metadata=AUTH)).deployment_id] = i

    seen: list[str] = []
    token = ""
    for _ in range(20):
        page = await resource_state(stub, page_size=page_size, page_token=token)
        assert page.total == 11
        assert len(page.resources) <= page_size
        seen.extend(r.deployment_id for r in page.resources)
        token = page.next_page_token
        if not token:
            break
    else:
        pytest.fail("pagination never ended")

    assert sorted(seen) == sorted(expected)
    assert len(seen) == len(set(seen)) == 11


async def test_default_page_size_returns_everything_on_one_page(stub):
    for i in range(5):
        await stub.Provision(db_request(f"db-{i}"), metadata=AUTH)

    page = await resource_state(stub)

    assert len(page.resources) == 5
    assert page.next_page_token == ""


@pytest.mark.parametrize(
    ("first_filters", "second_filters"),
    [
        pytest.param({"resource_type": pb.RESOURCE_TYPE_DATABASE}, {}, id="filter-dropped"),
        pytest.param({}, {"resource_type": pb.RESOURCE_TYPE_CACHE}, id="filter-added"),
        pytest.param(
            {"resource_type": pb.RESOURCE_TYPE_DATABASE},
            {"resource_type": pb.RESOURCE_TYPE_CACHE},
            id="type-changed",
        ),
        pytest.param(
            {"resource_type": pb.RESOURCE_TYPE_CACHE}, {"resource_name": "cache"}, id="type-became-name"
        ),
    ],
)
async def test_a_page_token_used_with_different_filters_is_invalid_argument(
    stub, first_filters, second_filters
):
    for i in range(3):
        await stub.Provision(db_request(f"db-{i}"), metadata=AUTH)
        cache = pb.ProvisionRequest(
            namespace=NS,
            resource_type=pb.RESOURCE_TYPE_CACHE,
            resource_name=f"cache-{i}",
            spec=pb.ResourceSpec(engine="redis", version="7", size="small"),
        )
        await stub.Provision(cache, metadata=AUTH)
    first = await resource_state(stub, page_size=1, **first_filters)
    assert first.next_page_token

    err = await rpc_error(
        resource_state(stub, page_size=1, page_token=first.next_page_token, **second_filters)
    )

    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "page_token" in err.details()


async def test_a_page_token_from_another_namespace_is_invalid_argument(stub):
    for i in range(2):
        await stub.Provision(db_request(f"db-{i}"), metadata=AUTH)
    first = await resource_state(stub, page_size=1)

    err = await rpc_error(
        stub.GetResourceState(
            pb.GetResourceStateRequest(namespace="team-other", page_size=1, page_token=first.next_page_token),
            metadata=bearer(ADMIN_TOKEN),
        )
    )

    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    "token",
    [
        pytest.param("not-a-token", id="words"),
        pytest.param("A" * 4096, id="too-long"),
        pytest.param(base64.urlsafe_b64encode(b"[" * 100_000).decode(), id="deeply-nested"),
        pytest.param(base64.urlsafe_b64encode(b'["q", "after"]').decode(), id="a-list"),
    ],
)
async def test_a_made_up_page_token_is_invalid_argument(stub, token):
    err = await rpc_error(resource_state(stub, page_token=token))

    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "page_token" in err.details()


# Drift history ------------------------------------------------------------------------------------


async def test_drift_event_pages_visit_every_event_once_and_their_tokens_fit_only_their_query(
    stub, running_broker: RunningBroker
):
    reply = await stub.Provision(db_request(), metadata=AUTH)
    store = running_broker.broker.store
    deployment = await store.deployment_by_id(reply.deployment_id)
    assert deployment is not None
    await store.append_events(
        [
            model.DriftEvent.about(deployment, model.EventKind.REMEDIATION_FAILED, f"event {i}", health=None)
            for i in range(5)
        ]
    )
    kinds = [pb.DRIFT_EVENT_KIND_REMEDIATION_FAILED]

    async def events(**fields: object) -> pb.ListDriftEventsResponse:
        return await stub.ListDriftEvents(pb.ListDriftEventsRequest(namespace=NS, **fields), metadata=AUTH)

    seen: list[str] = []
    token = ""
    for _ in range(10):
        page = await events(kinds=kinds, page_size=2, page_token=token)
        seen.extend(e.message for e in page.events)
        token = page.next_page_token
        if not token:
            break
    assert seen == [f"event {i}" for i in range(5)]

    first = await events(kinds=kinds, page_size=2)
    assert first.next_page_token
    for fields in (
        {"page_token": first.next_page_token},  # the kinds dropped
        {"kinds": kinds, "after_sequence": 1, "page_token": first.next_page_token},
        {"kinds": kinds, "page_token": "not-a-token"},
    ):
        err = await rpc_error(events(**fields))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "page_token" in err.details()


async def test_list_drift_events_is_empty_before_anything_was_observed(stub):
    await stub.Provision(db_request(), metadata=AUTH)

    reply = await stub.ListDriftEvents(pb.ListDriftEventsRequest(namespace=NS), metadata=AUTH)

    assert list(reply.events) == []
    assert reply.next_page_token == ""


async def test_deprovision_with_a_request_id_replays_and_refuses_reuse(stub):
    reply = await stub.Provision(db_request(), metadata=AUTH)
    request = pb.DeprovisionRequest(
        namespace=NS,
        deployment_id=reply.deployment_id,
        data_policy=pb.DATA_POLICY_DELETE,
        request_id="delete-once",
    )

    first = await stub.Deprovision(request, metadata=AUTH)
    replay = await stub.Deprovision(request, metadata=AUTH)
    reuse = db_request("another-db")
    reuse.request_id = "delete-once"
    err = await rpc_error(stub.Provision(reuse, metadata=AUTH))

    assert replay == first
    assert first.phase == pb.STATE_DELETING
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS
    assert error_reason(err) == "REQUEST_ID_REUSED"


async def test_a_namespace_the_cluster_lacks_is_said_in_words_then_provisioning_goes_on_once_it_exists(
    cluster_broker: RunningBroker, sandbox_kubeconfig: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with grpc.aio.insecure_channel(cluster_broker.grpc_target) as channel:
        stub = broker_pb2_grpc.BrokerServiceStub(channel)
        reply = await stub.Provision(
            pb.ProvisionRequest(
                namespace="no-such-ns",
                resource_type=pb.RESOURCE_TYPE_DATABASE,
                resource_name="lost-db",
                spec=pb.ResourceSpec(engine="postgresql", version="15", size="small", replicas=1),
            ),
            metadata=bearer(ADMIN_TOKEN),
        )
        words = "namespace no-such-ns does not exist in the cluster"

        async def deployment() -> pb.Deployment:
            got = await stub.GetDeployment(
                pb.GetDeploymentRequest(namespace="no-such-ns", deployment_id=reply.deployment_id),
                metadata=bearer(ADMIN_TOKEN),
            )
            return got.deployment

        found = await until(deployment, lambda d: words in d.last_operation.message, within=10, what=words)
        assert found.phase == pb.STATE_PROVISIONING
        state = await stub.GetResourceState(
            pb.GetResourceStateRequest(namespace="no-such-ns", deployment_id=reply.deployment_id),
            metadata=bearer(ADMIN_TOKEN),
        )
        assert words in state.resources[0].message
        assert any(words in str(getattr(r, "reason", "")) for r in caplog.records), "not in the logs"

        # Created meanwhile (a GitOps sync, say): the retry goes through.
        client = await kube_client.Client.connect(sandbox_kubeconfig)
        try:
            await client.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "no-such-ns"}})
        finally:
            await client.close()
        done = await until(deployment, lambda d: d.phase == pb.STATE_READY, within=20, what="Ready")
        assert done.last_operation.state == pb.OPERATION_STATE_SUCCEEDED

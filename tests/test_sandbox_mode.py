"""The broker in sandbox mode across restarts: the sandbox's objects live in the data dir, so a
restart is a restart (the database is still Ready, its Secret the same object, no drift).
"""

from __future__ import annotations

import asyncio
import pathlib

import grpc
import pytest
from broker_client.v1 import broker_pb2 as pb
from broker_client.v1 import broker_pb2_grpc
from conftest import PLATFORM_TOKEN, bearer, until
from kubernetes_asyncio import client, config

from broker import server
from broker.domain import model

PLATFORM = "team-platform"


def _broker_settings(data_dir: pathlib.Path, tokens: pathlib.Path) -> server.Settings:
    return server.Settings(
        grpc_addr="127.0.0.1:0",
        http_addr="127.0.0.1:0",
        data_dir=data_dir,
        tokens_file=tokens,
        shutdown_grace=1.0,
        sandbox=True,
        ready_timeout=20.0,
        remediate=False,
    )


async def _state(stub: broker_pb2_grpc.BrokerServiceStub, deployment_id: str) -> pb.ResourceState | None:
    reply = await stub.GetResourceState(
        pb.GetResourceStateRequest(namespace=PLATFORM, deployment_id=deployment_id),
        metadata=bearer(PLATFORM_TOKEN),
    )
    return reply.resources[0] if reply.resources else None


def _ready_and_healthy(state: pb.ResourceState | None) -> bool:
    return (
        state is not None
        and state.phase == pb.STATE_READY
        and state.health_status == pb.HEALTH_STATUS_HEALTHY
    )


async def _secrets(kubeconfig: pathlib.Path) -> dict[str, str]:
    configuration = client.Configuration()
    await config.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)
    async with client.ApiClient(configuration) as api:
        listed = await client.CoreV1Api(api).list_namespaced_secret(PLATFORM)
    return {s.metadata.name: s.metadata.uid for s in listed.items}


@pytest.mark.slow
async def test_a_database_is_still_ready_after_the_broker_restarts_in_sandbox_mode(
    tmp_path: pathlib.Path, tokens_file: pathlib.Path
) -> None:
    data_dir = tmp_path / "data"
    broker = server.Broker(_broker_settings(data_dir, tokens_file))
    await broker.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{broker.grpc_port}") as channel:
            stub = broker_pb2_grpc.BrokerServiceStub(channel)
            reply = await stub.Provision(
                pb.ProvisionRequest(
                    namespace=PLATFORM,
                    resource_type=pb.RESOURCE_TYPE_DATABASE,
                    resource_name="orders",
                    spec=pb.ResourceSpec(engine="postgresql", version="15", size="medium"),
                ),
                metadata=bearer(PLATFORM_TOKEN),
            )
            deployment_id = reply.deployment_id
            # Judged by the detector, not only Ready: a read just before its first verdict is
            # evaluated on the spot and has no first-seen times (detect_time), which the items
            # after the restart, restored from the store, do have (a race that failed under load).
            ready = await until(
                lambda: _state(stub, deployment_id),
                lambda s: (
                    _ready_and_healthy(s)
                    and s is not None
                    and bool(s.drift_items)
                    and all(i.HasField("detect_time") for i in s.drift_items)
                ),
                within=30,
                what="the database to be Ready and judged by the detector",
            )
            assert ready is not None
            items_before = list(ready.drift_items)
        secrets_before = await _secrets(data_dir / "sandbox.kubeconfig")
        assert secrets_before, "the broker created no Secret"
    finally:
        await broker.stop()
    assert (data_dir / "sandbox" / "state.json").exists()

    broker = server.Broker(_broker_settings(data_dir, tokens_file))
    await broker.start()
    try:
        assert broker.cluster is not None
        assert broker.detector is not None
        assert await broker.cluster.wait_synced(10.0)
        # The Secret the broker created is still there, the same object (read through the new API).
        assert await _secrets(data_dir / "sandbox.kubeconfig") == secrets_before
        # The detector has looked at the database since the restart, and found nothing amiss.
        detector = broker.detector
        key = (PLATFORM, model.ResourceType.DATABASE.value)
        await until(
            lambda: asyncio.sleep(0, detector.open_drifts()),
            lambda drifts: key in drifts,
            within=20,
            what="the detector to evaluate the database after the restart",
        )
        assert detector.open_drifts()[key] == 0
        async with grpc.aio.insecure_channel(f"127.0.0.1:{broker.grpc_port}") as channel:
            stub = broker_pb2_grpc.BrokerServiceStub(channel)
            state = await _state(stub, deployment_id)
            assert _ready_and_healthy(state), state
            assert state is not None
            unexpected = [i for i in state.drift_items if i.drift_class != pb.DRIFT_CLASS_EXPECTED]
            assert unexpected == []
            assert list(state.drift_items) == items_before
            history = await stub.ListDriftEvents(
                pb.ListDriftEventsRequest(namespace=PLATFORM, deployment_id=deployment_id, page_size=100),
                metadata=bearer(PLATFORM_TOKEN),
            )
            kinds = [e.kind for e in history.events]
            assert pb.DRIFT_EVENT_KIND_DRIFT_DETECTED not in kinds, history.events
    finally:
        await broker.stop()

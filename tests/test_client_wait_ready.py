"""``BrokerClient.wait_ready`` against a real broker on the sandbox, with the race made deterministic.

The sandbox's readiness fault holds a pod unready for as long as a test wants, so "Ready before the
call", "Ready while it waits" and "Failed" each happen at a moment the test chooses:

- Ready before ``wait_ready`` is called: nothing will ever be published again, so a wait that only
  listened to live events would hang; it must answer from the state it reads first.
- Ready while it waits: it must not have answered before, and must answer once the pod is healed.
- Failed (the broker's ready timeout with a pod that never gets ready): a typed error, while
  waiting and when called afterwards.
"""

from __future__ import annotations

import asyncio
import pathlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from broker_client import errors
from broker_client.client import BrokerClient
from broker_client.v1 import broker_pb2 as pb
from conftest import PLATFORM_TOKEN, RunningBroker, cluster_settings, until
from kube_sandbox import cluster as sandbox_cluster
from kubernetes_asyncio import client as k8s

from broker import server

NS = "team-platform"
NAME = "orders-db"
POD = f"{NAME}-0"


@pytest.fixture
async def client(cluster_broker: RunningBroker) -> AsyncIterator[BrokerClient]:
    async with await BrokerClient.connect(cluster_broker.grpc_target, token=PLATFORM_TOKEN) as c:
        yield c


async def provision(client: BrokerClient, name: str = NAME) -> pb.ProvisionResponse:
    return await client.provision(
        namespace=NS,
        resource_type="database",
        resource_name=name,
        engine="postgresql",
        version="15",
        size="small",
    )


async def phase_of(client: BrokerClient, deployment_id: str) -> int:
    return (await client.get_deployment(NS, deployment_id)).phase


async def subscribers(broker: server.Broker, ok: Callable[[int], bool], what: str) -> None:
    async def streams() -> int:
        return len(broker.hub)

    await until(streams, ok, within=10, what=what)


async def test_a_resource_ready_before_the_call_is_returned_at_once(
    cluster_broker: RunningBroker, client: BrokerClient
) -> None:
    reply = await provision(client)
    await until(
        lambda: phase_of(client, reply.deployment_id),
        lambda p: p == pb.STATE_READY,
        within=30,
        what="Ready",
    )
    await asyncio.sleep(0.2)  # let the log settle: nothing about it is published after this

    started = time.monotonic()
    state = await client.wait_ready(reply.deployment_id, namespace=NS, timeout=10)

    assert time.monotonic() - started < 5
    assert state.deployment_id == reply.deployment_id
    assert state.phase == pb.STATE_READY
    assert state.endpoint == f"{NAME}.{NS}.svc.cluster.local"
    assert state.port == 5432
    assert state.connection_secret
    # Its stream is closed once it answered.
    await subscribers(cluster_broker.broker, lambda n: n == 0, "the stream to be closed")


async def test_a_resource_that_becomes_ready_while_waiting_is_returned_then(
    sandbox: sandbox_cluster.Sandbox, cluster_broker: RunningBroker, client: BrokerClient
) -> None:
    sandbox.faults.fail_readiness(namespace=NS, name=POD)
    reply = await provision(client)
    waiter = asyncio.create_task(client.wait_ready(reply.deployment_id, namespace=NS, timeout=30))
    try:
        await subscribers(cluster_broker.broker, lambda n: n == 1, "wait_ready to subscribe")
        await asyncio.sleep(0.5)
        assert not waiter.done(), waiter
        assert await phase_of(client, reply.deployment_id) == pb.STATE_PROVISIONING

        sandbox.faults.heal_pod(namespace=NS, name=POD)
        state = await asyncio.wait_for(waiter, 30)
    finally:
        waiter.cancel()
    assert state.deployment_id == reply.deployment_id
    assert state.phase == pb.STATE_READY
    assert state.health_status == pb.HEALTH_STATUS_HEALTHY
    # What it returned is what the broker reports now, and the stream is gone.
    [now] = await client.get_resource_state(NS, deployment_id=reply.deployment_id)
    assert now.phase == pb.STATE_READY
    await subscribers(cluster_broker.broker, lambda n: n == 0, "the stream to be closed")


async def test_a_drifted_resource_counts_as_provisioned(
    cluster_broker: RunningBroker, client: BrokerClient, kube_api: Any
) -> None:
    reply = await provision(client)
    await client.wait_ready(reply.deployment_id, namespace=NS, timeout=30)
    await k8s.AppsV1Api(kube_api).patch_namespaced_stateful_set_scale(
        NAME, NS, {"spec": {"replicas": 3}}
    )  # remediation is off in this broker: the drift stays
    await until(
        lambda: phase_of(client, reply.deployment_id),
        lambda p: p == pb.STATE_DRIFT_DETECTED,
        within=30,
        what="DriftDetected",
    )

    state = await client.wait_ready(reply.deployment_id, namespace=NS, timeout=10)

    assert state.phase == pb.STATE_DRIFT_DETECTED
    assert "Replica count mismatch: desired=1, actual=3" in state.drift_details


async def test_waiting_longer_than_the_timeout_is_a_wait_timeout_and_a_timeout_error(
    sandbox: sandbox_cluster.Sandbox, client: BrokerClient
) -> None:
    sandbox.faults.fail_readiness(namespace=NS, name=POD)
    reply = await provision(client)

    started = time.monotonic()
    with pytest.raises(errors.WaitTimeout) as info:
        await client.wait_ready(reply.deployment_id, namespace=NS, timeout=0.5)

    assert time.monotonic() - started < 5
    assert isinstance(info.value, TimeoutError)
    assert isinstance(info.value, errors.BrokerError)
    assert info.value.deployment_id == reply.deployment_id
    assert reply.deployment_id in str(info.value)
    assert "0.5 s" in str(info.value)


async def test_an_unknown_deployment_is_not_found_and_another_namespace_is_denied(
    client: BrokerClient,
) -> None:
    with pytest.raises(errors.NotFound) as info:
        await client.wait_ready("deploy-000000000000", namespace=NS, timeout=10)
    assert "deploy-000000000000" in str(info.value)

    with pytest.raises(errors.PermissionDenied):
        await client.wait_ready("deploy-000000000000", namespace="team-other", timeout=10)


# Failure: a broker that gives up on readiness after a second ------------------------------------


@pytest.fixture
async def impatient_broker(
    tmp_path: pathlib.Path,
    tokens_file: pathlib.Path,
    sandbox: sandbox_cluster.Sandbox,
    sandbox_kubeconfig: pathlib.Path,
) -> AsyncIterator[RunningBroker]:
    data_dir = tmp_path / "data"
    broker = server.Broker(cluster_settings(data_dir, tokens_file, sandbox_kubeconfig, ready_timeout=1.0))
    await broker.start()
    try:
        assert broker.cluster is not None
        assert await broker.cluster.wait_synced(10.0)
        yield RunningBroker(broker=broker, data_dir=data_dir)
    finally:
        await broker.stop()


async def test_a_resource_that_fails_raises_provisioning_failed_while_waiting_and_after(
    sandbox: sandbox_cluster.Sandbox, impatient_broker: RunningBroker
) -> None:
    sandbox.faults.fail_readiness(namespace=NS, name=POD)
    async with await BrokerClient.connect(impatient_broker.grpc_target, token=PLATFORM_TOKEN) as client:
        reply = await provision(client)

        # While waiting: the broker's ready timeout fails it a second later.
        with pytest.raises(errors.ProvisioningFailed) as info:
            await client.wait_ready(reply.deployment_id, namespace=NS, timeout=30)
        failed = info.value
        assert isinstance(failed, errors.FailedPrecondition)
        assert failed.deployment_id == reply.deployment_id
        assert failed.reason == "PROVISIONING_FAILED"
        assert str(failed).startswith(f"provisioning of {NS}/{NAME} ({reply.deployment_id}) failed: ")
        assert "not ready after 1s" in str(failed)
        assert await phase_of(client, reply.deployment_id) == pb.STATE_FAILED

        # Called afterwards: the same answer, at once.
        started = time.monotonic()
        with pytest.raises(errors.ProvisioningFailed) as again:
            await client.wait_ready(reply.deployment_id, namespace=NS, timeout=10)
        assert time.monotonic() - started < 5
        assert "not ready after 1s" in str(again.value)
        assert "Provisioning failed: " not in str(again.value)  # the reason, said once

"""The seed's whole flow on the sandbox: provision, signed callback, actual state, expected drift."""

from __future__ import annotations

import asyncio
import base64
import json
import time

import aiohttp
import grpc
import pytest
from broker_client.v1 import broker_pb2 as pb
from broker_client.v1 import broker_pb2_grpc
from conftest import PLATFORM_TOKEN, CallbackReceiver, RunningBroker, bearer

from broker import callbacks
from broker.kube import client as kube_client

SEED_REQUEST = {
    "namespace": "team-platform",
    "resourceType": "database",
    "resourceName": "postgres-app-db",
    "spec": {"engine": "postgresql", "version": "15", "size": "medium", "replicas": 1},
}


async def test_the_seed_workflow_end_to_end(
    cluster_broker: RunningBroker, callback_receiver: CallbackReceiver, sandbox_kubeconfig: object
) -> None:
    headers = {"Authorization": f"Bearer {PLATFORM_TOKEN}"}
    async with aiohttp.ClientSession(base_url=cluster_broker.http_url, headers=headers) as http:
        body = dict(SEED_REQUEST, callbackUrl=callback_receiver.url, requestId="seed-1")
        async with http.post("/v1/provision", json=body) as response:
            assert response.status == 202, await response.text()
            deployment_id = (await response.json())["deploymentId"]

        # The manager is called back, once, with a signature it can verify.
        (delivery,) = await callback_receiver.wait_for(1)
        key = (cluster_broker.data_dir / "callback.key").read_bytes().strip()
        assert delivery.signature == callbacks.sign(
            key, delivery.delivery_id, delivery.timestamp, delivery.body
        )
        assert abs(int(delivery.timestamp) - time.time()) < 60
        assert delivery.payload == {
            "deploymentId": deployment_id,
            "status": "Ready",
            "message": "Database is running and healthy",
            "namespace": "team-platform",
            "resourceType": "database",
            "resourceName": "postgres-app-db",
            "generation": 1,
            "endpoint": "postgres-app-db.team-platform.svc.cluster.local",
            "port": 5432,
            "connectionSecret": "postgres-app-db-credentials",
        }

        # The seed's GET /v1/resources, in the seed's shape. Metrics are polled, so wait for usage.
        deadline = time.monotonic() + 15
        while True:
            async with http.get(
                "/v1/resources", params={"namespace": "team-platform", "resourceType": "database"}
            ) as r:
                assert r.status == 200
                text = await r.text()
                listing = json.loads(text)
            usage = listing["resources"][0].get("resourceUsage", {})
            if "cpuUsage" in usage:
                break
            if time.monotonic() > deadline:
                pytest.fail(f"no cpuUsage reported within 15 s: {usage}")
            await asyncio.sleep(0.2)

    assert listing["total"] == 1
    assert listing["namespace"] == "team-platform"
    resource = listing["resources"][0]
    assert resource["deploymentId"] == deployment_id
    assert resource["resourceType"] == "database"
    assert resource["phase"] == "Ready"
    assert resource["healthStatus"] == "Healthy"
    assert resource["message"] == "Database is running and healthy"
    assert resource["endpoint"] == "postgres-app-db.team-platform.svc.cluster.local"
    assert resource["port"] == 5432
    assert resource["connectionSecret"] == "postgres-app-db-credentials"
    assert resource["lastChecked"].endswith("Z")
    assert {k: resource["actualSpec"][k] for k in ("engine", "version", "size", "replicas")} == {
        "engine": "postgresql",
        "version": "15.2",
        "size": "medium",
        "replicas": 1,
    }
    assert {k: resource["desiredSpec"][k] for k in ("engine", "version", "size", "replicas")} == SEED_REQUEST[
        "spec"
    ]
    assert resource["driftDetected"] is True
    assert resource["driftDetails"] == [
        "Version mismatch: desired=15, actual=15.2",
        "This is expected patch version drift",
    ]
    (item,) = resource["driftItems"]
    assert (item["ruleId"], item["driftClass"], item["recommendedAction"]) == (
        "version.patch",
        "Expected",
        "None",
    )
    assert resource["resourceUsage"]["replicas"] == 1
    assert resource["resourceUsage"]["storageUsage"] == "20Gi"
    assert resource["resourceUsage"]["cpuUsage"].endswith("m")
    assert resource["resourceUsage"]["memoryUsage"].endswith("Mi")
    assert resource["estimatedMonthlyCost"] == 45.5

    # The Secret exists in the cluster, and its password appears in no answer.
    kube = await kube_client.Client.connect(sandbox_kubeconfig)  # type: ignore[arg-type]
    try:
        secret = await kube.get("Secret", "team-platform", "postgres-app-db-credentials")
    finally:
        await kube.close()
    password = base64.b64decode(secret["data"]["password"]).decode()
    assert len(password) >= 24
    assert password not in text

    # gRPC says the same.
    async with grpc.aio.insecure_channel(cluster_broker.grpc_target) as channel:
        stub = broker_pb2_grpc.BrokerServiceStub(channel)
        reply = await stub.GetResourceState(
            pb.GetResourceStateRequest(namespace="team-platform", deployment_id=deployment_id),
            metadata=bearer(PLATFORM_TOKEN),
        )
    (state,) = reply.resources
    assert state.phase == pb.STATE_READY
    assert state.health_status == pb.HEALTH_STATUS_HEALTHY
    assert state.actual_spec.version == "15.2"
    assert list(state.drift_details) == resource["driftDetails"]
    assert state.estimated_monthly_cost == 45.5
    assert password not in str(reply)

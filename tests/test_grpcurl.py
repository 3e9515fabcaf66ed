"""What an operator sees with the real grpcurl binary: reflection, describe, calls with a token, errors
with their details, and the standard health service."""

from __future__ import annotations

import asyncio
import json
import pathlib
import sys

import pytest
from conftest import PLATFORM_TOKEN, RunningBroker

GRPCURL = pathlib.Path(sys.executable).parent / "grpcurl"
AUTH_HEADER = f"authorization: Bearer {PLATFORM_TOKEN}"

PROVISION = {
    "namespace": "team-platform",
    "resource_type": "RESOURCE_TYPE_DATABASE",
    "resource_name": "postgres-app-db",
    "spec": {"engine": "postgresql", "version": "15", "size": "medium"},
}


@pytest.fixture(scope="module", autouse=True)
def _grpcurl_is_installed() -> None:
    assert GRPCURL.exists(), f"grpcurl is missing at {GRPCURL}: install the dev extras"


async def grpcurl(broker: RunningBroker, *args: str, data: dict | None = None, token: bool = False):
    """Run grpcurl against the broker; the test's event loop keeps serving while it runs."""
    argv = [str(GRPCURL), "-plaintext", "-max-time", "20"]
    if token:
        argv += ["-H", AUTH_HEADER]
    if data is not None:
        argv += ["-d", json.dumps(data)]
    argv += [broker.grpc_target, *args]
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    return proc.returncode, out.decode(), err.decode()


async def test_list_shows_the_broker_and_health_services(running_broker: RunningBroker):
    code, out, err = await grpcurl(running_broker, "list")

    assert code == 0, err
    services = out.split()
    assert "broker.v1.BrokerService" in services
    assert "grpc.health.v1.Health" in services


async def test_describe_the_service_shows_every_rpc(running_broker: RunningBroker):
    code, out, err = await grpcurl(running_broker, "describe", "broker.v1.BrokerService")

    assert code == 0, err
    assert "broker.v1.BrokerService is a service" in out
    for rpc in (
        "Provision",
        "GetResourceState",
        "WatchDrift",
        "Deprovision",
        "GetDeployment",
        "ListDriftEvents",
    ):
        assert f"rpc {rpc} (" in out, rpc
    assert "returns ( stream .broker.v1.WatchDriftResponse )" in out


async def test_describe_resource_state_shows_its_fields(running_broker: RunningBroker):
    code, out, err = await grpcurl(running_broker, "describe", "broker.v1.ResourceState")

    assert code == 0, err
    assert "broker.v1.ResourceState is a message" in out
    for field in (
        "string deployment_id = 1;",
        ".broker.v1.ResourceType resource_type = 2;",
        ".broker.v1.State phase = 5;",
        "int32 port = 10;",
        "string connection_secret = 11;",
        ".broker.v1.ResourceSpec actual_spec = 12;",
        ".broker.v1.ResourceSpec desired_spec = 13;",
        "repeated string drift_details = 15;",
        "optional double estimated_monthly_cost = 18;",
    ):
        assert field in out, field


async def test_provision_and_get_resource_state_with_a_token(running_broker: RunningBroker):
    code, out, err = await grpcurl(
        running_broker, "broker.v1.BrokerService/Provision", data=PROVISION, token=True
    )
    assert code == 0, err
    provisioned = json.loads(out)
    assert provisioned["deployment_id"].startswith("deploy-")
    assert provisioned["phase"] == "STATE_PENDING"
    assert provisioned["operation"]["state"] == "OPERATION_STATE_ACCEPTED"

    code, out, err = await grpcurl(
        running_broker,
        "broker.v1.BrokerService/GetResourceState",
        data={"namespace": "team-platform", "resource_type": "RESOURCE_TYPE_DATABASE"},
        token=True,
    )
    assert code == 0, err
    state = json.loads(out)
    assert state["total"] == 1
    [resource] = state["resources"]
    assert resource["deployment_id"] == provisioned["deployment_id"]
    assert resource["endpoint"] == "postgres-app-db.team-platform.svc.cluster.local"
    assert resource["port"] == 5432
    assert resource["desired_spec"]["replicas"] == 1
    assert await running_broker.broker.store.count_deployments() == 1


async def test_a_call_without_a_token_shows_unauthenticated(running_broker: RunningBroker):
    code, out, err = await grpcurl(
        running_broker, "broker.v1.BrokerService/GetResourceState", data={"namespace": "team-platform"}
    )

    assert code != 0
    assert "Code: Unauthenticated" in err
    assert "authorization: Bearer" in err
    assert out.strip() == ""


async def test_bad_input_shows_the_field_violations(running_broker: RunningBroker):
    code, _, err = await grpcurl(
        running_broker,
        "broker.v1.BrokerService/Provision",
        data={**PROVISION, "resource_name": "Bad_Name"},
        token=True,
    )

    assert code != 0
    assert "Code: InvalidArgument" in err
    assert "google.rpc.BadRequest" in err
    assert '"field":"resource_name"' in err.replace(" ", "")
    assert await running_broker.broker.store.count_deployments() == 0


async def test_health_check_says_serving(running_broker: RunningBroker):
    code, out, err = await grpcurl(running_broker, "grpc.health.v1.Health/Check")
    named_code, named_out, named_err = await grpcurl(
        running_broker, "grpc.health.v1.Health/Check", data={"service": "broker.v1.BrokerService"}
    )

    assert code == 0, err
    assert json.loads(out) == {"status": "SERVING"}
    assert named_code == 0, named_err
    assert json.loads(named_out) == {"status": "SERVING"}

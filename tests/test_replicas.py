"""Two replicas on one PostgreSQL store, a leader and a follower, both serving reads.

Each replica runs its own informers on the sandbox, over real HTTP; only the leader runs the
detector. A follower answers GetResourceState by evaluating its own caches with the policies in the
store, emitting nothing: its verdicts must be as current as the leader's, for a hand edit made in
the cluster and for a policy set through the other replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import pathlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import grpc
import pytest
from broker_client.v1 import broker_pb2 as pb
from broker_client.v1 import broker_pb2_grpc
from conftest import ADMIN_TOKEN, bearer, cluster_settings, until

from broker import server
from broker.domain import model
from broker.kube import lease

NS = "team-platform"
FAST = dict(lease_duration=3, renew_deadline=2, retry_period=0.25)


def elected(identity: str, **timing: float) -> lease.ElectionSettings:
    return lease.ElectionSettings(enabled=True, namespace="default", identity=identity, **{**FAST, **timing})  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def replica(
    tmp_path: pathlib.Path,
    tokens_file: pathlib.Path,
    kubeconfig: pathlib.Path,
    url: str,
    identity: str,
    **timing: float,
) -> AsyncIterator[tuple[server.Broker, broker_pb2_grpc.BrokerServiceStub]]:
    settings = cluster_settings(
        tmp_path / identity,
        tokens_file,
        kubeconfig,
        store_url=url,
        leader_election=elected(identity, **timing),
    )
    broker = server.Broker(settings)
    await broker.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{broker.grpc_port}") as channel:
            yield broker, broker_pb2_grpc.BrokerServiceStub(channel)
    finally:
        await broker.stop()


@pytest.fixture
async def pair(
    tmp_path, tokens_file, sandbox, sandbox_kubeconfig, postgres_url
) -> AsyncIterator[tuple[broker_pb2_grpc.BrokerServiceStub, broker_pb2_grpc.BrokerServiceStub]]:
    """(leader, follower): replica-a leads before replica-b starts."""
    async with replica(tmp_path, tokens_file, sandbox_kubeconfig, postgres_url, "replica-a") as (a, leader):
        await until(lambda: asyncio.sleep(0, a.leader_only.running), bool, within=20, what="a to lead")
        async with replica(tmp_path, tokens_file, sandbox_kubeconfig, postgres_url, "replica-b") as (
            b,
            follower,
        ):
            assert b.cluster is not None
            assert await b.cluster.wait_synced(10.0)
            assert not b.leader_only.running
            yield leader, follower
            assert a.leader_only.running  # nobody changed hands meanwhile
            assert not b.leader_only.running


async def state(stub: broker_pb2_grpc.BrokerServiceStub, name: str) -> pb.ResourceState:
    reply = await stub.GetResourceState(
        pb.GetResourceStateRequest(namespace=NS, resource_name=name), metadata=bearer(ADMIN_TOKEN), timeout=10
    )
    assert len(reply.resources) == 1, reply
    return reply.resources[0]


async def provision_ready(stub: broker_pb2_grpc.BrokerServiceStub, name: str) -> None:
    request = pb.ProvisionRequest(
        namespace=NS,
        resource_type=pb.RESOURCE_TYPE_DATABASE,
        resource_name=name,
        spec=pb.ResourceSpec(engine="postgresql", version="15", size="small", replicas=1),
    )
    await stub.Provision(request, metadata=bearer(ADMIN_TOKEN), timeout=10)
    await until(
        lambda: state(stub, name), lambda s: s.phase == pb.STATE_READY, within=30, what=f"{name} Ready"
    )


async def scale_by_hand(sandbox, name: str, replicas: int) -> None:
    """``kubectl scale``, as the API server records it (field manager kubectl)."""
    path = f"{sandbox.url}/apis/apps/v1/namespaces/{NS}/statefulsets/{name}/scale"
    async with (
        aiohttp.ClientSession() as http,
        http.patch(
            path,
            params={"fieldManager": "kubectl"},
            data=json.dumps({"spec": {"replicas": replicas}}),
            headers={"Content-Type": "application/merge-patch+json"},
        ) as r,
    ):
        assert r.status == 200, await r.text()


def replicas_drift(s: pb.ResourceState) -> list[pb.DriftItem]:
    return [i for i in s.drift_items if i.field == "replicas"]


async def test_a_drift_made_in_the_cluster_shows_through_the_follower_as_through_the_leader(
    pair, sandbox
) -> None:
    leader, follower = pair
    await provision_ready(follower, "orders-db")  # accepted by the follower, carried out by the leader
    before = await state(follower, "orders-db")
    assert not replicas_drift(before)
    assert before.phase == pb.STATE_READY  # the patch version (15 -> 15.2) is expected drift only

    await scale_by_hand(sandbox, "orders-db", 3)

    seen = await until(
        lambda: state(follower, "orders-db"),
        lambda s: s.drift_detected,
        within=15,
        what="the follower's drift",
    )
    [item] = replicas_drift(seen)
    assert (item.desired, item.actual) == ("1", "3")
    assert item.drift_class == pb.DRIFT_CLASS_UNEXPECTED
    assert "kubectl" in item.changed_by
    assert seen.phase == pb.STATE_DRIFT_DETECTED
    assert seen.actual_spec.replicas == 3
    on_leader = await until(
        lambda: state(leader, "orders-db"),
        lambda s: bool(replicas_drift(s)),
        within=15,
        what="the leader's drift",
    )
    assert [(i.rule_id, i.desired, i.actual) for i in on_leader.drift_items] == [
        (i.rule_id, i.desired, i.actual) for i in seen.drift_items
    ]

    await scale_by_hand(sandbox, "orders-db", 1)  # undone by hand: resolved on both
    await until(
        lambda: state(follower, "orders-db"), lambda s: not replicas_drift(s), within=15, what="resolved"
    )
    assert (await state(follower, "orders-db")).phase == pb.STATE_READY


async def test_a_policy_set_through_one_replica_is_in_force_on_the_other(pair, sandbox) -> None:
    leader, follower = pair
    await provision_ready(leader, "cache-db")
    await scale_by_hand(sandbox, "cache-db", 2)
    await until(
        lambda: state(follower, "cache-db"), lambda s: bool(replicas_drift(s)), within=15, what="the drift"
    )

    ignore = pb.RemediationPolicy(namespace=NS, mode=pb.REMEDIATION_MODE_ALERT, ignore_fields=["replicas"])
    await follower.SetRemediationPolicy(
        pb.SetRemediationPolicyRequest(policy=ignore), metadata=bearer(ADMIN_TOKEN), timeout=10
    )

    # Set through the follower, in force on the leader: its detector resolves the drift.
    await until(
        lambda: state(leader, "cache-db"),
        lambda s: not replicas_drift(s),
        within=15,
        what="the leader to ignore",
    )
    await until(
        lambda: state(follower, "cache-db"),
        lambda s: not replicas_drift(s),
        within=15,
        what="the follower to ignore",
    )
    # and the other way round: the follower reads the policy the leader's replica stored.
    alert = pb.RemediationPolicy(namespace=NS, mode=pb.REMEDIATION_MODE_ALERT)
    await leader.SetRemediationPolicy(
        pb.SetRemediationPolicyRequest(policy=alert), metadata=bearer(ADMIN_TOKEN), timeout=10
    )
    seen = await until(
        lambda: state(follower, "cache-db"),
        lambda s: bool(replicas_drift(s)),
        within=15,
        what="compared again",
    )
    assert replicas_drift(seen)[0].recommended_action == pb.RECOMMENDED_ACTION_ALERT_ONLY


async def test_a_new_leader_evaluates_what_changed_while_it_followed_before_everything_else(
    tmp_path, tokens_file, sandbox, sandbox_kubeconfig, postgres_url
) -> None:
    """The takeover's first sweep takes every deployment; a hand edit made while another replica
    led (or nobody did) goes first, not wherever it falls among them."""
    names = [f"db-{i:02d}" for i in range(20)]
    timing = {"lease_duration": 20}  # the catch-up window is twice that: no test can outwait it
    async with contextlib.AsyncExitStack() as first:
        a, _ = await first.enter_async_context(
            replica(tmp_path, tokens_file, sandbox_kubeconfig, postgres_url, "replica-a", **timing)
        )
        await until(lambda: asyncio.sleep(0, a.leader_only.running), bool, within=20, what="a to lead")
        async with replica(
            tmp_path, tokens_file, sandbox_kubeconfig, postgres_url, "replica-b", **timing
        ) as (
            b,
            follower,
        ):
            for name in names:
                await provision_ready(follower, name)
            await scale_by_hand(sandbox, "db-07", 3)
            drifted = await until(
                lambda: state(follower, "db-07"),
                lambda s: bool(replicas_drift(s)),
                within=15,
                what="b to see it",
            )
            assert b.detector is not None
            evaluated: list[str] = []
            judging = b.detector._judging  # what every evaluation goes through, changed or swept

            async def recorded(deployment_id: str, listed: model.Deployment | None) -> Any:
                evaluated.append(deployment_id)
                return await judging(deployment_id, listed)

            b.detector._judging = recorded  # type: ignore[method-assign]
            await first.aclose()  # a stops cleanly and releases the lease: b takes over at its next retry
            await until(
                lambda: asyncio.sleep(0, len(evaluated) >= len(names)), bool, within=30, what="b's sweep"
            )
            assert b.leader_only.running
            assert evaluated[0] == drifted.deployment_id


async def test_a_cost_budget_set_through_one_replica_is_in_force_on_the_other(pair) -> None:
    leader, follower = pair

    async def budget(stub: broker_pb2_grpc.BrokerServiceStub) -> pb.CostBudget:
        reply = await stub.GetCostBudget(
            pb.GetCostBudgetRequest(namespace=NS), metadata=bearer(ADMIN_TOKEN), timeout=10
        )
        return reply.budget

    await follower.SetCostBudget(
        pb.SetCostBudgetRequest(budget=pb.CostBudget(namespace=NS, monthly_budget=123.0)),
        metadata=bearer(ADMIN_TOKEN),
        timeout=10,
    )
    # Set through the follower, in force on the leader (whose detector raises the alerts).
    seen = await until(
        lambda: budget(leader), lambda b: b.HasField("monthly_budget"), within=15, what="the leader's budget"
    )
    assert seen.monthly_budget == 123.0
    assert seen.source == pb.COST_BUDGET_SOURCE_API
    # Removed through the leader, gone on the follower too.
    await leader.SetCostBudget(
        pb.SetCostBudgetRequest(budget=pb.CostBudget(namespace=NS)), metadata=bearer(ADMIN_TOKEN), timeout=10
    )
    await until(
        lambda: budget(follower),
        lambda b: not b.HasField("monthly_budget"),
        within=15,
        what="the budget removed on the follower",
    )

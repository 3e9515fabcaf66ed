"""Approval before remediation, end to end: a hand edit under a policy of mode approve becomes a
pending remediation that a person lists, approves (or rejects) from the CLI and with grpcurl, and
the StatefulSet read back from the cluster shows what happened. Also: the approve grant, stale
proposals, request_id idempotency, expiry, and maintenance windows deferring then carrying out.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import pathlib
import shutil
import sys
import time
from collections.abc import AsyncIterator

import grpc
import pytest
from broker_client import errors as client_errors
from broker_client.client import BrokerClient
from broker_client.v1 import broker_pb2 as pb
from conftest import ADMIN_TOKEN, PLATFORM_TOKEN, cluster_settings
from test_client_cli import broker_cli
from test_leader_election import elected
from test_watch_support import PLATFORM, Kubectl, broker_on, client_of, error_info, until

from broker import server

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not on PATH")

K = pb.DriftEventKind
GRPCURL = pathlib.Path(sys.executable).parent / "grpcurl"
ONCALL_TOKEN = "oncall-token-0123456789abcdef"

# ``platform`` provisions and sets policies but may not approve; ``oncall`` may approve there.
TOKENS = f"""
principals:
  - name: admin
    token: {ADMIN_TOKEN}
    namespaces: ["*"]
  - name: platform
    token: {PLATFORM_TOKEN}
    namespaces: [{PLATFORM}]
  - name: oncall
    token: {ONCALL_TOKEN}
    namespaces: [{PLATFORM}]
    approve: [{PLATFORM}]
"""


@pytest.fixture
def approval_tokens(tmp_path: pathlib.Path) -> pathlib.Path:
    path = tmp_path / "approval-tokens.yaml"
    path.write_text(TOKENS)
    return path


@pytest.fixture
def kubectl(sandbox_kubeconfig: pathlib.Path, tmp_path: pathlib.Path) -> Kubectl:
    return Kubectl(sandbox_kubeconfig, tmp_path / "kube-cache")


@pytest.fixture
async def broker(
    tmp_path: pathlib.Path, approval_tokens: pathlib.Path, sandbox_kubeconfig: pathlib.Path
) -> AsyncIterator[server.Broker]:
    async with broker_on(tmp_path / "data", approval_tokens, sandbox_kubeconfig, remediate=True) as b:
        yield b


async def connect(broker: server.Broker, token: str) -> BrokerClient:
    return await BrokerClient.connect(f"127.0.0.1:{broker.grpc_port}", token=token)


async def drifted_under_approval(broker: server.Broker, kubectl: Kubectl, name: str) -> str:
    """Provision ``name``, put its type under mode approve, scale it to 3 by hand; its deployment id."""
    async with client_of(broker, PLATFORM_TOKEN) as manager, await connect(broker, PLATFORM_TOKEN) as c:
        deployment_id = await manager.provision(name)
        await manager.wait_ready(deployment_id)
        await c.set_remediation_policy(PLATFORM, mode="approve", resource_type="database")
    await kubectl.scale(name, 3)
    return deployment_id


async def pending_of(broker: server.Broker, deployment_id: str) -> list[pb.PendingRemediation]:
    async with await connect(broker, PLATFORM_TOKEN) as c:
        return list(await c.list_pending_remediations(PLATFORM, deployment_id=deployment_id))


async def one_pending(broker: server.Broker, deployment_id: str, **changed: str) -> pb.PendingRemediation:
    """Wait for exactly one pending remediation of the deployment whose first change is ``changed``."""

    def shows(found: list[pb.PendingRemediation]) -> bool:
        return len(found) == 1 and all(
            getattr(found[0].changes[0], k) == v for k, v in changed.items() if found[0].changes
        )

    found = await until(
        lambda: pending_of(broker, deployment_id), shows, within=30, what=f"a pending remediation {changed}"
    )
    return found[0]


async def kinds_of(broker: server.Broker, deployment_id: str) -> list[int]:
    async with client_of(broker, PLATFORM_TOKEN) as manager:
        return [e.kind for e in await manager.events(PLATFORM, deployment_id=deployment_id)]


async def test_a_person_sees_a_pending_remediation_approves_it_from_the_cli_and_watches_it_happen(
    broker: server.Broker, kubectl: Kubectl
) -> None:
    deployment_id = await drifted_under_approval(broker, kubectl, "db-approve-cli")
    target = f"127.0.0.1:{broker.grpc_port}"

    async def listed() -> list[dict]:
        code, out, err = await broker_cli(
            "pending", "--target", target, "--token", PLATFORM_TOKEN, "-n", PLATFORM, "-o", "json"
        )
        assert code == 0, err
        return [r for r in json.loads(out) if r["deploymentId"] == deployment_id]

    [proposal] = await until(
        listed, lambda found: len(found) == 1, within=30, what="broker pending to list it"
    )
    assert proposal["state"] == "REMEDIATION_STATE_PENDING"
    assert proposal["resourceName"] == "db-approve-cli"
    [change] = proposal["changes"]
    assert (change["field"], change["from"], change["to"]) == ("replicas", "3", "1")
    assert change["changedBy"] == "kubectl"
    assert change["ruleId"] == "replicas.changed"
    # Two replicas fewer cost less: the remediation's cost delta is negative.
    assert change["monthlyCostDelta"] < 0
    assert proposal["expireTime"] > proposal["createTime"]
    # Nothing happens before the approval: the hand edit stands.
    assert await kubectl.replicas("db-approve-cli") == 3
    # The web view lists it too (read-only).
    async with (
        client_of(broker, PLATFORM_TOKEN) as viewer,
        viewer.http.get(
            "/ui/api/resources", params={"namespace": PLATFORM, "deploymentId": deployment_id}
        ) as response,
    ):
        assert response.status == 200, await response.text()
        [resource] = (await response.json())["resources"]
    shown = resource["pendingRemediations"]
    assert shown["supported"] is True
    [item] = shown["items"]
    assert (item["remediationId"], item["field"], item["from"], item["to"]) == (
        proposal["remediationId"], "replicas", "3", "1",
    )  # fmt: skip

    code, out, err = await broker_cli(
        "approve", proposal["remediationId"], "--target", target, "--token", ONCALL_TOKEN, "-n", PLATFORM
    )
    assert code == 0, err
    assert proposal["remediationId"] in out
    assert "approved" in out

    assert await until(
        lambda: kubectl.replicas("db-approve-cli"), lambda r: r == 1, within=30, what="replicas back to 1"
    )
    kinds = await until(
        lambda: kinds_of(broker, deployment_id),
        lambda ks: K.DRIFT_EVENT_KIND_REMEDIATION_SUCCEEDED in ks,
        within=30,
        what="the remediation to succeed",
    )
    assert kinds.index(K.DRIFT_EVENT_KIND_REMEDIATION_PENDING_APPROVAL) < kinds.index(
        K.DRIFT_EVENT_KIND_REMEDIATION_APPROVED
    )
    assert kinds.index(K.DRIFT_EVENT_KIND_REMEDIATION_APPROVED) < kinds.index(
        K.DRIFT_EVENT_KIND_REMEDIATION_STARTED
    )
    async with await connect(broker, PLATFORM_TOKEN) as c:
        [decided] = await c.list_pending_remediations(
            PLATFORM, deployment_id=deployment_id, include_decided=True
        )
    assert decided.state == pb.REMEDIATION_STATE_APPLIED
    assert decided.decided_by == "oncall"
    # Nothing is pending any more.
    code, out, err = await broker_cli(
        "pending", "--target", target, "--token", PLATFORM_TOKEN, "-n", PLATFORM
    )
    assert code == 0, err
    assert deployment_id not in out


async def grpcurl(broker: server.Broker, method: str, data: dict, token: str) -> tuple[int, str, str]:
    argv = [str(GRPCURL), "-plaintext", "-max-time", "20", "-H", f"authorization: Bearer {token}"]
    argv += ["-d", json.dumps(data), f"127.0.0.1:{broker.grpc_port}", f"broker.v1.BrokerService/{method}"]
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_the_same_with_grpcurl_and_an_approval_without_the_grant_is_refused(
    broker: server.Broker, kubectl: Kubectl
) -> None:
    deployment_id = await drifted_under_approval(broker, kubectl, "db-approve-grpcurl")

    async def listed() -> list[dict]:
        code, out, err = await grpcurl(
            broker,
            "ListPendingRemediations",
            {"namespace": PLATFORM, "deployment_id": deployment_id},
            ONCALL_TOKEN,
        )
        assert code == 0, err
        return list(json.loads(out).get("remediations", []))

    [proposal] = await until(listed, lambda found: len(found) == 1, within=30, what="grpcurl to list it")
    request = {"namespace": PLATFORM, "remediation_id": proposal["remediation_id"]}

    # platform may provision and set policies, but not approve.
    code, out, err = await grpcurl(broker, "ApproveRemediation", request, PLATFORM_TOKEN)
    assert code != 0
    assert "PermissionDenied" in err
    assert "approve" in err
    assert await kubectl.replicas("db-approve-grpcurl") == 3

    code, out, err = await grpcurl(
        broker, "ApproveRemediation", {**request, "reason": "CHG-1234"}, ONCALL_TOKEN
    )
    assert code == 0, err
    approved = json.loads(out)["remediation"]
    assert approved["state"] == "REMEDIATION_STATE_APPROVED"
    assert approved["decided_by"] == "oncall"
    assert approved["reason"] == "CHG-1234"
    assert await until(
        lambda: kubectl.replicas("db-approve-grpcurl"), lambda r: r == 1, within=30, what="replicas back to 1"
    )


async def test_a_rejected_remediation_leaves_the_drift_and_is_not_proposed_again(
    broker: server.Broker, kubectl: Kubectl
) -> None:
    deployment_id = await drifted_under_approval(broker, kubectl, "db-reject")
    proposal = await one_pending(broker, deployment_id, field="replicas")
    target = f"127.0.0.1:{broker.grpc_port}"

    code, out, err = await broker_cli(
        "reject", proposal.remediation_id, "--reason", "load test", "--target", target,
        "--token", ONCALL_TOKEN, "-n", PLATFORM,
    )  # fmt: skip
    assert code == 0, err
    assert "rejected" in out

    kinds = await until(
        lambda: kinds_of(broker, deployment_id),
        lambda ks: K.DRIFT_EVENT_KIND_REMEDIATION_REJECTED in ks,
        within=20,
        what="the rejection event",
    )
    assert K.DRIFT_EVENT_KIND_REMEDIATION_STARTED not in kinds
    # A resync later, the hand edit still stands and nothing new waits for approval.
    broker.detector.resync_now()  # type: ignore[union-attr]
    await asyncio.sleep(0.5)
    assert await kubectl.replicas("db-reject") == 3
    assert await pending_of(broker, deployment_id) == []
    async with await connect(broker, PLATFORM_TOKEN) as c:
        [decided] = await c.list_pending_remediations(
            PLATFORM, deployment_id=deployment_id, include_decided=True
        )
        state = await c.get_resource_state(PLATFORM, deployment_id=deployment_id)
    assert (decided.state, decided.decided_by, decided.reason) == (
        pb.REMEDIATION_STATE_REJECTED,
        "oncall",
        "load test",
    )
    [item] = [i for i in state[0].drift_items if i.rule_id == "replicas.changed"]
    assert item.recommended_action == pb.RECOMMENDED_ACTION_APPROVAL_REQUIRED


async def test_approving_a_stale_proposal_is_refused_and_the_current_one_can_be_approved(
    broker: server.Broker, kubectl: Kubectl
) -> None:
    deployment_id = await drifted_under_approval(broker, kubectl, "db-stale")
    first = await one_pending(broker, deployment_id, field="replicas")
    assert getattr(first.changes[0], "from") == "3"

    await kubectl.scale("db-stale", 4)
    second = await one_pending(broker, deployment_id, **{"from": "4"})
    assert second.remediation_id != first.remediation_id

    async with await connect(broker, ONCALL_TOKEN) as oncall:
        with pytest.raises(client_errors.BrokerError) as refused:
            await oncall.approve_remediation(PLATFORM, first.remediation_id)
        assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "superseded" in refused.value.message
        approved = await oncall.approve_remediation(PLATFORM, second.remediation_id)
    assert approved.state == pb.REMEDIATION_STATE_APPROVED
    assert await until(
        lambda: kubectl.replicas("db-stale"), lambda r: r == 1, within=30, what="replicas back to 1"
    )


async def test_decisions_are_idempotent_on_request_id(broker: server.Broker, kubectl: Kubectl) -> None:
    deployment_id = await drifted_under_approval(broker, kubectl, "db-idempotent")
    proposal = await one_pending(broker, deployment_id, field="replicas")
    async with client_of(broker, ONCALL_TOKEN) as oncall:
        request = pb.ApproveRemediationRequest(
            namespace=PLATFORM, remediation_id=proposal.remediation_id, request_id="approve-1"
        )
        first = await oncall.stub.ApproveRemediation(request, metadata=oncall.auth)
        # Carried out meanwhile: a retry still gets the first answer, not a refusal.
        assert await until(
            lambda: kubectl.replicas("db-idempotent"), lambda r: r == 1, within=30, what="replicas back to 1"
        )
        again = await oncall.stub.ApproveRemediation(request, metadata=oncall.auth)
        assert again.remediation.remediation_id == first.remediation.remediation_id
        assert again.remediation.decided_by == "oncall"
        # The same request_id for another request is refused; a new approval without one is refused too.
        with pytest.raises(grpc.aio.AioRpcError) as reused:
            await oncall.stub.RejectRemediation(
                pb.RejectRemediationRequest(
                    namespace=PLATFORM, remediation_id=proposal.remediation_id, request_id="approve-1"
                ),
                metadata=oncall.auth,
            )
        assert reused.value.code() == grpc.StatusCode.ALREADY_EXISTS
        with pytest.raises(grpc.aio.AioRpcError) as twice:
            await oncall.stub.ApproveRemediation(
                pb.ApproveRemediationRequest(namespace=PLATFORM, remediation_id=proposal.remediation_id),
                metadata=oncall.auth,
            )
        assert twice.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_info(twice.value).reason == "REMEDIATION_NOT_PENDING"
    kinds = await kinds_of(broker, deployment_id)
    assert kinds.count(K.DRIFT_EVENT_KIND_REMEDIATION_APPROVED) == 1


async def test_bad_decision_requests_are_invalid_argument_and_unknown_ids_not_found(
    broker: server.Broker,
) -> None:
    async with client_of(broker, ONCALL_TOKEN) as oncall:
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await oncall.stub.ApproveRemediation(
                pb.ApproveRemediationRequest(namespace=PLATFORM, remediation_id="nope", request_id="a b"),
                metadata=oncall.auth,
            )
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "remediation_id" in (bad.value.details() or "")
        assert "request_id" in (bad.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await oncall.stub.RejectRemediation(
                pb.RejectRemediationRequest(namespace=PLATFORM, remediation_id="rem-0123456789abcdef"),
                metadata=oncall.auth,
            )
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    async with client_of(broker, PLATFORM_TOKEN) as platform:
        # Another namespace: the same answer whether or not it exists.
        with pytest.raises(grpc.aio.AioRpcError) as other:
            await platform.stub.ListPendingRemediations(
                pb.ListPendingRemediationsRequest(namespace="team-other"), metadata=platform.auth
            )
        assert other.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_an_undecided_proposal_expires_and_the_drift_stays(
    tmp_path: pathlib.Path, approval_tokens: pathlib.Path, sandbox_kubeconfig: pathlib.Path, kubectl: Kubectl
) -> None:
    async with broker_on(
        tmp_path / "data", approval_tokens, sandbox_kubeconfig, remediate=True, approval_ttl=1.0
    ) as broker:
        deployment_id = await drifted_under_approval(broker, kubectl, "db-expire")
        kinds = await until(
            lambda: kinds_of(broker, deployment_id),
            lambda ks: K.DRIFT_EVENT_KIND_REMEDIATION_EXPIRED in ks,
            within=30,
            what="the proposal to expire",
        )
        assert kinds.index(K.DRIFT_EVENT_KIND_REMEDIATION_PENDING_APPROVAL) < kinds.index(
            K.DRIFT_EVENT_KIND_REMEDIATION_EXPIRED
        )
        async with await connect(broker, PLATFORM_TOKEN) as c:
            [expired] = await c.list_pending_remediations(
                PLATFORM, deployment_id=deployment_id, include_decided=True
            )
        assert expired.state == pb.REMEDIATION_STATE_EXPIRED
        async with await connect(broker, ONCALL_TOKEN) as oncall:
            with pytest.raises(client_errors.BrokerError) as late:
                await oncall.approve_remediation(PLATFORM, expired.remediation_id)
            assert late.value.code == grpc.StatusCode.FAILED_PRECONDITION
            assert "expired" in late.value.message
        assert await kubectl.replicas("db-expire") == 3


async def test_outside_its_maintenance_window_a_remediation_is_deferred_then_carried_out_when_it_opens(
    broker: server.Broker, kubectl: Kubectl
) -> None:
    """The detector's clock is the test's seam: it reads 02:59:57 UTC now and runs on at real speed,
    so the window at 03:00 opens a few real seconds later."""
    detector = broker.detector
    assert detector is not None
    base, started = datetime.datetime(2026, 1, 5, 2, 59, 57, tzinfo=datetime.UTC), time.monotonic()
    detector.clock = lambda: base + datetime.timedelta(seconds=time.monotonic() - started)
    async with client_of(broker, PLATFORM_TOKEN) as manager, await connect(broker, PLATFORM_TOKEN) as c:
        deployment_id = await manager.provision("db-window")
        await manager.wait_ready(deployment_id)
        window = pb.MaintenanceWindow(cron="0 3 * * *", duration="1h", time_zone="UTC")
        await c.set_remediation_policy(
            PLATFORM, mode="auto", resource_type="database", maintenance_window=window
        )
        await kubectl.scale("db-window", 3)
        kinds = await until(
            lambda: kinds_of(broker, deployment_id),
            lambda ks: K.DRIFT_EVENT_KIND_REMEDIATION_DEFERRED in ks,
            within=20,
            what="the remediation to be deferred",
        )
        assert K.DRIFT_EVENT_KIND_REMEDIATION_STARTED not in kinds
        events = await manager.events(PLATFORM, deployment_id=deployment_id)
        [deferred] = [e for e in events if e.kind == K.DRIFT_EVENT_KIND_REMEDIATION_DEFERRED]
        assert "2026-01-05T03:00:00+00:00" in deferred.message
        assert await until(
            lambda: kubectl.replicas("db-window"), lambda r: r == 1, within=30, what="replicas back at 03:00"
        )
        kinds = await kinds_of(broker, deployment_id)
        assert kinds.index(K.DRIFT_EVENT_KIND_REMEDIATION_DEFERRED) < kinds.index(
            K.DRIFT_EVENT_KIND_REMEDIATION_STARTED
        )
        reply = await c.get_remediation_policy_window(PLATFORM, resource_type="database")
        assert reply.policy.maintenance_window.cron == "0 3 * * *"
        assert reply.HasField("next_window_start")
        assert reply.HasField("next_window_end")


async def test_a_deferred_remediation_that_resolved_itself_is_not_carried_out(
    broker: server.Broker, kubectl: Kubectl
) -> None:
    detector = broker.detector
    assert detector is not None
    base, started = datetime.datetime(2026, 1, 5, 2, 59, 50, tzinfo=datetime.UTC), time.monotonic()
    detector.clock = lambda: base + datetime.timedelta(seconds=time.monotonic() - started)
    async with client_of(broker, PLATFORM_TOKEN) as manager, await connect(broker, PLATFORM_TOKEN) as c:
        deployment_id = await manager.provision("db-window-self")
        await manager.wait_ready(deployment_id)
        window = pb.MaintenanceWindow(cron="0 3 * * *", duration="1h")
        await c.set_remediation_policy(
            PLATFORM, mode="auto", resource_type="database", maintenance_window=window
        )
        await kubectl.scale("db-window-self", 3)
        await until(
            lambda: kinds_of(broker, deployment_id),
            lambda ks: K.DRIFT_EVENT_KIND_REMEDIATION_DEFERRED in ks,
            within=20,
            what="the remediation to be deferred",
        )
        await kubectl.scale("db-window-self", 1)
        await until(
            lambda: kinds_of(broker, deployment_id),
            lambda ks: K.DRIFT_EVENT_KIND_DRIFT_RESOLVED in ks,
            within=20,
            what="the drift to resolve by itself",
        )
        # Past the window's opening (the clock reads 03:00:0x): nothing to carry out.
        await until(
            lambda: asyncio.sleep(0, detector.clock()), lambda now: now.minute == 0, within=20, what="03:00"
        )
        detector.resync_now()
        await asyncio.sleep(0.5)
        assert K.DRIFT_EVENT_KIND_REMEDIATION_STARTED not in await kinds_of(broker, deployment_id)


async def test_a_bad_maintenance_window_is_invalid_argument_naming_the_part(broker: server.Broker) -> None:
    async with client_of(broker, PLATFORM_TOKEN) as platform:
        cases = {
            "cron": pb.MaintenanceWindow(cron="0 2 * *", duration="2h"),
            "duration": pb.MaintenanceWindow(cron="0 2 * * *", duration="2 hours"),
            "time_zone": pb.MaintenanceWindow(cron="0 2 * * *", duration="2h", time_zone="Mars/Olympus"),
        }
        for part, window in cases.items():
            with pytest.raises(grpc.aio.AioRpcError) as bad:
                await platform.stub.SetRemediationPolicy(
                    pb.SetRemediationPolicyRequest(
                        policy=pb.RemediationPolicy(
                            namespace=PLATFORM, mode=pb.REMEDIATION_MODE_AUTO, maintenance_window=window
                        )
                    ),
                    metadata=platform.auth,
                )
            assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert f"policy.maintenance_window.{part}" in (bad.value.details() or "")
        # Over HTTP the same: 400 with the field violation.
        async with platform.http.put(
            "/v1/policies",
            json={"namespace": PLATFORM, "mode": "REMEDIATION_MODE_APPROVE",
                  "maintenanceWindow": {"cron": "99 * * * *", "duration": "1h"}},
        ) as response:  # fmt: skip
            body = await response.json()
        assert response.status == 400
        assert "cron" in json.dumps(body)
        async with platform.http.put(
            "/v1/policies", json={"namespace": PLATFORM, "mode": "REMEDIATION_MODE_APPROVE"}
        ) as response:
            assert response.status == 200, await response.text()
            assert (await response.json())["policy"]["mode"] == "Approve"


async def test_with_two_replicas_an_approval_on_the_follower_is_carried_out_by_the_leader(
    tmp_path: pathlib.Path,
    approval_tokens: pathlib.Path,
    sandbox_kubeconfig: pathlib.Path,
    kubectl: Kubectl,
    postgres_url: str,
) -> None:
    replicas = {}
    for name in ("broker-a", "broker-b"):
        settings = cluster_settings(
            tmp_path / name,
            approval_tokens,
            sandbox_kubeconfig,
            remediate=True,
            store_url=postgres_url,
            leader_election=elected(identity=name),
        )
        replicas[name] = server.Broker(settings)
    try:
        for b in replicas.values():
            await b.start()
        leader = await until(
            lambda: asyncio.sleep(0, [b for b in replicas.values() if b.leader_only.running]),
            lambda leading: len(leading) == 1,
            within=20,
            what="one replica to lead",
        )
        [follower] = [b for b in replicas.values() if b is not leader[0]]
        deployment_id = await drifted_under_approval(leader[0], kubectl, "db-two-replicas")
        # The follower lists what the leader proposed: the store is shared.
        proposal = await one_pending(follower, deployment_id, field="replicas")
        async with await connect(follower, ONCALL_TOKEN) as oncall:
            approved = await oncall.approve_remediation(PLATFORM, proposal.remediation_id)
        assert approved.state == pb.REMEDIATION_STATE_APPROVED
        assert await until(
            lambda: kubectl.replicas("db-two-replicas"),
            lambda r: r == 1,
            within=30,
            what="replicas back to 1",
        )
        kinds = await kinds_of(follower, deployment_id)
        assert kinds.count(K.DRIFT_EVENT_KIND_REMEDIATION_STARTED) == 1
    finally:
        for b in replicas.values():
            await b.stop()


async def test_each_decision_writes_an_audit_line_with_the_approver(
    broker: server.Broker, kubectl: Kubectl, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="broker.audit")
    deployment_id = await drifted_under_approval(broker, kubectl, "db-audit")
    proposal = await one_pending(broker, deployment_id, field="replicas")
    caplog.clear()
    async with (
        await connect(broker, PLATFORM_TOKEN) as platform,
        await connect(broker, ONCALL_TOKEN) as oncall,
    ):
        with pytest.raises(client_errors.BrokerError):
            await platform.reject_remediation(PLATFORM, proposal.remediation_id)
        await oncall.reject_remediation(PLATFORM, proposal.remediation_id, reason="planned")
    lines = [r.audit for r in caplog.records if r.name == "broker.audit"]  # type: ignore[attr-defined]
    assert [(a["principal"], a["action"], a["resource"], a["result"]) for a in lines] == [
        ("platform", "RejectRemediation", proposal.remediation_id, "rejected"),
        ("oncall", "RejectRemediation", proposal.remediation_id, "ok"),
    ]
    assert lines[0]["error"] == "APPROVAL_NOT_GRANTED"
    assert lines[1]["deployment_id"] == deployment_id
    assert lines[1]["outcome"] == "rejected"


async def test_an_approval_waits_for_a_remediation_under_way_instead_of_being_lost(
    broker: server.Broker, kubectl: Kubectl, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Approved while another remediation of the resource runs: it stays approved, then happens."""
    deployment_id = await drifted_under_approval(broker, kubectl, "db-busy")
    proposal = await one_pending(broker, deployment_id, field="replicas")
    remediator = broker.remediator
    assert remediator is not None
    busy = True
    real_busy = remediator.busy
    monkeypatch.setattr(remediator, "busy", lambda deployment: busy or real_busy(deployment))
    async with client_of(broker, ONCALL_TOKEN) as oncall:
        await oncall.stub.ApproveRemediation(
            pb.ApproveRemediationRequest(namespace=PLATFORM, remediation_id=proposal.remediation_id),
            metadata=oncall.auth,
        )

    async def decided() -> list[pb.PendingRemediation]:
        async with await connect(broker, PLATFORM_TOKEN) as c:
            return list(
                await c.list_pending_remediations(PLATFORM, deployment_id=deployment_id, include_decided=True)
            )

    # Tried while "busy" (the retry comes every couple of seconds): still approved, nothing applied.
    await asyncio.sleep(5)
    (still,) = [r for r in await decided() if r.remediation_id == proposal.remediation_id]
    assert still.state == pb.REMEDIATION_STATE_APPROVED
    assert await kubectl.replicas("db-busy") == 3
    busy = False
    assert await until(
        lambda: kubectl.replicas("db-busy"), lambda r: r == 1, within=30, what="replicas back to 1"
    )
    (done,) = [r for r in await decided() if r.remediation_id == proposal.remediation_id]
    assert done.state == pb.REMEDIATION_STATE_APPLIED


async def test_one_drift_rule_under_approval_in_a_namespace_that_remediates_the_rest(
    broker: server.Broker, kubectl: Kubectl
) -> None:
    """Mode auto for the namespace, approve for replicas.changed alone, set through the gateway."""
    async with client_of(broker, PLATFORM_TOKEN) as platform:
        deployment_id = await platform.provision("db-rule-mode")
        await platform.wait_ready(deployment_id)
        async with platform.http.put(
            "/v1/policies",
            json={"namespace": PLATFORM, "resourceType": "database", "mode": "REMEDIATION_MODE_AUTO",
                  "ruleModes": [{"ruleId": "replicas.changed", "mode": "REMEDIATION_MODE_APPROVE"}]},
        ) as response:  # fmt: skip
            assert response.status == 200, await response.text()
            assert (await response.json())["policy"]["ruleModes"] == [
                {"ruleId": "replicas.changed", "mode": "Approve"}
            ]
        read = await platform.stub.GetRemediationPolicy(
            pb.GetRemediationPolicyRequest(namespace=PLATFORM, resource_type=pb.RESOURCE_TYPE_DATABASE),
            metadata=platform.auth,
        )
        assert [(m.rule_id, m.mode) for m in read.policy.rule_modes] == [
            ("replicas.changed", pb.REMEDIATION_MODE_APPROVE)
        ]
        # An unknown rule, or a rule without a mode, is INVALID_ARGUMENT naming the field.
        for entry, field in (
            (pb.RuleMode(rule_id="replicas.moved", mode=pb.REMEDIATION_MODE_ALERT), "policy.rule_modes"),
            (pb.RuleMode(rule_id="replicas.changed"), "policy.rule_modes[0].mode"),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as bad:
                await platform.stub.SetRemediationPolicy(
                    pb.SetRemediationPolicyRequest(
                        policy=pb.RemediationPolicy(
                            namespace=PLATFORM, mode=pb.REMEDIATION_MODE_AUTO, rule_modes=[entry]
                        )
                    ),
                    metadata=platform.auth,
                )
            assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert field in (bad.value.details() or "")
    # A scale by hand waits for a person; it is not re-applied.
    await kubectl.scale("db-rule-mode", 3)
    proposal = await one_pending(broker, deployment_id, field="replicas")
    assert [c.rule_id for c in proposal.changes] == ["replicas.changed"]
    assert await kubectl.replicas("db-rule-mode") == 3
    # The namespace's own mode still holds for the other rules: a label the broker owns, changed
    # by hand, is re-applied at once.
    await kubectl.run(
        "label", "statefulset", "db-rule-mode", "app.kubernetes.io/managed-by=someone", "--overwrite"
    )
    assert await until(
        lambda: kubectl.run("get", "statefulset", "db-rule-mode", "-o", "jsonpath={.metadata.labels}"),
        lambda out: "someone" not in str(out),
        within=30,
        what="the broker's label re-applied",
    )

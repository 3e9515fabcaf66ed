"""Drift prevention at admission: the broker's ValidatingAdmissionPolicies against stock kubectl.

The sandbox serves HTTPS (so kubectl sends each context's token) with three identities besides its
administrator: the person ``jane``, the broker's service account (context ``resource-broker``) and
Kubernetes' horizontal pod autoscaler (a kube-system service account, which prevention exempts).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import pathlib
import shutil
import sys
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import grpc
import pytest
import yaml
from broker_client.v1 import broker_pb2 as pb
from broker_client.v1 import broker_pb2_grpc
from conftest import (
    ADMIN_TOKEN,
    PLATFORM_PROFILE,
    PLATFORM_TOKEN,
    RunningBroker,
    bearer,
    cluster_settings,
    until,
)
from kube_sandbox import admission as sandbox_admission
from kube_sandbox import cluster as sandbox_cluster
from kube_sandbox import users
from kube_sandbox.admission import policies as sandbox_policies
from test_e2e_drift import NS, Kubectl, Manager, item_of

from broker import server
from broker.domain import admission, drift, model, policy

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not on PATH")

BROKER = users.service_account("resource-broker", "resource-broker", context="resource-broker")
AUTOSCALER = users.service_account("kube-system", "horizontal-pod-autoscaler", context="autoscaler")
SPEC = admission.policy_name(admission.Category.SPEC)


@pytest.fixture
def sandbox_options() -> dict[str, object]:
    return {
        "ready_delay": 0.05,
        "crash_interval": 0.2,
        "profile": PLATFORM_PROFILE,
        "tls": True,
        "extra_users": (BROKER, AUTOSCALER),
    }


@pytest.fixture
def kubectl(sandbox_kubeconfig: pathlib.Path, tmp_path: pathlib.Path) -> Kubectl:
    return Kubectl(sandbox_kubeconfig, tmp_path / "kube-cache")


@contextlib.asynccontextmanager
async def broker_with(
    tmp_path: pathlib.Path, tokens_file: pathlib.Path, kubeconfig: pathlib.Path, **overrides: Any
) -> AsyncIterator[tuple[RunningBroker, Manager]]:
    """A broker acting as its service account, with prevention as ``overrides`` say, and a manager."""
    settings = cluster_settings(tmp_path / "data", tokens_file, kubeconfig, kube_context="resource-broker")
    broker = server.Broker(dataclasses.replace(settings, **overrides))
    await broker.start()
    try:
        assert broker.cluster is not None
        assert await broker.cluster.wait_synced(10.0)
        running = RunningBroker(broker=broker, data_dir=tmp_path / "data")
        async with (
            grpc.aio.insecure_channel(running.grpc_target) as channel,
            aiohttp.ClientSession(
                base_url=running.http_url, headers={"Authorization": f"Bearer {PLATFORM_TOKEN}"}
            ) as http,
        ):
            yield running, Manager(broker_pb2_grpc.BrokerServiceStub(channel), http)
    finally:
        await broker.stop()


async def prevention_applied(kubectl: Kubectl, running: RunningBroker) -> None:
    """Until the broker has applied its policies (read back from the cluster by kubectl)."""
    prevention = running.broker.prevention
    assert prevention is not None
    await until(lambda: _async(prevention.applied), lambda n: n >= 1, within=10, what="prevention applied")
    _, out, _ = await kubectl.run("get", "validatingadmissionpolicies", "-o", "name")
    assert f"validatingadmissionpolicy.admissionregistration.k8s.io/{SPEC}" in out.split()


async def _async(value: Any) -> Any:
    return value


async def replicas(kubectl: Kubectl, name: str) -> int:
    sts = await kubectl.get("statefulset", name)
    assert sts is not None
    return int(sts["spec"]["replicas"])


async def test_deny_refuses_a_person_and_never_the_broker(
    tmp_path: pathlib.Path, tokens_file: pathlib.Path, sandbox_kubeconfig: pathlib.Path, kubectl: Kubectl
) -> None:
    async with broker_with(
        tmp_path, tokens_file, sandbox_kubeconfig, drift_prevention="deny", remediate=True
    ) as (running, manager):
        reply = await manager.provision("db-guarded")
        await manager.wait_ready(reply.deployment_id)
        await prevention_applied(kubectl, running)

        code, _, err = await kubectl.run(
            "--context", "jane", "scale", "sts", "db-guarded", "--replicas=3", check=False
        )
        assert code != 0
        assert (
            f"ValidatingAdmissionPolicy '{SPEC}' with binding '{SPEC}' denied request: spec.replicas of "
            "db-guarded is owned by the resource broker (1 -> 3): change the desired state through the "
            "broker (Provision), or accept the drift (AcceptDrift)"
        ) in err
        assert await replicas(kubectl, "db-guarded") == 1
        # Anyone but the broker: the cluster administrator too; labels and deletion by their policies.
        code, _, err = await kubectl.run(
            "patch", "sts", "db-guarded", "-p", '{"spec":{"replicas":2}}', check=False
        )
        assert code != 0
        assert "denied request: spec.replicas of db-guarded" in err
        code, _, err = await kubectl.run(
            "--context",
            "jane",
            "label",
            "sts",
            "db-guarded",
            "app.kubernetes.io/name=other",
            "--overwrite",
            check=False,
        )
        assert code != 0
        assert "ValidatingAdmissionPolicy 'resource-broker-labels'" in err
        code, _, err = await kubectl.run("--context", "jane", "delete", "service", "db-guarded", check=False)
        assert code != 0
        assert "Error from server (Forbidden)" in err
        assert "resource-broker-deletion" in err
        assert await kubectl.get("service", "db-guarded") is not None
        # A label the broker does not own is anybody's.
        await kubectl.run("--context", "jane", "label", "sts", "db-guarded", "team=payments")

        # An exempt controller (the autoscaler) scales; the broker, under Deny, puts it back.
        await kubectl.run("--context", "autoscaler", "scale", "sts", "db-guarded", "--replicas=2")
        await until(
            lambda: replicas(kubectl, "db-guarded"),
            lambda n: n == 1,
            within=15,
            what="the broker's remediation",
        )
        events = await manager.stub.ListDriftEvents(
            pb.ListDriftEventsRequest(namespace=NS, deployment_id=reply.deployment_id),
            metadata=bearer(PLATFORM_TOKEN),
        )
        kinds = [e.kind for e in events.events]
        assert pb.DRIFT_EVENT_KIND_REMEDIATION_SUCCEEDED in kinds, kinds
        assert pb.DRIFT_EVENT_KIND_REMEDIATION_FAILED not in kinds


async def test_warn_lets_the_change_through_with_a_warning_and_the_broker_reports_it(
    tmp_path: pathlib.Path,
    tokens_file: pathlib.Path,
    sandbox_kubeconfig: pathlib.Path,
    kubectl: Kubectl,
    sandbox: sandbox_cluster.Sandbox,
) -> None:
    async with broker_with(
        tmp_path, tokens_file, sandbox_kubeconfig, drift_prevention="warn,labels=audit"
    ) as (running, manager):
        reply = await manager.provision("db-warned")
        await manager.wait_ready(reply.deployment_id)
        await prevention_applied(kubectl, running)

        _, out, err = await kubectl.run("--context", "jane", "scale", "sts", "db-warned", "--replicas=3")
        assert "statefulset.apps/db-warned scaled" in out
        assert (
            f"Warning: Validation failed for ValidatingAdmissionPolicy '{SPEC}' with binding '{SPEC}': "
            "spec.replicas of db-warned is owned by the resource broker (1 -> 3)"
        ) in err
        assert await replicas(kubectl, "db-warned") == 3
        state = await until(
            lambda: manager.state(reply.deployment_id),
            lambda s: item_of(s, "replicas.changed") is not None,
            within=10,
            what="the drift reported",
        )
        item = item_of(state, "replicas.changed")
        assert item is not None
        assert item.actual == "3"
        assert item.changed_by == "kubectl"

        # Audit: the change goes through, the audit log records why it should not have.
        await kubectl.run(
            "--context", "jane", "label", "sts", "db-warned", "app.kubernetes.io/name=other", "--overwrite"
        )
        recorded = [
            e
            for e in sandbox.audit.events()
            if e["user"]["username"] == "jane@example.com" and e["verb"] == "patch"
        ]
        failures = json.loads(recorded[-1]["annotations"][sandbox_admission.VALIDATION_FAILURE_ANNOTATION])
        assert failures[0]["policy"] == "resource-broker-labels"
        assert failures[0]["validationActions"] == ["Audit"]


async def broker_cli(*args: str) -> tuple[int, str, str]:
    """``broker ARGS`` as a person runs it: its own process (its logging set-up stays there)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "broker",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_admission_policy_command_prints_what_the_broker_applies(
    tmp_path: pathlib.Path, tokens_file: pathlib.Path, sandbox_kubeconfig: pathlib.Path, kubectl: Kubectl
) -> None:
    async with broker_with(tmp_path, tokens_file, sandbox_kubeconfig, drift_prevention="deny") as (
        running,
        _,
    ):
        await prevention_applied(kubectl, running)
        args = ["admission-policy", "--target", running.grpc_target, "--token", ADMIN_TOKEN]
        code, out, err = await broker_cli(*args)
        assert code == 0, err
        printed = list(yaml.safe_load_all(out))
        live = await kubectl.get("validatingadmissionpolicy", SPEC)
        assert live is not None
        mine = next(
            o for o in printed if o["kind"] == "ValidatingAdmissionPolicy" and o["metadata"]["name"] == SPEC
        )
        assert mine["spec"]["validations"] == live["spec"]["validations"]
        assert {o["kind"] for o in printed} == {
            "ValidatingAdmissionPolicy",
            "ValidatingAdmissionPolicyBinding",
        }
        # Another mode on request, for a Git repository; a principal without every namespace may not read it.
        code, out, err = await broker_cli(*args, "--mode", "off", "-o", "json")
        assert code == 0, err
        assert json.loads(out)["items"] == []
        code, _, err = await broker_cli(
            "admission-policy", "--target", running.grpc_target, "--token", PLATFORM_TOKEN
        )
        assert code == 1
        assert "PERMISSION_DENIED" in err


# The generator, without a cluster ----------------------------------------------------------------


def test_every_drift_field_has_a_guard() -> None:
    assert admission.covered_fields() == drift.FIELDS


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("off", dict.fromkeys(admission.Category, admission.Mode.OFF)),
        ("deny", dict.fromkeys(admission.Category, admission.Mode.DENY)),
        (
            "labels=warn,deny",
            {
                **dict.fromkeys(admission.Category, admission.Mode.DENY),
                admission.Category.LABELS: admission.Mode.WARN,
            },
        ),
        (
            "spec=audit",
            {
                **dict.fromkeys(admission.Category, admission.Mode.OFF),
                admission.Category.SPEC: admission.Mode.AUDIT,
            },
        ),
    ],
)
def test_modes_parse(text: str, expected: dict[admission.Category, admission.Mode]) -> None:
    assert admission.parse_modes(text) == expected


@pytest.mark.parametrize("text", ["block", "spec=block", "owners=deny"])
def test_bad_modes_are_refused_with_the_spellings(text: str) -> None:
    with pytest.raises(ValueError, match="off, warn, deny, audit"):
        admission.parse_modes(text)


def test_generated_objects_are_valid_policies_and_bindings() -> None:
    objects = admission.objects(admission.Prevention(modes=admission.parse_modes("deny,secret=off")))
    names = [(o["kind"], o["metadata"]["name"]) for o in objects]
    assert ("ValidatingAdmissionPolicy", "resource-broker-secret") not in names
    for obj in objects:
        if obj["kind"] == "ValidatingAdmissionPolicy":
            parsed = sandbox_policies.parse_policy(obj)  # every expression compiles
            assert parsed.failure_policy == "Fail"
        else:
            assert sandbox_policies.parse_binding(obj).validation_actions == ("Deny",)


def test_remediation_policy_waives_ignored_fields_where_it_applies() -> None:
    rules = policy.Policy(
        rules=(
            policy.Rule(
                namespace="team-a",
                resource_type=model.ResourceType.CACHE,
                ignore_fields=frozenset({"replicas"}),
            ),
            policy.Rule(namespace="team-b", mode=policy.Mode.OFF),
        )
    )
    vap = admission.category_objects(
        admission.Category.SPEC, admission.Mode.DENY, admission.Prevention(), rules
    )[0]
    replicas_check = vap["spec"]["validations"][0]["expression"]
    assert '{"team-a": ["cache"], "team-b": ["database", "cache", "topic", ""]}' in replicas_check
    image_check = vap["spec"]["validations"][1]["expression"]
    assert '"team-a": []' in image_check

"""WatchDrift end to end with the detector and the remediator: what a subscribed manager sees when
someone changes the cluster by hand, when the broker puts it back, when another actor fights it,
and when the manager accepts the drift or turns remediation off for a namespace.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import pathlib
import re
import shutil
import time
from typing import Any

import pytest
from broker_client.v1 import broker_pb2 as pb
from conftest import ADMIN_TOKEN, PLATFORM_TOKEN
from kubernetes_asyncio import client as k8s
from test_watch_support import PLATFORM, Kubectl, broker_on, client_of, until, value

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not on PATH")

K = pb.DriftEventKind


@pytest.fixture
def kubectl(sandbox_kubeconfig: pathlib.Path, tmp_path: pathlib.Path) -> Kubectl:
    return Kubectl(sandbox_kubeconfig, tmp_path / "kube-cache")


async def newest_sequence(broker: Any) -> int:
    return int((await broker.store.event_bounds())[1])


async def test_a_manual_scale_reaches_the_subscriber_and_auto_remediation_undoes_it(
    tmp_path: pathlib.Path, tokens_file: pathlib.Path, sandbox_kubeconfig: pathlib.Path, kubectl: Kubectl
) -> None:
    async with (
        broker_on(tmp_path / "data", tokens_file, sandbox_kubeconfig, remediate=True) as broker,
        client_of(broker, PLATFORM_TOKEN) as manager,
    ):
        deployment_id = await manager.provision("db-scaled")
        await manager.wait_ready(deployment_id)
        # Resume from the current end of the log: nothing that happens from here on can be missed.
        watch = manager.watch(
            namespaces=[PLATFORM], deployment_id=deployment_id, after_sequence=await newest_sequence(broker)
        )

        await kubectl.scale("db-scaled", 3)

        detected = await watch.wait_kinds([K.DRIFT_EVENT_KIND_DRIFT_DETECTED], deployment_id=deployment_id)
        first = next(e for e in detected if e.kind == K.DRIFT_EVENT_KIND_DRIFT_DETECTED)
        assert first.namespace == PLATFORM
        assert first.resource_name == "db-scaled"
        assert first.resource_type == pb.RESOURCE_TYPE_DATABASE
        assert first.phase == pb.STATE_DRIFT_DETECTED
        (item,) = [i for i in first.drift_items if i.rule_id == "replicas.changed"]
        assert (item.desired, item.actual) == ("1", "3")
        assert item.recommended_action == pb.RECOMMENDED_ACTION_AUTO_REMEDIATE
        assert item.changed_by == "kubectl"
        assert "Replica count mismatch: desired=1, actual=3" in first.message

        # Succeeded is only said once an observation shows the drift gone: after Started, and
        # after (or together with) the resolution.
        for last in (K.DRIFT_EVENT_KIND_DRIFT_RESOLVED, K.DRIFT_EVENT_KIND_REMEDIATION_SUCCEEDED):
            events = await watch.wait_kinds(
                [K.DRIFT_EVENT_KIND_DRIFT_DETECTED, K.DRIFT_EVENT_KIND_REMEDIATION_STARTED, last],
                deployment_id=deployment_id,
            )
        # The cluster is back to the desired state.
        assert await until(
            lambda: kubectl.replicas("db-scaled"), lambda r: r == 1, within=20, what="spec.replicas back to 1"
        )
        state = await manager.wait_ready(deployment_id)
        assert [i.rule_id for i in state.drift_items if i.drift_class == pb.DRIFT_CLASS_UNEXPECTED] == []
        started = next(e for e in events if e.kind == K.DRIFT_EVENT_KIND_REMEDIATION_STARTED)
        assert "Replica count mismatch" in started.message
        resolved = next(e for e in events if e.kind == K.DRIFT_EVENT_KIND_DRIFT_RESOLVED)
        assert resolved.phase == pb.STATE_READY
        assert list(resolved.drift_items) == []
        # In sequence order, each once.
        assert watch.sequences == sorted(set(watch.sequences))
        # What the stream said is what the log says.
        history = await manager.events(PLATFORM, deployment_id=deployment_id)
        assert [e for e in history if e.sequence >= watch.sequences[0]][: len(watch.events)] == watch.events


async def _fight(api: k8s.ApiClient, name: str, stop: asyncio.Event, counter: list[int]) -> None:
    """Another actor: whenever the StatefulSet is back at 1 replica, scale it to 3 again."""
    apps = k8s.AppsV1Api(api)
    while not stop.is_set():
        sts = await apps.read_namespaced_stateful_set(name, PLATFORM)
        if sts.spec.replicas == 1:
            await apps.patch_namespaced_stateful_set_scale(
                name, PLATFORM, {"spec": {"replicas": 3}}, field_manager="autoscaler"
            )
            counter.append(1)
        await asyncio.sleep(0.02)


BACKOFF = re.compile(r"backing off ([0-9.]+)s")


async def test_a_fight_with_another_actor_backs_off_instead_of_spinning(
    tmp_path: pathlib.Path,
    tokens_file: pathlib.Path,
    sandbox_kubeconfig: pathlib.Path,
    kubectl: Kubectl,
    kube_api: k8s.ApiClient,
) -> None:
    async with (
        broker_on(
            tmp_path / "data", tokens_file, sandbox_kubeconfig, remediate=True, remediation_base_delay=0.2
        ) as broker,
        client_of(broker, PLATFORM_TOKEN) as manager,
    ):
        deployment_id = await manager.provision("db-fight")
        await manager.wait_ready(deployment_id)
        watch = manager.watch(deployment_id=deployment_id, after_sequence=await newest_sequence(broker))

        def backoffs() -> list[float]:
            return [
                float(m.group(1))
                for e in watch.events
                if e.kind == K.DRIFT_EVENT_KIND_REMEDIATION_STARTED
                and (m := BACKOFF.search(e.message)) is not None
            ]

        stop = asyncio.Event()
        scaled: list[int] = []
        fighter = asyncio.create_task(_fight(kube_api, "db-fight", stop, scaled))
        try:
            await kubectl.scale("db-fight", 3)
            await watch.wait_kinds([K.DRIFT_EVENT_KIND_REMEDIATION_STARTED], within=20)
            # Five seconds of fighting from the first attempt: a broker that spins would re-apply
            # hundreds of times; one that backs off (0.2, 0.4, 0.8, 1.6, 3.2 s) about five.
            window_end = time.monotonic() + 5.0
            await until(lambda: value(time.monotonic()), lambda now: now >= window_end, within=10, what="5 s")
            attempts_in_window = broker.remediator.attempts  # type: ignore[union-attr]
            started_in_window = watch.kinds().count(K.DRIFT_EVENT_KIND_REMEDIATION_STARTED)
            assert not fighter.done(), fighter
        finally:
            stop.set()
            await fighter
        delays = backoffs()
        assert len(delays) >= 3, watch.summary()
        # Each time the drift comes back soon after a remediation, the broker waits twice as long.
        assert delays[:4] == pytest.approx([0.2, 0.4, 0.8, 1.6][: len(delays[:4])]), delays
        assert all(later > earlier for earlier, later in itertools.pairwise(delays)), delays
        started = [e for e in watch.events if e.kind == K.DRIFT_EVENT_KIND_REMEDIATION_STARTED]
        assert "Re-applying the desired state" in started[0].message  # the first attempt waits for nothing
        assert all("came back" in e.message for e in started[1:]), [e.message for e in started]
        # Bounded: a handful of attempts in the window, not a hot loop.
        assert attempts_in_window <= 10, attempts_in_window
        assert started_in_window <= 10, [e.message for e in started]
        assert len(scaled) >= 3  # the other actor really did undo the broker each time


async def test_accepting_a_manual_scale_makes_it_desired_and_resolves_the_drift(
    tmp_path: pathlib.Path, tokens_file: pathlib.Path, sandbox_kubeconfig: pathlib.Path, kubectl: Kubectl
) -> None:
    async with (
        broker_on(tmp_path / "data", tokens_file, sandbox_kubeconfig) as broker,  # remediation off
        client_of(broker, PLATFORM_TOKEN) as manager,
    ):
        deployment_id = await manager.provision("db-accept")
        await manager.wait_ready(deployment_id)
        watch = manager.watch(deployment_id=deployment_id, after_sequence=await newest_sequence(broker))
        await kubectl.scale("db-accept", 3)
        await watch.wait_kinds([K.DRIFT_EVENT_KIND_DRIFT_DETECTED], deployment_id=deployment_id)

        reply = await manager.stub.AcceptDrift(
            pb.AcceptDriftRequest(namespace=PLATFORM, deployment_id=deployment_id, fields=["replicas"]),
            metadata=manager.auth,
        )

        assert list(reply.accepted_fields) == ["replicas"]
        assert reply.deployment.desired_spec.replicas == 3
        assert reply.deployment.generation == 2
        events = await watch.wait_kinds(
            [K.DRIFT_EVENT_KIND_DRIFT_DETECTED, K.DRIFT_EVENT_KIND_DRIFT_RESOLVED],
            deployment_id=deployment_id,
        )
        resolved = next(e for e in events if e.kind == K.DRIFT_EVENT_KIND_DRIFT_RESOLVED)
        assert resolved.generation == 2
        state = await manager.wait_ready(deployment_id)
        assert state.generation == 2
        assert state.desired_spec.replicas == 3
        assert state.actual_spec.replicas == 3
        assert [i for i in state.drift_items if i.drift_class == pb.DRIFT_CLASS_UNEXPECTED] == []
        assert await kubectl.replicas("db-accept") == 3  # the workload was not touched
        assert K.DRIFT_EVENT_KIND_REMEDIATION_STARTED not in watch.kinds()


async def test_an_alert_policy_for_the_namespace_stops_auto_remediation(
    tmp_path: pathlib.Path, tokens_file: pathlib.Path, sandbox_kubeconfig: pathlib.Path, kubectl: Kubectl
) -> None:
    async with (
        broker_on(tmp_path / "data", tokens_file, sandbox_kubeconfig, remediate=True) as broker,
        client_of(broker, PLATFORM_TOKEN) as manager,
    ):
        before = await manager.stub.GetRemediationPolicy(
            pb.GetRemediationPolicyRequest(namespace=PLATFORM), metadata=manager.auth
        )
        assert before.policy.mode == pb.REMEDIATION_MODE_AUTO
        reply = await manager.stub.SetRemediationPolicy(
            pb.SetRemediationPolicyRequest(
                policy=pb.RemediationPolicy(namespace=PLATFORM, mode=pb.REMEDIATION_MODE_ALERT)
            ),
            metadata=manager.auth,
        )
        assert reply.policy.mode == pb.REMEDIATION_MODE_ALERT
        for resource_type in (pb.RESOURCE_TYPE_UNSPECIFIED, pb.RESOURCE_TYPE_DATABASE):
            got = await manager.stub.GetRemediationPolicy(
                pb.GetRemediationPolicyRequest(namespace=PLATFORM, resource_type=resource_type),
                metadata=manager.auth,
            )
            assert got.policy.namespace == PLATFORM
            assert got.policy.mode == pb.REMEDIATION_MODE_ALERT, resource_type

        deployment_id = await manager.provision("db-alert")
        await manager.wait_ready(deployment_id)
        watch = manager.watch(deployment_id=deployment_id, after_sequence=await newest_sequence(broker))
        await kubectl.scale("db-alert", 3)
        events = await watch.wait_kinds([K.DRIFT_EVENT_KIND_DRIFT_DETECTED], deployment_id=deployment_id)
        detected = next(e for e in events if e.kind == K.DRIFT_EVENT_KIND_DRIFT_DETECTED)
        (item,) = [i for i in detected.drift_items if i.rule_id == "replicas.changed"]
        assert item.recommended_action == pb.RECOMMENDED_ACTION_ALERT_ONLY

        # A later change of the same resource is reported after it: had the broker remediated the first
        # one, its RemediationStarted would have been logged before (it starts at detection).
        await kubectl.scale("db-alert", 2)
        await watch.wait_kinds(
            [K.DRIFT_EVENT_KIND_DRIFT_DETECTED, K.DRIFT_EVENT_KIND_DRIFT_CHANGED], deployment_id=deployment_id
        )
        assert K.DRIFT_EVENT_KIND_REMEDIATION_STARTED not in watch.kinds(), watch.summary()
        assert broker.remediator is not None
        assert broker.remediator.attempts == 0
        assert await kubectl.replicas("db-alert") == 2
        state = await manager.state(deployment_id)
        assert state is not None
        assert state.phase == pb.STATE_DRIFT_DETECTED
        (item,) = [i for i in state.drift_items if i.rule_id == "replicas.changed"]
        assert item.recommended_action == pb.RECOMMENDED_ACTION_ALERT_ONLY
        assert (item.desired, item.actual) == ("1", "2")

        # The policy is in effect for everyone, not only for the caller who set it.
        async with client_of(broker, ADMIN_TOKEN) as admin:
            got = await admin.stub.GetRemediationPolicy(
                pb.GetRemediationPolicyRequest(namespace=PLATFORM), metadata=admin.auth
            )
            assert got.policy.mode == pb.REMEDIATION_MODE_ALERT


async def test_accepting_replicas_leaves_an_alert_only_image_and_its_drift_alone(
    tmp_path: pathlib.Path, tokens_file: pathlib.Path, sandbox_kubeconfig: pathlib.Path, kubectl: Kubectl
) -> None:
    """AcceptDrift changes nothing in the cluster: a hand-set postgres:16 stays, and stays reported."""
    async with (
        broker_on(tmp_path / "data", tokens_file, sandbox_kubeconfig) as broker,  # remediation off
        client_of(broker, PLATFORM_TOKEN) as manager,
    ):
        deployment_id = await manager.provision("db-keep")
        await manager.wait_ready(deployment_id)
        watch = manager.watch(deployment_id=deployment_id, after_sequence=await newest_sequence(broker))
        await kubectl.run("set", "image", "statefulset/db-keep", "postgresql=postgres:16")
        await kubectl.scale("db-keep", 3)

        async def drifted() -> set[str]:
            state = await manager.state(deployment_id)
            return {i.rule_id for i in state.drift_items} if state else set()

        await until(
            drifted, lambda r: {"version.major", "replicas.changed"} <= r, within=20, what="both drifts"
        )
        reply = await manager.stub.AcceptDrift(
            pb.AcceptDriftRequest(namespace=PLATFORM, deployment_id=deployment_id, fields=["replicas"]),
            metadata=manager.auth,
        )
        assert list(reply.accepted_fields) == ["replicas"]
        assert reply.deployment.desired_spec.replicas == 3
        assert reply.deployment.last_operation.state == pb.OPERATION_STATE_SUCCEEDED

        rules = await until(
            drifted, lambda r: "replicas.changed" not in r, within=20, what="replicas accepted"
        )
        assert "version.major" in rules  # not accepted: still reported
        await asyncio.sleep(0.5)  # anything the broker would (wrongly) apply has landed by now
        _, out, _ = await kubectl.run("get", "statefulset", "db-keep", "-o", "json")
        sts = json.loads(out)
        assert sts["spec"]["replicas"] == 3
        assert sts["spec"]["template"]["spec"]["containers"][0]["image"] == "postgres:16"
        assert K.DRIFT_EVENT_KIND_REMEDIATION_STARTED not in watch.kinds()


async def test_remediating_replicas_keeps_an_alert_only_image(
    tmp_path: pathlib.Path, tokens_file: pathlib.Path, sandbox_kubeconfig: pathlib.Path, kubectl: Kubectl
) -> None:
    async with (
        broker_on(tmp_path / "data", tokens_file, sandbox_kubeconfig, remediate=True) as broker,
        client_of(broker, PLATFORM_TOKEN) as manager,
    ):
        deployment_id = await manager.provision("db-mixed")
        await manager.wait_ready(deployment_id)
        watch = manager.watch(deployment_id=deployment_id, after_sequence=await newest_sequence(broker))
        await kubectl.run("set", "image", "statefulset/db-mixed", "postgresql=postgres:16")
        await kubectl.scale("db-mixed", 3)
        await watch.wait_kinds(
            [K.DRIFT_EVENT_KIND_REMEDIATION_STARTED, K.DRIFT_EVENT_KIND_REMEDIATION_SUCCEEDED],
            deployment_id=deployment_id,
        )
        await until(
            lambda: kubectl.replicas("db-mixed"), lambda r: r == 1, within=20, what="replicas back to 1"
        )
        _, out, _ = await kubectl.run("get", "statefulset", "db-mixed", "-o", "json")
        assert json.loads(out)["spec"]["template"]["spec"]["containers"][0]["image"] == "postgres:16"
        state = await manager.state(deployment_id)
        assert state is not None
        assert [i.rule_id for i in state.drift_items if i.drift_class == pb.DRIFT_CLASS_UNEXPECTED] == [
            "version.major"
        ]


async def test_env_set_by_hand_is_removed_and_only_then_called_a_success(
    tmp_path: pathlib.Path, tokens_file: pathlib.Path, sandbox_kubeconfig: pathlib.Path, kubectl: Kubectl
) -> None:
    """Server-side apply cannot take away kubectl's FOO; the broker must, and must not claim
    success while FOO is still there."""
    async with (
        broker_on(tmp_path / "data", tokens_file, sandbox_kubeconfig, remediate=True) as broker,
        client_of(broker, PLATFORM_TOKEN) as manager,
    ):
        deployment_id = await manager.provision("db-env")
        await manager.wait_ready(deployment_id)
        watch = manager.watch(deployment_id=deployment_id, after_sequence=await newest_sequence(broker))
        await kubectl.run("set", "env", "statefulset/db-env", "FOO=bar")
        events = await watch.wait_kinds(
            [
                K.DRIFT_EVENT_KIND_DRIFT_DETECTED,
                K.DRIFT_EVENT_KIND_REMEDIATION_STARTED,
                K.DRIFT_EVENT_KIND_REMEDIATION_SUCCEEDED,
            ],
            deployment_id=deployment_id,
        )
        detected = next(e for e in events if e.kind == K.DRIFT_EVENT_KIND_DRIFT_DETECTED)
        assert any(i.rule_id == "config.changed" and "FOO" in i.actual for i in detected.drift_items)

        async def env_names() -> list[str]:
            _, out, _ = await kubectl.run("get", "statefulset", "db-env", "-o", "json")
            return [
                v["name"] for v in json.loads(out)["spec"]["template"]["spec"]["containers"][0].get("env", [])
            ]

        names = await until(
            env_names, lambda n: "FOO" not in n, within=20, what="FOO removed from the cluster"
        )
        assert "POSTGRES_PASSWORD" in names  # the broker's own variables are still there
        await watch.wait_kinds([K.DRIFT_EVENT_KIND_DRIFT_RESOLVED], deployment_id=deployment_id)
        await asyncio.sleep(1.0)
        assert watch.kinds(deployment_id).count(K.DRIFT_EVENT_KIND_REMEDIATION_SUCCEEDED) == 1, (
            watch.summary()
        )
        assert K.DRIFT_EVENT_KIND_REMEDIATION_FAILED not in watch.kinds(deployment_id)

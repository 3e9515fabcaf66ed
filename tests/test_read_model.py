"""The detector is the only evaluator: what reads show is its verdict, kept per deployment.

What a user sees of that: every drift item carries when it was first detected; a policy change is in
force at once (not at the next resync); the open-drift metric follows deprovisions; a restart does
not flap health through Unknown; and a message never contradicts the health next to it.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import gc
import json
import pathlib
import shutil
from typing import Any

import aiohttp
import pytest
from broker_client.v1 import broker_pb2 as pb
from conftest import ADMIN_TOKEN, PLATFORM_TOKEN
from test_store_contract import NS, command
from test_watch_support import PLATFORM, Kubectl, broker_on, client_of, until

from broker import auth, errors, service
from broker.api import encoded, seed_json
from broker.domain import catalog, model
from broker.kube import entries
from broker.store import sqlite

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not on PATH")

K = pb.DriftEventKind
# A resync far away: whatever happens in these tests happens because of an event, not the sweep.
SLOW_RESYNC = {"resync_interval": 600.0}


@pytest.fixture
def kubectl(sandbox_kubeconfig: pathlib.Path, tmp_path: pathlib.Path) -> Kubectl:
    return Kubectl(sandbox_kubeconfig, tmp_path / "kube-cache")


async def test_every_drift_item_says_when_it_was_first_detected(
    tmp_path: pathlib.Path, tokens_file: pathlib.Path, sandbox_kubeconfig: pathlib.Path, kubectl: Kubectl
) -> None:
    async with (
        broker_on(tmp_path / "data", tokens_file, sandbox_kubeconfig, **SLOW_RESYNC) as broker,
        client_of(broker, PLATFORM_TOKEN) as manager,
    ):
        deployment_id = await manager.provision("db-when")
        await manager.wait_ready(deployment_id)
        before = datetime.datetime.now(datetime.UTC)
        await kubectl.scale("db-when", 3)
        state = await until(
            lambda: manager.state(deployment_id),
            lambda s: s is not None and any(i.rule_id == "replicas.changed" for i in s.drift_items),
            within=15,
            what="the replica drift",
        )
        assert state is not None
        for item in state.drift_items:  # the expected patch drift too
            assert item.HasField("detect_time"), item
        (replicas,) = [i for i in state.drift_items if i.rule_id == "replicas.changed"]
        first_seen = replicas.detect_time.ToDatetime(tzinfo=datetime.UTC)
        assert before - datetime.timedelta(seconds=1) <= first_seen <= datetime.datetime.now(datetime.UTC)
        # Still the first detection later on, after other changes of the same resource.
        await kubectl.run("label", "statefulset", "db-when", "extra=1")
        again = await manager.state(deployment_id)
        assert again is not None
        (same,) = [i for i in again.drift_items if i.rule_id == "replicas.changed"]
        assert same.detect_time == replicas.detect_time
        async with manager.http.get(
            "/v1/resources", params={"namespace": PLATFORM, "deploymentId": deployment_id}
        ) as r:
            doc = await r.json()
        items = doc["resources"][0]["driftItems"]
        assert all("detectTime" in i for i in items), items


async def test_a_policy_change_is_in_force_at_once_not_at_the_next_resync(
    tmp_path: pathlib.Path, tokens_file: pathlib.Path, sandbox_kubeconfig: pathlib.Path, kubectl: Kubectl
) -> None:
    async with (
        broker_on(tmp_path / "data", tokens_file, sandbox_kubeconfig, **SLOW_RESYNC) as broker,
        client_of(broker, PLATFORM_TOKEN) as manager,
    ):
        deployment_id = await manager.provision("db-policy")
        await manager.wait_ready(deployment_id)
        await kubectl.scale("db-policy", 3)
        watch = manager.watch(deployment_id=deployment_id)
        await until(
            lambda: manager.state(deployment_id),
            lambda s: s is not None and s.phase == pb.STATE_DRIFT_DETECTED,
            within=15,
            what="drift",
        )
        await manager.stub.SetRemediationPolicy(
            pb.SetRemediationPolicyRequest(
                policy=pb.RemediationPolicy(namespace=PLATFORM, mode=pb.REMEDIATION_MODE_OFF)
            ),
            metadata=manager.auth,
        )
        # Off: the drift is no longer reported, and the detector says so, well before a resync.
        await watch.wait_kinds([K.DRIFT_EVENT_KIND_DRIFT_RESOLVED], deployment_id=deployment_id, within=10)
        state = await manager.state(deployment_id)
        assert state is not None
        assert state.phase == pb.STATE_READY
        assert [i for i in state.drift_items if i.drift_class == pb.DRIFT_CLASS_UNEXPECTED] == []


async def open_drifts(broker_http: str) -> float:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{broker_http}/metrics", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as r,
    ):
        text = await r.text()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("broker_open_drifts{") and f'namespace="{PLATFORM}"' in line
    )


async def test_the_open_drift_metric_follows_a_deprovision(
    tmp_path: pathlib.Path, tokens_file: pathlib.Path, sandbox_kubeconfig: pathlib.Path, kubectl: Kubectl
) -> None:
    async with (
        broker_on(tmp_path / "data", tokens_file, sandbox_kubeconfig, **SLOW_RESYNC) as broker,
        client_of(broker, PLATFORM_TOKEN) as manager,
    ):
        url = f"http://127.0.0.1:{broker.http_port}"
        deployment_id = await manager.provision("db-gone")
        await manager.wait_ready(deployment_id)
        await kubectl.scale("db-gone", 3)
        await until(lambda: open_drifts(url), lambda n: n == 1, within=15, what="one open drift")
        await manager.stub.Deprovision(
            pb.DeprovisionRequest(namespace=PLATFORM, deployment_id=deployment_id), metadata=manager.auth
        )
        await until(
            lambda: open_drifts(url), lambda n: n == 0, within=20, what="no open drift after deprovision"
        )


async def test_a_restart_does_not_flap_health_through_unknown(
    tmp_path: pathlib.Path, tokens_file: pathlib.Path, sandbox_kubeconfig: pathlib.Path
) -> None:
    data = tmp_path / "data"
    async with (
        broker_on(data, tokens_file, sandbox_kubeconfig) as broker,
        client_of(broker, PLATFORM_TOKEN) as manager,
    ):
        deployment_id = await manager.provision("db-steady")
        await manager.wait_ready(deployment_id)
        _, last = await broker.store.event_bounds()
    async with (
        broker_on(data, tokens_file, sandbox_kubeconfig) as broker,
        client_of(broker, PLATFORM_TOKEN) as manager,
    ):
        await manager.wait_ready(deployment_id)
        detector = broker.detector
        assert detector is not None
        await until(
            lambda: manager.state(deployment_id),
            lambda s: s is not None and s.health_status == pb.HEALTH_STATUS_HEALTHY,
            within=10,
            what="healthy",
        )
        await broker.detector.evaluate(deployment_id)  # as a resync would
        later = [e for e in await manager.events(PLATFORM, deployment_id=deployment_id) if e.sequence > last]
        assert [e for e in later if e.kind == K.DRIFT_EVENT_KIND_HEALTH_CHANGED] == [], later


async def test_reads_never_go_back_to_a_world_before_a_change_they_showed(
    tmp_path: pathlib.Path,
    tokens_file: pathlib.Path,
    sandbox: Any,
    sandbox_kubeconfig: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A verdict kept after its evaluation awaited the store is older than a change that came meanwhile.

    The detector judges a crash, and while it records that, the pod heals and reads show it
    Healthy. Once the crash's verdict is kept, reads must not show Unhealthy again: the pod is
    healed, and the detector is already judging that.
    """
    async with (
        broker_on(tmp_path / "data", tokens_file, sandbox_kubeconfig, **SLOW_RESYNC) as broker,
        client_of(broker, PLATFORM_TOKEN) as manager,
    ):
        deployment_id = await manager.provision("db-mono")
        await manager.wait_ready(deployment_id)
        record = broker.store.record_evaluations
        entered: asyncio.Queue[None] = asyncio.Queue()
        permits: asyncio.Queue[None] = asyncio.Queue()

        async def gated(*args: Any, **kwargs: Any) -> Any:
            entered.put_nowait(None)
            await permits.get()
            return await record(*args, **kwargs)

        monkeypatch.setattr(broker.store, "record_evaluations", gated)

        async def health() -> int:
            state = await manager.state(deployment_id)
            assert state is not None
            return state.health_status

        async def namespace_health() -> list[int]:
            reply = await manager.stub.GetResourceState(
                pb.GetResourceStateRequest(namespace=PLATFORM), metadata=manager.auth
            )
            return [r.health_status for r in reply.resources]

        assert await namespace_health() == [pb.HEALTH_STATUS_HEALTHY]  # a page kept
        try:
            sandbox.faults.crash_pod(namespace=PLATFORM, name="db-mono-0")
            await asyncio.wait_for(entered.get(), 10)  # the crash is being recorded
            # Shown at once, by every read: the kept page of the namespace is not current any more.
            assert await health() == pb.HEALTH_STATUS_UNHEALTHY
            assert await namespace_health() == [pb.HEALTH_STATUS_UNHEALTHY]
            sandbox.faults.heal_pod(namespace=PLATFORM, name="db-mono-0")
            await until(health, lambda h: h == pb.HEALTH_STATUS_HEALTHY, within=10, what="the heal shown")
            permits.put_nowait(None)  # the crash's verdict is kept; the heal's evaluation records next
            await asyncio.wait_for(entered.get(), 10)
            assert await health() == pb.HEALTH_STATUS_HEALTHY
            async with manager.http.get(  # the gateway: a page of its own
                "/v1/resources", params={"namespace": PLATFORM, "deploymentId": deployment_id}
            ) as r:
                assert r.status == 200
                assert (await r.json())["resources"][0]["healthStatus"] == "Healthy"
        finally:
            for _ in range(4):
                permits.put_nowait(None)
        detector = broker.detector
        assert detector is not None
        await until(
            lambda: _kept_health(detector, broker, deployment_id),
            lambda h: h is model.Health.HEALTHY,
            within=10,
            what="the heal's verdict kept",
        )
        assert await health() == pb.HEALTH_STATUS_HEALTHY


async def test_a_failed_evaluation_does_not_bring_back_the_verdict_before_the_change(
    tmp_path: pathlib.Path,
    tokens_file: pathlib.Path,
    sandbox: Any,
    sandbox_kubeconfig: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The store fails to record a crash: reads keep showing the crash (provisional), not Healthy."""
    async with (
        broker_on(tmp_path / "data", tokens_file, sandbox_kubeconfig, **SLOW_RESYNC) as broker,
        client_of(broker, PLATFORM_TOKEN) as manager,
    ):
        deployment_id = await manager.provision("db-fail")
        await manager.wait_ready(deployment_id)
        detector = broker.detector
        assert detector is not None
        failed = asyncio.Event()

        async def failing(*args: Any, **kwargs: Any) -> Any:
            failed.set()
            raise errors.Unavailable("the store failed to commit: OperationalError")

        monkeypatch.setattr(broker.store, "record_evaluations", failing)
        sandbox.faults.crash_pod(namespace=PLATFORM, name="db-fail-0")
        await asyncio.wait_for(failed.wait(), 10)
        await asyncio.sleep(0.2)  # the sweep logged the failure and moved on
        for _ in range(3):
            state = await manager.state(deployment_id)
            assert state is not None
            assert state.health_status == pb.HEALTH_STATUS_UNHEALTHY
        # One provisional verdict, made by the first read after the change, for every read after it.
        deployment = await broker.store.deployment_by_id(deployment_id)
        assert deployment is not None
        first = detector.verdict(deployment)
        assert first is not None
        assert first.health is model.Health.UNHEALTHY
        assert detector.verdict(deployment) is first


async def _kept_health(detector: Any, broker: Any, deployment_id: str) -> model.Health | None:
    deployment = await broker.store.deployment_by_id(deployment_id)
    verdict = detector.verdict(deployment)
    return verdict.health if verdict is not None else None


async def test_the_message_never_contradicts_the_health(
    tmp_path: pathlib.Path, tokens_file: pathlib.Path, sandbox_kubeconfig: pathlib.Path, kubectl: Kubectl
) -> None:
    async with (
        broker_on(tmp_path / "data", tokens_file, sandbox_kubeconfig) as broker,
        client_of(broker, PLATFORM_TOKEN) as manager,
    ):
        deployment_id = await manager.provision("db-sick")
        await manager.wait_ready(deployment_id)
        await kubectl.run("delete", "secret", "db-sick-credentials")
        state = await until(
            lambda: manager.state(deployment_id),
            lambda s: s is not None and s.health_status == pb.HEALTH_STATUS_UNHEALTHY,
            within=15,
            what="unhealthy",
        )
        assert state is not None
        assert "healthy" not in state.message.lower().replace("unhealthy", ""), state.message


async def test_the_caches_keep_only_what_the_broker_reads(
    tmp_path: pathlib.Path, tokens_file: pathlib.Path, sandbox_kubeconfig: pathlib.Path, kubectl: Kubectl
) -> None:
    async with (
        broker_on(tmp_path / "data", tokens_file, sandbox_kubeconfig) as broker,
        client_of(broker, PLATFORM_TOKEN) as manager,
    ):
        deployment_id = await manager.provision("db-small")
        await manager.wait_ready(deployment_id)
        cluster = broker.cluster
        assert cluster is not None
        sts = cluster.informers["StatefulSet"].get(PLATFORM, "db-small")
        pod = cluster.informers["Pod"].get(PLATFORM, "db-small-0")
        secret = cluster.informers["Secret"].get(PLATFORM, "db-small-credentials")
        assert isinstance(sts, entries.Workload)
        assert isinstance(pod, entries.Pod)
        assert isinstance(secret, entries.Secret)
        # Parsed at ingest: what observing reads, no JSON.
        assert (sts.owner, sts.replicas, sts.image) == (deployment_id, 1, "postgres:15.2")
        assert set(sts.env) == {"POSTGRES_DB", "POSTGRES_USER", "POSTGRES_PASSWORD", "PGDATA"}
        assert (pod.owner, pod.ready, pod.phase, pod.image) == (
            deployment_id,
            True,
            "Running",
            "postgres:15.2",
        )
        full = json.loads((await kubectl.run("get", "secret", "db-small-credentials", "-o", "json"))[1])
        # A Secret's record has no data: its values never stay in the broker's memory.
        for value in full["data"].values():
            assert value not in repr(secret)
            assert base64.b64decode(value).decode() not in repr(secret)
        assert not secret.changed
        # Records are never walked by full collections, and the five objects of a deployment share
        # one copy of its id.
        for record in (sts, pod, secret):
            assert not gc.is_tracked(record)
        assert sts.owner is pod.owner is secret.owner


async def test_a_namespace_page_is_kept_encoded_and_follows_every_change(
    tmp_path: pathlib.Path, tokens_file: pathlib.Path, sandbox_kubeconfig: pathlib.Path, kubectl: Kubectl
) -> None:
    """Reads answer kept bytes; what they say is what a fresh conversion says, and a drift shows."""
    async with (
        broker_on(tmp_path / "data", tokens_file, sandbox_kubeconfig, **SLOW_RESYNC) as broker,
        client_of(broker, PLATFORM_TOKEN) as manager,
    ):
        ids = [await manager.provision(f"db-page-{i}") for i in range(3)]
        for deployment_id in ids:
            await manager.wait_ready(deployment_id)
        request = pb.GetResourceStateRequest(namespace=PLATFORM, page_size=2)

        async def both() -> tuple[pb.GetResourceStateResponse, dict[str, object]]:
            reply = await manager.stub.GetResourceState(request, metadata=manager.auth)
            async with manager.http.get(
                "/v1/resources", params={"namespace": PLATFORM, "pageSize": "2"}
            ) as r:
                assert r.status == 200
                assert r.content_type == "application/json"
                return reply, await r.json()

        first, doc = await both()
        assert first.total == 3
        assert len(first.resources) == 2
        assert first.next_page_token
        assert [r.resource_name for r in first.resources] == ["db-page-0", "db-page-1"]
        # The gateway's document is the seed rendering of the same response, field for field.
        assert doc == seed_json.render(first)
        # Unchanged, the page reads the same bytes again (kept or rebuilt: this cannot tell them apart;
        # what it can tell is that the kept parts follow the change below).
        again, _ = await both()
        assert again.SerializeToString() == first.SerializeToString()
        # Evaluated again with nothing changed, a verdict stands as it was: the page is still current.
        # (Usage moves once a minute: a second try is allowed for a minute that turned meanwhile.)
        assert broker.detector is not None
        for _ in range(2):
            version = broker.detector.version(PLATFORM)
            for deployment_id in ids:
                await broker.detector.evaluate(deployment_id)
            if broker.detector.version(PLATFORM) == version:
                break
        else:
            raise AssertionError("re-evaluating unchanged resources changed their verdicts")
        await kubectl.scale("db-page-1", 3)

        async def drifted() -> pb.GetResourceStateResponse:
            return (await both())[0]

        changed = await until(
            drifted,
            lambda r: any(i.rule_id == "replicas.changed" for i in r.resources[1].drift_items),
            within=15,
            what="the scaled resource's drift in the page",
        )
        assert changed.resources[1].phase == pb.STATE_DRIFT_DETECTED
        assert changed.resources[0] == first.resources[0]
        rest = await manager.stub.GetResourceState(
            pb.GetResourceStateRequest(namespace=PLATFORM, page_size=2, page_token=first.next_page_token),
            metadata=manager.auth,
        )
        assert [r.resource_name for r in rest.resources] == ["db-page-2"]
        assert not rest.next_page_token


async def test_an_unchanged_view_reuses_its_encoding_and_a_changed_one_does_not(
    tmp_path: pathlib.Path,
) -> None:
    """The kept part is reused by the view's identity only: a new view (a change) is encoded afresh."""
    store = await sqlite.Store.open(tmp_path)
    try:
        svc = service.BrokerService(store=store, catalog=catalog.DEFAULT_CATALOG)
        result = await store.provision(command("db-kept"))
        deployment = await store.deployment_by_id(result.deployment_id)
        assert deployment is not None
        view = svc._view(deployment)
        assert svc._view(await store.deployment_by_id(result.deployment_id)) is view  # same row, same view
        kept = encoded.of(svc)
        page = model.Page(items=(view,), total=1, next_token="")
        first = kept.page("ns", page)
        assert kept.page("ns", page).proto == first.proto
        part = kept._parts[deployment.deployment_id]
        kept.page("ns", page)
        assert kept._parts[deployment.deployment_id] is part
        changed = await store.provision(command("db-kept", replicas=3))
        again = svc._view(await store.deployment_by_id(changed.deployment_id))
        assert again is not view
        kept.page("ns", model.Page(items=(again,), total=1, next_token=""))
        assert kept._parts[deployment.deployment_id] is not part
        assert kept._parts[deployment.deployment_id].message.desired_spec.replicas == 3
    finally:
        await store.close()


class _Verdicts:
    """A detector stand-in that keeps no verdicts but says when they changed."""

    def __init__(self) -> None:
        self.versions: dict[str, int] = {}

    def verdict(self, deployment: model.Deployment) -> None:
        return None

    def reevaluate(self, namespace: str, resource_type: model.ResourceType | None) -> None:
        pass

    def version(self, namespace: str) -> int:
        return self.versions.get(namespace, 0)


async def test_an_unchanged_page_is_answered_without_reading_the_store(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The page is kept while nothing is committed and no verdict of its namespace changes."""
    store = await sqlite.Store.open(tmp_path)
    try:
        verdicts = _Verdicts()
        svc = service.BrokerService(store=store, catalog=catalog.DEFAULT_CATALOG, verdicts=verdicts)
        listings = 0
        list_deployments = store.list_deployments

        async def counted(*args: object) -> model.Listing[model.Deployment]:
            nonlocal listings
            listings += 1
            return await list_deployments(*args)  # type: ignore[arg-type]

        monkeypatch.setattr(store, "list_deployments", counted)
        principal = auth.Principal("admin", frozenset({NS}))
        read = service.ResourceStateInput(namespace=NS)
        await store.provision(command("db-a"))
        first = await svc.get_resource_state(principal, read)
        assert [v.deployment.resource_name for v in first.items] == ["db-a"]
        assert svc.is_kept(first)
        assert await svc.get_resource_state(principal, read) is first
        assert listings == 1
        kept = encoded.of(svc)
        assert kept.page(NS, first, keep=True) is kept.page(NS, first, keep=True)

        await store.provision(command("db-b"))  # a commit
        second = await svc.get_resource_state(principal, read)
        assert [v.deployment.resource_name for v in second.items] == ["db-a", "db-b"]
        assert listings == 2
        assert not svc.is_kept(first)
        assert b"db-b" in kept.page(NS, second, keep=True).proto

        verdicts.versions["other"] = 1  # another namespace's verdicts: this page stands
        assert await svc.get_resource_state(principal, read) is second
        verdicts.versions[NS] = 1
        third = await svc.get_resource_state(principal, read)
        assert third is not second
        assert listings == 3
        # Another query of the namespace is a page of its own.
        one = await svc.get_resource_state(
            principal, service.ResourceStateInput(namespace=NS, resource_name="db-b")
        )
        assert [v.deployment.resource_name for v in one.items] == ["db-b"]
        assert await svc.get_resource_state(principal, read) is third

        # Where other processes write too, the store cannot tell: every read lists.
        monkeypatch.setattr(store, "deployments_version", lambda: None)
        before = listings
        fourth = await svc.get_resource_state(principal, read)
        assert await svc.get_resource_state(principal, read) is not fourth
        assert listings == before + 2
        assert not svc.is_kept(fourth)
    finally:
        await store.close()


async def test_a_metrics_poll_moves_only_the_usage_of_a_kept_verdict(
    tmp_path: pathlib.Path,
    tokens_file: pathlib.Path,
    sandbox: Any,
    sandbox_kubeconfig: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Usage is all a metrics poll changes (most figures move at every poll in a real cluster):
    reads show the new figures, and no deployment is evaluated again for them."""
    async with (
        broker_on(
            tmp_path / "data", tokens_file, sandbox_kubeconfig, metrics_interval=0.2, **SLOW_RESYNC
        ) as broker,
        client_of(broker, PLATFORM_TOKEN) as manager,
    ):
        deployment_id = await manager.provision("db-usage")
        await manager.wait_ready(deployment_id)

        async def state() -> pb.ResourceState:
            found = await manager.state(deployment_id)
            assert found is not None
            return found

        await until(state, lambda s: s.resource_usage.cpu_usage != "", within=10, what="usage polled")
        detector = broker.detector
        assert detector is not None
        deployment = await broker.store.deployment_by_id(deployment_id)
        assert deployment is not None
        before = detector.verdict(deployment)
        assert before is not None
        judged: list[str] = []
        judging = detector._judging

        async def counted(judged_id: str, listed: model.Deployment | None) -> Any:
            judged.append(judged_id)
            return await judging(judged_id, listed)

        monkeypatch.setattr(detector, "_judging", counted)
        real = sandbox._api.metrics

        def busier(namespace: str | None, name: str | None) -> list[dict[str, Any]]:
            found: list[dict[str, Any]] = real(namespace, name)
            for pod in found:
                for container in pod["containers"]:
                    container["usage"]["cpu"] = "777m"
            return found

        sandbox._api.metrics = busier
        try:
            after = await until(
                state, lambda s: s.resource_usage.cpu_usage == "777m", within=10, what="new usage"
            )
        finally:
            sandbox._api.metrics = real
        assert after.health_status == pb.HEALTH_STATUS_HEALTHY
        assert deployment_id not in judged  # the verdict took the figures; nothing was evaluated
        kept = detector.verdict(deployment)
        assert kept is not None
        assert kept.usage is not None
        assert kept.usage.cpu == "777m"
        assert kept.items is before.items  # the rest of the verdict is the one kept before
        assert kept.actual_spec is before.actual_spec

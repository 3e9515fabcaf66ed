"""The cluster as the broker sees it: informer caches, observations, and the writes it makes.

``ClusterState`` runs one informer per managed kind (all by the broker's label selector), polls pod
metrics (the metrics API cannot be watched), turns cached objects into ``drift.Observation`` for the
pure drift engine, and applies or deletes a deployment's objects. Readers never call the API:
everything they get comes from the caches.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import decimal
import logging
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, TypeVar

from broker import errors, workers
from broker.domain import catalog as catalog_mod
from broker.domain import drift, model, naming
from broker.kube import client as kube_client
from broker.kube import entries, manifests
from broker.kube import informer as informer_mod

log = logging.getLogger(__name__)

JsonDict = kube_client.JsonDict
# Objects as the API server answered the broker's writes, by kind: fresher than the caches.
Written = Mapping[str, JsonDict]
WORKLOAD_KINDS = ("StatefulSet", "Service", "Secret", "Pod", "PersistentVolumeClaim")
TOPIC_KINDS = ("KafkaTopic",)
# The objects a deployment is looked up by name: kept as strays when relabelled out of the selection.
STRAY_KINDS = frozenset({"StatefulSet", "Service", "Secret", "KafkaTopic"})


def config_changes(have: Mapping[str, str], want: Mapping[str, str]) -> tuple[str, ...]:
    """Differences in the broker-owned configuration (rendered container env), live against desired."""
    changes = [f"env {name} added" for name in sorted(have.keys() - want.keys())]
    changes += [f"env {name} removed" for name in sorted(want.keys() - have.keys())]
    changes += [
        f"env {name} changed" for name in sorted(want.keys() & have.keys()) if want[name] != have[name]
    ]
    return tuple(changes)


def _pod(pod: entries.Pod, usage: tuple[decimal.Decimal, decimal.Decimal] | None) -> drift.PodObservation:
    """One pod, with its usage when metrics are served."""
    return drift.PodObservation(
        name=pod.name,
        phase=pod.phase,
        ready=pod.ready,
        restart_count=pod.restart_count,
        waiting_reason=pod.waiting_reason,
        image=pod.image,
        cpu_usage=usage[0] if usage else None,
        memory_usage=usage[1] if usage else None,
        last_restart=pod.last_restart,
    )


def _workload(sts: entries.Workload, desired_env: dict[str, str]) -> drift.WorkloadObservation:
    return drift.WorkloadObservation(
        replicas=sts.replicas,
        image=sts.image,
        resources=model.ComputeResources(
            cpu_request=sts.cpu_request,
            cpu_limit=sts.cpu_limit,
            memory_request=sts.memory_request,
            memory_limit=sts.memory_limit,
            storage=sts.storage,
        ),
        labels=dict(sts.labels),
        field_managers=dict(sts.field_managers),
        config_changes=config_changes(sts.env, desired_env),
        unreadable=dict(sts.unreadable),
    )


def _topic(topic: entries.Topic) -> drift.TopicObservation:
    return drift.TopicObservation(
        partitions=topic.partitions,
        replicas=topic.replicas,
        retention_ms=topic.retention_ms,
        ready=topic.ready,
        labels=dict(topic.labels),
        field_managers=dict(topic.field_managers),
        unreadable=dict(topic.unreadable),
    )


E = TypeVar("E", entries.Workload, entries.Secret, entries.Topic, entries.Named)


def _owned(kind: type[E], record: entries.Entry | None, deployment_id: str) -> E | None:
    """The record if it is of ``kind`` and belongs to this deployment (a namesake of another does not)."""
    return record if isinstance(record, kind) and record.owner == deployment_id else None


def _keep_workload_fields(manifest: JsonDict, live: JsonDict, keep: frozenset[str]) -> None:
    """Put the live values of the kept drift fields into a StatefulSet manifest about to be applied."""
    want, have = entries.first_container(manifest), entries.first_container(live)
    if keep & {"version", "engine"} and have.get("image"):
        want["image"] = have["image"]
    if "size" in keep and have.get("resources"):
        want["resources"] = have["resources"]
    if "config" in keep and "env" in have:
        want["env"] = have["env"]
    if "replicas" in keep and "replicas" in (live.get("spec") or {}):
        manifest["spec"]["replicas"] = live["spec"]["replicas"]
    manifest["spec"]["template"]["spec"]["containers"][0] = want


def _keep_topic_fields(manifest: JsonDict, live: JsonDict, keep: frozenset[str]) -> None:
    """Put the live values of the kept drift fields into a KafkaTopic manifest about to be applied."""
    spec, have = manifest["spec"], live.get("spec") or {}
    if "partitions" in keep and "partitions" in have:
        spec["partitions"] = have["partitions"]
    if "replicas" in keep and "replicas" in have:
        spec["replicas"] = have["replicas"]
    live_retention = (have.get("config") or {}).get("retention.ms")
    if "retention_ms" in keep and live_retention is not None:
        spec.setdefault("config", {})["retention.ms"] = live_retention


class ClusterState:
    """Caches of the managed objects, observations built from them, and the broker's writes."""

    def __init__(
        self,
        client: kube_client.Client,
        *,
        catalog: catalog_mod.Catalog,
        on_change: Callable[[str], None] = lambda deployment_id: None,
        kafka_cluster: str = "kafka",
        metrics_interval: float = 15.0,
    ) -> None:
        self.client = client
        self._catalog = catalog
        self._listeners: list[Callable[[str], None]] = [on_change]
        self._usage_listeners: list[Callable[[str], None]] = []
        self._sync_listeners: list[Callable[[], None]] = []
        self._kafka_cluster = kafka_cluster
        self._metrics_interval = metrics_interval
        self.informers: dict[str, informer_mod.Informer[entries.Entry]] = {
            kind: informer_mod.Informer(
                client,
                kind,
                label_selector=naming.SELECTOR,
                on_change=self._changed,
                decode=entries.kind(kind).decode,
                decode_page=entries.kind(kind).page,
                index=entries.owner_of,
                on_sync=self._sync_changed,
            )
            for kind in (*WORKLOAD_KINDS, *TOPIC_KINDS)
        }
        self._metrics: dict[tuple[str, str], tuple[decimal.Decimal, decimal.Decimal]] = {}
        self._env_cache: dict[str, tuple[int, dict[str, str]]] = {}
        # Objects relabelled out of the selection, by (kind, namespace, name), as last looked up.
        self._strays: dict[tuple[str, str, str], entries.Entry] = {}
        self._lookups: set[asyncio.Task[None]] = set()
        self.metrics_available = False

    def _changed(self, kind: str, event_type: str, record: entries.Entry) -> None:
        deployment_id = record.owner
        if kind in STRAY_KINDS:
            key = (kind, record.namespace, record.name)
            if event_type == "DELETED":
                # Deleted, or relabelled out of the selection: a lookup by name tells which.
                lookup = asyncio.create_task(self._look_for_stray(key, deployment_id))
                self._lookups.add(lookup)
                lookup.add_done_callback(self._lookups.discard)
            else:
                self._strays.pop(key, None)
        if deployment_id:
            self._notify(deployment_id)

    def _sync_changed(self, kind: str, synced: bool) -> None:
        for listener in self._sync_listeners:
            listener()

    def add_sync_listener(self, on_sync: Callable[[], None]) -> None:
        """Also call ``on_sync`` when the caches become readable, or stop being readable."""
        self._sync_listeners.append(on_sync)

    def _notify(self, deployment_id: str) -> None:
        for listener in self._listeners:
            listener(deployment_id)

    async def _look_for_stray(self, key: tuple[str, str, str], deployment_id: str) -> None:
        """Keep an object the selection lost but that still exists and was written by the broker."""
        kind, namespace, name = key
        try:
            obj = await self.client.get(kind, namespace, name)
        except errors.NotFound:
            self._strays.pop(key, None)
        except errors.BrokerError as e:
            log.debug("cannot look up a lost object", extra={"kind": kind, "name": name, "error": e.message})
            return
        else:
            written_by_broker = any(
                entry.get("manager") == kube_client.FIELD_MANAGER
                for entry in (obj.get("metadata") or {}).get("managedFields") or []
            )
            if written_by_broker and self.informers[kind].get(namespace, name) is None:
                self._strays[key] = entries.project(kind, obj)
            else:
                self._strays.pop(key, None)
        if deployment_id:
            self._notify(deployment_id)

    async def _refresh_strays(self) -> None:
        """Strays have no watch: look each up again (a deleted one goes, a changed one updates)."""
        for key, obj in list(self._strays.items()):
            await self._look_for_stray(key, obj.owner)

    def add_listener(self, on_change: Callable[[str], None]) -> None:
        """Also tell ``on_change`` (by deployment id) when any of a deployment's objects changes."""
        self._listeners.append(on_change)

    def add_usage_listener(self, on_usage: Callable[[str], None]) -> None:
        """Tell ``on_usage`` (by deployment id) when the metrics of a deployment's pods change."""
        self._usage_listeners.append(on_usage)

    def workers(self) -> dict[str, Coroutine[Any, Any, None]]:
        """The informers and the metrics poller, by name, for the owner's supervisor to run."""
        running: dict[str, Coroutine[Any, Any, None]] = {
            f"informer-{inf.kind}": inf.run() for inf in self.informers.values()
        }
        running["metrics-poller"] = self._poll_metrics()
        return running

    async def wait_synced(self, within: float) -> bool:
        """Wait until every cache completed its first list; False if that takes longer than ``within`` s."""
        try:
            async with asyncio.timeout(within):
                for inf in self.informers.values():
                    await inf.synced.wait()
        except TimeoutError:
            return False
        return True

    @property
    def synced(self) -> bool:
        """Whether every cache is currently trustworthy."""
        return all(inf.synced.is_set() for inf in self.informers.values())

    def not_synced_reason(self) -> str | None:
        """Why the caches cannot be trusted, or None."""
        for inf in self.informers.values():
            if not inf.synced.is_set():
                return f"{inf.kind} cache not synced" + (f": {inf.last_error}" if inf.last_error else "")
        return None

    async def stop(self) -> None:
        """Stop the lookups in flight and close the client (the owner stops the workers)."""
        await workers.cancel_and_wait(self._lookups)
        await self.client.close()

    async def _poll_metrics(self) -> None:
        async def poll() -> None:
            await self._refresh_strays()
            previous, was_available = self._metrics, self.metrics_available
            try:
                fresh: dict[tuple[str, str], tuple[decimal.Decimal, decimal.Decimal]] = {}
                async for page in self.client.pages(
                    "PodMetrics", decode=entries.USAGE.page, label_selector=naming.SELECTOR
                ):
                    fresh.update(((u.namespace, u.name), (u.cpu, u.memory)) for u in page.items)
                self._metrics = fresh
                self.metrics_available = True
            except errors.NotFound:
                self.metrics_available = False  # metrics.k8s.io is not served: usage is absent
            except errors.BrokerError as e:
                log.debug("pod metrics unavailable", extra={"error": e.message})
                self.metrics_available = False
            # Usage is part of each deployment's verdict, and all a poll changes: tell the usage
            # listeners of the deployments whose pods' figures changed (not the change listeners:
            # nothing else moved, and in a real cluster most figures move at every poll).
            changed = previous.keys() | self._metrics.keys()
            if was_available == self.metrics_available:
                changed = {k for k in changed if previous.get(k) != self._metrics.get(k)}
            owners = {pod.owner for ns, name in changed if (pod := self.informers["Pod"].get(ns, name))}
            for deployment_id in sorted(owners - {""}):
                for listener in self._usage_listeners:
                    listener(deployment_id)

        await workers.run_forever(poll, interval=self._metrics_interval)

    # Observing -------------------------------------------------------------------------------------

    def observe(self, deployment: model.Deployment, *, written: Written | None = None) -> drift.Observation:
        """What the caches say about one deployment's objects, now.

        ``written`` holds objects just written (by kind), taken instead of their cached copies: a
        remediation checks its own result without waiting for the watch to bring it.
        """
        now = datetime.datetime.now(datetime.UTC)
        if not self.synced:
            return drift.Observation(readable=False, observed_at=now)
        ns, name, dep_id = deployment.namespace, deployment.resource_name, deployment.deployment_id
        fresh = {kind: entries.project(kind, obj) for kind, obj in (written or {}).items()}

        def current(kind: str, obj_name: str) -> entries.Entry | None:
            found = fresh.get(kind) or self.informers[kind].get(ns, obj_name)
            return found if found is not None else self._strays.get((kind, ns, obj_name))

        if deployment.resource_type is model.ResourceType.TOPIC:
            topic = _owned(entries.Topic, current("KafkaTopic", name), dep_id)
            return drift.Observation(readable=True, observed_at=now, topic=_topic(topic) if topic else None)
        sts = _owned(entries.Workload, current("StatefulSet", name), dep_id)
        secret = _owned(
            entries.Secret, current("Secret", naming.secret_name(deployment.resource_type, name)), dep_id
        )
        return drift.Observation(
            readable=True,
            observed_at=now,
            workload=_workload(sts, self._desired_env(deployment)) if sts else None,
            service_present=_owned(entries.Named, current("Service", name), dep_id) is not None,
            secret_present=secret is not None,
            secret_changed=secret is not None and secret.changed,
            secret_changed_by=secret.changed_by if secret is not None else "",
            pods=self._pods(dep_id),
            storage_capacity=self._capacity(dep_id),
            metrics_available=self.metrics_available,
        )

    def usage(self, deployment: model.Deployment) -> drift.Usage | None:
        """The usage part of an observation alone (pods' metrics, volumes), for a workload's verdict
        whose other parts a metrics poll does not change; None when the caches cannot tell."""
        if not self.synced or deployment.resource_type is model.ResourceType.TOPIC:
            return None
        dep_id = deployment.deployment_id
        return drift.usage_of(
            self._pods(dep_id), self._capacity(dep_id), metrics_available=self.metrics_available
        )

    def _pods(self, deployment_id: str) -> tuple[drift.PodObservation, ...]:
        return tuple(
            _pod(p, self._metrics.get((p.namespace, p.name)))
            for p in self.informers["Pod"].indexed(deployment_id)
            if isinstance(p, entries.Pod) and not p.deleting
        )

    def _capacity(self, deployment_id: str) -> decimal.Decimal | None:
        claims = [
            c
            for c in self.informers["PersistentVolumeClaim"].indexed(deployment_id)
            if isinstance(c, entries.Claim)
        ]
        if not claims:
            return None
        return sum((c.capacity or decimal.Decimal(0) for c in claims), decimal.Decimal(0))

    def _desired_env(self, deployment: model.Deployment) -> dict[str, str]:
        """The container env the broker applies, built once per deployment generation (a hot path)."""
        cached = self._env_cache.get(deployment.deployment_id)
        if cached is None or cached[0] != deployment.generation:
            env = entries.env({"env": manifests.container_env(deployment)})
            cached = self._env_cache[deployment.deployment_id] = (deployment.generation, env)
        return cached[1]

    async def _live(self, kind: str, namespace: str, name: str, deployment_id: str) -> JsonDict | None:
        """The object as the API server has it now, if it is the deployment's."""
        try:
            obj = await self.client.get(kind, namespace, name)
        except errors.NotFound:
            return None
        return obj if entries.owner(obj) == deployment_id else None

    # Writing ---------------------------------------------------------------------------------------

    async def apply(
        self,
        deployment: model.Deployment,
        *,
        create_secret: bool = True,
        keep: frozenset[str] = frozenset(),
    ) -> Written:
        """Create or update a deployment's objects (server-side apply; the Secret only if missing).

        Remediation passes ``create_secret=False``: a deleted Secret is alert-only, since a new
        password would lock the application out of its data. ``keep`` names drift fields (``version``,
        ``engine``, ``size``, ``replicas``, ``config``, ``partitions``, ``retention_ms``) whose live
        values are applied instead of the desired ones: remediating one field must not undo drift the
        policy says only to report; those values are read from the API server (the caches keep only
        what observing needs). Container env the broker does not set is removed with a JSON patch,
        since apply cannot take away a field another manager owns. Returns the objects as the API
        server answered the last write of each.
        """
        ns, name, dep_id = deployment.namespace, deployment.resource_name, deployment.deployment_id
        if deployment.resource_type is model.ResourceType.TOPIC:
            topic = manifests.kafka_topic(deployment, kafka_cluster=self._kafka_cluster)
            if keep and (live := await self._live("KafkaTopic", ns, name, dep_id)) is not None:
                _keep_topic_fields(topic, live, keep)
            return {"KafkaTopic": await self.client.apply(topic)}
        secret_name = naming.secret_name(deployment.resource_type, name)
        secret = self.informers["Secret"].get(ns, secret_name)
        if create_secret and _owned(entries.Secret, secret, dep_id) is None:
            # Only if missing (a new password would lock the application out of its data): the
            # create is the check, one request, and its conflict says the Secret is there already.
            with contextlib.suppress(kube_client.Conflict):
                await self.client.create(manifests.secret(deployment, self._catalog))
        service = await self.client.apply(manifests.service(deployment, self._catalog))
        sts = manifests.statefulset(deployment, self._catalog)
        if keep and (live := await self._live("StatefulSet", ns, name, dep_id)) is not None:
            _keep_workload_fields(sts, live, keep)
        applied = await self.client.apply(sts)
        if "config" not in keep:
            applied = await self._drop_foreign_env(applied, sts)
        return {"Service": service, "StatefulSet": applied}

    async def _drop_foreign_env(self, live: JsonDict, wanted: JsonDict) -> JsonDict:
        """Set the container env to exactly the broker's when another manager added or changed some."""
        want_env = entries.first_container(wanted).get("env") or []
        have = entries.env(entries.first_container(live))
        if not config_changes(have, entries.env(entries.first_container(wanted))):
            return live
        meta = live.get("metadata") or {}
        return await self.client.json_patch(
            "StatefulSet",
            str(meta.get("namespace", "")),
            str(meta.get("name", "")),
            [
                {"op": "test", "path": "/metadata/resourceVersion", "value": meta.get("resourceVersion")},
                {"op": "replace", "path": "/spec/template/spec/containers/0/env", "value": want_env},
            ],
        )

    async def delete(self, deployment: model.Deployment, data_policy: model.DataPolicy) -> None:
        """Delete a deployment's objects; its volume claims too when the policy says so."""
        ns, name = deployment.namespace, deployment.resource_name
        if deployment.resource_type is model.ResourceType.TOPIC:
            await self.client.delete("KafkaTopic", ns, name)
            return
        await self.client.delete("StatefulSet", ns, name)
        await self.client.delete("Service", ns, name)
        await self.client.delete("Secret", ns, naming.secret_name(deployment.resource_type, name))
        if data_policy is model.DataPolicy.DELETE:
            for claim in self.informers["PersistentVolumeClaim"].indexed(deployment.deployment_id):
                await self.client.delete("PersistentVolumeClaim", ns, claim.name)

    def gone(self, deployment: model.Deployment) -> bool:
        """Whether none of the deployment's main objects remains in the caches."""
        ns, name = deployment.namespace, deployment.resource_name
        kinds = (
            ("KafkaTopic",)
            if deployment.resource_type is model.ResourceType.TOPIC
            else ("StatefulSet", "Service")
        )
        return all(self.informers[k].get(ns, name) is None for k in kinds) and not self.informers[
            "Pod"
        ].indexed(deployment.deployment_id)

"""The cluster as the broker sees it: informer caches, observations, and the writes it makes.

``ClusterState`` runs one informer per managed kind (all by the broker's label selector), polls pod
metrics (the metrics API cannot be watched), turns cached objects into ``drift.Observation`` for the
pure drift engine, and applies or deletes a deployment's objects. Readers never call the API:
everything they get comes from the caches.
"""

from __future__ import annotations

import asyncio
import datetime
import decimal
import json
import logging
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

from broker import errors, workers
from broker.domain import catalog as catalog_mod
from broker.domain import drift, model, naming, quantity
from broker.kube import client as kube_client
from broker.kube import informer as informer_mod
from broker.kube import manifests

log = logging.getLogger(__name__)

JsonDict = kube_client.JsonDict
# Objects as the API server answered the broker's writes, by kind: fresher than the caches.
Written = Mapping[str, JsonDict]
WORKLOAD_KINDS = ("StatefulSet", "Service", "Secret", "Pod", "PersistentVolumeClaim")
TOPIC_KINDS = ("KafkaTopic",)
# The objects a deployment is looked up by name: kept as strays when relabelled out of the selection.
STRAY_KINDS = frozenset({"StatefulSet", "Service", "Secret", "KafkaTopic"})

# Which part of an object's managedFields (fieldsV1) attributes a compared field: the subtree to
# look in, and the key that must appear inside it. Scoped so that, say, the controller's
# status.replicas never counts as a change of spec.replicas.
_CONTAINER = ("f:spec", "f:template", "f:spec", "f:containers")
_STS_FIELDS: dict[str, tuple[tuple[str, ...], str]] = {
    "replicas": (("f:spec",), '"f:replicas"'),
    "image": (_CONTAINER, '"f:image"'),
    "resources": (_CONTAINER, '"f:resources"'),
    "env": (_CONTAINER, '"f:env"'),
    "storage": (("f:spec",), '"f:volumeClaimTemplates"'),
    "labels": (("f:metadata",), '"f:labels"'),
}
_TOPIC_FIELDS: dict[str, tuple[tuple[str, ...], str]] = {
    "partitions": (("f:spec",), '"f:partitions"'),
    "retention_ms": (("f:spec",), '"f:retention.ms"'),
    "replicas": (("f:spec",), '"f:replicas"'),
    "labels": (("f:metadata",), '"f:labels"'),
}
_SECRET_FIELDS: dict[str, tuple[tuple[str, ...], str]] = {
    "data": ((), '"f:data"'),
}


def field_managers(obj: JsonDict, fields: Mapping[str, tuple[tuple[str, ...], str]]) -> dict[str, str]:
    """For each compared field, the latest manager other than the broker that set it.

    Entries of the status subresource are skipped: they record controllers reporting, not changes
    of what was asked for.
    """
    entries = sorted(
        (
            e
            for e in (obj.get("metadata") or {}).get("managedFields") or []
            if e.get("manager") != kube_client.FIELD_MANAGER and e.get("subresource") != "status"
        ),
        key=lambda e: str(e.get("time") or ""),
    )
    found: dict[str, str] = {}
    for entry in entries:
        for field, (path, marker) in fields.items():
            subtree: Any = entry.get("fieldsV1") or {}
            for step in path:
                subtree = subtree.get(step) if isinstance(subtree, dict) else None
            if subtree and marker in json.dumps(subtree):
                found[field] = str(entry.get("manager", ""))
    return found


def _env(container: JsonDict) -> dict[str, str]:
    """A container's environment, each value rendered so that two equal settings compare equal."""
    rendered = {}
    for var in container.get("env") or []:
        ref = ((var.get("valueFrom") or {}).get("secretKeyRef")) or {}
        value = f"secret {ref.get('name')}/{ref.get('key')}" if ref else str(var.get("value", ""))
        rendered[str(var.get("name"))] = value
    return rendered


def _first_container(obj: JsonDict) -> JsonDict:
    containers = (((obj.get("spec") or {}).get("template") or {}).get("spec") or {}).get("containers") or [{}]
    return dict(containers[0])


def config_changes(live: JsonDict, want: dict[str, str]) -> tuple[str, ...]:
    """Differences in the broker-owned configuration (container env) between live and desired."""
    have = _env(_first_container(live))
    changes = [f"env {name} added" for name in sorted(have.keys() - want.keys())]
    changes += [f"env {name} removed" for name in sorted(want.keys() - have.keys())]
    changes += [
        f"env {name} changed" for name in sorted(want.keys() & have.keys()) if want[name] != have[name]
    ]
    return tuple(changes)


def _integer(value: Any, field: str, unreadable: dict[str, str], default: int) -> int:
    """A whole number from a watched object; a value that is not one is noted, never raised.

    Objects in the cluster are anyone's to edit (a CRD without a schema takes "three" for a
    partition count): what cannot be read is an observation of its own, ``unreadable``.
    """
    if value is None:
        return default
    try:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(value)
        return int(value)
    except (TypeError, ValueError):
        unreadable[field] = repr(value)[:80]
        return default


def _quantity(value: Any) -> decimal.Decimal | None:
    try:
        return quantity.parse(str(value)) if value is not None else None
    except ValueError:
        return None


def _pod(obj: JsonDict, usage: tuple[decimal.Decimal, decimal.Decimal] | None) -> drift.PodObservation:
    """One pod; its image is the one its spec asks for.

    ``status.containerStatuses[].image`` is the runtime's spelling (kube-apiserver documents it as
    possibly "resolved by the runtime": another tag sharing the digest, ``latest``, a digest
    reference), so versions are read from the spec, which the kubelet ran.
    """
    status = obj.get("status") or {}
    spec_containers = (obj.get("spec") or {}).get("containers") or [{}]
    containers = status.get("containerStatuses") or [{}]
    first = containers[0]
    waiting = ((first.get("state") or {}).get("waiting") or {}).get("reason", "")
    finished = (((first.get("lastState") or {}).get("terminated")) or {}).get("finishedAt")
    ready = any(
        c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or []
    )
    return drift.PodObservation(
        name=str((obj.get("metadata") or {}).get("name", "")),
        phase=str(status.get("phase", "")),
        ready=ready,
        restart_count=sum(_integer(c.get("restartCount"), "restartCount", {}, 0) for c in containers),
        waiting_reason=str(waiting),
        image=str(spec_containers[0].get("image") or first.get("image", "")),
        cpu_usage=usage[0] if usage else None,
        memory_usage=usage[1] if usage else None,
        last_restart=_time(finished),
    )


def _time(value: Any) -> datetime.datetime | None:
    try:
        return datetime.datetime.fromisoformat(str(value).replace("Z", "+00:00")) if value else None
    except ValueError:
        return None


def _workload(obj: JsonDict, desired_env: dict[str, str]) -> drift.WorkloadObservation:
    spec = obj.get("spec") or {}
    containers = ((spec.get("template") or {}).get("spec") or {}).get("containers") or [{}]
    resources = containers[0].get("resources") or {}
    requests, limits = resources.get("requests") or {}, resources.get("limits") or {}
    claims = spec.get("volumeClaimTemplates") or [{}]
    storage = (((claims[0].get("spec") or {}).get("resources") or {}).get("requests") or {}).get(
        "storage", ""
    )
    unreadable: dict[str, str] = {}
    return drift.WorkloadObservation(
        replicas=_integer(spec.get("replicas"), "replicas", unreadable, 1),
        image=str(containers[0].get("image", "")),
        resources=model.ComputeResources(
            cpu_request=str(requests.get("cpu", "")),
            cpu_limit=str(limits.get("cpu", "")),
            memory_request=str(requests.get("memory", "")),
            memory_limit=str(limits.get("memory", "")),
            storage=str(storage),
        ),
        labels=dict((obj.get("metadata") or {}).get("labels") or {}),
        field_managers=field_managers(obj, _STS_FIELDS),
        config_changes=config_changes(obj, desired_env),
        unreadable=unreadable,
    )


def _topic(obj: JsonDict) -> drift.TopicObservation:
    spec = obj.get("spec") or {}
    conditions = (obj.get("status") or {}).get("conditions") or []
    ready = next((c.get("status") == "True" for c in conditions if c.get("type") == "Ready"), None)
    unreadable: dict[str, str] = {}
    config: JsonDict = spec["config"] if isinstance(spec.get("config"), dict) else {}
    return drift.TopicObservation(
        partitions=_integer(spec.get("partitions"), "partitions", unreadable, 0),
        replicas=_integer(spec.get("replicas"), "replicas", unreadable, 0),
        retention_ms=_integer(config.get("retention.ms"), "retention_ms", unreadable, 0),
        ready=ready,
        labels=dict((obj.get("metadata") or {}).get("labels") or {}),
        field_managers=field_managers(obj, _TOPIC_FIELDS),
        unreadable=unreadable,
    )


def _labels(obj: JsonDict) -> dict[str, str]:
    return dict((obj.get("metadata") or {}).get("labels") or {})


def _owner(obj: JsonDict) -> str:
    """The deployment an object belongs to: the broker's annotation, else (older objects) its label."""
    annotations = (obj.get("metadata") or {}).get("annotations") or {}
    return str(annotations.get(manifests.OWNER_ANNOTATION) or _labels(obj).get(naming.LABEL_DEPLOYMENT) or "")


def _keep_workload_fields(manifest: JsonDict, live: JsonDict, keep: frozenset[str]) -> None:
    """Put the live values of the kept drift fields into a StatefulSet manifest about to be applied."""
    want, have = _first_container(manifest), _first_container(live)
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


# Projections: what the caches keep of each object. With tens of thousands of managed objects the
# caches are most of the broker's memory, and whole objects (managedFields bodies, full pod specs)
# are mostly what the broker never reads. Each keeps what ``observe`` and the writes read.


def _meta(obj: JsonDict, *, managed_fields: bool = False) -> JsonDict:
    meta = obj.get("metadata") or {}
    kept = {
        k: meta[k] for k in ("name", "namespace", "labels", "annotations", "resourceVersion") if k in meta
    }
    if meta.get("deletionTimestamp"):
        kept["deletionTimestamp"] = meta["deletionTimestamp"]
    if managed_fields:
        # Who else changed a field: the broker's own entries and status reports are never read.
        kept["managedFields"] = [
            e
            for e in meta.get("managedFields") or []
            if e.get("manager") != kube_client.FIELD_MANAGER and e.get("subresource") != "status"
        ]
    return kept


def _project_metadata(obj: JsonDict) -> JsonDict:
    return {"kind": obj.get("kind"), "metadata": _meta(obj)}


def _project_statefulset(obj: JsonDict) -> JsonDict:
    spec = obj.get("spec") or {}
    container = _first_container(obj)
    claims = spec.get("volumeClaimTemplates") or [{}]
    storage = (((claims[0].get("spec") or {}).get("resources") or {}).get("requests") or {}).get("storage")
    kept_container = {k: container[k] for k in ("name", "image", "resources", "env") if k in container}
    kept_spec: JsonDict = {"template": {"spec": {"containers": [kept_container]}}}
    if "replicas" in spec:
        kept_spec["replicas"] = spec["replicas"]
    if storage is not None:
        kept_spec["volumeClaimTemplates"] = [{"spec": {"resources": {"requests": {"storage": storage}}}}]
    return {"kind": obj.get("kind"), "metadata": _meta(obj, managed_fields=True), "spec": kept_spec}


def _project_pod(obj: JsonDict) -> JsonDict:
    spec_containers = (obj.get("spec") or {}).get("containers") or [{}]
    status = obj.get("status") or {}
    statuses = [
        {k: c[k] for k in ("image", "imageID", "restartCount", "state", "lastState") if k in c}
        for c in status.get("containerStatuses") or []
    ]
    return {
        "kind": obj.get("kind"),
        "metadata": _meta(obj),
        "spec": {"containers": [{"image": spec_containers[0].get("image", "")}]},
        "status": {
            "phase": status.get("phase", ""),
            "conditions": [c for c in status.get("conditions") or [] if c.get("type") == "Ready"],
            "containerStatuses": statuses,
        },
    }


def _project_secret(obj: JsonDict) -> JsonDict:
    # The data is kept (a few short keys) to tell a changed Secret; it never leaves the process.
    return {
        "kind": obj.get("kind"),
        "metadata": _meta(obj, managed_fields=True),
        "data": obj.get("data") or {},
    }


def _project_claim(obj: JsonDict) -> JsonDict:
    capacity = ((obj.get("status") or {}).get("capacity") or {}).get("storage")
    kept: JsonDict = {"kind": obj.get("kind"), "metadata": _meta(obj)}
    if capacity is not None:
        kept["status"] = {"capacity": {"storage": capacity}}
    return kept


def _project_topic(obj: JsonDict) -> JsonDict:
    status = obj.get("status") or {}
    return {
        "kind": obj.get("kind"),
        "metadata": _meta(obj, managed_fields=True),
        "spec": obj.get("spec") or {},
        "status": {"conditions": [c for c in status.get("conditions") or [] if c.get("type") == "Ready"]},
    }


PROJECTIONS: dict[str, Callable[[JsonDict], JsonDict]] = {
    "StatefulSet": _project_statefulset,
    "Pod": _project_pod,
    "Secret": _project_secret,
    "PersistentVolumeClaim": _project_claim,
    "KafkaTopic": _project_topic,
}


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
        self._sync_listeners: list[Callable[[], None]] = []
        self._kafka_cluster = kafka_cluster
        self._metrics_interval = metrics_interval
        self.informers = {
            kind: informer_mod.Informer(
                client,
                kind,
                label_selector=naming.SELECTOR,
                on_change=self._changed,
                index_label=naming.LABEL_DEPLOYMENT,
                on_sync=self._sync_changed,
                project=PROJECTIONS.get(kind, _project_metadata),
            )
            for kind in (*WORKLOAD_KINDS, *TOPIC_KINDS)
        }
        self._metrics: dict[tuple[str, str], tuple[decimal.Decimal, decimal.Decimal]] = {}
        self._env_cache: dict[str, tuple[int, dict[str, str]]] = {}
        # Objects relabelled out of the selection, by (kind, namespace, name), as last looked up.
        self._strays: dict[tuple[str, str, str], JsonDict] = {}
        self._lookups: set[asyncio.Task[None]] = set()
        self.metrics_available = False

    def _changed(self, kind: str, event_type: str, obj: JsonDict) -> None:
        deployment_id = _owner(obj)
        if kind in STRAY_KINDS:
            key = (kind, *informer_mod.key_of(obj))
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
                self._strays[key] = obj
            else:
                self._strays.pop(key, None)
        if deployment_id:
            self._notify(deployment_id)

    async def _refresh_strays(self) -> None:
        """Strays have no watch: look each up again (a deleted one goes, a changed one updates)."""
        for key, obj in list(self._strays.items()):
            await self._look_for_stray(key, _owner(obj))

    def add_listener(self, on_change: Callable[[str], None]) -> None:
        """Also tell ``on_change`` (by deployment id) when any of a deployment's objects changes."""
        self._listeners.append(on_change)

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
                items, _ = await self.client.list("PodMetrics", label_selector=naming.SELECTOR)
                fresh: dict[tuple[str, str], tuple[decimal.Decimal, decimal.Decimal]] = {}
                for item in items:
                    cpu = mem = decimal.Decimal(0)
                    for c in item.get("containers") or []:
                        cpu += _quantity((c.get("usage") or {}).get("cpu")) or 0
                        mem += _quantity((c.get("usage") or {}).get("memory")) or 0
                    fresh[informer_mod.key_of(item)] = (cpu, mem)
                self._metrics = fresh
                self.metrics_available = True
            except errors.NotFound:
                self.metrics_available = False  # metrics.k8s.io is not served: usage is absent
            except errors.BrokerError as e:
                log.debug("pod metrics unavailable", extra={"error": e.message})
                self.metrics_available = False
            # Usage is part of each deployment's verdict: tell the deployments whose pods changed.
            changed = previous.keys() | self._metrics.keys()
            if was_available == self.metrics_available:
                changed = {k for k in changed if previous.get(k) != self._metrics.get(k)}
            owners = {_owner(pod) for ns, name in changed if (pod := self.informers["Pod"].get(ns, name))}
            for deployment_id in sorted(owners - {""}):
                self._notify(deployment_id)

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
        written = written or {}

        def current(kind: str, obj_name: str) -> JsonDict | None:
            found = written.get(kind) or self.informers[kind].get(ns, obj_name)
            return found if found is not None else self._strays.get((kind, ns, obj_name))

        if deployment.resource_type is model.ResourceType.TOPIC:
            topic = self._owned(current("KafkaTopic", name), dep_id)
            return drift.Observation(readable=True, observed_at=now, topic=_topic(topic) if topic else None)
        sts = self._owned(current("StatefulSet", name), dep_id)
        secret = self._owned(current("Secret", naming.secret_name(deployment.resource_type, name)), dep_id)
        secret_changed = False
        secret_changed_by = ""
        if secret is not None:
            recorded = ((secret.get("metadata") or {}).get("annotations") or {}).get(
                manifests.CHECKSUM_ANNOTATION
            )
            secret_changed = recorded is not None and recorded != manifests.data_checksum(
                secret.get("data") or {}
            )
            secret_changed_by = field_managers(secret, _SECRET_FIELDS).get("data", "")
        pods = tuple(
            _pod(p, self._metrics.get(informer_mod.key_of(p)))
            for p in self.informers["Pod"].indexed(dep_id)
            if (p.get("metadata") or {}).get("deletionTimestamp") is None
        )
        capacity = None
        claims = self.informers["PersistentVolumeClaim"].indexed(dep_id)
        if claims:
            capacity = sum(
                (
                    _quantity(((c.get("status") or {}).get("capacity") or {}).get("storage"))
                    or decimal.Decimal(0)
                    for c in claims
                ),
                decimal.Decimal(0),
            )
        return drift.Observation(
            readable=True,
            observed_at=now,
            workload=_workload(sts, self._desired_env(deployment)) if sts else None,
            service_present=self._owned(current("Service", name), dep_id) is not None,
            secret_present=secret is not None,
            secret_changed=secret_changed,
            secret_changed_by=secret_changed_by,
            pods=pods,
            storage_capacity=capacity,
            metrics_available=self.metrics_available,
        )

    def _desired_env(self, deployment: model.Deployment) -> dict[str, str]:
        """The container env the broker applies, built once per deployment generation (a hot path)."""
        cached = self._env_cache.get(deployment.deployment_id)
        if cached is None or cached[0] != deployment.generation:
            env = _env(_first_container(manifests.statefulset(deployment, self._catalog)))
            cached = self._env_cache[deployment.deployment_id] = (deployment.generation, env)
        return cached[1]

    @staticmethod
    def _owned(obj: JsonDict | None, deployment_id: str) -> JsonDict | None:
        """The object if it belongs to this deployment (a namesake of another deployment does not)."""
        return obj if obj is not None and _owner(obj) == deployment_id else None

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
        policy says only to report. Container env the broker does not set is removed with a JSON
        patch, since apply cannot take away a field another manager owns. Returns the objects as
        the API server answered the last write of each.
        """
        ns, name, dep_id = deployment.namespace, deployment.resource_name, deployment.deployment_id
        if deployment.resource_type is model.ResourceType.TOPIC:
            topic = manifests.kafka_topic(deployment, kafka_cluster=self._kafka_cluster)
            live = self._owned(self.informers["KafkaTopic"].get(ns, name), dep_id)
            if live is not None and keep:
                _keep_topic_fields(topic, live, keep)
            return {"KafkaTopic": await self.client.apply(topic)}
        secret_name = naming.secret_name(deployment.resource_type, name)
        secret = self.informers["Secret"].get(ns, secret_name)
        if create_secret and self._owned(secret, dep_id) is None:
            try:
                await self.client.get("Secret", ns, secret_name)
            except errors.NotFound:
                await self.client.create(manifests.secret(deployment, self._catalog))
        service = await self.client.apply(manifests.service(deployment, self._catalog))
        sts = manifests.statefulset(deployment, self._catalog)
        live = self._owned(self.informers["StatefulSet"].get(ns, name), dep_id)
        if live is not None and keep:
            _keep_workload_fields(sts, live, keep)
        applied = await self.client.apply(sts)
        if "config" not in keep:
            applied = await self._drop_foreign_env(applied, sts)
        return {"Service": service, "StatefulSet": applied}

    async def _drop_foreign_env(self, live: JsonDict, wanted: JsonDict) -> JsonDict:
        """Set the container env to exactly the broker's when another manager added or changed some."""
        want_env = _first_container(wanted).get("env") or []
        if not config_changes(live, _env(_first_container(wanted))):
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
                await self.client.delete("PersistentVolumeClaim", ns, str(claim["metadata"]["name"]))

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

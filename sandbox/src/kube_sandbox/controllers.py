"""The workload simulator: the controllers a real cluster runs, reduced to what brokers observe.

* :class:`Kubelet` binds pods to the one simulated node, starts them after ``ready_delay`` and keeps
  ``status`` honest: phase, conditions, ``containerStatuses`` with the running (resolved) image,
  ``restartCount``; crash and readiness faults show as CrashLoopBackOff / not ready.
* :class:`StatefulSetController` creates, scales (OrderedReady or Parallel) and rolls pods
  ``<name>-<ordinal>`` and their claims ``<template>-<name>-<ordinal>`` (which it never deletes,
  Kubernetes' default ``Retain`` policy) and keeps the StatefulSet's ``status`` true.
* :class:`KafkaTopicController` marks Strimzi ``KafkaTopic`` objects ``Ready``.
* :class:`GarbageCollector` deletes dependents of deleted owners (background), finishes foreground
  deletions and empties terminating namespaces.
* :func:`pod_metrics` answers ``metrics.k8s.io`` from the running pods' requests.

Every controller is driven by the store's change stream, never by polling, so reactions take
milliseconds; timers only model time that passes in a real cluster (container start-up, crash
back-off). Like a real controller, each starts from the current state (every stored object as
ADDED) before it follows changes, so after a restore it picks up where the previous run stopped;
the kubelet first takes over the restored pods' containers from their status, as a restarted
kubelet finds them running, so a restore rewrites nothing that was already true.

Events are recorded as client-go's ``EventCorrelator`` records them: a repeat of the same event
(same source, object, type, reason and message) increments ``count`` and ``lastTimestamp`` of one
Event object instead of adding another, so a StatefulSet scaled up and down all day has a handful
of Events, not one per pod.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import logging
import re
from collections.abc import Iterable
from typing import Any

from kube_sandbox import errors, faults, kinds, resources, store

JsonDict = dict[str, Any]
PodKey = tuple[str, str]

log = logging.getLogger(__name__)

PODS: resources.StorageKey = ("", "pods")
PVCS: resources.StorageKey = ("", "persistentvolumeclaims")
STATEFULSETS: resources.StorageKey = ("apps", "statefulsets")
EVENTS: resources.StorageKey = ("", "events")
KAFKA_TOPICS: resources.StorageKey = ("kafka.strimzi.io", "kafkatopics")
NODE_NAME = "sandbox-node"
NODE_IP = "10.0.0.10"
_HASH_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _safe_hash(text: str, length: int = 10) -> str:
    value = int(_digest(text), 16)
    out = []
    for _ in range(length):
        value, index = divmod(value, len(_HASH_ALPHABET))
        out.append(_HASH_ALPHABET[index])
    return "".join(out)


def _ready(pod: JsonDict) -> bool:
    if pod["metadata"].get("deletionTimestamp"):
        return False
    status = pod.get("status") or {}
    if status.get("phase") != "Running":
        return False
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])


class Runner:
    """Base of a controller: a task draining a store subscription into :meth:`handle`."""

    keys: frozenset[resources.StorageKey] | None = None

    def __init__(self, st: store.Store) -> None:
        self.store = st
        self._task: asyncio.Task[None] | None = None
        self._watcher: store.Watcher | None = None

    def start(self) -> None:
        """Subscribe, queue the current state as ADDED events, and start consuming."""
        self._watcher = self.store.subscribe(self.keys)
        for event in self.store.initial_events(self.keys):
            self._watcher.push(event)
        self._task = asyncio.create_task(self._run(self._watcher), name=type(self).__name__)

    async def stop(self) -> None:
        """Stop consuming."""
        if self._watcher is not None:
            self.store.unwatch(self._watcher)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self, watcher: store.Watcher) -> None:
        while True:
            batch = await watcher.next_batch()
            if batch is None:
                return
            try:
                self.handle(batch)
            except Exception:
                log.exception("sandbox controller %s failed", type(self).__name__)

    def handle(self, batch: list[store.Event]) -> None:
        """React to a batch of changes."""
        raise NotImplementedError


def record_event(
    st: store.Store, *, involved: JsonDict, reason: str, message: str, component: str, type_: str = "Normal"
) -> None:
    """Write a core/v1 Event about an object, as controllers and the kubelet do.

    The Event's name is derived from what makes two events the same (client-go's aggregation key:
    source, involved object, type, reason, message), so a repeat finds the first one and only
    bumps its ``count`` and ``lastTimestamp``.
    """
    meta = involved["metadata"]
    namespace = meta.get("namespace") or "default"
    stamp = store.now()
    rt = st.registry.preferred(EVENTS)
    if rt is None or st.find(("", "namespaces"), "", namespace) is None:
        return
    identity = "\x00".join(
        str(part)
        for part in (
            component,
            involved.get("kind"),
            involved.get("apiVersion"),
            namespace,
            meta["name"],
            meta.get("uid"),
            type_,
            reason,
            message,
        )
    )
    name = f"{meta['name']}.{_digest(identity)[:16]}"
    existing = st.find(EVENTS, namespace, name)
    if existing is not None:
        repeated = store.thaw(existing)
        repeated["count"] = int(repeated.get("count") or 1) + 1
        repeated["lastTimestamp"] = stamp
        with contextlib.suppress(errors.ApiError):
            st.update(rt, repeated, manager=component)
        return
    event = {
        "metadata": {"name": name, "namespace": namespace},
        "involvedObject": {
            "kind": involved.get("kind"),
            "namespace": namespace,
            "name": meta["name"],
            "uid": meta.get("uid"),
            "apiVersion": involved.get("apiVersion"),
            "resourceVersion": meta.get("resourceVersion"),
        },
        "reason": reason,
        "message": message,
        "type": type_,
        "count": 1,
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "source": {"component": component},
        "reportingComponent": component,
        "reportingInstance": "",
    }
    with contextlib.suppress(errors.ApiError):
        st.create(rt, event, manager=component)


class Kubelet(Runner):
    """Runs every pod on the single simulated node."""

    keys = frozenset({PODS})

    def __init__(
        self, st: store.Store, *, fault_state: faults.Faults, ready_delay: float, crash_interval: float
    ) -> None:
        super().__init__(st)
        self.faults = fault_state
        self.ready_delay = ready_delay
        self.crash_interval = crash_interval
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._started: dict[str, str] = {}
        self._images: dict[str, dict[str, str]] = {}
        self._restarts: dict[str, int] = {}
        self._last_crash: dict[str, tuple[str, str]] = {}
        self._ips: dict[str, str] = {}
        self._ips_in_use: set[str] = set()
        self._next_ip = 2

    def start(self) -> None:
        """Take over the stored pods' containers, then start consuming."""
        self.adopt()
        super().start()

    def adopt(self) -> None:
        """Rebuild what the node knows about running pods from their status (after a restore).

        A restarted kubelet finds its containers still running; here the status the previous run
        wrote is the only record, and reading start time, images, restarts and IP back from it makes
        the next status this kubelet computes identical, so restored pods stay Ready untouched.
        """
        for pod in self.store.objects(PODS):
            uid = pod["metadata"]["uid"]
            status = pod.get("status") or {}
            if status.get("phase") != "Running" or uid in self._started:
                continue
            containers = status.get("containerStatuses") or []
            started = next(
                (
                    c["state"]["running"].get("startedAt")
                    for c in containers
                    if isinstance((c.get("state") or {}).get("running"), dict)
                ),
                None,
            )
            self._started[uid] = str(started or status.get("startTime") or store.now())
            self._images[uid] = {str(c.get("name")): str(c.get("image", "")) for c in containers}
            restarts = max((int(c.get("restartCount") or 0) for c in containers), default=0)
            if restarts:
                self._restarts[uid] = restarts
            last = next(
                (
                    c["lastState"]["terminated"]
                    for c in containers
                    if isinstance((c.get("lastState") or {}).get("terminated"), dict)
                ),
                None,
            )
            if last is not None:
                self._last_crash[uid] = (str(last.get("startedAt", "")), str(last.get("finishedAt", "")))
            if status.get("podIP"):
                self._ips[uid] = str(status["podIP"])
                self._ips_in_use.add(self._ips[uid])

    async def stop(self) -> None:
        """Cancel timers and stop."""
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        await super().stop()

    def handle(self, batch: list[store.Event]) -> None:
        """Bring each changed pod's status up to date."""
        seen: set[PodKey] = set()
        for event in batch:
            meta = event.obj["metadata"]
            key = (meta.get("namespace", ""), meta["name"])
            if event.type == "DELETED":
                self._forget(meta["uid"])
                continue
            seen.add(key)
        for key in seen:
            self.sync(key)

    def _forget(self, uid: str) -> None:
        timer = self._timers.pop(uid, None)
        if timer is not None:
            timer.cancel()
        for table in (self._started, self._images, self._restarts, self._last_crash):
            table.pop(uid, None)
        self._ips_in_use.discard(self._ips.pop(uid, ""))

    def _rt(self) -> resources.ResourceType:
        rt = self.store.registry.preferred(PODS)
        assert rt is not None
        return rt

    def _later(self, uid: str, delay: float, key: PodKey, action: str) -> None:
        if uid in self._timers:
            return
        loop = asyncio.get_running_loop()
        self._timers[uid] = loop.call_later(delay, self._fire, uid, key, action)

    def _fire(self, uid: str, key: PodKey, action: str) -> None:
        self._timers.pop(uid, None)
        pod = self.store.find(PODS, *key)
        if pod is None or pod["metadata"]["uid"] != uid:
            return
        stamp = store.now()
        if action == "start":
            self._started[uid] = stamp
            self._images[uid] = self._wanted_images(pod)
        elif action == "crash":
            if key not in self.faults.crashing:
                self.sync(key)
                return
            self._restarts[uid] = self._restarts.get(uid, 0) + 1
            self._last_crash[uid] = (self._last_crash.get(uid, (stamp, stamp))[1], stamp)
        elif action == "restart":
            self._restarts[uid] = self._restarts.get(uid, 0) + 1
            self._last_crash[uid] = (self._started.get(uid, stamp), stamp)
            self._started[uid] = stamp
            self._images[uid] = self._wanted_images(pod)
        try:
            self.sync(key)
        except Exception:
            log.exception("sandbox kubelet failed to sync pod %s/%s", *key)

    def _wanted_images(self, pod: JsonDict) -> dict[str, str]:
        return {
            str(c.get("name")): self.faults.resolve_image(str(c.get("image", "")))
            for c in (pod.get("spec") or {}).get("containers") or []
        }

    def sync(self, key: PodKey) -> None:
        """Reconcile one pod's node binding and status with the simulated node."""
        pod = self.store.find(PODS, *key)
        if pod is None or pod["metadata"].get("deletionTimestamp"):
            return
        uid = pod["metadata"]["uid"]
        if not (pod.get("spec") or {}).get("nodeName"):
            bound = store.thaw(pod)
            bound["spec"]["nodeName"] = NODE_NAME
            self.store.update(self._rt(), bound, manager="default-scheduler")
            return
        if uid not in self._started:
            self._write_status(pod, self._pending_status(pod))
            self._later(uid, self.ready_delay, key, "start")
            return
        crashing = key in self.faults.crashing
        if crashing:
            self._later(uid, self.crash_interval, key, "crash")
        elif self._wanted_images(pod) != self._images.get(uid):
            self._later(uid, self.ready_delay, key, "restart")
        self._write_status(pod, self._running_status(pod, crashing=crashing))

    def _write_status(self, pod: JsonDict, status: JsonDict) -> None:
        if pod.get("status") == status:
            return
        changed = store.thaw(pod)
        changed["status"] = status
        self.store.update(self._rt(), changed, manager="kubelet", subresource="status")

    def _condition(
        self, pod: JsonDict, kind: str, value: bool, reason: str = "", message: str = ""
    ) -> JsonDict:
        status = "True" if value else "False"
        previous = next(
            (c for c in (pod.get("status") or {}).get("conditions") or [] if c.get("type") == kind), None
        )
        since = (
            previous["lastTransitionTime"] if previous and previous.get("status") == status else store.now()
        )
        out: JsonDict = {"type": kind, "status": status, "lastTransitionTime": since}
        if reason:
            out["reason"] = reason
        if message:
            out["message"] = message
        return out

    def _pending_status(self, pod: JsonDict) -> JsonDict:
        current = pod.get("status") or {}
        names = [str(c.get("name")) for c in (pod.get("spec") or {}).get("containers") or []]
        unready = f"containers with unready status: [{' '.join(names)}]"
        return {
            "phase": "Pending",
            "conditions": [
                self._condition(pod, "PodReadyToStartContainers", False),
                self._condition(pod, "Initialized", True),
                self._condition(pod, "Ready", False, "ContainersNotReady", unready),
                self._condition(pod, "ContainersReady", False, "ContainersNotReady", unready),
                self._condition(pod, "PodScheduled", True),
            ],
            "hostIP": NODE_IP,
            "hostIPs": [{"ip": NODE_IP}],
            "startTime": current.get("startTime") or store.now(),
            "qosClass": current.get("qosClass", "BestEffort"),
            "containerStatuses": [
                {
                    "name": str(c.get("name")),
                    "image": str(c.get("image", "")),
                    "imageID": "",
                    "ready": False,
                    "started": False,
                    "restartCount": 0,
                    "state": {"waiting": {"reason": "ContainerCreating"}},
                    "lastState": {},
                }
                for c in (pod.get("spec") or {}).get("containers") or []
            ],
        }

    def _pod_ip(self, uid: str) -> str:
        """The pod's IP in 10.244.0.0/16: the next one no live pod holds (reused after deletion)."""
        if uid not in self._ips:
            for _ in range(250 * 256):
                self._next_ip += 1
                n = self._next_ip % (250 * 256)
                ip = f"10.244.{n // 250}.{n % 250 + 2}"
                if ip not in self._ips_in_use:
                    break
            self._ips[uid] = ip
            self._ips_in_use.add(ip)
        return self._ips[uid]

    def _running_status(self, pod: JsonDict, *, crashing: bool) -> JsonDict:
        meta = pod["metadata"]
        uid = meta["uid"]
        key = (meta.get("namespace", ""), meta["name"])
        ready = not crashing and key not in self.faults.unready
        restarts = self._restarts.get(uid, 0)
        started = self._started[uid]
        images = self._images.get(uid, {})
        current = pod.get("status") or {}
        statuses: list[JsonDict] = []
        names: list[str] = []
        for container in (pod.get("spec") or {}).get("containers") or []:
            name = str(container.get("name"))
            names.append(name)
            image = images.get(name, str(container.get("image", "")))
            repo = image.split("@")[0].rsplit(":", 1)[0] if ":" in image.rsplit("/", 1)[-1] else image
            if "/" not in repo:
                repo = f"docker.io/library/{repo}"
            elif "." not in repo.split("/", 1)[0]:
                repo = f"docker.io/{repo}"
            entry: JsonDict = {
                "name": name,
                "image": image,
                "imageID": f"{repo}@sha256:{_digest(image)}",
                "containerID": f"containerd://{_digest(f'{uid}/{name}/{restarts}')}",
                "ready": ready,
                "started": not crashing,
                "restartCount": restarts,
            }
            last = self._last_crash.get(uid)
            if crashing:
                backoff = min(300, 10 * 2 ** max(0, restarts - 1))
                entry["state"] = {
                    "waiting": {
                        "reason": "CrashLoopBackOff",
                        "message": f"back-off {backoff}s restarting failed container={name} "
                        f"pod={meta['name']}_{key[0]}({uid})",
                    }
                }
            else:
                entry["state"] = {"running": {"startedAt": started}}
            if last is not None:
                entry["lastState"] = {
                    "terminated": {
                        "exitCode": 1 if crashing else 0,
                        "reason": "Error" if crashing else "Completed",
                        "startedAt": last[0],
                        "finishedAt": last[1],
                        "containerID": f"containerd://{_digest(f'{uid}/{name}/{restarts - 1}')}",
                    }
                }
            else:
                entry["lastState"] = {}
            statuses.append(entry)
        unready = f"containers with unready status: [{' '.join(names)}]"
        return {
            "phase": "Running",
            "conditions": [
                self._condition(pod, "PodReadyToStartContainers", True),
                self._condition(pod, "Initialized", True),
                self._condition(
                    pod, "Ready", ready, "" if ready else "ContainersNotReady", "" if ready else unready
                ),
                self._condition(
                    pod,
                    "ContainersReady",
                    ready,
                    "" if ready else "ContainersNotReady",
                    "" if ready else unready,
                ),
                self._condition(pod, "PodScheduled", True),
            ],
            "hostIP": NODE_IP,
            "hostIPs": [{"ip": NODE_IP}],
            "podIP": self._pod_ip(uid),
            "podIPs": [{"ip": self._pod_ip(uid)}],
            "startTime": current.get("startTime") or started,
            "qosClass": current.get("qosClass", "BestEffort"),
            "containerStatuses": statuses,
        }


def revision_of(sts: JsonDict) -> str:
    """The ``controller-revision-hash`` of a StatefulSet's current template."""
    template = (sts.get("spec") or {}).get("template") or {}
    return f"{sts['metadata']['name']}-{_safe_hash(store.dumps(template).decode())}"


_ORDINAL = re.compile(r"^(.*)-(\d+)$")


class StatefulSetController(Runner):
    """The StatefulSet controller: pods, claims, rolling updates and status."""

    keys = frozenset({STATEFULSETS, PODS, PVCS})

    def handle(self, batch: list[store.Event]) -> None:
        """Reconcile every StatefulSet a change touches."""
        dirty: set[PodKey] = set()
        for event in batch:
            meta = event.obj["metadata"]
            namespace = meta.get("namespace", "")
            if event.key == STATEFULSETS:
                if event.type != "DELETED":
                    dirty.add((namespace, meta["name"]))
            elif event.key == PODS:
                for owner in meta.get("ownerReferences") or []:
                    if owner.get("kind") == "StatefulSet" and owner.get("controller"):
                        dirty.add((namespace, str(owner.get("name"))))
        for key in sorted(dirty):
            try:
                self.reconcile(key)
            except errors.ApiError as exc:
                log.debug("statefulset %s/%s reconcile deferred: %s", *key, exc.message)

    def _rt(self, key: resources.StorageKey) -> resources.ResourceType:
        rt = self.store.registry.preferred(key)
        assert rt is not None
        return rt

    def _owned_pods(self, sts: JsonDict) -> dict[int, JsonDict]:
        name = sts["metadata"]["name"]
        out: dict[int, JsonDict] = {}
        for key, namespace, pod_name in self.store.dependents(sts["metadata"]["uid"]):
            if key != PODS:
                continue
            match = _ORDINAL.match(pod_name)
            pod = self.store.find(PODS, namespace, pod_name)
            if match and match.group(1) == name and pod is not None:
                out[int(match.group(2))] = pod
        return out

    def reconcile(self, key: PodKey) -> None:
        """Move one StatefulSet one step towards its spec and write its status."""
        namespace, name = key
        sts = self.store.find(STATEFULSETS, namespace, name)
        if sts is None or sts["metadata"].get("deletionTimestamp"):
            return
        spec = sts.get("spec") or {}
        replicas = int(spec.get("replicas", 1))
        monotonic = spec.get("podManagementPolicy", "OrderedReady") != "Parallel"
        revision = revision_of(sts)
        pods = self._owned_pods(sts)
        self._ensure_claims(sts, range(replicas))
        first_unhealthy = next((i for i in sorted(pods) if not _ready(pods[i])), None)
        for ordinal in range(replicas):
            if ordinal in pods:
                if monotonic and not _ready(pods[ordinal]):
                    break
                continue
            pods[ordinal] = self._create_pod(sts, ordinal, revision)
            if monotonic:
                break
        condemned = sorted((i for i in pods if i >= replicas), reverse=True)
        for ordinal in condemned:
            if monotonic and not _ready(pods[ordinal]) and ordinal != first_unhealthy:
                break
            self._delete_pod(sts, pods.pop(ordinal))
            if monotonic:
                break
        strategy = (spec.get("updateStrategy") or {}).get("type", "RollingUpdate")
        if strategy == "RollingUpdate" and not condemned:
            partition = int(
                ((spec.get("updateStrategy") or {}).get("rollingUpdate") or {}).get("partition", 0)
            )
            all_ready = len(pods) == replicas and all(_ready(p) for p in pods.values())
            outdated = [
                i
                for i in sorted(pods, reverse=True)
                if i >= partition
                and pods[i]["metadata"].get("labels", {}).get("controller-revision-hash") != revision
            ]
            if outdated and (all_ready or not monotonic):
                self._delete_pod(sts, pods.pop(outdated[0]))
        self._write_status(sts, pods, revision)

    def _ensure_claims(self, sts: JsonDict, ordinals: Iterable[int]) -> None:
        templates = (sts.get("spec") or {}).get("volumeClaimTemplates") or []
        if not templates:
            return
        namespace = sts["metadata"].get("namespace", "")
        rt = self._rt(PVCS)
        match_labels = ((sts.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
        for ordinal in ordinals:
            for template in templates:
                claim_name = f"{template['metadata']['name']}-{sts['metadata']['name']}-{ordinal}"
                if self.store.find(PVCS, namespace, claim_name) is not None:
                    continue
                tmeta = template.get("metadata") or {}
                claim_spec = store.thaw(template.get("spec") or {})
                claim_spec.setdefault("storageClassName", "standard")
                claim: JsonDict = {
                    "metadata": {
                        "name": claim_name,
                        "namespace": namespace,
                        "labels": {**(tmeta.get("labels") or {}), **match_labels},
                    },
                    "spec": claim_spec,
                }
                if tmeta.get("annotations"):
                    claim["metadata"]["annotations"] = dict(tmeta["annotations"])
                created = self.store.create(rt, claim, manager="kube-controller-manager")
                self._bind(rt, created)

    def _bind(self, rt: resources.ResourceType, claim: JsonDict) -> None:
        bound = store.thaw(claim)
        bound["spec"]["volumeName"] = f"pvc-{claim['metadata']['uid']}"
        bound["metadata"].setdefault("annotations", {}).update(
            {
                "pv.kubernetes.io/bind-completed": "yes",
                "pv.kubernetes.io/bound-by-controller": "yes",
            }
        )
        bound = self.store.update(rt, bound, manager="kube-controller-manager")
        with_status = store.thaw(bound)
        with_status["status"] = {
            "phase": "Bound",
            "accessModes": list(bound["spec"].get("accessModes") or []),
            "capacity": {
                "storage": ((bound["spec"].get("resources") or {}).get("requests") or {}).get("storage")
            },
        }
        self.store.update(rt, with_status, manager="kube-controller-manager", subresource="status")

    def _create_pod(self, sts: JsonDict, ordinal: int, revision: str) -> JsonDict:
        meta = sts["metadata"]
        spec = sts.get("spec") or {}
        template = store.thaw(spec.get("template") or {})
        tmeta = template.get("metadata") or {}
        pod_name = f"{meta['name']}-{ordinal}"
        pod_spec = template.get("spec") or {}
        kinds.default_pod_spec(pod_spec)
        pod_spec["hostname"] = pod_name
        if spec.get("serviceName"):
            pod_spec["subdomain"] = spec["serviceName"]
        volumes = list(pod_spec.get("volumes") or [])
        for claim in spec.get("volumeClaimTemplates") or []:
            claim_name = claim["metadata"]["name"]
            if not any(v.get("name") == claim_name for v in volumes):
                volumes.append(
                    {
                        "name": claim_name,
                        "persistentVolumeClaim": {"claimName": f"{claim_name}-{meta['name']}-{ordinal}"},
                    }
                )
        if volumes:
            pod_spec["volumes"] = volumes
        pod: JsonDict = {
            "metadata": {
                "name": pod_name,
                "namespace": meta.get("namespace", ""),
                "generateName": f"{meta['name']}-",
                "labels": {
                    **(tmeta.get("labels") or {}),
                    "apps.kubernetes.io/pod-index": str(ordinal),
                    "controller-revision-hash": revision,
                    "statefulset.kubernetes.io/pod-name": pod_name,
                },
                "ownerReferences": [
                    {
                        "apiVersion": "apps/v1",
                        "kind": "StatefulSet",
                        "name": meta["name"],
                        "uid": meta["uid"],
                        "controller": True,
                        "blockOwnerDeletion": True,
                    }
                ],
            },
            "spec": pod_spec,
        }
        if tmeta.get("annotations"):
            pod["metadata"]["annotations"] = dict(tmeta["annotations"])
        created = self.store.create(self._rt(PODS), pod, manager="kube-controller-manager")
        record_event(
            self.store,
            involved=sts,
            reason="SuccessfulCreate",
            component="statefulset-controller",
            message=f"create Pod {pod_name} in StatefulSet {meta['name']} successful",
        )
        return created

    def _delete_pod(self, sts: JsonDict, pod: JsonDict) -> None:
        meta = pod["metadata"]
        with contextlib.suppress(errors.NotFound):
            self.store.delete(self._rt(PODS), meta.get("namespace", ""), meta["name"])
        record_event(
            self.store,
            involved=sts,
            reason="SuccessfulDelete",
            component="statefulset-controller",
            message=f"delete Pod {meta['name']} in StatefulSet {sts['metadata']['name']} successful",
        )

    def _write_status(self, sts: JsonDict, pods: dict[int, JsonDict], revision: str) -> None:
        current = sts.get("status") or {}
        current_revision = current.get("currentRevision") or revision
        replicas = int((sts.get("spec") or {}).get("replicas", 1))
        revisions = [p["metadata"].get("labels", {}).get("controller-revision-hash") for p in pods.values()]
        updated = sum(1 for r in revisions if r == revision)
        ready = sum(1 for p in pods.values() if _ready(p))
        if updated == replicas == len(pods) and ready == replicas:
            current_revision = revision
        status: JsonDict = {
            "observedGeneration": sts["metadata"].get("generation", 1),
            "replicas": len(pods),
            "availableReplicas": ready,
            "currentRevision": current_revision,
            "updateRevision": revision,
            "collisionCount": 0,
        }
        for field, value in (
            ("readyReplicas", ready),
            ("currentReplicas", sum(1 for r in revisions if r == current_revision)),
            ("updatedReplicas", updated),
        ):
            if value:
                status[field] = value
        if status == current:
            return
        changed = store.thaw(sts)
        changed["status"] = status
        self.store.update(
            self._rt(STATEFULSETS), changed, manager="kube-controller-manager", subresource="status"
        )


class KafkaTopicController(Runner):
    """A stand-in for Strimzi's topic operator: every KafkaTopic becomes Ready."""

    keys = frozenset({KAFKA_TOPICS})

    def handle(self, batch: list[store.Event]) -> None:
        """Mark changed topics Ready with the generation they reflect."""
        for event in batch:
            if event.type == "DELETED":
                continue
            meta = event.obj["metadata"]
            topic = self.store.find(KAFKA_TOPICS, meta.get("namespace", ""), meta["name"])
            if topic is None or topic["metadata"].get("deletionTimestamp"):
                continue
            generation = topic["metadata"].get("generation", 1)
            status = topic.get("status") or {}
            if status.get("observedGeneration") == generation and any(
                c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or []
            ):
                continue
            rt = self.store.registry.preferred(KAFKA_TOPICS)
            if rt is None:
                return
            changed = store.thaw(topic)
            changed["status"] = {
                "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": store.now()}],
                "observedGeneration": generation,
                "topicName": (topic.get("spec") or {}).get("topicName") or meta["name"],
                "topicId": _safe_hash(meta["uid"], 22),
            }
            self.store.update(
                rt,
                changed,
                manager="strimzi-topic-operator",
                subresource="status" if rt.status_subresource else "",
            )


class GarbageCollector(Runner):
    """Owner-reference garbage collection and the namespace controller."""

    def handle(self, batch: list[store.Event]) -> None:
        """Collect dependents of deleted owners and finish foreground and namespace deletions."""
        for event in batch:
            meta = event.obj["metadata"]
            if event.type == "DELETED":
                self._collect(meta["uid"])
                self._release_owners(event.obj)
            elif meta.get("deletionTimestamp"):
                if event.key == store.NAMESPACE_KEY:
                    self.store.finish_namespace(meta["name"])
                elif "foregroundDeletion" in (meta.get("finalizers") or []):
                    self._foreground(event.key, event.obj)
            elif event.type == "ADDED" and meta.get("ownerReferences"):
                self._check_dangling(event.key, event.obj)

    def _rt(self, key: resources.StorageKey) -> resources.ResourceType | None:
        return self.store.registry.preferred(key)

    def _collect(self, owner_uid: str) -> None:
        for key, namespace, name in self.store.dependents(owner_uid):
            obj = self.store.find(key, namespace, name)
            rt = self._rt(key)
            if obj is None or rt is None:
                continue
            alive = [
                r
                for r in obj["metadata"].get("ownerReferences") or []
                if r.get("uid") != owner_uid and self.store.by_uid(str(r.get("uid"))) is not None
            ]
            try:
                if alive:
                    changed = store.thaw(obj)
                    changed["metadata"]["ownerReferences"] = [
                        r for r in changed["metadata"]["ownerReferences"] if r.get("uid") != owner_uid
                    ]
                    self.store.update(rt, changed, manager="kube-controller-manager")
                else:
                    self.store.delete(rt, namespace, name, propagation="Background")
            except errors.ApiError as exc:
                log.debug("garbage collection of %s/%s deferred: %s", namespace, name, exc.message)

    def _foreground(self, key: resources.StorageKey, owner: JsonDict) -> None:
        meta = owner["metadata"]
        rt = self._rt(key)
        if rt is None:
            return
        remaining = self.store.dependents(meta["uid"])
        if not remaining:
            self.store.remove_finalizer(rt, meta.get("namespace", ""), meta["name"], "foregroundDeletion")
            return
        for dep_key, namespace, name in remaining:
            dep_rt = self._rt(dep_key)
            dep = self.store.find(dep_key, namespace, name)
            if dep_rt is None or dep is None or dep["metadata"].get("deletionTimestamp"):
                continue
            with contextlib.suppress(errors.ApiError):
                self.store.delete(dep_rt, namespace, name, propagation="Foreground")

    def _release_owners(self, dependent: JsonDict) -> None:
        for ref in dependent["metadata"].get("ownerReferences") or []:
            found = self.store.by_uid(str(ref.get("uid")))
            if found is None:
                continue
            (key, _, _), owner = found
            if owner["metadata"].get("deletionTimestamp") and "foregroundDeletion" in (
                owner["metadata"].get("finalizers") or []
            ):
                self._foreground(key, owner)

    def _check_dangling(self, key: resources.StorageKey, obj: JsonDict) -> None:
        refs = obj["metadata"].get("ownerReferences") or []
        if any(self.store.by_uid(str(r.get("uid"))) is not None for r in refs):
            return
        rt = self._rt(key)
        if rt is None:
            return
        meta = obj["metadata"]
        with contextlib.suppress(errors.ApiError):
            self.store.delete(rt, meta.get("namespace", ""), meta["name"], propagation="Background")


_QUANTITY = re.compile(r"^([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)([a-zA-Z]*)$")
_SUFFIXES = {
    "": 1.0,
    "n": 1e-9,
    "u": 1e-6,
    "m": 1e-3,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "P": 1e15,
    "E": 1e18,
    "Ki": 2.0**10,
    "Mi": 2.0**20,
    "Gi": 2.0**30,
    "Ti": 2.0**40,
    "Pi": 2.0**50,
    "Ei": 2.0**60,
}


def parse_quantity(text: str | int | float) -> float:
    """A Kubernetes resource quantity (``250m``, ``1.5``, ``512Mi``, ``2Gi``) as a number."""
    if isinstance(text, int | float):
        return float(text)
    match = _QUANTITY.match(text.strip())
    if match is None or match.group(2) not in _SUFFIXES:
        raise ValueError(f"invalid quantity {text!r}")
    return float(match.group(1)) * _SUFFIXES[match.group(2)]


def _fraction(seed: str, low: float, high: float) -> float:
    return low + (int(_digest(seed)[:8], 16) / 0xFFFFFFFF) * (high - low)


def pod_metrics(
    st: store.Store, fault_state: faults.Faults, namespace: str | None, name: str | None
) -> list[JsonDict]:
    """PodMetrics for running pods: cpu 25-50% of the request, memory about half (stable per minute)."""
    now = datetime.datetime.now(datetime.UTC)
    minute = now.strftime("%Y%m%d%H%M")
    out: list[JsonDict] = []
    for pod in sorted(
        st.objects(PODS, namespace), key=lambda p: (p["metadata"].get("namespace"), p["metadata"]["name"])
    ):
        meta = pod["metadata"]
        if name is not None and meta["name"] != name:
            continue
        status = pod.get("status") or {}
        if (
            status.get("phase") != "Running"
            or (meta.get("namespace", ""), meta["name"]) in fault_state.crashing
        ):
            continue
        containers = []
        for container in (pod.get("spec") or {}).get("containers") or []:
            resources_ = container.get("resources") or {}
            requests = {**(resources_.get("limits") or {}), **(resources_.get("requests") or {})}
            try:
                cpu = parse_quantity(requests.get("cpu", "100m"))
                memory = parse_quantity(requests.get("memory", "128Mi"))
            except ValueError:
                cpu, memory = 0.1, 128 * 2.0**20
            seed = f"{meta['uid']}/{container.get('name')}/{minute}"
            used_cpu = cpu * _fraction(seed + "/cpu", 0.25, 0.5)
            used_memory = memory * _fraction(seed + "/mem", 0.45, 0.55)
            containers.append(
                {
                    "name": container.get("name"),
                    "usage": {"cpu": f"{int(used_cpu * 1e9)}n", "memory": f"{int(used_memory / 1024)}Ki"},
                }
            )
        out.append(
            {
                "kind": "PodMetrics",
                "apiVersion": "metrics.k8s.io/v1beta1",
                "metadata": {
                    "name": meta["name"],
                    "namespace": meta.get("namespace"),
                    "creationTimestamp": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
                    "labels": dict(meta.get("labels") or {}),
                },
                "timestamp": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "window": "30s",
                "containers": containers,
            }
        )
    return out

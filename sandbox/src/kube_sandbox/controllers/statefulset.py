"""The StatefulSet controller: ordered pods, their claims, rolling updates and the status.

:class:`StatefulSetController` creates, scales (OrderedReady or Parallel) and rolls pods
``<name>-<ordinal>`` and their claims ``<template>-<name>-<ordinal>`` (which it never deletes,
Kubernetes' default ``Retain`` policy) and keeps the StatefulSet's ``status`` true. Separate from
the other controllers because it is the largest and shares only the loop, Event recording and hashes.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterable

from kube_sandbox import errors, kinds, resources, store
from kube_sandbox.controllers import base

JsonDict = base.JsonDict
PodKey = base.PodKey

log = logging.getLogger(__name__)

PVCS: resources.StorageKey = ("", "persistentvolumeclaims")
STATEFULSETS: resources.StorageKey = ("apps", "statefulsets")


def _ready(pod: JsonDict) -> bool:
    if pod["metadata"].get("deletionTimestamp"):
        return False
    status = pod.get("status") or {}
    if status.get("phase") != "Running":
        return False
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])


def revision_of(sts: JsonDict) -> str:
    """The ``controller-revision-hash`` of a StatefulSet's current template."""
    template = (sts.get("spec") or {}).get("template") or {}
    return f"{sts['metadata']['name']}-{base.safe_hash(store.dumps(template).decode())}"


_ORDINAL = re.compile(r"^(.*)-(\d+)$")


class StatefulSetController(base.Runner):
    """The StatefulSet controller: pods, claims, rolling updates and status."""

    keys = frozenset({STATEFULSETS, base.PODS, PVCS})

    def handle(self, batch: list[store.Event]) -> None:
        """Reconcile every StatefulSet a change touches."""
        dirty: set[PodKey] = set()
        for event in batch:
            meta = event.obj["metadata"]
            namespace = meta.get("namespace", "")
            if event.key == STATEFULSETS:
                if event.type != "DELETED":
                    dirty.add((namespace, meta["name"]))
            elif event.key == base.PODS:
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
            if key != base.PODS:
                continue
            match = _ORDINAL.match(pod_name)
            pod = self.store.find(base.PODS, namespace, pod_name)
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
        created = self.store.create(self._rt(base.PODS), pod, manager="kube-controller-manager")
        base.record_event(
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
            self.store.delete(self._rt(base.PODS), meta.get("namespace", ""), meta["name"])
        base.record_event(
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
        self.store.update(
            self._rt(STATEFULSETS),
            base.status_write(sts, status),
            manager="kube-controller-manager",
            subresource="status",
        )

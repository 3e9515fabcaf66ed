"""The garbage collector and the namespace controller, driven by deletions.

:class:`GarbageCollector` deletes dependents of deleted owners (background), finishes foreground
deletions, deletes objects whose owners are already gone and empties terminating namespaces. It
writes no status and records no Events: it only reacts to ``ownerReferences`` and
``deletionTimestamp``, which is why it stands alone.
"""

from __future__ import annotations

import contextlib
import logging

from kube_sandbox import errors, resources, store
from kube_sandbox.controllers import base

JsonDict = base.JsonDict

log = logging.getLogger(__name__)


class GarbageCollector(base.Runner):
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

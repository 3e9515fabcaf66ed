"""The object store itself: the semantics of every write, on top of the read side (the index).

This is where kube-apiserver's generic registry and etcd meet: create, update and delete with
their preconditions, generation and managedFields bookkeeping, finalizers and cascading deletion,
namespace termination, CRDs that add and remove resource types, and the export and restore of the
whole content for persistence. Every write takes the next resourceVersion
(:mod:`kube_sandbox.store.versions`) and hands one event to the watch window
(:mod:`kube_sandbox.store.history`) and to the watchers (:mod:`kube_sandbox.store.fanout`).

Kubernetes Events are the one kind written as a side effect of other writes (controllers record
one per pod created or deleted), so they are bounded too: at most ``event_limit`` per namespace, the
least recently written one removed first, as kube-apiserver's ``--event-ttl`` expires them from etcd.

Stored objects are treated as immutable: every write builds a new dict. Readers get the stored dict
and must copy it (:func:`kube_sandbox.store.values.thaw`) before changing it.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Mapping

from kube_sandbox import apply, errors, kinds, resources
from kube_sandbox.store import allocators, changes, index, values, versions

JsonDict = values.JsonDict
StorageKey = resources.StorageKey
ObjectRef = index.ObjectRef

CRD_KEY: StorageKey = ("apiextensions.k8s.io", "customresourcedefinitions")
NAMESPACE_KEY: StorageKey = ("", "namespaces")
EVENT_KEY: StorageKey = ("", "events")
SYSTEM_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")

Admit = Callable[[JsonDict | None, JsonDict | None], None]
"""Validating admission of one write: called with ``(object, oldObject)`` after defaulting and
validation, before anything is stored (dry runs included); refuses by raising an ``ApiError``.
Requests pass one (see :mod:`kube_sandbox.admission`); the simulated controllers, in-process
clients of the store, do not."""


class Store(index.Index):
    """All objects of the sandbox cluster, with watch history and subscribers."""

    def __init__(
        self,
        *,
        registry: resources.Registry,
        watch_window: int = 10_000,
        watch_window_bytes: int = 32 * 1024 * 1024,
        watch_queue_size: int = 10_000,
        event_limit: int = 1_000,
    ) -> None:
        if watch_window < 1 or watch_window_bytes < 1 or event_limit < 1:
            raise ValueError("watch_window, watch_window_bytes and event_limit must be positive")
        super().__init__(
            registry=registry,
            watch_window=watch_window,
            watch_window_bytes=watch_window_bytes,
            watch_queue_size=watch_queue_size,
        )
        self.event_limit = event_limit
        self.on_write: Callable[[], None] | None = None
        """Called after every write (persistence schedules a snapshot from it)."""
        self._service_ips = allocators.ServiceIPs()
        for name in SYSTEM_NAMESPACES:
            self.create(self._rt(NAMESPACE_KEY), {"metadata": {"name": name}}, manager="kube-apiserver")

    # ----- persistence hooks ---------------------------------------------------------------------

    @property
    def version_ceiling(self) -> int | None:
        """No resourceVersion above this is handed out before ``on_ceiling`` has moved it (persistence)."""
        return self._versions.ceiling

    @version_ceiling.setter
    def version_ceiling(self, value: int | None) -> None:
        self._versions.ceiling = value

    @property
    def on_ceiling(self) -> Callable[[int], int] | None:
        """Called with the version about to exceed ``version_ceiling``; returns the new ceiling."""
        return self._versions.on_ceiling

    @on_ceiling.setter
    def on_ceiling(self, value: Callable[[int], int] | None) -> None:
        self._versions.on_ceiling = value

    # ----- persistence ---------------------------------------------------------------------------

    def export(self) -> versions.State:
        """The whole store as one consistent :class:`State` (cheap: it references serializations)."""
        objects = {
            key: [entry.raw for bucket in buckets.values() for entry in bucket.values()]
            for key, buckets in self._objects.items()
            if buckets
        }
        return versions.State(
            resource_version=self._versions.current, service_ips=self._service_ips.issued, objects=objects
        )

    def restore(
        self,
        *,
        resource_version: int,
        service_ips: int,
        objects: Mapping[StorageKey, Iterable[JsonDict]],
    ) -> int:
        """Replace the whole content with saved objects; returns how many were restored.

        Objects keep their uid, creationTimestamp, resourceVersion and managedFields; the counter
        continues from ``resource_version``. The watch history starts empty at that version, so a
        watch or continue token from an older version gets ``410 Gone`` (the client relists) rather
        than silently missing the changes before the restart. Must run before anything watches.
        """
        if self._fanout.busy:
            raise RuntimeError("restore the store before anything watches it")
        checked: list[tuple[StorageKey, str, str, JsonDict]] = []
        for key, items in objects.items():
            for obj in items:
                meta = obj.get("metadata")
                if not isinstance(meta, dict) or not meta.get("name") or not meta.get("uid"):
                    raise ValueError(f"a saved {key[1]} object has no metadata.name or metadata.uid")
                if int(meta.get("resourceVersion") or 0) > resource_version:
                    raise ValueError(
                        f"saved {key[1]} {meta['name']!r} has resourceVersion {meta.get('resourceVersion')}, "
                        f"newer than the saved counter {resource_version}"
                    )
                checked.append((key, str(meta.get("namespace") or ""), str(meta["name"]), obj))
        for crd in self.objects(CRD_KEY):
            self.registry.remove_crd(crd["metadata"]["name"])
        self._objects = {}
        self._uids.clear()
        self._dependents.clear()
        self._history.reset(resource_version)
        for key, namespace, name, obj in checked:
            ref: ObjectRef = (key, namespace, name)
            self._bucket(key, namespace)[name] = values.Entry(obj)
            self._index(obj, ref, add=True)
            self._uids[obj["metadata"]["uid"]] = ref
            if key == CRD_KEY:
                # Terminating CRDs too: they still serve until their finalizers are gone.
                self.registry.add_crd(obj)
        self._versions.current = resource_version
        self._service_ips.issued = service_ips
        return len(checked)

    # ----- writing -------------------------------------------------------------------------------

    def _next_rv(self) -> int:
        return self._versions.next()

    def _emit(self, event: changes.Event) -> None:
        self._history.record(changes.Change(event))
        self._fanout.publish(event)
        if self.on_write is not None:
            self.on_write()

    def _check_namespace(self, rt: resources.ResourceType, namespace: str, name: str) -> None:
        if not rt.namespaced:
            return
        ns = self.find(NAMESPACE_KEY, "", namespace)
        if ns is None:
            raise errors.NotFound.of(group="", plural="namespaces", name=namespace)
        if ns["metadata"].get("deletionTimestamp"):
            raise errors.Forbidden(
                f'{errors.qualified(group=rt.group, plural=rt.plural)} "{name}" is forbidden: unable '
                f"to create new content in namespace {namespace} because it is being terminated",
                details={
                    "kind": rt.plural,
                    "group": rt.group or None,
                    "causes": [
                        {
                            "reason": "NamespaceTerminating",
                            "message": f"namespace {namespace} is being terminated",
                            "field": "metadata.namespace",
                        }
                    ],
                },
            )

    def _store(self, rt: resources.ResourceType, obj: JsonDict, old: JsonDict | None, kind: str) -> JsonDict:
        meta = obj["metadata"]
        namespace = meta.get("namespace", "")
        ref: ObjectRef = (rt.storage_key, namespace, meta["name"])
        if old is not None:
            self._index(old, ref, add=False)
        entry = values.Entry(obj)
        bucket = self._bucket(rt.storage_key, namespace)
        previous = bucket.get(meta["name"])
        old_raw = None
        if old is not None:
            old_raw = previous.raw if previous is not None and previous.obj is old else values.dumps(old)
        if rt.storage_key == EVENT_KEY:
            # Re-inserted at the end: the bucket's order is least recently written first.
            bucket.pop(meta["name"], None)
        bucket[meta["name"]] = entry
        self._index(obj, ref, add=True)
        self._uids[meta["uid"]] = ref
        self._emit(
            changes.Event(
                type=kind,
                key=rt.storage_key,
                rv=self._versions.current,
                obj=obj,
                raw=entry.raw,
                old=old,
                old_raw=old_raw,
            )
        )
        if rt.storage_key == CRD_KEY:
            self._crd_changed(obj)
        if rt.storage_key == EVENT_KEY and old is None:
            self._expire_events(rt, bucket)
        return obj

    def _expire_events(self, rt: resources.ResourceType, bucket: dict[str, values.Entry]) -> None:
        """Remove the least recently written Events beyond ``event_limit`` (kube-apiserver's TTL)."""
        while len(bucket) > self.event_limit:
            self._remove(rt, next(iter(bucket.values())).obj)

    def _remove(self, rt: resources.ResourceType, old: JsonDict) -> JsonDict:
        meta = old["metadata"]
        namespace = meta.get("namespace", "")
        ref: ObjectRef = (rt.storage_key, namespace, meta["name"])
        bucket = self._bucket(rt.storage_key, namespace)
        bucket.pop(meta["name"], None)
        if not bucket:
            self._objects[rt.storage_key].pop(namespace, None)
        self._index(old, ref, add=False)
        self._uids.pop(meta["uid"], None)
        final = dict(old)
        final["metadata"] = {**meta, "resourceVersion": str(self._next_rv())}
        self._emit(
            changes.Event(
                type="DELETED",
                key=rt.storage_key,
                rv=self._versions.current,
                obj=final,
                raw=values.dumps(final),
                old=None,
            )
        )
        if rt.storage_key == CRD_KEY:
            self._crd_removed(final)
        return final

    def allocate_cluster_ip(self) -> str:
        """The next free ClusterIP in 10.96.0.0/12, as the service IP allocator would hand out."""
        return self._service_ips.allocate()

    def create(
        self,
        rt: resources.ResourceType,
        obj: JsonDict,
        *,
        manager: str,
        dry_run: bool = False,
        managed_fields: list[JsonDict] | None = None,
        admit: Admit | None = None,
    ) -> JsonDict:
        """Create an object (the caller hands over ``obj``); returns what was stored."""
        meta = obj.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise errors.BadRequest("metadata must be an object")
        obj["apiVersion"] = rt.api_version
        obj["kind"] = rt.kind
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = allocators.generate_name(meta["generateName"])
        name = str(meta.get("name") or "")
        namespace = str(meta.get("namespace") or "") if rt.namespaced else ""
        if rt.namespaced and not namespace:
            raise errors.BadRequest("the namespace of the object is required")
        if not rt.namespaced:
            meta.pop("namespace", None)
        kinds.validate_name(rt, name)
        self._check_namespace(rt, namespace, name)
        if name in self._objects.get(rt.storage_key, {}).get(namespace, {}):
            raise errors.AlreadyExists.of(group=rt.group, plural=rt.plural, name=name)
        for system in (
            "resourceVersion",
            "uid",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "managedFields",
            "selfLink",
        ):
            meta.pop(system, None)
        if rt.status_subresource and not managed_fields:
            obj.pop("status", None)
        kinds.prepare_create(rt, obj, store=self)
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = values.now()
        if rt.has_generation:
            meta["generation"] = 1
        else:
            meta.pop("generation", None)
        if managed_fields is None:
            managed_fields = apply.track_update(
                None,
                obj,
                manager=manager,
                api_version=rt.api_version,
                subresource="",
                now=meta["creationTimestamp"],
            )
        if managed_fields:
            meta["managedFields"] = managed_fields
        if admit is not None:
            admit(obj, None)
        if dry_run:
            meta["resourceVersion"] = str(self._versions.current)
            return obj
        meta["resourceVersion"] = str(self._next_rv())
        return self._store(rt, obj, None, "ADDED")

    def update(
        self,
        rt: resources.ResourceType,
        obj: JsonDict,
        *,
        manager: str,
        subresource: str = "",
        dry_run: bool = False,
        managed_fields: list[JsonDict] | None = None,
        admit: Admit | None = None,
    ) -> JsonDict:
        """Replace an object (PUT semantics, with resourceVersion and uid preconditions)."""
        meta = obj.get("metadata")
        if not isinstance(meta, dict) or not meta.get("name"):
            raise errors.BadRequest("name is required in metadata")
        namespace = str(meta.get("namespace") or "") if rt.namespaced else ""
        old = self.get(rt, namespace, str(meta["name"]))
        old_meta = old["metadata"]
        sent_rv = meta.get("resourceVersion")
        if sent_rv and str(sent_rv) != old_meta["resourceVersion"]:
            raise errors.Conflict.stale(group=rt.group, plural=rt.plural, name=old_meta["name"])
        if meta.get("uid") and meta["uid"] != old_meta["uid"]:
            raise errors.Conflict(
                f"Precondition failed: UID in precondition: {meta['uid']}, "
                f"UID in object meta: {old_meta['uid']}"
            )
        if subresource == "status":
            new = values.thaw(old)
            if "status" in obj:
                new["status"] = obj["status"]
            else:
                new.pop("status", None)
        else:
            new = obj
            new["apiVersion"] = rt.api_version
            new["kind"] = rt.kind
            if rt.status_subresource and not managed_fields:
                if "status" in old:
                    new["status"] = old["status"]
                else:
                    new.pop("status", None)
        new_meta = new["metadata"]
        for system in (
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "generation",
            "namespace",
            "name",
        ):
            if system in old_meta:
                new_meta[system] = old_meta[system]
            else:
                new_meta.pop(system, None)
        new_meta.pop("selfLink", None)
        kinds.prepare_update(rt, new, old, store=self)
        if managed_fields is None:
            managed_fields = apply.track_update(
                old,
                new,
                manager=manager,
                api_version=rt.api_version,
                subresource=subresource,
                now=values.now(),
                only="status" if subresource == "status" else None,
            )
        if managed_fields:
            new_meta["managedFields"] = managed_fields
        else:
            new_meta.pop("managedFields", None)
        if rt.has_generation and _spec_of(new, rt) != _spec_of(old, rt):
            new_meta["generation"] = int(old_meta.get("generation", 1)) + 1
        new_meta["resourceVersion"] = old_meta["resourceVersion"]
        if admit is not None:
            # Before the no-op check, as kube-apiserver validates before etcd sees nothing changed.
            admit(new, old)
        if _unchanged(old, new):
            return old
        if dry_run:
            return new
        if (
            new_meta.get("deletionTimestamp")
            and not new_meta.get("finalizers")
            and not _ns_finalizers(rt, new)
        ):
            return self._remove(rt, new)
        new_meta["resourceVersion"] = str(self._next_rv())
        return self._store(rt, new, old, "MODIFIED")

    def delete(
        self,
        rt: resources.ResourceType,
        namespace: str,
        name: str,
        *,
        propagation: str | None = None,
        preconditions: JsonDict | None = None,
        dry_run: bool = False,
        admit: Admit | None = None,
    ) -> tuple[JsonDict, bool]:
        """Delete an object; returns it and whether it is gone (False while finalizers hold it)."""
        old = self.get(rt, namespace, name)
        meta = old["metadata"]
        pre = preconditions or {}
        if pre.get("uid") and pre["uid"] != meta["uid"]:
            raise errors.Conflict(
                f"Precondition failed: UID in precondition: {pre['uid']}, UID in object meta: {meta['uid']}"
            )
        if pre.get("resourceVersion") and str(pre["resourceVersion"]) != meta["resourceVersion"]:
            raise errors.Conflict.stale(group=rt.group, plural=rt.plural, name=name)
        if propagation not in (None, "Background", "Foreground", "Orphan"):
            raise errors.BadRequest(f"unsupported propagationPolicy {propagation!r}")
        if admit is not None:
            admit(None, old)
        if dry_run:
            return old, True
        if rt.storage_key == NAMESPACE_KEY:
            return self._terminate_namespace(rt, old), False
        if meta.get("deletionTimestamp"):
            return old, False
        policy = propagation or "Background"
        if policy == "Orphan":
            self._orphan(meta["uid"])
        finalizers = list(meta.get("finalizers") or [])
        if policy == "Foreground" and "foregroundDeletion" not in finalizers:
            finalizers.append("foregroundDeletion")
        if finalizers:
            marked = values.thaw(old)
            marked["metadata"].update(
                deletionTimestamp=values.now(),
                deletionGracePeriodSeconds=0,
                finalizers=finalizers,
                resourceVersion=str(self._next_rv()),
            )
            return self._store(rt, marked, old, "MODIFIED"), False
        return self._remove(rt, old), True

    def _orphan(self, owner_uid: str) -> None:
        for key, ns, dep_name in self.dependents(owner_uid):
            dep = self.find(key, ns, dep_name)
            if dep is None:
                continue
            changed = values.thaw(dep)
            refs = [r for r in changed["metadata"].get("ownerReferences") or [] if r.get("uid") != owner_uid]
            if refs:
                changed["metadata"]["ownerReferences"] = refs
            else:
                changed["metadata"].pop("ownerReferences", None)
            self.update(self._rt(key), changed, manager="kube-controller-manager")

    def _terminate_namespace(self, rt: resources.ResourceType, old: JsonDict) -> JsonDict:
        name = old["metadata"]["name"]
        if name in SYSTEM_NAMESPACES:
            raise errors.Forbidden(
                f'namespaces "{name}" is forbidden: this namespace may not be deleted',
                details={"name": name, "kind": "namespaces"},
            )
        if old["metadata"].get("deletionTimestamp"):
            return old
        marked = values.thaw(old)
        marked["metadata"].update(deletionTimestamp=values.now(), resourceVersion=str(self._next_rv()))
        marked["status"] = {"phase": "Terminating"}
        return self._store(rt, marked, old, "MODIFIED")

    def finish_namespace(self, name: str) -> None:
        """Remove a terminating namespace's content and then the namespace (the namespace controller)."""
        ns = self.find(NAMESPACE_KEY, "", name)
        if ns is None or not ns["metadata"].get("deletionTimestamp"):
            return
        for rt in self.registry.storage_types():
            if not rt.namespaced:
                continue
            for obj in list(self.objects(rt.storage_key, name)):
                self._remove(rt, obj)
        current = self.find(NAMESPACE_KEY, "", name)
        if current is not None:
            self._remove(self._rt(NAMESPACE_KEY), current)

    def remove_finalizer(self, rt: resources.ResourceType, namespace: str, name: str, finalizer: str) -> None:
        """Drop one finalizer (the garbage collector finishing a foreground deletion)."""
        obj = self.find(rt.storage_key, namespace, name)
        if obj is None or finalizer not in (obj["metadata"].get("finalizers") or []):
            return
        changed = values.thaw(obj)
        changed["metadata"]["finalizers"] = [f for f in changed["metadata"]["finalizers"] if f != finalizer]
        if not changed["metadata"]["finalizers"]:
            del changed["metadata"]["finalizers"]
        self.update(rt, changed, manager="kube-controller-manager")

    def _crd_changed(self, crd: JsonDict) -> None:
        if crd["metadata"].get("deletionTimestamp"):
            return
        self.registry.add_crd(crd)

    def _crd_removed(self, crd: JsonDict) -> None:
        types = self.registry.remove_crd(crd["metadata"]["name"])
        for key in {rt.storage_key for rt in types}:
            if self.registry.preferred(key) is not None:
                continue
            rt = types[0]
            for obj in self.objects(key):
                self._remove(rt, obj)
            self._objects.pop(key, None)
            self.close_watchers(key, reason="the resource type was removed")

    def bulk_load(
        self, rt: resources.ResourceType, objs: Iterable[JsonDict], *, manager: str = "bulk-load"
    ) -> int:
        """Create many objects at once (benchmark and demo setup); returns how many were created."""
        count = 0
        for obj in objs:
            self.create(rt, obj, manager=manager)
            count += 1
        return count


def _spec_of(obj: JsonDict, rt: resources.ResourceType) -> JsonDict:
    skip = {"metadata", "apiVersion", "kind"}
    if rt.status_subresource:
        skip.add("status")
    return {k: v for k, v in obj.items() if k not in skip}


def _strip_times(obj: JsonDict) -> JsonDict:
    meta = dict(obj.get("metadata") or {})
    meta["managedFields"] = [
        {k: v for k, v in e.items() if k != "time"} for e in meta.get("managedFields") or []
    ]
    return {**obj, "metadata": meta}


def _unchanged(old: JsonDict, new: JsonDict) -> bool:
    return _strip_times(old) == _strip_times(new)


def _ns_finalizers(rt: resources.ResourceType, obj: JsonDict) -> bool:
    return rt.storage_key == NAMESPACE_KEY

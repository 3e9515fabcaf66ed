"""The read side of the store: the stored objects, their uid and owner indexes, pages and watches.

Objects are kept by storage key, namespace and name, each as an
:class:`~kube_sandbox.store.values.Entry` (the object with its serialization), so lists and watch
events are serialized once per write, not once per reader. Everything here reads (``_index`` aside,
which the writes call to keep the indexes); :class:`kube_sandbox.store.objects.Store` adds the
writes. The two are apart because lookups, paginated lists and watches resumed from the watch
window (:mod:`kube_sandbox.store.history`) need the objects and the current resourceVersion, never
the write semantics.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator

from kube_sandbox import errors, resources, selectors
from kube_sandbox.store import changes, fanout, history, paging, values, versions

JsonDict = values.JsonDict
StorageKey = resources.StorageKey
ObjectRef = tuple[StorageKey, str, str]


class Index:
    """The stored objects and their indexes, with every read: lookups, pages and watches."""

    def __init__(
        self,
        *,
        registry: resources.Registry,
        watch_window: int,
        watch_window_bytes: int,
        watch_queue_size: int,
    ) -> None:
        self.registry = registry
        self.watch_queue_size = watch_queue_size
        self._versions = versions.Versions()
        self._objects: dict[StorageKey, dict[str, dict[str, values.Entry]]] = {}
        self._history = history.History(window=watch_window, window_bytes=watch_window_bytes)
        self._fanout = fanout.Fanout()
        self._dependents: dict[str, set[ObjectRef]] = {}
        self._uids: dict[str, ObjectRef] = {}

    # ----- settings ------------------------------------------------------------------------------

    @property
    def watch_window(self) -> int:
        """How many changes the watch window keeps at most."""
        return self._history.window

    @watch_window.setter
    def watch_window(self, value: int) -> None:
        self._history.window = value

    @property
    def watch_window_bytes(self) -> int:
        """How many bytes of serializations the watch window keeps at most."""
        return self._history.window_bytes

    @watch_window_bytes.setter
    def watch_window_bytes(self, value: int) -> None:
        self._history.window_bytes = value

    # ----- reading -------------------------------------------------------------------------------

    @property
    def resource_version(self) -> int:
        """The newest resourceVersion handed out."""
        return self._versions.current

    @property
    def oldest_resumable(self) -> int:
        """The oldest resourceVersion a watch can still resume from."""
        return self._history.evicted_rv

    @property
    def history_size(self) -> tuple[int, int]:
        """How many changes the watch window holds, and the bytes of their serializations."""
        return self._history.size

    def count(self, key: StorageKey | None = None) -> int:
        """How many objects are stored (of one kind, or of every kind)."""
        keys = [key] if key is not None else list(self._objects)
        return sum(len(bucket) for k in keys for bucket in self._objects.get(k, {}).values())

    def _rt(self, key: StorageKey) -> resources.ResourceType:
        rt = self.registry.preferred(key)
        if rt is None:
            raise errors.NotFound(f"the server could not find the requested resource ({key[1]})")
        return rt

    def _bucket(self, key: StorageKey, namespace: str) -> dict[str, values.Entry]:
        return self._objects.setdefault(key, {}).setdefault(namespace, {})

    def entry(self, rt: resources.ResourceType, namespace: str, name: str) -> values.Entry:
        """The stored entry, or NotFound with kube-apiserver's message."""
        found = self._objects.get(rt.storage_key, {}).get(namespace, {}).get(name)
        if found is None:
            raise errors.NotFound.of(group=rt.group, plural=rt.plural, name=name)
        return found

    def get(self, rt: resources.ResourceType, namespace: str, name: str) -> JsonDict:
        """The stored object (read-only: :func:`thaw` it before changing it)."""
        return self.entry(rt, namespace, name).obj

    def find(self, key: StorageKey, namespace: str, name: str) -> JsonDict | None:
        """The stored object or None, by storage key."""
        found = self._objects.get(key, {}).get(namespace, {}).get(name)
        return found.obj if found is not None else None

    def iter_entries(self, key: StorageKey, namespace: str | None = None) -> Iterator[values.Entry]:
        """Every stored entry of a kind, optionally in one namespace, in no particular order."""
        buckets = self._objects.get(key, {})
        if namespace is not None:
            yield from buckets.get(namespace, {}).values()
            return
        for bucket in buckets.values():
            yield from bucket.values()

    def objects(self, key: StorageKey, namespace: str | None = None) -> list[JsonDict]:
        """Every stored object of a kind (read-only)."""
        return [e.obj for e in self.iter_entries(key, namespace)]

    def by_uid(self, uid: str) -> tuple[ObjectRef, JsonDict] | None:
        """The object with this uid and where it lives, if it exists."""
        ref = self._uids.get(uid)
        if ref is None:
            return None
        obj = self.find(*ref)
        return None if obj is None else (ref, obj)

    def dependents(self, owner_uid: str) -> list[ObjectRef]:
        """Objects whose ownerReferences name ``owner_uid``."""
        return sorted(self._dependents.get(owner_uid, ()))

    def list_page(
        self,
        rt: resources.ResourceType,
        *,
        namespace: str | None,
        labels: selectors.LabelSelector | None = None,
        fields: selectors.FieldSelector | None = None,
        limit: int | None = None,
        continue_token: str | None = None,
    ) -> paging.ListResult:
        """A page of matching objects in (namespace, name) order, as etcd would return them.

        The walk is in that order and stops once the page is full: a list of ``n`` objects in
        pages costs ``O(n)`` matches in all, not ``O(n)`` per page. As kube-apiserver does, a full
        page continues while any object follows it (the next page may then be empty), and
        ``remaining`` (``remainingItemCount``) is given only for lists without selectors.
        """
        labels = labels or selectors.LabelSelector()
        fields = fields or selectors.FieldSelector()
        list_rv = self._versions.current
        start: tuple[str, str] | None = None
        if continue_token:
            list_rv, start = paging.decode_continue(continue_token, oldest=self._history.evicted_rv)
        buckets = self._objects.get(rt.storage_key, {})
        namespaces = [namespace] if namespace is not None else sorted(buckets)
        pinned = fields.exact("metadata.name")
        full = limit if limit and limit > 0 else None
        matched: list[tuple[tuple[str, str], values.Entry]] = []
        following: int | None = None  # objects after a full page, matching or not
        for position, ns in enumerate(namespaces):
            if start is not None and ns < start[0]:
                continue
            bucket = buckets.get(ns, {})
            names = ([pinned] if pinned in bucket else []) if pinned is not None else sorted(bucket)
            if start is not None and ns == start[0]:
                names = names[bisect.bisect_right(names, start[1]) :]
            for index, name in enumerate(names):
                if len(matched) == full:
                    following = len(names) - index
                    following += sum(len(buckets.get(later, {})) for later in namespaces[position + 1 :])
                    break
                entry = bucket[name]
                if not labels.empty and not labels.matches(entry.obj["metadata"].get("labels")):
                    continue
                if not fields.empty and not fields.matches(entry.obj):
                    continue
                matched.append(((ns, name), entry))
            if following is not None:
                break
        token = paging.encode_continue(list_rv, matched[-1][0]) if following else None
        unselected = labels.empty and fields.empty
        return paging.ListResult(
            [e for _, e in matched], list_rv, token, following if token and unselected else None
        )

    # ----- watching ------------------------------------------------------------------------------

    def watch(
        self,
        rt: resources.ResourceType,
        *,
        namespace: str | None,
        labels: selectors.LabelSelector | None = None,
        fields: selectors.FieldSelector | None = None,
        since: int | None,
        max_queue: int | None = None,
    ) -> changes.Watcher:
        """Start a watch: from ``since`` (exclusive), or with the current state as ADDED if None.

        Raises :class:`kube_sandbox.errors.Gone` when ``since`` is older than the window.
        """
        key = rt.storage_key
        watcher = changes.Watcher(
            keys=frozenset({key}),
            namespace=namespace,
            labels=labels,
            fields=fields,
            max_queue=self.watch_queue_size if max_queue is None else max_queue,
        )
        if since is None:
            result = self.list_page(rt, namespace=namespace, labels=labels, fields=fields)
            for entry in result.items:
                rv = int(entry.obj["metadata"]["resourceVersion"])
                watcher.push(
                    changes.Event(type="ADDED", key=key, rv=rv, obj=entry.obj, raw=entry.raw, old=None)
                )
        else:
            for change in self._history.since(since):
                if change.key == key:
                    watcher.offer(change.event())
                    if watcher.closed:
                        break
        if not watcher.closed:
            self._fanout.add(key, watcher)
        return watcher

    def history_since(self, since: int) -> list[changes.Event]:
        """Every retained event after ``since``; Gone when some of them have been evicted."""
        return [change.event() for change in self._history.since(since)]

    def unwatch(self, watcher: changes.Watcher) -> None:
        """Forget a watcher (its reader finished)."""
        self._fanout.unwatch(watcher)

    def subscribe(self, keys: Iterable[StorageKey] | None = None) -> changes.Watcher:
        """An unbounded change stream for in-process controllers (all kinds when ``keys`` is None)."""
        return self._fanout.subscribe(keys)

    def watchers(self) -> list[changes.Watcher]:
        """Every open client watch (not controller subscriptions)."""
        return self._fanout.clients()

    def close_watchers(self, key: StorageKey | None = None, *, reason: str = "") -> int:
        """End every client watch (of one kind, or all); returns how many were closed."""
        return self._fanout.close(key, reason=reason)

    def initial_events(self, keys: Iterable[StorageKey] | None = None) -> list[changes.Event]:
        """Every stored object (of ``keys``, or all) as an ADDED event.

        What a controller starts from, as a real one lists before it watches: after a restore,
        the objects it would otherwise only see when they next change.
        """
        wanted = list(self._objects) if keys is None else list(keys)
        return [
            changes.Event(
                type="ADDED",
                key=key,
                rv=int(entry.obj["metadata"]["resourceVersion"]),
                obj=entry.obj,
                raw=entry.raw,
                old=None,
            )
            for key in wanted
            for entry in self.iter_entries(key)
        ]

    # ----- indexes -------------------------------------------------------------------------------

    def _index(self, obj: JsonDict, ref: ObjectRef, *, add: bool) -> None:
        for owner in obj["metadata"].get("ownerReferences") or ():
            uid = owner.get("uid")
            if not uid:
                continue
            if add:
                self._dependents.setdefault(uid, set()).add(ref)
            else:
                deps = self._dependents.get(uid)
                if deps is not None:
                    deps.discard(ref)
                    if not deps:
                        del self._dependents[uid]

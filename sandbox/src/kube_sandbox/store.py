"""The sandbox's object store: objects, the global resourceVersion, the event history and watchers.

Like etcd behind kube-apiserver, every write bumps one cluster-wide ``resourceVersion`` counter and
is recorded as a watch event in a ring buffer (the "watch window") bounded twice: by a number of
events (``watch_window``) and by the bytes of their serializations (``watch_window_bytes``), so
that a window of large objects cannot hold gigabytes. A watch that resumes from a version still
inside the window receives every later event; an older version gets ``410 Gone`` (reason
``Expired``). The window keeps each change as its serialization only (:class:`Change`), never the
parsed object: a parsed Kubernetes object takes five to ten times the memory of its JSON, and a
change is only parsed again when a watch resumes across it. Each stored object keeps its JSON
serialization next to it, so lists and watch events are serialized once per write, not once per
reader; every watcher has a bounded queue and is cut off (as kube-apiserver does with slow
watchers) when it overflows, so one stuck client cannot grow the server's memory.

Kubernetes Events are the one kind written as a side effect of other writes (controllers record
one per pod created or deleted), so they are bounded too: at most ``event_limit`` per namespace, the
least recently written one removed first, as kube-apiserver's ``--event-ttl`` expires them from etcd.

Stored objects are treated as immutable: every write builds a new dict. Readers get the stored dict
and must copy it (:func:`thaw`) before changing it.

All methods are synchronous and must be called from the event loop's thread; that makes each write
atomic with respect to watchers and controllers without locks.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import dataclasses
import datetime
import json
import secrets
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from kube_sandbox import apply, errors, kinds, resources, selectors

JsonDict = dict[str, Any]
StorageKey = resources.StorageKey
ObjectRef = tuple[StorageKey, str, str]

CRD_KEY: StorageKey = ("apiextensions.k8s.io", "customresourcedefinitions")
NAMESPACE_KEY: StorageKey = ("", "namespaces")
EVENT_KEY: StorageKey = ("", "events")
SYSTEM_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")
_GENERATE_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"


def dumps(obj: Any) -> bytes:
    """Compact JSON, the wire format of every response."""
    return json.dumps(obj, separators=(",", ":")).encode()


def thaw(obj: JsonDict) -> JsonDict:
    """A private deep copy of a stored object that the caller may change."""
    return dict(json.loads(dumps(obj)))


def now() -> str:
    """The current time in the RFC 3339 form (seconds, UTC) Kubernetes uses in metadata."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Entry:
    """A stored object with its serialization."""

    __slots__ = ("obj", "raw")

    def __init__(self, obj: JsonDict) -> None:
        self.obj = obj
        self.raw = dumps(obj)


class Event:
    """One change, as watchers see it; its wire line is built once and shared by every watcher.

    The object (and, for MODIFIED, the object before) can be given parsed, serialized or both; the
    parsed form is decoded from ``raw``/``old_raw`` on first use, which is how changes replayed from
    the history (kept serialized only) cost nothing until a filter has to look inside them.
    """

    __slots__ = ("_line", "_obj", "_old", "key", "old_raw", "raw", "rv", "type")

    def __init__(
        self,
        *,
        type: str,
        key: StorageKey,
        rv: int,
        obj: JsonDict | None,
        raw: bytes | None,
        old: JsonDict | None,
        old_raw: bytes | None = None,
    ) -> None:
        if obj is None and raw is None:
            raise ValueError("an event needs its object, parsed or serialized")
        self.type = type
        self.key = key
        self.rv = rv
        self._obj = obj
        self.raw = raw
        self._old = old
        self.old_raw = old_raw
        self._line: bytes | None = None

    @property
    def obj(self) -> JsonDict:
        """The object after the change (read-only)."""
        if self._obj is None:
            assert self.raw is not None
            self._obj = dict(json.loads(self.raw))
        return self._obj

    @property
    def old(self) -> JsonDict | None:
        """The object before a MODIFIED change, if known (read-only)."""
        if self._old is None and self.old_raw is not None:
            self._old = dict(json.loads(self.old_raw))
        return self._old

    def serialized(self) -> bytes:
        """The object's JSON, serialized now if nobody has yet."""
        if self.raw is None:
            self.raw = dumps(self.obj)
        return self.raw

    def line(self) -> bytes:
        """The JSON watch event line (``{"type":..,"object":..}`` and a newline)."""
        if self._line is None:
            self._line = b'{"type":"' + self.type.encode() + b'","object":' + self.serialized() + b"}\n"
        return self._line

    def retyped(self, type: str, obj: JsonDict) -> Event:
        """The same change seen by a filtered watcher, e.g. a label change as DELETED."""
        return Event(type=type, key=self.key, rv=self.rv, obj=obj, raw=None, old=None)


class Change:
    """A change as the watch history keeps it: the serializations only, shared with the store.

    ``raw`` is the very bytes object the store's :class:`Entry` holds while the version is current,
    and ``old_raw`` the previous version's (the previous change's ``raw``), so the history costs
    the serializations of the versions it spans and nothing else.
    """

    __slots__ = ("key", "old_raw", "raw", "rv", "type")

    def __init__(self, event: Event) -> None:
        self.type = event.type
        self.key = event.key
        self.rv = event.rv
        self.raw = event.serialized()
        self.old_raw = event.old_raw

    def event(self) -> Event:
        """The change as a fresh event for a resuming watch (parsed on demand)."""
        return Event(
            type=self.type, key=self.key, rv=self.rv, obj=None, raw=self.raw, old=None, old_raw=self.old_raw
        )


class Watcher:
    """One watch: a filter and a bounded queue of events; closed when it overflows."""

    def __init__(
        self,
        *,
        keys: frozenset[StorageKey] | None,
        namespace: str | None = None,
        labels: selectors.LabelSelector | None = None,
        fields: selectors.FieldSelector | None = None,
        max_queue: int | None = None,
    ) -> None:
        self.keys = keys
        self.namespace = namespace
        self.labels = labels or selectors.LabelSelector()
        self.fields = fields or selectors.FieldSelector()
        self.max_queue = max_queue
        self._unfiltered = namespace is None and self.labels.empty and self.fields.empty
        self._queue: collections.deque[Event] = collections.deque()
        self._wake = asyncio.Event()
        self.closed = False
        self.close_reason = ""

    def _matches(self, obj: JsonDict | None) -> bool:
        if obj is None:
            return False
        meta = obj.get("metadata") or {}
        if self.namespace is not None and meta.get("namespace") != self.namespace:
            return False
        return self.labels.matches(meta.get("labels")) and self.fields.matches(obj)

    def offer(self, event: Event) -> None:
        """Queue the event if the filter passes (turning moves across the filter into ADDED/DELETED)."""
        if self.closed:
            return
        if self._unfiltered:
            self.push(event)
            return
        now_matches = self._matches(event.obj)
        if event.type != "MODIFIED" or event.old is None:
            if not now_matches:
                return
        else:
            was_matching = self._matches(event.old)
            if not now_matches and not was_matching:
                return
            if now_matches and not was_matching:
                event = event.retyped("ADDED", event.obj)
            elif was_matching and not now_matches and event.old is not None:
                old = thaw(event.old)
                old["metadata"]["resourceVersion"] = str(event.rv)
                event = event.retyped("DELETED", old)
        self.push(event)

    def push(self, event: Event) -> None:
        """Queue an event unconditionally (used for the initial state of a watch)."""
        if self.closed:
            return
        self._queue.append(event)
        if self.max_queue is not None and len(self._queue) > self.max_queue:
            self.close("watcher queue overflowed: the client is too slow")
            return
        self._wake.set()

    def close(self, reason: str = "") -> None:
        """End the watch; the reader sees the end of its stream after draining nothing further."""
        if not self.closed:
            self.closed = True
            self.close_reason = reason
            self._queue.clear()
            self._wake.set()

    async def next_batch(self, wait: float | None = None) -> list[Event] | None:
        """Every queued event (possibly none after ``wait`` seconds), or None once closed."""
        if not self._queue and not self.closed:
            self._wake.clear()
            if wait is None:
                await self._wake.wait()
            else:
                try:
                    await asyncio.wait_for(self._wake.wait(), wait)
                except TimeoutError:
                    return []
        if self.closed:
            return None
        batch = list(self._queue)
        self._queue.clear()
        return batch

    @property
    def pending(self) -> int:
        """How many events wait to be sent."""
        return len(self._queue)


@dataclasses.dataclass(frozen=True)
class State:
    """What a restart needs: the counters and every stored object's serialization, by storage key.

    Taken in one synchronous step (:meth:`Store.export`), so it is one consistent version of the
    whole store; the byte strings are the store's own immutable serializations, safe to write out
    from another thread.
    """

    resource_version: int
    service_ips: int
    objects: dict[StorageKey, list[bytes]]

    @property
    def count(self) -> int:
        """How many objects."""
        return sum(len(items) for items in self.objects.values())


@dataclasses.dataclass(frozen=True)
class ListResult:
    """One page of a list: the items' serializations, the list's version and the continuation."""

    items: list[Entry]
    resource_version: int
    continue_token: str | None
    remaining: int | None


class Store:
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
        self.registry = registry
        self.watch_window = watch_window
        self.watch_window_bytes = watch_window_bytes
        self.watch_queue_size = watch_queue_size
        self.event_limit = event_limit
        self._rv = 0
        self._objects: dict[StorageKey, dict[str, dict[str, Entry]]] = {}
        self._history: collections.deque[Change] = collections.deque()
        self._history_bytes = 0
        self._evicted_rv = 0
        self.version_ceiling: int | None = None
        """No resourceVersion above this is handed out before ``on_ceiling`` has moved it (persistence)."""
        self.on_ceiling: Callable[[int], int] | None = None
        """Called with the version about to exceed ``version_ceiling``; returns the new ceiling."""
        self.on_write: Callable[[], None] | None = None
        """Called after every write (persistence schedules a snapshot from it)."""
        self._watchers: dict[StorageKey, set[Watcher]] = {}
        self._subscribers: set[Watcher] = set()
        self._dependents: dict[str, set[ObjectRef]] = {}
        self._uids: dict[str, ObjectRef] = {}
        self._service_ips = 10
        for name in SYSTEM_NAMESPACES:
            self.create(self._rt(NAMESPACE_KEY), {"metadata": {"name": name}}, manager="kube-apiserver")

    # ----- reading -------------------------------------------------------------------------------

    @property
    def resource_version(self) -> int:
        """The newest resourceVersion handed out."""
        return self._rv

    @property
    def oldest_resumable(self) -> int:
        """The oldest resourceVersion a watch can still resume from."""
        return self._evicted_rv

    @property
    def history_size(self) -> tuple[int, int]:
        """How many changes the watch window holds, and the bytes of their serializations."""
        return len(self._history), self._history_bytes

    def count(self, key: StorageKey | None = None) -> int:
        """How many objects are stored (of one kind, or of every kind)."""
        keys = [key] if key is not None else list(self._objects)
        return sum(len(bucket) for k in keys for bucket in self._objects.get(k, {}).values())

    def _rt(self, key: StorageKey) -> resources.ResourceType:
        rt = self.registry.preferred(key)
        if rt is None:
            raise errors.NotFound(f"the server could not find the requested resource ({key[1]})")
        return rt

    def _bucket(self, key: StorageKey, namespace: str) -> dict[str, Entry]:
        return self._objects.setdefault(key, {}).setdefault(namespace, {})

    def entry(self, rt: resources.ResourceType, namespace: str, name: str) -> Entry:
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

    def iter_entries(self, key: StorageKey, namespace: str | None = None) -> Iterator[Entry]:
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
    ) -> ListResult:
        """A page of matching objects in (namespace, name) order, as etcd would return them."""
        labels = labels or selectors.LabelSelector()
        fields = fields or selectors.FieldSelector()
        list_rv = self._rv
        start: tuple[str, str] | None = None
        if continue_token:
            list_rv, start = self._decode_continue(continue_token)
        buckets = self._objects.get(rt.storage_key, {})
        namespaces = [namespace] if namespace is not None else sorted(buckets)
        pinned = fields.exact("metadata.name")
        matched: list[tuple[tuple[str, str], Entry]] = []
        for ns in namespaces:
            bucket = buckets.get(ns, {})
            if pinned is not None:
                candidates: Iterable[tuple[str, Entry]] = (
                    [(pinned, bucket[pinned])] if pinned in bucket else []
                )
            else:
                candidates = bucket.items()
            for name, entry in candidates:
                if start is not None and (ns, name) <= start:
                    continue
                meta = entry.obj["metadata"]
                if not labels.empty and not labels.matches(meta.get("labels")):
                    continue
                if not fields.empty and not fields.matches(entry.obj):
                    continue
                matched.append(((ns, name), entry))
        matched.sort(key=lambda pair: pair[0])
        token = None
        remaining = None
        if limit and limit > 0 and len(matched) > limit:
            last = matched[limit - 1][0]
            remaining = len(matched) - limit
            matched = matched[:limit]
            token = self._encode_continue(list_rv, last)
        return ListResult([e for _, e in matched], list_rv, token, remaining)

    def _encode_continue(self, rv: int, last: tuple[str, str]) -> str:
        payload = dumps({"v": "meta.k8s.io/v1", "rv": rv, "start": f"{last[0]}/{last[1]}"})
        return base64.urlsafe_b64encode(payload).decode()

    def _decode_continue(self, token: str) -> tuple[int, tuple[str, str]]:
        try:
            data = json.loads(base64.urlsafe_b64decode(token.encode()))
            rv = int(data["rv"])
            ns, _, name = str(data["start"]).partition("/")
        except (ValueError, KeyError, TypeError, binascii.Error) as exc:
            raise errors.BadRequest(
                "continue key is not valid: incorrect encoded start resourceVersion"
            ) from exc
        if rv < self._evicted_rv:
            raise errors.Gone(
                "The provided continue parameter is too old to display a consistent list result. "
                "You can start a new list without the continue parameter."
            )
        return rv, (ns, name)

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
    ) -> Watcher:
        """Start a watch: from ``since`` (exclusive), or with the current state as ADDED if None.

        Raises :class:`kube_sandbox.errors.Gone` when ``since`` is older than the window.
        """
        key = rt.storage_key
        watcher = Watcher(
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
                watcher.push(Event(type="ADDED", key=key, rv=rv, obj=entry.obj, raw=entry.raw, old=None))
        else:
            for change in self._changes_since(since):
                if change.key == key:
                    watcher.offer(change.event())
                    if watcher.closed:
                        break
        if not watcher.closed:
            self._watchers.setdefault(key, set()).add(watcher)
        return watcher

    def history_since(self, since: int) -> list[Event]:
        """Every retained event after ``since``; Gone when some of them have been evicted."""
        return [change.event() for change in self._changes_since(since)]

    def _changes_since(self, since: int) -> list[Change]:
        if since < self._evicted_rv:
            raise errors.Gone(f"too old resource version: {since} ({self._evicted_rv + 1})")
        out: list[Change] = []
        for change in reversed(self._history):
            if change.rv <= since:
                break
            out.append(change)
        out.reverse()
        return out

    def unwatch(self, watcher: Watcher) -> None:
        """Forget a watcher (its reader finished)."""
        watcher.close()
        for key in watcher.keys or ():
            self._watchers.get(key, set()).discard(watcher)
        self._subscribers.discard(watcher)

    def subscribe(self, keys: Iterable[StorageKey] | None = None) -> Watcher:
        """An unbounded change stream for in-process controllers (all kinds when ``keys`` is None)."""
        watcher = Watcher(keys=frozenset(keys) if keys is not None else None)
        self._subscribers.add(watcher)
        return watcher

    def watchers(self) -> list[Watcher]:
        """Every open client watch (not controller subscriptions)."""
        return [w for ws in self._watchers.values() for w in ws]

    def close_watchers(self, key: StorageKey | None = None, *, reason: str = "") -> int:
        """End every client watch (of one kind, or all); returns how many were closed."""
        count = 0
        for watch_key, watchers in list(self._watchers.items()):
            if key is not None and watch_key != key:
                continue
            for watcher in list(watchers):
                watcher.close(reason)
                count += 1
            watchers.clear()
        return count

    def _emit(self, event: Event) -> None:
        change = Change(event)
        self._history.append(change)
        self._history_bytes += len(change.raw)
        while self._history and (
            len(self._history) > self.watch_window or self._history_bytes > self.watch_window_bytes
        ):
            evicted = self._history.popleft()
            self._history_bytes -= len(evicted.raw)
            self._evicted_rv = evicted.rv
        for watcher in list(self._watchers.get(event.key, ())):
            watcher.offer(event)
            if watcher.closed:
                self._watchers[event.key].discard(watcher)
        for sub in self._subscribers:
            if sub.keys is None or event.key in sub.keys:
                sub.push(event)
        if self.on_write is not None:
            self.on_write()

    def initial_events(self, keys: Iterable[StorageKey] | None = None) -> list[Event]:
        """Every stored object (of ``keys``, or all) as an ADDED event.

        What a controller starts from, as a real one lists before it watches: after a restore,
        the objects it would otherwise only see when they next change.
        """
        wanted = list(self._objects) if keys is None else list(keys)
        return [
            Event(
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

    # ----- persistence ---------------------------------------------------------------------------

    def export(self) -> State:
        """The whole store as one consistent :class:`State` (cheap: it references serializations)."""
        objects = {
            key: [entry.raw for bucket in buckets.values() for entry in bucket.values()]
            for key, buckets in self._objects.items()
            if buckets
        }
        return State(resource_version=self._rv, service_ips=self._service_ips, objects=objects)

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
        if any(self._watchers.values()) or self._subscribers:
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
        self._history.clear()
        self._history_bytes = 0
        for key, namespace, name, obj in checked:
            ref: ObjectRef = (key, namespace, name)
            self._bucket(key, namespace)[name] = Entry(obj)
            self._index(obj, ref, add=True)
            self._uids[obj["metadata"]["uid"]] = ref
            if key == CRD_KEY:
                # Terminating CRDs too: they still serve until their finalizers are gone.
                self.registry.add_crd(obj)
        self._rv = resource_version
        self._evicted_rv = resource_version
        self._service_ips = service_ips
        return len(checked)

    # ----- writing -------------------------------------------------------------------------------

    def _next_rv(self) -> int:
        self._rv += 1
        ceiling = self.version_ceiling
        if ceiling is not None and self._rv > ceiling and self.on_ceiling is not None:
            self.version_ceiling = self.on_ceiling(self._rv)
        return self._rv

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

    def _store(self, rt: resources.ResourceType, obj: JsonDict, old: JsonDict | None, kind: str) -> JsonDict:
        meta = obj["metadata"]
        namespace = meta.get("namespace", "")
        ref: ObjectRef = (rt.storage_key, namespace, meta["name"])
        if old is not None:
            self._index(old, ref, add=False)
        entry = Entry(obj)
        bucket = self._bucket(rt.storage_key, namespace)
        previous = bucket.get(meta["name"])
        old_raw = None
        if old is not None:
            old_raw = previous.raw if previous is not None and previous.obj is old else dumps(old)
        if rt.storage_key == EVENT_KEY:
            # Re-inserted at the end: the bucket's order is least recently written first.
            bucket.pop(meta["name"], None)
        bucket[meta["name"]] = entry
        self._index(obj, ref, add=True)
        self._uids[meta["uid"]] = ref
        self._emit(
            Event(
                type=kind, key=rt.storage_key, rv=self._rv, obj=obj, raw=entry.raw, old=old, old_raw=old_raw
            )
        )
        if rt.storage_key == CRD_KEY:
            self._crd_changed(obj)
        if rt.storage_key == EVENT_KEY and old is None:
            self._expire_events(rt, bucket)
        return obj

    def _expire_events(self, rt: resources.ResourceType, bucket: dict[str, Entry]) -> None:
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
            Event(type="DELETED", key=rt.storage_key, rv=self._rv, obj=final, raw=dumps(final), old=None)
        )
        if rt.storage_key == CRD_KEY:
            self._crd_removed(final)
        return final

    def allocate_cluster_ip(self) -> str:
        """The next free ClusterIP in 10.96.0.0/12, as the service IP allocator would hand out."""
        self._service_ips += 1
        n = self._service_ips
        return f"10.96.{n // 254}.{n % 254 + 1}"

    def create(
        self,
        rt: resources.ResourceType,
        obj: JsonDict,
        *,
        manager: str,
        dry_run: bool = False,
        managed_fields: list[JsonDict] | None = None,
    ) -> JsonDict:
        """Create an object (the caller hands over ``obj``); returns what was stored."""
        meta = obj.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise errors.BadRequest("metadata must be an object")
        obj["apiVersion"] = rt.api_version
        obj["kind"] = rt.kind
        if not meta.get("name") and meta.get("generateName"):
            suffix = "".join(secrets.choice(_GENERATE_ALPHABET) for _ in range(5))
            meta["name"] = f"{meta['generateName']}{suffix}"
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
        meta["creationTimestamp"] = now()
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
        if dry_run:
            meta["resourceVersion"] = str(self._rv)
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
            new = thaw(old)
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
                old, new, manager=manager, api_version=rt.api_version, subresource=subresource, now=now()
            )
        if managed_fields:
            new_meta["managedFields"] = managed_fields
        else:
            new_meta.pop("managedFields", None)
        if rt.has_generation and _spec_of(new, rt) != _spec_of(old, rt):
            new_meta["generation"] = int(old_meta.get("generation", 1)) + 1
        new_meta["resourceVersion"] = old_meta["resourceVersion"]
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
            marked = thaw(old)
            marked["metadata"].update(
                deletionTimestamp=now(),
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
            changed = thaw(dep)
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
        marked = thaw(old)
        marked["metadata"].update(deletionTimestamp=now(), resourceVersion=str(self._next_rv()))
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
        changed = thaw(obj)
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

"""One change and one watch: the event as watchers see it, as the history keeps it, and the watcher.

An :class:`Event` is built once per write and shared by every watcher that receives it (its wire
line is serialized once); a :class:`Change` is the same event reduced to serializations for the
watch window; a :class:`Watcher` is one client watch or controller subscription with its filter
and bounded queue. They are apart from the object store because they know nothing of how objects
are stored: the store hands them events, the HTTP layer reads batches from them.
"""

from __future__ import annotations

import asyncio
import collections
import json

from kube_sandbox import resources, selectors
from kube_sandbox.store import values

JsonDict = values.JsonDict
StorageKey = resources.StorageKey


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
            self.raw = values.dumps(self.obj)
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
                old = values.thaw(event.old)
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

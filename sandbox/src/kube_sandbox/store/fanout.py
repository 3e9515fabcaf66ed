"""Who receives a change: client watches by kind, and the in-process controllers' subscriptions.

Client watches are filtered and bounded (a slow one is cut off, see
:meth:`kube_sandbox.store.changes.Watcher.push`); controller subscriptions see every change of
their kinds unfiltered. Keeping the registrations here, apart from the object store, leaves the
store with one call per write (:meth:`Fanout.publish`) and lets the sandbox close watches (a fault,
a removed CRD, shutdown) without touching objects.
"""

from __future__ import annotations

from collections.abc import Iterable

from kube_sandbox import resources
from kube_sandbox.store import changes

StorageKey = resources.StorageKey


class Fanout:
    """The open watches and subscriptions, and the delivery of each change to them."""

    def __init__(self) -> None:
        self.watchers: dict[StorageKey, set[changes.Watcher]] = {}
        """Client watches by the storage key they follow."""
        self.subscribers: set[changes.Watcher] = set()
        """Controller subscriptions (one kind, several or all)."""

    @property
    def busy(self) -> bool:
        """Whether anything watches or subscribes."""
        return any(self.watchers.values()) or bool(self.subscribers)

    def add(self, key: StorageKey, watcher: changes.Watcher) -> None:
        """Register a client watch of one kind."""
        self.watchers.setdefault(key, set()).add(watcher)

    def subscribe(self, keys: Iterable[StorageKey] | None = None) -> changes.Watcher:
        """An unbounded change stream for in-process controllers (all kinds when ``keys`` is None)."""
        watcher = changes.Watcher(keys=frozenset(keys) if keys is not None else None)
        self.subscribers.add(watcher)
        return watcher

    def unwatch(self, watcher: changes.Watcher) -> None:
        """Forget a watcher (its reader finished)."""
        watcher.close()
        for key in watcher.keys or ():
            self.watchers.get(key, set()).discard(watcher)
        self.subscribers.discard(watcher)

    def clients(self) -> list[changes.Watcher]:
        """Every open client watch (not controller subscriptions)."""
        return [w for ws in self.watchers.values() for w in ws]

    def close(self, key: StorageKey | None = None, *, reason: str = "") -> int:
        """End every client watch (of one kind, or all); returns how many were closed."""
        count = 0
        for watch_key, watchers in list(self.watchers.items()):
            if key is not None and watch_key != key:
                continue
            for watcher in list(watchers):
                watcher.close(reason)
                count += 1
            watchers.clear()
        return count

    def publish(self, event: changes.Event) -> None:
        """Offer a change to the watches of its kind (dropping those it closes) and to subscribers."""
        for watcher in list(self.watchers.get(event.key, ())):
            watcher.offer(event)
            if watcher.closed:
                self.watchers[event.key].discard(watcher)
        for sub in self.subscribers:
            if sub.keys is None or event.key in sub.keys:
                sub.push(event)

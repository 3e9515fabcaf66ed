"""Informer-style caches of the objects the broker manages: list, then watch, forever.

Per kind, like client-go's reflector: list by the broker's label selector, replace the cache
(objects that vanished while disconnected are reported as deleted then), watch from the list's
resourceVersion with bookmarks, re-watch from the last seen version when a watch ends, relist on
``410 Gone``, and back off with jitter when the API cannot be reached. ``synced`` is set after the
first complete list, and cleared while the cache cannot be trusted (the API is unreachable).

Changes are reported to ``on_change(kind, event_type, obj)``; the loop itself holds no policy.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Iterator

from broker import errors
from broker.kube import client as kube_client

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (namespace, name)
OnChange = Callable[[str, str, kube_client.JsonDict], None]


def key_of(obj: kube_client.JsonDict) -> Key:
    """An object's cache key."""
    meta = obj.get("metadata") or {}
    return str(meta.get("namespace", "")), str(meta.get("name", ""))


class Backoff:
    """Exponential backoff with full jitter, reset after a success."""

    def __init__(self, *, initial: float = 0.2, maximum: float = 10.0) -> None:
        self.initial = initial
        self.maximum = maximum
        self._attempt = 0

    def reset(self) -> None:
        """Start over after a success."""
        self._attempt = 0

    def next_delay(self) -> float:
        """The delay before the next attempt: random in [0, min(max, initial * 2^n)]."""
        ceiling = min(self.maximum, self.initial * (2**self._attempt))
        self._attempt += 1
        return random.uniform(ceiling / 2, ceiling)  # noqa: S311 - jitter, not cryptography


class Informer:
    """The cache of one kind, kept current by list and watch."""

    def __init__(
        self,
        client: kube_client.Client,
        kind: str,
        *,
        label_selector: str,
        on_change: OnChange,
        watch_timeout: int = 300,
        backoff: Backoff | None = None,
        index_label: str = "",
        on_sync: Callable[[str, bool], None] = lambda kind, synced: None,
        project: Callable[[kube_client.JsonDict], kube_client.JsonDict] = lambda obj: obj,
    ) -> None:
        self.kind = kind
        # What of each object is kept: the cache holds only the fields its readers read.
        self._project = project
        # Told when the cache becomes trustworthy (listed) or stops being so (the watch failed).
        self._on_sync = on_sync
        self._client = client
        self._selector = label_selector
        self._on_change = on_change
        self._watch_timeout = watch_timeout
        self._backoff = backoff or Backoff()
        self._objects: dict[Key, kube_client.JsonDict] = {}
        self._index_label = index_label
        self._index: dict[str, set[Key]] = {}
        self.synced = asyncio.Event()
        self.reconnects = 0
        self.relists = 0
        self.last_error = ""

    def get(self, namespace: str, name: str) -> kube_client.JsonDict | None:
        """The cached object, or None."""
        return self._objects.get((namespace, name))

    def values(self) -> Iterator[kube_client.JsonDict]:
        """Every cached object."""
        return iter(list(self._objects.values()))

    def __len__(self) -> int:
        return len(self._objects)

    def indexed(self, value: str) -> list[kube_client.JsonDict]:
        """The cached objects whose ``index_label`` has ``value`` (e.g. all pods of a deployment)."""
        return [self._objects[k] for k in sorted(self._index.get(value, ())) if k in self._objects]

    def _label_value(self, obj: kube_client.JsonDict) -> str:
        return str(((obj.get("metadata") or {}).get("labels") or {}).get(self._index_label, ""))

    def _put(self, key: Key, obj: kube_client.JsonDict) -> None:
        self._drop(key)
        obj = self._project(obj)
        self._objects[key] = obj
        if self._index_label:
            self._index.setdefault(self._label_value(obj), set()).add(key)

    def _drop(self, key: Key) -> kube_client.JsonDict | None:
        old = self._objects.pop(key, None)
        if old is not None and self._index_label:
            self._index.get(self._label_value(old), set()).discard(key)
        return old

    async def run(self) -> None:
        """List and watch until cancelled; never returns otherwise."""
        resource_version = ""
        while True:
            try:
                if not resource_version:
                    resource_version = await self._relist()
                resource_version = await self._watch(resource_version)
                self._backoff.reset()
            except kube_client.Expired:
                log.info("watch expired; relisting", extra={"kind": self.kind})
                resource_version = ""
            except errors.NotFound:
                # The kind is not served (no Strimzi CRD, say): an empty, trustworthy cache; look again later.
                self._objects, self._index = {}, {}
                self.last_error = f"{self.kind} is not served by this cluster"
                self.synced.set()
                await asyncio.sleep(30)
            except errors.BrokerError as e:
                self.last_error = e.message
                if self.synced.is_set():
                    self.synced.clear()
                    self._on_sync(self.kind, False)
                self.reconnects += 1
                delay = self._backoff.next_delay()
                log.warning(
                    "kubernetes watch failed; retrying",
                    extra={"kind": self.kind, "error": e.message, "retry_in_s": round(delay, 2)},
                )
                await asyncio.sleep(delay)
                # After an outage, relist: the cache cannot tell what vanished while we were away.
                resource_version = ""

    async def _relist(self) -> str:
        items, resource_version = await self._client.list(self.kind, label_selector=self._selector)
        self.relists += 1
        fresh = {key_of(o): o for o in items}
        gone = [self._objects[k] for k in self._objects.keys() - fresh.keys()]
        changed = [
            o
            for k, o in fresh.items()
            if k not in self._objects
            or self._objects[k].get("metadata", {}).get("resourceVersion")
            != o.get("metadata", {}).get("resourceVersion")
        ]
        self._objects = {}
        self._index = {}
        for k, o in fresh.items():
            self._put(k, o)
        self.last_error = ""
        if not self.synced.is_set():
            self.synced.set()
            self._on_sync(self.kind, True)
        for obj in gone:
            self._on_change(self.kind, "DELETED", obj)
        for obj in changed:
            self._on_change(self.kind, "MODIFIED", obj)
        return resource_version

    async def _watch(self, resource_version: str) -> str:
        async for event_type, obj in self._client.watch(
            self.kind,
            label_selector=self._selector,
            resource_version=resource_version,
            timeout_seconds=self._watch_timeout,
        ):
            meta = obj.get("metadata") or {}
            resource_version = str(meta.get("resourceVersion") or resource_version)
            if event_type == "BOOKMARK":
                continue
            key = key_of(obj)
            if event_type == "DELETED":
                # Deleted, or no longer selected (labels changed): listeners learn of it as the
                # object they knew, so they can tell whose it was.
                old = self._drop(key)
                self._on_change(self.kind, event_type, old or obj)
                continue
            self._put(key, obj)
            self._on_change(self.kind, event_type, obj)
        return resource_version

"""What the simulated controllers share: the subscription loop, Event recording, hashes, quantities.

:class:`Runner` is the controller loop (subscribe, start from the current state as ADDED, then
follow changes); :func:`record_event` writes and aggregates Kubernetes Events for every controller;
the hash helpers give the stable names Kubernetes derives (revision hashes, topic ids, image
digests) and :func:`parse_quantity` reads resource quantities. They are kept apart so that each
controller module holds that controller alone.

Events are recorded as client-go's ``EventCorrelator`` records them: a repeat of the same event
(same source, object, type, reason and message) increments ``count`` and ``lastTimestamp`` of one
Event object instead of adding another, so a StatefulSet scaled up and down all day has a handful
of Events, not one per pod.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
from typing import Any

from kube_sandbox import errors, resources, store

JsonDict = dict[str, Any]
PodKey = tuple[str, str]

log = logging.getLogger(__name__)

PODS: resources.StorageKey = ("", "pods")
EVENTS: resources.StorageKey = ("", "events")
_HASH_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"


def digest(text: str) -> str:
    """The SHA-256 of ``text`` in hex: the stable digest behind image IDs, container IDs and names."""
    return hashlib.sha256(text.encode()).hexdigest()


def status_write(obj: JsonDict, status: JsonDict) -> JsonDict:
    """The body of a status subresource write of a stored object: its identity and the new status.

    The store takes nothing else of a status write, so the object is not copied whole for it.
    """
    meta = obj["metadata"]
    identity = {k: meta[k] for k in ("name", "namespace", "uid", "resourceVersion") if k in meta}
    return {
        "apiVersion": obj.get("apiVersion"),
        "kind": obj.get("kind"),
        "metadata": identity,
        "status": status,
    }


def safe_hash(text: str, length: int = 10) -> str:
    """A short hash of ``text`` in the alphabet Kubernetes uses for generated suffixes."""
    value = int(digest(text), 16)
    out = []
    for _ in range(length):
        value, index = divmod(value, len(_HASH_ALPHABET))
        out.append(_HASH_ALPHABET[index])
    return "".join(out)


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
    name = f"{meta['name']}.{digest(identity)[:16]}"
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

"""The store's contract with persistence: the resourceVersion counter and the :class:`State` export.

Every write takes the next version from one cluster-wide counter, as etcd's revision. Persistence
reserves versions ahead on disk (the *ceiling*) so that a crash never hands out a version twice:
the counter calls ``on_ceiling`` before it would pass the reserved one. A restart resumes the
counter and the objects from a :class:`State`. Both live here, apart from the object store, because
they are what :mod:`kube_sandbox.persistence` relies on and nothing else does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from kube_sandbox import resources


class Versions:
    """The cluster-wide resourceVersion counter with its persistence ceiling."""

    def __init__(self) -> None:
        self.current = 0
        """The newest resourceVersion handed out."""
        self.ceiling: int | None = None
        """No resourceVersion above this is handed out before ``on_ceiling`` has moved it."""
        self.on_ceiling: Callable[[int], int] | None = None
        """Called with the version about to exceed ``ceiling``; returns the new ceiling."""

    def next(self) -> int:
        """Hand out the next resourceVersion, first moving the ceiling when it would pass it."""
        self.current += 1
        ceiling = self.ceiling
        if ceiling is not None and self.current > ceiling and self.on_ceiling is not None:
            self.ceiling = self.on_ceiling(self.current)
        return self.current


@dataclasses.dataclass(frozen=True)
class State:
    """What a restart needs: the counters and every stored object's serialization, by storage key.

    Taken in one synchronous step (:meth:`Store.export`), so it is one consistent version of the
    whole store; the byte strings are the store's own immutable serializations, safe to write out
    from another thread.
    """

    resource_version: int
    service_ips: int
    objects: dict[resources.StorageKey, list[bytes]]

    @property
    def count(self) -> int:
        """How many objects."""
        return sum(len(items) for items in self.objects.values())

"""The watch window: the ring buffer of recent changes a watch or a continue token can resume from.

Like etcd's compaction, it forgets the oldest changes once it holds more than ``window`` of them or
more than ``window_bytes`` of their serializations, and remembers the version of the last one it
forgot: anything older gets ``410 Gone``. It is its own module because its bounds and its
``Gone`` rule are the whole of the resume contract, independent of how objects are stored.
"""

from __future__ import annotations

import collections

from kube_sandbox import errors
from kube_sandbox.store import changes


class History:
    """The retained changes, oldest first, bounded by count and by bytes."""

    def __init__(self, *, window: int, window_bytes: int) -> None:
        self.window = window
        self.window_bytes = window_bytes
        self._changes: collections.deque[changes.Change] = collections.deque()
        self._bytes = 0
        self.evicted_rv = 0
        """The version of the newest change forgotten: resuming from below it is ``Gone``."""

    @property
    def size(self) -> tuple[int, int]:
        """How many changes the window holds, and the bytes of their serializations."""
        return len(self._changes), self._bytes

    def record(self, change: changes.Change) -> None:
        """Keep a change, forgetting the oldest ones beyond the bounds."""
        self._changes.append(change)
        self._bytes += len(change.raw)
        while self._changes and (len(self._changes) > self.window or self._bytes > self.window_bytes):
            evicted = self._changes.popleft()
            self._bytes -= len(evicted.raw)
            self.evicted_rv = evicted.rv

    def since(self, since: int) -> list[changes.Change]:
        """Every retained change after ``since``; Gone when some of them have been evicted."""
        if since < self.evicted_rv:
            raise errors.Gone(f"too old resource version: {since} ({self.evicted_rv + 1})")
        out: list[changes.Change] = []
        for change in reversed(self._changes):
            if change.rv <= since:
                break
            out.append(change)
        out.reverse()
        return out

    def reset(self, resource_version: int) -> None:
        """Start empty at ``resource_version`` (a restore): everything older is ``Gone``."""
        self._changes.clear()
        self._bytes = 0
        self.evicted_rv = resource_version

"""What the store holds: immutable JSON objects, each kept next to its serialization.

Every other part of the store (the watch window, the fan-out, the persistence export) and the HTTP
layer share these few definitions: the wire format (:func:`dumps`), the copy-before-change rule
for stored objects (:func:`thaw`), the metadata timestamp (:func:`now`) and :class:`Entry`. They
are kept apart so that the watch and persistence modules need not import the object store itself.
"""

from __future__ import annotations

import datetime
import json
from typing import Any

JsonDict = dict[str, Any]


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

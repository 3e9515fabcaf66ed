"""What the store holds: immutable JSON objects, each kept next to its serialization.

Every other part of the store (the watch window, the fan-out, the persistence export) and the HTTP
layer share these few definitions: the wire format (:func:`dumps`), the copy-before-change rule
for stored objects (:func:`thaw`), the metadata timestamp (:func:`now`) and :class:`Entry`. They
are kept apart so that the watch and persistence modules need not import the object store itself.
"""

from __future__ import annotations

import datetime
from typing import Any

import msgspec

JsonDict = dict[str, Any]


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode


def dumps(obj: Any) -> bytes:
    """Compact JSON (UTF-8), the wire format of every response."""
    return _encode(obj)


def thaw(obj: JsonDict) -> JsonDict:
    """A private deep copy of a stored object that the caller may change."""
    return dict(_decode(_encode(obj)))


def now() -> str:
    """The current time in the RFC 3339 form (seconds, UTC) Kubernetes uses in metadata."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Entry:
    """A stored object with its serialization."""

    __slots__ = ("obj", "raw")

    def __init__(self, obj: JsonDict) -> None:
        self.obj = obj
        self.raw = dumps(obj)

"""Responses kept in wire form: each resource's encoded ResourceState, rebuilt only when it changes.

Every manager polls GetResourceState, and almost every resource it reads is the same as last time.
The service hands out the same ``ResourceView`` object while a deployment and its verdict are
unchanged, so an encoding is kept per deployment and reused while its view is the same object
(identity, never equality: comparing two views would cost what encoding them does). A page is then
a concatenation: the protobuf of a ``GetResourceStateResponse`` is its ``resources`` fields (each
one tag, a length and the kept bytes) followed by the small rest of the message; its seed JSON
is the kept JSON of each resource spliced into the rendering of the rest.
"""

from __future__ import annotations

import collections
import json
import weakref

from broker_client.v1 import broker_pb2 as pb

from broker import service
from broker.api import convert, seed_json
from broker.domain import model

# Field 1 (``resources``), wire type 2 (length-delimited).
_RESOURCES_TAG = b"\x0a"


class Encoded:
    """A page of resources already encoded: protobuf bytes for gRPC, the seed's JSON on demand."""

    __slots__ = ("_json", "_parts", "_rest", "proto")

    def __init__(self, parts: list[_Part], rest: pb.GetResourceStateResponse) -> None:
        self._parts = parts
        self._rest = rest
        self.proto = b"".join(p.framed for p in parts) + rest.SerializeToString()
        self._json: bytes | None = None

    def json(self) -> bytes:
        """The response as the gateway answers it (the same document ``seed_json.render`` makes)."""
        if self._json is None:
            outer = seed_json.render(self._rest)
            del outer["resources"]
            resources = b", ".join(p.json() for p in self._parts)
            self._json = b'{"resources": [' + resources + b"], " + json.dumps(outer)[1:].encode()
        return self._json


class _Part:
    """One resource's encodings, valid while ``view`` is the service's current view of it."""

    __slots__ = ("_json", "framed", "message", "view")

    def __init__(self, view: service.ResourceView) -> None:
        self.view = view
        self.message = convert.resource_state_to_proto(view)
        body = self.message.SerializeToString()
        self.framed = _RESOURCES_TAG + _varint(len(body)) + body
        self._json: bytes | None = None

    def json(self) -> bytes:
        # Only the gateway needs JSON: made on its first request, then kept like the protobuf.
        if self._json is None:
            self._json = json.dumps(seed_json.render(self.message)).encode()
        return self._json


class Encodings:
    """The kept encodings of one service's resources, by deployment id, and of its recent pages.

    The service hands out the same page object while nothing on it changed, so a page's encoding
    is kept by the page's identity too, within a budget of bytes. Each page counts as four times
    its protobuf: the JSON, made when the gateway asks for it and then kept, is about three times it.
    """

    def __init__(self, page_bytes: int = 16 << 20) -> None:
        self._parts: dict[str, _Part] = {}
        self._page_bytes = page_bytes
        self._kept_bytes = 0
        self._pages: collections.OrderedDict[int, tuple[model.Page[service.ResourceView], Encoded]] = (
            collections.OrderedDict()
        )

    def __len__(self) -> int:
        return len(self._parts)

    def _part(self, view: service.ResourceView) -> _Part:
        deployment_id = view.deployment.deployment_id
        part = self._parts.get(deployment_id)
        if part is None or part.view is not view:
            part = _Part(view)
            if view.deployment.phase is model.Phase.DELETED:
                self._parts.pop(deployment_id, None)
            else:
                self._parts[deployment_id] = part
        return part

    def page(self, namespace: str, page: model.Page[service.ResourceView], *, keep: bool = False) -> Encoded:
        """The GetResourceStateResponse of a page, made of the kept parts; kept whole if ``keep``."""
        kept = self._pages.get(id(page))
        if kept is not None and kept[0] is page and kept[1]._rest.namespace == namespace:
            self._pages.move_to_end(id(page))
            return kept[1]
        rest = pb.GetResourceStateResponse(
            total=page.total, namespace=namespace, next_page_token=page.next_token
        )
        made = Encoded([self._part(v) for v in page.items], rest)
        if not keep:
            return made
        replaced = self._pages.pop(id(page), None)
        if replaced is not None:
            self._kept_bytes -= _weight(replaced[1])
        self._pages[id(page)] = (page, made)
        self._kept_bytes += _weight(made)
        while self._kept_bytes > self._page_bytes and self._pages:
            _, (_, evicted) = self._pages.popitem(last=False)
            self._kept_bytes -= _weight(evicted)
        return made


def _weight(page: Encoded) -> int:
    return 4 * len(page.proto)


def _varint(value: int) -> bytes:
    """A length as protobuf writes it: seven bits a byte, low bits first."""
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_BY_SERVICE: weakref.WeakKeyDictionary[service.BrokerService, Encodings] = weakref.WeakKeyDictionary()


def of(svc: service.BrokerService) -> Encodings:
    """The encodings kept for a service (one per broker; they go when it goes)."""
    kept = _BY_SERVICE.get(svc)
    if kept is None:
        kept = _BY_SERVICE[svc] = Encodings()
    return kept

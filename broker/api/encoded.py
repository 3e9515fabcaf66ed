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

    __slots__ = ("_parts", "_rest", "proto")

    def __init__(self, parts: list[_Part], rest: pb.GetResourceStateResponse) -> None:
        self._parts = parts
        self._rest = rest
        self.proto = b"".join(p.framed for p in parts) + rest.SerializeToString()

    def json(self) -> bytes:
        """The response as the gateway answers it (the same document ``seed_json.render`` makes)."""
        outer = seed_json.render(self._rest)
        del outer["resources"]
        resources = b", ".join(p.json() for p in self._parts)
        return b'{"resources": [' + resources + b"], " + json.dumps(outer)[1:].encode()


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
    """The kept encodings of one service's resources, by deployment id."""

    def __init__(self) -> None:
        self._parts: dict[str, _Part] = {}

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

    def page(self, namespace: str, page: model.Page[service.ResourceView]) -> Encoded:
        """The GetResourceStateResponse of a page, from the kept parts."""
        rest = pb.GetResourceStateResponse(
            total=page.total, namespace=namespace, next_page_token=page.next_token
        )
        return Encoded([self._part(v) for v in page.items], rest)


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

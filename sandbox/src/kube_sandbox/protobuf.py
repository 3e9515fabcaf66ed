"""Just enough of Kubernetes' protobuf encoding to accept what kubectl's generators send.

``kubectl create namespace|configmap|secret generic`` use typed clients, which send request bodies
as ``application/vnd.kubernetes.protobuf`` (the ``k8s\\x00`` envelope around a ``runtime.Unknown``
holding the typed message). The sandbox decodes those three kinds into their JSON form; any other
protobuf body is refused with 415, as the sandbox otherwise speaks JSON and YAML only. Responses
are always JSON, which every client accepts.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from typing import Any

from kube_sandbox import errors

JsonDict = dict[str, Any]
MAGIC = b"k8s\x00"
Field = tuple[int, int, Any]
"""(field number, wire type, value: int for varints, bytes for length-delimited)."""


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= len(data):
            raise errors.BadRequest("truncated protobuf varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def fields(data: bytes) -> Iterator[Field]:
    """The fields of one protobuf message, in wire order."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
            yield number, wire, value
        elif wire == 2:
            length, pos = _varint(data, pos)
            yield number, wire, data[pos : pos + length]
            pos += length
        elif wire == 1:
            yield number, wire, data[pos : pos + 8]
            pos += 8
        elif wire == 5:
            yield number, wire, data[pos : pos + 4]
            pos += 4
        else:
            raise errors.BadRequest(f"unsupported protobuf wire type {wire}")


def _text(value: Any) -> str:
    return bytes(value).decode()


def _map_entry(value: bytes) -> tuple[str, bytes]:
    key, item = "", b""
    for number, _, raw in fields(value):
        if number == 1:
            key = _text(raw)
        elif number == 2:
            item = bytes(raw)
    return key, item


def _object_meta(data: bytes) -> JsonDict:
    meta: JsonDict = {}
    names = {1: "name", 2: "generateName", 3: "namespace", 6: "resourceVersion"}
    for number, _, value in fields(data):
        if number in names and value:
            meta[names[number]] = _text(value)
        elif number in (11, 12):
            key, item = _map_entry(value)
            meta.setdefault("labels" if number == 11 else "annotations", {})[key] = item.decode()
        elif number == 14:
            meta.setdefault("finalizers", []).append(_text(value))
    return meta


def _namespace(data: bytes) -> JsonDict:
    obj: JsonDict = {"apiVersion": "v1", "kind": "Namespace", "metadata": {}}
    for number, _, value in fields(data):
        if number == 1:
            obj["metadata"] = _object_meta(value)
        elif number == 2:
            finalizers = [_text(v) for n, _, v in fields(value) if n == 1]
            if finalizers:
                obj["spec"] = {"finalizers": finalizers}
    return obj


def _config_map(data: bytes) -> JsonDict:
    obj: JsonDict = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {}}
    for number, _, value in fields(data):
        if number == 1:
            obj["metadata"] = _object_meta(value)
        elif number == 2:
            key, item = _map_entry(value)
            obj.setdefault("data", {})[key] = item.decode()
        elif number == 3:
            key, item = _map_entry(value)
            obj.setdefault("binaryData", {})[key] = base64.b64encode(item).decode()
        elif number == 4:
            obj["immutable"] = bool(value)
    return obj


def _secret(data: bytes) -> JsonDict:
    obj: JsonDict = {"apiVersion": "v1", "kind": "Secret", "metadata": {}}
    for number, _, value in fields(data):
        if number == 1:
            obj["metadata"] = _object_meta(value)
        elif number == 2:
            key, item = _map_entry(value)
            obj.setdefault("data", {})[key] = base64.b64encode(item).decode()
        elif number == 3 and value:
            obj["type"] = _text(value)
        elif number == 4:
            key, item = _map_entry(value)
            obj.setdefault("stringData", {})[key] = item.decode()
        elif number == 5:
            obj["immutable"] = bool(value)
    return obj


DECODERS: dict[tuple[str, str], Callable[[bytes], JsonDict]] = {
    ("v1", "Namespace"): _namespace,
    ("v1", "ConfigMap"): _config_map,
    ("v1", "Secret"): _secret,
}


def decode(body: bytes) -> JsonDict:
    """Decode a protobuf request body of a supported kind into its JSON form (415 otherwise)."""
    if not body.startswith(MAGIC):
        raise errors.BadRequest("a protobuf body must start with the k8s envelope")
    api_version = kind = ""
    raw = b""
    for number, _, value in fields(body[len(MAGIC) :]):
        if number == 1:
            for sub, _, text in fields(value):
                if sub == 1:
                    api_version = _text(text)
                elif sub == 2:
                    kind = _text(text)
        elif number == 2:
            raw = bytes(value)
    decoder = DECODERS.get((api_version, kind))
    if decoder is None:
        raise errors.UnsupportedMediaType(
            f"the sandbox cannot decode protobuf for {kind or 'this kind'}; accepted media types include: "
            "application/json, application/yaml"
        )
    return decoder(raw)

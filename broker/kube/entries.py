"""What the caches keep of each managed object: one small immutable record, made at ingest.

With tens of thousands of managed objects the caches are most of the broker's memory. Kept as
JSON, an object is dozens of dicts and strings, most of which the broker never reads, and every
one of them is tracked by the garbage collector, so each full collection walks them all. Each kind
is therefore reduced, as it arrives (a page of a list, a watch event, a write's answer), to a
record of just what ``observe`` reads, already parsed: strings, numbers, times and flat string
dicts. The records are msgspec structs without a garbage-collector header (``gc=False``): they
hold nothing that could make a cycle, so full collections never walk them.

The deployment id (the owner), the namespace and the most repeated values are interned: five
objects of a deployment share one copy, and thousands of pods one ``"Running"``.
"""

from __future__ import annotations

import datetime
import decimal
import json
import sys
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import msgspec

from broker.domain import naming, quantity
from broker.kube import client as kube_client
from broker.kube import manifests

JsonDict = kube_client.JsonDict
Pairs = tuple[tuple[str, str], ...]  # a small read-only mapping, as a tuple (() costs nothing)


class Entry(Protocol):
    """What every cached record has."""

    @property
    def namespace(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def resource_version(self) -> str: ...
    @property
    def owner(self) -> str: ...


class Named(msgspec.Struct, frozen=True, gc=False):
    """An object whose presence is all that is read (a Service, say)."""

    namespace: str
    name: str
    resource_version: str
    owner: str


class Pod(msgspec.Struct, frozen=True, gc=False):
    namespace: str
    name: str
    resource_version: str
    owner: str
    deleting: bool
    phase: str
    ready: bool
    restart_count: int
    waiting_reason: str
    image: str  # the spec's: the one the kubelet ran (the status may spell it another way)
    last_restart: datetime.datetime | None


class Claim(msgspec.Struct, frozen=True, gc=False):
    namespace: str
    name: str
    resource_version: str
    owner: str
    capacity: decimal.Decimal | None


class Secret(msgspec.Struct, frozen=True, gc=False):
    """A Secret without its data: whether the data still matches the checksum the broker recorded."""

    namespace: str
    name: str
    resource_version: str
    owner: str
    changed: bool
    changed_by: str


class Workload(msgspec.Struct, frozen=True, gc=False):
    """A StatefulSet: its first container and what else the drift rules compare."""

    namespace: str
    name: str
    resource_version: str
    owner: str
    labels: dict[str, str]
    replicas: int
    image: str
    cpu_request: str
    cpu_limit: str
    memory_request: str
    memory_limit: str
    storage: str
    env: dict[str, str]  # rendered (``env``), so that two equal settings compare equal
    field_managers: Pairs
    unreadable: Pairs


class Topic(msgspec.Struct, frozen=True, gc=False):
    namespace: str
    name: str
    resource_version: str
    owner: str
    labels: dict[str, str]
    partitions: int
    replicas: int
    retention_ms: int
    ready: bool | None
    field_managers: Pairs
    unreadable: Pairs


# Which part of an object's managedFields (fieldsV1) attributes a compared field: the subtree to
# look in, and the key that must appear inside it. Scoped so that, say, the controller's
# status.replicas never counts as a change of spec.replicas.
_CONTAINER = ("f:spec", "f:template", "f:spec", "f:containers")
STS_FIELDS: dict[str, tuple[tuple[str, ...], str]] = {
    "replicas": (("f:spec",), '"f:replicas"'),
    "image": (_CONTAINER, '"f:image"'),
    "resources": (_CONTAINER, '"f:resources"'),
    "env": (_CONTAINER, '"f:env"'),
    "storage": (("f:spec",), '"f:volumeClaimTemplates"'),
    "labels": (("f:metadata",), '"f:labels"'),
}
TOPIC_FIELDS: dict[str, tuple[tuple[str, ...], str]] = {
    "partitions": (("f:spec",), '"f:partitions"'),
    "retention_ms": (("f:spec",), '"f:retention.ms"'),
    "replicas": (("f:spec",), '"f:replicas"'),
    "labels": (("f:metadata",), '"f:labels"'),
}
SECRET_FIELDS: dict[str, tuple[tuple[str, ...], str]] = {
    "data": ((), '"f:data"'),
}


def field_managers(obj: JsonDict, fields: Mapping[str, tuple[tuple[str, ...], str]]) -> dict[str, str]:
    """For each compared field, the latest manager other than the broker that set it.

    Entries of the status subresource are skipped: they record controllers reporting, not changes
    of what was asked for.
    """
    entries = sorted(
        (
            e
            for e in (obj.get("metadata") or {}).get("managedFields") or []
            if e.get("manager") != kube_client.FIELD_MANAGER and e.get("subresource") != "status"
        ),
        key=lambda e: str(e.get("time") or ""),
    )
    found: dict[str, str] = {}
    for entry in entries:
        for field, (path, marker) in fields.items():
            subtree: Any = entry.get("fieldsV1") or {}
            for step in path:
                subtree = subtree.get(step) if isinstance(subtree, dict) else None
            if subtree and marker in json.dumps(subtree):
                found[field] = str(entry.get("manager", ""))
    return found


def env(container: JsonDict) -> dict[str, str]:
    """A container's environment, each value rendered so that two equal settings compare equal."""
    rendered = {}
    for var in container.get("env") or []:
        ref = ((var.get("valueFrom") or {}).get("secretKeyRef")) or {}
        value = f"secret {ref.get('name')}/{ref.get('key')}" if ref else str(var.get("value", ""))
        rendered[sys.intern(str(var.get("name")))] = value
    return rendered


def first_container(obj: JsonDict) -> JsonDict:
    containers = (((obj.get("spec") or {}).get("template") or {}).get("spec") or {}).get("containers") or [{}]
    return dict(containers[0])


def owner(obj: JsonDict) -> str:
    """The deployment an object belongs to: the broker's annotation, else (older objects) its label."""
    meta = obj.get("metadata") or {}
    annotations = meta.get("annotations") or {}
    labels = meta.get("labels") or {}
    return sys.intern(
        str(annotations.get(manifests.OWNER_ANNOTATION) or labels.get(naming.LABEL_DEPLOYMENT) or "")
    )


def integer(value: Any, field: str, unreadable: dict[str, str], default: int) -> int:
    """A whole number from a watched object; a value that is not one is noted, never raised.

    Objects in the cluster are anyone's to edit (a CRD without a schema takes "three" for a
    partition count): what cannot be read is an observation of its own, ``unreadable``.
    """
    if value is None:
        return default
    try:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(value)
        return int(value)
    except (TypeError, ValueError):
        unreadable[field] = repr(value)[:80]
        return default


def parse_quantity(value: Any) -> decimal.Decimal | None:
    try:
        return quantity.parse(str(value)) if value is not None else None
    except ValueError:
        return None


def _time(value: Any) -> datetime.datetime | None:
    try:
        return datetime.datetime.fromisoformat(str(value).replace("Z", "+00:00")) if value else None
    except ValueError:
        return None


def _head(obj: JsonDict) -> tuple[str, str, str, str]:
    meta = obj.get("metadata") or {}
    return (
        sys.intern(str(meta.get("namespace", ""))),
        str(meta.get("name", "")),
        str(meta.get("resourceVersion", "")),
        owner(obj),
    )


def _labels(obj: JsonDict) -> dict[str, str]:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return {sys.intern(str(k)): sys.intern(str(v)) for k, v in labels.items()}


def _pairs(mapping: Mapping[str, str]) -> Pairs:
    return tuple(sorted((sys.intern(k), sys.intern(v)) for k, v in mapping.items()))


def named(obj: JsonDict) -> Named:
    return Named(*_head(obj))


def pod(obj: JsonDict) -> Pod:
    status = obj.get("status") or {}
    spec_containers = (obj.get("spec") or {}).get("containers") or [{}]
    containers = status.get("containerStatuses") or [{}]
    first = containers[0]
    waiting = ((first.get("state") or {}).get("waiting") or {}).get("reason", "")
    finished = (((first.get("lastState") or {}).get("terminated")) or {}).get("finishedAt")
    return Pod(
        *_head(obj),
        deleting=bool((obj.get("metadata") or {}).get("deletionTimestamp")),
        phase=sys.intern(str(status.get("phase", ""))),
        ready=any(
            c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or []
        ),
        restart_count=sum(integer(c.get("restartCount"), "restartCount", {}, 0) for c in containers),
        waiting_reason=sys.intern(str(waiting)),
        image=sys.intern(str(spec_containers[0].get("image") or first.get("image", ""))),
        last_restart=_time(finished),
    )


def claim(obj: JsonDict) -> Claim:
    capacity = ((obj.get("status") or {}).get("capacity") or {}).get("storage")
    return Claim(*_head(obj), capacity=parse_quantity(capacity) if capacity is not None else None)


def secret(obj: JsonDict) -> Secret:
    recorded = ((obj.get("metadata") or {}).get("annotations") or {}).get(manifests.CHECKSUM_ANNOTATION)
    changed = recorded is not None and recorded != manifests.data_checksum(obj.get("data") or {})
    return Secret(*_head(obj), changed=changed, changed_by=field_managers(obj, SECRET_FIELDS).get("data", ""))


def workload(obj: JsonDict) -> Workload:
    spec = obj.get("spec") or {}
    container = first_container(obj)
    resources = container.get("resources") or {}
    requests, limits = resources.get("requests") or {}, resources.get("limits") or {}
    claims = spec.get("volumeClaimTemplates") or [{}]
    storage = (((claims[0].get("spec") or {}).get("resources") or {}).get("requests") or {}).get(
        "storage", ""
    )
    unreadable: dict[str, str] = {}
    return Workload(
        *_head(obj),
        labels=_labels(obj),
        replicas=integer(spec.get("replicas"), "replicas", unreadable, 1),
        image=sys.intern(str(container.get("image", ""))),
        cpu_request=sys.intern(str(requests.get("cpu", ""))),
        cpu_limit=sys.intern(str(limits.get("cpu", ""))),
        memory_request=sys.intern(str(requests.get("memory", ""))),
        memory_limit=sys.intern(str(limits.get("memory", ""))),
        storage=sys.intern(str(storage)),
        env=env(container),
        field_managers=_pairs(field_managers(obj, STS_FIELDS)),
        unreadable=_pairs(unreadable),
    )


def topic(obj: JsonDict) -> Topic:
    spec = obj.get("spec") or {}
    conditions = (obj.get("status") or {}).get("conditions") or []
    unreadable: dict[str, str] = {}
    config: JsonDict = spec["config"] if isinstance(spec.get("config"), dict) else {}
    return Topic(
        *_head(obj),
        labels=_labels(obj),
        partitions=integer(spec.get("partitions"), "partitions", unreadable, 0),
        replicas=integer(spec.get("replicas"), "replicas", unreadable, 0),
        retention_ms=integer(config.get("retention.ms"), "retention_ms", unreadable, 0),
        ready=next((c.get("status") == "True" for c in conditions if c.get("type") == "Ready"), None),
        field_managers=_pairs(field_managers(obj, TOPIC_FIELDS)),
        unreadable=_pairs(unreadable),
    )


PROJECTIONS: dict[str, Callable[[JsonDict], Entry]] = {
    "StatefulSet": workload,
    "Pod": pod,
    "Secret": secret,
    "PersistentVolumeClaim": claim,
    "KafkaTopic": topic,
}


def owner_of(record: Entry) -> str:
    """What the caches index records by: the deployment they belong to."""
    return record.owner


def project(kind: str, obj: JsonDict) -> Entry:
    """The record the caches keep of an object of ``kind``."""
    return PROJECTIONS.get(kind, named)(obj)

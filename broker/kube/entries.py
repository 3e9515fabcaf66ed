"""What the caches keep of each managed object: one small immutable record, made at ingest.

With tens of thousands of managed objects the caches are most of the broker's memory. Kept as
JSON, an object is dozens of dicts and strings, most of which the broker never reads, and every
one of them is tracked by the garbage collector, so each full collection walks them all. Each kind
is therefore decoded, as it arrives (a page of a list, a watch event, a write's answer), straight
from its JSON into a "wire" struct of only the fields the broker reads (msgspec skips the rest
without building it: no dict for a pod's volumes, no tree for another manager's fieldsV1 until it
is asked about), then reduced to a record of just what ``observe`` reads, already parsed:
strings, numbers, times and flat string dicts. The records are msgspec structs without a
garbage-collector header (``gc=False``): they hold nothing that could make a cycle, so full
collections never walk them.

The deployment id (the owner), the namespace and the most repeated values are interned: five
objects of a deployment share one copy, and thousands of pods one ``"Running"``.
"""

from __future__ import annotations

import datetime
import decimal
import json
import logging
import re
import sys
from collections.abc import Callable, Mapping
from typing import Any, Generic, Protocol, TypeVar

import msgspec

from broker.domain import naming, quantity
from broker.kube import client as kube_client
from broker.kube import manifests

log = logging.getLogger(__name__)

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


class Usage(msgspec.Struct, frozen=True, gc=False):
    """A pod's summed container usage, from the metrics API."""

    namespace: str
    name: str
    resource_version: str
    owner: str
    cpu: decimal.Decimal
    memory: decimal.Decimal


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


# Wire shapes: what is decoded of each kind. Every field has a default (an absent field, a bookmark's
# bare metadata); fields a custom resource may fill with anything are ``Any``, checked when reduced.


class _Managed(msgspec.Struct):
    manager: str = ""
    subresource: str = ""
    time: str = ""
    fieldsV1: msgspec.Raw = msgspec.field(default_factory=lambda: msgspec.Raw(b"{}"))


class _Meta(msgspec.Struct):
    name: str = ""
    namespace: str = ""
    resourceVersion: str = ""
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None
    deletionTimestamp: str | None = None
    managedFields: list[_Managed] | None = None


class _Condition(msgspec.Struct):
    type: str = ""
    status: str = ""


class _Reason(msgspec.Struct):
    reason: str = ""
    finishedAt: str | None = None


class _State(msgspec.Struct):
    waiting: _Reason | None = None
    terminated: _Reason | None = None


class _ContainerStatus(msgspec.Struct):
    image: str = ""
    restartCount: Any = 0
    state: _State | None = None
    lastState: _State | None = None


class _KeyRef(msgspec.Struct):
    name: str = ""
    key: str = ""


class _EnvSource(msgspec.Struct):
    secretKeyRef: _KeyRef | None = None


class _EnvVar(msgspec.Struct):
    name: str = ""
    value: str | None = None
    valueFrom: _EnvSource | None = None


class _Resources(msgspec.Struct):
    requests: dict[str, str] | None = None
    limits: dict[str, str] | None = None


class _Container(msgspec.Struct):
    image: str = ""
    resources: _Resources | None = None
    env: list[_EnvVar] | None = None


class _PodSpec(msgspec.Struct):
    containers: list[_Container] | None = None


class _PodStatus(msgspec.Struct):
    phase: str = ""
    conditions: list[_Condition] | None = None
    containerStatuses: list[_ContainerStatus] | None = None


class _Template(msgspec.Struct):
    spec: _PodSpec | None = None


class _ClaimSpec(msgspec.Struct):
    resources: _Resources | None = None


class _ClaimTemplate(msgspec.Struct):
    spec: _ClaimSpec | None = None


class _StatefulSetSpec(msgspec.Struct):
    replicas: Any = None
    template: _Template | None = None
    volumeClaimTemplates: list[_ClaimTemplate] | None = None


class _ClaimStatus(msgspec.Struct):
    capacity: dict[str, str] | None = None


class _Object(msgspec.Struct):
    metadata: _Meta = msgspec.field(default_factory=_Meta)


class _PodObject(_Object):
    spec: _PodSpec | None = None
    status: _PodStatus | None = None


class _StatefulSetObject(_Object):
    spec: _StatefulSetSpec | None = None


class _SecretObject(_Object):
    data: dict[str, str] | None = None


class _ClaimObject(_Object):
    status: _ClaimStatus | None = None


class _ContainerUsage(msgspec.Struct):
    usage: dict[str, str] | None = None


class _PodMetricsObject(_Object):
    containers: list[_ContainerUsage] | None = None


class _TopicObject(_Object):
    spec: Any = None  # a custom resource: whatever was written
    status: Any = None


# Which part of an object's managedFields (fieldsV1) attributes a compared field: the subtree to
# look in, and the key that must appear inside it. Scoped so that, say, the controller's
# status.replicas never counts as a change of spec.replicas.
_CONTAINER = ("f:spec", "f:template", "f:spec", "f:containers")
_STS_FIELDS: dict[str, tuple[tuple[str, ...], str]] = {
    "replicas": (("f:spec",), '"f:replicas"'),
    "image": (_CONTAINER, '"f:image"'),
    "resources": (_CONTAINER, '"f:resources"'),
    "env": (_CONTAINER, '"f:env"'),
    "storage": (("f:spec",), '"f:volumeClaimTemplates"'),
    "labels": (("f:metadata",), '"f:labels"'),
}
_TOPIC_FIELDS: dict[str, tuple[tuple[str, ...], str]] = {
    "partitions": (("f:spec",), '"f:partitions"'),
    "retention_ms": (("f:spec",), '"f:retention.ms"'),
    "replicas": (("f:spec",), '"f:replicas"'),
    "labels": (("f:metadata",), '"f:labels"'),
}
_SECRET_FIELDS: dict[str, tuple[tuple[str, ...], str]] = {
    "data": ((), '"f:data"'),
}


def _field_managers(meta: _Meta, fields: Mapping[str, tuple[tuple[str, ...], str]]) -> Pairs:
    """For each compared field, the latest manager other than the broker that set it.

    Entries of the status subresource are skipped: they record controllers reporting, not changes
    of what was asked for. Only those entries' fieldsV1 are decoded.
    """
    entries = sorted(
        (
            e
            for e in meta.managedFields or ()
            if e.manager != kube_client.FIELD_MANAGER and e.subresource != "status"
        ),
        key=lambda e: e.time,
    )
    found: dict[str, str] = {}
    for entry in entries:
        tree: Any = msgspec.json.decode(entry.fieldsV1)
        for field, (path, marker) in fields.items():
            subtree = tree
            for step in path:
                subtree = subtree.get(step) if isinstance(subtree, dict) else None
            if subtree and marker in json.dumps(subtree):
                found[field] = entry.manager
    return _pairs(found)


def env(container: JsonDict) -> dict[str, str]:
    """A container's environment (as JSON), each value rendered so that two equal settings compare equal.

    A variable of a shape the API would not take (a live object is anyone's to edit) is rendered
    by its name alone, never raised: it then shows as a changed setting.
    """
    listed = container.get("env")
    variables = []
    for var in listed if isinstance(listed, list) else ():
        try:
            variables.append(msgspec.convert(var, _EnvVar, strict=False))
        except msgspec.ValidationError:
            name = var.get("name") if isinstance(var, dict) else None
            variables.append(_EnvVar(name=name if isinstance(name, str) else "", value="(unreadable)"))
    return _env(_Container(env=variables))


def _env(container: _Container) -> dict[str, str]:
    rendered = {}
    for var in container.env or ():
        ref = var.valueFrom.secretKeyRef if var.valueFrom is not None else None
        # Plain values are mostly the same in every deployment (paths, ports): shared.
        value = f"secret {ref.name}/{ref.key}" if ref is not None else sys.intern(var.value or "")
        rendered[sys.intern(var.name)] = value
    return rendered


def first_container(obj: JsonDict) -> JsonDict:
    """The first container of a StatefulSet as JSON (a manifest, or an object read from the API)."""
    containers = (((obj.get("spec") or {}).get("template") or {}).get("spec") or {}).get("containers") or [{}]
    return dict(containers[0])


def owner(obj: JsonDict) -> str:
    """The deployment an object (as JSON) belongs to."""
    meta = obj.get("metadata") or {}
    return _owner(_Meta(labels=meta.get("labels"), annotations=meta.get("annotations")))


def _owner(meta: _Meta) -> str:
    """The broker's annotation, else (older objects) its label."""
    owner = (meta.annotations or {}).get(manifests.OWNER_ANNOTATION) or (meta.labels or {}).get(
        naming.LABEL_DEPLOYMENT
    )
    return sys.intern(owner or "")


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


def parse_quantity(
    value: Any, parse: Callable[[str], decimal.Decimal] = quantity.parse
) -> decimal.Decimal | None:
    try:
        return parse(str(value)) if value is not None else None
    except ValueError:
        return None


def _time(value: str | None) -> datetime.datetime | None:
    try:
        return datetime.datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None
    except ValueError:
        return None


def _head(meta: _Meta) -> tuple[str, str, str, str]:
    return sys.intern(meta.namespace), meta.name, meta.resourceVersion, _owner(meta)


def _labels(meta: _Meta) -> dict[str, str]:
    return {sys.intern(k): sys.intern(v) for k, v in (meta.labels or {}).items()}


def _pairs(mapping: Mapping[str, str]) -> Pairs:
    return tuple(sorted((sys.intern(k), sys.intern(v)) for k, v in mapping.items()))


def _named(obj: _Object) -> Named:
    return Named(*_head(obj.metadata))


def _pod(obj: _PodObject) -> Pod:
    status = obj.status or _PodStatus()
    spec_containers = (obj.spec.containers if obj.spec else None) or [_Container()]
    first = (status.containerStatuses or [_ContainerStatus()])[0]
    waiting = first.state.waiting if first.state is not None else None
    terminated = first.lastState.terminated if first.lastState is not None else None
    return Pod(
        *_head(obj.metadata),
        deleting=bool(obj.metadata.deletionTimestamp),
        phase=sys.intern(status.phase),
        ready=any(c.type == "Ready" and c.status == "True" for c in status.conditions or ()),
        restart_count=sum(
            integer(c.restartCount, "restartCount", {}, 0) for c in status.containerStatuses or ()
        ),
        waiting_reason=sys.intern(waiting.reason if waiting is not None else ""),
        image=sys.intern(spec_containers[0].image or first.image),
        last_restart=_time(terminated.finishedAt if terminated is not None else None),
    )


def _claim(obj: _ClaimObject) -> Claim:
    capacity = ((obj.status.capacity if obj.status else None) or {}).get("storage")
    return Claim(*_head(obj.metadata), capacity=parse_quantity(capacity))


def _secret(obj: _SecretObject) -> Secret:
    recorded = (obj.metadata.annotations or {}).get(manifests.CHECKSUM_ANNOTATION)
    changed = recorded is not None and recorded != manifests.data_checksum(obj.data or {})
    managers = dict(_field_managers(obj.metadata, _SECRET_FIELDS))
    return Secret(*_head(obj.metadata), changed=changed, changed_by=managers.get("data", ""))


def _workload(obj: _StatefulSetObject) -> Workload:
    spec = obj.spec or _StatefulSetSpec()
    containers = (spec.template.spec.containers if spec.template and spec.template.spec else None) or []
    container = containers[0] if containers else _Container()
    resources = container.resources or _Resources()
    requests, limits = resources.requests or {}, resources.limits or {}
    claims = spec.volumeClaimTemplates or [_ClaimTemplate()]
    claim_resources = (claims[0].spec.resources if claims[0].spec else None) or _Resources()
    unreadable: dict[str, str] = {}
    return Workload(
        *_head(obj.metadata),
        labels=_labels(obj.metadata),
        replicas=integer(spec.replicas, "replicas", unreadable, 1),
        image=sys.intern(container.image),
        cpu_request=sys.intern(requests.get("cpu", "")),
        cpu_limit=sys.intern(limits.get("cpu", "")),
        memory_request=sys.intern(requests.get("memory", "")),
        memory_limit=sys.intern(limits.get("memory", "")),
        storage=sys.intern((claim_resources.requests or {}).get("storage", "")),
        env=_env(container),
        field_managers=_field_managers(obj.metadata, _STS_FIELDS),
        unreadable=_pairs(unreadable),
    )


def _topic(obj: _TopicObject) -> Topic:
    spec = obj.spec if isinstance(obj.spec, dict) else {}
    status = obj.status if isinstance(obj.status, dict) else {}
    listed = status.get("conditions")
    conditions: list[Any] = listed if isinstance(listed, list) else []
    unreadable: dict[str, str] = {}
    config: JsonDict = spec["config"] if isinstance(spec.get("config"), dict) else {}
    return Topic(
        *_head(obj.metadata),
        labels=_labels(obj.metadata),
        partitions=integer(spec.get("partitions"), "partitions", unreadable, 0),
        replicas=integer(spec.get("replicas"), "replicas", unreadable, 0),
        retention_ms=integer(config.get("retention.ms"), "retention_ms", unreadable, 0),
        ready=next(
            (
                c.get("status") == "True"
                for c in conditions
                if isinstance(c, dict) and c.get("type") == "Ready"
            ),
            None,
        ),
        field_managers=_field_managers(obj.metadata, _TOPIC_FIELDS),
        unreadable=_pairs(unreadable),
    )


T = TypeVar("T")


def _usage(obj: _PodMetricsObject) -> Usage:
    cpu = memory = decimal.Decimal(0)
    for container in obj.containers or ():
        usage = container.usage or {}
        # Usage figures differ at every poll: parsed without the cache kept for catalog quantities.
        cpu += parse_quantity(usage.get("cpu"), quantity.parse.__wrapped__) or 0
        memory += parse_quantity(usage.get("memory"), quantity.parse.__wrapped__) or 0
    return Usage(*_head(obj.metadata), cpu=cpu, memory=memory)


W = TypeVar("W", bound=_Object)
R = TypeVar("R", bound=Entry, covariant=True)


class _ListMeta(msgspec.Struct):
    resourceVersion: str = ""
    continue_: str = msgspec.field(default="", name="continue")


class Kind(Generic[W, R]):
    """How one kind is decoded, from JSON bytes or an object already parsed, into its records."""

    def __init__(self, wire: type[W], reduce: Callable[[W], R]) -> None:
        self._wire = wire
        self._reduce = reduce
        self._object = msgspec.json.Decoder(wire)
        self._page = msgspec.json.Decoder(_Page[wire])  # type: ignore[valid-type]

    def record(self, obj: JsonDict) -> R:
        """The record of an object as JSON (a write's answer, a lookup)."""
        return self.decode(msgspec.json.encode(obj))

    def decode(self, body: bytes) -> R:
        """The record of one object's JSON (a watch event's); its name is "" if none can be read."""
        return self._record(self._lenient(body))

    def page(self, body: bytes) -> kube_client.ListPage[R]:
        """A list page's records (those with a name), its resourceVersion and continue token."""
        try:
            page = self._page.decode(body)
            items, meta = page.items or [], page.metadata
        except msgspec.ValidationError:
            # One object the API server let through with an odd type (a custom resource, a fake
            # cluster): decode the items one by one, leniently, rather than fail the whole list.
            raw = msgspec.json.decode(body, type=_Page[msgspec.Raw])
            items, meta = [self._lenient(bytes(item)) for item in raw.items or ()], raw.metadata
        records = [self._record(item) for item in items]
        return kube_client.ListPage([r for r in records if r.name], meta.resourceVersion, meta.continue_)

    def _record(self, wire: W) -> R:
        try:
            return self._reduce(wire)
        except Exception as e:  # no object may stop a cache: read it as its identity
            # The error's kind only: its text could quote a value (a Secret's, say).
            log.warning(
                "an object could not be read; only its identity is", extra={"error": type(e).__name__}
            )
            return self._reduce(self._wire(metadata=wire.metadata))

    def _lenient(self, body: bytes) -> W:
        """The wire struct of an object, with each field of a type it cannot take read as absent."""
        try:
            return self._object.decode(body)
        except msgspec.ValidationError:
            pass
        try:
            obj = msgspec.json.decode(body)
        except msgspec.DecodeError:
            return self._wire()
        if not isinstance(obj, dict):
            return self._wire()
        meta: JsonDict = obj["metadata"] if isinstance(obj.get("metadata"), dict) else {}
        managed = meta.get("managedFields")
        for entry in managed if isinstance(managed, list) else ():
            if isinstance(entry, dict):  # kept undecoded, as the strict decoder would have
                entry["fieldsV1"] = msgspec.Raw(msgspec.json.encode(entry.get("fieldsV1") or {}))
        for _ in range(_MAX_ODD_FIELDS):
            try:
                return msgspec.convert(obj, self._wire, strict=False)
            except msgspec.ValidationError as e:
                # The error names the type and where, never the value: safe to log (a Secret's too).
                if not _drop_at(obj, str(e)):
                    log.warning("an object cannot be read; only its identity is", extra={"error": str(e)})
                    break
                log.warning(
                    "a field of an object has a type it cannot have; read as absent", extra={"error": str(e)}
                )
        identity = {
            k: meta[k] for k in ("name", "namespace", "resourceVersion", "labels", "annotations") if k in meta
        }
        try:
            return self._wire(metadata=msgspec.convert(identity, _Meta, strict=False))
        except msgspec.ValidationError:
            return self._wire()


_MAX_ODD_FIELDS = 20
_STEP = re.compile(r"\.(\w+)|\[(\d+)\]")


def _drop_at(obj: Any, error: str) -> bool:
    """Remove the field a msgspec error points at (``... - at `$.spec.containers[0].image```)."""
    location = error.rsplit(" - at `$", 1)
    if len(location) != 2 or not location[1].endswith("`"):
        return False
    path = location[1][:-1]
    steps = [(m.group(1), m.group(2)) for m in _STEP.finditer(path)]
    if not steps or "".join(m.group(0) for m in _STEP.finditer(path)) != path:
        return False  # a step this cannot follow (a dict key msgspec does not spell out)
    parent = obj
    for key, index in steps[:-1]:
        parent = (
            parent.get(key)
            if key is not None and isinstance(parent, dict)
            else (parent[int(index)] if index is not None and isinstance(parent, list) else None)
        )
    key, index = steps[-1]
    if key is not None and isinstance(parent, dict) and key in parent:
        del parent[key]
        return True
    if index is not None and isinstance(parent, list) and int(index) < len(parent):
        del parent[int(index)]
        return True
    return False


class _Page(msgspec.Struct, Generic[T]):
    metadata: _ListMeta = msgspec.field(default_factory=_ListMeta)
    items: list[T] | None = None


KINDS: dict[str, Kind[Any, Entry]] = {
    "StatefulSet": Kind(_StatefulSetObject, _workload),
    "Pod": Kind(_PodObject, _pod),
    "Secret": Kind(_SecretObject, _secret),
    "PersistentVolumeClaim": Kind(_ClaimObject, _claim),
    "KafkaTopic": Kind(_TopicObject, _topic),
}
_NAMED = Kind(_Object, _named)
USAGE = Kind(_PodMetricsObject, _usage)


def kind(name: str) -> Kind[Any, Entry]:
    """How objects of kind ``name`` are decoded (a Service's presence is all that is read)."""
    return KINDS.get(name, _NAMED)


def owner_of(record: Entry) -> str:
    """What the caches index records by: the deployment they belong to."""
    return record.owner


def project(kind_name: str, obj: JsonDict) -> Entry:
    """The record the caches keep of an object of ``kind_name``, given as JSON."""
    return kind(kind_name).record(obj)

"""Server-side printing: the ``meta.k8s.io/v1`` ``Table`` that ``kubectl get`` asks for.

kubectl does not format built-in kinds itself; it requests
``application/json;as=Table;v=v1;g=meta.k8s.io`` and prints the columns and cells the server
chooses. These printers follow kube-apiserver's for the kinds the sandbox serves (pods show
READY/STATUS/RESTARTS/AGE, statefulsets READY/AGE, ...); custom kinds use their CRD's
``additionalPrinterColumns``; anything else gets the default NAME/CREATED AT table.
"""

from __future__ import annotations

import datetime
import json
import re
from collections.abc import Callable
from typing import Any

from kube_sandbox import resources

JsonDict = dict[str, Any]
Column = tuple[str, str, str, int, str]
"""(name, type, format, priority, description)."""
Printer = Callable[[JsonDict, datetime.datetime], list[Any]]


def _parse_time(text: str | None) -> datetime.datetime | None:
    if not text:
        return None
    try:
        return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)
    except ValueError:
        return None


def human_duration(seconds: float) -> str:
    """Kubernetes' compact age format: ``45s``, ``3m20s``, ``5h``, ``2d3h``, ``400d``."""
    secs = int(seconds)
    if secs < -1:
        return "<invalid>"
    if secs < 0:
        return "0s"
    if secs < 120:
        return f"{secs}s"
    minutes = secs // 60
    if minutes < 10:
        rest = secs % 60
        return f"{minutes}m{rest}s" if rest else f"{minutes}m"
    if minutes < 180:
        return f"{minutes}m"
    hours = minutes // 60
    if hours < 8:
        rest = minutes % 60
        return f"{hours}h{rest}m" if rest else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        rest = hours % 24
        return f"{hours // 24}d{rest}h" if rest else f"{hours // 24}d"
    if hours < 24 * 365 * 2:
        return f"{hours // 24}d"
    years, days = divmod(hours // 24, 365)
    if hours < 24 * 365 * 8 and days:
        return f"{years}y{days}d"
    return f"{years}y"


def _age(obj: JsonDict, now: datetime.datetime) -> str:
    created = _parse_time((obj.get("metadata") or {}).get("creationTimestamp"))
    if created is None:
        return "<unknown>"
    return human_duration((now - created).total_seconds())


def _name(obj: JsonDict) -> str:
    return str((obj.get("metadata") or {}).get("name", ""))


def _pod_row(pod: JsonDict, now: datetime.datetime) -> list[Any]:
    spec = pod.get("spec") or {}
    status = pod.get("status") or {}
    statuses = status.get("containerStatuses") or []
    total = len(spec.get("containers") or [])
    ready = sum(1 for c in statuses if c.get("ready"))
    restarts = sum(int(c.get("restartCount", 0)) for c in statuses)
    reason = status.get("reason") or status.get("phase") or "Unknown"
    last_restart: datetime.datetime | None = None
    for cs in statuses:
        state = cs.get("state") or {}
        if "waiting" in state and state["waiting"].get("reason"):
            reason = state["waiting"]["reason"]
        elif "terminated" in state:
            reason = state["terminated"].get("reason") or "Completed"
        finished = _parse_time(((cs.get("lastState") or {}).get("terminated") or {}).get("finishedAt"))
        if finished is not None and (last_restart is None or finished > last_restart):
            last_restart = finished
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        reason = "Terminating"
    restart_cell = str(restarts)
    if restarts and last_restart is not None:
        restart_cell = f"{restarts} ({human_duration((now - last_restart).total_seconds())} ago)"
    return [
        _name(pod),
        f"{ready}/{total}",
        reason,
        restart_cell,
        _age(pod, now),
        status.get("podIP") or "<none>",
        spec.get("nodeName") or "<none>",
        "<none>",
        "<none>",
    ]


def _sts_row(sts: JsonDict, now: datetime.datetime) -> list[Any]:
    spec = sts.get("spec") or {}
    status = sts.get("status") or {}
    containers = ((spec.get("template") or {}).get("spec") or {}).get("containers") or []
    return [
        _name(sts),
        f"{status.get('readyReplicas', 0)}/{spec.get('replicas', 0)}",
        _age(sts, now),
        ",".join(str(c.get("name", "")) for c in containers),
        ",".join(str(c.get("image", "")) for c in containers),
    ]


def _service_row(svc: JsonDict, now: datetime.datetime) -> list[Any]:
    spec = svc.get("spec") or {}
    ports = []
    for port in spec.get("ports") or []:
        text = f"{port.get('port')}/{port.get('protocol', 'TCP')}"
        if port.get("nodePort"):
            text = f"{port.get('port')}:{port['nodePort']}/{port.get('protocol', 'TCP')}"
        ports.append(text)
    selector = ",".join(f"{k}={v}" for k, v in sorted((spec.get("selector") or {}).items()))
    external = spec.get("externalName") or ",".join(spec.get("externalIPs") or []) or "<none>"
    return [
        _name(svc),
        spec.get("type", "ClusterIP"),
        spec.get("clusterIP") or "<none>",
        external,
        ",".join(ports) or "<none>",
        _age(svc, now),
        selector or "<none>",
    ]


def _secret_row(secret: JsonDict, now: datetime.datetime) -> list[Any]:
    return [_name(secret), secret.get("type", "Opaque"), len(secret.get("data") or {}), _age(secret, now)]


def _configmap_row(cm: JsonDict, now: datetime.datetime) -> list[Any]:
    return [_name(cm), len(cm.get("data") or {}) + len(cm.get("binaryData") or {}), _age(cm, now)]


def _namespace_row(ns: JsonDict, now: datetime.datetime) -> list[Any]:
    return [_name(ns), (ns.get("status") or {}).get("phase", "Active"), _age(ns, now)]


def _pvc_row(pvc: JsonDict, now: datetime.datetime) -> list[Any]:
    spec = pvc.get("spec") or {}
    status = pvc.get("status") or {}
    modes = {
        "ReadWriteOnce": "RWO",
        "ReadOnlyMany": "ROX",
        "ReadWriteMany": "RWX",
        "ReadWriteOncePod": "RWOP",
    }
    access = ",".join(modes.get(m, m) for m in status.get("accessModes") or [])
    return [
        _name(pvc),
        status.get("phase", "Pending"),
        spec.get("volumeName", ""),
        (status.get("capacity") or {}).get("storage", ""),
        access,
        spec.get("storageClassName") or "<unset>",
        spec.get("volumeAttributesClassName") or "<unset>",
        _age(pvc, now),
        spec.get("volumeMode", "Filesystem"),
    ]


def _lease_row(lease: JsonDict, now: datetime.datetime) -> list[Any]:
    return [_name(lease), (lease.get("spec") or {}).get("holderIdentity", ""), _age(lease, now)]


def _vap_row(policy: JsonDict, now: datetime.datetime) -> list[Any]:
    spec = policy.get("spec") or {}
    kind = spec.get("paramKind") or {}
    param = f"{kind.get('apiVersion', '')}/{kind.get('kind', '')}" if kind else "<unset>"
    return [_name(policy), len(spec.get("validations") or []), param, _age(policy, now)]


def _vap_binding_row(binding: JsonDict, now: datetime.datetime) -> list[Any]:
    spec = binding.get("spec") or {}
    ref = spec.get("paramRef") or {}
    shown = "<unset>"
    if ref:
        shown = (
            f"{ref.get('namespace')}/{ref.get('name', '*')}" if ref.get("namespace") else ref.get("name", "*")
        )
    return [_name(binding), spec.get("policyName", ""), shown, _age(binding, now)]


def _event_row(event: JsonDict, now: datetime.datetime) -> list[Any]:
    involved = event.get("involvedObject") or {}
    last = _parse_time(event.get("lastTimestamp") or event.get("eventTime")) or _parse_time(
        (event.get("metadata") or {}).get("creationTimestamp")
    )
    first = _parse_time(event.get("firstTimestamp")) or last
    seen = human_duration((now - last).total_seconds()) if last else "<unknown>"
    return [
        seen,
        event.get("type", ""),
        event.get("reason", ""),
        f"{str(involved.get('kind', '')).lower()}/{involved.get('name', '')}",
        involved.get("fieldPath", ""),
        (event.get("source") or {}).get("component", ""),
        event.get("message", ""),
        human_duration((now - first).total_seconds()) if first else "<unknown>",
        event.get("count", 1),
        _name(event),
    ]


def _crd_row(crd: JsonDict, now: datetime.datetime) -> list[Any]:
    return [_name(crd), (crd.get("metadata") or {}).get("creationTimestamp", "")]


def _default_row(obj: JsonDict, now: datetime.datetime) -> list[Any]:
    return [_name(obj), (obj.get("metadata") or {}).get("creationTimestamp", "")]


_NAME: Column = ("Name", "string", "name", 0, "Name must be unique within a namespace. Cannot be updated.")
_AGE: Column = (
    "Age",
    "string",
    "",
    0,
    "CreationTimestamp is a timestamp representing the server time when this object was created.",
)
_CREATED: Column = (
    "Created At",
    "date",
    "",
    0,
    "CreationTimestamp is a timestamp representing the server time when this object was created.",
)


def _col(name: str, priority: int = 0, description: str = "", type_: str = "string") -> Column:
    return (name, type_, "", priority, description)


PRINTERS: dict[tuple[str, str], tuple[tuple[Column, ...], Printer]] = {
    ("", "pods"): (
        (
            _NAME,
            _col("Ready", description="The aggregate readiness state of this pod for accepting traffic."),
            _col("Status", description="The aggregate status of the containers in this pod."),
            _col(
                "Restarts",
                description=(
                    "The number of times the containers in this pod have been restarted and when the "
                    "last container in this pod has restarted."
                ),
            ),
            _AGE,
            _col("IP", 1, "IP address allocated to the pod."),
            _col("Node", 1, "Name of the node the pod is assigned to."),
            _col("Nominated Node", 1, "Name of the node the pod is nominated to."),
            _col("Readiness Gates", 1, "Pod readiness gates."),
        ),
        _pod_row,
    ),
    ("apps", "statefulsets"): (
        (
            _NAME,
            _col("Ready", description="Number of the pod with ready state"),
            _AGE,
            _col("Containers", 1, "Names of each container in the template."),
            _col("Images", 1, "Images referenced by each container in the template."),
        ),
        _sts_row,
    ),
    ("", "services"): (
        (
            _NAME,
            _col("Type", description="The type of the service."),
            _col("Cluster-IP", description="The IP address of the service."),
            _col("External-IP", description="The external IP address of the service."),
            _col("Port(s)", description="The ports of the service."),
            _AGE,
            _col("Selector", 1, "The selector of the service."),
        ),
        _service_row,
    ),
    ("", "secrets"): (
        (
            _NAME,
            _col("Type", description="The type of the secret"),
            _col("Data", description="The number of entries in the secret", type_="integer"),
            _AGE,
        ),
        _secret_row,
    ),
    ("", "configmaps"): (
        (_NAME, _col("Data", description="Number of entries in the config map", type_="integer"), _AGE),
        _configmap_row,
    ),
    ("", "namespaces"): (
        (_NAME, _col("Status", description="The status of the namespace"), _AGE),
        _namespace_row,
    ),
    ("", "persistentvolumeclaims"): (
        (
            _NAME,
            _col("Status"),
            _col("Volume"),
            _col("Capacity"),
            _col("Access Modes"),
            _col("StorageClass"),
            _col("VolumeAttributesClass"),
            _AGE,
            _col("VolumeMode", 1),
        ),
        _pvc_row,
    ),
    ("coordination.k8s.io", "leases"): (
        (_NAME, _col("Holder", description="The holder of the lease"), _AGE),
        _lease_row,
    ),
    ("admissionregistration.k8s.io", "validatingadmissionpolicies"): (
        (
            _NAME,
            _col(
                "Validations",
                description="Validations indicates the number of validation rules.",
                type_="integer",
            ),
            _col("ParamKind", description="ParamKind specifies the kind of resources used to parameterize."),
            _AGE,
        ),
        _vap_row,
    ),
    ("admissionregistration.k8s.io", "validatingadmissionpolicybindings"): (
        (
            _NAME,
            _col("PolicyName", description="PolicyName references a ValidatingAdmissionPolicy name."),
            _col("ParamRef", description="ParamRef specifies the parameter resource used to configure."),
            _AGE,
        ),
        _vap_binding_row,
    ),
    ("", "events"): (
        (
            _col("Last Seen"),
            _col("Type"),
            _col("Reason"),
            _col("Object"),
            _col("Subobject", 1),
            _col("Source", 1),
            _col("Message"),
            _col("First Seen", 1),
            _col("Count", 1, type_="integer"),
            _col("Name", 1),
        ),
        _event_row,
    ),
    ("apiextensions.k8s.io", "customresourcedefinitions"): ((_NAME, _CREATED), _crd_row),
}

_JSONPATH_TOKEN = re.compile(
    r"\.([A-Za-z0-9_\-/]+)"
    r"|\[(\d+)\]"
    r"|\[\?\(@\.([A-Za-z0-9_.\-]+)\s*==\s*['\"]([^'\"]*)['\"]\)\]"
)


def jsonpath(obj: Any, path: str) -> Any:
    """Evaluate the JSONPath subset printer columns use (``.a.b``, ``[0]``, ``[?(@.type=="Ready")]``)."""
    nodes = [obj]
    text = path.strip()
    if text.startswith("{") and text.endswith("}"):
        text = text[1:-1]
    pos = 0
    while pos < len(text):
        match = _JSONPATH_TOKEN.match(text, pos)
        if match is None:
            return None
        pos = match.end()
        field, index, filter_key, filter_value = match.groups()
        out: list[Any] = []
        for node in nodes:
            if field is not None and isinstance(node, dict) and field in node:
                out.append(node[field])
            elif index is not None and isinstance(node, list) and int(index) < len(node):
                out.append(node[int(index)])
            elif filter_key is not None and isinstance(node, list):
                for item in node:
                    if str(jsonpath(item, "." + filter_key)) == filter_value:
                        out.append(item)
        nodes = out
    if not nodes:
        return None
    return nodes[0] if len(nodes) == 1 else nodes


def _custom(rt: resources.ResourceType) -> tuple[tuple[Column, ...], Printer]:
    if not rt.printer_columns:
        return (_NAME, _AGE), lambda obj, now: [_name(obj), _age(obj, now)]
    columns: list[Column] = [_NAME]
    for col in rt.printer_columns:
        columns.append((col.name, col.type, col.format, col.priority, col.description))

    def row(obj: JsonDict, now: datetime.datetime) -> list[Any]:
        cells: list[Any] = [_name(obj)]
        for col in rt.printer_columns:
            value = jsonpath(obj, col.json_path)
            if col.type == "date" and isinstance(value, str):
                created = _parse_time(value)
                value = human_duration((now - created).total_seconds()) if created else value
            elif isinstance(value, dict | list):
                value = json.dumps(value, separators=(",", ":"))
            cells.append(value)
        return cells

    return tuple(columns), row


def printer_for(rt: resources.ResourceType) -> tuple[tuple[Column, ...], Printer]:
    """The columns and row function for a kind."""
    if rt.custom:
        return _custom(rt)
    return PRINTERS.get(rt.storage_key, ((_NAME, _CREATED), _default_row))


def column_definitions(rt: resources.ResourceType) -> list[JsonDict]:
    """The ``columnDefinitions`` of a kind's Table."""
    columns, _ = printer_for(rt)
    return [
        {"name": name, "type": type_, "format": fmt, "description": description, "priority": priority}
        for name, type_, fmt, priority, description in columns
    ]


def partial_metadata(obj: JsonDict) -> JsonDict:
    """The ``PartialObjectMetadata`` a Table row carries by default (``includeObject=Metadata``)."""
    return {
        "kind": "PartialObjectMetadata",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": obj.get("metadata") or {},
    }


def row(rt: resources.ResourceType, obj: JsonDict, *, include: str, now: datetime.datetime) -> JsonDict:
    """One Table row for an object, carrying the object as ``include`` says (None/Metadata/Object)."""
    _, printer = printer_for(rt)
    out: JsonDict = {"cells": printer(obj, now)}
    if include == "Object":
        out["object"] = obj
    elif include != "None":
        out["object"] = partial_metadata(obj)
    return out


def table(
    rt: resources.ResourceType,
    objs: list[JsonDict],
    *,
    resource_version: str,
    include: str,
    continue_token: str | None = None,
    remaining: int | None = None,
    headers: bool = True,
) -> JsonDict:
    """A whole Table response."""
    now = datetime.datetime.now(datetime.UTC)
    meta: JsonDict = {"resourceVersion": resource_version}
    if continue_token:
        meta["continue"] = continue_token
    if remaining is not None:
        meta["remainingItemCount"] = remaining
    out: JsonDict = {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": meta}
    if headers:
        out["columnDefinitions"] = column_definitions(rt)
    else:
        out["columnDefinitions"] = None
    out["rows"] = [row(rt, obj, include=include, now=now) for obj in objs]
    return out

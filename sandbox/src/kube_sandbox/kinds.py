"""Per-kind defaulting and validation, the part of kube-apiserver's registry strategies we need.

Clients see the defaults Kubernetes fills in (a Service's ``type``, ``clusterIP`` and port
``protocol``, a StatefulSet's ``replicas``, ``podManagementPolicy`` and ``updateStrategy``, a
namespace's ``kubernetes.io/metadata.name`` label, a Lease's times re-encoded in UTC, ...) and are
refused with 422 ``Invalid`` where a real cluster would refuse them (bad names, a StatefulSet whose
selector does not match its template, negative replicas, forbidden StatefulSet spec changes, a Lease
duration that is not positive, ...), or 400 where kube-apiserver cannot decode a typed field (a
Lease's ``renewTime`` without its six fraction digits). This is deliberately not a schema
validator: unknown fields are kept and custom objects are not checked against their CRD's schema.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import re
from typing import TYPE_CHECKING, Any

from kube_sandbox import errors, resources, selectors
from kube_sandbox.admission import policies

if TYPE_CHECKING:
    from kube_sandbox import store as store_module

JsonDict = dict[str, Any]

_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_SUBDOMAIN_MSG = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', "
    "and must start and end with an alphanumeric character (e.g. 'example.com', regex used for "
    r"validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
)
_LABEL_MSG = (
    "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must "
    "start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for "
    "validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')"
)
_LABEL_NAMED = frozenset({("", "namespaces"), ("", "services")})

_STATEFULSET_MUTABLE = frozenset(
    {
        "replicas",
        "ordinals",
        "template",
        "updateStrategy",
        "persistentVolumeClaimRetentionPolicy",
        "minReadySeconds",
    }
)


def _invalid(rt: resources.ResourceType, name: str, causes: list[tuple[str, str, str]]) -> errors.Invalid:
    return errors.Invalid.of(kind=rt.kind, group=rt.group, name=name, causes=causes)


def validate_name(rt: resources.ResourceType, name: str) -> None:
    """Refuse names Kubernetes refuses for the kind (DNS-1123 subdomain, or label for some kinds)."""
    if not name:
        raise _invalid(
            rt,
            name,
            [("FieldValueRequired", "metadata.name", "Required value: name or generateName is required")],
        )
    if rt.storage_key in _LABEL_NAMED:
        if len(name) > 63 or not _LABEL.match(name):
            raise _invalid(
                rt, name, [("FieldValueInvalid", "metadata.name", f'Invalid value: "{name}": {_LABEL_MSG}')]
            )
    elif len(name) > 253 or not _SUBDOMAIN.match(name):
        raise _invalid(
            rt, name, [("FieldValueInvalid", "metadata.name", f'Invalid value: "{name}": {_SUBDOMAIN_MSG}')]
        )


def _default_container(container: JsonDict) -> None:
    image = str(container.get("image", ""))
    tag = image.rsplit("/", 1)[-1]
    latest = ":" not in tag or tag.endswith(":latest")
    container.setdefault("imagePullPolicy", "Always" if latest and "@" not in tag else "IfNotPresent")
    container.setdefault("terminationMessagePath", "/dev/termination-log")
    container.setdefault("terminationMessagePolicy", "File")
    container.setdefault("resources", {})
    for port in container.get("ports") or []:
        if isinstance(port, dict):
            port.setdefault("protocol", "TCP")


def default_pod_spec(spec: JsonDict) -> None:
    """Fill in the pod spec defaults kube-apiserver sets."""
    spec.setdefault("restartPolicy", "Always")
    spec.setdefault("terminationGracePeriodSeconds", 30)
    spec.setdefault("dnsPolicy", "ClusterFirst")
    spec.setdefault("securityContext", {})
    spec.setdefault("schedulerName", "default-scheduler")
    for container in [*(spec.get("containers") or []), *(spec.get("initContainers") or [])]:
        if isinstance(container, dict):
            _default_container(container)


def _pod_spec_causes(spec: Any, prefix: str) -> list[tuple[str, str, str]]:
    if not isinstance(spec, dict):
        return [("FieldValueRequired", prefix, "Required value")]
    containers = spec.get("containers")
    if not isinstance(containers, list) or not containers:
        return [("FieldValueRequired", f"{prefix}.containers", "Required value")]
    causes: list[tuple[str, str, str]] = []
    seen: set[str] = set()
    for i, container in enumerate(containers):
        where = f"{prefix}.containers[{i}]"
        if not isinstance(container, dict):
            causes.append(("FieldValueInvalid", where, "Invalid value: must be an object"))
            continue
        name = container.get("name")
        if not name:
            causes.append(("FieldValueRequired", f"{where}.name", "Required value"))
        elif name in seen:
            causes.append(("FieldValueDuplicate", f"{where}.name", f'Duplicate value: "{name}"'))
        else:
            seen.add(str(name))
        if not container.get("image"):
            causes.append(("FieldValueRequired", f"{where}.image", "Required value"))
    return causes


def _qos(spec: JsonDict) -> str:
    containers = spec.get("containers") or []
    requests = [((c.get("resources") or {}).get("requests") or {}) for c in containers]
    limits = [((c.get("resources") or {}).get("limits") or {}) for c in containers]
    if not any(requests) and not any(limits):
        return "BestEffort"
    guaranteed = all(
        lim.get(res) and (req.get(res, lim.get(res)) == lim.get(res))
        for req, lim in zip(requests, limits, strict=True)
        for res in ("cpu", "memory")
    )
    return "Guaranteed" if guaranteed else "Burstable"


def _prepare_pod(rt: resources.ResourceType, obj: JsonDict, *, create: bool) -> None:
    name = obj["metadata"].get("name", "")
    spec = obj.get("spec")
    causes = _pod_spec_causes(spec, "spec")
    if causes:
        raise _invalid(rt, name, causes)
    assert isinstance(spec, dict)
    default_pod_spec(spec)
    if create:
        status = obj.setdefault("status", {})
        status.setdefault("phase", "Pending")
        status.setdefault("qosClass", _qos(spec))


def _prepare_service(
    rt: resources.ResourceType, obj: JsonDict, old: JsonDict | None, st: store_module.Store
) -> None:
    name = obj["metadata"].get("name", "")
    spec = obj.setdefault("spec", {})
    spec.setdefault("type", "ClusterIP")
    old_spec = (old or {}).get("spec") or {}
    if old is not None and not spec.get("clusterIP") and old_spec.get("clusterIP"):
        spec["clusterIP"] = old_spec["clusterIP"]
        spec["clusterIPs"] = old_spec.get("clusterIPs", [old_spec["clusterIP"]])
    if old is not None and spec.get("clusterIP") != old_spec.get("clusterIP"):
        raise _invalid(
            rt,
            name,
            [
                (
                    "FieldValueInvalid",
                    "spec.clusterIPs[0]",
                    f'Invalid value: []string{{"{spec.get("clusterIP")}"}}: may not change once set',
                )
            ],
        )
    if spec["type"] != "ExternalName" and not spec.get("clusterIP"):
        spec["clusterIP"] = st.allocate_cluster_ip()
    if spec.get("clusterIP"):
        spec.setdefault("clusterIPs", [spec["clusterIP"]])
    ports = spec.get("ports") or []
    if not ports and spec.get("clusterIP") != "None" and spec["type"] != "ExternalName":
        raise _invalid(rt, name, [("FieldValueRequired", "spec.ports", "Required value")])
    for i, port in enumerate(ports):
        if not isinstance(port, dict) or not isinstance(port.get("port"), int):
            raise _invalid(rt, name, [("FieldValueRequired", f"spec.ports[{i}].port", "Required value")])
        port.setdefault("protocol", "TCP")
        port.setdefault("targetPort", port["port"])
    spec.setdefault("sessionAffinity", "None")
    spec.setdefault("ipFamilies", ["IPv4"])
    spec.setdefault("ipFamilyPolicy", "SingleStack")
    spec.setdefault("internalTrafficPolicy", "Cluster")
    obj.setdefault("status", {"loadBalancer": {}})


def _prepare_secret(obj: JsonDict) -> None:
    if not obj.get("type"):
        obj["type"] = "Opaque"
    data = obj.get("data") or {}
    for key, value in data.items():
        try:
            base64.b64decode(str(value), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise errors.BadRequest(
                f'Secret in version "v1" cannot be handled as a Secret: illegal base64 data at key {key!r}'
            ) from exc
    string_data = obj.pop("stringData", None)
    if isinstance(string_data, dict) and string_data:
        data = dict(data)
        for key, value in string_data.items():
            data[key] = base64.b64encode(str(value).encode()).decode()
    if data:
        obj["data"] = data


def _prepare_pvc(rt: resources.ResourceType, obj: JsonDict, *, create: bool) -> None:
    name = obj["metadata"].get("name", "")
    spec = obj.setdefault("spec", {})
    causes: list[tuple[str, str, str]] = []
    if not spec.get("accessModes"):
        causes.append(
            ("FieldValueRequired", "spec.accessModes", "Required value: at least 1 access mode is required")
        )
    if not ((spec.get("resources") or {}).get("requests") or {}).get("storage"):
        causes.append(("FieldValueRequired", "spec.resources[storage]", "Required value"))
    if causes:
        raise _invalid(rt, name, causes)
    spec.setdefault("volumeMode", "Filesystem")
    if create:
        obj.setdefault("status", {}).setdefault("phase", "Pending")


def _prepare_statefulset(rt: resources.ResourceType, obj: JsonDict, old: JsonDict | None) -> None:
    name = obj["metadata"].get("name", "")
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        raise _invalid(rt, name, [("FieldValueRequired", "spec", "Required value")])
    spec.setdefault("replicas", 1)
    spec.setdefault("podManagementPolicy", "OrderedReady")
    spec.setdefault("updateStrategy", {"type": "RollingUpdate", "rollingUpdate": {"partition": 0}})
    spec.setdefault("revisionHistoryLimit", 10)
    spec.setdefault("persistentVolumeClaimRetentionPolicy", {"whenDeleted": "Retain", "whenScaled": "Retain"})
    raw_template = spec.get("template")
    template: JsonDict = raw_template if isinstance(raw_template, dict) else {}
    causes: list[tuple[str, str, str]] = []
    replicas = spec["replicas"]
    if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0:
        causes.append(
            (
                "FieldValueInvalid",
                "spec.replicas",
                f"Invalid value: {replicas}: must be greater than or equal to 0",
            )
        )
    selector = spec.get("selector")
    template_labels = ((template.get("metadata") or {}).get("labels")) or {}
    if not isinstance(selector, dict) or not selector:
        causes.append(("FieldValueRequired", "spec.selector", "Required value"))
    else:
        try:
            matcher = selectors.from_label_selector_object(selector)
        except errors.BadRequest as exc:
            causes.append(("FieldValueInvalid", "spec.selector", exc.message))
        else:
            if matcher.empty:
                causes.append(
                    (
                        "FieldValueInvalid",
                        "spec.selector",
                        'Invalid value: "null": empty selector is invalid for statefulset',
                    )
                )
            elif not matcher.matches(template_labels):
                causes.append(
                    (
                        "FieldValueInvalid",
                        "spec.template.metadata.labels",
                        f"Invalid value: {template_labels}: `selector` does not match template `labels`",
                    )
                )
    causes += _pod_spec_causes(template.get("spec"), "spec.template.spec")
    if isinstance(template.get("spec"), dict):
        default_pod_spec(template["spec"])
    for claim in spec.get("volumeClaimTemplates") or []:
        if isinstance(claim, dict):
            claim.setdefault("apiVersion", "v1")
            claim.setdefault("kind", "PersistentVolumeClaim")
            claim.setdefault("spec", {}).setdefault("volumeMode", "Filesystem")
            claim.setdefault("status", {"phase": "Pending"})
    if old is not None:
        old_spec = old.get("spec") or {}
        for field in sorted(set(spec) | set(old_spec)):
            if field not in _STATEFULSET_MUTABLE and spec.get(field) != old_spec.get(field):
                causes.append(
                    (
                        "FieldValueForbidden",
                        "spec",
                        "Forbidden: updates to statefulset spec for fields other than 'replicas', "
                        "'ordinals', "
                        "'template', 'updateStrategy', 'persistentVolumeClaimRetentionPolicy' and "
                        "'minReadySeconds' are forbidden",
                    )
                )
                break
    if causes:
        raise _invalid(rt, name, causes)


def _prepare_crd(rt: resources.ResourceType, obj: JsonDict) -> None:
    name = obj["metadata"].get("name", "")
    spec = obj.get("spec") or {}
    names = spec.get("names") or {}
    causes: list[tuple[str, str, str]] = []
    if not spec.get("group"):
        causes.append(("FieldValueRequired", "spec.group", "Required value"))
    if not names.get("plural"):
        causes.append(("FieldValueRequired", "spec.names.plural", "Required value"))
    if not names.get("kind"):
        causes.append(("FieldValueRequired", "spec.names.kind", "Required value"))
    if not spec.get("versions"):
        causes.append(
            (
                "FieldValueRequired",
                "spec.versions",
                "Required value: must have exactly one version marked as storage version",
            )
        )
    if spec.get("scope") not in ("Namespaced", "Cluster"):
        causes.append(
            (
                "FieldValueNotSupported",
                "spec.scope",
                'Unsupported value: "": supported values: "Cluster", "Namespaced"',
            )
        )
    if not causes and name != f"{names['plural']}.{spec['group']}":
        causes.append(
            (
                "FieldValueInvalid",
                "metadata.name",
                f'Invalid value: "{name}": must be spec.names.plural+"."+spec.group',
            )
        )
    if causes:
        raise _invalid(rt, name, causes)
    accepted = dict(names)
    accepted.setdefault("singular", str(names["kind"]).lower())
    accepted.setdefault("listKind", f"{names['kind']}List")
    names.setdefault("singular", accepted["singular"])
    names.setdefault("listKind", accepted["listKind"])
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    obj["status"] = {
        "acceptedNames": accepted,
        "conditions": [
            {
                "type": "NamesAccepted",
                "status": "True",
                "reason": "NoConflicts",
                "message": "no conflicts found",
                "lastTransitionTime": stamp,
            },
            {
                "type": "Established",
                "status": "True",
                "reason": "InitialNamesAccepted",
                "message": "the initial names have been accepted",
                "lastTransitionTime": stamp,
            },
        ],
        "storedVersions": [v.get("name") for v in spec["versions"] if v.get("storage")]
        or [spec["versions"][0].get("name")],
    }


def _prepare_namespace(obj: JsonDict, *, create: bool) -> None:
    name = obj["metadata"]["name"]
    labels = obj["metadata"].setdefault("labels", {})
    labels["kubernetes.io/metadata.name"] = name
    spec = obj.setdefault("spec", {})
    spec.setdefault("finalizers", ["kubernetes"])
    if create:
        obj["status"] = {"phase": "Active"}


_MICRO_TIME = re.compile(r"^(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6})(Z|[+-]\d{2}:\d{2})$")


def micro_time(value: Any, *, kind: str, field: str) -> str:
    """A ``metav1.MicroTime`` as kube-apiserver decodes and re-encodes it, or 400.

    Go parses it with the layout ``2006-01-02T15:04:05.000000Z07:00``: exactly six fraction
    digits and a zone (``Z`` or an offset); it is written back in UTC with a ``Z``. Second
    precision (``...:05Z``) and zone-less times, which a careless client produces, are refused.
    """
    text = value if isinstance(value, str) else None
    match = _MICRO_TIME.match(text or "")
    parsed = None
    if match is not None:
        zone = "+00:00" if match[2] == "Z" else match[2]
        try:
            parsed = datetime.datetime.fromisoformat(match[1] + zone)
        except ValueError:
            parsed = None
    if parsed is None:
        shown = f'"{text}"' if text is not None else type(value).__name__
        raise errors.BadRequest(
            f'{kind} in version "v1" cannot be handled as a {kind}: {field}: parsing time {shown} as '
            '"2006-01-02T15:04:05.000000Z07:00": cannot parse it'
        )
    return parsed.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _prepare_lease(rt: resources.ResourceType, obj: JsonDict) -> None:
    """coordination.k8s.io/v1 Lease: typed fields decoded as Go would, then ValidateLeaseSpec."""
    name = obj["metadata"].get("name", "")
    spec = obj.setdefault("spec", {})
    if not isinstance(spec, dict):
        raise errors.BadRequest('Lease in version "v1" cannot be handled as a Lease: spec must be an object')
    for field in ("holderIdentity", "preferredHolder", "strategy"):
        if field in spec and not isinstance(spec[field], str):
            raise errors.BadRequest(
                f'Lease in version "v1" cannot be handled as a Lease: json: cannot unmarshal '
                f"{type(spec[field]).__name__} into Go struct field LeaseSpec.spec.{field} of type string"
            )
    for field in ("leaseDurationSeconds", "leaseTransitions"):
        value = spec.get(field)
        if field in spec and (not isinstance(value, int) or isinstance(value, bool) or abs(value) >= 2**31):
            raise errors.BadRequest(
                f'Lease in version "v1" cannot be handled as a Lease: json: cannot unmarshal '
                f"{type(value).__name__} into Go struct field LeaseSpec.spec.{field} of type int32"
            )
    for field in ("acquireTime", "renewTime"):
        if field in spec:
            spec[field] = micro_time(spec[field], kind="Lease", field=f"spec.{field}")
    causes: list[tuple[str, str, str]] = []
    duration = spec.get("leaseDurationSeconds")
    if duration is not None and duration <= 0:
        causes.append(
            (
                "FieldValueInvalid",
                "spec.leaseDurationSeconds",
                f"Invalid value: {duration}: must be greater than 0",
            )
        )
    transitions = spec.get("leaseTransitions")
    if transitions is not None and transitions < 0:
        causes.append(
            (
                "FieldValueInvalid",
                "spec.leaseTransitions",
                f"Invalid value: {transitions}: must be greater than or equal to 0",
            )
        )
    if spec.get("preferredHolder") and not spec.get("strategy"):
        causes.append(
            (
                "FieldValueForbidden",
                "spec.preferredHolder",
                "Forbidden: may only be specified if `strategy` is defined",
            )
        )
    if causes:
        raise _invalid(rt, name, causes)


def _prepare_custom(rt: resources.ResourceType, obj: JsonDict) -> None:
    obj["apiVersion"] = rt.api_version
    obj["kind"] = rt.kind


def prepare_create(rt: resources.ResourceType, obj: JsonDict, *, store: store_module.Store) -> None:
    """Default and validate an object about to be created."""
    _prepare(rt, obj, None, store)


def prepare_update(
    rt: resources.ResourceType, obj: JsonDict, old: JsonDict, *, store: store_module.Store
) -> None:
    """Default and validate an object about to replace ``old``."""
    _prepare(rt, obj, old, store)


def prune_nulls(value: Any) -> Any:
    """Drop ``null`` map entries, as decoding into Go structs does for built-in kinds."""
    if isinstance(value, dict):
        return {k: prune_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [prune_nulls(v) for v in value]
    return value


def _prepare(rt: resources.ResourceType, obj: JsonDict, old: JsonDict | None, st: store_module.Store) -> None:
    key = rt.storage_key
    if not rt.custom:
        for field in [k for k in obj if k != "metadata"]:
            if obj[field] is None:
                del obj[field]
            else:
                obj[field] = prune_nulls(obj[field])
    create = old is None
    if key == ("", "pods"):
        _prepare_pod(rt, obj, create=create)
    elif key == ("", "services"):
        _prepare_service(rt, obj, old, st)
    elif key == ("", "secrets"):
        _prepare_secret(obj)
    elif key == ("", "persistentvolumeclaims"):
        _prepare_pvc(rt, obj, create=create)
    elif key == ("apps", "statefulsets"):
        _prepare_statefulset(rt, obj, old)
    elif key == ("apiextensions.k8s.io", "customresourcedefinitions"):
        if create or obj.get("spec") != (old or {}).get("spec"):
            _prepare_crd(rt, obj)
    elif key == ("", "namespaces"):
        _prepare_namespace(obj, create=create)
    elif key == ("coordination.k8s.io", "leases"):
        _prepare_lease(rt, obj)
    elif key == (policies.GROUP, "validatingadmissionpolicies"):
        # Defaulted, then refused as kube-apiserver does when an expression does not compile.
        policies.default_policy(obj)
        policies.parse_policy(obj)
    elif key == (policies.GROUP, "validatingadmissionpolicybindings"):
        policies.default_binding(obj)
        policies.parse_binding(obj)
    elif rt.custom:
        _prepare_custom(rt, obj)

"""The registry of resource types the sandbox serves: built-in kinds plus those CRDs define.

Discovery, routing, validation and table printing all key off :class:`ResourceType`, so adding a
kind here is what makes it reachable. CustomResourceDefinitions add and remove entries at run time,
one entry per served version; every version of a CRD shares one storage key, so objects are stored
once and only their ``apiVersion`` differs by the version a client asks for (the sandbox does no
schema conversion between versions).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

JsonDict = dict[str, Any]
StorageKey = tuple[str, str]
"""(group, plural): where objects of a kind live, independent of the served version."""

ALL_VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")
READ_VERBS = ("get", "list")


@dataclasses.dataclass(frozen=True)
class PrinterColumn:
    """A CRD ``additionalPrinterColumns`` entry: what ``kubectl get`` shows for a custom kind."""

    name: str
    type: str
    json_path: str
    description: str = ""
    priority: int = 0
    format: str = ""


@dataclasses.dataclass(frozen=True)
class ScaleSpec:
    """Where a kind keeps the numbers its ``scale`` subresource exposes."""

    spec_replicas_path: str = ".spec.replicas"
    status_replicas_path: str = ".status.replicas"
    label_selector_path: str | None = None


@dataclasses.dataclass(frozen=True)
class ResourceType:
    """One servable kind at one group/version, with what discovery says about it."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    singular: str = ""
    short_names: tuple[str, ...] = ()
    verbs: tuple[str, ...] = ALL_VERBS
    categories: tuple[str, ...] = ()
    status_subresource: bool = False
    scale: ScaleSpec | None = None
    has_generation: bool = False
    custom: bool = False
    printer_columns: tuple[PrinterColumn, ...] = ()
    extra_subresources: tuple[str, ...] = ()

    @property
    def api_version(self) -> str:
        """``v1`` for the core group, ``group/version`` otherwise."""
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def storage_key(self) -> StorageKey:
        """Where objects of this kind live regardless of the served version."""
        return (self.group, self.plural)

    @property
    def list_kind(self) -> str:
        """The kind of a list response."""
        return f"{self.kind}List"

    @property
    def singular_name(self) -> str:
        """The singular resource name discovery reports."""
        return self.singular or self.kind.lower()

    def subresources(self) -> tuple[str, ...]:
        """Subresource names the kind serves."""
        out: list[str] = []
        if self.status_subresource:
            out.append("status")
        if self.scale is not None:
            out.append("scale")
        out.extend(self.extra_subresources)
        return tuple(out)


_STATEFULSET_SCALE = ScaleSpec(label_selector_path=".spec.selector")

BUILTIN: tuple[ResourceType, ...] = (
    ResourceType(
        "",
        "v1",
        "namespaces",
        "Namespace",
        namespaced=False,
        short_names=("ns",),
        verbs=("create", "delete", "get", "list", "patch", "update", "watch"),
        status_subresource=True,
        extra_subresources=("finalize",),
    ),
    ResourceType("", "v1", "configmaps", "ConfigMap", namespaced=True, short_names=("cm",)),
    ResourceType("", "v1", "events", "Event", namespaced=True, short_names=("ev",)),
    ResourceType(
        "",
        "v1",
        "persistentvolumeclaims",
        "PersistentVolumeClaim",
        namespaced=True,
        short_names=("pvc",),
        status_subresource=True,
    ),
    ResourceType(
        "",
        "v1",
        "pods",
        "Pod",
        namespaced=True,
        short_names=("po",),
        categories=("all",),
        status_subresource=True,
        extra_subresources=("log",),
    ),
    ResourceType("", "v1", "secrets", "Secret", namespaced=True),
    ResourceType(
        "",
        "v1",
        "services",
        "Service",
        namespaced=True,
        short_names=("svc",),
        categories=("all",),
        status_subresource=True,
        verbs=("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"),
    ),
    ResourceType(
        "apps",
        "v1",
        "statefulsets",
        "StatefulSet",
        namespaced=True,
        short_names=("sts",),
        categories=("all",),
        status_subresource=True,
        scale=_STATEFULSET_SCALE,
        has_generation=True,
    ),
    ResourceType("coordination.k8s.io", "v1", "leases", "Lease", namespaced=True),
    ResourceType(
        "admissionregistration.k8s.io",
        "v1",
        "validatingadmissionpolicies",
        "ValidatingAdmissionPolicy",
        namespaced=False,
        categories=("api-extensions",),
        status_subresource=True,
        has_generation=True,
    ),
    ResourceType(
        "admissionregistration.k8s.io",
        "v1",
        "validatingadmissionpolicybindings",
        "ValidatingAdmissionPolicyBinding",
        namespaced=False,
        categories=("api-extensions",),
        has_generation=True,
    ),
    ResourceType(
        "apiextensions.k8s.io",
        "v1",
        "customresourcedefinitions",
        "CustomResourceDefinition",
        namespaced=False,
        short_names=("crd", "crds"),
        categories=("api-extensions",),
        status_subresource=True,
        has_generation=True,
    ),
    ResourceType("metrics.k8s.io", "v1beta1", "pods", "PodMetrics", namespaced=True, verbs=READ_VERBS),
)

GROUP_ORDER = (
    "",
    "apps",
    "coordination.k8s.io",
    "admissionregistration.k8s.io",
    "apiextensions.k8s.io",
    "metrics.k8s.io",
)


def _columns(version: JsonDict) -> tuple[PrinterColumn, ...]:
    return tuple(
        PrinterColumn(
            name=str(col.get("name", "")),
            type=str(col.get("type", "string")),
            json_path=str(col.get("jsonPath", "")),
            description=str(col.get("description", "")),
            priority=int(col.get("priority", 0) or 0),
            format=str(col.get("format", "")),
        )
        for col in version.get("additionalPrinterColumns") or ()
    )


def from_crd(crd: JsonDict) -> list[ResourceType]:
    """The resource types one CustomResourceDefinition serves (one per served version)."""
    spec = crd.get("spec") or {}
    names = spec.get("names") or {}
    out: list[ResourceType] = []
    for version in spec.get("versions") or ():
        if not version.get("served", True):
            continue
        subresources = version.get("subresources") or {}
        scale_cfg = subresources.get("scale")
        scale = (
            ScaleSpec(
                spec_replicas_path=str(scale_cfg.get("specReplicasPath", ".spec.replicas")),
                status_replicas_path=str(scale_cfg.get("statusReplicasPath", ".status.replicas")),
                label_selector_path=scale_cfg.get("labelSelectorPath"),
            )
            if isinstance(scale_cfg, dict)
            else None
        )
        out.append(
            ResourceType(
                group=str(spec.get("group", "")),
                version=str(version.get("name", "")),
                plural=str(names.get("plural", "")),
                kind=str(names.get("kind", "")),
                namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                singular=str(names.get("singular") or str(names.get("kind", "")).lower()),
                short_names=tuple(names.get("shortNames") or ()),
                categories=tuple(names.get("categories") or ()),
                status_subresource="status" in subresources,
                scale=scale,
                has_generation=True,
                custom=True,
                printer_columns=_columns(version),
            )
        )
    return out


class Registry:
    """Looks resource types up by group/version/plural, and lists them for discovery."""

    def __init__(self, builtin: Iterable[ResourceType] = BUILTIN) -> None:
        self._by_gvr: dict[tuple[str, str, str], ResourceType] = {}
        self._crd_types: dict[str, list[ResourceType]] = {}
        for rt in builtin:
            self._by_gvr[(rt.group, rt.version, rt.plural)] = rt

    def lookup(self, *, group: str, version: str, plural: str) -> ResourceType | None:
        """The type served at ``/apis/group/version/plural``, if any."""
        return self._by_gvr.get((group, version, plural))

    def by_kind(self, *, api_version: str, kind: str) -> ResourceType | None:
        """The type for an object's ``apiVersion`` and ``kind`` (used by server-side apply)."""
        group, _, version = api_version.rpartition("/")
        for rt in self._by_gvr.values():
            if rt.group == group and rt.version == version and rt.kind == kind:
                return rt
        return None

    def storage_types(self) -> list[ResourceType]:
        """One type per storage key (the preferred version), for scans across all kinds."""
        seen: dict[StorageKey, ResourceType] = {}
        for rt in self._by_gvr.values():
            seen.setdefault(rt.storage_key, rt)
        return list(seen.values())

    def preferred(self, key: StorageKey) -> ResourceType | None:
        """The preferred (first registered) version of a stored kind."""
        for rt in self._by_gvr.values():
            if rt.storage_key == key:
                return rt
        return None

    def groups(self) -> list[tuple[str, list[str]]]:
        """Groups and their versions in discovery order: built-in groups first, then CRD groups."""
        versions: dict[str, list[str]] = {}
        for rt in self._by_gvr.values():
            listed = versions.setdefault(rt.group, [])
            if rt.version not in listed:
                listed.append(rt.version)
        order = [g for g in GROUP_ORDER if g in versions]
        order += sorted(g for g in versions if g not in GROUP_ORDER)
        return [(g, versions[g]) for g in order]

    def in_group_version(self, *, group: str, version: str) -> list[ResourceType]:
        """Every type served at one group/version, for its APIResourceList."""
        return [rt for rt in self._by_gvr.values() if rt.group == group and rt.version == version]

    def add_crd(self, crd: JsonDict) -> list[ResourceType]:
        """Serve the kinds a CRD defines (replacing an earlier definition of the same CRD)."""
        name = str((crd.get("metadata") or {}).get("name", ""))
        self.remove_crd(name)
        types = from_crd(crd)
        for rt in types:
            self._by_gvr[(rt.group, rt.version, rt.plural)] = rt
        self._crd_types[name] = types
        return types

    def remove_crd(self, name: str) -> list[ResourceType]:
        """Stop serving a CRD's kinds; returns what was removed."""
        types = self._crd_types.pop(name, [])
        for rt in types:
            self._by_gvr.pop((rt.group, rt.version, rt.plural), None)
        return types

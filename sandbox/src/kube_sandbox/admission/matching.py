"""Which requests a policy or binding applies to: kube-apiserver's ``matchResources`` rules.

* ``resourceRules``: operation, API group, version, resource and scope must each match (``*``
  matches any). A resource is ``plural`` for the object itself and ``plural/subresource`` for a
  subresource: ``statefulsets`` does not match ``kubectl scale`` (``statefulsets/scale``),
  ``statefulsets/scale``, ``statefulsets/*`` and ``*/scale`` do, ``*`` matches every main
  resource and ``*/*`` everything. ``resourceNames`` narrows to names.
* ``excludeResourceRules``: a request any of them matches is not matched.
* ``matchPolicy: Equivalent`` (the default) also matches a request to another served version of
  the same resource.
* ``namespaceSelector``: the labels of the request's namespace (a Namespace object is matched by
  its own labels; other cluster-scoped objects always match).
* ``objectSelector``: the labels of ``object`` or of ``oldObject``; either matching is enough, a
  missing object (``oldObject`` of a create, ``object`` of a delete) or one without labels (a
  ``Scale``) matches only the empty selector.
* A binding's ``matchResources`` narrows the policy's; without ``resourceRules`` it does not
  narrow the resources.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from kube_sandbox import users
from kube_sandbox.admission import policies

JsonDict = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Attributes:
    """One request as admission sees it (kube-apiserver's ``admission.Attributes``)."""

    operation: str
    group: str
    version: str
    resource: str
    subresource: str
    kind_group: str
    kind_version: str
    kind: str
    namespace: str
    name: str
    user: users.User
    dry_run: bool = False
    options: JsonDict | None = None
    verb: str = ""

    @property
    def api_version(self) -> str:
        """``group/version`` of the request's resource (``v1`` for the core group)."""
        return f"{self.group}/{self.version}" if self.group else self.version

    def request(self, uid: str) -> JsonDict:
        """The ``request`` variable: an ``admission.k8s.io/v1`` AdmissionRequest without the objects."""
        resource = {"group": self.group, "version": self.version, "resource": self.resource}
        kind = {"group": self.kind_group, "version": self.kind_version, "kind": self.kind}
        out: JsonDict = {
            "uid": uid,
            "kind": kind,
            "resource": resource,
            "requestKind": kind,
            "requestResource": resource,
            "name": self.name,
            "namespace": self.namespace,
            "operation": self.operation,
            "userInfo": self.user.info(),
            "dryRun": self.dry_run,
        }
        if self.subresource:
            out["subResource"] = self.subresource
            out["requestSubResource"] = self.subresource
        if self.options is not None:
            out["options"] = self.options
        return out


Served = Callable[[str, str, str], bool]
"""Whether ``(group, version, resource)`` is served: what ``matchPolicy: Equivalent`` consults."""


def _rule_matches(rule: policies.Rule, attrs: Attributes, *, equivalent: bool, served: Served) -> bool:
    if not any(op in ("*", attrs.operation) for op in rule.operations):
        return False
    if not any(g in ("*", attrs.group) for g in rule.api_groups):
        return False
    versions = rule.api_versions
    if not any(v in ("*", attrs.version) for v in versions) and not (
        equivalent and any(served(attrs.group, v, attrs.resource) for v in versions)
    ):
        return False
    resource_match = False
    for entry in rule.resources:
        res, _, sub = entry.partition("/")
        if res in ("*", attrs.resource) and (sub == "*" or sub == attrs.subresource):
            resource_match = True
            break
    if not resource_match:
        return False
    namespaced = bool(attrs.namespace)
    if rule.scope == "Cluster" and namespaced:
        return False
    if rule.scope == "Namespaced" and not namespaced:
        return False
    return not rule.resource_names or attrs.name in rule.resource_names


def _labels(obj: JsonDict | None) -> Mapping[str, str] | None:
    if obj is None:
        return None
    meta = obj.get("metadata")
    labels = meta.get("labels") if isinstance(meta, dict) else None
    return labels if isinstance(labels, dict) else {}


def matches(
    match: policies.MatchResources,
    attrs: Attributes,
    *,
    obj: JsonDict | None,
    old: JsonDict | None,
    namespace_labels: Mapping[str, str] | None,
    served: Served,
    binding: bool = False,
) -> bool:
    """Whether a request falls under ``match`` (a policy's constraints or a binding's resources)."""
    equivalent = match.match_policy == "Equivalent"
    # A binding without resource rules does not narrow the policy's resources.
    if (match.resource_rules or not binding) and not any(
        _rule_matches(r, attrs, equivalent=equivalent, served=served) for r in match.resource_rules
    ):
        return False
    if any(
        _rule_matches(r, attrs, equivalent=equivalent, served=served) for r in match.exclude_resource_rules
    ):
        return False
    if not match.namespace_selector.empty:
        if attrs.group == "" and attrs.resource == "namespaces":
            own = [x for x in (_labels(obj), _labels(old)) if x is not None]
            if not any(match.namespace_selector.matches(x) for x in own):
                return False
        elif attrs.namespace and not match.namespace_selector.matches(namespace_labels or {}):
            return False
    if not match.object_selector.empty:
        candidates = [x for x in (_labels(obj), _labels(old)) if x is not None]
        if not any(match.object_selector.matches(x) for x in candidates):
            return False
    return True

"""Drift prevention: the ValidatingAdmissionPolicies that stop hand edits of what the broker owns.

Detection tells after the fact; these policies (``admissionregistration.k8s.io/v1``, CEL) make the
API server refuse, warn about or audit a change to a broker-owned field of a broker-managed object
by anyone but the broker. Pure code: it produces plain dicts, which the broker applies with
server-side apply when prevention is on and ``broker admission-policy`` prints for teams that
deploy through Git.

Where the rules come from. Every drift field of ``drift.FIELDS`` is covered by one ``Guard``
below (``GUARDS``; a test fails when a drift field has none): the change it stops, in CEL, and its
``Category``. One policy and one binding per category whose mode is not ``off``, so that each
category has its own ``validationActions``:

==========  ============================================================  ===================
category    guards                                                        default (``deny``)
==========  ============================================================  ===================
spec        replicas (also ``kubectl scale``), image, resources,          as the setting says
            env/args, topic partitions/replicas/retention
labels      the broker's labels (``naming.labels``)                       as the setting says
secret      the credentials Secret's data                                 as the setting says
deletion    deleting a StatefulSet, Service, Secret or KafkaTopic         as the setting says
==========  ============================================================  ===================

The remediation policy table (``policy.Policy``) narrows them: where a namespace and type's rule
is ``off``, or ignores every drift field a guard covers, that guard lets the change through (a
team that may scale its own caches keeps ``kubectl scale``).

How objects are selected. Only UPDATE and DELETE are judged (the broker creates; a new object is
nobody's drift), so ``oldObject`` is always there and identifies a managed object by the
``broker.platform/deployment-id`` label. Not by an ``objectSelector``: for the ``scale``
subresource kube-apiserver evaluates policies against ``autoscaling/v1`` Scale objects, which
carry no labels, so a selector would let ``kubectl scale`` through. A Scale names its parent's
selector in ``status.selector``, and the broker's StatefulSets select by the deployment-id label;
that is how a Scale of a managed StatefulSet is recognised. (Its resource type is not there: a
StatefulSet is a database or a cache, so a Scale is exempt only where both are.)

Who may change them. Match conditions exempt the broker's own identity (a setting, by default
its service account) and Kubernetes' own controllers (``system:kube-controller-manager`` and the
``system:serviceaccounts:kube-system`` group: the namespace controller deleting a namespace, the
garbage collector): a policy must never stand between the broker and its remediation, nor hold
a namespace in Terminating.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from collections.abc import Iterable, Mapping
from typing import Any

from broker.domain import drift, model, naming, policy

JsonDict = dict[str, Any]

API_VERSION = "admissionregistration.k8s.io/v1"
NAME_PREFIX = "resource-broker"
DEFAULT_IDENTITY = "system:serviceaccount:resource-broker:resource-broker"
SYSTEM_USERS = ("system:kube-controller-manager",)
SYSTEM_GROUPS = ("system:serviceaccounts:kube-system",)


class Category(enum.Enum):
    """A family of broker-owned fields that shares one validation action."""

    SPEC = "spec"
    LABELS = "labels"
    SECRET = "secret"  # noqa: S105 - a category name, not a credential.
    DELETION = "deletion"


class Mode(enum.Enum):
    """What the API server does about a change a category forbids."""

    OFF = "off"
    WARN = "warn"
    DENY = "deny"
    AUDIT = "audit"


ACTIONS = {Mode.WARN: ["Warn"], Mode.DENY: ["Deny"], Mode.AUDIT: ["Audit"]}


@dataclasses.dataclass(frozen=True)
class Prevention:
    """The mode of each category (``off`` where not named) and the identities allowed to change."""

    modes: Mapping[Category, Mode] = dataclasses.field(default_factory=dict)
    identity: str = DEFAULT_IDENTITY

    def mode(self, category: Category) -> Mode:
        """The mode of one category."""
        return self.modes.get(category, Mode.OFF)

    @property
    def enabled(self) -> bool:
        """Whether any category is on."""
        return any(m is not Mode.OFF for m in self.modes.values())


def parse_modes(text: str) -> dict[Category, Mode]:
    """``deny``, ``off``, or ``warn,labels=audit``: a mode for every category, then per-category ones.

    A category neither named nor given a default is ``off``. ValueError with the accepted spellings
    otherwise.
    """
    default: Mode | None = None
    named: dict[Category, Mode] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, sep, value = part.partition("=")
        try:
            if sep:
                named[Category(name.strip())] = Mode(value.strip())
            else:
                default = Mode(name)
        except ValueError:
            raise ValueError(
                f"{part!r} is not a mode ({', '.join(m.value for m in Mode)}) or CATEGORY=MODE with a "
                f"category of {', '.join(c.value for c in Category)}"
            ) from None
    return {c: named.get(c, default or Mode.OFF) for c in Category}


@dataclasses.dataclass(frozen=True)
class Guard:
    """One broker-owned field (or object) and the CEL that says a request leaves it alone.

    ``allowed`` is evaluated with ``object`` and ``oldObject`` of one of ``resources``
    (``group/plural`` or ``group/plural/subresource``) and must be true for the request to pass.
    """

    name: str
    fields: frozenset[str]
    category: Category
    resources: tuple[str, ...]
    operations: tuple[str, ...]
    allowed: str
    message: str
    message_expression: str = ""


STATEFULSETS = "apps/statefulsets"
STATEFULSET_SCALE = "apps/statefulsets/scale"
SERVICES = "/services"
SECRETS = "/secrets"
KAFKATOPICS = "kafka.strimzi.io/kafkatopics"
_CONTAINERS = "object.spec.template.spec.containers"
_OLD_CONTAINERS = "oldObject.spec.template.spec.containers"


def _same(path: str) -> str:
    """CEL: the field at ``path`` (below ``object`` and ``oldObject``) is equally present and equal."""
    parent, _, field = path.rpartition(".")
    new, old = f"object.{parent}" if parent else "object", f"oldObject.{parent}" if parent else "oldObject"
    return (
        f"(has({new}.{field}) == has({old}.{field}) && "
        f"(!has({new}.{field}) || {new}.{field} == {old}.{field}))"
    )


def _same_in_containers(field: str) -> str:
    """CEL: every container keeps ``field`` as it was in the container of the same name."""
    same = f"(has(c.{field}) == has(o.{field}) && (!has(c.{field}) || c.{field} == o.{field}))"
    return (
        f"size({_CONTAINERS}) == size({_OLD_CONTAINERS}) && "
        f"{_CONTAINERS}.all(c, {_OLD_CONTAINERS}.exists(o, o.name == c.name && {same}))"
    )


_LABEL_KEYS = sorted(naming.labels("x", model.ResourceType.DATABASE, "x"))
_KEEP_CHANGE = "change the desired state through the broker (Provision), or accept the drift (AcceptDrift)"

GUARDS: tuple[Guard, ...] = (
    Guard(
        name="replicas",
        fields=frozenset({"replicas"}),
        category=Category.SPEC,
        resources=(STATEFULSETS, STATEFULSET_SCALE, KAFKATOPICS),
        operations=("UPDATE",),
        allowed=_same("spec.replicas"),
        message=f"spec.replicas is owned by the resource broker: {_KEEP_CHANGE}",
        message_expression=(
            "'spec.replicas of ' + request.name + ' is owned by the resource broker (' + "
            "(has(oldObject.spec.replicas) ? string(oldObject.spec.replicas) : 'unset') + ' -> ' + "
            "(has(object.spec.replicas) ? string(object.spec.replicas) : 'unset') + '): "
            f"{_KEEP_CHANGE}'"
        ),
    ),
    Guard(
        name="image",
        fields=frozenset({"version", "engine"}),
        category=Category.SPEC,
        resources=(STATEFULSETS,),
        operations=("UPDATE",),
        allowed=_same_in_containers("image"),
        message=f"container images (engine and version) are owned by the resource broker: {_KEEP_CHANGE}",
    ),
    Guard(
        name="resources",
        fields=frozenset({"size"}),
        category=Category.SPEC,
        resources=(STATEFULSETS,),
        operations=("UPDATE",),
        allowed=_same_in_containers("resources"),
        message=f"container resources (the size tier) are owned by the resource broker: {_KEEP_CHANGE}",
    ),
    Guard(
        name="config",
        fields=frozenset({"config"}),
        category=Category.SPEC,
        resources=(STATEFULSETS,),
        operations=("UPDATE",),
        allowed=f"{_same_in_containers('env')} && {_same_in_containers('args')}",
        message=f"container env and args are owned by the resource broker: {_KEEP_CHANGE}",
    ),
    Guard(
        name="partitions",
        fields=frozenset({"partitions"}),
        category=Category.SPEC,
        resources=(KAFKATOPICS,),
        operations=("UPDATE",),
        allowed=_same("spec.partitions"),
        message=f"spec.partitions is owned by the resource broker: {_KEEP_CHANGE}",
    ),
    Guard(
        name="retention",
        fields=frozenset({"retention_ms"}),
        category=Category.SPEC,
        resources=(KAFKATOPICS,),
        operations=("UPDATE",),
        allowed=_same("spec.config"),
        message=f"spec.config (retention) is owned by the resource broker: {_KEEP_CHANGE}",
    ),
    Guard(
        name="labels",
        fields=frozenset({"labels"}),
        category=Category.LABELS,
        resources=(STATEFULSETS, SERVICES, SECRETS, KAFKATOPICS),
        operations=("UPDATE",),
        allowed=(
            f"{json.dumps(_LABEL_KEYS)}.all(k, (k in variables.newLabels) == (k in variables.oldLabels) && "
            "(!(k in variables.newLabels) || variables.newLabels[k] == variables.oldLabels[k]))"
        ),
        message="the labels " + ", ".join(_LABEL_KEYS) + " are owned by the resource broker: they are "
        "how it finds its objects",
    ),
    Guard(
        name="secret",
        fields=frozenset({"secret"}),
        category=Category.SECRET,
        resources=(SECRETS,),
        operations=("UPDATE",),
        allowed=_same("data"),
        message="the credentials Secret is generated by the resource broker and read by the workload; "
        "changing it by hand breaks one or the other",
    ),
    Guard(
        name="deletion",
        fields=frozenset({"statefulset", "service", "kafkatopic"}),
        category=Category.DELETION,
        resources=(STATEFULSETS, SERVICES, SECRETS, KAFKATOPICS),
        operations=("DELETE",),
        allowed="request.operation != 'DELETE'",
        message="objects of a broker deployment are deleted by the broker: Deprovision the deployment",
    ),
)


def covered_fields() -> frozenset[str]:
    """Every drift field some guard covers (a test compares it with ``drift.FIELDS``)."""
    return frozenset().union(*(g.fields for g in GUARDS))


# CEL shared by every policy ----------------------------------------------------------------------

_MANAGED = (
    f"(has(oldObject.metadata.labels) && '{naming.SELECTOR}' in oldObject.metadata.labels) || "
    "(has(request.subResource) && request.subResource == 'scale' && has(oldObject.status.selector) && "
    f"oldObject.status.selector.matches('(^|,){naming.SELECTOR.replace('.', '[.]')}='))"
)
_TYPE = (
    f"has(oldObject.metadata.labels) && '{naming.LABEL_TYPE}' in oldObject.metadata.labels ? "
    f"oldObject.metadata.labels['{naming.LABEL_TYPE}'] : ''"
)
_VARIABLES = [
    {"name": "resourceType", "expression": _TYPE},
    {
        "name": "oldLabels",
        "expression": "has(oldObject.metadata.labels) ? oldObject.metadata.labels : {}",
    },
    # Read only by UPDATE checks: on a DELETE (no object) it fails, and variables are lazy.
    {"name": "newLabels", "expression": "has(object.metadata.labels) ? object.metadata.labels : {}"},
]


def _exempt_users(prevention: Prevention) -> str:
    users = json.dumps([prevention.identity, *SYSTEM_USERS])
    groups = json.dumps(list(SYSTEM_GROUPS))
    return (
        f"!(request.userInfo.username in {users}) && "
        f"!(has(request.userInfo.groups) && request.userInfo.groups.exists(g, g in {groups}))"
    )


def _exempt(guard: Guard, rules: policy.Policy) -> dict[str, list[str]]:
    """Namespace (``*``: any other) -> the resource types where the remediation policy waives ``guard``.

    A rule waives it when it is ``off`` or ignores every field the guard covers. The type ``''``
    stands for a Scale, whose type is unknown: waived only where databases and caches both are.
    """
    namespaces = sorted({r.namespace for r in rules.rules if r.namespace != policy.ANY})
    out: dict[str, list[str]] = {}
    for namespace in [*namespaces, policy.ANY]:
        probe = namespace if namespace != policy.ANY else "\0other"
        waived = []
        for resource_type in model.ResourceType:
            rule = rules.rule_for(probe, resource_type)
            if rule.mode is policy.Mode.OFF or guard.fields <= rule.ignore_fields:
                waived.append(resource_type.value)
        if model.ResourceType.DATABASE.value in waived and model.ResourceType.CACHE.value in waived:
            waived.append("")
        out[namespace] = waived
    return out


def _waiver(guard: Guard, rules: policy.Policy) -> str:
    """CEL that is true where the remediation policy waives the guard (``false`` when it never does)."""
    exempt = _exempt(guard, rules)
    if not any(exempt.values()):
        return "false"
    others = exempt.pop(policy.ANY)
    table = json.dumps(exempt, sort_keys=True)
    return (
        f"variables.resourceType in (request.namespace in {table} ? "
        f"{table}[request.namespace] : {json.dumps(others)})"
    )


def _applies(guard: Guard) -> str:
    checks = []
    for resource in guard.resources:
        group, _, rest = resource.partition("/")
        plural, _, sub = rest.partition("/")
        check = f"request.resource.group == '{group}' && request.resource.resource == '{plural}'"
        check += f" && request.subResource == '{sub}'" if sub else " && !has(request.subResource)"
        checks.append(f"({check})")
    ops = " || ".join(f"request.operation == '{op}'" for op in guard.operations)
    return f"({ops}) && ({' || '.join(checks)})"


def _rules(guards: Iterable[Guard]) -> list[JsonDict]:
    by_group: dict[str, set[str]] = {}
    operations: set[str] = set()
    for guard in guards:
        operations.update(guard.operations)
        for resource in guard.resources:
            group, _, rest = resource.partition("/")
            by_group.setdefault(group, set()).add(rest)
    return [
        {
            "apiGroups": [group],
            "apiVersions": ["*"],
            "operations": sorted(operations),
            "resources": sorted(resources),
            "scope": "Namespaced",
        }
        for group, resources in sorted(by_group.items())
    ]


def policy_name(category: Category) -> str:
    """The name of a category's ValidatingAdmissionPolicy (and of its binding)."""
    return f"{NAME_PREFIX}-{category.value}"


def _labels() -> dict[str, str]:
    return {naming.LABEL_MANAGED_BY: naming.MANAGED_BY, "broker.platform/drift-prevention": "true"}


def category_objects(
    category: Category, mode: Mode, prevention: Prevention, rules: policy.Policy
) -> list[JsonDict]:
    """The policy and binding of one category (none when its mode is ``off``)."""
    if mode is Mode.OFF:
        return []
    guards = [g for g in GUARDS if g.category is category]
    validations = []
    for guard in guards:
        validation: JsonDict = {
            "expression": f"!({_applies(guard)}) || ({_waiver(guard, rules)}) || ({guard.allowed})",
            "message": guard.message,
            "reason": "Forbidden" if category is Category.DELETION else "Invalid",
        }
        if guard.message_expression:
            validation["messageExpression"] = guard.message_expression
        validations.append(validation)
    name = policy_name(category)
    vap: JsonDict = {
        "apiVersion": API_VERSION,
        "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": name, "labels": _labels()},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {"resourceRules": _rules(guards)},
            "matchConditions": [
                {"name": "not-the-broker-or-kubernetes", "expression": _exempt_users(prevention)},
                {"name": "managed-by-the-broker", "expression": _MANAGED},
            ],
            "variables": _VARIABLES,
            "validations": validations,
        },
    }
    binding: JsonDict = {
        "apiVersion": API_VERSION,
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": name, "labels": _labels()},
        "spec": {"policyName": name, "validationActions": ACTIONS[mode]},
    }
    return [vap, binding]


def objects(prevention: Prevention, rules: policy.Policy | None = None) -> list[JsonDict]:
    """Every policy and binding prevention asks for, in a stable order (policies before bindings)."""
    rules = rules if rules is not None else policy.Policy()
    out: list[JsonDict] = []
    for category in Category:
        out.extend(category_objects(category, prevention.mode(category), prevention, rules))
    return sorted(out, key=lambda o: (o["kind"] != "ValidatingAdmissionPolicy", o["metadata"]["name"]))


def retired(prevention: Prevention) -> list[tuple[str, str]]:
    """(kind, name) of the objects of categories that are off: what the broker removes when it applies."""
    out = []
    for category in Category:
        if prevention.mode(category) is Mode.OFF:
            out.append(("ValidatingAdmissionPolicyBinding", policy_name(category)))
            out.append(("ValidatingAdmissionPolicy", policy_name(category)))
    return out


assert covered_fields() <= drift.FIELDS, "a guard names a field the drift rules do not produce"

"""ValidatingAdmissionPolicy and ValidatingAdmissionPolicyBinding objects, parsed and validated.

:func:`parse_policy` and :func:`parse_binding` turn the stored objects
(``admissionregistration.k8s.io/v1``) into frozen values with their CEL expressions compiled, or
raise :class:`kube_sandbox.errors.Invalid` with kube-apiserver's field paths, which is also what a
client writing a policy with a broken expression gets (422, as from a real cluster). :func:`default_policy`
and :func:`default_binding` fill in what kube-apiserver defaults (``failurePolicy: Fail``,
``matchPolicy: Equivalent``, empty selectors, rule ``scope: "*"``).

Not supported: ``paramRef.selector`` across namespaces beyond what :mod:`.dispatcher` does, type
checking (``status.typeChecking``) and the ``authorizer`` variable.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from kube_sandbox import errors, selectors
from kube_sandbox.admission import cel

JsonDict = dict[str, Any]
Cause = tuple[str, str, str]

GROUP = "admissionregistration.k8s.io"
POLICY_KIND = "ValidatingAdmissionPolicy"
BINDING_KIND = "ValidatingAdmissionPolicyBinding"

OPERATIONS = frozenset({"CREATE", "UPDATE", "DELETE", "CONNECT", "*"})
ACTIONS = ("Deny", "Warn", "Audit")
REASONS = frozenset({"Unauthorized", "Forbidden", "Invalid", "RequestEntityTooLarge"})
_IDENTIFIER = re.compile(r"^[_a-zA-Z][_a-zA-Z0-9]*$")


@dataclasses.dataclass(frozen=True)
class Rule:
    """One ``resourceRules`` entry: which groups, versions, resources and operations it names."""

    api_groups: tuple[str, ...]
    api_versions: tuple[str, ...]
    resources: tuple[str, ...]
    operations: tuple[str, ...]
    scope: str = "*"
    resource_names: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class MatchResources:
    """``matchConstraints`` of a policy or ``matchResources`` of a binding."""

    namespace_selector: selectors.LabelSelector
    object_selector: selectors.LabelSelector
    resource_rules: tuple[Rule, ...]
    exclude_resource_rules: tuple[Rule, ...]
    match_policy: str = "Equivalent"


@dataclasses.dataclass(frozen=True)
class Validation:
    """One ``validations`` entry."""

    expression: cel.Program
    message: str
    message_expression: cel.Program | None
    reason: str


@dataclasses.dataclass(frozen=True)
class Named:
    """A named expression: a match condition, a variable or an audit annotation."""

    name: str
    program: cel.Program


@dataclasses.dataclass(frozen=True)
class ParamKind:
    """The kind a policy's ``params`` come from."""

    api_version: str
    kind: str


@dataclasses.dataclass(frozen=True)
class Policy:
    """A parsed ValidatingAdmissionPolicy."""

    name: str
    failure_policy: str
    match: MatchResources
    match_conditions: tuple[Named, ...]
    variables: tuple[Named, ...]
    validations: tuple[Validation, ...]
    audit_annotations: tuple[Named, ...]
    param_kind: ParamKind | None


@dataclasses.dataclass(frozen=True)
class ParamRef:
    """A binding's ``paramRef``."""

    name: str
    namespace: str
    selector: selectors.LabelSelector | None
    not_found_action: str


@dataclasses.dataclass(frozen=True)
class Binding:
    """A parsed ValidatingAdmissionPolicyBinding."""

    name: str
    policy_name: str
    validation_actions: tuple[str, ...]
    match: MatchResources | None
    param_ref: ParamRef | None


def _strings(value: Any) -> tuple[str, ...]:
    return tuple(str(v) for v in value) if isinstance(value, list) else ()


def _invalid(kind: str, name: str, causes: list[Cause]) -> errors.Invalid:
    return errors.Invalid.of(kind=kind, group=GROUP, name=name, causes=causes)


def _compile(text: Any, where: str, causes: list[Cause]) -> cel.Program | None:
    if not isinstance(text, str) or not text.strip():
        causes.append(("FieldValueRequired", where, "Required value: expression is not specified"))
        return None
    try:
        return cel.compile_expression(text)
    except cel.CompileError as exc:
        causes.append(("FieldValueInvalid", where, f"Invalid value: {text!r}: {exc}"))
        return None


def _selector(value: Any, where: str, causes: list[Cause]) -> selectors.LabelSelector:
    if value is None:
        return selectors.LabelSelector()
    if not isinstance(value, dict):
        causes.append(("FieldValueInvalid", where, "Invalid value: must be a label selector"))
        return selectors.LabelSelector()
    try:
        return selectors.from_label_selector_object(value)
    except errors.BadRequest as exc:
        causes.append(("FieldValueInvalid", where, exc.message))
        return selectors.LabelSelector()


def _rules(value: Any, where: str, causes: list[Cause], *, required: bool) -> tuple[Rule, ...]:
    if value is None or value == []:
        if required:
            causes.append(("FieldValueRequired", where, "Required value"))
        return ()
    if not isinstance(value, list):
        causes.append(("FieldValueInvalid", where, "Invalid value: must be a list"))
        return ()
    rules: list[Rule] = []
    for i, raw in enumerate(value):
        at = f"{where}[{i}]"
        if not isinstance(raw, dict):
            causes.append(("FieldValueInvalid", at, "Invalid value: must be an object"))
            continue
        for key in ("operations", "apiGroups", "apiVersions", "resources"):
            if not raw.get(key):
                causes.append(("FieldValueRequired", f"{at}.{key}", "Required value"))
        operations = _strings(raw.get("operations"))
        for op in operations:
            if op not in OPERATIONS:
                causes.append(
                    (
                        "FieldValueNotSupported",
                        f"{at}.operations",
                        f'Unsupported value: "{op}": supported values: "*", "CONNECT", "CREATE", '
                        '"DELETE", "UPDATE"',
                    )
                )
        scope = str(raw.get("scope") or "*")
        if scope not in ("*", "Cluster", "Namespaced"):
            causes.append(
                (
                    "FieldValueNotSupported",
                    f"{at}.scope",
                    f'Unsupported value: "{scope}": supported values: "*", "Cluster", "Namespaced"',
                )
            )
        rules.append(
            Rule(
                api_groups=_strings(raw.get("apiGroups")),
                api_versions=_strings(raw.get("apiVersions")),
                resources=_strings(raw.get("resources")),
                operations=operations,
                scope=scope,
                resource_names=_strings(raw.get("resourceNames")),
            )
        )
    return tuple(rules)


def _match(value: Any, where: str, causes: list[Cause], *, binding: bool) -> MatchResources:
    raw = value if isinstance(value, dict) else {}
    if not binding and not isinstance(value, dict):
        causes.append(("FieldValueRequired", where, "Required value"))
    policy = str(raw.get("matchPolicy") or "Equivalent")
    if policy not in ("Exact", "Equivalent"):
        causes.append(
            (
                "FieldValueNotSupported",
                f"{where}.matchPolicy",
                f'Unsupported value: "{policy}": supported values: "Equivalent", "Exact"',
            )
        )
    return MatchResources(
        namespace_selector=_selector(raw.get("namespaceSelector"), f"{where}.namespaceSelector", causes),
        object_selector=_selector(raw.get("objectSelector"), f"{where}.objectSelector", causes),
        resource_rules=_rules(
            raw.get("resourceRules"), f"{where}.resourceRules", causes, required=not binding
        ),
        exclude_resource_rules=_rules(
            raw.get("excludeResourceRules"), f"{where}.excludeResourceRules", causes, required=False
        ),
        match_policy=policy,
    )


def _named(value: Any, where: str, causes: list[Cause], *, key: str, expression: str) -> tuple[Named, ...]:
    out: list[Named] = []
    seen: set[str] = set()
    for i, raw in enumerate(value if isinstance(value, list) else []):
        at = f"{where}[{i}]"
        raw = raw if isinstance(raw, dict) else {}
        name = str(raw.get(key) or "")
        if not name:
            causes.append(("FieldValueRequired", f"{at}.{key}", "Required value"))
        elif name in seen:
            causes.append(("FieldValueDuplicate", f"{at}.{key}", f'Duplicate value: "{name}"'))
        elif key == "name" and where.endswith("variables") and not _IDENTIFIER.match(name):
            causes.append(
                (
                    "FieldValueInvalid",
                    f"{at}.name",
                    f'Invalid value: "{name}": must be a valid CEL identifier',
                )
            )
        seen.add(name)
        program = _compile(raw.get(expression), f"{at}.{expression}", causes)
        if name and program is not None:
            out.append(Named(name=name, program=program))
    return tuple(out)


def default_policy(obj: JsonDict) -> None:
    """Fill in kube-apiserver's defaults for a ValidatingAdmissionPolicy (in place)."""
    spec = obj.setdefault("spec", {})
    if not isinstance(spec, dict):
        return
    spec.setdefault("failurePolicy", "Fail")
    _default_match(spec.get("matchConstraints"))


def default_binding(obj: JsonDict) -> None:
    """Fill in kube-apiserver's defaults for a ValidatingAdmissionPolicyBinding (in place)."""
    spec = obj.setdefault("spec", {})
    if isinstance(spec, dict):
        _default_match(spec.get("matchResources"))
        ref = spec.get("paramRef")
        if isinstance(ref, dict) and ref.get("parameterNotFoundAction") is None:
            ref["parameterNotFoundAction"] = "Deny"


def _default_match(match: Any) -> None:
    if not isinstance(match, dict):
        return
    match.setdefault("matchPolicy", "Equivalent")
    match.setdefault("namespaceSelector", {})
    match.setdefault("objectSelector", {})
    for key in ("resourceRules", "excludeResourceRules"):
        for rule in match.get(key) or []:
            if isinstance(rule, dict):
                rule.setdefault("scope", "*")


def parse_policy(obj: JsonDict) -> Policy:
    """The policy an object describes; ``Invalid`` (with every offending field) when it is not valid."""
    name = str((obj.get("metadata") or {}).get("name", ""))
    spec = obj.get("spec")
    causes: list[Cause] = []
    if not isinstance(spec, dict):
        raise _invalid(POLICY_KIND, name, [("FieldValueRequired", "spec", "Required value")])
    failure = str(spec.get("failurePolicy") or "Fail")
    if failure not in ("Fail", "Ignore"):
        causes.append(
            (
                "FieldValueNotSupported",
                "spec.failurePolicy",
                f'Unsupported value: "{failure}": supported values: "Fail", "Ignore"',
            )
        )
    match = _match(spec.get("matchConstraints"), "spec.matchConstraints", causes, binding=False)
    validations: list[Validation] = []
    for i, raw in enumerate(spec.get("validations") or []):
        at = f"spec.validations[{i}]"
        raw = raw if isinstance(raw, dict) else {}
        program = _compile(raw.get("expression"), f"{at}.expression", causes)
        message_expression = None
        if raw.get("messageExpression"):
            message_expression = _compile(raw.get("messageExpression"), f"{at}.messageExpression", causes)
        message = str(raw.get("message") or "")
        if "\n" in message.strip():
            causes.append(
                ("FieldValueInvalid", f"{at}.message", "Invalid value: message must not contain line breaks")
            )
        reason = str(raw.get("reason") or "Invalid")
        if reason not in REASONS:
            causes.append(
                (
                    "FieldValueNotSupported",
                    f"{at}.reason",
                    f'Unsupported value: "{reason}": supported values: "Forbidden", "Invalid", '
                    '"RequestEntityTooLarge", "Unauthorized"',
                )
            )
        if program is not None:
            validations.append(
                Validation(
                    expression=program,
                    message=message,
                    message_expression=message_expression,
                    reason=reason,
                )
            )
    audit = _named(
        spec.get("auditAnnotations"), "spec.auditAnnotations", causes, key="key", expression="valueExpression"
    )
    if not spec.get("validations") and not spec.get("auditAnnotations"):
        causes.append(
            (
                "FieldValueRequired",
                "spec.validations",
                "Required value: validations or auditAnnotations must contain at least one item",
            )
        )
    param_kind = None
    raw_param = spec.get("paramKind")
    if isinstance(raw_param, dict):
        if not raw_param.get("apiVersion") or not raw_param.get("kind"):
            causes.append(("FieldValueRequired", "spec.paramKind", "Required value: apiVersion and kind"))
        param_kind = ParamKind(str(raw_param.get("apiVersion", "")), str(raw_param.get("kind", "")))
    policy = Policy(
        name=name,
        failure_policy=failure,
        match=match,
        match_conditions=_named(
            spec.get("matchConditions"), "spec.matchConditions", causes, key="name", expression="expression"
        ),
        variables=_named(
            spec.get("variables"), "spec.variables", causes, key="name", expression="expression"
        ),
        validations=tuple(validations),
        audit_annotations=audit,
        param_kind=param_kind,
    )
    if causes:
        raise _invalid(POLICY_KIND, name, causes)
    return policy


def parse_binding(obj: JsonDict) -> Binding:
    """The binding an object describes; ``Invalid`` when it is not valid."""
    name = str((obj.get("metadata") or {}).get("name", ""))
    spec = obj.get("spec")
    causes: list[Cause] = []
    if not isinstance(spec, dict):
        raise _invalid(BINDING_KIND, name, [("FieldValueRequired", "spec", "Required value")])
    policy_name = str(spec.get("policyName") or "")
    if not policy_name:
        causes.append(("FieldValueRequired", "spec.policyName", "Required value"))
    actions = _strings(spec.get("validationActions"))
    if not actions:
        causes.append(("FieldValueRequired", "spec.validationActions", "Required value"))
    for i, action in enumerate(actions):
        if action not in ACTIONS:
            causes.append(
                (
                    "FieldValueNotSupported",
                    f"spec.validationActions[{i}]",
                    f'Unsupported value: "{action}": supported values: "Audit", "Deny", "Warn"',
                )
            )
        if action in actions[:i]:
            causes.append(
                ("FieldValueDuplicate", f"spec.validationActions[{i}]", f'Duplicate value: "{action}"')
            )
    if "Deny" in actions and "Warn" in actions:
        causes.append(
            (
                "FieldValueInvalid",
                "spec.validationActions",
                f"Invalid value: {list(actions)!r}: must not contain both Deny and Warn (repeating the same "
                "validation failure information in the API response and headers serves no purpose)",
            )
        )
    match = None
    if spec.get("matchResources") is not None:
        match = _match(spec.get("matchResources"), "spec.matchResources", causes, binding=True)
    param_ref = None
    raw_ref = spec.get("paramRef")
    if isinstance(raw_ref, dict):
        selector = None
        if raw_ref.get("selector") is not None:
            selector = _selector(raw_ref.get("selector"), "spec.paramRef.selector", causes)
        if bool(raw_ref.get("name")) == (selector is not None):
            causes.append(
                (
                    "FieldValueForbidden",
                    "spec.paramRef",
                    "Forbidden: exactly one of name or selector must be set",
                )
            )
        action = str(raw_ref.get("parameterNotFoundAction") or "Deny")
        if action not in ("Allow", "Deny"):
            causes.append(
                (
                    "FieldValueNotSupported",
                    "spec.paramRef.parameterNotFoundAction",
                    f'Unsupported value: "{action}": supported values: "Allow", "Deny"',
                )
            )
        param_ref = ParamRef(
            name=str(raw_ref.get("name") or ""),
            namespace=str(raw_ref.get("namespace") or ""),
            selector=selector,
            not_found_action=action,
        )
    if causes:
        raise _invalid(BINDING_KIND, name, causes)
    return Binding(
        name=name, policy_name=policy_name, validation_actions=actions, match=match, param_ref=param_ref
    )

"""Evaluating a request against every ValidatingAdmissionPolicy and its bindings.

The order and the outcomes are kube-apiserver's (``validating/dispatcher.go``, ``validator.go``):

1. A policy whose ``matchConstraints`` match the request is evaluated once per binding whose
   ``matchResources`` (if any) match too, and once per parameter object (``paramKind``).
2. ``matchConditions`` run first: any ``false`` means the policy does not apply; an error (with
   no ``false``) denies under ``failurePolicy: Fail`` and skips the policy under ``Ignore``.
3. ``variables`` are computed in order; one that fails fails only the expressions reading it.
4. Each validation that is not ``true`` is a failure with ``messageExpression``'s string (trimmed;
   one line, at most 5000 bytes), else ``message``, else ``failed expression: EXPR``; its
   ``reason`` (default ``Invalid``) sets the status code. An expression that fails to evaluate is
   a failure with the error as its message under ``Fail`` and is ignored under ``Ignore``.
5. A failure does what the binding's ``validationActions`` say: ``Deny`` refuses the request,
   ``Warn`` adds an HTTP ``Warning`` header (kubectl prints it), ``Audit`` records the
   ``validation.policy.admission.k8s.io/validation_failure`` annotation in the audit log;
   ``auditAnnotations`` add ``POLICY/KEY`` annotations there.
6. The first denial becomes the error, in kube-apiserver's words:
   ``RESOURCE "NAME" is forbidden: ValidatingAdmissionPolicy 'P' with binding 'B' denied request: MSG``,
   status 422 ``Invalid`` unless the validation named another reason, with the message as a cause
   (which kubectl prints as ``The RESOURCE "NAME" is invalid: : ValidatingAdmissionPolicy ...``).
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import json
import logging
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from kube_sandbox import errors
from kube_sandbox.admission import cel, matching, policies

if TYPE_CHECKING:
    from kube_sandbox import store as store_module

log = logging.getLogger(__name__)

JsonDict = dict[str, Any]

POLICY_KEY = (policies.GROUP, "validatingadmissionpolicies")
BINDING_KEY = (policies.GROUP, "validatingadmissionpolicybindings")
NAMESPACE_KEY = ("", "namespaces")

VALIDATION_FAILURE_ANNOTATION = "validation.policy.admission.k8s.io/validation_failure"
MAX_MESSAGE_BYTES = 5000
MAX_AUDIT_VALUE = 10 * 1024
_CODES = {"Unauthorized": 401, "Forbidden": 403, "RequestEntityTooLarge": 413, "Invalid": 422}
_VERBS = {"CREATE": "create", "UPDATE": "update", "DELETE": "delete", "CONNECT": "connect"}


class ConfigurationError(Exception):
    """A binding cannot be evaluated (its parameters are missing, say): handled by the failure policy."""


@dataclasses.dataclass(frozen=True)
class Decision:
    """One validation that did not pass (or an error treated as one)."""

    message: str
    reason: str = ""
    index: int = 0


@dataclasses.dataclass(frozen=True)
class _Denial:
    policy: str
    binding: str | None
    decision: Decision


@dataclasses.dataclass
class Review:
    """What admitting one request produced besides a refusal: warnings for the response headers."""

    warnings: list[str] = dataclasses.field(default_factory=list)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _name_of(obj: JsonDict | None) -> str:
    meta = (obj or {}).get("metadata") or {}
    return str(meta.get("name") or meta.get("generateName") or "")


class AuditLog:
    """Audit events (``audit.k8s.io/v1``) of requests that policies annotated, newest last, bounded."""

    def __init__(self, limit: int = 1000) -> None:
        self._events: collections.deque[JsonDict] = collections.deque(maxlen=limit)

    def record(self, attrs: matching.Attributes, annotations: dict[str, str], *, denied: int | None) -> None:
        """Keep one event (and log it, for people reading the sandbox's log)."""
        ref: JsonDict = {"resource": attrs.resource, "apiVersion": attrs.version}
        if attrs.group:
            ref["apiGroup"] = attrs.group
        if attrs.namespace:
            ref["namespace"] = attrs.namespace
        if attrs.name:
            ref["name"] = attrs.name
        if attrs.subresource:
            ref["subresource"] = attrs.subresource
        event: JsonDict = {
            "kind": "Event",
            "apiVersion": "audit.k8s.io/v1",
            "level": "Metadata",
            "auditID": str(uuid.uuid4()),
            "stage": "ResponseComplete",
            "verb": attrs.verb or _VERBS.get(attrs.operation, attrs.operation.lower()),
            "user": attrs.user.info(),
            "objectRef": ref,
            "requestReceivedTimestamp": _now(),
            "annotations": dict(annotations),
        }
        if denied is not None:
            event["responseStatus"] = {"code": denied}
        self._events.append(event)
        log.info("audit: %s %s by %s: %s", event["verb"], ref, attrs.user.username, json.dumps(annotations))

    def events(self) -> list[JsonDict]:
        """Every kept event, oldest first."""
        return list(self._events)

    def clear(self) -> None:
        """Forget every event."""
        self._events.clear()


class Admission:
    """The ValidatingAdmissionPolicy plugin of one sandbox, reading policies from its store."""

    def __init__(self, st: store_module.Store, *, audit: AuditLog | None = None) -> None:
        self._store = st
        self.audit = audit or AuditLog()
        self._parsed: dict[str, tuple[str, Any]] = {}

    # ----- policies and bindings -----------------------------------------------------------------

    def _parse(self, obj: JsonDict, parse: Callable[[JsonDict], Any]) -> Any:
        meta = obj["metadata"]
        uid, version = str(meta.get("uid")), str(meta.get("resourceVersion"))
        cached = self._parsed.get(uid)
        if cached is not None and cached[0] == version:
            return cached[1]
        try:
            parsed: Any = parse(obj)
        except errors.Invalid as exc:
            parsed = exc
        if len(self._parsed) > 10_000:
            self._parsed.clear()
        self._parsed[uid] = (version, parsed)
        return parsed

    def _served(self, group: str, version: str, resource: str) -> bool:
        return self._store.registry.lookup(group=group, version=version, plural=resource) is not None

    def _hooks(self) -> list[tuple[JsonDict, list[JsonDict]]]:
        bindings: dict[str, list[JsonDict]] = {}
        for b in self._store.objects(BINDING_KEY):
            bindings.setdefault(str((b.get("spec") or {}).get("policyName", "")), []).append(b)
        if not bindings:
            return []
        out = []
        for p in sorted(self._store.objects(POLICY_KEY), key=lambda o: str(o["metadata"]["name"])):
            bound = bindings.get(str(p["metadata"]["name"]))
            if bound:
                out.append((p, sorted(bound, key=lambda o: str(o["metadata"]["name"]))))
        return out

    # ----- the request ---------------------------------------------------------------------------

    def validate(
        self, attrs: matching.Attributes, obj: JsonDict | None, old: JsonDict | None, review: Review
    ) -> None:
        """Admit the request or raise ``AdmissionDenied``; warnings go to ``review``."""
        hooks = self._hooks()
        if not hooks:
            return
        denied: list[_Denial] = []
        annotations: dict[str, str] = {}
        namespace = self._namespace(attrs)
        ns_labels = ((namespace or {}).get("metadata") or {}).get("labels") or {}
        uid = str(uuid.uuid4())
        for policy_obj, binding_objs in hooks:
            policy = self._parse(policy_obj, policies.parse_policy)
            if isinstance(policy, errors.Invalid):
                log.warning("ValidatingAdmissionPolicy %s is invalid and ignored: %s", policy_obj, policy)
                continue

            def applies(match: policies.MatchResources, *, binding: bool) -> bool:
                return matching.matches(
                    match,
                    attrs,
                    obj=obj,
                    old=old,
                    namespace_labels=ns_labels,
                    served=self._served,
                    binding=binding,
                )

            if not applies(policy.match, binding=False):
                continue
            collected: dict[str, list[str]] = {}
            for binding_obj in binding_objs:
                binding = self._parse(binding_obj, policies.parse_binding)
                name = str(binding_obj["metadata"]["name"])
                if isinstance(binding, errors.Invalid):
                    if policy.failure_policy == "Fail":
                        message = f"failed to configure binding: {binding.message}"
                        denied.append(_Denial(policy.name, name, Decision(message)))
                    continue
                if binding.match is not None and not applies(binding.match, binding=True):
                    continue
                try:
                    params = self._params(policy, binding, attrs)
                except ConfigurationError as exc:
                    if policy.failure_policy == "Fail":
                        denied.append(
                            _Denial(policy.name, name, Decision(f"failed to configure binding: {exc}"))
                        )
                    continue
                for param in params:
                    decisions, published = self._evaluate(
                        policy, attrs, obj=obj, old=old, param=param, namespace=namespace, uid=uid
                    )
                    for key, value in published:
                        if value not in collected.setdefault(key, []):
                            collected[key].append(value)
                    for decision in decisions:
                        self._act(policy, binding, decision, review, denied, annotations)
            for key, values in collected.items():
                annotations[f"{policy.name}/{key}"] = ", ".join(values)
        code = None
        if denied:
            first = denied[0]
            reason = first.decision.reason or "Invalid"
            code = _CODES.get(reason, 422)
        if annotations:
            self.audit.record(attrs, annotations, denied=code)
        if denied:
            raise self._error(attrs, obj, old, denied[0], code or 422)

    def _act(
        self,
        policy: policies.Policy,
        binding: policies.Binding,
        decision: Decision,
        review: Review,
        denied: list[_Denial],
        annotations: dict[str, str],
    ) -> None:
        for action in binding.validation_actions:
            if action == "Deny":
                denied.append(_Denial(policy.name, binding.name, decision))
            elif action == "Warn":
                review.warnings.append(
                    f"Validation failed for ValidatingAdmissionPolicy '{policy.name}' with binding "
                    f"'{binding.name}': {decision.message}"
                )
            elif action == "Audit":
                failure = {
                    "message": decision.message,
                    "policy": policy.name,
                    "binding": binding.name,
                    "expressionIndex": decision.index,
                    "validationActions": list(binding.validation_actions),
                }
                annotations[VALIDATION_FAILURE_ANNOTATION] = json.dumps([failure], separators=(",", ":"))

    def _error(
        self,
        attrs: matching.Attributes,
        obj: JsonDict | None,
        old: JsonDict | None,
        denial: _Denial,
        code: int,
    ) -> errors.AdmissionDenied:
        if denial.binding is not None:
            message = (
                f"ValidatingAdmissionPolicy '{denial.policy}' with binding '{denial.binding}' "
                f"denied request: {denial.decision.message}"
            )
        else:
            message = f"ValidatingAdmissionPolicy '{denial.policy}' denied request: {denial.decision.message}"
        name = _name_of(obj) or attrs.name or _name_of(old) or "Unknown"
        qualified = errors.qualified(group=attrs.group, plural=attrs.resource)
        details: JsonDict = {"name": name, "kind": attrs.resource, "causes": [{"message": message}]}
        if attrs.group:
            details["group"] = attrs.group
        return errors.AdmissionDenied(
            f'{qualified} "{name}" is forbidden: {message}',
            reason=denial.decision.reason or "Invalid",
            code=code,
            details=details,
        )

    def _namespace(self, attrs: matching.Attributes) -> JsonDict | None:
        if not attrs.namespace or (attrs.group == "" and attrs.resource == "namespaces"):
            return None
        found = self._store.find(NAMESPACE_KEY, "", attrs.namespace)
        if found is None:
            return None
        meta = found.get("metadata") or {}
        keep = (
            "name",
            "generateName",
            "namespace",
            "labels",
            "annotations",
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
        )
        return {
            "metadata": {k: meta[k] for k in keep if k in meta},
            "spec": found.get("spec") or {},
            "status": found.get("status") or {},
        }

    def _params(
        self, policy: policies.Policy, binding: policies.Binding, attrs: matching.Attributes
    ) -> list[JsonDict | None]:
        kind = policy.param_kind
        if kind is None:
            return [None]
        ref = binding.param_ref
        if ref is None:
            raise ConfigurationError(
                f"policy {policy.name} has paramKind set but binding {binding.name} has no paramRef"
            )
        rt = self._store.registry.by_kind(api_version=kind.api_version, kind=kind.kind)
        if rt is None:
            raise ConfigurationError(
                f"failed to find resource referenced by paramKind: '{kind.api_version}, Kind={kind.kind}'"
            )
        namespace = ref.namespace or (attrs.namespace if rt.namespaced else "")
        if rt.namespaced and not namespace:
            raise ConfigurationError(
                "cannot use namespaced paramRef in policy binding that matches cluster-scoped resources"
            )
        found: list[JsonDict]
        if ref.name:
            one = self._store.find(rt.storage_key, namespace if rt.namespaced else "", ref.name)
            found = [one] if one is not None else []
        else:
            selector = ref.selector
            found = [
                o
                for o in self._store.objects(rt.storage_key, namespace if rt.namespaced else None)
                if selector is None or selector.matches((o.get("metadata") or {}).get("labels") or {})
            ]
        if not found:
            if ref.not_found_action == "Deny":
                raise ConfigurationError(
                    "no params found for policy binding with `Deny` parameterNotFoundAction"
                )
            return []
        return list(found)

    def _evaluate(
        self,
        policy: policies.Policy,
        attrs: matching.Attributes,
        *,
        obj: JsonDict | None,
        old: JsonDict | None,
        param: JsonDict | None,
        namespace: JsonDict | None,
        uid: str,
    ) -> tuple[list[Decision], list[tuple[str, str]]]:
        fail = policy.failure_policy == "Fail"
        activation: dict[str, Any] = {
            "object": cel.value(obj),
            "oldObject": cel.value(old),
            "request": cel.value(attrs.request(uid)),
            "params": cel.value(param),
            "namespaceObject": cel.value(namespace),
            "variables": cel.lazy_map({}),
        }
        condition_errors: list[str] = []
        for condition in policy.match_conditions:
            try:
                result = condition.program.evaluate_raw(activation)
            except cel.EvaluationError as exc:
                condition_errors.append(f"expression '{condition.program.text}' resulted in error: {exc}")
                continue
            if not cel.is_bool(result):
                condition_errors.append(
                    f"expression '{condition.program.text}' must evaluate to bool, "
                    f"not {cel.type_name(result)}"
                )
            elif not result:
                return [], []
        if condition_errors:
            return ([Decision("; ".join(condition_errors))] if fail else []), []
        computed: dict[str, Any] = {}
        for variable in policy.variables:
            activation["variables"] = cel.lazy_map(computed)
            try:
                computed[variable.name] = variable.program.evaluate_raw(activation)
            except cel.EvaluationError as exc:
                computed[variable.name] = cel.EvaluationError(
                    f"variable '{variable.name}' expression '{variable.program.text}' "
                    f"resulted in error: {exc}"
                )
        activation["variables"] = cel.lazy_map(computed)
        decisions = [
            d
            for i, validation in enumerate(policy.validations)
            if (d := _validate(validation, i, activation, fail=fail)) is not None
        ]
        published: list[tuple[str, str]] = []
        for annotation in policy.audit_annotations:
            text = annotation.program.text
            try:
                result = annotation.program.evaluate_raw(activation)
            except cel.EvaluationError as exc:
                if fail:
                    decisions.append(Decision(f"expression '{text}' resulted in error: {exc}"))
                continue
            if result is None:
                continue
            if not cel.is_string(result):
                if fail:
                    decisions.append(
                        Decision(
                            f"valueExpression '{text}' resulted in unsupported return type: "
                            f"{cel.type_name(result)}. Return type must be either string or null."
                        )
                    )
                continue
            value = str(result).strip()
            if value:
                published.append((annotation.name, value[:MAX_AUDIT_VALUE]))
        return decisions, published


def _validate(
    validation: policies.Validation, index: int, activation: dict[str, Any], *, fail: bool
) -> Decision | None:
    text = validation.expression.text
    try:
        result = validation.expression.evaluate_raw(activation)
    except cel.EvaluationError as exc:
        return Decision(f"expression '{text}' resulted in error: {exc}", index=index) if fail else None
    if not cel.is_bool(result):
        if not fail:
            return None
        return Decision(
            f"expression '{text}' must evaluate to bool, not {cel.type_name(result)}", index=index
        )
    if result:
        return None
    message = ""
    if validation.message_expression is not None:
        try:
            produced = validation.message_expression.evaluate_raw(activation)
        except cel.EvaluationError as exc:
            log.info("messageExpression %r failed: %s", validation.message_expression.text, exc)
        else:
            if cel.is_string(produced):
                candidate = str(produced).strip()
                if "\n" not in candidate and len(candidate.encode()) <= MAX_MESSAGE_BYTES:
                    message = candidate
    if not message:
        message = validation.message.strip()
    if not message:
        message = f"failed expression: {text.strip()}"
    return Decision(message, reason=validation.reason, index=index)


def run(
    admission: Admission | None,
    attrs: matching.Attributes,
    review: Review,
) -> Callable[[JsonDict | None, JsonDict | None], None]:
    """The store's admission hook for one request: ``(object, oldObject)`` in, a refusal raised."""

    def admit(obj: JsonDict | None, old: JsonDict | None) -> None:
        if admission is not None:
            admission.validate(attrs, obj, old, review)

    return admit

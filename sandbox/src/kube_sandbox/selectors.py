"""Label and field selectors with kube-apiserver's grammar and matching rules.

Label selectors accept the equality (``=``, ``==``, ``!=``) and set-based (``in``, ``notin``,
``key``, ``!key``) forms plus ``<``/``>`` on integers, comma-separated (logical AND). As in
Kubernetes, ``!=`` and ``notin`` also match objects that lack the key. Field selectors support
``=``, ``==`` and ``!=`` on the fields each kind declares (``metadata.name``, ``metadata.namespace``
everywhere, ``status.phase`` for pods, ...); an unsupported field is a 400, as in Kubernetes.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

from kube_sandbox import errors

JsonDict = dict[str, Any]

_TOKEN = re.compile(r"\s*(!=|==|=|!|\(|\)|,|<|>|[^\s!=(),<>]+)")
_SET_OPS = {"in", "notin"}


@dataclasses.dataclass(frozen=True)
class Requirement:
    """One clause of a label selector: ``key op values``."""

    key: str
    op: str
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        """Say whether a label set satisfies this clause."""
        present = self.key in labels
        value = labels.get(self.key)
        if self.op in ("=", "==", "in"):
            return present and value in self.values
        if self.op in ("!=", "notin"):
            return not present or value not in self.values
        if self.op == "exists":
            return present
        if self.op == "!":
            return not present
        if not present or value is None:
            return False
        try:
            number = int(value)
        except ValueError:
            return False
        bound = int(self.values[0])
        return number > bound if self.op == ">" else number < bound


@dataclasses.dataclass(frozen=True)
class LabelSelector:
    """A parsed label selector; the empty selector matches everything."""

    requirements: tuple[Requirement, ...] = ()

    def matches(self, labels: Mapping[str, str] | None) -> bool:
        """Say whether every clause holds for the labels."""
        if not self.requirements:
            return True
        found = labels or {}
        return all(req.matches(found) for req in self.requirements)

    @property
    def empty(self) -> bool:
        """True when the selector selects everything."""
        return not self.requirements


def _tokens(text: str) -> list[str]:
    out: list[str] = []
    pos = 0
    text = text.strip()
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:
            raise errors.BadRequest(f"unable to parse requirement: invalid label selector {text!r}")
        out.append(match.group(1))
        pos = match.end()
        while pos < len(text) and text[pos].isspace():
            pos += 1
    return out


def _bad(text: str, why: str) -> errors.BadRequest:
    return errors.BadRequest(f"unable to parse requirement: {why} in label selector {text!r}")


def parse_labels(text: str | None) -> LabelSelector:
    """Parse a label selector string as the ``labelSelector`` query parameter carries it."""
    if not text or not text.strip():
        return LabelSelector()
    tokens = _tokens(text)
    reqs: list[Requirement] = []
    i = 0

    def take() -> str:
        nonlocal i
        if i >= len(tokens):
            raise _bad(text, "unexpected end")
        tok = tokens[i]
        i += 1
        return tok

    while i < len(tokens):
        tok = take()
        if tok == "!":
            reqs.append(Requirement(take(), "!"))
        elif tok in {",", "(", ")", "=", "==", "!=", "<", ">"}:
            raise _bad(text, f"unexpected {tok!r}")
        else:
            key = tok
            nxt = tokens[i] if i < len(tokens) else ","
            if nxt == ",":
                reqs.append(Requirement(key, "exists"))
            elif nxt in ("=", "==", "!="):
                i += 1
                value = "" if i >= len(tokens) or tokens[i] == "," else take()
                reqs.append(Requirement(key, nxt, (value,)))
            elif nxt in ("<", ">"):
                i += 1
                value = take()
                if not value.lstrip("-").isdigit():
                    raise _bad(text, f"{value!r} is not an integer")
                reqs.append(Requirement(key, nxt, (value,)))
            elif nxt in _SET_OPS:
                i += 1
                if take() != "(":
                    raise _bad(text, "expected '('")
                values: list[str] = []
                while True:
                    item = take()
                    if item == ")":
                        break
                    if item == ",":
                        continue
                    values.append(item)
                reqs.append(Requirement(key, nxt, tuple(values)))
            else:
                raise _bad(text, f"unexpected {nxt!r} after {key!r}")
        if i < len(tokens):
            if tokens[i] != ",":
                raise _bad(text, f"expected ',' but found {tokens[i]!r}")
            i += 1
    return LabelSelector(tuple(reqs))


def from_label_selector_object(selector: JsonDict | None) -> LabelSelector:
    """Turn a ``metav1.LabelSelector`` (matchLabels/matchExpressions) into a matcher."""
    if not selector:
        return LabelSelector()
    reqs = [Requirement(k, "=", (str(v),)) for k, v in sorted((selector.get("matchLabels") or {}).items())]
    ops = {"In": "in", "NotIn": "notin", "Exists": "exists", "DoesNotExist": "!"}
    for expr in selector.get("matchExpressions") or []:
        op = ops.get(str(expr.get("operator")))
        if op is None:
            raise errors.BadRequest(f"{expr.get('operator')!r} is not a valid label selector operator")
        reqs.append(Requirement(str(expr.get("key")), op, tuple(str(v) for v in expr.get("values") or ())))
    return LabelSelector(tuple(reqs))


def to_string(selector: JsonDict | None) -> str:
    """Render a ``metav1.LabelSelector`` as the string the ``scale`` subresource reports."""
    parts: list[str] = []
    for req in from_label_selector_object(selector).requirements:
        if req.op == "=":
            parts.append(f"{req.key}={req.values[0]}")
        elif req.op in _SET_OPS:
            parts.append(f"{req.key} {req.op} ({','.join(sorted(req.values))})")
        elif req.op == "exists":
            parts.append(req.key)
        else:
            parts.append(f"!{req.key}")
    return ",".join(parts)


FieldGetter = Callable[[JsonDict], str]


def _path(*keys: str) -> FieldGetter:
    def get(obj: JsonDict) -> str:
        node: Any = obj
        for key in keys:
            if not isinstance(node, dict):
                return ""
            node = node.get(key)
        if node is None:
            return ""
        if isinstance(node, bool):
            return "true" if node else "false"
        return str(node)

    return get


_COMMON_FIELDS: dict[str, FieldGetter] = {
    "metadata.name": _path("metadata", "name"),
    "metadata.namespace": _path("metadata", "namespace"),
}

_KIND_FIELDS: dict[str, dict[str, FieldGetter]] = {
    "Pod": {
        "status.phase": _path("status", "phase"),
        "spec.nodeName": _path("spec", "nodeName"),
        "spec.restartPolicy": _path("spec", "restartPolicy"),
        "spec.schedulerName": _path("spec", "schedulerName"),
        "spec.serviceAccountName": _path("spec", "serviceAccountName"),
        "status.podIP": _path("status", "podIP"),
        "status.nominatedNodeName": _path("status", "nominatedNodeName"),
    },
    "Secret": {"type": _path("type")},
    "Namespace": {"status.phase": _path("status", "phase")},
    "Event": {
        "involvedObject.kind": _path("involvedObject", "kind"),
        "involvedObject.namespace": _path("involvedObject", "namespace"),
        "involvedObject.name": _path("involvedObject", "name"),
        "involvedObject.uid": _path("involvedObject", "uid"),
        "involvedObject.apiVersion": _path("involvedObject", "apiVersion"),
        "involvedObject.resourceVersion": _path("involvedObject", "resourceVersion"),
        "involvedObject.fieldPath": _path("involvedObject", "fieldPath"),
        "reason": _path("reason"),
        "reportingComponent": _path("reportingComponent"),
        "source": _path("source", "component"),
        "type": _path("type"),
    },
    "StatefulSet": {"status.successful": _path("status", "successful")},
}


@dataclasses.dataclass(frozen=True)
class FieldRequirement:
    """One clause of a field selector."""

    field: str
    value: str
    negate: bool
    getter: FieldGetter = dataclasses.field(compare=False)

    def matches(self, obj: JsonDict) -> bool:
        """Say whether the object's field satisfies the clause."""
        return (self.getter(obj) == self.value) != self.negate


@dataclasses.dataclass(frozen=True)
class FieldSelector:
    """A parsed field selector; the empty selector matches everything."""

    requirements: tuple[FieldRequirement, ...] = ()

    def matches(self, obj: JsonDict) -> bool:
        """Say whether every clause holds for the object."""
        return all(req.matches(obj) for req in self.requirements)

    @property
    def empty(self) -> bool:
        """True when the selector selects everything."""
        return not self.requirements

    def exact(self, field: str) -> str | None:
        """The value a clause pins ``field`` to, so lookups by name skip the scan."""
        for req in self.requirements:
            if req.field == field and not req.negate:
                return req.value
        return None


def parse_fields(text: str | None, *, kind: str) -> FieldSelector:
    """Parse a ``fieldSelector`` for ``kind``; unknown fields are refused like kube-apiserver does."""
    if not text or not text.strip():
        return FieldSelector()
    allowed = {**_COMMON_FIELDS, **_KIND_FIELDS.get(kind, {})}
    reqs: list[FieldRequirement] = []
    for clause in text.split(","):
        clause = clause.strip()
        if not clause:
            continue
        for op in ("!=", "==", "="):
            if op in clause:
                field, value = clause.split(op, 1)
                break
        else:
            raise errors.BadRequest(f"invalid selector: '{text}'; can't understand '{clause}'")
        field = field.strip()
        getter = allowed.get(field)
        if getter is None:
            raise errors.BadRequest(f"field label not supported: {field}")
        reqs.append(FieldRequirement(field, value.strip(), op == "!=", getter))
    return FieldSelector(tuple(reqs))

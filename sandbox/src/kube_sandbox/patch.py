"""The three classic patch formats: JSON merge patch, JSON patch and strategic merge patch.

Strategic merge patch is Kubernetes' own format: lists of objects are merged by a per-field key
(containers by ``name``, ports by ``containerPort``/``port``, ...) instead of being replaced, and
directives (``$patch: delete|replace|merge``, ``$setElementOrder/<field>``, ``$retainKeys``,
``$deleteFromPrimitiveList/<field>``) refine it. Real Kubernetes reads the merge keys from the Go
types; the sandbox knows them by field name for the fields brokers and kubectl use (see
:data:`MERGE_KEYS`); any other list is replaced, which is what Kubernetes does for lists without a
merge key. All functions return new objects and leave their inputs alone.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from kube_sandbox import errors

JsonDict = dict[str, Any]

MERGE_KEYS: dict[str, tuple[str, ...]] = {
    "containers": ("name",),
    "initContainers": ("name",),
    "ephemeralContainers": ("name",),
    "env": ("name",),
    "volumeMounts": ("mountPath",),
    "volumeDevices": ("devicePath",),
    "volumes": ("name",),
    "imagePullSecrets": ("name",),
    "ownerReferences": ("uid",),
    "conditions": ("type",),
    "hostAliases": ("ip",),
    "topologySpreadConstraints": ("topologyKey", "whenUnsatisfiable"),
    "resourceClaims": ("name",),
    "containerStatuses": ("name",),
    "initContainerStatuses": ("name",),
}
"""Merge keys by field name; ``ports`` is resolved by its items (containerPort vs port)."""

SET_LISTS = frozenset({"finalizers"})
"""Lists of scalars that strategic merge patch unions instead of replacing."""


def merge_keys(field: str, items: list[Any]) -> tuple[str, ...] | None:
    """The merge key of a list field, or None for lists that are replaced as a whole."""
    if field == "ports":
        if any(isinstance(item, dict) and "containerPort" in item for item in items):
            return ("containerPort",)
        return ("port",)
    return MERGE_KEYS.get(field)


def merge_patch(target: Any, patch: Any) -> Any:
    """Apply an RFC 7386 JSON merge patch: objects merge, ``null`` deletes, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result: JsonDict = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise errors.Invalid(f"the JSON pointer {path!r} must start with '/'")
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def _index(container: list[Any], token: str, *, allow_end: bool) -> int:
    if token == "-" and allow_end:  # noqa: S105 - JSON pointer syntax for "past the end".
        return len(container)
    if not token.isdigit():
        raise errors.Invalid(f"invalid array index {token!r}")
    index = int(token)
    limit = len(container) if allow_end else len(container) - 1
    if index > limit:
        raise errors.Invalid(f"array index {index} out of bounds")
    return index


def _walk(doc: Any, tokens: list[str]) -> Any:
    node = doc
    for token in tokens:
        if isinstance(node, dict):
            if token not in node:
                raise errors.Invalid(f"missing path: {'/' + '/'.join(tokens)}")
            node = node[token]
        elif isinstance(node, list):
            node = node[_index(node, token, allow_end=False)]
        else:
            raise errors.Invalid(f"missing path: {'/' + '/'.join(tokens)}")
    return node


def _add(doc: Any, tokens: list[str], value: Any) -> Any:
    if not tokens:
        return value
    parent = _walk(doc, tokens[:-1])
    last = tokens[-1]
    if isinstance(parent, dict):
        parent[last] = value
    elif isinstance(parent, list):
        parent.insert(_index(parent, last, allow_end=True), value)
    else:
        raise errors.Invalid(f"cannot add at {'/' + '/'.join(tokens)}")
    return doc


def _remove(doc: Any, tokens: list[str]) -> Any:
    if not tokens:
        raise errors.Invalid("cannot remove the document root")
    parent = _walk(doc, tokens[:-1])
    last = tokens[-1]
    if isinstance(parent, dict):
        if last not in parent:
            raise errors.Invalid(f"unable to remove nonexistent key: {last}: missing value")
        return parent.pop(last)
    if isinstance(parent, list):
        return parent.pop(_index(parent, last, allow_end=False))
    raise errors.Invalid(f"cannot remove at {'/' + '/'.join(tokens)}")


def json_patch(target: Any, operations: Any) -> Any:
    """Apply an RFC 6902 JSON patch (add, remove, replace, move, copy, test)."""
    if not isinstance(operations, list):
        raise errors.BadRequest("a JSON patch must be a list of operations")
    doc = copy.deepcopy(target)
    for op in operations:
        if not isinstance(op, dict) or "op" not in op or "path" not in op:
            raise errors.BadRequest(f"invalid JSON patch operation: {op!r}")
        kind = op["op"]
        tokens = _pointer(str(op["path"]))
        if kind == "add":
            doc = _add(doc, tokens, copy.deepcopy(op.get("value")))
        elif kind == "remove":
            _remove(doc, tokens)
        elif kind == "replace":
            _walk(doc, tokens)
            if tokens:
                _remove(doc, tokens)
            doc = _add(doc, tokens, copy.deepcopy(op.get("value")))
        elif kind in ("move", "copy"):
            source = _pointer(str(op.get("from", "")))
            value = _walk(doc, source)
            if kind == "move":
                _remove(doc, source)
            else:
                value = copy.deepcopy(value)
            doc = _add(doc, tokens, value)
        elif kind == "test":
            if _walk(doc, tokens) != op.get("value"):
                raise errors.Invalid(
                    f"testing value {op['path']} failed: the value does not match "
                    f"{json.dumps(op.get('value'))}"
                )
        else:
            raise errors.BadRequest(f"unexpected JSON patch operation {kind!r}")
    return doc


def _key_of(item: Any, keys: tuple[str, ...]) -> tuple[Any, ...] | None:
    if not isinstance(item, dict):
        return None
    return tuple(json.dumps(item.get(k), sort_keys=True) for k in keys)


def _merge_list(field: str, original: list[Any], patch: list[Any], order: list[Any] | None) -> list[Any]:
    if field in SET_LISTS:
        result = list(original)
        for item in patch:
            if item not in result:
                result.append(item)
        return result
    keys = merge_keys(field, [*original, *patch])
    if keys is None:
        return [strategic_merge(None, p) for p in patch if not (isinstance(p, dict) and "$patch" in p)]
    if any(isinstance(p, dict) and p.get("$patch") == "replace" for p in patch):
        return [_strip(p) for p in patch if not (isinstance(p, dict) and p.get("$patch") == "replace")]
    result = [copy.deepcopy(item) for item in original]
    for item in patch:
        key = _key_of(item, keys)
        position = next((i for i, cur in enumerate(result) if _key_of(cur, keys) == key), None)
        directive = item.get("$patch") if isinstance(item, dict) else None
        if directive == "delete":
            if position is not None:
                result.pop(position)
            continue
        if position is None:
            result.append(_strip(item))
        else:
            result[position] = strategic_merge(result[position], item)
    if order:
        ranks = {_key_of(o, keys): i for i, o in enumerate(order)}
        result.sort(key=lambda it: ranks.get(_key_of(it, keys), len(ranks)))
    return result


def _strip(value: Any) -> Any:
    """Remove strategic-merge directives from a value being inserted as-is."""
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if not k.startswith("$") and v is not None}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def strategic_merge(original: Any, patch: Any) -> Any:
    """Apply a strategic merge patch to ``original`` (see the module docstring for the rules)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if patch.get("$patch") == "replace":
        return _strip({k: v for k, v in patch.items() if k != "$patch"})
    if patch.get("$patch") == "delete":
        return None
    result: JsonDict = copy.deepcopy(original) if isinstance(original, dict) else {}
    retain = patch.get("$retainKeys")
    for key, value in patch.items():
        if key.startswith("$setElementOrder/") or key in ("$patch", "$retainKeys"):
            continue
        if key.startswith("$deleteFromPrimitiveList/"):
            field = key.split("/", 1)[1]
            current = result.get(field)
            if isinstance(current, list):
                result[field] = [v for v in current if v not in value]
            continue
        if value is None:
            result.pop(key, None)
            continue
        current = result.get(key)
        if isinstance(value, list):
            order = patch.get(f"$setElementOrder/{key}")
            result[key] = _merge_list(key, current if isinstance(current, list) else [], value, order)
        elif isinstance(value, dict):
            merged = strategic_merge(current, value)
            if merged is None:
                result.pop(key, None)
            else:
                result[key] = merged
        else:
            result[key] = value
    for key, order in patch.items():
        if key.startswith("$setElementOrder/"):
            field = key.split("/", 1)[1]
            if field not in patch and isinstance(result.get(field), list):
                result[field] = _merge_list(field, result[field], [], order)
    if isinstance(retain, list):
        result = {k: v for k, v in result.items() if k in retain}
    return result

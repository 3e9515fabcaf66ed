"""Field ownership: ``managedFields`` bookkeeping and server-side apply.

Kubernetes records, per field manager and operation, the set of fields that manager last set
(``fieldsV1``: nested ``f:<field>`` maps, ``k:{...}`` for list items keyed by their merge key,
``v:<value>`` for set members, ``.`` for the node itself). Two operations feed it:

* **Update** (create, PUT, the classic patches, subresource writes): the writer takes ownership of
  every field whose value it changed; removed fields are dropped from every manager.
* **Apply** (``application/apply-patch+yaml``): the applier owns exactly the fields of its
  configuration. A field that another manager owns with a different value is a conflict (409) unless
  ``force=true`` moves ownership. A field the applier set before, left out now and owned by nobody
  else is removed from the object.

As in kube-apiserver, at most :data:`MAX_UPDATE_MANAGERS` Update entries are kept: beyond that the
oldest are merged into one ``ancient-changes`` entry, so a client that sends a new ``fieldManager``
with every request cannot grow an object's metadata without bound.

Field sets are kept as Python sets of paths, each a tuple of ``fieldsV1`` path elements. Which lists
are keyed comes from :data:`kube_sandbox.patch.MERGE_KEYS` (the sandbox has no OpenAPI schema);
other lists are atomic, owned and replaced as a whole.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from kube_sandbox import errors, patch

JsonDict = dict[str, Any]
Path = tuple[str, ...]

UNTRACKED_METADATA = frozenset(
    {
        "name",
        "namespace",
        "uid",
        "resourceVersion",
        "generation",
        "creationTimestamp",
        "managedFields",
        "selfLink",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "generateName",
    }
)
"""Metadata the server owns, which no field manager is ever recorded for."""

MAP_FIELDS = frozenset(
    {
        "labels",
        "annotations",
        "data",
        "stringData",
        "binaryData",
        "matchLabels",
        "nodeSelector",
        "requests",
        "limits",
        "capacity",
    }
)
"""Free-form maps, which (as in Kubernetes) are owned as a node (``.``) besides their keys."""

MAX_UPDATE_MANAGERS = 10
"""kube-apiserver's ``DefaultMaxUpdateManagers``: Update entries kept before the oldest are merged."""
ANCIENT_CHANGES = "ancient-changes"
"""The manager name the merged oldest Update entries are recorded under (as kube-apiserver names it)."""


def tracked(obj: JsonDict) -> JsonDict:
    """The part of an object that field ownership covers (no server-owned metadata, kind, apiVersion)."""
    out = {k: v for k, v in obj.items() if k not in ("apiVersion", "kind")}
    meta = obj.get("metadata")
    if isinstance(meta, dict):
        kept = {k: v for k, v in meta.items() if k not in UNTRACKED_METADATA}
        if kept:
            out["metadata"] = kept
        else:
            out.pop("metadata", None)
    return out


def _key_element(item: JsonDict, keys: tuple[str, ...]) -> str:
    return "k:" + json.dumps({k: item.get(k) for k in keys}, separators=(",", ":"), sort_keys=True)


def _list_keys(field: str, items: list[Any]) -> tuple[str, ...] | None:
    keys = patch.merge_keys(field, items)
    if keys is None or not all(isinstance(i, dict) and all(k in i for k in keys) for i in items):
        return None
    return keys


def field_set(obj: JsonDict) -> set[Path]:
    """Every owned path of an object: its leaves, list items and free-form maps."""
    return set(field_values(obj))


def field_values(obj: JsonDict) -> dict[Path, Any]:
    """Every owned path of an object with its value (what :func:`value_at` finds there), in one walk."""
    out: dict[Path, Any] = {}
    _collect(obj, (), out)
    return out


def _collect(node: JsonDict, prefix: Path, out: dict[Path, Any]) -> None:
    for field, value in node.items():
        path = (*prefix, f"f:{field}")
        if isinstance(value, dict) and value:
            if field in MAP_FIELDS:
                out.setdefault((*path, "."), value)
            _collect(value, path, out)
        elif isinstance(value, list) and value and field in patch.SET_LISTS:
            for item in value:
                out.setdefault((*path, "v:" + json.dumps(item, separators=(",", ":"))), item)
        elif isinstance(value, list) and value and (keys := _list_keys(field, value)) is not None:
            for item in value:
                item_path = (*path, _key_element(item, keys))
                out.setdefault((*item_path, "."), item)  # the first item of a key, as value_at finds
                _collect(item, item_path, out)
        else:
            out.setdefault(path, value)


_MISSING = object()


def value_at(obj: Any, path: Path) -> Any:
    """The value at a field path, or a sentinel when absent (use :func:`has_path`)."""
    node = obj
    for element in path:
        if element == ".":
            return node
        if element.startswith("f:"):
            if not isinstance(node, dict) or element[2:] not in node:
                return _MISSING
            node = node[element[2:]]
        elif element.startswith("k:"):
            wanted = json.loads(element[2:])
            if not isinstance(node, list):
                return _MISSING
            node = next(
                (i for i in node if isinstance(i, dict) and all(i.get(k) == v for k, v in wanted.items())),
                _MISSING,
            )
            if node is _MISSING:
                return _MISSING
        elif element.startswith("v:"):
            wanted = json.loads(element[2:])
            if not isinstance(node, list) or wanted not in node:
                return _MISSING
            node = wanted
        else:
            return _MISSING
    return node


def has_path(obj: Any, path: Path) -> bool:
    """Whether the object has a value at the path."""
    return value_at(obj, path) is not _MISSING


def remove_path(obj: JsonDict, path: Path) -> None:
    """Delete the field, list item or set member at ``path`` from ``obj`` in place."""
    if path and path[-1] == ".":
        path = path[:-1]
        if path and not path[-1].startswith("k:"):
            return
    if not path:
        return
    parent = value_at(obj, path[:-1])
    last = path[-1]
    if last.startswith("f:") and isinstance(parent, dict):
        parent.pop(last[2:], None)
    elif last.startswith("k:") and isinstance(parent, list):
        wanted = json.loads(last[2:])
        parent[:] = [
            i for i in parent if not (isinstance(i, dict) and all(i.get(k) == v for k, v in wanted.items()))
        ]
    elif last.startswith("v:") and isinstance(parent, list):
        value = json.loads(last[2:])
        parent[:] = [i for i in parent if i != value]


def to_fields_v1(paths: set[Path]) -> JsonDict:
    """Render a path set as the nested ``fieldsV1`` document."""
    root: JsonDict = {}
    for path in sorted(paths):
        node = root
        for element in path:
            node = node.setdefault(element, {})
    return root


def from_fields_v1(doc: JsonDict) -> set[Path]:
    """Parse a ``fieldsV1`` document into a path set (leaves and ``.`` markers)."""
    out: set[Path] = set()

    def walk(node: JsonDict, prefix: Path) -> None:
        for element, child in node.items():
            path = (*prefix, element)
            if isinstance(child, dict) and child:
                walk(child, path)
            else:
                out.add(path)

    walk(doc, ())
    return out


def describe(path: Path) -> str:
    """A path in the dotted form kube-apiserver uses in conflict messages."""
    out = ""
    for element in path:
        if element == ".":
            continue
        if element.startswith("f:"):
            out += "." + element[2:]
        elif element.startswith("k:"):
            keys = json.loads(element[2:])
            out += "[" + ",".join(f"{k}={json.dumps(v)}" for k, v in keys.items()) + "]"
        elif element.startswith("v:"):
            out += f"[={element[2:]}]"
    return out


class Manager:
    """One ``managedFields`` entry with its path set parsed."""

    __slots__ = ("api_version", "fields", "manager", "operation", "subresource", "time")

    def __init__(
        self,
        *,
        manager: str,
        operation: str,
        api_version: str,
        time: str,
        fields: set[Path],
        subresource: str = "",
    ) -> None:
        self.manager = manager
        self.operation = operation
        self.api_version = api_version
        self.time = time
        self.fields = fields
        self.subresource = subresource

    @property
    def identity(self) -> tuple[str, str, str]:
        """What makes two entries the same manager: name, operation and subresource."""
        return (self.manager, self.operation, self.subresource)

    def render(self) -> JsonDict:
        """The entry as it appears in ``metadata.managedFields``."""
        out: JsonDict = {
            "manager": self.manager,
            "operation": self.operation,
            "apiVersion": self.api_version,
            "time": self.time,
            "fieldsType": "FieldsV1",
            "fieldsV1": to_fields_v1(self.fields),
        }
        if self.subresource:
            out["subresource"] = self.subresource
        return out


def parse_managers(obj: JsonDict | None) -> list[Manager]:
    """Read an object's ``managedFields`` back into :class:`Manager` entries."""
    if not obj:
        return []
    entries = (obj.get("metadata") or {}).get("managedFields") or []
    return [
        Manager(
            manager=str(e.get("manager", "")),
            operation=str(e.get("operation", "Update")),
            api_version=str(e.get("apiVersion", "")),
            time=str(e.get("time", "")),
            fields=from_fields_v1(e.get("fieldsV1") or {}),
            subresource=str(e.get("subresource", "")),
        )
        for e in entries
        if isinstance(e, dict)
    ]


def _entry(managers: list[Manager], *, manager: str, operation: str, subresource: str) -> Manager | None:
    return next((m for m in managers if m.identity == (manager, operation, subresource)), None)


def _cap_update_managers(managers: list[Manager]) -> list[Manager]:
    """Merge the oldest Update entries into ``ancient-changes`` until at most the cap remain.

    kube-apiserver's ``capManagersManager`` does this (per API version; the sandbox keys managers
    without the version, so it keeps one bucket).
    """
    updaters = [m for m in managers if m.operation == "Update" and m.fields]
    if len(updaters) <= MAX_UPDATE_MANAGERS:
        return managers
    bucket = _entry(managers, manager=ANCIENT_CHANGES, operation="Update", subresource="")
    out = list(managers)
    length = len(updaters)
    # Oldest first; sorted() is stable, so entries written in the same second keep their order.
    for entry in sorted(updaters, key=lambda m: m.time):
        if length <= MAX_UPDATE_MANAGERS:
            break
        if entry is bucket:
            continue
        if bucket is None:
            bucket = Manager(
                manager=ANCIENT_CHANGES,
                operation="Update",
                api_version=entry.api_version,
                time=entry.time,
                fields=set(entry.fields),
            )
            out[out.index(entry)] = bucket
            continue
        bucket.fields |= entry.fields
        bucket.time = max(bucket.time, entry.time)
        bucket.api_version = entry.api_version
        out.remove(entry)
        length -= 1
    return out


def _part(obj: JsonDict, field: str | None) -> JsonDict:
    if field is None:
        return obj
    return {field: obj[field]} if field in obj else {}


def _render(managers: list[Manager]) -> list[JsonDict]:
    return [m.render() for m in _cap_update_managers(managers) if m.fields]


def track_update(
    old: JsonDict | None,
    new: JsonDict,
    *,
    manager: str,
    api_version: str,
    subresource: str,
    now: str,
    only: str | None = None,
) -> list[JsonDict]:
    """The ``managedFields`` after an Update-type write from ``old`` to ``new``.

    ``only`` names the one top-level field the write can change (``status``, for its subresource):
    the rest is the same on both sides and is not compared.
    """
    managers = parse_managers(old)
    new_tracked = tracked(new)
    removed: set[Path] = set()
    if old is None:
        changed = field_set(new_tracked)
    elif (old_tracked := _part(tracked(old), only)) == (new_tracked := _part(new_tracked, only)):
        changed = set()  # nothing owned changed (a status write that wrote what was there)
    else:
        # One walk of each side, each path with its value: not a walk from the root per path.
        old_values, new_values = field_values(old_tracked), field_values(new_tracked)
        removed = old_values.keys() - new_values.keys()
        changed = {
            p for p, v in new_values.items() if p not in old_values or (p[-1] != "." and old_values[p] != v)
        }
    for entry in managers:
        entry.fields -= removed
        entry.fields -= changed
    if changed:
        own = _entry(managers, manager=manager, operation="Update", subresource=subresource)
        if own is None:
            own = Manager(
                manager=manager,
                operation="Update",
                api_version=api_version,
                time=now,
                fields=set(),
                subresource=subresource,
            )
            managers.append(own)
        own.fields |= changed
        own.time = now
        own.api_version = api_version
    return _render(managers)


def _merge(current: Any, applied: Any, field: str = "") -> Any:
    if isinstance(current, dict) and isinstance(applied, dict):
        out = dict(current)
        for key, value in applied.items():
            out[key] = _merge(current.get(key), value, key) if key in current else copy.deepcopy(value)
        return out
    if isinstance(current, list) and isinstance(applied, list):
        if field in patch.SET_LISTS:
            return [*current, *[v for v in applied if v not in current]]
        keys = _list_keys(field, [*current, *applied])
        if keys is None:
            return copy.deepcopy(applied)
        out_list = list(current)
        index = {_key_element(item, keys): i for i, item in enumerate(out_list)}
        for item in applied:
            element = _key_element(item, keys)
            if element in index:
                out_list[index[element]] = _merge(out_list[index[element]], item)
            else:
                index[element] = len(out_list)
                out_list.append(copy.deepcopy(item))
        return out_list
    return copy.deepcopy(applied)


def server_side_apply(
    current: JsonDict | None,
    applied: JsonDict,
    *,
    manager: str,
    force: bool,
    api_version: str,
    subresource: str,
    now: str,
) -> JsonDict:
    """Merge an applied configuration into ``current`` and return the new object with managedFields.

    Raises :class:`kube_sandbox.errors.Conflict` listing each conflicting field and manager when
    another manager owns a field the configuration sets to a different value and ``force`` is off.
    """
    managers = parse_managers(current)
    applied_tracked = tracked(applied)
    new_fields = field_set(applied_tracked)
    base = current if current is not None else {}
    current_tracked = tracked(base)
    conflicts: list[tuple[Manager, Path]] = []
    for entry in managers:
        if entry.identity == (manager, "Apply", subresource):
            continue
        for path in sorted(entry.fields & new_fields):
            if path[-1] == ".":
                continue
            if value_at(current_tracked, path) != value_at(applied_tracked, path):
                conflicts.append((entry, path))
    if conflicts and not force:
        raise _conflict_error(conflicts)
    for entry, path in conflicts:
        entry.fields.discard(path)
    merged: JsonDict = _merge(base, applied)
    if current is not None:
        merged["metadata"] = {**(current.get("metadata") or {}), **(merged.get("metadata") or {})}
    own = _entry(managers, manager=manager, operation="Apply", subresource=subresource)
    previous = own.fields if own is not None else set()
    others: set[Path] = set()
    for entry in managers:
        if entry is not own:
            others |= entry.fields
    for path in sorted(previous - new_fields - others, key=len, reverse=True):
        remove_path(merged, path)
    if own is None:
        own = Manager(
            manager=manager,
            operation="Apply",
            api_version=api_version,
            time=now,
            fields=set(),
            subresource=subresource,
        )
        managers.append(own)
    own.fields = new_fields
    own.time = now
    own.api_version = api_version
    merged.setdefault("metadata", {})["managedFields"] = _render(managers)
    return merged


def _describe_manager(entry: Manager) -> str:
    """A manager as kube-apiserver names it in conflicts: subresource and API version when relevant."""
    text = f'"{entry.manager}"'
    if entry.subresource:
        text += f' with subresource "{entry.subresource}"'
    if entry.operation == "Update":
        text += f" using {entry.api_version}"
    return text


def _conflict_error(conflicts: list[tuple[Manager, Path]]) -> errors.Conflict:
    by_manager: dict[str, list[Path]] = {}
    for entry, path in conflicts:
        by_manager.setdefault(_describe_manager(entry), []).append(path)
    parts: list[str] = []
    for who, paths in by_manager.items():
        if len(paths) == 1:
            parts.append(f"conflict with {who}: {describe(paths[0])}")
        else:
            listed = "\n".join(f"- {describe(p)}" for p in paths)
            parts.append(f"conflicts with {who}:\n{listed}")
    count = len(conflicts)
    noun = "conflict" if count == 1 else "conflicts"
    message = f"Apply failed with {count} {noun}: " + "\n".join(parts)
    causes = [
        {
            "reason": "FieldManagerConflict",
            "message": f"conflict with {_describe_manager(entry)}",
            "field": describe(path),
        }
        for entry, path in conflicts
    ]
    return errors.Conflict(message, details={"causes": causes})

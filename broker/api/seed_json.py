"""The original design's JSON: proto3 JSON with the seed's enum spellings, checked field by field.

The /v1 gateway reads and writes the very same generated messages the gRPC API takes. The only
thing it adds is spelling: the original design writes enum values as ``"database"``, ``"Ready"``
and ``"Healthy"`` where proto3 JSON writes ``"RESOURCE_TYPE_DATABASE"``; both spellings are read,
the original one is written. A body is checked against the message's descriptor before protobuf
parses it, so every problem is reported with its field path in words a caller can act on (the
text of protobuf's own ParseError is not an interface to build on).
"""

from __future__ import annotations

import functools
import re
from typing import Any, TypeVar

from google.protobuf import descriptor, json_format, message

from broker import errors

M = TypeVar("M", bound=message.Message)

FD = descriptor.FieldDescriptor
# The range of each integer type, as the body check enforces it (the OpenAPI document says the same).
INTEGER_RANGES = {
    FD.TYPE_INT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FD.TYPE_UINT32: (0, 2**32 - 1),
    FD.TYPE_FIXED32: (0, 2**32 - 1),
    FD.TYPE_INT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FD.TYPE_UINT64: (0, 2**64 - 1),
    FD.TYPE_FIXED64: (0, 2**64 - 1),
}
# ASCII digits only, as proto3 JSON writes them: ``\d`` would take other scripts' digits and ``$`` a
# trailing newline, both of which int() then reads.
_INTEGER_TEXT = re.compile(r"-?[0-9]+")


def _enum_prefix(enum_desc: Any) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", enum_desc.name).upper() + "_"


def _spelling(enum_desc: Any, name: str) -> str:
    """The original design's spelling of an enum value: lower case for resource types, else Pascal."""
    rest = name.removeprefix(_enum_prefix(enum_desc))
    if enum_desc.full_name == "broker.v1.ResourceType":
        return rest.lower()
    return "".join(part.capitalize() for part in rest.split("_"))


def enum_spellings(enum_desc: Any) -> dict[str, str]:
    """Proto name -> the original design's spelling, for every value of an enum (zero included)."""
    return dict(_spellings(enum_desc)[0])


@functools.cache
def _spellings(enum_desc: Any) -> tuple[dict[str, str], dict[str, str]]:
    """Proto name -> seed spelling, and lower-cased seed spelling -> proto name, per enum (cached)."""
    to_seed = {v.name: _spelling(enum_desc, v.name) for v in enum_desc.values}
    return to_seed, {seed.lower(): name for name, seed in to_seed.items()}


def _respell_enum(enum_desc: Any, value: Any, *, to_seed: bool) -> Any:
    """One enum value in the other spelling; anything unrecognised is left for the check to refuse."""
    if not isinstance(value, str):
        return value
    seeds, names = _spellings(enum_desc)
    return seeds.get(value, value) if to_seed else names.get(value.lower(), value)


def _respell(desc: Any, data: dict[str, Any], *, to_seed: bool) -> None:
    """Rewrite enum values in a proto3-JSON dict in place, guided by the message descriptor."""
    for field in desc.fields:
        key = field.json_name if field.json_name in data else field.name
        if key not in data:
            continue
        value = data[key]
        if field.type == FD.TYPE_ENUM:
            enum_desc = field.enum_type
            if to_seed and value == enum_desc.values[0].name:
                # Zero (UNSPECIFIED) means "not known yet": absent, rather than an invented value.
                del data[key]
                continue
            if isinstance(value, list):
                data[key] = [_respell_enum(enum_desc, v, to_seed=to_seed) for v in value]
            else:
                data[key] = _respell_enum(enum_desc, value, to_seed=to_seed)
        elif field.type == FD.TYPE_MESSAGE and field.message_type.full_name.startswith("broker.v1."):
            for child in value if isinstance(value, list) else [value]:
                if isinstance(child, dict):
                    _respell(field.message_type, child, to_seed=to_seed)


def render(msg: message.Message) -> dict[str, Any]:
    """A message as the original design's JSON: proto3 JSON names, every field, seed enum spellings."""
    data = json_format.MessageToDict(msg, always_print_fields_with_no_presence=True)
    _respell(msg.DESCRIPTOR, data, to_seed=True)
    return data


def parse(data: Any, msg: M) -> M:
    """Parse proto3 JSON (either enum spelling) into ``msg``; anything malformed is InvalidArgument
    naming every offending field."""
    if not isinstance(data, dict):
        raise errors.InvalidArgument([errors.FieldViolation("body", "must be a JSON object")])
    _respell(msg.DESCRIPTOR, data, to_seed=False)
    violations: list[errors.FieldViolation] = []
    _check_message(msg.DESCRIPTOR, data, "", violations)
    if violations:
        raise errors.InvalidArgument(violations)
    try:
        return json_format.ParseDict(data, msg)
    except json_format.ParseError as e:  # what the check above does not foresee: said as it is
        raise errors.InvalidArgument([errors.FieldViolation("body", str(e).splitlines()[0])]) from e


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _check_message(
    desc: Any, data: dict[str, Any], path: str, violations: list[errors.FieldViolation]
) -> None:
    fields = {f.json_name: f for f in desc.fields} | {f.name: f for f in desc.fields}
    for key, value in data.items():
        field = fields.get(key)
        where = f"{path}.{_snake(key)}" if path else _snake(key)
        if field is None:
            known = ", ".join(f.json_name for f in desc.fields)
            violations.append(
                errors.FieldViolation(where, f"is not a field of {desc.name} (fields: {known})")
            )
            continue
        where = f"{path}.{field.name}" if path else field.name
        if value is None:
            continue  # JSON null: the field's default
        if field.is_repeated:
            if not isinstance(value, list):
                violations.append(errors.FieldViolation(where, "must be a JSON list"))
                continue
            for index, item in enumerate(value):
                _check_value(field, item, f"{where}[{index}]", violations)
        else:
            _check_value(field, value, where, violations)


def _check_value(field: Any, value: Any, where: str, violations: list[errors.FieldViolation]) -> None:
    kind = field.type
    problem = ""
    if kind == FD.TYPE_MESSAGE:
        if field.message_type.full_name == "google.protobuf.Timestamp":
            problem = (
                "" if isinstance(value, str) else 'must be an RFC 3339 time such as "2025-10-03T09:30:00Z"'
            )
        elif isinstance(value, dict):
            _check_message(field.message_type, value, where, violations)
        else:
            problem = "must be a JSON object"
    elif kind == FD.TYPE_ENUM:
        names = {v.name for v in field.enum_type.values}
        if not (isinstance(value, str) and value in names):
            seeds, _ = _spellings(field.enum_type)
            valid = [seeds[v.name] for v in field.enum_type.values[1:]]
            problem = f"{str(value)[:40]!r} is not a valid value: use one of {', '.join(valid)}"
    elif kind == FD.TYPE_STRING:
        problem = "" if isinstance(value, str) else "must be a JSON string"
    elif kind == FD.TYPE_BOOL:
        problem = "" if isinstance(value, bool) else "must be true or false"
    elif kind in INTEGER_RANGES:
        low, high = INTEGER_RANGES[kind]
        number = None
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        elif (isinstance(value, float) and value.is_integer()) or (
            isinstance(value, str) and _INTEGER_TEXT.fullmatch(value)
        ):
            number = int(value)
        if number is None:
            problem = f"{str(value)[:40]!r} is not a whole number"
        elif not low <= number <= high:
            problem = f"{number} is out of range ({low} to {high})"
    elif kind in (FD.TYPE_DOUBLE, FD.TYPE_FLOAT):
        problem = "" if isinstance(value, int | float) and not isinstance(value, bool) else "must be a number"
    if problem:
        violations.append(errors.FieldViolation(where, problem))

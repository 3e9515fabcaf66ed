"""The OpenAPI 3.1 document of the /v1 gateway, derived from the RPC table and the protobuf descriptors.

Nothing here lists a path or a field. Every operation is a ``Route`` of a row of ``rpcs.TABLE``; its
request and response schemas come from the descriptors of the RPC's input and output messages, spelled
the way ``seed_json`` reads and writes them; its error responses come from the one error table
(``status.TABLE``) and have the bodies ``status.http_body`` writes. The gateway serves the document at
``PATH``, the one path it serves that is not an RPC, and the document describes that path too.

How the gateway's JSON maps onto JSON Schema (2020-12, as OpenAPI 3.1 uses it):

- Responses (``seed_json.render``): proto3 JSON names (camelCase) and nothing else. Every field
  without presence is always written, so it is ``required``. Fields with presence (messages,
  ``optional`` scalars) appear only when set. Enums take the seed's spelling (``"database"``,
  ``"Ready"``), and an enum at its zero value (``UNSPECIFIED``, "not known yet") is left out. 64-bit
  integers are decimal strings (proto3 JSON), 32-bit ones numbers, timestamps RFC 3339 strings.
- JSON bodies (``seed_json.parse``): the same names; protobuf's own names (snake_case) are read as
  aliases and not listed. Enum values may be the seed's spelling in any letter case or the proto name;
  the schema lists the seed spelling, its lower case and the proto names. Integers may be numbers or
  decimal strings. ``null`` for any field means its default. Unknown keys are refused.
- Query strings: a GET or DELETE route reads the request's scalar fields from the query string, and the
  repeated fields the route names as repeated keys or comma lists. Path parameters take the place of
  the request field of the same name.
"""

from __future__ import annotations

import importlib.metadata
import re
from collections.abc import Iterable
from typing import Any

from broker_client.v1 import broker_pb2 as pb
from google.protobuf import descriptor

from broker import errors
from broker.api import rpcs, seed_json, status

PATH = "/v1/openapi.json"
SERVICE = pb.DESCRIPTOR.services_by_name["BrokerService"]
SECURITY_SCHEME = "bearerAuth"

_JSON = "application/json"
_FD = descriptor.FieldDescriptor
_TIMESTAMP = "google.protobuf.Timestamp"
_INT64_KINDS = {_FD.TYPE_INT64, _FD.TYPE_SINT64, _FD.TYPE_SFIXED64, _FD.TYPE_UINT64, _FD.TYPE_FIXED64}
_PATH_PARAMETER = re.compile(r"\{([^{}]*)\}")
_DECIMAL = "^-?[0-9]+$"
# Statuses that the gateway answers for reasons of the transport rather than of an RPC: a wrong method
# is a property of the path (answered with an Allow header), not of a documented operation.
_NOT_PER_OPERATION = {errors.MethodNotAllowed}


def document(*, authentication: bool) -> dict[str, Any]:
    """The OpenAPI document of every /v1 path; ``authentication`` says whether bearer tokens are required."""
    schemas = _Schemas()
    paths: dict[str, dict[str, Any]] = {}
    operation_ids: set[str] = set()
    for rpc in rpcs.TABLE:
        method = SERVICE.methods_by_name[rpc.name]
        for route in rpc.routes:
            operation = _operation(rpc, route, method, schemas, authentication=authentication)
            if operation["operationId"] in operation_ids:
                raise ValueError(f"two routes of {rpc.name} share the method {route.method}")
            operation_ids.add(operation["operationId"])
            paths.setdefault(route.path, {})[route.method.lower()] = operation
    paths.setdefault(PATH, {})["get"] = {
        "operationId": "GetOpenApiDocument",
        "summary": "This document.",
        "description": "The OpenAPI document of the /v1 gateway. It needs no credentials: it describes "
        "the API and tells nothing about any namespace.",
        "security": [],
        "responses": {
            "200": {"description": "The document.", "content": {_JSON: {"schema": {"type": "object"}}}}
        },
    }
    components: dict[str, Any] = {"schemas": schemas.components, "responses": _error_responses(schemas)}
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "jsonSchemaDialect": "https://spec.openapis.org/oas/3.1/dialect/base",
        "info": {
            "title": "Resource broker /v1 gateway",
            "version": _version(),
            "description": "The HTTP/JSON paths of the original design over the RPCs of "
            f"{SERVICE.full_name}: the same requests, answers and errors as gRPC, in the original "
            'design\'s JSON (camelCase names, enum values such as "database" and "Ready"). Errors '
            "are JSON bodies whose HTTP status matches the gRPC code.",
        },
        "paths": paths,
        "components": components,
    }
    if authentication:
        components["securitySchemes"] = {
            SECURITY_SCHEME: {
                "type": "http",
                "scheme": "bearer",
                "description": "A token of the broker's token file (broker serve --tokens). Its principal "
                "may use only the namespaces it is granted: any other is 403, whether or not "
                "anything exists there.",
            }
        }
        doc["security"] = [{SECURITY_SCHEME: []}]
    return doc


def _version() -> str:
    try:
        return importlib.metadata.version("resource-broker")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def path_parameters(path: str) -> list[str]:
    """The names of a route's path parameters (aiohttp's ``{name:regex}`` form has no OpenAPI spelling)."""
    names = _PATH_PARAMETER.findall(path)
    for name in names:
        if not name.isidentifier():
            raise ValueError(f"path parameter {{{name}}} of {path} is not a plain request field name")
    return list(names)


def _operation(
    rpc: rpcs.Rpc,
    route: rpcs.Route,
    method: descriptor.MethodDescriptor,
    schemas: _Schemas,
    *,
    authentication: bool,
) -> dict[str, Any]:
    request = method.input_type
    fields = {f.name: f for f in request.fields}
    in_path = path_parameters(route.path)
    for name in in_path:
        if name not in fields:
            raise ValueError(f"path parameter {{{name}}} of {route.path} is not a field of {request.name}")
    parameters: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}}
        for name in in_path
    ]
    operation: dict[str, Any] = {
        "operationId": rpc.name if len(rpc.routes) == 1 else f"{rpc.name}_{route.method.upper()}",
        "summary": f"{rpc.name}, over HTTP/JSON.",
        "x-grpc-method": f"/{SERVICE.full_name}/{rpc.name}",
    }
    if route.body:
        body = schemas.input_message(request, without=in_path)
        if route.wrap:
            wrapped = _message_of(fields[route.wrap])
            if wrapped is None:
                raise ValueError(f"{route.path} wraps {route.wrap}, which is not a message field")
            body = {"anyOf": [body, schemas.input_message(wrapped, without=())]}
            operation["description"] = (
                f"The body is a {request.name}, or the {wrapped.name} itself that its {route.wrap} "
                "field carries."
            )
        else:
            operation["description"] = f"The body is a {request.name}."
        operation["requestBody"] = {"required": True, "content": {_JSON: {"schema": body}}}
    else:
        operation["description"] = f"The query string carries the fields of a {request.name}."
        for field in request.fields:
            if field.name in in_path:
                continue
            schema = _query_schema(
                field, repeated=field.json_name in route.repeated or field.name in route.repeated
            )
            if schema is not None:
                parameters.append({"name": field.json_name, "in": "query", "required": False, **schema})
    if parameters:
        operation["parameters"] = parameters
    responses: dict[str, Any] = {
        str(route.status): {
            "description": f"The {method.output_type.name}.",
            "content": {_JSON: {"schema": schemas.output_message(method.output_type)}},
        }
    }
    for code in _error_statuses(body=route.body, authentication=authentication):
        responses[str(code)] = {"$ref": f"#/components/responses/Error{code}"}
    operation["responses"] = responses
    return operation


def _query_schema(field: descriptor.FieldDescriptor, *, repeated: bool) -> dict[str, Any] | None:
    """A query parameter for ``field``, or None when a query string cannot carry it.

    Query values are text: booleans and messages (other than timestamps) can never be valid there, and
    a repeated field is read as a list only where the route says so.
    """
    if field.is_repeated != repeated:
        return None
    if field.type == _FD.TYPE_BOOL or _message_of(field) is not None:
        return None
    if field.type in seed_json.INTEGER_RANGES:
        low, high = seed_json.INTEGER_RANGES[field.type]
        value: dict[str, Any] = {"type": "integer", "minimum": low, "maximum": high}
    else:
        value = _scalar(field, output=False)
    if repeated:
        return {"schema": {"type": "array", "items": value}, "style": "form", "explode": True}
    return {"schema": value}


def _error_statuses(*, body: bool, authentication: bool) -> list[int]:
    codes = {
        mapping.http_status
        for cls, mapping in status.TABLE.items()
        if cls not in _NOT_PER_OPERATION
        and (body or not issubclass(cls, errors.RequestTooLarge))
        and (authentication or not issubclass(cls, errors.Unauthenticated))
    }
    return sorted(codes | {status.INTERNAL.http_status})


def _error_responses(schemas: _Schemas) -> dict[str, Any]:
    """One response per HTTP status of the error table, its body as ``status.http_body`` writes it."""
    by_status: dict[int, list[str]] = {}
    for mapping in (*status.TABLE.values(), status.INTERNAL):
        names = by_status.setdefault(mapping.http_status, [])
        if mapping.grpc_code.name not in names:
            names.append(mapping.grpc_code.name)
    responses = {}
    for code, names in sorted(by_status.items()):
        name = f"Error{code}"
        schemas.components[name] = {
            "type": "object",
            "required": ["error"],
            "additionalProperties": False,
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["code", "status", "message", "reason"],
                    "additionalProperties": False,
                    "properties": {
                        "code": {"const": code},
                        "status": {"type": "string", "enum": names},
                        "message": {"type": "string"},
                        "reason": {"type": "string", "description": "A stable UPPER_SNAKE identifier."},
                        "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
                        "fieldViolations": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["field", "description"],
                                "additionalProperties": False,
                                "properties": {
                                    "field": {"type": "string"},
                                    "description": {"type": "string"},
                                },
                            },
                        },
                    },
                }
            },
        }
        responses[name] = {
            "description": f"{' or '.join(names)}: the error, as gRPC would report it.",
            "content": {_JSON: {"schema": {"$ref": f"#/components/schemas/{name}"}}},
        }
    return responses


class _Schemas:
    """The component schemas of the messages, one per message and direction, built on first use."""

    def __init__(self) -> None:
        self.components: dict[str, Any] = {}
        self._owners: dict[str, str] = {}

    def output_message(self, desc: descriptor.Descriptor) -> dict[str, Any]:
        """A reference to the schema of ``desc`` as the gateway writes it."""
        return self._ref(desc, desc.name, output=True)

    def input_message(self, desc: descriptor.Descriptor, *, without: Iterable[str]) -> dict[str, Any]:
        """The schema of ``desc`` as the gateway reads it, less the fields a path carries."""
        name = desc.name if desc.name.endswith("Request") else f"{desc.name}Input"
        ref = self._ref(desc, name, output=False)
        dropped = {f.json_name for f in desc.fields if f.name in set(without)}
        if not dropped:
            return ref
        schema = dict(self.components[name])
        schema["properties"] = {k: v for k, v in schema["properties"].items() if k not in dropped}
        return schema

    def _ref(self, desc: descriptor.Descriptor, name: str, *, output: bool) -> dict[str, Any]:
        owner = self._owners.setdefault(name, desc.full_name)
        if owner != desc.full_name:
            raise ValueError(f"schema name {name} stands for both {owner} and {desc.full_name}")
        if name not in self.components:
            self.components[name] = {}  # taken before recursing, so recursive messages end
            self.components[name] = self._message(desc, output=output)
        return {"$ref": f"#/components/schemas/{name}"}

    def _message(self, desc: descriptor.Descriptor, *, output: bool) -> dict[str, Any]:
        properties = {f.json_name: self._field(f, output=output) for f in desc.fields}
        schema: dict[str, Any] = {
            "type": "object",
            "title": desc.full_name,
            "additionalProperties": False,
            "properties": properties,
        }
        if output:
            # Written whether set or not: fields without presence, except enums at zero (left out).
            required = [f.json_name for f in desc.fields if not f.has_presence and f.type != _FD.TYPE_ENUM]
            if required:
                schema["required"] = required
        return schema

    def _field(self, field: descriptor.FieldDescriptor, *, output: bool) -> dict[str, Any]:
        message = _message_of(field)
        if message is not None:
            if message.GetOptions().map_entry:
                # seed_json reads a map field as a list of entries: say how it reads maps first.
                raise ValueError(f"{field.full_name} is a map field, which the gateway does not read yet")
            if message.full_name in _WELL_KNOWN:
                value = dict(_WELL_KNOWN[message.full_name])
            elif not message.full_name.startswith(f"{pb.DESCRIPTOR.package}."):
                raise ValueError(f"{field.full_name}: {message.full_name} has no JSON schema here")
            else:
                value = self.output_message(message) if output else self.input_message(message, without=())
        else:
            value = _scalar(field, output=output)
        schema = {"type": "array", "items": value} if field.is_repeated else value
        return schema if output else _nullable(schema)


def _message_of(field: descriptor.FieldDescriptor) -> descriptor.Descriptor | None:
    """The message a field holds; None for scalars, enums and timestamps (written as strings)."""
    message = field.message_type
    if message is None or message.full_name == _TIMESTAMP:
        return None
    return message


# Well-known types in their proto3 JSON form: a Struct is any JSON object (the admission policies
# the broker generates are Kubernetes objects, whose schema is Kubernetes').
_WELL_KNOWN: dict[str, dict[str, Any]] = {"google.protobuf.Struct": {"type": "object"}}


def _scalar(field: descriptor.FieldDescriptor, *, output: bool) -> dict[str, Any]:
    """A field's value other than a message: as written (``output``) or as read from a JSON body."""
    kind = field.type
    if kind == _FD.TYPE_MESSAGE:  # a timestamp, the only message written as a string
        return {"type": "string", "format": "date-time"}
    if kind == _FD.TYPE_ENUM and field.enum_type is not None:
        spellings = seed_json.enum_spellings(field.enum_type)
        values = [spellings[v.name] for v in field.enum_type.values[1:]]
        if not output:
            # Read: the seed spelling in any letter case (its lower case listed) or the proto name.
            values = list(dict.fromkeys([*values, *(v.lower() for v in values), *spellings]))
        return {"type": "string", "enum": values}
    if kind == _FD.TYPE_STRING:
        return {"type": "string"}
    if kind == _FD.TYPE_BYTES:
        return {"type": "string", "contentEncoding": "base64"}
    if kind == _FD.TYPE_BOOL:
        return {"type": "boolean"}
    if kind in (_FD.TYPE_DOUBLE, _FD.TYPE_FLOAT):
        return {"type": "number"}
    if kind in seed_json.INTEGER_RANGES:
        low, high = seed_json.INTEGER_RANGES[kind]
        number = {"type": "integer", "minimum": low, "maximum": high}
        text = {"type": "string", "pattern": _DECIMAL, "format": "int64" if kind in _INT64_KINDS else "int32"}
        if output:
            # proto3 JSON writes 64-bit integers as strings, so that JavaScript readers keep every digit.
            return text if kind in _INT64_KINDS else number
        return {"anyOf": [number, text]}
    raise ValueError(f"{field.full_name}: no JSON schema for protobuf field type {kind}")


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` or JSON null (a JSON body's null means the field's default)."""
    if "anyOf" in schema:
        return {**schema, "anyOf": [*schema["anyOf"], {"type": "null"}]}
    if "$ref" in schema:
        return {"anyOf": [schema, {"type": "null"}]}
    nullable = {**schema, "type": [schema["type"], "null"]}
    if "enum" in schema:
        nullable["enum"] = [*schema["enum"], None]
    return nullable

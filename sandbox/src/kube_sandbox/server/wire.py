"""What every request handler shares: the parsed route, query parsing and rendering of responses.

Routing (:mod:`kube_sandbox.server.routing`) produces a :class:`Route`; the verbs
(:mod:`kube_sandbox.server.handlers`) and the watch stream (:mod:`kube_sandbox.server.watching`)
read the same query parameters, render objects the same way (custom objects with the served
``apiVersion``, ``as=Table`` and ``PartialObjectMetadata`` when asked for) and answer errors with
the same ``Status`` bodies. Kept in one module so the three agree and none imports another.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from kube_sandbox import errors, resources, selectors, store, tables

JsonDict = dict[str, Any]

JSON = "application/json"


def json_response(
    body: JsonDict | bytes, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    """A JSON response from an object or from bytes already serialized."""
    data = body if isinstance(body, bytes) else store.dumps(body)
    return web.Response(body=data, status=status, content_type=JSON, headers=headers)


def error_response(exc: errors.ApiError) -> web.Response:
    """The ``Status`` response for an API error."""
    headers: dict[str, str] = {}
    if isinstance(exc, errors.TooManyRequests) and exc.details and "retryAfterSeconds" in exc.details:
        headers["Retry-After"] = str(exc.details["retryAfterSeconds"])
    return json_response(exc.status(), exc.code, headers)


def field_manager(request: web.Request) -> str:
    """The manager name kube-apiserver records: ``?fieldManager=`` or the User-Agent up to the first '/'."""
    explicit = request.query.get("fieldManager")
    if explicit:
        return explicit[:128]
    agent = request.headers.get("User-Agent", "")
    return agent.split("/", 1)[0][:128] or "unknown"


def representation(request: web.Request) -> tuple[str, str]:
    """What representation the Accept header asks for: ('json'|'table'|'partial', meta version)."""
    for part in request.headers.get("Accept", "").split(","):
        params = dict(p.strip().split("=", 1) for p in part.split(";")[1:] if "=" in p)
        if params.get("g") != "meta.k8s.io":
            continue
        if params.get("as") == "Table" and params.get("v") in ("v1", "v1beta1"):
            return "table", params["v"]
        if params.get("as") in ("PartialObjectMetadata", "PartialObjectMetadataList"):
            return "partial", params.get("v", "v1")
    return "json", ""


def parse_bool(value: str | None) -> bool:
    """A boolean query parameter as kube-apiserver reads it (``true`` or ``1``)."""
    return value is not None and value.lower() in ("true", "1")


def parse_int(value: str | None, name: str) -> int | None:
    """An integer query parameter (absent or empty is None); BadRequest when it is not a number."""
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError as exc:
        raise errors.BadRequest(f"invalid value for {name}: {value!r}") from exc


class Route:
    """A parsed resource path."""

    __slots__ = ("name", "namespace", "rt", "subresource")

    def __init__(
        self, rt: resources.ResourceType, namespace: str | None, name: str | None, subresource: str | None
    ) -> None:
        self.rt = rt
        self.namespace = namespace
        self.name = name
        self.subresource = subresource


def not_found() -> errors.NotFound:
    """kube-apiserver's answer for a path it does not serve."""
    return errors.NotFound("the server could not find the requested resource", details={})


def selectors_of(
    request: web.Request, rt: resources.ResourceType
) -> tuple[selectors.LabelSelector, selectors.FieldSelector]:
    """The request's ``labelSelector`` and ``fieldSelector``, parsed for the kind."""
    labels = selectors.parse_labels(request.query.get("labelSelector"))
    fields = selectors.parse_fields(request.query.get("fieldSelector"), kind=rt.kind)
    return labels, fields


def render(rt: resources.ResourceType, obj: JsonDict) -> JsonDict:
    """The object as served at ``rt``'s version (custom objects carry their stored ``apiVersion``)."""
    if rt.custom and obj.get("apiVersion") != rt.api_version:
        return {**obj, "apiVersion": rt.api_version}
    return obj


def raw(rt: resources.ResourceType, entry: store.Entry) -> bytes:
    """The entry's serialization as served at ``rt``'s version, reusing the stored bytes when it can."""
    if rt.custom and entry.obj.get("apiVersion") != rt.api_version:
        return store.dumps(render(rt, entry.obj))
    return entry.raw


def object_response(
    request: web.Request, rt: resources.ResourceType, obj: JsonDict, status: int = 200
) -> web.Response:
    """One object in the representation the Accept header asks for (JSON, Table or metadata)."""
    wants, _ = representation(request)
    if wants == "table":
        doc = tables.table(
            rt,
            [render(rt, obj)],
            resource_version=obj["metadata"].get("resourceVersion", ""),
            include=request.query.get("includeObject", "Metadata"),
        )
        return json_response(doc, status)
    if wants == "partial":
        return json_response(tables.partial_metadata(obj), status)
    return json_response(render(rt, obj), status)

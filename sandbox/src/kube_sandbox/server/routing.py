"""Routing: which handler a request path and method reach, kube-apiserver's URL layout.

Paths are ``/api/{version}/...`` for the core group and ``/apis/{group}/{version}/...`` for the
others, optionally ``namespaces/{ns}/``, then ``{plural}[/{name}[/{subresource}]]``, with the
legacy ``/watch/`` prefix; GETs of discovery and OpenAPI paths go to
:mod:`kube_sandbox.server.discovery`. A resource path becomes a :class:`~kube_sandbox.server.wire.Route`
and the method picks the verb in :mod:`kube_sandbox.server.handlers` or the watch stream in
:mod:`kube_sandbox.server.watching`. Separate from them so the URL rules can be read in one place.
"""

from __future__ import annotations

from aiohttp import web

from kube_sandbox import errors, resources
from kube_sandbox.server import discovery, handlers, watching, wire


async def dispatch(
    request: web.Request,
    *,
    registry: resources.Registry,
    address: str,
    verbs: handlers.Handlers,
    watches: watching.Watches,
) -> web.StreamResponse:
    """Answer any request outside the fixed routes (version, health, faults)."""
    segments = [s for s in request.path.split("/") if s]
    if not segments:
        paths = ["/api", "/api/v1", "/apis", "/healthz", "/livez", "/readyz", "/version"]
        return wire.json_response({"paths": paths})
    if request.method == "GET" and segments[:2] == ["openapi", "v3"]:
        return discovery.openapi_response(registry, segments[2:])
    if request.method == "GET":
        doc = discovery.document(registry, segments, address=address)
        if doc is not None:
            return wire.json_response(doc)
    if segments[0] == "api" and len(segments) >= 2:
        group, version, rest = "", segments[1], segments[2:]
    elif segments[0] == "apis" and len(segments) >= 3:
        group, version, rest = segments[1], segments[2], segments[3:]
    else:
        raise wire.not_found()
    legacy_watch = bool(rest) and rest[0] == "watch"
    if legacy_watch:
        rest = rest[1:]
    if not rest:
        raise wire.not_found()
    route = resolve(registry, group=group, version=version, rest=rest)
    return await serve(request, route, legacy_watch=legacy_watch, verbs=verbs, watches=watches)


def resolve(registry: resources.Registry, *, group: str, version: str, rest: list[str]) -> wire.Route:
    """The route of a resource path below ``/api/{version}`` or ``/apis/{group}/{version}``."""
    namespace: str | None = None
    if rest[0] == "namespaces" and len(rest) >= 3 and rest[2] not in ("status", "finalize"):
        namespace = rest[1]
        rest = rest[2:]
    if len(rest) > 3:
        raise wire.not_found()
    rt = registry.lookup(group=group, version=version, plural=rest[0])
    if rt is None or (namespace is not None and not rt.namespaced):
        raise wire.not_found()
    name = rest[1] if len(rest) > 1 else None
    sub = rest[2] if len(rest) > 2 else None
    if rt.namespaced and name is not None and namespace is None:
        raise wire.not_found()
    if not rt.namespaced:
        namespace = ""
    if sub is not None and sub not in rt.subresources():
        raise wire.not_found()
    return wire.Route(rt, namespace, name, sub)


async def serve(
    request: web.Request,
    route: wire.Route,
    *,
    legacy_watch: bool,
    verbs: handlers.Handlers,
    watches: watching.Watches,
) -> web.StreamResponse:
    """Call the verb the method asks for on the route, or refuse the method."""
    method = request.method
    rt = route.rt
    if rt.storage_key == ("metrics.k8s.io", "pods"):
        if method != "GET" or wire.parse_bool(request.query.get("watch")) or legacy_watch:
            raise errors.MethodNotAllowed("the server does not allow this method on the requested resource")
        return verbs.pod_metrics(request, route)
    if route.name is None:
        if method == "GET":
            if legacy_watch or wire.parse_bool(request.query.get("watch")):
                return await watches.watch(request, route)
            return verbs.list_collection(request, route)
        if method == "POST":
            return await verbs.create(request, route)
        if method == "DELETE":
            return await verbs.delete_collection(request, route)
        raise errors.MethodNotAllowed("the server does not allow this method on the requested resource")
    if legacy_watch:
        return await watches.watch(request, route)
    if method == "GET":
        return verbs.get(request, route)
    if method == "PUT":
        return await verbs.update(request, route)
    if method == "PATCH":
        return await verbs.patch(request, route)
    if method == "DELETE" and route.subresource is None:
        return await verbs.delete(request, route)
    raise errors.MethodNotAllowed("the server does not allow this method on the requested resource")

"""The HTTP face of the sandbox: kube-apiserver's REST paths, discovery and ``Status`` bodies.

The handlers are thin: they parse the path, query and body, call the store, and render. The paths
are kube-apiserver's (``/api/v1/namespaces/{ns}/pods/{name}/status``,
``/apis/apps/v1/namespaces/{ns}/statefulsets/{name}/scale``, legacy ``/watch/`` prefixes), the
responses carry the same kinds, codes and reasons, and ``kubectl``'s server-side printing request
(``as=Table``) is honoured. Fault injection lives under ``/sandbox/v1/faults``, a prefix no real
cluster serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import yaml
from aiohttp import web

from kube_sandbox import apply, errors, openapi, patch, protobuf, resources, selectors, store, tables

# libyaml's loader when PyYAML was built with it (the pure-Python one is ten times slower).
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

JsonDict = dict[str, Any]
MetricsProvider = Callable[[str | None, str | None], list[JsonDict]]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

log = logging.getLogger(__name__)

JSON = "application/json"
SERVER_VERSION: JsonDict = {
    "major": "1",
    "minor": "32",
    "gitVersion": "v1.32.0-sandbox",
    "gitCommit": "0000000000000000000000000000000000000000",
    "gitTreeState": "clean",
    "buildDate": "2025-01-01T00:00:00Z",
    "goVersion": "go1.23.0",
    "compiler": "gc",
    "platform": "linux/amd64",
}
RETURNS_DELETED_OBJECT = frozenset(
    {
        ("", "pods"),
        ("", "services"),
        ("", "namespaces"),
        ("", "persistentvolumeclaims"),
        ("apiextensions.k8s.io", "customresourcedefinitions"),
    }
)
PATCH_TYPES = {
    "application/json-patch+json": "json",
    "application/merge-patch+json": "merge",
    "application/strategic-merge-patch+json": "strategic",
    "application/apply-patch+yaml": "apply",
}
DEFAULT_WATCH_TIMEOUT = 1800.0


def _json_response(
    body: JsonDict | bytes, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    data = body if isinstance(body, bytes) else store.dumps(body)
    return web.Response(body=data, status=status, content_type=JSON, headers=headers)


def error_response(exc: errors.ApiError) -> web.Response:
    """The ``Status`` response for an API error."""
    headers: dict[str, str] = {}
    if isinstance(exc, errors.TooManyRequests) and exc.details and "retryAfterSeconds" in exc.details:
        headers["Retry-After"] = str(exc.details["retryAfterSeconds"])
    return _json_response(exc.status(), exc.code, headers)


def field_manager(request: web.Request) -> str:
    """The manager name kube-apiserver records: ``?fieldManager=`` or the User-Agent up to the first '/'."""
    explicit = request.query.get("fieldManager")
    if explicit:
        return explicit[:128]
    agent = request.headers.get("User-Agent", "")
    return agent.split("/", 1)[0][:128] or "unknown"


def _wants(request: web.Request) -> tuple[str, str]:
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


def _bool(value: str | None) -> bool:
    return value is not None and value.lower() in ("true", "1")


def _int(value: str | None, name: str) -> int | None:
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


def _not_found() -> errors.NotFound:
    return errors.NotFound("the server could not find the requested resource", details={})


class ApiServer:
    """The aiohttp application serving the Kubernetes API from a :class:`store.Store`."""

    def __init__(
        self,
        *,
        st: store.Store,
        metrics: MetricsProvider,
        bookmark_interval: float,
        before_request: Callable[[web.Request], None],
        fault_routes: Callable[[web.Application], None],
    ) -> None:
        self.store = st
        self.registry = st.registry
        self.metrics = metrics
        self.bookmark_interval = bookmark_interval
        self._before_request = before_request
        self._fault_routes = fault_routes
        self.forced_gone = 0
        self.address = ""

    def application(self) -> web.Application:
        """Build the aiohttp application."""
        app = web.Application(middlewares=[self._middleware], client_max_size=16 * 1024 * 1024)
        self._fault_routes(app)
        app.router.add_get("/version", self._version)
        app.router.add_get("/healthz", self._ok)
        app.router.add_get("/livez", self._ok)
        app.router.add_get("/readyz", self._ok)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        return app

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            if not request.path.startswith("/sandbox/"):
                self._before_request(request)
            return await handler(request)
        except errors.ApiError as exc:
            return error_response(exc)
        except web.HTTPException:
            raise
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception as exc:
            log.exception("sandbox API handler failed on %s %s", request.method, request.path_qs)
            return error_response(errors.InternalError(f"sandbox internal error: {exc}"))

    async def _version(self, request: web.Request) -> web.Response:
        return _json_response(SERVER_VERSION)

    async def _ok(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    # ----- discovery -----------------------------------------------------------------------------

    def _api_versions(self) -> JsonDict:
        return {
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": self.address}],
        }

    def _group(self, group: str, versions: list[str]) -> JsonDict:
        listed = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
        return {"name": group, "versions": listed, "preferredVersion": listed[0]}

    def _group_list(self) -> JsonDict:
        return {
            "kind": "APIGroupList",
            "apiVersion": "v1",
            "groups": [self._group(g, vs) for g, vs in self.registry.groups() if g],
        }

    def _resource_list(self, group: str, version: str) -> JsonDict | None:
        types = self.registry.in_group_version(group=group, version=version)
        if not types:
            return None
        listed: list[JsonDict] = []
        for rt in sorted(types, key=lambda r: r.plural):
            entry: JsonDict = {
                "name": rt.plural,
                "singularName": rt.singular_name,
                "namespaced": rt.namespaced,
                "kind": rt.kind,
                "verbs": list(rt.verbs),
            }
            if rt.short_names:
                entry["shortNames"] = list(rt.short_names)
            if rt.categories:
                entry["categories"] = list(rt.categories)
            listed.append(entry)
            for sub in rt.subresources():
                sub_entry: JsonDict = {
                    "name": f"{rt.plural}/{sub}",
                    "singularName": "",
                    "namespaced": rt.namespaced,
                    "kind": rt.kind,
                    "verbs": ["get", "patch", "update"],
                }
                if sub == "scale":
                    sub_entry.update(group="autoscaling", version="v1", kind="Scale")
                if sub == "finalize":
                    sub_entry["verbs"] = ["update"]
                if sub == "log":
                    sub_entry.update(kind="Pod", verbs=["get"])
                listed.append(sub_entry)
        return {
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": f"{group}/{version}" if group else version,
            "resources": listed,
        }

    def _discovery(self, segments: list[str]) -> JsonDict | None:
        if segments == ["api"]:
            return self._api_versions()
        if segments == ["apis"]:
            return self._group_list()
        if len(segments) == 2 and segments[0] == "api":
            return self._resource_list("", segments[1])
        if len(segments) == 2 and segments[0] == "apis":
            for group, versions in self.registry.groups():
                if group == segments[1] and group:
                    return {"kind": "APIGroup", "apiVersion": "v1", **self._group(group, versions)}
            return None
        if len(segments) == 3 and segments[0] == "apis":
            return self._resource_list(segments[1], segments[2])
        return None

    def _openapi(self, rest: list[str]) -> web.Response:
        if not rest:
            return _json_response(openapi.index(self.registry))
        doc = None
        if rest[0] == "api" and len(rest) == 2:
            doc = openapi.document(self.registry, group="", version=rest[1])
        elif rest[0] == "apis" and len(rest) == 3:
            doc = openapi.document(self.registry, group=rest[1], version=rest[2])
        if doc is None:
            raise _not_found()
        return _json_response(doc)

    # ----- routing -------------------------------------------------------------------------------

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        segments = [s for s in request.path.split("/") if s]
        if not segments:
            paths = ["/api", "/api/v1", "/apis", "/healthz", "/livez", "/readyz", "/version"]
            return _json_response({"paths": paths})
        if request.method == "GET" and segments[:2] == ["openapi", "v3"]:
            return self._openapi(segments[2:])
        if request.method == "GET":
            doc = self._discovery(segments)
            if doc is not None:
                return _json_response(doc)
        if segments[0] == "api" and len(segments) >= 2:
            group, version, rest = "", segments[1], segments[2:]
        elif segments[0] == "apis" and len(segments) >= 3:
            group, version, rest = segments[1], segments[2], segments[3:]
        else:
            raise _not_found()
        legacy_watch = bool(rest) and rest[0] == "watch"
        if legacy_watch:
            rest = rest[1:]
        if not rest:
            raise _not_found()
        route = self._route(group, version, rest)
        return await self._serve(request, route, legacy_watch=legacy_watch)

    def _route(self, group: str, version: str, rest: list[str]) -> Route:
        namespace: str | None = None
        if rest[0] == "namespaces" and len(rest) >= 3 and rest[2] not in ("status", "finalize"):
            namespace = rest[1]
            rest = rest[2:]
        if len(rest) > 3:
            raise _not_found()
        rt = self.registry.lookup(group=group, version=version, plural=rest[0])
        if rt is None or (namespace is not None and not rt.namespaced):
            raise _not_found()
        name = rest[1] if len(rest) > 1 else None
        sub = rest[2] if len(rest) > 2 else None
        if rt.namespaced and name is not None and namespace is None:
            raise _not_found()
        if not rt.namespaced:
            namespace = ""
        if sub is not None and sub not in rt.subresources():
            raise _not_found()
        return Route(rt, namespace, name, sub)

    async def _serve(self, request: web.Request, route: Route, *, legacy_watch: bool) -> web.StreamResponse:
        method = request.method
        rt = route.rt
        if rt.storage_key == ("metrics.k8s.io", "pods"):
            if method != "GET" or _bool(request.query.get("watch")) or legacy_watch:
                raise errors.MethodNotAllowed(
                    "the server does not allow this method on the requested resource"
                )
            return self._metrics(request, route)
        if route.name is None:
            if method == "GET":
                if legacy_watch or _bool(request.query.get("watch")):
                    return await self._watch(request, route)
                return self._list(request, route)
            if method == "POST":
                return await self._create(request, route)
            if method == "DELETE":
                return await self._delete_collection(request, route)
            raise errors.MethodNotAllowed("the server does not allow this method on the requested resource")
        if legacy_watch:
            return await self._watch(request, route)
        if method == "GET":
            return self._get(request, route)
        if method == "PUT":
            return await self._update(request, route)
        if method == "PATCH":
            return await self._patch(request, route)
        if method == "DELETE" and route.subresource is None:
            return await self._delete(request, route)
        raise errors.MethodNotAllowed("the server does not allow this method on the requested resource")

    # ----- rendering -----------------------------------------------------------------------------

    def _render(self, rt: resources.ResourceType, obj: JsonDict) -> JsonDict:
        if rt.custom and obj.get("apiVersion") != rt.api_version:
            return {**obj, "apiVersion": rt.api_version}
        return obj

    def _raw(self, rt: resources.ResourceType, entry: store.Entry) -> bytes:
        if rt.custom and entry.obj.get("apiVersion") != rt.api_version:
            return store.dumps(self._render(rt, entry.obj))
        return entry.raw

    def _object_response(
        self, request: web.Request, rt: resources.ResourceType, obj: JsonDict, status: int = 200
    ) -> web.Response:
        wants, _ = _wants(request)
        if wants == "table":
            doc = tables.table(
                rt,
                [self._render(rt, obj)],
                resource_version=obj["metadata"].get("resourceVersion", ""),
                include=request.query.get("includeObject", "Metadata"),
            )
            return _json_response(doc, status)
        if wants == "partial":
            return _json_response(tables.partial_metadata(obj), status)
        return _json_response(self._render(rt, obj), status)

    # ----- reads ---------------------------------------------------------------------------------

    def _selectors(
        self, request: web.Request, rt: resources.ResourceType
    ) -> tuple[selectors.LabelSelector, selectors.FieldSelector]:
        labels = selectors.parse_labels(request.query.get("labelSelector"))
        fields = selectors.parse_fields(request.query.get("fieldSelector"), kind=rt.kind)
        return labels, fields

    def _list(self, request: web.Request, route: Route) -> web.Response:
        rt = route.rt
        labels, fields = self._selectors(request, rt)
        query = request.query
        if query.get("resourceVersionMatch") == "Exact":
            wanted = _int(query.get("resourceVersion"), "resourceVersion")
            if wanted is not None and wanted != self.store.resource_version:
                raise errors.Gone(f"too old resource version: {wanted} ({self.store.resource_version})")
        result = self.store.list_page(
            rt,
            namespace=(route.namespace or None) if rt.namespaced else None,
            labels=labels,
            fields=fields,
            limit=_int(query.get("limit"), "limit"),
            continue_token=query.get("continue") or None,
        )
        wants, _ = _wants(request)
        if wants == "table":
            doc = tables.table(
                rt,
                [self._render(rt, e.obj) for e in result.items],
                resource_version=str(result.resource_version),
                include=query.get("includeObject", "Metadata"),
                continue_token=result.continue_token,
                remaining=result.remaining,
            )
            return _json_response(doc)
        meta: JsonDict = {"resourceVersion": str(result.resource_version)}
        if result.continue_token:
            meta["continue"] = result.continue_token
        if result.remaining is not None:
            meta["remainingItemCount"] = result.remaining
        if wants == "partial":
            items = [store.dumps(tables.partial_metadata(e.obj)) for e in result.items]
            head = {"kind": "PartialObjectMetadataList", "apiVersion": "meta.k8s.io/v1", "metadata": meta}
        else:
            items = [self._raw(rt, e) for e in result.items]
            head = {"kind": rt.list_kind, "apiVersion": rt.api_version, "metadata": meta}
        prefix = store.dumps(head)[:-1]
        return _json_response(prefix + b',"items":[' + b",".join(items) + b"]}")

    def _get(self, request: web.Request, route: Route) -> web.StreamResponse:
        assert route.name is not None
        rt = route.rt
        obj = self.store.get(rt, route.namespace or "", route.name)
        if route.subresource == "log":
            return web.Response(
                text=f"sandbox: pod {route.name} runs no real container, so it has no logs\n",
                content_type="text/plain",
            )
        if route.subresource == "scale":
            return _json_response(self._scale(rt, obj))
        return self._object_response(request, rt, obj)

    def _metrics(self, request: web.Request, route: Route) -> web.Response:
        labels = selectors.parse_labels(request.query.get("labelSelector"))
        items = self.metrics(route.namespace or None, route.name)
        if route.name is not None:
            if not items:
                raise errors.NotFound.of(group="metrics.k8s.io", plural="pods", name=route.name)
            return _json_response(items[0])
        items = [i for i in items if labels.matches(i["metadata"].get("labels"))]
        return _json_response(
            {
                "kind": "PodMetricsList",
                "apiVersion": "metrics.k8s.io/v1beta1",
                "metadata": {},
                "items": items,
            }
        )

    # ----- scale ---------------------------------------------------------------------------------

    def _scale(self, rt: resources.ResourceType, obj: JsonDict) -> JsonDict:
        spec = rt.scale or resources.ScaleSpec()
        meta = obj["metadata"]
        replicas = tables.jsonpath(obj, spec.spec_replicas_path)
        status_replicas = tables.jsonpath(obj, spec.status_replicas_path)
        selector = ""
        if spec.label_selector_path:
            raw = tables.jsonpath(obj, spec.label_selector_path)
            if isinstance(raw, dict):
                selector = selectors.to_string(raw)
            elif isinstance(raw, str):
                selector = raw
        status: JsonDict = {"replicas": int(status_replicas or 0)}
        if selector:
            status["selector"] = selector
        return {
            "kind": "Scale",
            "apiVersion": "autoscaling/v1",
            "metadata": {
                k: meta[k]
                for k in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp")
                if k in meta
            },
            "spec": {"replicas": int(replicas or 0)},
            "status": status,
        }

    def _write_scale(
        self, request: web.Request, rt: resources.ResourceType, obj: JsonDict, scale: JsonDict
    ) -> web.Response:
        replicas = (scale.get("spec") or {}).get("replicas")
        name = obj["metadata"]["name"]
        if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0:
            raise errors.Invalid.of(
                kind="Scale",
                group="autoscaling",
                name=name,
                causes=[
                    (
                        "FieldValueInvalid",
                        "spec.replicas",
                        f"Invalid value: {replicas}: must be greater than or equal to 0",
                    )
                ],
            )
        sent_rv = (scale.get("metadata") or {}).get("resourceVersion")
        if sent_rv and str(sent_rv) != obj["metadata"]["resourceVersion"]:
            raise errors.Conflict.stale(group=rt.group, plural=rt.plural, name=name)
        new = store.thaw(obj)
        path = [p for p in (rt.scale or resources.ScaleSpec()).spec_replicas_path.split(".") if p]
        node = new
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = replicas
        new["metadata"].pop("resourceVersion", None)
        updated = self.store.update(
            rt, new, manager=field_manager(request), subresource="scale", dry_run=self._dry_run(request)
        )
        return _json_response(self._scale(rt, updated))

    # ----- writes --------------------------------------------------------------------------------

    def _dry_run(self, request: web.Request) -> bool:
        values = request.query.getall("dryRun", [])
        for value in values:
            if value != "All":
                raise errors.BadRequest(f'unsupported dryRun value "{value}": only "All" is supported')
        return bool(values)

    async def _body(self, request: web.Request) -> Any:
        raw = await request.read()
        if not raw:
            raise errors.BadRequest("the request body is empty")
        ctype = request.content_type
        if ctype == "application/vnd.kubernetes.protobuf":
            return protobuf.decode(raw)
        if "protobuf" in ctype or "cbor" in ctype:
            raise errors.UnsupportedMediaType(
                "the body of the request was in an unknown format - accepted media types include: "
                "application/json, application/yaml"
            )
        try:
            if ctype.endswith("yaml"):
                # Apply bodies are usually JSON (valid YAML): parse those as JSON, far faster.
                try:
                    return json.loads(raw)
                except ValueError:
                    return yaml.load(raw, Loader=_YAML_LOADER)  # noqa: S506 - a safe loader
            return json.loads(raw)
        except (ValueError, yaml.YAMLError) as exc:
            raise errors.BadRequest(f"the body of the request could not be decoded: {exc}") from exc

    def _check_identity(self, route: Route, obj: Any, *, creating: bool) -> JsonDict:
        if not isinstance(obj, dict):
            raise errors.BadRequest("the body of the request must be a JSON object")
        meta = obj.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise errors.BadRequest("metadata must be an object")
        rt = route.rt
        if rt.namespaced:
            sent = meta.get("namespace")
            if sent and sent != route.namespace:
                raise errors.BadRequest(
                    "the namespace of the provided object does not match the namespace sent on the request"
                )
            meta["namespace"] = route.namespace
        if route.name is not None and not creating:
            sent_name = meta.get("name")
            if sent_name and sent_name != route.name:
                raise errors.BadRequest(
                    f"the name of the object ({sent_name}) does not match the name on the URL ({route.name})"
                )
            meta["name"] = route.name
        kind = obj.get("kind")
        if kind and kind != rt.kind and route.subresource != "scale":
            raise errors.BadRequest(
                f"the API version in the data ({obj.get('apiVersion')}) does not match the expected API "
                f"version ({rt.api_version}) or kind {kind!r} is not {rt.kind!r}"
            )
        return obj

    async def _create(self, request: web.Request, route: Route) -> web.Response:
        rt = route.rt
        obj = self._check_identity(route, await self._body(request), creating=True)
        created = self.store.create(rt, obj, manager=field_manager(request), dry_run=self._dry_run(request))
        return self._object_response(request, rt, created, 201)

    async def _update(self, request: web.Request, route: Route) -> web.Response:
        rt = route.rt
        body = self._check_identity(route, await self._body(request), creating=False)
        if route.subresource == "scale":
            current = self.store.get(rt, route.namespace or "", body["metadata"]["name"])
            return self._write_scale(request, rt, current, body)
        if route.subresource == "finalize":
            return self._object_response(request, rt, self.store.get(rt, "", body["metadata"]["name"]))
        updated = self.store.update(
            rt,
            body,
            manager=field_manager(request),
            subresource=route.subresource or "",
            dry_run=self._dry_run(request),
        )
        return self._object_response(request, rt, updated)

    async def _patch(self, request: web.Request, route: Route) -> web.Response:
        assert route.name is not None
        rt = route.rt
        kind = PATCH_TYPES.get(request.content_type)
        accepted = [t for t, k in PATCH_TYPES.items() if not (k == "strategic" and rt.custom)]
        if kind is None or (kind == "strategic" and rt.custom):
            raise errors.UnsupportedMediaType(
                "the body of the request was in an unknown format - accepted media types include: "
                + ", ".join(accepted)
            )
        body = await self._body(request)
        namespace = route.namespace or ""
        dry_run = self._dry_run(request)
        if kind == "apply":
            return self._apply(request, route, body, dry_run=dry_run)
        if "force" in request.query:
            raise errors.Invalid.of(
                kind="PatchOptions",
                group="meta.k8s.io",
                name="",
                causes=[
                    ("FieldValueForbidden", "force", "Forbidden: may not be specified for non-apply patch")
                ],
            )
        current = self.store.get(rt, namespace, route.name)
        target = self._scale(rt, current) if route.subresource == "scale" else store.thaw(current)
        if kind == "json":
            patched = patch.json_patch(target, body)
        elif kind == "merge":
            patched = patch.merge_patch(target, body)
        else:
            patched = patch.strategic_merge(target, body)
        if not isinstance(patched, dict):
            raise errors.BadRequest("the patch must produce an object")
        if route.subresource == "scale":
            return self._write_scale(request, rt, current, patched)
        meta = patched.setdefault("metadata", {})
        meta["name"] = route.name
        if rt.namespaced:
            meta["namespace"] = namespace
        updated = self.store.update(
            rt, patched, manager=field_manager(request), subresource=route.subresource or "", dry_run=dry_run
        )
        return self._object_response(request, rt, updated)

    def _apply(self, request: web.Request, route: Route, body: Any, *, dry_run: bool) -> web.Response:
        assert route.name is not None
        rt = route.rt
        manager = request.query.get("fieldManager")
        if not manager:
            raise errors.Invalid.of(
                kind="PatchOptions",
                group="meta.k8s.io",
                name="",
                causes=[
                    ("FieldValueRequired", "fieldManager", "Required value: is required for apply patch")
                ],
            )
        if not isinstance(body, dict):
            raise errors.BadRequest("the applied configuration must be an object")
        if route.subresource == "scale":
            raise errors.UnsupportedMediaType(
                "apply is not supported on the scale subresource in the sandbox"
            )
        if body.get("apiVersion") != rt.api_version or body.get("kind") != rt.kind:
            raise errors.BadRequest(
                f"the API version in the data ({body.get('apiVersion')}) and kind ({body.get('kind')}) "
                "do not "
                f"match the request ({rt.api_version}, {rt.kind})"
            )
        body = self._check_identity(route, body, creating=False)
        namespace = route.namespace or ""
        current = self.store.find(rt.storage_key, namespace, route.name)
        if current is None and route.subresource:
            raise errors.NotFound.of(group=rt.group, plural=rt.plural, name=route.name)
        applied = dict(body)
        if route.subresource == "status":
            applied = {
                "apiVersion": rt.api_version,
                "kind": rt.kind,
                "metadata": {k: v for k, v in body["metadata"].items() if k in ("name", "namespace")},
                "status": body.get("status", {}),
            }
        elif rt.status_subresource:
            applied.pop("status", None)
        sent_rv = body["metadata"].get("resourceVersion")
        if current is not None and sent_rv and str(sent_rv) != current["metadata"]["resourceVersion"]:
            raise errors.Conflict.stale(group=rt.group, plural=rt.plural, name=route.name)
        merged = apply.server_side_apply(
            current,
            applied,
            manager=manager,
            force=_bool(request.query.get("force")),
            api_version=rt.api_version,
            subresource=route.subresource or "",
            now=store.now(),
        )
        managed = merged["metadata"].pop("managedFields", [])
        if current is None:
            created = self.store.create(rt, merged, manager=manager, dry_run=dry_run, managed_fields=managed)
            return self._object_response(request, rt, created, 201)
        merged["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
        if route.subresource != "status" and rt.status_subresource and "status" in current:
            merged["status"] = current["status"]
        updated = self.store.update(
            rt,
            merged,
            manager=manager,
            subresource=route.subresource or "",
            dry_run=dry_run,
            managed_fields=managed,
        )
        return self._object_response(request, rt, updated)

    async def _delete_options(self, request: web.Request) -> JsonDict:
        options: JsonDict = {}
        raw = await request.read()
        if raw:
            try:
                parsed = json.loads(raw)
            except ValueError as exc:
                raise errors.BadRequest(f"the DeleteOptions could not be decoded: {exc}") from exc
            if isinstance(parsed, dict):
                options = parsed
        query = request.query
        if "propagationPolicy" in query:
            options["propagationPolicy"] = query["propagationPolicy"]
        if "orphanDependents" in query:
            options["orphanDependents"] = _bool(query["orphanDependents"])
        if options.get("orphanDependents") is not None and "propagationPolicy" not in options:
            options["propagationPolicy"] = "Orphan" if options["orphanDependents"] else "Background"
        return options

    async def _delete(self, request: web.Request, route: Route) -> web.Response:
        assert route.name is not None
        rt = route.rt
        options = await self._delete_options(request)
        obj, gone = self.store.delete(
            rt,
            route.namespace or "",
            route.name,
            propagation=options.get("propagationPolicy"),
            preconditions=options.get("preconditions"),
            dry_run=self._dry_run(request) or bool(options.get("dryRun")),
        )
        if not gone or rt.storage_key in RETURNS_DELETED_OBJECT or rt.custom:
            return self._object_response(request, rt, obj)
        details: JsonDict = {"name": route.name, "kind": rt.plural, "uid": obj["metadata"]["uid"]}
        if rt.group:
            details["group"] = rt.group
        return _json_response(
            {
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Success",
                "details": details,
            }
        )

    async def _delete_collection(self, request: web.Request, route: Route) -> web.Response:
        rt = route.rt
        options = await self._delete_options(request)
        labels, fields = self._selectors(request, rt)
        result = self.store.list_page(
            rt, namespace=(route.namespace or None) if rt.namespaced else None, labels=labels, fields=fields
        )
        deleted: list[JsonDict] = []
        for entry in result.items:
            meta = entry.obj["metadata"]
            with contextlib.suppress(errors.NotFound):
                obj, _ = self.store.delete(
                    rt,
                    meta.get("namespace", ""),
                    meta["name"],
                    propagation=options.get("propagationPolicy"),
                    dry_run=self._dry_run(request),
                )
                deleted.append(self._render(rt, obj))
        return _json_response(
            {
                "kind": rt.list_kind,
                "apiVersion": rt.api_version,
                "metadata": {"resourceVersion": str(self.store.resource_version)},
                "items": deleted,
            }
        )

    # ----- watch ---------------------------------------------------------------------------------

    async def _watch(self, request: web.Request, route: Route) -> web.StreamResponse:
        rt = route.rt
        query = request.query
        labels, fields = self._selectors(request, rt)
        if route.name is not None:
            fields = selectors.FieldSelector(
                (
                    *fields.requirements,
                    *selectors.parse_fields(f"metadata.name={route.name}", kind=rt.kind).requirements,
                )
            )
        timeout = _int(query.get("timeoutSeconds"), "timeoutSeconds")
        deadline = DEFAULT_WATCH_TIMEOUT if timeout is None or timeout <= 0 else float(timeout)
        bookmarks = _bool(query.get("allowWatchBookmarks"))
        wants, _ = _wants(request)
        rv_text = query.get("resourceVersion", "")
        send_initial = _bool(query.get("sendInitialEvents"))
        since = None if rv_text in ("", "0") or send_initial else _int(rv_text, "resourceVersion")
        response = web.StreamResponse(status=200, headers={"Content-Type": JSON, "Cache-Control": "no-cache"})
        response.enable_chunked_encoding()
        gone: errors.Gone | None = None
        watcher: store.Watcher | None = None
        if self.forced_gone > 0:
            self.forced_gone -= 1
            gone = errors.Gone(f"too old resource version: {rv_text or 0} ({self.store.resource_version})")
        else:
            try:
                watcher = self.store.watch(
                    rt,
                    namespace=(route.namespace or None) if rt.namespaced else None,
                    labels=labels,
                    fields=fields,
                    since=since,
                )
            except errors.Gone as exc:
                gone = exc
        if gone is not None or watcher is None:
            error = gone or errors.Gone("watch expired")
            await response.prepare(request)
            await response.write(store.dumps({"type": "ERROR", "object": error.status()}) + b"\n")
            await response.write_eof()
            return response
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline
        next_bookmark = loop.time() + self.bookmark_interval
        headers_sent = False
        initial_end_pending = send_initial and bookmarks
        # From here on the watcher is registered: whatever ends the request (a client gone before the
        # headers went out included) must unregister it, or it would collect events for nobody.
        try:
            await response.prepare(request)
            while True:
                remaining = end - loop.time()
                if remaining <= 0:
                    break
                wait = remaining
                if bookmarks:
                    wait = max(0.0, min(wait, next_bookmark - loop.time()))
                if initial_end_pending and watcher.pending == 0:
                    wait = 0.0
                batch = await watcher.next_batch(wait=wait)
                if batch is None:
                    break
                if batch:
                    if wants == "table":
                        chunks = []
                        for event in batch:
                            chunks.append(self._table_event(rt, event, headers=not headers_sent))
                            headers_sent = True
                        await response.write(b"".join(chunks))
                    elif rt.custom:
                        await response.write(b"".join(self._custom_line(rt, e) for e in batch))
                    else:
                        await response.write(b"".join(e.line() for e in batch))
                if watcher.pending:
                    continue
                if initial_end_pending:
                    initial_end_pending = False
                    await response.write(self._bookmark(rt, initial_end=True))
                    next_bookmark = loop.time() + self.bookmark_interval
                elif bookmarks and loop.time() >= next_bookmark:
                    await response.write(self._bookmark(rt, initial_end=False))
                    next_bookmark = loop.time() + self.bookmark_interval
            if bookmarks and not watcher.closed:
                await response.write(self._bookmark(rt, initial_end=False))
            with contextlib.suppress(ConnectionResetError):
                await response.write_eof()
        except ConnectionResetError:
            pass
        finally:
            self.store.unwatch(watcher)
        return response

    def _bookmark(self, rt: resources.ResourceType, *, initial_end: bool) -> bytes:
        meta: JsonDict = {"resourceVersion": str(self.store.resource_version), "creationTimestamp": None}
        if initial_end:
            meta["annotations"] = {"k8s.io/initial-events-end": "true"}
        return (
            store.dumps(
                {
                    "type": "BOOKMARK",
                    "object": {"kind": rt.kind, "apiVersion": rt.api_version, "metadata": meta},
                }
            )
            + b"\n"
        )

    def _custom_line(self, rt: resources.ResourceType, event: store.Event) -> bytes:
        if event.obj.get("apiVersion") == rt.api_version:
            return event.line()
        return store.dumps({"type": event.type, "object": self._render(rt, event.obj)}) + b"\n"

    def _table_event(self, rt: resources.ResourceType, event: store.Event, *, headers: bool) -> bytes:
        doc = tables.table(
            rt,
            [self._render(rt, event.obj)],
            resource_version=str(event.rv),
            include="Metadata",
            headers=headers,
        )
        return store.dumps({"type": event.type, "object": doc}) + b"\n"

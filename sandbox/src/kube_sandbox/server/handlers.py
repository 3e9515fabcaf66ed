"""The verbs: get, list, create, update, patch (merge, JSON, strategic, apply), delete, and subresources.

Each handler parses the body and the query, calls the store, and renders the result with
:mod:`kube_sandbox.server.wire`: ``status`` and ``scale`` subresources, ``dryRun=All``,
``DeleteOptions`` with propagation and preconditions, server-side apply with ``fieldManager`` and
``force``, and ``metrics.k8s.io`` pod metrics from the simulator. The watch verb streams and
lives in :mod:`kube_sandbox.server.watching`; which handler a request reaches is decided in
:mod:`kube_sandbox.server.routing`.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from typing import Any

import yaml
from aiohttp import web

from kube_sandbox import admission, apply, errors, patch, protobuf, resources, selectors, store, tables, users
from kube_sandbox.server import wire

# libyaml's loader when PyYAML was built with it (the pure-Python one is ten times slower).
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

JsonDict = wire.JsonDict
MetricsProvider = Callable[[str | None, str | None], list[JsonDict]]

RETURNS_DELETED_OBJECT = frozenset(
    {
        ("", "pods"),
        ("", "services"),
        ("", "namespaces"),
        ("", "persistentvolumeclaims"),
        ("apiextensions.k8s.io", "customresourcedefinitions"),
    }
)
# The options kube-apiserver hands admission for each operation (patches and applies are updates
# or creates, so they carry UpdateOptions or CreateOptions).
_OPTIONS_KIND = {"CREATE": "CreateOptions", "UPDATE": "UpdateOptions", "DELETE": "DeleteOptions"}
USER_KEY = web.RequestKey("kube_sandbox.user", users.User)
REVIEW_KEY = web.RequestKey("kube_sandbox.review", admission.Review)

PATCH_TYPES = {
    "application/json-patch+json": "json",
    "application/merge-patch+json": "merge",
    "application/strategic-merge-patch+json": "strategic",
    "application/apply-patch+yaml": "apply",
}


class Handlers:
    """The request handlers of resource paths, one per verb, over a :class:`store.Store`."""

    def __init__(
        self, *, st: store.Store, metrics: MetricsProvider, admission: admission.Admission | None = None
    ) -> None:
        self.store = st
        self.metrics = metrics
        self.admission = admission

    # ----- admission -----------------------------------------------------------------------------

    def _admit(
        self,
        request: web.Request,
        route: wire.Route,
        operation: str,
        *,
        name: str,
        namespace: str | None = None,
        verb: str = "",
        scale: bool = False,
    ) -> store.Admit:
        """The store's admission hook for this request (``scale``: the Scale of each object is judged)."""
        rt = route.rt
        review = request.get(REVIEW_KEY)
        if review is None:
            review = request[REVIEW_KEY] = admission.Review()
        options: JsonDict = {"kind": _OPTIONS_KIND[operation], "apiVersion": "meta.k8s.io/v1"}
        if request.query.get("fieldManager"):
            options["fieldManager"] = request.query["fieldManager"]
        dry_run = bool(request.query.getall("dryRun", []))
        if dry_run:
            options["dryRun"] = ["All"]
        attrs = admission.Attributes(
            operation=operation,
            group=rt.group,
            version=rt.version,
            resource=rt.plural,
            subresource=route.subresource or "",
            kind_group="autoscaling" if scale else rt.group,
            kind_version="v1" if scale else rt.version,
            kind="Scale" if scale else rt.kind,
            namespace=(route.namespace or "") if namespace is None else namespace,
            name=name,
            user=request[USER_KEY],
            dry_run=dry_run,
            options=options,
            verb=verb,
        )
        admit = admission.run(self.admission, attrs, review)
        if not scale:
            return admit

        def admit_scale(obj: JsonDict | None, old: JsonDict | None) -> None:
            # kube-apiserver judges the scale subresource by the Scale objects, not the parent.
            admit(self._scale(rt, obj) if obj else None, self._scale(rt, old) if old else None)

        return admit_scale

    # ----- reads ---------------------------------------------------------------------------------

    def list_collection(self, request: web.Request, route: wire.Route) -> web.Response:
        """List a collection: paginated, filtered, as JSON, Table or metadata."""
        rt = route.rt
        labels, fields = wire.selectors_of(request, rt)
        query = request.query
        if query.get("resourceVersionMatch") == "Exact":
            wanted = wire.parse_int(query.get("resourceVersion"), "resourceVersion")
            if wanted is not None and wanted != self.store.resource_version:
                raise errors.Gone(f"too old resource version: {wanted} ({self.store.resource_version})")
        result = self.store.list_page(
            rt,
            namespace=(route.namespace or None) if rt.namespaced else None,
            labels=labels,
            fields=fields,
            limit=wire.parse_int(query.get("limit"), "limit"),
            continue_token=query.get("continue") or None,
        )
        wants, _ = wire.representation(request)
        if wants == "table":
            doc = tables.table(
                rt,
                [wire.render(rt, e.obj) for e in result.items],
                resource_version=str(result.resource_version),
                include=query.get("includeObject", "Metadata"),
                continue_token=result.continue_token,
                remaining=result.remaining,
            )
            return wire.json_response(doc)
        meta: JsonDict = {"resourceVersion": str(result.resource_version)}
        if result.continue_token:
            meta["continue"] = result.continue_token
        if result.remaining is not None:
            meta["remainingItemCount"] = result.remaining
        if wants == "partial":
            items = [store.dumps(tables.partial_metadata(e.obj)) for e in result.items]
            head = {"kind": "PartialObjectMetadataList", "apiVersion": "meta.k8s.io/v1", "metadata": meta}
        else:
            items = [wire.raw(rt, e) for e in result.items]
            head = {"kind": rt.list_kind, "apiVersion": rt.api_version, "metadata": meta}
        prefix = store.dumps(head)[:-1]
        return wire.json_response(prefix + b',"items":[' + b",".join(items) + b"]}")

    def get(self, request: web.Request, route: wire.Route) -> web.StreamResponse:
        """Get one object, or its ``scale`` or ``log`` subresource."""
        assert route.name is not None
        rt = route.rt
        obj = self.store.get(rt, route.namespace or "", route.name)
        if route.subresource == "log":
            return web.Response(
                text=f"sandbox: pod {route.name} runs no real container, so it has no logs\n",
                content_type="text/plain",
            )
        if route.subresource == "scale":
            return wire.json_response(self._scale(rt, obj))
        return wire.object_response(request, rt, obj)

    def pod_metrics(self, request: web.Request, route: wire.Route) -> web.Response:
        """Answer ``metrics.k8s.io`` pods: one PodMetrics or a filtered list."""
        labels = selectors.parse_labels(request.query.get("labelSelector"))
        items = self.metrics(route.namespace or None, route.name)
        if route.name is not None:
            if not items:
                raise errors.NotFound.of(group="metrics.k8s.io", plural="pods", name=route.name)
            return wire.json_response(items[0])
        items = [i for i in items if labels.matches(i["metadata"].get("labels"))]
        return wire.json_response(
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
        self, request: web.Request, route: wire.Route, obj: JsonDict, scale: JsonDict, *, verb: str
    ) -> web.Response:
        rt = route.rt
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
            rt,
            new,
            manager=wire.field_manager(request),
            subresource="scale",
            dry_run=self._dry_run(request),
            admit=self._admit(request, route, "UPDATE", name=name, verb=verb, scale=True),
        )
        return wire.json_response(self._scale(rt, updated))

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

    def _check_identity(self, route: wire.Route, obj: Any, *, creating: bool) -> JsonDict:
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

    async def create(self, request: web.Request, route: wire.Route) -> web.Response:
        """Create an object from the body (POST)."""
        rt = route.rt
        obj = self._check_identity(route, await self._body(request), creating=True)
        dry_run = self._dry_run(request)
        created = self.store.create(
            rt,
            obj,
            manager=wire.field_manager(request),
            dry_run=dry_run,
            admit=self._admit(request, route, "CREATE", name=str(obj["metadata"].get("name") or "")),
        )
        return wire.object_response(request, rt, created, 201)

    async def update(self, request: web.Request, route: wire.Route) -> web.Response:
        """Replace an object or its ``status``, ``scale`` or ``finalize`` subresource (PUT)."""
        rt = route.rt
        body = self._check_identity(route, await self._body(request), creating=False)
        if route.subresource == "scale":
            current = self.store.get(rt, route.namespace or "", body["metadata"]["name"])
            return self._write_scale(request, route, current, body, verb="update")
        if route.subresource == "finalize":
            return wire.object_response(request, rt, self.store.get(rt, "", body["metadata"]["name"]))
        dry_run = self._dry_run(request)
        updated = self.store.update(
            rt,
            body,
            manager=wire.field_manager(request),
            subresource=route.subresource or "",
            dry_run=dry_run,
            admit=self._admit(request, route, "UPDATE", name=str(body["metadata"]["name"]), verb="update"),
        )
        return wire.object_response(request, rt, updated)

    async def patch(self, request: web.Request, route: wire.Route) -> web.Response:
        """Patch an object or a subresource (PATCH), server-side apply included."""
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
            return self._write_scale(request, route, current, patched, verb="patch")
        meta = patched.setdefault("metadata", {})
        meta["name"] = route.name
        if rt.namespaced:
            meta["namespace"] = namespace
        updated = self.store.update(
            rt,
            patched,
            manager=wire.field_manager(request),
            subresource=route.subresource or "",
            dry_run=dry_run,
            admit=self._admit(request, route, "UPDATE", name=route.name, verb="patch"),
        )
        return wire.object_response(request, rt, updated)

    def _apply(self, request: web.Request, route: wire.Route, body: Any, *, dry_run: bool) -> web.Response:
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
            force=wire.parse_bool(request.query.get("force")),
            api_version=rt.api_version,
            subresource=route.subresource or "",
            now=store.now(),
        )
        managed = merged["metadata"].pop("managedFields", [])
        if current is None:
            created = self.store.create(
                rt,
                merged,
                manager=manager,
                dry_run=dry_run,
                managed_fields=managed,
                admit=self._admit(request, route, "CREATE", name=route.name, verb="patch"),
            )
            return wire.object_response(request, rt, created, 201)
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
            admit=self._admit(request, route, "UPDATE", name=route.name, verb="patch"),
        )
        return wire.object_response(request, rt, updated)

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
            options["orphanDependents"] = wire.parse_bool(query["orphanDependents"])
        if options.get("orphanDependents") is not None and "propagationPolicy" not in options:
            options["propagationPolicy"] = "Orphan" if options["orphanDependents"] else "Background"
        return options

    async def delete(self, request: web.Request, route: wire.Route) -> web.Response:
        """Delete one object, honouring DeleteOptions."""
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
            admit=self._admit(request, route, "DELETE", name=route.name, verb="delete"),
        )
        if not gone or rt.storage_key in RETURNS_DELETED_OBJECT or rt.custom:
            return wire.object_response(request, rt, obj)
        details: JsonDict = {"name": route.name, "kind": rt.plural, "uid": obj["metadata"]["uid"]}
        if rt.group:
            details["group"] = rt.group
        return wire.json_response(
            {
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Success",
                "details": details,
            }
        )

    async def delete_collection(self, request: web.Request, route: wire.Route) -> web.Response:
        """Delete every matching object of a collection."""
        rt = route.rt
        options = await self._delete_options(request)
        labels, fields = wire.selectors_of(request, rt)
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
                    admit=self._admit(
                        request,
                        route,
                        "DELETE",
                        name=str(meta["name"]),
                        namespace=str(meta.get("namespace") or ""),
                        verb="deletecollection",
                    ),
                )
                deleted.append(wire.render(rt, obj))
        return wire.json_response(
            {
                "kind": rt.list_kind,
                "apiVersion": rt.api_version,
                "metadata": {"resourceVersion": str(self.store.resource_version)},
                "items": deleted,
            }
        )

"""A minimal OpenAPI v3 publication: enough for kubectl to choose server-side field validation.

kubectl 1.32 (``apply``, ``create``, ``replace``, ``edit``) first asks ``/openapi/v3`` whether the
PATCH operation of the object's kind accepts the ``fieldValidation`` query parameter; with no OpenAPI
at all it gives up with "failed to download openapi" unless ``--validate=false`` is passed. The
sandbox therefore publishes, per group/version, the PATCH operations of its kinds with their
``x-kubernetes-group-version-kind`` and query parameters. It publishes no schemas (``kubectl
explain`` has nothing to show) and no OpenAPI v2.
"""

from __future__ import annotations

import hashlib
from typing import Any

from kube_sandbox import resources, store

JsonDict = dict[str, Any]

_PATCH_PARAMETERS = ("dryRun", "fieldManager", "fieldValidation", "force", "pretty")


def _gv_path(group: str, version: str) -> str:
    return f"apis/{group}/{version}" if group else f"api/{version}"


def document(registry: resources.Registry, *, group: str, version: str) -> JsonDict | None:
    """The OpenAPI v3 document of one group/version, or None when it is not served."""
    types = registry.in_group_version(group=group, version=version)
    if not types:
        return None
    prefix = "/" + _gv_path(group, version)
    paths: JsonDict = {}
    for rt in types:
        if "patch" not in rt.verbs:
            continue
        base = f"{prefix}/namespaces/{{namespace}}/{rt.plural}" if rt.namespaced else f"{prefix}/{rt.plural}"
        operation = {
            "operationId": f"patch{rt.kind}",
            "parameters": [
                {"name": name, "in": "query", "schema": {"type": "string"}, "uniqueItems": True}
                for name in _PATCH_PARAMETERS
            ],
            "responses": {"200": {"description": "OK"}},
            "x-kubernetes-action": "patch",
            "x-kubernetes-group-version-kind": {"group": rt.group, "version": rt.version, "kind": rt.kind},
        }
        paths[f"{base}/{{name}}"] = {"patch": operation}
    return {
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes (sandbox)", "version": "v1.32.0"},
        "paths": paths,
        "components": {"schemas": {}},
    }


def index(registry: resources.Registry) -> JsonDict:
    """The ``/openapi/v3`` discovery document listing every group/version's document."""
    listed: JsonDict = {}
    for group, versions in registry.groups():
        for version in versions:
            doc = document(registry, group=group, version=version)
            if doc is None:
                continue
            digest = hashlib.sha256(store.dumps(doc)).hexdigest()[:32].upper()
            path = _gv_path(group, version)
            listed[path] = {"serverRelativeURL": f"/openapi/v3/{path}?hash={digest}"}
    return {"paths": listed}

"""Discovery and OpenAPI documents: what clients read to learn which resources the sandbox serves.

``/api``, ``/apis``, ``/api/v1``, ``/apis/{group}[/{version}]`` and ``/openapi/v3`` are built from
the resource registry on every request, so CRDs appear and disappear as they are created and
deleted; ``/version`` answers a fixed kube-apiserver version. Kept apart from the routing that
decides which document a path asks for, and from the handlers of the resources themselves.
"""

from __future__ import annotations

from aiohttp import web

from kube_sandbox import openapi, resources
from kube_sandbox.server import wire

JsonDict = wire.JsonDict

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


def api_versions(address: str) -> JsonDict:
    """The ``/api`` document: the core group's versions and the address clients reach."""
    return {
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": address}],
    }


def api_group(group: str, versions: list[str]) -> JsonDict:
    """One group with its versions, the first preferred."""
    listed = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
    return {"name": group, "versions": listed, "preferredVersion": listed[0]}


def group_list(registry: resources.Registry) -> JsonDict:
    """The ``/apis`` document: every named group."""
    return {
        "kind": "APIGroupList",
        "apiVersion": "v1",
        "groups": [api_group(g, vs) for g, vs in registry.groups() if g],
    }


def resource_list(registry: resources.Registry, *, group: str, version: str) -> JsonDict | None:
    """The ``APIResourceList`` of one group version (None when nothing is served there)."""
    types = registry.in_group_version(group=group, version=version)
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


def document(registry: resources.Registry, segments: list[str], *, address: str) -> JsonDict | None:
    """The discovery document a GET of these path segments asks for, or None when it is no such path."""
    if segments == ["api"]:
        return api_versions(address)
    if segments == ["apis"]:
        return group_list(registry)
    if len(segments) == 2 and segments[0] == "api":
        return resource_list(registry, group="", version=segments[1])
    if len(segments) == 2 and segments[0] == "apis":
        for group, versions in registry.groups():
            if group == segments[1] and group:
                return {"kind": "APIGroup", "apiVersion": "v1", **api_group(group, versions)}
        return None
    if len(segments) == 3 and segments[0] == "apis":
        return resource_list(registry, group=segments[1], version=segments[2])
    return None


def openapi_response(registry: resources.Registry, rest: list[str]) -> web.Response:
    """The OpenAPI v3 index (``/openapi/v3``) or one group version's document under it."""
    if not rest:
        return wire.json_response(openapi.index(registry))
    doc = None
    if rest[0] == "api" and len(rest) == 2:
        doc = openapi.document(registry, group="", version=rest[1])
    elif rest[0] == "apis" and len(rest) == 3:
        doc = openapi.document(registry, group=rest[1], version=rest[2])
    if doc is None:
        raise wire.not_found()
    return wire.json_response(doc)

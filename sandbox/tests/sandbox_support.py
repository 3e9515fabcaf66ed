"""Helpers shared by the sandbox tests (the fixtures come from kube_sandbox.pytest_plugin)."""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
from kube_sandbox import profiles
from kubernetes_asyncio import client

T = TypeVar("T")


async def eventually(check: Callable[[], Awaitable[T | None]], *, within: float = 5.0, what: str = "") -> T:
    """Poll ``check`` until it returns something truthy, failing after ``within`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    last: Any = None
    while True:
        last = await check()
        if last:
            return last
        if loop.time() > deadline:
            pytest.fail(f"timed out after {within}s waiting for {what or check}; last value: {last!r}")
        await asyncio.sleep(0.02)


def status_of(exc: client.ApiException) -> dict[str, Any]:
    """The Status body of an API error."""
    body = json.loads(exc.body)
    assert body["kind"] == "Status"
    assert body["apiVersion"] == "v1"
    assert body["status"] == "Failure"
    return body


def statefulset(
    name: str,
    *,
    replicas: int = 1,
    image: str = "postgres:15",
    storage: str | None = "1Gi",
    labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A StatefulSet manifest like the broker provisions."""
    spec: dict[str, Any] = {
        "replicas": replicas,
        "serviceName": name,
        "selector": {"matchLabels": {"app": name}},
        "template": {
            "metadata": {"labels": {"app": name}},
            "spec": {
                "containers": [
                    {
                        "name": "main",
                        "image": image,
                        "ports": [{"containerPort": 5432}],
                        "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}},
                    }
                ]
            },
        },
    }
    if storage:
        spec["volumeClaimTemplates"] = [
            {
                "metadata": {"name": "data"},
                "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": storage}}},
            }
        ]
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": name, "labels": {"app": name, **(labels or {})}},
        "spec": spec,
    }


# The profile's own copy: one definition of Strimzi's CRD in the sandbox distribution.
KAFKA_TOPIC_CRD: dict[str, Any] = copy.deepcopy(profiles.STRIMZI_KAFKA_TOPIC_CRD)

DATABASE_CRD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "databases.platform.company.com"},
    "spec": {
        "group": "platform.company.com",
        "scope": "Namespaced",
        "names": {"plural": "databases", "singular": "database", "kind": "Database", "shortNames": ["db"]},
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
                },
                "subresources": {"status": {}},
            }
        ],
    },
}

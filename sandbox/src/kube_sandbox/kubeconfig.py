"""Kubeconfig files that point stock clients (kubectl, kubernetes-asyncio) at a sandbox."""

from __future__ import annotations

import os
import pathlib
from typing import Any

import yaml

NAME = "sandbox"
DUMMY_TOKEN = "sandbox-not-a-secret"  # noqa: S105 - the sandbox does not authenticate; clients want a token.


def document(*, server: str, namespace: str = "default") -> dict[str, Any]:
    """A kubeconfig with cluster, user and context all named ``sandbox``, plain HTTP, a dummy token."""
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "preferences": {},
        "clusters": [{"name": NAME, "cluster": {"server": server}}],
        "users": [{"name": NAME, "user": {"token": DUMMY_TOKEN}}],
        "contexts": [{"name": NAME, "context": {"cluster": NAME, "user": NAME, "namespace": namespace}}],
        "current-context": NAME,
    }


def write(path: str | os.PathLike[str], *, server: str, namespace: str = "default") -> pathlib.Path:
    """Write the kubeconfig (owner-only permissions, as kubectl does) and return its path."""
    target = pathlib.Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(document(server=server, namespace=namespace), sort_keys=False)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    return target

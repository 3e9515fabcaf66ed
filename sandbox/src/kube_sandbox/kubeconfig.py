"""Kubeconfig files that point stock clients (kubectl, kubernetes-asyncio) at a sandbox.

One cluster, and one user and one context per sandbox user (:mod:`kube_sandbox.users`), each
named after the user. The current context is the first user's, ``sandbox`` by default (the
administrator); ``kubectl --context jane`` acts as the person ``jane@example.com``.
"""

from __future__ import annotations

import base64
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import yaml

from kube_sandbox import users as users_module

NAME = "sandbox"
DUMMY_TOKEN = users_module.ADMIN.token


def document(
    *,
    server: str,
    namespace: str = "default",
    users: Sequence[users_module.User] = users_module.DEFAULT_USERS,
    certificate_authority: bytes | None = None,
) -> dict[str, Any]:
    """A kubeconfig with cluster ``sandbox`` and a user and context per user.

    ``certificate_authority`` (PEM) is the CA of an HTTPS sandbox; without it the server is plain HTTP.
    """
    if not users:
        raise ValueError("a kubeconfig needs at least one user")
    cluster: dict[str, Any] = {"server": server}
    if certificate_authority is not None:
        cluster["certificate-authority-data"] = base64.b64encode(certificate_authority).decode()
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "preferences": {},
        "clusters": [{"name": NAME, "cluster": cluster}],
        "users": [{"name": u.name, "user": {"token": u.bearer_token}} for u in users],
        "contexts": [
            {"name": u.name, "context": {"cluster": NAME, "user": u.name, "namespace": namespace}}
            for u in users
        ],
        "current-context": users[0].name,
    }


def write(
    path: str | os.PathLike[str],
    *,
    server: str,
    namespace: str = "default",
    users: Sequence[users_module.User] = users_module.DEFAULT_USERS,
    certificate_authority: bytes | None = None,
) -> pathlib.Path:
    """Write the kubeconfig (owner-only permissions, as kubectl does) and return its path."""
    target = pathlib.Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    doc = document(
        server=server, namespace=namespace, users=users, certificate_authority=certificate_authority
    )
    text = yaml.safe_dump(doc, sort_keys=False)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    return target

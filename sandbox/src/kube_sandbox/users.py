"""Who is calling: bearer tokens mapped to users, as kube-apiserver's static token file does.

The sandbox has no RBAC (every user may do everything), but it knows who sends a request so that
admission policies can tell people from controllers (``request.userInfo`` in CEL). Each
:class:`User` becomes a user and a context of the kubeconfig the sandbox writes; the first one is
the current context. Tokens are not secrets: the sandbox listens on loopback only.

* A request with a known bearer token is that token's user.
* A request without credentials is the first (default) user, so tools that send none keep
  working as before users existed.
* A request with an unknown token is ``401 Unauthorized``, as from kube-apiserver.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from kube_sandbox import errors


@dataclasses.dataclass(frozen=True)
class User:
    """One identity: ``name`` names its kubeconfig user and context; ``username`` is what policies see."""

    name: str
    username: str
    groups: tuple[str, ...] = ("system:authenticated",)
    token: str = ""
    uid: str = ""

    @property
    def bearer_token(self) -> str:
        """The token its kubeconfig user sends (derived from ``name`` unless given)."""
        return self.token or f"sandbox-token-{self.name}"

    def info(self) -> dict[str, object]:
        """``request.userInfo`` as admission sees it."""
        info: dict[str, object] = {"username": self.username, "groups": list(self.groups)}
        if self.uid:
            info["uid"] = self.uid
        return info


# The administrator a kubeadm or kind cluster's kubeconfig holds; the token is the one kubeconfigs
# of the sandbox have always carried, so existing kubeconfigs stay valid.
ADMIN = User(
    name="sandbox",
    username="kubernetes-admin",
    groups=("kubeadm:cluster-admins", "system:authenticated"),
    token="sandbox-not-a-secret",  # noqa: S106 - a well-known token on a loopback-only sandbox.
)
# A person without special rights: the one whose hand edits drift prevention is there to stop.
JANE = User(name="jane", username="jane@example.com")
DEFAULT_USERS = (ADMIN, JANE)


def service_account(namespace: str, name: str, *, context: str | None = None) -> User:
    """A service account's identity, as pods authenticate with their projected tokens."""
    return User(
        name=context or name,
        username=f"system:serviceaccount:{namespace}:{name}",
        groups=("system:serviceaccounts", f"system:serviceaccounts:{namespace}", "system:authenticated"),
    )


class Users:
    """The sandbox's token table."""

    def __init__(self, users: Iterable[User]) -> None:
        self.all = tuple(users)
        if not self.all:
            raise ValueError("the sandbox needs at least one user (the first is the default)")
        names = [u.name for u in self.all]
        if len(set(names)) != len(names):
            raise ValueError(f"user names must be unique: {names}")
        self._by_token = {u.bearer_token: u for u in self.all}
        if len(self._by_token) != len(self.all):
            raise ValueError("user tokens must be unique")

    @property
    def default(self) -> User:
        """The user of requests without credentials and of the kubeconfig's current context."""
        return self.all[0]

    def authenticate(self, authorization: str | None) -> User:
        """The user an ``Authorization`` header names; ``Unauthorized`` for an unknown token."""
        if not authorization:
            return self.default
        scheme, _, token = authorization.partition(" ")
        user = self._by_token.get(token.strip()) if scheme.lower() == "bearer" else None
        if user is None:
            raise errors.Unauthorized("Unauthorized")
        return user

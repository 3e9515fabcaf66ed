"""Authentication (bearer tokens) and authorization (namespace grants), shared by gRPC and HTTP.

The token file (``broker serve --tokens FILE``) is YAML::

    principals:
      - name: db-manager                 # who, as written to the audit log
        token_sha256: 9f86d0...          # preferred: the file then holds no usable secret
        namespaces: [team-platform]
      - name: jane                       # a person on call
        token_sha256: 2c26b4...
        namespaces: [team-platform]
        approve: [team-platform]         # may approve or reject pending remediations there
      - name: platform-admin
        token: "a-long-random-string"    # plaintext is accepted too
        namespaces: ["*"]                # every namespace

Tokens are compared as SHA-256 digests with ``hmac.compare_digest`` against every entry, with no
early exit, so timing reveals neither a token nor which entry matched. A principal may use exactly
the namespaces it is granted; checks happen before any lookup, so a caller learns nothing about
namespaces it may not use (the answer is the same whether or not a resource exists there).

Approving or rejecting a pending remediation (policy mode ``approve``) needs a grant of its own,
``approve``: namespaces (or ``*``) where the principal may decide, each also in its
``namespaces``. A manager that provisions is not thereby allowed to approve.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import pathlib
from collections.abc import Iterable

import yaml

from broker import errors

ALL_NAMESPACES = "*"


@dataclasses.dataclass(frozen=True)
class Principal:
    """An authenticated caller and the namespaces it may use (``*`` grants all)."""

    name: str
    namespaces: frozenset[str]
    approves: frozenset[str] = frozenset()

    def may_approve(self, namespace: str) -> bool:
        """Whether this principal may approve or reject remediations in ``namespace``."""
        return self.may_use(namespace) and (ALL_NAMESPACES in self.approves or namespace in self.approves)

    def require_approver(self, namespace: str) -> None:
        """Raise PermissionDenied unless this principal holds the approve grant of ``namespace``.

        Call after ``require(namespace)``: a principal not granted the namespace learns nothing more.
        """
        if not self.may_approve(namespace):
            raise errors.PermissionDenied(
                f"principal {self.name!r} may not approve or reject remediations in namespace "
                f"{namespace!r}; ask an administrator to add it to the principal's 'approve' list in "
                "the broker's token file",
                reason="APPROVAL_NOT_GRANTED",
            )

    def may_use(self, namespace: str) -> bool:
        """Whether this principal is granted ``namespace``."""
        return ALL_NAMESPACES in self.namespaces or namespace in self.namespaces

    def require(self, namespace: str) -> None:
        """Raise PermissionDenied unless this principal is granted ``namespace``."""
        if not self.may_use(namespace):
            raise errors.PermissionDenied(
                f"principal {self.name!r} is not granted namespace {namespace!r}; ask an administrator "
                "to add it to the principal's namespaces in the broker's token file"
            )

    def visible(self, namespaces: Iterable[str]) -> list[str]:
        """The subset of ``namespaces`` this principal may use."""
        return [ns for ns in namespaces if self.may_use(ns)]


ANONYMOUS = Principal(
    name="anonymous (--insecure)",
    namespaces=frozenset({ALL_NAMESPACES}),
    approves=frozenset({ALL_NAMESPACES}),
)


@dataclasses.dataclass(frozen=True)
class _Entry:
    digest: bytes
    principal: Principal


class Authenticator:
    """Maps bearer tokens to principals; in insecure mode everyone is ``ANONYMOUS``."""

    def __init__(self, entries: Iterable[_Entry], *, insecure: bool) -> None:
        self._entries = tuple(entries)
        self.insecure = insecure

    @classmethod
    def insecure_mode(cls) -> Authenticator:
        """No authentication at all: for local development only."""
        return cls((), insecure=True)

    @classmethod
    def from_file(cls, path: pathlib.Path) -> Authenticator:
        """Load a token file; a malformed file is a start-up error naming the problem, not the secret."""
        try:
            raw = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as e:
            raise ValueError(f"cannot read token file {path}: {e}") from e
        if not isinstance(raw, dict) or not isinstance(raw.get("principals"), list):
            raise ValueError(f"token file {path} must have a top-level 'principals' list")
        entries = []
        for index, item in enumerate(raw["principals"]):
            where = f"token file {path}, principals[{index}]"
            if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"]:
                raise ValueError(f"{where}: needs a non-empty 'name'")
            namespaces = item.get("namespaces")
            if not isinstance(namespaces, list) or not all(isinstance(n, str) and n for n in namespaces):
                raise ValueError(f"{where} ({item['name']}): 'namespaces' must be a list of names or '*'")
            if isinstance(item.get("token_sha256"), str):
                try:
                    digest = bytes.fromhex(item["token_sha256"])
                except ValueError as e:
                    raise ValueError(f"{where} ({item['name']}): token_sha256 is not hex") from e
                if len(digest) != hashlib.sha256().digest_size:
                    raise ValueError(f"{where} ({item['name']}): token_sha256 must be 64 hex digits")
            elif isinstance(item.get("token"), str) and len(item["token"]) >= 16:
                digest = _digest(item["token"])
            else:
                raise ValueError(
                    f"{where} ({item['name']}): needs 'token_sha256' or a 'token' of at least 16 characters"
                )
            approves = item.get("approve", [])
            if not isinstance(approves, list) or not all(isinstance(n, str) and n for n in approves):
                raise ValueError(f"{where} ({item['name']}): 'approve' must be a list of names or '*'")
            entries.append(
                _Entry(digest, Principal(item["name"], frozenset(namespaces), approves=frozenset(approves)))
            )
        return cls(entries, insecure=False)

    def authenticate(self, authorization: str | None) -> Principal:
        """The principal for an ``Authorization`` header value; Unauthenticated if there is none."""
        if self.insecure:
            return ANONYMOUS
        if not authorization:
            raise errors.Unauthenticated(
                "missing credentials: send the header 'authorization: Bearer <token>'"
            )
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise errors.Unauthenticated("malformed credentials: use 'authorization: Bearer <token>'")
        presented = _digest(token.strip())
        found: Principal | None = None
        for entry in self._entries:
            if hmac.compare_digest(presented, entry.digest):
                found = entry.principal
        if found is None:
            raise errors.Unauthenticated("the bearer token is not valid")
        return found


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()

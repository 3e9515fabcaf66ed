"""Names and addresses the API server hands out: ``generateName`` suffixes and Service ClusterIPs.

Both are allocations kube-apiserver makes on create, independent of where objects are stored; the
ClusterIP counter is part of the persisted :class:`kube_sandbox.store.versions.State`, so a
restart does not hand out an address twice.
"""

from __future__ import annotations

import secrets

_GENERATE_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"


def generate_name(prefix: str) -> str:
    """``prefix`` with five random characters, as kube-apiserver completes ``generateName``."""
    suffix = "".join(secrets.choice(_GENERATE_ALPHABET) for _ in range(5))
    return f"{prefix}{suffix}"


class ServiceIPs:
    """The ClusterIP allocator: a counter over 10.96.0.0/12."""

    def __init__(self, issued: int = 10) -> None:
        self.issued = issued
        """How many addresses have been handed out (persisted, see :class:`State`)."""

    def allocate(self) -> str:
        """The next free ClusterIP in 10.96.0.0/12, as the service IP allocator would hand out."""
        self.issued += 1
        n = self.issued
        return f"10.96.{n // 254}.{n % 254 + 1}"

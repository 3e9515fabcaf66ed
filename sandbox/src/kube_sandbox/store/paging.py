"""Paginated lists: one page's result and the continue token that leads to the next.

The token is kube-apiserver's shape (base64 of ``{"v","rv","start"}``): the list's version and the
last (namespace, name) returned. A token older than the watch window is ``410 Gone``, as after an
etcd compaction; that rule is why decoding takes the oldest resumable version. Separate from the
object store, which only walks its buckets in order.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json

from kube_sandbox import errors
from kube_sandbox.store import values


@dataclasses.dataclass(frozen=True)
class ListResult:
    """One page of a list: the items' serializations, the list's version and the continuation."""

    items: list[values.Entry]
    resource_version: int
    continue_token: str | None
    remaining: int | None


def encode_continue(rv: int, last: tuple[str, str]) -> str:
    """The token to continue a list of version ``rv`` after ``last`` (namespace, name)."""
    payload = values.dumps({"v": "meta.k8s.io/v1", "rv": rv, "start": f"{last[0]}/{last[1]}"})
    return base64.urlsafe_b64encode(payload).decode()


def decode_continue(token: str, *, oldest: int) -> tuple[int, tuple[str, str]]:
    """A token's list version and last (namespace, name); Gone when older than ``oldest``."""
    try:
        data = json.loads(base64.urlsafe_b64decode(token.encode()))
        rv = int(data["rv"])
        ns, _, name = str(data["start"]).partition("/")
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise errors.BadRequest("continue key is not valid: incorrect encoded start resourceVersion") from exc
    if rv < oldest:
        raise errors.Gone(
            "The provided continue parameter is too old to display a consistent list result. "
            "You can start a new list without the continue parameter."
        )
    return rv, (ns, name)

"""Page tokens: where a listing stands, made opaque and bound to the query that read it.

The store pages by position (``model.PageRequest.after``, ``model.Listing.next_after``) and never
sees a token; a token is what a caller holds between two calls, so the service makes and checks it
here, once for both transports. The format is the one the store adapters used to make (url-safe
base64 of ``{"q": digest, "after": [a, b]}``), so tokens handed out before an upgrade keep working.

A token is not signed: anyone can compute a query's digest and forge one. That is harmless (a
position only says where a listing of what the caller may read starts) as long as a forged position
cannot fail the store, so only what the store makes gets through: two short printable-ASCII strings
(resource types, DNS-label names and decimal sequences are nothing else).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json

from broker import errors
from broker.domain import model

Query = model.ResourceQuery | model.EventQuery

# Far longer than any token made here (~130 characters), and checked before anything is decoded,
# so a deeply nested or huge made-up token is refused cheaply instead of exhausting the decoder.
MAX_TOKEN = 512


def token(query: Query, after: model.Position | None) -> str:
    """The opaque token that continues ``query`` after a position; "" when nothing follows."""
    if after is None:
        return ""
    raw = json.dumps({"q": _digest(query), "after": list(after)}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def position(query: Query, token: str) -> model.Position | None:
    """Where a token made for ``query`` continues (``None`` for ""); InvalidArgument otherwise."""
    if not token:
        return None
    try:
        if len(token) > MAX_TOKEN:
            raise ValueError("longer than any token made here")
        raw = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        after = raw["after"]
        if raw["q"] != _digest(query) or not (
            isinstance(after, list) and len(after) == 2 and all(map(_storable, after))
        ):
            raise ValueError("token of another query")
        return after[0], after[1]
    except (ValueError, KeyError, TypeError) as e:
        raise errors.InvalidArgument(
            [
                errors.FieldViolation(
                    "page_token",
                    "is not a token this query returned; repeat the query without it, with the same filters",
                )
            ]
        ) from e


def _storable(part: object) -> bool:
    return isinstance(part, str) and part.isascii() and part.isprintable()


def _digest(query: Query) -> str:
    """A digest of a query's filters by name, so a page token only fits the query that made it."""
    fields = {
        k: sorted(x.value for x in v) if isinstance(v, frozenset) else getattr(v, "value", v)
        for k, v in dataclasses.asdict(query).items()
    }
    return hashlib.sha256(json.dumps([type(query).__name__, fields], sort_keys=True).encode()).hexdigest()[
        :16
    ]

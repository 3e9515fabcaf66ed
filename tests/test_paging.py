"""Page tokens, which the service makes of the store's positions (``broker.paging``).

A token continues only the query that returned it; anything else, another query's token or a made-up
one, is INVALID_ARGUMENT on ``page_token`` (never an unexpected error); and paging through a listing
returns each item exactly once. Tokens keep the format the store adapters used to make, so tokens
handed out before an upgrade keep working. The same over gRPC, for both listings, is checked in
``test_provisioning``.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import pathlib
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest
from test_store_contract import NS, command, event_about, ready

from broker import auth, errors, paging, service
from broker.domain import catalog, model
from broker.store import sqlite

MESSAGE = "is not a token this query returned; repeat the query without it, with the same filters"
PRINCIPAL = auth.Principal("admin", frozenset({NS}))
RESOURCES = model.ResourceQuery(namespace=NS, resource_type=model.ResourceType.DATABASE)
EVENTS = model.EventQuery(
    namespace=NS,
    kinds=frozenset({model.EventKind.DRIFT_DETECTED, model.EventKind.COST_ALERT}),
    after_sequence=3,
)


def rejected(call: Any) -> errors.InvalidArgument:
    """The InvalidArgument ``call()`` raises, checked to be about the page token only."""
    with pytest.raises(errors.InvalidArgument) as info:
        call()
    assert [(v.field, v.description) for v in info.value.violations] == [("page_token", MESSAGE)]
    return info.value


def forged(query: paging.Query, after: object) -> str:
    """A made-up token that carries ``query``'s digest (anyone can compute it) and any ``after``."""
    digest = json.loads(base64.urlsafe_b64decode(paging.token(query, ("a", "b")) + "=="))["q"]
    return encoded({"q": digest, "after": after})


def encoded(value: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


# The token itself -----------------------------------------------------------------------------------


def test_tokens_made_before_the_move_to_the_service_still_continue_their_query() -> None:
    """Byte for byte what the store adapters made (``codec.encode_page_token``) for these queries."""
    made_by_the_store: dict[str, tuple[paging.Query, model.Position]] = {
        "eyJxIjogIjllMDRiYzg4NjViNTE2MjYiLCAiYWZ0ZXIiOiBbImRhdGFiYXNlIiwgImRiLTAxIl19": (
            RESOURCES,
            ("database", "db-01"),
        ),
        "eyJxIjogIjk5YjAwYjEyZWJhYmM0NWYiLCAiYWZ0ZXIiOiBbInNlcSIsICI0MiJdfQ": (EVENTS, ("seq", "42")),
    }
    for token, (query, after) in made_by_the_store.items():
        assert paging.token(query, after) == token
        assert paging.position(query, token) == after


def test_no_token_starts_at_the_beginning_and_no_position_makes_none() -> None:
    assert paging.position(RESOURCES, "") is None
    assert paging.token(RESOURCES, None) == ""


def test_the_longest_position_the_store_makes_fits_a_token() -> None:
    after = ("database", "a" * 52)  # the longest resource type and resource name
    token = paging.token(RESOURCES, after)
    assert re.fullmatch(r"[A-Za-z0-9_-]+", token), token  # url-safe, unpadded
    assert paging.position(RESOURCES, token) == after


@pytest.mark.parametrize(
    "other",
    [
        pytest.param(model.ResourceQuery(namespace=NS), id="filter-dropped"),
        pytest.param(
            model.ResourceQuery(namespace=NS, resource_type=model.ResourceType.CACHE), id="type-changed"
        ),
        pytest.param(
            model.ResourceQuery(
                namespace=model.Namespace("team-other"), resource_type=model.ResourceType.DATABASE
            ),
            id="namespace-changed",
        ),
        pytest.param(model.EventQuery(namespace=NS), id="another-listing"),
    ],
)
def test_a_token_of_another_query_is_refused(other: paging.Query) -> None:
    token = paging.token(RESOURCES, ("database", "db-01"))
    rejected(lambda: paging.position(other, token))


@pytest.mark.parametrize(
    "other",
    [
        pytest.param(model.EventQuery(namespace=NS, kinds=EVENTS.kinds), id="after-sequence-changed"),
        pytest.param(
            model.EventQuery(namespace=NS, kinds=frozenset({model.EventKind.COST_ALERT}), after_sequence=3),
            id="kinds-changed",
        ),
        pytest.param(model.ResourceQuery(namespace=NS), id="another-listing"),
    ],
)
def test_an_event_token_of_another_query_is_refused(other: paging.Query) -> None:
    rejected(lambda: paging.position(other, paging.token(EVENTS, ("seq", "42"))))


GARBAGE = [
    pytest.param("not-a-token", id="words"),
    pytest.param("é", id="not-ascii"),
    pytest.param("!!!!", id="not-base64"),
    pytest.param(encoded("text"), id="a-string"),
    pytest.param(encoded(["q", "after"]), id="a-list"),
    pytest.param(encoded(7), id="a-number"),
    pytest.param(encoded({"after": ["database", "db"]}), id="no-digest"),
    pytest.param(base64.urlsafe_b64encode(b"\xff\xfe{").decode(), id="not-utf8"),
    pytest.param(base64.urlsafe_b64encode(b"[" * 380).decode(), id="nested-within-the-length-bound"),
    pytest.param(base64.urlsafe_b64encode(b"[" * 100_000).decode(), id="deeply-nested"),
    pytest.param("A" * (paging.MAX_TOKEN + 1), id="too-long"),
]


@pytest.mark.parametrize("token", GARBAGE)
def test_a_made_up_token_is_refused(token: str) -> None:
    rejected(lambda: paging.position(RESOURCES, token))


@pytest.mark.parametrize(
    "after",
    [
        pytest.param(None, id="none"),
        pytest.param(["database"], id="one-part"),
        pytest.param(["database", "db", "x"], id="three-parts"),
        pytest.param("ab", id="a-string-of-two"),
        pytest.param({"a": 1, "b": 2}, id="an-object-of-two"),
        pytest.param(["database", 7], id="a-number"),
        pytest.param(["database", "db\x00"], id="nul"),
        pytest.param(["database", "\ud800"], id="lone-surrogate"),
        pytest.param(["database", "dé"], id="not-ascii"),
    ],
)
def test_a_forged_token_with_the_right_digest_gets_no_unstorable_position_through(after: object) -> None:
    """What a store could fail on (NUL in PostgreSQL text, surrogates in UTF-8) is refused here."""
    rejected(lambda: paging.position(RESOURCES, forged(RESOURCES, after)))


# Through the service ----------------------------------------------------------------------------------


@pytest.fixture
async def store(tmp_path: pathlib.Path) -> AsyncIterator[sqlite.Store]:
    opened = await sqlite.Store.open(tmp_path)
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
def svc(store: sqlite.Store) -> service.BrokerService:
    return service.BrokerService(store=store, catalog=catalog.DEFAULT_CATALOG)


@pytest.mark.parametrize("page_size", [1, 2, 4, 7, 8])
async def test_paging_through_resource_states_returns_each_exactly_once(
    store: sqlite.Store, svc: service.BrokerService, page_size: int
) -> None:
    names = {f"db-{i}" for i in range(7)}
    for name in names:
        await store.provision(command(name))
    seen: list[str] = []
    token = ""
    for _ in range(10):
        page = await svc.get_resource_state(
            PRINCIPAL, service.ResourceStateInput(namespace=NS, page_size=page_size, page_token=token)
        )
        assert page.total == 7
        assert len(page.items) <= page_size
        seen.extend(v.deployment.resource_name for v in page.items)
        token = page.next_token
        if not token:
            break
    assert sorted(seen) == sorted(names)
    assert len(seen) == len(set(seen))


async def test_a_resource_state_token_fits_only_its_query(
    store: sqlite.Store, svc: service.BrokerService
) -> None:
    for name in ("db-a", "db-b"):
        await store.provision(command(name))
    first = await svc.get_resource_state(PRINCIPAL, service.ResourceStateInput(namespace=NS, page_size=1))
    assert first.next_token
    again = service.ResourceStateInput(namespace=NS, page_size=1, page_token=first.next_token)
    assert [v.deployment.resource_name for v in (await svc.get_resource_state(PRINCIPAL, again)).items] == [
        "db-b"
    ]

    filtered = service.ResourceStateInput(
        namespace=NS, resource_type=model.ResourceType.CACHE, page_size=1, page_token=first.next_token
    )
    with pytest.raises(errors.InvalidArgument) as info:
        await svc.get_resource_state(PRINCIPAL, filtered)
    assert [(v.field, v.description) for v in info.value.violations] == [("page_token", MESSAGE)]


@pytest.mark.parametrize("token", GARBAGE)
async def test_a_made_up_resource_state_token_is_invalid_argument(
    svc: service.BrokerService, token: str
) -> None:
    with pytest.raises(errors.InvalidArgument) as info:
        await svc.get_resource_state(PRINCIPAL, service.ResourceStateInput(namespace=NS, page_token=token))
    assert [v.field for v in info.value.violations] == ["page_token"]


@pytest.mark.parametrize("page_size", [1, 2, 3, 5, 6])
async def test_paging_through_drift_events_returns_each_exactly_once(
    store: sqlite.Store, svc: service.BrokerService, page_size: int
) -> None:
    deployment = await ready(store)
    await store.append_events([event_about(deployment, i) for i in range(5)])
    query = service.EventsInput(namespace=NS, kinds=frozenset({model.EventKind.REMEDIATION_FAILED}))
    seen: list[str] = []
    token = ""
    for _ in range(10):
        page = await svc.list_drift_events(
            PRINCIPAL, dataclasses.replace(query, page_size=page_size, page_token=token)
        )
        assert len(page.items) <= page_size
        seen.extend(e.message for e in page.items)
        token = page.next_token
        if not token:
            break
    assert seen == [f"event {i}" for i in range(5)]


async def test_a_drift_event_token_fits_only_its_query(
    store: sqlite.Store, svc: service.BrokerService
) -> None:
    """The assertion the store contract made while the adapters checked tokens, now the service's."""
    deployment = await ready(store)
    await store.append_events([event_about(deployment, i) for i in range(5)])
    kinds = frozenset({model.EventKind.REMEDIATION_FAILED})
    first = await svc.list_drift_events(
        PRINCIPAL, service.EventsInput(namespace=NS, kinds=kinds, page_size=3)
    )
    assert first.next_token
    for other in (
        service.EventsInput(namespace=NS, page_size=3, page_token=first.next_token),
        service.EventsInput(
            namespace=NS, kinds=kinds, after_sequence=1, page_size=3, page_token=first.next_token
        ),
    ):
        with pytest.raises(errors.InvalidArgument) as info:
            await svc.list_drift_events(PRINCIPAL, other)
        assert [(v.field, v.description) for v in info.value.violations] == [("page_token", MESSAGE)]


@pytest.mark.parametrize("token", GARBAGE)
async def test_a_made_up_drift_event_token_is_invalid_argument(
    svc: service.BrokerService, token: str
) -> None:
    with pytest.raises(errors.InvalidArgument) as info:
        await svc.list_drift_events(PRINCIPAL, service.EventsInput(namespace=NS, page_token=token))
    assert [v.field for v in info.value.violations] == ["page_token"]


async def test_a_forged_event_position_past_any_sequence_is_an_empty_page(
    store: sqlite.Store, svc: service.BrokerService
) -> None:
    """A forged token that gets through (the right digest, a printable position) is answered."""
    deployment = await ready(store)
    await store.append_events([event_about(deployment, 0)])
    token = forged(model.EventQuery(namespace=NS), ["seq", "9" * 200])
    page = await svc.list_drift_events(PRINCIPAL, service.EventsInput(namespace=NS, page_token=token))
    assert (page.items, page.next_token) == ((), "")

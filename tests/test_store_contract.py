"""The store contract: what every adapter of ``broker.store.port`` must do, one suite for all.

``ADAPTERS`` lists the adapters, SQLite on a temporary file and PostgreSQL in a fresh database of
the session's throwaway cluster (``throwaway_postgres``); every test here runs against both. The event log's visibility contract (``port``'s docstring) is
tested with concurrent writers and a tailer that counts gaps.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import json
import pathlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from broker import errors
from broker.domain import approval, catalog, model, policy, windows
from broker.store import port, postgres, sqlite


async def open_sqlite(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> port.Store:
    return await sqlite.Store.open(tmp_path / "data")


async def open_postgres(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> port.Store:
    # Asked for only here, so a run of SQLite's rows alone starts no PostgreSQL.
    return await postgres.Store.open(request.getfixturevalue("postgres_url"))


ADAPTERS: dict[str, Callable[[pytest.FixtureRequest, pathlib.Path], Awaitable[port.Store]]] = {
    "sqlite": open_sqlite,
    "postgres": open_postgres,
}


@pytest.fixture(params=sorted(ADAPTERS))
async def store(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> AsyncIterator[port.Store]:
    opened = await ADAPTERS[request.param](request, tmp_path)
    try:
        yield opened
    finally:
        await opened.close()


NS = model.Namespace("team-platform")
SMALL = catalog.DEFAULT_CATALOG.sizes["small"]


def command(name: str = "db", *, replicas: int = 1, request_id: str = "") -> model.ProvisionCommand:
    return model.ProvisionCommand(
        namespace=NS,
        resource_type=model.ResourceType.DATABASE,
        resource_name=model.ResourceName(name),
        spec=model.ResourceSpec(
            engine="postgresql", version="15", size="small", replicas=replicas, resources=SMALL
        ),
        callback_url="",
        request_id=request_id,
    )


def event_about(deployment: model.Deployment, index: int) -> model.DriftEvent:
    return model.DriftEvent.about(
        deployment, model.EventKind.REMEDIATION_FAILED, f"event {index}", health=None
    )


async def ready(store: port.Store, name: str = "db") -> model.Deployment:
    """A deployment provisioned to Ready, through the operations a worker uses."""
    result = await store.provision(command(name))
    deployment = await store.deployment_by_id(result.deployment_id)
    assert deployment is not None
    started = await store.start_operation(deployment)
    assert started is not None
    assert await store.finish_operation(started, succeeded=True, message="ready", event=None, callback=None)
    done = await store.deployment_by_id(result.deployment_id)
    assert done is not None
    return done


async def test_provision_is_idempotent_and_a_changed_spec_is_a_new_generation(store: port.Store) -> None:
    first = await store.provision(command(request_id="r-1"))
    assert first.changed
    replay = await store.provision(command(request_id="r-1"))  # the first answer, again
    assert (replay.deployment_id, replay.generation, replay.operation) == (
        first.deployment_id,
        first.generation,
        first.operation,
    )
    assert not (await store.provision(command())).changed  # same spec: a no-op
    with pytest.raises(errors.AlreadyExists):
        await store.provision(command(replicas=2, request_id="r-1"))  # a request id reused
    second = await store.provision(command(replicas=2))
    assert second.generation == first.generation + 1
    got = await store.get_deployment(NS, first.deployment_id)
    assert got.desired_spec.replicas == 2


async def test_operations_move_a_deployment_to_ready_with_its_callback_in_the_outbox(
    store: port.Store,
) -> None:
    result = await store.provision(command())
    deployment = await store.deployment_by_id(result.deployment_id)
    assert deployment is not None
    assert [d.deployment_id for d in await store.unfinished()] == [result.deployment_id]
    started = await store.start_operation(deployment)
    assert started is not None
    assert started.phase is model.Phase.PROVISIONING
    await store.note_progress(started, "retrying: namespace missing")
    assert (
        await store.get_deployment(NS, result.deployment_id)
    ).last_operation.message == "retrying: namespace missing"
    finished = await store.finish_operation(
        started,
        succeeded=True,
        message="ready",
        event=model.DriftEvent.about(started, model.EventKind.PROVISIONING_SUCCEEDED, "ready", health=None),
        callback=("http://manager.example/cb", {"status": "Ready"}),
    )
    assert finished
    assert await store.unfinished() == []
    due = await store.due_callbacks()
    assert [(d.url, d.attempts) for d in due] == [("http://manager.example/cb", 0)]
    assert json.loads(due[0].payload) == {"status": "Ready"}
    delivery_id = due[0].delivery_id
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1)
    await store.callback_attempted(delivery_id, delivered=False, error="HTTP 503", retry_at=later)
    assert await store.due_callbacks() == []  # not due before its retry time
    await store.callback_attempted(delivery_id, delivered=True)
    assert await store.due_callbacks() == []


async def test_accepting_makes_a_new_generation_and_refuses_a_deployment_that_moved_on(
    store: port.Store,
) -> None:
    deployment = await ready(store)
    spec = dataclasses.replace(deployment.desired_spec, replicas=3)
    assert await store.accept(deployment, spec, "accepted replicas")
    accepted = await store.deployment_by_id(deployment.deployment_id)
    assert accepted is not None
    assert accepted.generation == deployment.generation + 1
    assert accepted.desired_spec.replicas == 3
    assert accepted.phase is model.Phase.READY  # nothing to apply
    assert accepted.last_operation.state is model.OperationState.SUCCEEDED
    assert not await store.accept(deployment, spec, "stale")  # read before the first accept


async def test_a_tailer_never_skips_an_event_whatever_the_writers_do(store: port.Store) -> None:
    """Many concurrent writers, verdicts and plain appends mixed; a tailer reads ``events_after``
    as fast as it can: every sequence it sees is new, increasing, and at the end nothing is missing."""
    deployment = await ready(store)
    published: list[int] = []
    store.listeners.append(lambda events: published.extend(e.sequence for e in events))
    _, start = await store.event_bounds()
    writers, per_writer = 8, 25
    done = asyncio.Event()
    seen: list[int] = []

    async def tail() -> None:
        position = start
        while True:
            batch = await store.events_after(position, 7)
            for event in batch:
                assert event.sequence > position, "went backwards or repeated"
                position = event.sequence
                seen.append(position)
            if not batch:
                if done.is_set() and not await store.events_after(position, 1):
                    return
                await asyncio.sleep(0)

    async def write(w: int) -> None:
        for i in range(per_writer):
            if i % 5 == 0:
                with contextlib.suppress(errors.BrokerError):
                    await store.record_evaluations(
                        [healthy(deployment, events=[event_about(deployment, w * 1000 + i)])]
                    )
            else:
                await store.append_events([event_about(deployment, w * 1000 + i)])
            await asyncio.sleep(0)

    tailer = asyncio.create_task(tail())
    await asyncio.gather(*(write(w) for w in range(writers)))
    done.set()
    await asyncio.wait_for(tailer, 30)
    _, newest = await store.event_bounds()
    assert seen == list(range(start + 1, newest + 1))  # no gap, no duplicate, in order
    assert published == seen  # listeners hear commits in sequence order
    assert len(seen) == writers * per_writer


async def test_pruning_keeps_the_newest_and_says_how_many_went(store: port.Store) -> None:
    deployment = await ready(store)
    await store.append_events([event_about(deployment, i) for i in range(10)])
    _, newest = await store.event_bounds()
    assert await store.prune_events(keep=4) >= 6
    oldest, still_newest = await store.event_bounds()
    assert still_newest == newest
    assert oldest == newest - 3
    listed = await store.list_events(model.EventQuery(namespace=NS), model.PageRequest(size=100))
    assert [e.sequence for e in listed.items] == list(range(oldest, newest + 1))


async def test_policies_and_verdicts_survive_in_the_store(store: port.Store) -> None:
    rule = policy.Rule(
        namespace=NS,
        resource_type=model.ResourceType.DATABASE,
        mode=policy.Mode.ALERT,
        ignore_fields=frozenset({"replicas"}),
    )
    await store.set_policy(rule)
    assert await store.policies() == [rule]
    deployment = await ready(store)
    item = model.DriftItem(
        rule_id="replicas.changed",
        field="replicas",
        desired="1",
        actual="3",
        drift_class=model.DriftClass.UNEXPECTED,
        severity=model.Severity.WARNING,
        action=model.Action.ALERT_ONLY,
        message="Replica count mismatch: desired=1, actual=3",
        changed_by="kubectl",
        monthly_cost_delta=None,
        detect_time=datetime.datetime(2026, 12, 1, 9, 0, tzinfo=datetime.UTC),
    )
    assert await store.record_evaluations(
        [
            port.Verdict(
                deployment,
                items=(item,),
                health=model.Health.DEGRADED,
                phase=model.Phase.DRIFT_DETECTED,
                events=[],
            )
        ]
    ) == [True]
    assert (await store.drift_states())[deployment.deployment_id] == ((item,), model.Health.DEGRADED)
    assert (await store.deployment_by_id(deployment.deployment_id)).phase is model.Phase.DRIFT_DETECTED  # type: ignore[union-attr]


async def test_pages_list_by_type_and_name_in_byte_order_whatever_the_database_collation(
    store: port.Store,
) -> None:
    """Byte order, as SQLite compares text; a linguistic collation (the test cluster's default is
    ICU en-US) would put ``a-b`` before ``B``. A page continues exactly where the one before ended:
    after the position of its last item."""
    for name in ("b", "B", "a-b", "a1", "A"):
        await store.provision(command(name))
    pages: list[list[str]] = []
    after: model.Position | None = None
    while True:
        page = await store.list_deployments(
            model.ResourceQuery(namespace=NS), model.PageRequest(size=2, after=after)
        )
        assert page.total == 5
        pages.append([d.resource_name for d in page.items])
        after = page.next_after
        if after is None:
            break
        assert after == ("database", page.items[-1].resource_name)
    assert pages == [["A", "B"], ["a-b", "a1"], ["b"]]


async def test_events_list_by_namespace_and_kind_in_pages(store: port.Store) -> None:
    deployment = await ready(store)
    await store.append_events([event_about(deployment, i) for i in range(5)])
    await store.record_evaluations(
        [
            healthy(
                deployment,
                events=[
                    model.DriftEvent.about(
                        deployment, model.EventKind.DRIFT_RESOLVED, "resolved", health=None
                    )
                ],
            )
        ]
    )
    query = model.EventQuery(namespace=NS, kinds=frozenset({model.EventKind.REMEDIATION_FAILED}))
    first = await store.list_events(query, model.PageRequest(size=3))
    assert first.next_after == ("seq", str(first.items[-1].sequence))
    second = await store.list_events(query, model.PageRequest(size=3, after=first.next_after))
    assert [e.message for e in first.items + second.items] == [f"event {i}" for i in range(5)]
    assert second.next_after is None
    other = await store.list_events(
        model.EventQuery(namespace=model.Namespace("team-other")), model.PageRequest(size=10)
    )
    assert other.items == ()


async def test_a_made_up_position_is_answered_never_refused(store: port.Store) -> None:
    """Positions come back from callers (inside page tokens, which only the service checks), so
    a listing answers any short printable-ASCII one: before everything, past everything, or past
    the range of a sequence column."""
    deployment = await ready(store)
    await store.append_events([event_about(deployment, i) for i in range(3)])
    resources, log = model.ResourceQuery(namespace=NS), model.EventQuery(namespace=NS)

    async def names(after: model.Position) -> list[str]:
        return [
            d.resource_name
            for d in (await store.list_deployments(resources, model.PageRequest(10, after))).items
        ]

    async def messages(after: model.Position) -> list[str]:
        return [e.message for e in (await store.list_events(log, model.PageRequest(10, after))).items]

    assert await names(("", "")) == await names((" ", "~")) == ["db"]
    assert await names(("~", "~")) == []
    everything = [f"event {i}" for i in range(3)]
    assert (
        await messages(("seq", "-1"))
        == await messages(("x", "y"))
        == await messages(("seq", ""))
        == everything
    )
    assert await messages(("seq", "0")) == everything
    assert await messages(("seq", "9" * 19)) == await messages(("seq", "9" * 100)) == []


async def test_deprovision_is_idempotent_and_a_deleted_name_can_be_provisioned_again(
    store: port.Store,
) -> None:
    deployment = await ready(store)
    gone = model.DeprovisionCommand(
        namespace=NS,
        deployment_id=deployment.deployment_id,
        data_policy=model.DataPolicy.DELETE,
        request_id="d-1",
    )
    first = await store.deprovision(gone)
    assert (first.changed, first.phase) == (True, model.Phase.DELETING)
    assert (await store.deprovision(gone)).operation == first.operation  # replayed
    with pytest.raises(errors.FailedPrecondition):
        await store.provision(command())  # still being deleted
    deleting = await store.deployment_by_id(deployment.deployment_id)
    assert deleting is not None
    started = await store.start_operation(deleting)
    assert started is not None
    assert started.phase is model.Phase.DELETING  # a deprovision does not look like provisioning
    assert await store.finish_operation(started, succeeded=True, message="gone", event=None, callback=None)
    again = await store.provision(command())
    assert again.changed
    assert again.deployment_id != deployment.deployment_id
    with pytest.raises(errors.NotFound):
        await store.get_deployment(model.Namespace("team-other"), again.deployment_id)
    assert await store.count_deployments() == 2


async def test_a_closed_store_is_unavailable(store: port.Store) -> None:
    await store.close()
    await store.close()  # safe twice
    with pytest.raises(errors.Unavailable):
        await store.count_deployments()
    with pytest.raises(errors.Unavailable):
        await store.provision(command())


async def test_old_request_ids_and_delivered_callbacks_are_forgotten_undelivered_ones_kept(
    store: port.Store,
) -> None:
    """Retention: a request_id past its time is a new request; a pending callback is never dropped."""
    first = await store.provision(command("db-kept", request_id="req-old"))
    for name, url in (("db-kept", "http://manager.example/a"), ("db-other", "http://manager.example/b")):
        if name != "db-kept":
            await store.provision(command(name))
        (deployment,) = [d for d in await store.unfinished() if d.resource_name == name]
        started = await store.start_operation(deployment)
        assert started is not None
        assert await store.finish_operation(
            started, succeeded=True, message="ready", event=None, callback=(url, {})
        )
    assert first.changed
    delivered, pending = sorted(await store.due_callbacks(), key=lambda d: d.url)
    await store.callback_attempted(delivered.delivery_id, delivered=True)
    now = datetime.datetime.now(datetime.UTC)
    # Nothing is old enough yet.
    assert await store.prune_history(
        keys_before=now - datetime.timedelta(hours=1), deliveries_before=now - datetime.timedelta(hours=1)
    ) == (0, 0)
    later = now + datetime.timedelta(seconds=5)
    keys, deliveries = await store.prune_history(keys_before=later, deliveries_before=later)
    assert (keys, deliveries) == (1, 1)
    assert [d.delivery_id for d in await store.due_callbacks()] == [pending.delivery_id]
    # The same request_id with another spec is now simply a new request, not REQUEST_ID_REUSED.
    again = await store.provision(command("db-kept", replicas=3, request_id="req-old"))
    assert again.changed
    assert again.generation == 2


async def test_budgets_are_set_replaced_and_removed_per_namespace(store: port.Store) -> None:
    assert await store.budgets() == {}
    await store.set_budget("team-platform", 120.5)
    await store.set_budget("team-payments", 0.0)
    await store.set_budget("team-platform", 99.25)  # replaces, never a second row
    assert await store.budgets() == {"team-platform": 99.25, "team-payments": 0.0}
    await store.set_budget("team-payments", None)
    await store.set_budget("team-nobody", None)  # removing what is not there is no error
    assert await store.budgets() == {"team-platform": 99.25}


async def test_cost_alert_crossings_and_their_events_are_written_together(store: port.Store) -> None:
    deployment = await ready(store)
    _, before = await store.event_bounds()
    alert = model.DriftEvent.about(deployment, model.EventKind.COST_ALERT, "Cost alert: over", health=None)
    await store.record_cost_alerts(
        raised={"resource:" + deployment.deployment_id, "namespace:team-platform"},
        cleared=set(),
        events=[alert],
    )
    assert await store.cost_alerts() == {"resource:" + deployment.deployment_id, "namespace:team-platform"}
    events = await store.events_after(before, 10)
    assert [(e.kind, e.message, e.deployment_id) for e in events] == [
        (model.EventKind.COST_ALERT, "Cost alert: over", deployment.deployment_id)
    ]
    listed = await store.list_events(
        model.EventQuery(namespace=NS, kinds=frozenset({model.EventKind.COST_ALERT})),
        model.PageRequest(10),
    )
    assert [e.sequence for e in listed.items] == [events[0].sequence]
    # Raising a subject already over changes nothing; clearing forgets it, with no event.
    await store.record_cost_alerts(
        raised={"namespace:team-platform"}, cleared={"resource:" + deployment.deployment_id}, events=[]
    )
    assert await store.cost_alerts() == {"namespace:team-platform"}
    assert await store.events_after(events[0].sequence, 10) == []


async def test_a_verdict_writes_its_cost_crossings_and_alerts_in_its_own_transaction(
    store: port.Store,
) -> None:
    deployment = await ready(store)
    subject = "resource:" + deployment.deployment_id
    alert = model.DriftEvent.about(deployment, model.EventKind.COST_ALERT, "Cost alert: raised", health=None)
    assert await store.record_evaluations(
        [healthy(deployment, events=[alert], crossings=({subject}, set()))]
    ) == [True]
    assert await store.cost_alerts() == {subject}
    # A verdict for an operation that moved on writes nothing: no crossing, no alert.
    _, newest = await store.event_bounds()
    assert await store.record_evaluations(
        [healthy(moved_on(deployment), events=[alert], crossings=(set(), {subject}))]
    ) == [False]
    assert await store.cost_alerts() == {subject}
    assert (await store.event_bounds())[1] == newest


async def test_a_batch_of_verdicts_is_one_transaction_that_skips_deployments_that_moved_on(
    store: port.Store,
) -> None:
    """A sweep records many verdicts at once: each is written, or not at all when its deployment
    moved on, and the events of those written come in the batch's order."""
    first, second, third = [await ready(store, name) for name in ("db-1", "db-2", "db-3")]
    superseded = moved_on(second)
    _, newest = await store.event_bounds()
    heard: list[model.DriftEvent] = []
    store.listeners.append(heard.extend)
    written = await store.record_evaluations(
        [
            port.Verdict(
                deployment,
                items=(replicas_item("3"),) if deployment is not superseded else (),
                health=model.Health.DEGRADED,
                phase=model.Phase.DRIFT_DETECTED,
                events=[event_about(deployment, i)],
            )
            for i, deployment in enumerate((first, superseded, third))
        ]
    )
    assert written == [True, False, True]
    states = await store.drift_states()
    assert states[first.deployment_id] == ((replicas_item("3"),), model.Health.DEGRADED)
    assert second.deployment_id not in states
    assert states[third.deployment_id] == ((replicas_item("3"),), model.Health.DEGRADED)
    phases = [(await store.deployment_by_id(d.deployment_id)).phase for d in (first, second, third)]  # type: ignore[union-attr]
    assert phases == [model.Phase.DRIFT_DETECTED, model.Phase.READY, model.Phase.DRIFT_DETECTED]
    events = await store.events_after(newest, 10)
    assert [(e.deployment_id, e.message, e.phase) for e in events] == [
        (first.deployment_id, "event 0", model.Phase.DRIFT_DETECTED),
        (third.deployment_id, "event 2", model.Phase.DRIFT_DETECTED),
    ]
    # Listeners are told the sequences the log gave them, in order.
    assert [(e.sequence, e.message) for e in heard] == [(e.sequence, e.message) for e in events]
    heard.clear()
    again = await store.record_evaluations(
        [
            healthy(d, events=[event_about(d, 10 + i), event_about(d, 20 + i)])
            for i, d in enumerate((first, third))
        ]
    )
    assert again == [True, True]
    events = await store.events_after(events[-1].sequence, 10)
    assert [e.message for e in events] == ["event 10", "event 20", "event 11", "event 21"]
    assert [(e.sequence, e.message) for e in heard] == [(e.sequence, e.message) for e in events]
    assert await store.record_evaluations([]) == []


async def test_verdicts_of_one_batch_are_applied_in_turn(store: port.Store) -> None:
    """The same deployment twice in a batch: the later verdict is what stays, and a subject one
    verdict raises and a later one clears is not over."""
    deployment = await ready(store, "db-twice")
    subject = "resource:" + deployment.deployment_id
    drifted = port.Verdict(
        deployment,
        items=(replicas_item("3"),),
        health=model.Health.DEGRADED,
        phase=model.Phase.DRIFT_DETECTED,
        crossings=({subject}, set()),
    )
    written = await store.record_evaluations([drifted, healthy(deployment, crossings=(set(), {subject}))])
    assert written == [True, True]
    assert (await store.drift_states())[deployment.deployment_id] == ((), model.Health.HEALTHY)
    assert (await store.deployment_by_id(deployment.deployment_id)).phase is model.Phase.READY  # type: ignore[union-attr]
    assert subject not in await store.cost_alerts()


def healthy(deployment: model.Deployment, **written: Any) -> port.Verdict:
    """A Healthy verdict without drift (the deployment Ready), with ``events`` or ``crossings``."""
    return port.Verdict(deployment, items=(), health=model.Health.HEALTHY, phase=model.Phase.READY, **written)


def moved_on(deployment: model.Deployment) -> model.Deployment:
    """The deployment as an evaluation saw it before another operation superseded that one."""
    return dataclasses.replace(
        deployment,
        last_operation=dataclasses.replace(deployment.last_operation, operation_id=model.OperationId("op-x")),
    )


def replicas_item(actual: str) -> model.DriftItem:
    return model.DriftItem(
        rule_id="replicas.changed",
        field="replicas",
        desired="1",
        actual=actual,
        drift_class=model.DriftClass.UNEXPECTED,
        severity=model.Severity.WARNING,
        action=model.Action.APPROVAL_REQUIRED,
        message=f"Replica count mismatch: desired=1, actual={actual}",
        changed_by="kubectl-scale",
        monthly_cost_delta=12.5,
    )


def proposal(deployment: model.Deployment, actual: str) -> approval.Remediation:
    return approval.propose(
        deployment,
        (replicas_item(actual),),
        now=datetime.datetime.now(datetime.UTC),
        ttl=datetime.timedelta(hours=1),
    )


def pending_event(r: approval.Remediation) -> model.DriftEvent:
    return approval.event(
        r, model.EventKind.REMEDIATION_PENDING_APPROVAL, "waits", phase=model.Phase.DRIFT_DETECTED
    )


async def test_a_proposal_is_stored_with_its_event_and_a_newer_one_supersedes_it(store: port.Store) -> None:
    deployment = await ready(store)
    first = proposal(deployment, "3")
    await store.propose_remediation(first, event=pending_event(first))
    second = proposal(deployment, "4")
    await store.propose_remediation(second, event=pending_event(second))

    found = await store.list_remediations(namespace=NS)
    assert [r.remediation_id for r in found] == [first.remediation_id, second.remediation_id]
    assert [r.state for r in found] == [approval.State.SUPERSEDED, approval.State.PENDING]
    read = await store.get_remediation(NS, second.remediation_id)
    assert read.items == second.items
    assert read.changes[0].from_value == "4"
    assert read.changes[0].to_value == "1"
    assert read.changes[0].monthly_cost_delta == -12.5
    assert read.fingerprint == second.fingerprint
    pending = await store.list_remediations(namespace=None, states=frozenset({approval.State.PENDING}))
    assert [r.remediation_id for r in pending] == [second.remediation_id]
    kinds = [e.kind for e in await store.events_after(0, 100)]
    assert kinds.count(model.EventKind.REMEDIATION_PENDING_APPROVAL) == 2
    with pytest.raises(errors.NotFound):
        await store.get_remediation("team-other", second.remediation_id)


async def test_decided_proposals_are_pruned_and_open_ones_kept(store: port.Store) -> None:
    deployment = await ready(store)
    first = proposal(deployment, "3")
    await store.propose_remediation(first, event=pending_event(first))
    second = proposal(deployment, "4")  # supersedes the first: decided now
    await store.propose_remediation(second, event=pending_event(second))
    now = datetime.datetime.now(datetime.UTC)
    assert await store.prune_remediations(decided_before=now - datetime.timedelta(hours=1)) == 0
    assert await store.prune_remediations(decided_before=now + datetime.timedelta(seconds=5)) == 1
    found = await store.list_remediations(namespace=NS)
    assert [(r.remediation_id, r.state) for r in found] == [(second.remediation_id, approval.State.PENDING)]


async def test_a_decision_is_made_once_and_replayed_on_its_request_id(store: port.Store) -> None:
    deployment = await ready(store)
    r = proposal(deployment, "3")
    await store.propose_remediation(r, event=pending_event(r))
    assert await store.decision_replay(NS, "req-1", approval.Decision.APPROVE, r.remediation_id) is None

    decided = await store.decide_remediation(
        r,
        decision=approval.Decision.APPROVE,
        by="oncall",
        reason="CHG-1",
        request_id="req-1",
        event=approval.event(r, model.EventKind.REMEDIATION_APPROVED, "ok", phase=model.Phase.DRIFT_DETECTED),
    )
    assert (decided.state, decided.decided_by, decided.reason) == (approval.State.APPROVED, "oncall", "CHG-1")
    replay = await store.decision_replay(NS, "req-1", approval.Decision.APPROVE, r.remediation_id)
    assert replay is not None
    assert replay.state is approval.State.APPROVED
    assert replay.decided_by == "oncall"
    with pytest.raises(errors.AlreadyExists):
        await store.decision_replay(NS, "req-1", approval.Decision.REJECT, r.remediation_id)
    with pytest.raises(errors.FailedPrecondition):
        await store.decide_remediation(
            r,
            decision=approval.Decision.REJECT,
            by="someone",
            reason="",
            request_id="",
            event=approval.event(
                r, model.EventKind.REMEDIATION_REJECTED, "no", phase=model.Phase.DRIFT_DETECTED
            ),
        )
    assert [e.kind for e in await store.events_after(0, 100)].count(model.EventKind.REMEDIATION_APPROVED) == 1
    # Carried out once: the second close finds it applied already.
    approved = frozenset({approval.State.APPROVED})
    assert await store.close_remediation(
        r.remediation_id, from_states=approved, to=approval.State.APPLIED, reason=""
    )
    assert not await store.close_remediation(
        r.remediation_id, from_states=approved, to=approval.State.APPLIED, reason=""
    )
    assert (await store.get_remediation(NS, r.remediation_id)).state is approval.State.APPLIED


async def test_expiry_closes_only_a_pending_proposal_with_its_event(store: port.Store) -> None:
    deployment = await ready(store)
    r = proposal(deployment, "3")
    await store.propose_remediation(r, event=pending_event(r))
    expired = approval.event(
        r, model.EventKind.REMEDIATION_EXPIRED, "lapsed", phase=model.Phase.DRIFT_DETECTED
    )
    pending = frozenset({approval.State.PENDING})
    assert await store.close_remediation(
        r.remediation_id, from_states=pending, to=approval.State.EXPIRED, reason="ttl", event=expired
    )
    assert not await store.close_remediation(
        r.remediation_id, from_states=pending, to=approval.State.EXPIRED, reason="ttl", event=expired
    )
    read = await store.get_remediation(NS, r.remediation_id)
    assert read.state is approval.State.EXPIRED
    assert read.decide_time is not None
    assert [e.kind for e in await store.events_after(0, 100)].count(model.EventKind.REMEDIATION_EXPIRED) == 1


async def test_a_policy_keeps_its_mode_approve_and_its_maintenance_window(store: port.Store) -> None:
    window = windows.parse(cron="30 2 * * 1-5", duration="1h30m", time_zone="Europe/Berlin")
    rule = policy.Rule(
        namespace=NS, resource_type=model.ResourceType.CACHE, mode=policy.Mode.APPROVE, window=window
    )
    await store.set_policy(rule)
    assert await store.policies() == [rule]
    await store.set_policy(dataclasses.replace(rule, window=None))
    assert await store.policies() == [dataclasses.replace(rule, window=None)]
    assert await store.schema_version() >= 3


async def test_a_policy_keeps_the_modes_of_its_drift_rules(store: port.Store) -> None:
    rule = policy.Rule(
        namespace=NS,
        mode=policy.Mode.AUTO,
        rule_modes=(("replicas.changed", policy.Mode.APPROVE), ("size.changed", policy.Mode.OFF)),
    )
    await store.set_policy(rule)
    assert await store.policies() == [rule]
    await store.set_policy(dataclasses.replace(rule, rule_modes=()))
    assert await store.policies() == [dataclasses.replace(rule, rule_modes=())]
    assert await store.schema_version() >= 5

"""The detector's start-up sweep: start-up is done only once everything was listed and evaluated."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import pathlib
from collections.abc import Callable
from typing import Any

import msgspec
import pytest

from broker import detector, errors
from broker.domain import catalog, drift, model, policy
from broker.store import sqlite


class _SyncedCluster:
    """A cluster whose caches are listed at once (the sweep here has nothing to observe)."""

    async def wait_synced(self, grace: float) -> bool:
        return True


# Expected drift (reported, never acted on), as the drift rules make it.
_VERSION_PATCH = drift.version_item("15", "15.2", "")
assert _VERSION_PATCH is not None
assert _VERSION_PATCH.drift_class is model.DriftClass.EXPECTED


def _evaluation(deployment: model.Deployment, items: tuple[model.DriftItem, ...]) -> drift.Evaluation:
    """A Healthy verdict on a deployment with ``items``, as the caches would give it now."""
    return drift.Evaluation(
        actual_spec=deployment.desired_spec,
        items=items,
        health=model.Health.HEALTHY,
        usage=None,
        monthly_cost=None,
        checked_at=datetime.datetime.now(datetime.UTC),
    )


def _detector(
    store: sqlite.Store, *, policies: Callable[[], policy.Policy] | None = None, **options: Any
) -> detector.Detector:
    """A detector on ``store`` and a cluster that is listed at once, with no remediator."""
    rules = policy.Policy()
    return detector.Detector(
        store=store,
        cluster=_SyncedCluster(),  # type: ignore[arg-type]
        catalog=catalog.DEFAULT_CATALOG,
        policies=policies or (lambda: rules),
        remediator=None,
        **options,
    )


async def test_start_up_waits_for_a_sweep_whose_listing_succeeded(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await sqlite.Store.open(tmp_path)
    monkeypatch.setattr(detector, "SWEEP_RETRY_DELAY", 0.05)
    failures = 2
    live = store.live_deployments

    async def flaky(*args: object, **kwargs: object) -> object:
        nonlocal failures
        if failures:
            failures -= 1
            raise errors.Unavailable("the store failed to read: OperationalError")
        return await live(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(store, "live_deployments", flaky)
    started = asyncio.Event()
    watcher = _detector(store, resync_interval=600.0, on_started=started.set)
    task = asyncio.create_task(watcher.run())
    try:
        await asyncio.wait_for(started.wait(), 10)
        # Started only after the listing worked: both failed tries came first.
        assert failures == 0
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await store.close()


async def test_a_sweep_gives_the_loop_back_between_slices(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Evaluations that find nothing new await nothing: the sweep itself lets other work run."""
    store = await sqlite.Store.open(tmp_path)
    monkeypatch.setattr(detector, "SWEEP_SLICE", 0.0)  # a slice of one evaluation
    evaluated: list[str] = []
    ticks: list[int] = []  # how many evaluations had run whenever another task got the loop

    watcher = _detector(store, resync_interval=600.0)

    swept = asyncio.Event()

    async def judging(deployment_id: str, listed: object) -> None:
        evaluated.append(deployment_id)  # nothing new to record: returns without awaiting anything
        if len(evaluated) == 50:
            swept.set()

    async def listed(phases: object) -> list[object]:
        return [_Listed(f"deploy-{i:04d}") for i in range(50)]

    monkeypatch.setattr(watcher, "_judging", judging)
    monkeypatch.setattr(store, "live_deployments", listed)

    async def ticker() -> None:
        while True:
            ticks.append(len(evaluated))
            await asyncio.sleep(0)

    other = asyncio.create_task(ticker())
    task = asyncio.create_task(watcher.run())
    try:
        await asyncio.wait_for(swept.wait(), 10)
        # The other task ran in the middle of the sweep, not only before and after it.
        assert any(0 < n < 50 for n in ticks), ticks[:20]
    finally:
        for t in (task, other):
            t.cancel()
        await asyncio.gather(task, other, return_exceptions=True)
        await store.close()


class _Listed:
    """A row as the sweep lists it: only its id is read before evaluating it."""

    def __init__(self, deployment_id: str) -> None:
        self.deployment_id = deployment_id


async def test_a_usage_change_keeps_the_rest_of_the_verdict_as_it_was(tmp_path: pathlib.Path) -> None:
    """A new verdict shares its unchanged parts with the kept one: fewer objects for the collector."""
    from test_store_contract import command

    store = await sqlite.Store.open(tmp_path)
    try:
        deployment = await store.deployment_by_id((await store.provision(command("db-a"))).deployment_id)
        assert deployment is not None
        watcher = _detector(store)

        def verdict(cpu: str) -> drift.Evaluation:
            return drift.Evaluation(
                actual_spec=dataclasses.replace(deployment.desired_spec),  # an equal copy each time
                items=(_VERSION_PATCH,),
                health=model.Health.HEALTHY,
                usage=drift.Usage(cpu=cpu, memory="64Mi", storage="20Gi", replicas=1),
                monthly_cost=45.5,
                checked_at=datetime.datetime.now(datetime.UTC),
            )

        first = verdict("100m")
        watcher._keep_verdict(deployment, first)
        watcher._keep_verdict(deployment, verdict("120m"))
        kept = watcher.verdict(deployment)
        assert kept is not None
        assert kept.usage is not None
        assert kept.usage.cpu == "120m"
        assert kept.items is first.items  # equal parts: the kept verdict's own objects
        assert kept.actual_spec is first.actual_spec
    finally:
        await store.close()


async def test_a_first_sweep_records_its_verdicts_in_batches_and_a_failed_batch_is_tried_again(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Never-evaluated deployments are recorded a batch per transaction (one disk flush each), not
    one each; a batch the store fails is not kept, and the next sweep records it."""
    from test_store_contract import ready

    store = await sqlite.Store.open(tmp_path)
    monkeypatch.setattr(detector, "SWEEP_BATCH", 5)
    deployments = [await ready(store, f"db-{i:02d}") for i in range(12)]
    batches: list[int] = []
    record = store.record_evaluations

    async def counted(verdicts: list[object]) -> list[bool]:
        batches.append(len(verdicts))
        if len(batches) == 2:  # the second batch fails
            raise errors.Unavailable("the store failed to commit: OperationalError")
        return await record(verdicts)  # type: ignore[arg-type]

    monkeypatch.setattr(store, "record_evaluations", counted)
    started = asyncio.Event()
    watcher = _detector(store, resync_interval=0.2, on_started=started.set)

    monkeypatch.setattr(watcher, "_verdict", lambda deployment, rules=None: _evaluation(deployment, ()))
    task = asyncio.create_task(watcher.run())
    try:
        await asyncio.wait_for(started.wait(), 10)
        assert batches[:3] == [5, 5, 2]  # the first sweep: three transactions for twelve
        kept = [d for d in deployments if watcher.verdict(d) is not None]
        assert len(kept) == 7  # the failed batch's five are not kept
        for _ in range(100):  # the next sweep (0.2 s later) records them
            if len(await store.drift_states()) == 12:
                break
            await asyncio.sleep(0.05)
        assert len(await store.drift_states()) == 12
        assert all(watcher.verdict(d) is not None for d in deployments)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await store.close()


async def test_a_verdict_whose_follow_up_fails_leaves_the_rest_of_its_batch_concluded(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Verdicts recorded together are concluded one by one: a proposal the store refuses for one
    of them does not leave the others, already recorded, without their kept verdict."""
    from test_store_contract import ready, replicas_item

    store = await sqlite.Store.open(tmp_path)
    deployments = [await ready(store, f"db-{i}") for i in range(3)]
    propose = store.propose_remediation

    async def refusing(remediation: Any, *, event: Any) -> None:
        if remediation.deployment_id == deployments[1].deployment_id:
            raise errors.Unavailable("the store failed to commit: OperationalError")
        await propose(remediation, event=event)

    monkeypatch.setattr(store, "propose_remediation", refusing)
    started = asyncio.Event()
    watcher = _detector(store, resync_interval=600.0, on_started=started.set)

    # Replicas scaled, whose remediation needs approval: each verdict makes a proposal.
    monkeypatch.setattr(
        watcher, "_verdict", lambda deployment, rules=None: _evaluation(deployment, (replicas_item("3"),))
    )
    task = asyncio.create_task(watcher.run())
    try:
        await asyncio.wait_for(started.wait(), 10)
        proposed = {r.deployment_id for r in await store.list_remediations(namespace=None)}
        assert proposed == {deployments[0].deployment_id, deployments[2].deployment_id}
        # The refused one is evaluated again (its proposal with it) at the next change or sweep.
        assert deployments[1].deployment_id in watcher._noticed
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await store.close()


async def test_a_sweep_makes_no_verdict_again_that_nothing_it_was_made_from_changed(
    tmp_path: pathlib.Path,
) -> None:
    """The periodic sweep evaluates again only what may judge differently: a deployment whose
    objects changed (even unannounced), one whose verdict can age (Degraded: a restart grows old),
    every one under new rules. A healthy deployment nothing changed of keeps its verdict as it is."""
    from test_store_contract import ready

    store = await sqlite.Store.open(tmp_path)
    names = ("untouched", "touched", "degraded", "expected-drift")
    deployments = {name: await ready(store, name) for name in names}
    by_id = {d.deployment_id: name for name, d in deployments.items()}
    evaluations = dict.fromkeys(names, 0)

    def verdict(deployment: model.Deployment, rules: object = None) -> drift.Evaluation:
        name = by_id[deployment.deployment_id]
        evaluations[name] += 1
        made = _evaluation(deployment, (_VERSION_PATCH,) if name == "expected-drift" else ())
        return msgspec.structs.replace(made, health=model.Health.DEGRADED) if name == "degraded" else made

    rules = [policy.Policy()]
    started = asyncio.Event()
    watcher = _detector(store, policies=lambda: rules[0], resync_interval=0.05, on_started=started.set)
    watcher._verdict = verdict  # type: ignore[method-assign]

    async def sweeps(count: int) -> dict[str, int]:
        """The evaluations of each deployment over the next ``count`` sweeps."""
        before = dict(evaluations)
        for _ in range(400):
            if evaluations["degraded"] - before["degraded"] >= count:  # evaluated at every sweep
                break
            await asyncio.sleep(0.025)
        return {name: evaluations[name] - before[name] for name in names}

    task = asyncio.create_task(watcher.run())
    try:
        await asyncio.wait_for(started.wait(), 10)
        assert all(evaluations[name] >= 1 for name in names)  # the first sweep judged everything
        await sweeps(2)  # the sweeps that kept the first verdicts with the rows they confirm
        assert await sweeps(3) == {"untouched": 0, "touched": 0, "degraded": 3, "expected-drift": 0}

        # An object of one changed, and nobody asked for its evaluation (its operation was under
        # way, say): the next sweep evaluates it, and only it among the healthy ones.
        watcher.touched(deployments["touched"].deployment_id)
        assert await sweeps(3) == {"untouched": 0, "touched": 1, "degraded": 3, "expected-drift": 0}

        # New rules: every verdict is judged again under them, once.
        rules[0] = policy.Policy()
        seen = await sweeps(3)
        assert seen == {"untouched": 1, "touched": 1, "degraded": 3, "expected-drift": 1}
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await store.close()


async def test_changes_that_came_together_are_recorded_together_and_each_once(tmp_path: pathlib.Path) -> None:
    """Group commit of changes: the deployments changed while the detector was busy are judged and
    recorded in one transaction, in the order they changed. One that changes again while its batch
    is being judged is judged once more after that batch, and its drift is announced once."""
    from test_store_contract import ready, replicas_item

    store = await sqlite.Store.open(tmp_path)
    deployments = [await ready(store, f"db-{i}") for i in range(4)]
    first = deployments[0].deployment_id
    scaled = dataclasses.replace(replicas_item("3"), action=model.Action.ALERT_ONLY)  # nothing to propose
    drifted = False
    changed_again = False
    started = asyncio.Event()
    watcher = _detector(store, resync_interval=600.0, on_started=started.set)

    judged_first = 0

    def verdict(deployment: model.Deployment, rules: object = None) -> drift.Evaluation:
        nonlocal changed_again, judged_first
        judged_first += drifted and deployment.deployment_id == first
        if drifted and deployment.deployment_id == deployments[2].deployment_id and not changed_again:
            changed_again = True
            watcher.notify(first)  # a change of the first, while the batch holding it is judged
        return _evaluation(deployment, (scaled,) if drifted else ())

    watcher._verdict = verdict  # type: ignore[method-assign]
    batches: list[list[str]] = []
    record = store.record_evaluations

    async def counted(verdicts: list[Any]) -> list[bool]:
        batches.append([v.deployment.deployment_id for v in verdicts])
        return await record(verdicts)

    task = asyncio.create_task(watcher.run())
    try:
        await asyncio.wait_for(started.wait(), 10)
        _, newest = await store.event_bounds()
        store.record_evaluations = counted  # type: ignore[method-assign,assignment]
        drifted = True
        for d in deployments:
            watcher.notify(d.deployment_id)
        for _ in range(200):
            if len(await store.events_after(newest, 100)) >= 4 and judged_first == 2:
                break
            await asyncio.sleep(0.025)
        assert batches == [[d.deployment_id for d in deployments]]  # one transaction, in order
        assert judged_first == 2  # judged again after the batch that held it (nothing new to write)
        events = await store.events_after(newest, 100)
        detected = [e.deployment_id for e in events if e.kind is model.EventKind.DRIFT_DETECTED]
        assert detected == [d.deployment_id for d in deployments]  # each announced once
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await store.close()

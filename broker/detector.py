"""Event-driven drift detection and remediation.

Every watch event for a managed object marks its deployment dirty; the detector re-evaluates dirty
deployments at once (coalescing bursts) and, on a timer, all of them (resync). It compares the
verdict with what it last reported and appends only changes to the event log, in the same
transaction as the new drift state and phase:

- unexpected drift appeared (DriftDetected, or ResourceMissing when an object is gone), changed
  (DriftChanged) or went away (DriftResolved);
- expected drift (a newer patch) appeared, changed or went (ExpectedDrift: no alarm, a trace);
- health changed (HealthChanged).

While the cluster cannot be read the last reported drift stands (nothing is "resolved" by an
outage); only health becomes Unknown.

Where the policy says auto-remediate, the ``Remediator`` re-applies the desired state, with an event
for each attempt. When the same drift comes back soon after a remediation (another actor fighting
the broker), each next attempt waits twice as long, up to a ceiling: no hot loop.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import datetime
import logging
import time
from collections.abc import Callable

from broker import errors, workers
from broker.domain import catalog as catalog_mod
from broker.domain import drift, lifecycle, model, policy, rules
from broker.kube import observer
from broker.store import port

log = logging.getLogger(__name__)

# Which of some drift items an observation still shows: of the caches, or with the objects a
# remediation just wrote in place of their cached copies.
Remaining = Callable[[tuple[model.DriftItem, ...], observer.Written | None], tuple[model.DriftItem, ...]]


def _key(item: model.DriftItem) -> tuple[str, str, str]:
    return item.rule_id, item.field, item.actual


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _unexpected(items: tuple[model.DriftItem, ...]) -> tuple[model.DriftItem, ...]:
    return tuple(i for i in items if i.drift_class is model.DriftClass.UNEXPECTED)


def _expected(items: tuple[model.DriftItem, ...]) -> tuple[model.DriftItem, ...]:
    return tuple(i for i in items if i.drift_class is model.DriftClass.EXPECTED)


def changes(
    deployment: model.Deployment,
    before: tuple[model.DriftItem, ...],
    after: tuple[model.DriftItem, ...],
    health_before: model.Health | None,
    health_after: model.Health,
) -> list[model.DriftEvent]:
    """The events that tell the difference between two verdicts (pure; empty when nothing changed).

    ``before`` and ``after`` hold every item, expected ones included: unexpected drift makes the
    Drift*/ResourceMissing events, expected drift (a newer patch) its own ExpectedDrift events, so
    that the history records every change of what runs without raising an alarm.
    """
    events: list[model.DriftEvent] = []
    unexpected_before, unexpected_after = _unexpected(before), _unexpected(after)

    def event(kind: model.EventKind, message: str, items: tuple[model.DriftItem, ...]) -> model.DriftEvent:
        return model.DriftEvent.about(deployment, kind, message, health=health_after, items=items)

    old_keys, new_keys = {_key(i) for i in unexpected_before}, {_key(i) for i in unexpected_after}
    if old_keys != new_keys:
        appeared = [i for i in unexpected_after if _key(i) not in old_keys]
        newly_missing = [i for i in appeared if i.rule_id in rules.MISSING]
        if not unexpected_after:
            message = "Drift resolved: " + "; ".join(i.message for i in unexpected_before)
            events.append(event(model.EventKind.DRIFT_RESOLVED, message, unexpected_after))
        elif newly_missing:
            message = "; ".join(i.message for i in newly_missing)
            events.append(event(model.EventKind.RESOURCE_MISSING, message, unexpected_after))
        else:
            kind = model.EventKind.DRIFT_DETECTED if not unexpected_before else model.EventKind.DRIFT_CHANGED
            events.append(event(kind, "; ".join(i.message for i in unexpected_after), unexpected_after))
    expected_before, expected_after = _expected(before), _expected(after)
    if {_key(i) for i in expected_before} != {_key(i) for i in expected_after}:
        if expected_after:
            lines = [
                i.message + (f" ({drift.EXPLANATIONS[i.rule_id]})" if i.rule_id in drift.EXPLANATIONS else "")
                for i in expected_after
            ]
            message = "Expected drift: " + "; ".join(lines)
        else:
            message = "Expected drift gone: " + "; ".join(i.message for i in expected_before)
        events.append(event(model.EventKind.EXPECTED_DRIFT, message, expected_after))
    if health_before is not None and health_before is not health_after:
        events.append(
            event(
                model.EventKind.HEALTH_CHANGED,
                f"Health changed from {health_before.value} to {health_after.value}",
                unexpected_after,
            )
        )
    return events


@dataclasses.dataclass
class _Fight:
    """Remediation history of one deployment, for backoff."""

    attempts: int = 0
    last_success: float = 0.0
    task: asyncio.Task[None] | None = None


class Remediator:
    """Re-applies desired state for auto-remediable drift, backing off when it keeps coming back."""

    def __init__(
        self,
        *,
        store: port.EventLog,
        cluster: observer.ClusterState,
        base_delay: float = 1.0,
        max_delay: float = 300.0,
        fight_window: float = 60.0,
    ) -> None:
        self._store = store
        self._cluster = cluster
        self._base_delay = base_delay
        self._max_delay = max_delay
        self._fight_window = fight_window
        self._fights: dict[str, _Fight] = {}
        self.attempts = 0

    def delay_for(self, fight: _Fight, now: float) -> float:
        """How long to wait before the next attempt: 0 at first, doubling while the drift returns."""
        if fight.last_success and now - fight.last_success < self._fight_window:
            fight.attempts += 1
        else:
            fight.attempts = 0
        if fight.attempts == 0:
            return 0.0
        return float(min(self._max_delay, self._base_delay * 2 ** (fight.attempts - 1)))

    def request(
        self,
        deployment: model.Deployment,
        items: tuple[model.DriftItem, ...],
        remaining: Remaining,
        *,
        keep: frozenset[str] = frozenset(),
    ) -> None:
        """Schedule a remediation unless one is already scheduled or running for the deployment.

        ``remaining(items)`` says which of ``items`` a fresh observation still shows; ``keep`` names
        fields whose drift is only reported, so re-applying must leave their live values alone.
        """
        fight = self._fights.setdefault(deployment.deployment_id, _Fight())
        if fight.task is not None and not fight.task.done():
            return
        delay = self.delay_for(fight, time.monotonic())
        fight.task = asyncio.create_task(
            self._remediate(deployment, items, delay, fight, remaining, keep),
            name=f"remediate-{deployment.deployment_id}",
        )

    async def _remediate(
        self,
        deployment: model.Deployment,
        items: tuple[model.DriftItem, ...],
        delay: float,
        fight: _Fight,
        remaining: Remaining,
        keep: frozenset[str],
    ) -> None:
        what = "; ".join(i.message for i in items)
        if delay:
            # Announced once the wait is over and the drift is still there: a request made from a
            # cache that had not yet seen the last remediation's own write (its watch event was
            # still on the way) finds nothing left, and must not leave a REMEDIATION_STARTED that
            # nothing follows (chaos failover: 5-7 of 18 hand edits under load).
            await asyncio.sleep(delay)
            items = remaining(items, None)
            if not items:
                return  # resolved by itself (or no longer auto-remediable) while we waited
            what = "; ".join(i.message for i in items)
            await self._event(
                deployment,
                model.EventKind.REMEDIATION_STARTED,
                f"Drift came back {fight.attempts} time(s) soon after remediation; re-applying after "
                f"backing off {delay:g}s: {what}",
                items,
            )
        else:
            await self._event(
                deployment,
                model.EventKind.REMEDIATION_STARTED,
                f"Re-applying the desired state: {what}",
                items,
            )
        self.attempts += 1
        try:
            written = await self._cluster.apply(deployment, create_secret=False, keep=keep)
        except errors.BrokerError as e:
            await self._event(
                deployment, model.EventKind.REMEDIATION_FAILED, f"Re-applying failed: {e.message}", items
            )
            return
        # Applied is not fixed: the objects as the API server answered the writes must show the
        # drift gone (another manager's field survives an apply, say).
        left = remaining(items, written)
        if left:
            await self._event(
                deployment,
                model.EventKind.REMEDIATION_FAILED,
                f"Re-applied generation {deployment.generation}, but the cluster still shows: "
                + "; ".join(i.message for i in left),
                left,
            )
            return
        fight.last_success = time.monotonic()
        await self._event(
            deployment,
            model.EventKind.REMEDIATION_SUCCEEDED,
            f"Re-applied generation {deployment.generation}; the drift is gone",
            items,
        )

    async def _event(
        self,
        deployment: model.Deployment,
        kind: model.EventKind,
        message: str,
        items: tuple[model.DriftItem, ...],
    ) -> None:
        with contextlib.suppress(errors.BrokerError):
            await self._store.append_events(
                [model.DriftEvent.about(deployment, kind, message, health=None, items=items)]
            )

    async def stop(self) -> None:
        """Cancel scheduled remediations."""
        await workers.cancel_and_wait(f.task for f in self._fights.values() if f.task is not None)


class Detector:
    """Re-evaluates deployments when their objects change, and all of them periodically."""

    def __init__(
        self,
        *,
        store: port.DetectorStore,
        cluster: observer.ClusterState,
        catalog: catalog_mod.Catalog,
        policies: Callable[[], policy.Policy],
        remediator: Remediator | None,
        resync_interval: float = 60.0,
        startup_grace: float = 10.0,
        catch_up_window: float = 30.0,
        on_started: Callable[[], None] = lambda: None,
    ) -> None:
        # Called once the first sweep is done: everything known at start-up has been evaluated.
        self._on_started = on_started
        self._store = store
        self._cluster = cluster
        self._startup_grace = startup_grace
        self._catalog = catalog
        self._policies = policies
        self._remediator = remediator
        self._resync_interval = resync_interval
        # Changed in the cluster: evaluated first, in the order they came.
        self._dirty: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._resync: set[str] = set()  # the periodic sweep, evaluated when nothing else waits
        # While this replica does not run the detector (it follows a leader): the deployments whose
        # objects changed in the last ``catch_up_window`` seconds, oldest first, with when. A new
        # leader evaluates them before everything else, newest first: what changed while nobody
        # led (since the old leader died) is reported at once, not somewhere in a sweep of all.
        self._catch_up_window = catch_up_window
        self._recent: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._running = False
        self._wake = workers.Wakeup()
        self._reported: dict[str, tuple[tuple[model.DriftItem, ...], model.Health]] = {}
        self._open: dict[str, tuple[str, str, int]] = {}
        # The verdict on each evaluated deployment, for the operation it was made for: what reads
        # show (the detector is the only evaluator), items with the time each was first seen.
        self._verdicts: dict[str, tuple[str, drift.Evaluation]] = {}

    def notify(self, deployment_id: str) -> None:
        """An object of the deployment changed: evaluate it soon (or first, once this replica leads)."""
        if not self._running:
            now = time.monotonic()
            self._recent.pop(deployment_id, None)
            self._recent[deployment_id] = now
            while self._recent and next(iter(self._recent.values())) < now - self._catch_up_window:
                self._recent.popitem(last=False)
            return
        self._dirty[deployment_id] = None
        self._wake.set()

    async def run(self) -> None:
        """Evaluate dirty deployments as they come, and everything every ``resync_interval``."""
        try:
            await self._run()
        finally:
            self._running = False

    async def _run(self) -> None:
        # Changed lately, while another replica led (or nobody did): first, newest first.
        horizon = time.monotonic() - self._catch_up_window
        for deployment_id, at in reversed(self._recent.items()):
            if at >= horizon:
                self._dirty[deployment_id] = None
        self._recent.clear()
        self._running = True
        self._reported = await self._store.drift_states()
        # At start the caches are still listing: evaluating now would report every resource
        # Unknown, then Healthy again a moment later. Wait for them (a cluster that stays
        # unreadable is then reported as such).
        await self._cluster.wait_synced(self._startup_grace)
        next_resync = 0.0

        async def sweep() -> float:
            nonlocal next_resync
            if time.monotonic() >= next_resync:
                with contextlib.suppress(errors.BrokerError):
                    self._resync.update(
                        d.deployment_id for d in await self._store.live_deployments(lifecycle.EVALUATED)
                    )
                next_resync = time.monotonic() + self._resync_interval
            # A watch event must not wait behind a sweep of thousands: changes go first, and each
            # evaluation awaits the store, so a change arriving mid-sweep is picked next.
            while self._dirty or self._resync:
                deployment_id = self._dirty.popitem(last=False)[0] if self._dirty else self._resync.pop()
                self._resync.discard(deployment_id)
                try:
                    await self.evaluate(deployment_id)
                except errors.BrokerError as e:
                    log.warning(
                        "drift evaluation failed", extra={"deployment_id": deployment_id, "error": e.message}
                    )
            return next_resync - time.monotonic()

        await sweep()
        self._on_started()
        await workers.run_forever(sweep, interval=self._resync_interval, wake=self._wake)

    def _verdict(self, deployment: model.Deployment) -> drift.Evaluation:
        return drift.evaluate(
            deployment, self._cluster.observe(deployment), catalog=self._catalog, rules=self._policies()
        )

    def verdict(self, deployment: model.Deployment) -> drift.Evaluation | None:
        """The last verdict on a deployment, if it was made for its current operation."""
        kept = self._verdicts.get(deployment.deployment_id)
        if kept is None or kept[0] != deployment.last_operation.operation_id:
            return None
        return kept[1]

    def reevaluate(self, namespace: str, resource_type: model.ResourceType | None) -> None:
        """The policy of a namespace (and type) changed: evaluate its deployments now, not at resync."""
        for deployment_id, (ns, kind, _) in self._open.items():
            if namespace in (ns, policy.ANY) and (resource_type is None or kind == resource_type.value):
                self._dirty[deployment_id] = None
        self._wake.set()

    def resync_now(self) -> None:
        """Evaluate every deployment soon: the cluster became readable again, or stopped being so."""
        self._resync.update(self._open)
        self._wake.set()

    async def forget_all(self) -> None:
        """This replica stopped leading: what it concluded is the next leader's business now."""
        self._reported.clear()
        self._open.clear()
        self._verdicts.clear()
        self._dirty.clear()
        self._resync.clear()
        self._recent.clear()

    def _forget(self, deployment_id: str) -> None:
        self._reported.pop(deployment_id, None)
        self._open.pop(deployment_id, None)
        self._verdicts.pop(deployment_id, None)

    async def evaluate(self, deployment_id: str) -> None:
        """Compare one deployment with what was last reported and record any change."""
        deployment = await self._store.deployment_by_id(deployment_id)
        if deployment is None or deployment.phase not in lifecycle.EVALUATED:
            # Deprovisioned (or provisioning again): its drift is nobody's business any more.
            self._forget(deployment_id)
            return
        verdict = self._verdict(deployment)
        before, health_before = self._reported.get(deployment_id, ((), None))
        readable = verdict.health is not model.Health.UNKNOWN
        after = _keep_detect_times(before, verdict.items) if readable else before
        events = changes(deployment, before, after, health_before, verdict.health)
        phase = lifecycle.phase_of_verdict(after)
        if events or phase is not deployment.phase or health_before is None:
            written = await self._store.record_evaluation(
                deployment, items=after, health=verdict.health, phase=phase, events=events
            )
            if not written:
                return
        self._reported[deployment_id] = (after, verdict.health)
        self._verdicts[deployment_id] = (
            deployment.last_operation.operation_id,
            dataclasses.replace(verdict, items=after),
        )
        open_items = _unexpected(after)
        self._open[deployment_id] = (deployment.namespace, deployment.resource_type.value, len(open_items))
        auto = tuple(i for i in open_items if i.action is model.Action.AUTO_REMEDIATE)
        if readable and auto and self._remediator is not None:
            reported_only = frozenset(
                i.field for i in open_items if i.action is not model.Action.AUTO_REMEDIATE
            )
            self._remediator.request(
                dataclasses.replace(deployment, phase=phase),
                auto,
                lambda items, written: self._remaining(deployment, items, written),
                keep=reported_only,
            )

    def _remaining(
        self,
        deployment: model.Deployment,
        items: tuple[model.DriftItem, ...],
        written: observer.Written | None,
    ) -> tuple[model.DriftItem, ...]:
        """Those of ``items`` (by rule and field) still shown as auto-remediable drift."""
        observation = self._cluster.observe(deployment, written=written)
        verdict = drift.evaluate(deployment, observation, catalog=self._catalog, rules=self._policies())
        now = {(i.rule_id, i.field): i for i in verdict.unexpected}
        return tuple(
            now[(i.rule_id, i.field)]
            for i in items
            if now.get((i.rule_id, i.field)) is not None
            and now[(i.rule_id, i.field)].action is model.Action.AUTO_REMEDIATE
        )

    def open_drifts(self) -> dict[tuple[str, str], int]:
        """Open unexpected drift items by (namespace, resource type), for metrics."""
        totals: dict[tuple[str, str], int] = {}
        for namespace, resource_type, count in self._open.values():
            totals[(namespace, resource_type)] = totals.get((namespace, resource_type), 0) + count
        return totals


def _keep_detect_times(
    before: tuple[model.DriftItem, ...], after: tuple[model.DriftItem, ...]
) -> tuple[model.DriftItem, ...]:
    """Items as now observed, keeping when each was first seen."""
    first_seen = {_key(i): i.detect_time for i in before}
    now = _now()
    return tuple(dataclasses.replace(i, detect_time=first_seen.get(_key(i)) or now) for i in after)

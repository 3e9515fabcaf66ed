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

Cost alerts (``CostWatch``, the rules in ``broker.domain.costs``) are judged from the same
verdicts: a resource whose actual cost rose past the threshold above its desired cost, and a
namespace whose actual cost crossed its budget, each get one CostAlert per crossing. Like every
event of the detector they are written by the leader only.

Where the policy says auto-remediate, the ``Remediator`` re-applies the desired state, with an event
for each attempt. When the same drift comes back soon after a remediation (another actor fighting
the broker), each next attempt waits twice as long, up to a ceiling: no hot loop.

Where the policy has a maintenance window and none is open, automatic remediation is deferred
(one RemediationDeferred event per drift) and the deployment is evaluated again when the next
window opens: the remediation then runs unless the drift resolved itself meanwhile.

Where the policy says approve, the detector proposes a pending remediation instead
(``broker.domain.approval``; a RemediationPendingApproval event), supersedes it when the drift
changes or goes, expires it after the approval TTL (RemediationExpired), and carries an approved
one out through the ``Remediator`` at once, inside or outside a maintenance window: the approval
is a person's decision to act now. The detector runs on the leader only, so exactly one replica
does each of these; an approval made on another replica reaches the leader as its
RemediationApproved event (read from the shared log), and each resync looks for approved ones.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import datetime
import logging
import time
import zlib
from collections.abc import Callable, Iterator

import msgspec

from broker import errors, workers
from broker.domain import approval, costs, drift, lifecycle, model, policy, rules
from broker.domain import catalog as catalog_mod
from broker.kube import observer
from broker.store import port

log = logging.getLogger(__name__)

# A re-evaluation that finds nothing changed keeps the verdict it confirms (its object, so reads
# and their kept encodings stay as they are), unless the verdict's observation is older than this:
# ``lastChecked`` lags the newest confirmation by at most this much.
VERDICT_REFRESH = datetime.timedelta(minutes=5)

# How soon a sweep whose listing of every deployment failed (the store unavailable) tries again.
SWEEP_RETRY_DELAY = 5.0
# The longest a sweep holds the event loop before letting other work run (an evaluation that finds
# nothing new awaits nothing: a sweep of 10,000 would otherwise hold it for seconds).
SWEEP_SLICE = 0.005
# The most verdicts of a sweep recorded in one transaction: a first sweep of 10,000 never-evaluated
# deployments is 40 commits, not 10,000 (each a disk flush).
SWEEP_BATCH = 256

# How soon an approval that found another remediation of its deployment under way is tried again.
APPROVAL_RETRY_DELAY = 2.0

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

    def busy(self, deployment_id: str) -> bool:
        """Whether a remediation of the deployment is scheduled or running (a request would wait)."""
        fight = self._fights.get(deployment_id)
        return fight is not None and fight.task is not None and not fight.task.done()

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


@dataclasses.dataclass
class _Cost:
    """What one evaluated deployment costs, as last judged."""

    deployment: model.Deployment
    desired: float | None
    actual: float | None
    items: tuple[model.DriftItem, ...]


@dataclasses.dataclass
class CostPlan:
    """What one judgement changes: subjects that went over or back below, and the alerts to append."""

    raised: set[str] = dataclasses.field(default_factory=set)
    cleared: set[str] = dataclasses.field(default_factory=set)
    alerts: list[tuple[costs.Reason, model.DriftEvent]] = dataclasses.field(default_factory=list)

    @property
    def empty(self) -> bool:
        """Whether there is nothing to write."""
        return not (self.raised or self.cleared or self.alerts)

    @property
    def events(self) -> list[model.DriftEvent]:
        """The alerts, as events to append."""
        return [event for _, event in self.alerts]


class CostWatch:
    """Cost alerts from the detector's verdicts, once per crossing (``broker.domain.costs``).

    It keeps each evaluated deployment's desired and actual cost, and running totals per namespace.
    The subjects over their threshold or budget are the store's (``cost_alerts``), loaded at the
    start of each term, so a restart or a new leader does not repeat an alert. Namespace budgets are
    judged only once the first sweep has evaluated everything: a total that is still being summed
    would look under budget and then cross it again.
    """

    def __init__(
        self,
        *,
        store: port.CostAlerts,
        catalog: catalog_mod.Catalog,
        threshold: float,
        budgets: Callable[[], costs.Budgets],
        on_alert: Callable[[str, costs.Reason], None] = lambda namespace, reason: None,
    ) -> None:
        self._store = store
        self._catalog = catalog
        self._threshold = threshold
        self._budgets = budgets
        self._on_alert = on_alert
        self._over: set[str] = set()
        self._costs: dict[str, _Cost] = {}
        self._by_namespace: dict[str, set[str]] = {}
        self._totals: dict[str, tuple[float, float]] = {}
        self._recheck: set[str] = set()
        self._gone: set[str] = set()
        self._started = False

    async def load(self) -> None:
        """Start a term: what the store says is over."""
        self.clear()
        self._over = await self._store.cost_alerts()

    def clear(self) -> None:
        """Forget everything (the term ended)."""
        self._over = set()
        self._costs.clear()
        self._by_namespace.clear()
        self._totals.clear()
        self._recheck.clear()
        self._gone.clear()
        self._started = False

    async def start(self) -> None:
        """Everything known has been evaluated once: judge every namespace's budget from now on."""
        self._started = True
        # Resources that were over and are evaluated no more (deprovisioned while no broker led).
        self._gone.update(
            s for s in self._over if costs.is_resource_subject(s) and costs.resource_of(s) not in self._costs
        )
        self._recheck.update(self._by_namespace)
        self._recheck.update(self._budgets().namespaces())
        await self.recheck()

    def totals(self) -> dict[str, tuple[float, float]]:
        """Desired and actual monthly cost per namespace, for metrics."""
        return {ns: (round(d, 2), round(a, 2)) for ns, (d, a) in self._totals.items()}

    def budget_changed(self, namespace: str) -> None:
        """A namespace's budget changed: judge it again at the next ``recheck``."""
        self._recheck.add(namespace)

    def forget(self, deployment_id: str) -> None:
        """A deployment is no longer evaluated (deprovisioned): its cost leaves its namespace."""
        cost = self._costs.pop(deployment_id, None)
        if cost is None:
            return
        namespace = cost.deployment.namespace
        self._by_namespace.get(namespace, set()).discard(deployment_id)
        self._add(namespace, -(cost.desired or 0.0), -(cost.actual or 0.0))
        self._gone.add(costs.resource_subject(deployment_id))
        self._recheck.add(namespace)

    def _add(self, namespace: str, desired: float, actual: float) -> None:
        old_desired, old_actual = self._totals.get(namespace, (0.0, 0.0))
        self._totals[namespace] = (old_desired + desired, old_actual + actual)

    def judge(self, deployment: model.Deployment, verdict: drift.Evaluation) -> CostPlan:
        """Judge one new verdict: the resource's threshold, then (once started) its namespace's budget.

        The plan is written with the verdict, in its transaction (``record_evaluations``), and
        ``committed`` once it is; a plan that was not written changes nothing but the costs kept.
        """
        deployment_id, namespace = deployment.deployment_id, deployment.namespace
        readable = verdict.health is not model.Health.UNKNOWN
        before = self._costs.get(deployment_id)
        desired = costs.desired_cost(deployment, self._catalog)
        actual = verdict.monthly_cost if readable else (before.actual if before else None)
        self._costs[deployment_id] = _Cost(
            deployment, desired, actual, verdict.items if readable else (before.items if before else ())
        )
        self._by_namespace.setdefault(namespace, set()).add(deployment_id)
        self._add(
            namespace,
            (desired or 0.0) - (before.desired or 0.0 if before else 0.0),
            (actual or 0.0) - (before.actual or 0.0 if before else 0.0),
        )
        plan = CostPlan()
        subject = costs.resource_subject(deployment_id)
        crossing = costs.cross(
            was_over=subject in self._over,
            now_over=costs.raised_beyond(
                desired=desired, actual=verdict.monthly_cost if readable else None, threshold=self._threshold
            ),
        )
        if crossing.alert and desired is not None and actual is not None:
            plan.raised.add(subject)
            items = costs.costly_items(verdict.items)
            message = costs.raised_message(
                deployment, desired=desired, actual=actual, threshold=self._threshold, items=items
            )
            plan.alerts.append(
                (
                    costs.Reason.COST_RAISED,
                    model.DriftEvent.about(
                        deployment, model.EventKind.COST_ALERT, message, health=verdict.health, items=items
                    ),
                )
            )
        elif not crossing.over and subject in self._over:
            plan.cleared.add(subject)
        if self._started:
            self._recheck.discard(namespace)
            self._judge_budget(namespace, plan, cause=deployment_id)
        return plan

    async def observe(self, deployment: model.Deployment, verdict: drift.Evaluation) -> None:
        """Judge one verdict and write what it changes on its own (no drift state with it)."""
        plan = self.judge(deployment, verdict)
        await self._write(plan)

    async def recheck(self) -> None:
        """Judge the budgets of namespaces whose budget or resources changed; drop forgotten subjects."""
        plan = CostPlan(cleared={s for s in self._gone if s in self._over})
        self._gone.clear()
        if self._started:
            namespaces, self._recheck = self._recheck, set()
            for namespace in sorted(namespaces):
                self._judge_budget(namespace, plan, cause=None)
        await self._write(plan)

    def _judge_budget(self, namespace: str, plan: CostPlan, *, cause: str | None) -> None:
        subject = costs.namespace_subject(namespace)
        actual = round(self._totals.get(namespace, (0.0, 0.0))[1], 2)
        budget = self._budgets().budget_for(namespace)
        crossing = costs.cross(was_over=subject in self._over, now_over=costs.over_budget(actual, budget))
        members = self._by_namespace.get(namespace, ())  # judged on every verdict: listed only to alert
        if crossing.alert and members and budget.monthly is not None:
            # The event is about the deployment whose verdict crossed the line, else the costliest.
            costliest = max((self._costs[d] for d in members), key=lambda c: c.actual or 0.0)
            about = self._costs[cause] if cause is not None else costliest
            plan.raised.add(subject)
            message = costs.budget_message(
                namespace,
                actual=actual,
                budget=budget.monthly,
                costliest=f"{costliest.deployment.resource_type.value} {costliest.deployment.resource_name} "
                f"({costliest.actual or 0.0:.2f}/month)",
            )
            plan.alerts.append(
                (
                    costs.Reason.OVER_BUDGET,
                    model.DriftEvent.about(
                        about.deployment,
                        model.EventKind.COST_ALERT,
                        message,
                        health=None,
                        items=costs.costly_items(about.items),
                    ),
                )
            )
        elif not crossing.over and subject in self._over:
            plan.cleared.add(subject)

    async def _write(self, plan: CostPlan) -> None:
        if plan.empty:
            return
        await self._store.record_cost_alerts(raised=plan.raised, cleared=plan.cleared, events=plan.events)
        self.committed(plan)

    def committed(self, plan: CostPlan) -> None:
        """A plan was written: its subjects are over (or no longer), its alerts counted."""
        self._over = (self._over - plan.cleared) | plan.raised
        for reason, event in plan.alerts:
            self._on_alert(event.namespace, reason)


@dataclasses.dataclass(frozen=True, slots=True)
class _Judged:
    """An evaluation not recorded yet: the verdict, what to write of it (None: nothing new), its plan."""

    deployment: model.Deployment
    verdict: drift.Evaluation  # its items with the time each was first detected
    phase: model.Phase
    plan: CostPlan
    record: port.Verdict | None
    noticed: datetime.datetime
    rules: policy.Policy  # what it was judged by


@contextlib.contextmanager
def _failure_logged(**extra: object) -> Iterator[None]:
    """A store failure ends one evaluation (or a batch), never the sweep: logged, tried at the next."""
    try:
        yield
    except errors.BrokerError as e:
        log.warning("drift evaluation failed", extra={**extra, "error": e.message})


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
        cost_watch: CostWatch | None = None,
        approval_ttl: float = 24 * 3600.0,
        clock: Callable[[], datetime.datetime] = _now,
    ) -> None:
        self.costs = cost_watch
        self._approval_ttl = datetime.timedelta(seconds=approval_ttl)
        # Wall-clock time for maintenance windows and approval expiry: a test seam (tests move it).
        self.clock = clock
        # The latest proposal of each deployment whose drift needs approval (any state): a new
        # one is made only when that drift changes, so a rejected one is not proposed again.
        self._proposals: dict[str, approval.Remediation] = {}
        # Approvals made here since the last sweep; a resync looks for every approved proposal.
        self._approved: set[str] = set()
        # Deferred remediations: the fingerprint of the drift each waits with, and its timer.
        self._deferred: dict[str, str] = {}
        self._window_timers: dict[str, asyncio.TimerHandle] = {}
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
        # The periodic sweep, evaluated when nothing else waits: with the row the sweep listed
        # (None: read it again), so that a sweep of thousands is one read, not one per deployment.
        self._resync: dict[str, model.Deployment | None] = {}
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
        # Kept with the row it was made from (the row's operation is the verdict's).
        self._verdicts: dict[str, tuple[model.Deployment, drift.Evaluation]] = {}
        # When a change of each dirty deployment was first noticed, and of each being evaluated now:
        # the first detection time of drift it brought. Their kept verdicts may be older than what
        # the caches already show (``verdict``).
        self._noticed: dict[str, datetime.datetime] = {}
        self._evaluating: dict[str, datetime.datetime] = {}
        # The provisional verdict of each of those, made by the first read after its change (from
        # the row it was made for): later reads reuse it until the next change or the kept verdict.
        self._provisional: dict[str, tuple[model.Deployment, drift.Evaluation]] = {}
        # The kept verdicts whose objects did not change since the observation they were made from,
        # with the rules they were judged by (``_unchanged``), and those being evaluated that changed
        # meanwhile: their verdict, once kept, is of objects that are not the cluster's any more.
        self._confirmed: dict[str, policy.Policy] = {}
        self._touched_meanwhile: set[str] = set()
        # When each namespace's verdicts last changed, on one counter (``version``).
        self._changes = 0
        self._changed_at: dict[str, int] = {}
        self._forgotten_at = 0

    def touched(self, deployment_id: str) -> None:
        """An object of the deployment changed: its kept verdict is no longer of what the caches hold.

        Told of every change, also those of a deployment whose operation is under way (which
        ``notify`` is not told of: the operation's end asks for its evaluation).
        """
        self._confirmed.pop(deployment_id, None)
        if deployment_id in self._evaluating:
            self._touched_meanwhile.add(deployment_id)

    def notify(self, deployment_id: str) -> None:
        """An object of the deployment changed: evaluate it soon (or first, once this replica leads)."""
        self.touched(deployment_id)
        if not self._running:
            now = time.monotonic()
            self._recent.pop(deployment_id, None)
            self._recent[deployment_id] = now
            while self._recent and next(iter(self._recent.values())) < now - self._catch_up_window:
                self._recent.popitem(last=False)
            return
        self._dirty[deployment_id] = None
        # An evaluation under way already saw the caches: drift it finds is dated from its start.
        self._noticed.setdefault(deployment_id, self._evaluating.get(deployment_id) or _now())
        self._provisional.pop(deployment_id, None)
        opened = self._open.get(deployment_id)
        if opened is not None:
            self._changed(opened[0])  # its kept verdict is not shown as it is any more (``verdict``)
        self._wake.set()

    def approved(self, deployment_id: str) -> None:
        """A remediation of the deployment was approved: carry it out soon."""
        self._approved.add(deployment_id)
        self._wake.set()

    def approvals_in(self, events: list[model.DriftEvent]) -> None:
        """Events read from the log (any replica's): carry out the approvals among them soon."""
        for event in events:
            if event.kind is model.EventKind.REMEDIATION_APPROVED:
                self.approved(event.deployment_id)

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
        if self.costs is not None:
            await self.costs.load()
        for remediation in await self._store.list_remediations(namespace=None):
            self._proposals[remediation.deployment_id] = remediation  # oldest first: the latest stays
        # At start the caches are still listing: evaluating now would report every resource
        # Unknown, then Healthy again a moment later. Wait for them (a cluster that stays
        # unreadable is then reported as such).
        await self._cluster.wait_synced(self._startup_grace)
        next_resync = 0.0
        everything_listed = False  # a sweep's listing of every deployment succeeded

        async def sweep() -> float:
            nonlocal next_resync, everything_listed
            everything = time.monotonic() >= next_resync
            if everything:
                try:
                    self._resync.update(
                        (d.deployment_id, d) for d in await self._store.live_deployments(lifecycle.EVALUATED)
                    )
                    everything_listed = True
                    next_resync = time.monotonic() + self._resync_interval
                except errors.BrokerError as e:
                    log.warning("the sweep could not list the deployments", extra={"error": e.message})
                    next_resync = time.monotonic() + min(self._resync_interval, SWEEP_RETRY_DELAY)
            try:
                await self._decisions(everything)
            except errors.BrokerError as e:
                log.warning("pending remediations could not be settled", extra={"error": e.message})
            # A watch event must not wait behind a sweep of thousands: changes go first, and a
            # change arriving mid-sweep is picked next. Evaluations that find nothing new never
            # wait for anything, so the sweep gives the loop back every SWEEP_SLICE seconds: calls
            # and streams are served between its slices.
            slice_ends = time.perf_counter() + SWEEP_SLICE
            batch: list[_Judged] = []  # the sweep's verdicts not recorded yet, in one transaction
            while self._dirty or self._resync:
                if time.perf_counter() >= slice_ends:
                    await asyncio.sleep(0)
                    slice_ends = time.perf_counter() + SWEEP_SLICE
                if self._dirty:
                    # Changed: after the verdicts judged before the change, the changed ones, each
                    # row read afresh, are recorded at once, together (group commit: one disk
                    # flush for the changes that came meanwhile, not one each).
                    await self._record_logged(batch)
                    await self._record_logged(await self._judge_dirty())
                    continue
                deployment_id, listed = self._resync.popitem()
                with _failure_logged(deployment_id=deployment_id):
                    judged = await self._judging(deployment_id, listed)
                    if judged is not None and judged.record is not None and judged.plan.empty:
                        batch.append(judged)
                    elif judged is not None:  # nothing to write, or cost alerts: judged one by one
                        await self._record([judged])
                if len(batch) >= SWEEP_BATCH:
                    await self._record_logged(batch)
            await self._record_logged(batch)
            if self.costs is not None:
                try:
                    await self.costs.recheck()
                except errors.BrokerError as e:
                    log.warning("cost budget check failed", extra={"error": e.message})
            wait = next_resync - time.monotonic()
            pending = [r.expire_time for r in self._proposals.values() if r.state is approval.State.PENDING]
            if pending:
                wait = min(wait, max(0.0, (min(pending) - self.clock()).total_seconds()))
            return wait

        # Start-up is done once everything was listed and evaluated: until then, cost crossings are
        # not judged (a total of nothing is no crossing) and the heap is not frozen.
        wait = await sweep()
        while not everything_listed:
            await asyncio.sleep(max(0.0, wait))
            wait = await sweep()
        if self.costs is not None:
            with contextlib.suppress(errors.BrokerError):  # judged again at the next sweep
                await self.costs.start()
        self._on_started()
        await workers.run_forever(sweep, interval=self._resync_interval, wake=self._wake)

    def _verdict(self, deployment: model.Deployment, rules: policy.Policy | None = None) -> drift.Evaluation:
        observation = self._cluster.observe(deployment)
        rules = rules if rules is not None else self._policies()
        return drift.evaluate(deployment, observation, catalog=self._catalog, rules=rules)

    def _unchanged(self, deployment: model.Deployment) -> bool:
        """Whether the kept verdict on a listed row stands as it is, with no evaluation.

        An evaluation is a function of the row, the cached objects, the rules and the time. It is
        not made again while the row is the one the verdict was made from, no object of the
        deployment changed since (``touched``), the rules are the same, and the verdict cannot age:
        healthy, with no drift to act on or proposal to settle, and younger than its refresh. At
        10,000 deployments a sweep is then a listing and 10,000 lookups, not 10,000 evaluations (and
        their objects for the collector). What ages a verdict is a recent restart (Degraded until it
        is ``drift.RECENT_RESTART`` old), and only a Degraded one.
        """
        deployment_id = deployment.deployment_id
        kept = self._verdicts.get(deployment_id)
        rules = self._confirmed.get(deployment_id)
        if kept is None or rules is None or rules is not self._policies():
            return False
        kept_deployment, verdict = kept
        return (
            (kept_deployment is deployment or kept_deployment == deployment)
            and verdict.health is model.Health.HEALTHY
            and deployment_id not in self._proposals
            and deployment_id not in self._deferred
            and not _unexpected(verdict.items)
            and not _refresh_due(deployment_id, verdict, _now())
        )

    def verdict(self, deployment: model.Deployment) -> drift.Evaluation | None:
        """The verdict on a deployment, if one was made for its current operation.

        A deployment whose objects changed since is evaluated again soon, and that evaluation
        awaits the store before its verdict is kept: until then the kept verdict is older than the
        caches, and a read that showed the change (live, or through another page) must not be
        followed by one that shows the world before it. Such a deployment's verdict is provisional:
        what the caches say now, with the first detection times of its drift kept.
        """
        deployment_id = deployment.deployment_id
        kept = self._verdicts.get(deployment_id)
        if kept is None or kept[0].last_operation.operation_id != deployment.last_operation.operation_id:
            return None
        noticed = self._evaluating.get(deployment_id) or self._noticed.get(deployment_id)
        if noticed is None:
            return kept[1]
        made = self._provisional.get(deployment_id)
        if made is not None and (made[0] is deployment or made[0] == deployment):
            return made[1]
        verdict = self._verdict(deployment)
        if verdict.health is model.Health.UNKNOWN:
            verdict = msgspec.structs.replace(verdict, items=kept[1].items)
        else:
            verdict = msgspec.structs.replace(
                verdict, items=_keep_detect_times(kept[1].items, verdict.items, noticed)
            )
        if msgspec.structs.replace(kept[1], checked_at=verdict.checked_at) == verdict:
            verdict = kept[1]  # nothing new: the kept verdict, as its evaluation will conclude
        self._provisional[deployment_id] = (deployment, verdict)
        return verdict

    def version(self, namespace: str) -> int:
        """A number that changes whenever a verdict on a deployment of the namespace does."""
        return max(self._changed_at.get(namespace, 0), self._forgotten_at)

    def _changed(self, namespace: str) -> None:
        self._changes += 1
        self._changed_at[namespace] = self._changes

    def reevaluate(self, namespace: str, resource_type: model.ResourceType | None) -> None:
        """The policy of a namespace (and type) changed: evaluate its deployments now, not at resync."""
        for deployment_id, (ns, kind, _) in self._open.items():
            if namespace in (ns, policy.ANY) and (resource_type is None or kind == resource_type.value):
                self._dirty[deployment_id] = None
                self._noticed.setdefault(deployment_id, _now())  # shown under the new policy at once
                self._provisional.pop(deployment_id, None)
                self._changed(ns)
        self._wake.set()

    def budget_changed(self, namespace: str) -> None:
        """A namespace's cost budget changed: judge it against its actual cost now."""
        if self.costs is not None:
            self.costs.budget_changed(namespace)
            self._wake.set()

    def resync_now(self) -> None:
        """Evaluate every deployment soon: the cluster became readable again, or stopped being so."""
        self._confirmed.clear()
        self._touched_meanwhile.update(self._evaluating)
        self._resync.update(dict.fromkeys(self._open))
        self._wake.set()

    async def forget_all(self) -> None:
        """This replica stopped leading: what it concluded is the next leader's business now."""
        for timer in self._window_timers.values():
            timer.cancel()
        self._window_timers.clear()
        self._deferred.clear()
        self._proposals.clear()
        self._approved.clear()
        self._reported.clear()
        self._open.clear()
        self._verdicts.clear()
        self._confirmed.clear()
        self._changes += 1
        self._forgotten_at = self._changes
        self._dirty.clear()
        self._noticed.clear()
        self._provisional.clear()
        self._resync.clear()
        if self.costs is not None:
            self.costs.clear()
        self._recent.clear()

    def _forget(self, deployment_id: str) -> None:
        self._reported.pop(deployment_id, None)
        self._noticed.pop(deployment_id, None)
        self._provisional.pop(deployment_id, None)
        opened = self._open.pop(deployment_id, None)
        self._confirmed.pop(deployment_id, None)
        if self._verdicts.pop(deployment_id, None) is not None and opened is not None:
            self._changed(opened[0])
        if self.costs is not None:
            self.costs.forget(deployment_id)

    async def evaluate(self, deployment_id: str) -> None:
        """Evaluate one deployment now, its row read afresh, and record any change (the sweep
        judges changed deployments in batches, ``_judge_dirty``, the same way).

        A row that moved on since is harmless: the store refuses to record an evaluation of it (a
        superseded operation), and whatever changed it asked for a fresh evaluation too.
        """
        judged = await self._judging(deployment_id, None)
        if judged is not None:
            await self._record([judged])

    async def _judge_dirty(self) -> list[_Judged]:
        """Judge the changed deployments, oldest change first, for one transaction (``_record``).

        At most ``SWEEP_BATCH``; a verdict with cost alerts ends the batch, so that the next one is
        judged against what its transaction wrote (a budget crossed once is not crossed twice).
        """
        judged: list[_Judged] = []
        while self._dirty and len(judged) < SWEEP_BATCH:
            deployment_id = next(iter(self._dirty))
            if judged and deployment_id in self._evaluating:
                break  # changed again since its verdict in this batch: judged after that is recorded
            del self._dirty[deployment_id]
            self._resync.pop(deployment_id, None)
            with _failure_logged(deployment_id=deployment_id):
                verdict = await self._judging(deployment_id, None)
                if verdict is not None:
                    judged.append(verdict)
                    if not verdict.plan.empty:
                        break
        return judged

    async def _judging(self, deployment_id: str, listed: model.Deployment | None) -> _Judged | None:
        """Evaluate a deployment, to be recorded (``_record``); None when there is nothing to record.

        From here until it is recorded the deployment is being evaluated: reads of it are
        provisional (``verdict``), and drift a change brings meanwhile is dated from now.
        """
        noticed = self._noticed.pop(deployment_id, None) or _now()
        self._evaluating[deployment_id] = noticed
        try:
            judged = await self._judge(deployment_id, listed, noticed)
        except BaseException:
            self._evaluated(deployment_id, noticed, concluded=False)
            raise
        if judged is None:
            self._evaluated(deployment_id, noticed, concluded=True)
        return judged

    def _evaluated(self, deployment_id: str, noticed: datetime.datetime, *, concluded: bool) -> None:
        if not concluded:
            # Reads stay provisional (never back to the verdict before the change) until an
            # evaluation concludes, at the next change or sweep.
            self._noticed.setdefault(deployment_id, noticed)
        if self._evaluating.get(deployment_id) is noticed:
            del self._evaluating[deployment_id]
            self._touched_meanwhile.discard(deployment_id)

    async def _judge(
        self, deployment_id: str, listed: model.Deployment | None, noticed: datetime.datetime
    ) -> _Judged | None:
        if listed is not None and self._unchanged(listed):
            return None  # the kept verdict stands: nothing it was made from changed
        deployment = listed if listed is not None else await self._store.deployment_by_id(deployment_id)
        if deployment is None or deployment.phase not in lifecycle.EVALUATED:
            # Deprovisioned (or provisioning again): its drift is nobody's business any more.
            self._forget(deployment_id)
            return None
        rules = self._policies()
        verdict = self._verdict(deployment, rules)
        if listed is not None and verdict.unexpected:
            # Drift leads to action (a remediation, a proposal): never on a row that moved on
            # since the sweep listed it.
            fresh = await self._store.deployment_by_id(deployment_id)
            if fresh is None or fresh.phase not in lifecycle.EVALUATED:
                self._forget(deployment_id)
                return None
            if fresh != listed:
                deployment = fresh
                verdict = self._verdict(deployment, rules)
        before, health_before = self._reported.get(deployment_id, ((), None))
        readable = verdict.health is not model.Health.UNKNOWN
        after = _keep_detect_times(before, verdict.items, noticed) if readable else before
        events = changes(deployment, before, after, health_before, verdict.health)
        phase = lifecycle.phase_of_verdict(after)
        verdict = msgspec.structs.replace(verdict, items=after)
        # Cost alerts go with the verdict they judge, in its transaction.
        plan = CostPlan()
        if self.costs is not None:
            plan = self.costs.judge(dataclasses.replace(deployment, phase=phase), verdict)
        record = None
        if events or not plan.empty or phase is not deployment.phase or health_before is None:
            record = port.Verdict(
                deployment,
                items=after,
                health=verdict.health,
                phase=phase,
                events=events + plan.events,
                crossings=(plan.raised, plan.cleared),
            )
        return _Judged(deployment, verdict, phase, plan, record, noticed, rules)

    async def _record(self, judged: list[_Judged]) -> None:
        """Record verdicts (those with anything to write, in one transaction), then act on them.

        ``judged`` is emptied. A verdict its store refused (the deployment moved on) is dropped: the
        change that moved it asked for an evaluation of its own.
        """
        if not judged:
            return
        taken, judged[:] = judged[:], []
        done = 0
        try:
            records = [j.record for j in taken if j.record is not None]
            written = iter(await self._store.record_evaluations(records) if records else ())
            for j in taken:
                recorded = j.record is None or next(written)
                concluded = False
                try:
                    if recorded:
                        # Each on its own: a proposal the store refuses must not leave the rest of
                        # the batch, recorded with it, unconcluded.
                        with _failure_logged(deployment_id=j.deployment.deployment_id):
                            await self._conclude(j)
                            concluded = True
                    else:
                        concluded = True  # moved on: the change that moved it is evaluated anew
                finally:
                    done += 1
                    self._evaluated(j.deployment.deployment_id, j.noticed, concluded=concluded)
        finally:
            for j in taken[done:]:
                self._evaluated(j.deployment.deployment_id, j.noticed, concluded=False)

    async def _record_logged(self, batch: list[_Judged]) -> None:
        with _failure_logged(deployments=len(batch)):
            await self._record(batch)

    async def _conclude(self, judged: _Judged) -> None:
        """A verdict was recorded: keep it, and act on its drift (a proposal, a remediation)."""
        deployment, verdict, phase = judged.deployment, judged.verdict, judged.phase
        deployment_id = deployment.deployment_id
        if self.costs is not None:
            self.costs.committed(judged.plan)
        self._reported[deployment_id] = (verdict.items, verdict.health)
        self._keep_verdict(deployment, verdict)
        if deployment_id not in self._touched_meanwhile:
            self._confirmed[deployment_id] = judged.rules
        open_items = _unexpected(verdict.items)
        self._open[deployment_id] = (deployment.namespace, deployment.resource_type.value, len(open_items))
        readable = verdict.health is not model.Health.UNKNOWN
        if readable:
            needs = tuple(i for i in open_items if i.action is model.Action.APPROVAL_REQUIRED)
            await self._propose(dataclasses.replace(deployment, phase=phase), needs)
        auto = tuple(i for i in open_items if i.action is model.Action.AUTO_REMEDIATE)
        if readable and auto and self._remediator is not None:
            if await self._deferring(dataclasses.replace(deployment, phase=phase), auto):
                return
            reported_only = frozenset(
                i.field for i in open_items if i.action is not model.Action.AUTO_REMEDIATE
            )
            self._remediator.request(
                dataclasses.replace(deployment, phase=phase),
                auto,
                lambda items, written: self._remaining(deployment, items, written),
                keep=reported_only,
            )
        else:
            self._deferred.pop(deployment_id, None)  # resolved by itself (or not automatic any more)

    async def _deferring(self, deployment: model.Deployment, auto: tuple[model.DriftItem, ...]) -> bool:
        """Whether the remediation of ``auto`` waits for a maintenance window (and say so, once)."""
        deployment_id = deployment.deployment_id
        window = self._policies().rule_for(deployment.namespace, deployment.resource_type).window
        now = self.clock()
        if window is None or window.is_open(now):
            self._deferred.pop(deployment_id, None)
            return False
        start, end = window.current_or_next(now)
        if deployment_id not in self._window_timers:
            # Evaluate again once the window is open (a little after, so it is open by then).
            delay = (start - now).total_seconds() + 0.2
            self._window_timers[deployment_id] = asyncio.get_running_loop().call_later(
                delay, self._window_opened, deployment_id
            )
        marker = approval.fingerprint(auto, deployment.generation)
        if self._deferred.get(deployment_id) != marker:
            self._deferred[deployment_id] = marker
            await self._store.append_events(
                [
                    model.DriftEvent.about(
                        deployment,
                        model.EventKind.REMEDIATION_DEFERRED,
                        f"Outside the maintenance window {window.describe()}: remediation deferred to "
                        f"{start.isoformat(timespec='seconds')} "
                        f"(open until {end.isoformat(timespec='seconds')}): "
                        + "; ".join(i.message for i in auto),
                        health=None,
                        items=auto,
                    )
                ]
            )
        return True

    def _window_opened(self, deployment_id: str) -> None:
        self._window_timers.pop(deployment_id, None)
        self.notify(deployment_id)

    async def _propose(self, deployment: model.Deployment, needs: tuple[model.DriftItem, ...]) -> None:
        """Propose a remediation of the drift needing approval, unless the latest proposal is for it."""
        deployment_id = deployment.deployment_id
        latest = self._proposals.get(deployment_id)
        if not needs:
            if latest is not None:
                # The drift went (or stopped needing approval): what was proposed is moot.
                if latest.state is approval.State.PENDING:
                    await self._store.close_remediation(
                        latest.remediation_id,
                        from_states=frozenset({approval.State.PENDING}),
                        to=approval.State.SUPERSEDED,
                        reason="the drift it would undo is gone",
                    )
                if latest.state is not approval.State.APPROVED:
                    del self._proposals[deployment_id]
            return
        if latest is not None and latest.fingerprint == approval.fingerprint(needs, deployment.generation):
            return
        proposal = approval.propose(deployment, needs, now=self.clock(), ttl=self._approval_ttl)
        supersedes = (
            f" (supersedes {latest.remediation_id})"
            if latest is not None and latest.state is approval.State.PENDING
            else ""
        )
        message = (
            f"Remediation {proposal.remediation_id} waits for approval until "
            f"{proposal.expire_time.isoformat(timespec='seconds')}{supersedes}: {proposal.summary()}"
        )
        await self._store.propose_remediation(
            proposal,
            event=approval.event(
                proposal, model.EventKind.REMEDIATION_PENDING_APPROVAL, message, phase=deployment.phase
            ),
        )
        self._proposals[deployment_id] = proposal

    async def _decisions(self, everything: bool) -> None:
        """Expire proposals nobody decided in time; carry out approved ones."""
        now = self.clock()
        for deployment_id, proposal in list(self._proposals.items()):
            if proposal.state is not approval.State.PENDING or proposal.expire_time > now:
                continue
            expired = await self._store.close_remediation(
                proposal.remediation_id,
                from_states=frozenset({approval.State.PENDING}),
                to=approval.State.EXPIRED,
                reason=f"not decided within {self._approval_ttl}",
                event=approval.event(
                    proposal,
                    model.EventKind.REMEDIATION_EXPIRED,
                    f"Remediation {proposal.remediation_id} expired undecided after {self._approval_ttl}; "
                    f"the drift stays: {proposal.summary()}",
                    phase=model.Phase.DRIFT_DETECTED,
                ),
            )
            # Expired, or decided meanwhile: either way no longer pending here.
            state = approval.State.EXPIRED if expired else approval.State.SUPERSEDED
            self._proposals[deployment_id] = dataclasses.replace(proposal, state=state)
        if not (everything or self._approved):
            return
        self._approved.clear()
        for proposal in await self._store.list_remediations(
            namespace=None, states=frozenset({approval.State.APPROVED})
        ):
            await self._carry_out(proposal)

    async def _carry_out(self, proposal: approval.Remediation) -> None:
        """Re-apply what an approved proposal names, if its drift is still there."""
        if self._remediator is None:
            return  # a dry run (--no-remediation): the approval stays until remediation is on
        self._proposals[proposal.deployment_id] = proposal
        deployment = await self._store.deployment_by_id(proposal.deployment_id)
        gone = deployment is None or deployment.phase not in lifecycle.EVALUATED
        verdict = self._verdict(deployment) if deployment is not None and not gone else None
        if verdict is not None and verdict.health is model.Health.UNKNOWN:
            return  # the cluster cannot be read: try again at the next sweep
        wanted = {(i.rule_id, i.field) for i in proposal.items}
        items = tuple(i for i in verdict.unexpected if (i.rule_id, i.field) in wanted) if verdict else ()
        if deployment is None or verdict is None or deployment.generation != proposal.generation or not items:
            await self._store.close_remediation(
                proposal.remediation_id,
                from_states=frozenset({approval.State.APPROVED}),
                to=approval.State.SUPERSEDED,
                reason="approved, but the drift or the desired state changed before it was carried out",
            )
            self._proposals.pop(proposal.deployment_id, None)
            return
        if self._remediator.busy(proposal.deployment_id):
            # Another remediation of it is running or backing off: the approval stays APPROVED
            # (not marked applied without running) and is tried again shortly.
            asyncio.get_running_loop().call_later(APPROVAL_RETRY_DELAY, self.approved, proposal.deployment_id)
            return
        if not await self._store.close_remediation(
            proposal.remediation_id,
            from_states=frozenset({approval.State.APPROVED}),
            to=approval.State.APPLIED,
            reason=proposal.reason,
        ):
            return
        self._proposals[proposal.deployment_id] = dataclasses.replace(proposal, state=approval.State.APPLIED)
        keep = frozenset(i.field for i in verdict.unexpected if (i.rule_id, i.field) not in wanted)
        self._remediator.request(
            deployment,
            items,
            lambda left, written: self._remaining(deployment, left, written, approved=True),
            keep=keep,
        )

    def _keep_verdict(self, deployment: model.Deployment, verdict: drift.Evaluation) -> None:
        operation_id = deployment.last_operation.operation_id
        if deployment.deployment_id not in self._noticed:  # no change since this evaluation saw it
            self._provisional.pop(deployment.deployment_id, None)
        kept = self._verdicts.get(deployment.deployment_id)
        same_operation = kept is not None and kept[0].last_operation.operation_id == operation_id
        if (
            kept is not None
            and same_operation
            and not _refresh_due(deployment.deployment_id, kept[1], verdict.checked_at)
            and msgspec.structs.replace(kept[1], checked_at=verdict.checked_at) == verdict
        ):
            if kept[0] is not deployment and kept[0] != deployment:
                # The row moved on (its phase, say) and the verdict did not: kept with the row it
                # now confirms, so that the next sweep can tell the row unchanged (``_unchanged``).
                self._verdicts[deployment.deployment_id] = (deployment, kept[1])
            return
        if kept is not None and same_operation:
            # The parts that did not change are the kept verdict's own objects (frozen with the heap
            # after start-up): a change of one part makes new objects of that part only, for the
            # collector to walk.
            old = kept[1]
            verdict = msgspec.structs.replace(
                verdict,
                actual_spec=old.actual_spec
                if old.actual_spec == verdict.actual_spec
                else verdict.actual_spec,
                items=old.items if old.items == verdict.items else verdict.items,
                usage=old.usage if old.usage == verdict.usage else verdict.usage,
            )
        self._verdicts[deployment.deployment_id] = (deployment, verdict)
        self._changed(deployment.namespace)

    def usage_changed(self, deployment_id: str) -> None:
        """The metrics of a deployment's pods changed: only its verdict's usage moves.

        Usage is all a metrics poll changes, and in a real cluster most figures move at every poll:
        the kept verdict takes the new usage as it is, with no evaluation and no read of the store
        (at 10,000 deployments a poll would otherwise be 10,000 evaluations). A deployment with no
        kept verdict, or one whose evaluation is pending, gets the figures from that evaluation.
        """
        kept = self._verdicts.get(deployment_id)
        if not self._running or kept is None or deployment_id in self._noticed:
            return  # not judged here, or the evaluation it waits for reads the new figures
        if deployment_id in self._evaluating:
            self.notify(deployment_id)  # under way with the figures before: once more after it
            return
        deployment, verdict = kept
        usage = self._cluster.usage(deployment) if verdict.usage is not None else None
        if usage is None:
            self.notify(deployment_id)  # no workload was observed, or none is now: evaluate it
        elif usage != verdict.usage:
            self._verdicts[deployment_id] = (deployment, msgspec.structs.replace(verdict, usage=usage))
            self._changed(deployment.namespace)

    def _remaining(
        self,
        deployment: model.Deployment,
        items: tuple[model.DriftItem, ...],
        written: observer.Written | None,
        *,
        approved: bool = False,
    ) -> tuple[model.DriftItem, ...]:
        """Those of ``items`` (by rule and field) still shown as auto-remediable drift (or as any
        drift at all, for an ``approved`` remediation: a person decided it)."""
        observation = self._cluster.observe(deployment, written=written)
        verdict = drift.evaluate(deployment, observation, catalog=self._catalog, rules=self._policies())
        now = {(i.rule_id, i.field): i for i in verdict.unexpected}
        return tuple(
            now[(i.rule_id, i.field)]
            for i in items
            if now.get((i.rule_id, i.field)) is not None
            and (approved or now[(i.rule_id, i.field)].action is model.Action.AUTO_REMEDIATE)
        )

    def open_drifts(self) -> dict[tuple[str, str], int]:
        """Open unexpected drift items by (namespace, resource type), for metrics."""
        totals: dict[tuple[str, str], int] = {}
        for namespace, resource_type, count in self._open.values():
            totals[(namespace, resource_type)] = totals.get((namespace, resource_type), 0) + count
        return totals


def _refresh_due(deployment_id: str, verdict: drift.Evaluation, now: datetime.datetime) -> bool:
    """Whether a confirmed verdict is old enough to be made anew (its ``lastChecked`` moved on).

    Between half of ``VERDICT_REFRESH`` and all of it, by deployment: verdicts made together (the
    first sweep of thousands) are refreshed over several sweeps, not in one.
    """
    spread = zlib.crc32(deployment_id.encode()) / 0xFFFFFFFF
    return now - verdict.checked_at >= VERDICT_REFRESH * (0.5 + spread / 2)


def _keep_detect_times(
    before: tuple[model.DriftItem, ...], after: tuple[model.DriftItem, ...], noticed: datetime.datetime
) -> tuple[model.DriftItem, ...]:
    """Items as now observed, keeping when each was first seen (new ones: when their change was)."""
    first_seen = {_key(i): i.detect_time for i in before}
    return tuple(dataclasses.replace(i, detect_time=first_seen.get(_key(i)) or noticed) for i in after)

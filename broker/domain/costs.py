"""Cost budgets and cost alerts: what resources and namespaces cost, and when that is worth an alert.

Pure code. The estimates come from ``drift`` (the price table of the catalog): a resource's
*desired* cost is that of its desired spec (the size tier's requests and storage, times the desired
replicas), its *actual* cost the verdict's (what runs, with the storage its volume claims hold).
Topics have no price and count with nothing.

Two conditions raise a ``COST_ALERT``, each once per crossing:

- a resource whose actual cost exceeds its desired cost by more than the threshold, a fraction of
  the desired cost (``--cost-alert-threshold 0.2``: more than 20 percent more);
- a namespace whose summed actual cost exceeds its monthly budget.

"Once per crossing": the set of subjects currently over is remembered (the store keeps it, so a
restart or a new leader does not repeat an alert); a subject alerts when it goes over and is
forgotten when it is back at or below, so it alerts again only after that. A cost that cannot be
read (the cluster is unreadable) changes nothing.

Budgets come from the configuration file (``budgets:``) and from ``SetCostBudget``; one set through
the API overrides the configured one for its namespace, and removing it brings the configured one
back.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Iterable, Mapping

from broker.domain import catalog as catalog_mod
from broker.domain import drift, model

# Larger budgets are refused: no namespace costs a trillion a month, and a typo should not pass.
MAX_BUDGET = 1e12
DEFAULT_THRESHOLD = 0.2
DEFAULT_MAX_DRIFTS = 10
MAX_DRIFTS = 100

_RESOURCE = "resource:"
_NAMESPACE = "namespace:"


class Source(enum.Enum):
    """Where a namespace's budget comes from."""

    CONFIGURATION = "configuration"
    API = "api"


class Reason(enum.Enum):
    """Why a cost alert was raised (the ``reason`` label of ``broker_cost_alerts_total``)."""

    COST_RAISED = "cost_raised"
    OVER_BUDGET = "over_budget"


@dataclasses.dataclass(frozen=True)
class Budget:
    """The budget in effect for a namespace; ``monthly`` is None when it has none."""

    namespace: str
    monthly: float | None = None
    source: Source | None = None


def amount_problem(value: float) -> str:
    """Why ``value`` is not a budget ("" when it is one): finite, 0 or more, at most ``MAX_BUDGET``."""
    if math.isnan(value) or math.isinf(value):
        return "must be a finite number of the price table's currency per month"
    if value < 0:
        return f"must not be negative ({value:g}); remove the budget by leaving monthly_budget out"
    if value > MAX_BUDGET:
        return f"must be at most {MAX_BUDGET:g}"
    return ""


def threshold_problem(value: float) -> str:
    """Why ``value`` is not a cost-alert threshold ("" when it is one): a finite fraction, 0 or more."""
    if math.isnan(value) or math.isinf(value) or value < 0:
        return "must be a finite fraction of the desired cost, 0 or more (0.2: more than 20 percent)"
    return ""


@dataclasses.dataclass(frozen=True)
class Budgets:
    """The budgets in effect: configured ones, overridden by those set through the API."""

    configured: Mapping[str, float] = dataclasses.field(default_factory=dict)
    stored: Mapping[str, float] = dataclasses.field(default_factory=dict)

    def budget_for(self, namespace: str) -> Budget:
        """The budget of ``namespace`` and where it comes from."""
        if namespace in self.stored:
            return Budget(namespace, self.stored[namespace], Source.API)
        if namespace in self.configured:
            return Budget(namespace, self.configured[namespace], Source.CONFIGURATION)
        return Budget(namespace)

    def with_stored(self, namespace: str, monthly: float | None) -> Budgets:
        """These budgets with the API's budget of ``namespace`` set (or removed for None)."""
        stored = dict(self.stored)
        if monthly is None:
            stored.pop(namespace, None)
        else:
            stored[namespace] = monthly
        return dataclasses.replace(self, stored=stored)

    def namespaces(self) -> list[str]:
        """Every namespace with a budget."""
        return sorted(set(self.configured) | set(self.stored))


def desired_cost(deployment: model.Deployment, catalog: catalog_mod.Catalog) -> float | None:
    """The estimated monthly cost of a deployment's desired spec; None when it has no price (topics)."""
    spec = deployment.desired_spec
    if deployment.resource_type is model.ResourceType.TOPIC or spec.resources is None:
        return None
    return round(drift.monthly_cost(spec.resources, spec.replicas or 1, catalog.prices), 2)


def raised_beyond(*, desired: float | None, actual: float | None, threshold: float) -> bool | None:
    """Whether ``actual`` exceeds ``desired`` by more than ``threshold`` of it; None when unknown."""
    if desired is None or actual is None:
        return None
    return actual - desired > threshold * desired + 0.005  # cents: rounding is no raise


def over_budget(actual: float, budget: Budget) -> bool | None:
    """Whether a namespace's actual cost is above its budget; None when it has none."""
    if budget.monthly is None:
        return None
    return actual > budget.monthly


def resource_subject(deployment_id: str) -> str:
    """The key under which a resource's crossing is remembered."""
    return _RESOURCE + deployment_id


def namespace_subject(namespace: str) -> str:
    """The key under which a namespace's budget crossing is remembered."""
    return _NAMESPACE + namespace


def is_resource_subject(subject: str) -> bool:
    """Whether ``subject`` remembers a resource (not a namespace)."""
    return subject.startswith(_RESOURCE)


def resource_of(subject: str) -> str:
    """The deployment id a resource subject remembers."""
    return subject.removeprefix(_RESOURCE)


@dataclasses.dataclass(frozen=True)
class Crossing:
    """What one new reading of a condition means: whether the subject is over now, whether to alert."""

    over: bool
    alert: bool


def cross(*, was_over: bool, now_over: bool | None) -> Crossing:
    """Alert on going over, once; an unknown reading keeps the last state."""
    if now_over is None:
        return Crossing(over=was_over, alert=False)
    return Crossing(over=now_over, alert=now_over and not was_over)


def costly_items(items: Iterable[model.DriftItem]) -> tuple[model.DriftItem, ...]:
    """The unexpected drift items that raise the cost, costliest first."""
    raising = [
        i
        for i in items
        if i.drift_class is model.DriftClass.UNEXPECTED
        and i.monthly_cost_delta is not None
        and i.monthly_cost_delta > 0
    ]
    return tuple(sorted(raising, key=lambda i: -(i.monthly_cost_delta or 0.0)))


def _money(value: float) -> str:
    return f"{value:.2f}"


def raised_message(
    deployment: model.Deployment,
    *,
    desired: float,
    actual: float,
    threshold: float,
    items: tuple[model.DriftItem, ...],
) -> str:
    """The sentence of a cost-raised alert."""
    percent = f"{(actual - desired) / desired * 100:.0f}%" if desired else "from nothing"
    causes = "; ".join(f"{i.message} (+{_money(i.monthly_cost_delta or 0.0)}/month)" for i in items)
    return (
        f"Cost alert: {deployment.resource_type.value} {deployment.resource_name} costs "
        f"{_money(actual)}/month, desired {_money(desired)}/month (+{percent}, threshold "
        f"{threshold * 100:g}%)" + (f": {causes}" if causes else "")
    )


def budget_message(namespace: str, *, actual: float, budget: float, costliest: str) -> str:
    """The sentence of an over-budget alert."""
    return (
        f"Cost alert: namespace {namespace} costs {_money(actual)}/month, over its budget of "
        f"{_money(budget)}/month; the costliest resource is {costliest}"
    )


@dataclasses.dataclass(frozen=True)
class ResourceCost:
    """One resource's estimated monthly cost, desired against actual, and its drift items."""

    deployment: model.Deployment
    desired: float | None
    actual: float | None
    items: tuple[model.DriftItem, ...] = ()


@dataclasses.dataclass(frozen=True)
class CostDrift:
    """One drift item that raises a resource's cost, with its resource."""

    deployment: model.Deployment
    item: model.DriftItem


@dataclasses.dataclass(frozen=True)
class Summary:
    """A namespace's cost: desired against actual, its budget, and the drifts that cost most."""

    namespace: str
    desired: float
    actual: float
    budget: Budget
    exceeded: bool
    top_drifts: tuple[CostDrift, ...]
    resources: tuple[ResourceCost, ...]
    threshold: float


def summarize(
    namespace: str,
    resources: Iterable[ResourceCost],
    *,
    budget: Budget,
    threshold: float,
    max_drifts: int = DEFAULT_MAX_DRIFTS,
) -> Summary:
    """Sum a namespace's resources and rank the drifts that raise their cost most."""
    ordered = tuple(
        sorted(resources, key=lambda r: (r.deployment.resource_type.value, r.deployment.resource_name))
    )
    desired = round(sum(r.desired or 0.0 for r in ordered), 2)
    actual = round(sum(r.actual or 0.0 for r in ordered), 2)
    drifts = [CostDrift(r.deployment, item) for r in ordered for item in costly_items(r.items)]
    drifts.sort(key=lambda d: -(d.item.monthly_cost_delta or 0.0))
    return Summary(
        namespace=namespace,
        desired=desired,
        actual=actual,
        budget=budget,
        exceeded=bool(over_budget(actual, budget)),
        top_drifts=tuple(drifts[:max_drifts]),
        resources=ordered,
        threshold=threshold,
    )

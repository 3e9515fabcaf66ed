"""The store port: what the service, the workers and the fan-out need of durable state, per concern.

Each concern is a Protocol; components are typed against the ones they use, so a second adapter
(PostgreSQL, past one replica) is a new class that satisfies them, tested by the same contract
suite (``tests/test_store_contract.py``, parametrized over the adapters). ``broker.store.sqlite``
is the adapter of one replica, ``broker.store.postgres`` the adapter of several; what both write
the same way is ``broker.store.codec``.

Listings (``list_deployments``, ``list_events``) page by position: a page starts after
``page.after`` and its ``next_after`` is where the next one starts (``None`` at the end). Positions
come back from callers inside page tokens, which the service makes and checks (``broker.paging``),
so an adapter answers any short printable-ASCII position, including one it never made.

The event log's visibility contract, which every adapter keeps:

* sequences are strictly increasing, and an event is visible (to ``events_after``, ``list_events``
  and the ``listeners``) only together with the state change it was appended with;
* a reader that tails ``events_after(s)`` never skips an event, whatever the commit order of
  concurrent writers: an event that becomes visible later never has a lower sequence than one a
  reader was already given (SQLite: one writer at a time, sequences assigned under its lock;
  PostgreSQL, with concurrent writers: sequences assigned under a row lock held until the commit,
  so in commit order);
* ``listeners`` are called after each commit of this process with its events, in sequence order;
  they must not block (the fan-out buffers, or wakes a tailer).
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Callable, Sequence, Set
from typing import Any, Protocol

from broker.domain import approval, model, policy

Listener = Callable[[list[model.DriftEvent]], None]
# Cost-alert subjects that went over, and those back below (``CostAlerts``).
Crossings = tuple[Set[str], Set[str]]


class Deployments(Protocol):
    """Desired states and their lifecycle."""

    async def provision(self, command: model.ProvisionCommand) -> model.MutationResult:
        """Create or update a desired state (idempotent on request id and on an unchanged spec)."""
        ...

    async def deprovision(self, command: model.DeprovisionCommand) -> model.MutationResult:
        """Mark a deployment for deletion."""
        ...

    async def accept(self, deployment: model.Deployment, spec: model.ResourceSpec, message: str) -> bool:
        """Record observed values as desired, nothing to apply; False when the deployment moved on."""
        ...

    async def get_deployment(
        self, namespace: model.Namespace, deployment_id: model.DeploymentId
    ) -> model.Deployment:
        """One deployment of a namespace; NotFound otherwise."""
        ...

    async def deployment_by_id(self, deployment_id: str) -> model.Deployment | None:
        """A deployment by id alone (for the workers)."""
        ...

    async def list_deployments(
        self, query: model.ResourceQuery, page: model.PageRequest
    ) -> model.Listing[model.Deployment]:
        """Live deployments of a namespace matching a query, one page by (type, name) position."""
        ...

    def deployments_version(self) -> int | None:
        """A number that changes after every commit that can change what ``list_deployments`` answers.

        Read it before a listing: while it is unchanged, so is the listing, and a reader may answer
        from what it kept. ``None`` when other processes write too, so that only the store itself
        can tell (every listing must then be read).
        """
        ...

    async def live_deployments(
        self, phases: tuple[model.Phase, ...], namespaces: list[str] | None = None
    ) -> list[model.Deployment]:
        """Deployments in the given phases (of some namespaces, or all)."""
        ...


class Operations(Protocol):
    """The work a provisioning worker carries out.

    ``changed`` are called with a deployment's id when any replica's commit gave it new work (a
    Provision or Deprovision that changed something, accepted drift), so that the leader's workers
    start at once wherever the request landed; on SQLite, one replica, the service tells its own.
    """

    changed: list[Callable[[str], None]]

    async def unfinished(self) -> list[model.Deployment]:
        """Deployments whose last operation is accepted or in progress."""
        ...

    async def deployment_by_id(self, deployment_id: str) -> model.Deployment | None:
        """A deployment by id alone."""
        ...

    async def start_operation(self, deployment: model.Deployment) -> model.Deployment | None:
        """Mark the last operation in progress; None when a newer one superseded it."""
        ...

    async def note_progress(self, deployment: model.Deployment, message: str) -> None:
        """Say why an operation in progress is waiting."""
        ...

    async def finish_operation(
        self,
        deployment: model.Deployment,
        *,
        succeeded: bool,
        message: str,
        event: model.DriftEvent | None,
        callback: tuple[str, dict[str, Any]] | None,
    ) -> bool:
        """Finish the last operation with its event and callback, atomically."""
        ...


class EventLog(Protocol):
    """The drift event log (see the module docstring for its visibility contract)."""

    listeners: list[Listener]
    wakers: list[Callable[[], None]]

    async def append_events(self, events: list[model.DriftEvent]) -> None:
        """Append events that describe no stored state."""
        ...

    async def event_bounds(self) -> tuple[int, int]:
        """The oldest and newest retained sequences (0 when empty)."""
        ...

    async def events_after(self, sequence: int, limit: int) -> list[model.DriftEvent]:
        """Up to ``limit`` events after ``sequence``, in order."""
        ...

    async def list_events(
        self, query: model.EventQuery, page: model.PageRequest
    ) -> model.Listing[model.DriftEvent]:
        """Events of a namespace matching a query, oldest first, one page by sequence position."""
        ...

    async def prune_events(self, *, keep: int) -> int:
        """Drop all but the newest ``keep`` events; how many were dropped."""
        ...


@dataclasses.dataclass(frozen=True, slots=True)
class Verdict:
    """One evaluation to record: what the detector now reports of a deployment, and what follows.

    ``phase`` is the phase the verdict implies; ``events`` are appended with that phase;
    ``crossings`` are the cost-alert subjects that went over and back below with this verdict
    (``CostAlerts``), written with the alerts among ``events``.
    """

    deployment: model.Deployment
    items: tuple[model.DriftItem, ...]
    health: model.Health
    phase: model.Phase
    events: Sequence[model.DriftEvent] = ()
    crossings: Crossings = (frozenset(), frozenset())


class Verdicts(Protocol):
    """What the detector last reported, with the phase it implies."""

    async def record_evaluations(self, verdicts: Sequence[Verdict]) -> list[bool]:
        """Store verdicts, their phases and their events in one transaction (one commit for a batch).

        Returns, for each verdict in order, whether it was written: False when its deployment moved
        on since it was evaluated (another operation, or deleted), and then nothing of it is.
        """
        ...

    async def drift_states(self) -> dict[str, tuple[tuple[model.DriftItem, ...], model.Health]]:
        """The last recorded verdict of every deployment."""
        ...


@dataclasses.dataclass(frozen=True)
class Delivery:
    """One callback of the outbox: where it goes, its body, and how often it was tried so far."""

    delivery_id: str
    url: str
    payload: str
    attempts: int


class Outbox(Protocol):
    """Callbacks to deliver, at least once."""

    async def due_callbacks(self, limit: int = 50) -> list[Delivery]:
        """Deliveries due now, the longest due first."""
        ...

    async def callback_attempted(
        self, delivery_id: str, *, delivered: bool, error: str = "", retry_at: datetime.datetime | None = None
    ) -> None:
        """Record an attempt: delivered, or failed and due again at ``retry_at``."""
        ...


class Retention(Protocol):
    """What only needs keeping for a while: idempotency keys and delivered callbacks."""

    async def prune_history(
        self, *, keys_before: datetime.datetime, deliveries_before: datetime.datetime
    ) -> tuple[int, int]:
        """Forget idempotency keys made, and callbacks delivered, before these times; how many of each.

        A request retried with a forgotten request_id is a new request (AIP-155 allows a bounded
        retention); an undelivered callback is never dropped.
        """
        ...


class Policies(Protocol):
    """Remediation policies set through the API.

    ``policy_listeners`` are called when any replica's commit set a policy (PostgreSQL), so that
    every replica reads them again; on SQLite, one replica, the service puts its own in effect.
    """

    policy_listeners: list[Callable[[], None]]

    async def set_policy(self, rule: policy.Rule) -> None:
        """Store a rule (replacing the one for its namespace and type)."""
        ...

    async def policies(self) -> list[policy.Rule]:
        """Every stored rule."""
        ...


class Budgets(Protocol):
    """Monthly cost budgets set through the API, per namespace."""

    async def set_budget(self, namespace: str, monthly: float | None) -> None:
        """Store a namespace's budget (replacing its earlier one); None removes it."""
        ...

    async def budgets(self) -> dict[str, float]:
        """Every stored budget, by namespace."""
        ...


class CostAlerts(Protocol):
    """Which subjects (resources, namespaces) are over their cost threshold or budget now.

    Kept so that a restart or a new leader does not alert again for a crossing already told
    (``broker.domain.costs``: once per crossing).
    """

    async def cost_alerts(self) -> set[str]:
        """The subjects currently over."""
        ...

    async def record_cost_alerts(
        self, *, raised: Set[str], cleared: Set[str], events: list[model.DriftEvent]
    ) -> None:
        """Remember subjects that went over, forget those back below, and append the alerts, atomically."""
        ...


class Remediations(Protocol):
    """Pending remediations of policy mode approve (``broker.domain.approval``), with their events."""

    async def propose_remediation(
        self, remediation: approval.Remediation, *, event: model.DriftEvent
    ) -> None:
        """Store a new pending proposal and its event atomically.

        Any proposal of the same deployment still pending is superseded in the same transaction.
        """
        ...

    async def list_remediations(
        self,
        *,
        namespace: str | None,
        deployment_id: str | None = None,
        states: frozenset[approval.State] | None = None,
    ) -> list[approval.Remediation]:
        """Proposals of a namespace (or all), oldest first; ``states`` None means every state."""
        ...

    async def get_remediation(self, namespace: str, remediation_id: str) -> approval.Remediation:
        """One proposal of a namespace; NotFound otherwise."""
        ...

    async def decision_replay(
        self, namespace: str, request_id: str, decision: approval.Decision, remediation_id: str
    ) -> approval.Remediation | None:
        """The proposal a request_id already decided this way, None for a new request_id.

        AlreadyExists when the request_id was used for another request.
        """
        ...

    async def decide_remediation(
        self,
        remediation: approval.Remediation,
        *,
        decision: approval.Decision,
        by: str,
        reason: str,
        request_id: str,
        event: model.DriftEvent,
    ) -> approval.Remediation:
        """Approve or reject a pending proposal, with its event and request_id, atomically.

        FailedPrecondition when it is no longer pending (decided, expired or superseded meanwhile).
        """
        ...

    async def prune_remediations(self, *, decided_before: datetime.datetime) -> int:
        """Forget proposals decided (rejected, expired, superseded, applied) before this time.

        Pending and approved ones are kept whatever their age; the event log keeps the history.
        """
        ...

    async def close_remediation(
        self,
        remediation_id: str,
        *,
        from_states: frozenset[approval.State],
        to: approval.State,
        reason: str,
        event: model.DriftEvent | None = None,
    ) -> bool:
        """Move a proposal on from one of ``from_states`` (expired, superseded, applied), with an
        optional event; False when it was in none of them."""
        ...


class Store(
    Deployments,
    Operations,
    EventLog,
    Verdicts,
    Outbox,
    Retention,
    Policies,
    Budgets,
    CostAlerts,
    Remediations,
    Protocol,
):
    """Every concern, and the adapter's lifecycle."""

    async def ping(self) -> None:
        """Raise Unavailable unless the store answers."""
        ...

    async def schema_version(self) -> int:
        """The newest applied migration."""
        ...

    async def count_deployments(self) -> int:
        """How many deployments exist, deleted ones included (for tests and metrics)."""
        ...

    async def close(self) -> None:
        """Release the store's resources."""
        ...


class DetectorStore(Deployments, EventLog, Verdicts, CostAlerts, Remediations, Protocol):
    """What the detector and the remediator use."""


class ProvisionerStore(Operations, Protocol):
    """What the provisioning worker uses."""

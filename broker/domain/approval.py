"""Approval before remediation: the pending remediations of policy mode ``approve``.

Where a policy says ``approve``, drift the default table would re-apply automatically becomes a
*proposal* instead: it names exactly what re-applying would change (field, from, to, who made the
running value, the monthly cost delta) and waits for a person. Its life:

- ``pending`` when the detector proposes it (a RemediationPendingApproval event);
- ``approved`` by a principal holding the namespace's approve grant, then ``applied`` once the
  leader handed it to the remediator (whose events tell the outcome);
- ``rejected`` by such a principal: the drift stays, reported as it is;
- ``expired`` when nobody decided within the approval TTL;
- ``superseded`` when the drift changed or went away before a decision: the proposal no longer
  says what approving would do, so approving it is refused as stale, and a newer proposal (if
  the changed drift still needs approval) takes its place.

A proposal is stale when the drift it was made from is not what is observed now: compared by
``fingerprint`` (rule, field, desired and actual value of each item), and by the desired-spec
generation it would apply.

Pure code: no I/O.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import hashlib
import re
import secrets

from broker.domain import model


class State(enum.Enum):
    """How far a proposal has come (stored as the value)."""

    PENDING = "pending"
    APPROVED = "approved"
    REJECTED = "rejected"
    EXPIRED = "expired"
    SUPERSEDED = "superseded"
    APPLIED = "applied"


# States in which a proposal is still open: waiting for a person, or approved and not yet applied.
OPEN = frozenset({State.PENDING, State.APPROVED})


class Decision(enum.Enum):
    """What a person decides about a pending proposal."""

    APPROVE = "approve"
    REJECT = "reject"

    @property
    def state(self) -> State:
        """The state a proposal takes on this decision."""
        return State.APPROVED if self is Decision.APPROVE else State.REJECTED

    @property
    def event_kind(self) -> model.EventKind:
        """The event that records this decision."""
        return (
            model.EventKind.REMEDIATION_APPROVED
            if self is Decision.APPROVE
            else model.EventKind.REMEDIATION_REJECTED
        )


@dataclasses.dataclass(frozen=True)
class Change:
    """One field a remediation would set back: from the running value to the desired one.

    ``monthly_cost_delta`` is what the remediation changes the monthly cost by (desired minus
    running, so undoing a costly scale-up is negative), None when it cannot be estimated.
    """

    rule_id: str
    field: str
    from_value: str
    to_value: str
    changed_by: str
    monthly_cost_delta: float | None
    message: str


@dataclasses.dataclass(frozen=True)
class Remediation:
    """A proposed remediation of one deployment, and what became of it."""

    remediation_id: str
    deployment_id: model.DeploymentId
    namespace: model.Namespace
    resource_type: model.ResourceType
    resource_name: model.ResourceName
    generation: int
    operation_id: str
    items: tuple[model.DriftItem, ...]
    state: State
    create_time: datetime.datetime
    expire_time: datetime.datetime
    decided_by: str = ""
    decide_time: datetime.datetime | None = None
    reason: str = ""

    @property
    def fingerprint(self) -> str:
        """What the proposal was made from; equal for the same drift of the same generation."""
        return fingerprint(self.items, self.generation)

    @property
    def changes(self) -> tuple[Change, ...]:
        """What approving would change, field by field."""
        return tuple(
            Change(
                rule_id=i.rule_id,
                field=i.field,
                from_value=i.actual,
                to_value=i.desired,
                changed_by=i.changed_by,
                monthly_cost_delta=-i.monthly_cost_delta if i.monthly_cost_delta is not None else None,
                message=i.message,
            )
            for i in self.items
        )

    @property
    def monthly_cost_delta(self) -> float | None:
        """The summed cost change of the changes that can be estimated; None when none can."""
        deltas = [c.monthly_cost_delta for c in self.changes if c.monthly_cost_delta is not None]
        return sum(deltas) if deltas else None

    def summary(self) -> str:
        """The changes as one human line: ``replicas 3 -> 1 (changed by kubectl-scale)``."""
        parts = []
        for c in self.changes:
            by = f", changed by {c.changed_by}" if c.changed_by else ""
            cost = f", {c.monthly_cost_delta:+.2f}/month" if c.monthly_cost_delta is not None else ""
            parts.append(f"{c.field} {c.from_value or '(missing)'} -> {c.to_value}{by}{cost}")
        return "; ".join(parts)


def fingerprint(items: tuple[model.DriftItem, ...], generation: int) -> str:
    """A stable digest of drift items (rule, field, desired, actual) and a generation."""
    keys = sorted((i.rule_id, i.field, i.desired, i.actual) for i in items)
    text = repr((generation, keys))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


_ID = re.compile(r"^rem-[0-9a-f]{16}$")


def is_id(value: str) -> bool:
    """Whether ``value`` is spelled like a remediation id."""
    return bool(_ID.match(value))


def new_id() -> str:
    """A fresh remediation id: ``rem-`` and 16 lower-case hex digits."""
    return "rem-" + secrets.token_hex(8)


def propose(
    deployment: model.Deployment,
    items: tuple[model.DriftItem, ...],
    *,
    now: datetime.datetime,
    ttl: datetime.timedelta,
) -> Remediation:
    """A new pending proposal to undo ``items`` on ``deployment``, lapsing after ``ttl``."""
    return Remediation(
        remediation_id=new_id(),
        deployment_id=deployment.deployment_id,
        namespace=deployment.namespace,
        resource_type=deployment.resource_type,
        resource_name=deployment.resource_name,
        generation=deployment.generation,
        operation_id=deployment.last_operation.operation_id,
        items=tuple(dataclasses.replace(i, detect_time=None) for i in items),
        state=State.PENDING,
        create_time=now,
        expire_time=now + ttl,
    )


def staleness(
    remediation: Remediation, deployment: model.Deployment, current: tuple[model.DriftItem, ...]
) -> str:
    """Why ``remediation`` no longer says what approving would do, or "" when it still does.

    ``current`` are the drift items of the proposal's rules and fields now observed on ``deployment``.
    """
    if deployment.generation != remediation.generation:
        return (
            f"the desired state changed since it was proposed (generation {remediation.generation} "
            f"-> {deployment.generation})"
        )
    if not current:
        return "the drift it would undo is gone"
    if fingerprint(current, deployment.generation) != remediation.fingerprint:
        now = "; ".join(f"{i.field} {i.actual or '(missing)'} (desired {i.desired})" for i in current)
        return f"the drift changed since it was proposed (now: {now})"
    return ""


def event(
    remediation: Remediation, kind: model.EventKind, message: str, *, phase: model.Phase
) -> model.DriftEvent:
    """An event about a proposal's deployment; the store assigns its sequence and time."""
    return model.DriftEvent(
        sequence=0,
        kind=kind,
        deployment_id=remediation.deployment_id,
        namespace=remediation.namespace,
        resource_type=remediation.resource_type,
        resource_name=remediation.resource_name,
        event_time=datetime.datetime.now(datetime.UTC),
        message=message,
        phase=phase,
        health=None,
        generation=remediation.generation,
        items=remediation.items,
    )

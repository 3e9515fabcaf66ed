"""The lifecycle of a deployment: which phase follows which step, and what a request changes.

Every decision about phases, generations and operations is made here, once; the store adapters
only persist what these functions decide (no domain decision in SQL code), the detector asks
which phase a verdict implies, and reads ask which phase to show.

    Pending --start--> Provisioning --finish ok--> Ready <--verdict--> DriftDetected
                                    --finish failed--> Failed --same spec again--> Pending (retry)
    any live phase --deprovision--> Deleting --finish ok--> Deleted

Pure code: no I/O.
"""

from __future__ import annotations

import dataclasses
import enum

from broker import errors
from broker.domain import model

# The phases in which the detector judges a deployment (its objects are meant to exist as desired);
# verdicts and accepted drift apply only then: in any other phase a worker owns the deployment (or
# it is going away), and a writer that judged it has been overtaken.
EVALUATED: tuple[model.Phase, ...] = (model.Phase.READY, model.Phase.DRIFT_DETECTED)


class Change(enum.Enum):
    """What a Provision does to the deployment of the same namespace, type and name."""

    CREATE = "create"  # none exists: generation 1
    UNCHANGED = "unchanged"  # the same spec: nothing to do (a new callback URL is still kept)
    RETRY = "retry"  # the same spec of a failed deployment: try the same generation again
    UPDATE = "update"  # another spec: a new generation


@dataclasses.dataclass(frozen=True)
class ProvisionDecision:
    """A Provision's change and the generation it leads to."""

    change: Change
    generation: int

    @property
    def changed(self) -> bool:
        """Whether there is work for the provisioner (a new operation)."""
        return self.change is not Change.UNCHANGED


def on_provision(existing: model.Deployment | None, command: model.ProvisionCommand) -> ProvisionDecision:
    """Decide what a Provision does; FailedPrecondition when it cannot be done now or at all."""
    if existing is None:
        return ProvisionDecision(Change.CREATE, 1)
    if existing.phase is model.Phase.DELETING:
        raise errors.FailedPrecondition(
            f"{command.resource_type.value} {command.resource_name!r} in namespace {command.namespace!r} "
            f"is being deleted (deployment {existing.deployment_id}); provision it again once it is gone",
            reason="DEPLOYMENT_DELETING",
        )
    if existing.desired_spec.engine != command.spec.engine:
        raise errors.FailedPrecondition(
            f"{command.resource_type.value} {command.resource_name!r} runs "
            f"{existing.desired_spec.engine}; the engine of a deployment cannot change to "
            f"{command.spec.engine}: deprovision it and provision a new one",
            reason="ENGINE_IMMUTABLE",
        )
    if existing.desired_spec == command.spec:
        if existing.phase is model.Phase.FAILED:
            return ProvisionDecision(Change.RETRY, existing.generation)
        return ProvisionDecision(Change.UNCHANGED, existing.generation)
    return ProvisionDecision(Change.UPDATE, existing.generation + 1)


def on_deprovision(existing: model.Deployment) -> bool:
    """Whether a Deprovision starts a deletion (False: one is under way or done; a no-op)."""
    return existing.phase not in (model.Phase.DELETING, model.Phase.DELETED)


def phase_when_started(op_type: model.OperationType) -> model.Phase | None:
    """The phase while an operation runs; None: it stays (a deletion stays Deleting)."""
    return None if op_type is model.OperationType.DEPROVISION else model.Phase.PROVISIONING


def phase_when_finished(op_type: model.OperationType, *, succeeded: bool) -> model.Phase:
    """The phase an operation leaves behind."""
    if op_type is model.OperationType.DEPROVISION:
        return model.Phase.DELETED if succeeded else model.Phase.DELETING
    return model.Phase.READY if succeeded else model.Phase.FAILED


def phase_of_verdict(items: tuple[model.DriftItem, ...]) -> model.Phase:
    """The phase a verdict implies for a deployment the detector judges: open unexpected drift or not."""
    unexpected = any(i.drift_class is model.DriftClass.UNEXPECTED for i in items)
    return model.Phase.DRIFT_DETECTED if unexpected else model.Phase.READY


def shown_phase(stored: model.Phase, items: tuple[model.DriftItem, ...] | None) -> model.Phase:
    """The phase a read shows: of a running deployment, the one its current verdict implies.

    ``items`` are those of a verdict on a readable cluster (None: none, or the cluster cannot be
    read, and the stored phase stands). Ready with unexpected drift open is DriftDetected, and
    DriftDetected whose drift is gone is Ready: a replica that does not lead evaluates its own
    caches and may see a change before the leader has recorded its phase.
    """
    if stored in (model.Phase.READY, model.Phase.DRIFT_DETECTED) and items is not None:
        return phase_of_verdict(items)
    return stored

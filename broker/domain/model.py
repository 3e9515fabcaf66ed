"""The broker's vocabulary: resources, specs, deployments and operations as plain dataclasses.

Nothing here knows about protobuf, SQLite or Kubernetes; transports and adapters convert at their
edge. Enum values are the spellings of the original /v1 design (``"database"``, ``"Ready"``,
``"Healthy"``), which is also how they are stored.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
from typing import Generic, NewType, TypeVar

Namespace = NewType("Namespace", str)
ResourceName = NewType("ResourceName", str)
DeploymentId = NewType("DeploymentId", str)
OperationId = NewType("OperationId", str)

T = TypeVar("T")


class ResourceType(enum.Enum):
    """The kinds of resource a manager can ask for."""

    DATABASE = "database"
    CACHE = "cache"
    TOPIC = "topic"


class Phase(enum.Enum):
    """A deployment's lifecycle phase (the proto's ``State``)."""

    PENDING = "Pending"
    PROVISIONING = "Provisioning"
    READY = "Ready"
    DRIFT_DETECTED = "DriftDetected"
    FAILED = "Failed"
    DELETING = "Deleting"
    DELETED = "Deleted"


class Health(enum.Enum):
    """Whether a workload is serving; ``UNKNOWN`` when the cluster cannot be read."""

    HEALTHY = "Healthy"
    DEGRADED = "Degraded"
    UNHEALTHY = "Unhealthy"
    UNKNOWN = "Unknown"


class DataPolicy(enum.Enum):
    """What deprovisioning does with a resource's volumes."""

    KEEP = "keep"
    DELETE = "delete"


class OperationType(enum.Enum):
    """The kind of change an operation carries out."""

    PROVISION = "provision"
    UPDATE = "update"
    DEPROVISION = "deprovision"


class OperationState(enum.Enum):
    """How far an operation has come."""

    ACCEPTED = "accepted"
    IN_PROGRESS = "in_progress"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


@dataclasses.dataclass(frozen=True, slots=True)
class TopicSpec:
    """Topic-specific fields: partition count and retention in milliseconds (0: cluster default)."""

    partitions: int
    retention_ms: int


@dataclasses.dataclass(frozen=True, slots=True)
class ComputeResources:
    """Per-replica cpu, memory and storage in Kubernetes quantity notation ("500m", "1Gi")."""

    cpu_request: str
    cpu_limit: str
    memory_request: str
    memory_limit: str
    storage: str


@dataclasses.dataclass(frozen=True, slots=True)
class ResourceSpec:
    """A resource as asked for (desired) or as observed (actual).

    ``replicas`` is None only in requests that leave it to the default; stored desired specs are
    normalized and always carry it. ``resources`` is filled from the size tier on desired specs and
    from the workload on observed ones.
    """

    engine: str
    version: str
    size: str
    replicas: int | None = None
    topic: TopicSpec | None = None
    resources: ComputeResources | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Operation:
    """One asynchronous change of a deployment (the Open Service Broker's ``last_operation``)."""

    operation_id: OperationId
    type: OperationType
    state: OperationState
    generation: int
    message: str
    create_time: datetime.datetime
    update_time: datetime.datetime


@dataclasses.dataclass(frozen=True, slots=True)
class Deployment:
    """The broker's record of one resource: what was asked for and how far it got."""

    deployment_id: DeploymentId
    namespace: Namespace
    resource_type: ResourceType
    resource_name: ResourceName
    desired_spec: ResourceSpec
    generation: int
    phase: Phase
    callback_url: str
    last_operation: Operation
    create_time: datetime.datetime
    update_time: datetime.datetime
    data_policy: DataPolicy = DataPolicy.KEEP


@dataclasses.dataclass(frozen=True, slots=True)
class ProvisionCommand:
    """A validated request to create or update a resource."""

    namespace: Namespace
    resource_type: ResourceType
    resource_name: ResourceName
    spec: ResourceSpec
    callback_url: str
    request_id: str


@dataclasses.dataclass(frozen=True, slots=True)
class MutationResult:
    """The immediate answer to a provision or deprovision request.

    It is what the caller was told, so an idempotent replay (same request_id) returns exactly this,
    even if the deployment has moved on since. ``changed`` is False for a no-op repeat.
    """

    deployment_id: DeploymentId
    phase: Phase
    generation: int
    operation: Operation
    changed: bool


@dataclasses.dataclass(frozen=True, slots=True)
class DeprovisionCommand:
    """A validated request to delete a resource."""

    namespace: Namespace
    deployment_id: DeploymentId
    data_policy: DataPolicy
    request_id: str


@dataclasses.dataclass(frozen=True, slots=True)
class ResourceQuery:
    """Filters for reading resource states; ``None`` matches everything."""

    namespace: Namespace
    resource_type: ResourceType | None = None
    resource_name: ResourceName | None = None
    deployment_id: DeploymentId | None = None


# Where a listing stands: the text of its order columns at the last item read ((type, name) of a
# deployment; ("seq", sequence) of an event). The store makes and takes them; only the service
# turns them into page tokens (``broker.paging``).
Position = tuple[str, str]


@dataclasses.dataclass(frozen=True, slots=True)
class PageRequest:
    """A page size and the position the page starts after (``None`` for the first page)."""

    size: int
    after: Position | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Listing(Generic[T]):
    """One page as the store reads it: items, the total across pages, and the position to continue
    after (``None`` at the end)."""

    items: tuple[T, ...]
    total: int
    next_after: Position | None


@dataclasses.dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    """One page of results, the total across pages, and the token of the next page ("" at the end)."""

    items: tuple[T, ...]
    total: int
    next_token: str


class DriftClass(enum.Enum):
    """Whether a difference between desired and actual state is to be expected."""

    EXPECTED = "Expected"
    UNEXPECTED = "Unexpected"


class Severity(enum.Enum):
    """How urgently a drift item needs attention."""

    INFO = "Info"
    WARNING = "Warning"
    CRITICAL = "Critical"


class Action(enum.Enum):
    """What the policy says should happen about a drift item."""

    NONE = "None"
    AUTO_REMEDIATE = "AutoRemediate"
    ALERT_ONLY = "AlertOnly"
    # Policy mode approve: re-applied once a person approves the pending remediation.
    APPROVAL_REQUIRED = "ApprovalRequired"


class EventKind(enum.Enum):
    """The kinds of change recorded in the drift event log."""

    DRIFT_DETECTED = "DriftDetected"
    DRIFT_CHANGED = "DriftChanged"
    DRIFT_RESOLVED = "DriftResolved"
    HEALTH_CHANGED = "HealthChanged"
    RESOURCE_MISSING = "ResourceMissing"
    REMEDIATION_STARTED = "RemediationStarted"
    REMEDIATION_SUCCEEDED = "RemediationSucceeded"
    REMEDIATION_FAILED = "RemediationFailed"
    PROVISIONING_SUCCEEDED = "ProvisioningSucceeded"
    PROVISIONING_FAILED = "ProvisioningFailed"
    DEPROVISIONED = "Deprovisioned"
    EXPECTED_DRIFT = "ExpectedDrift"
    REMEDIATION_PENDING_APPROVAL = "RemediationPendingApproval"
    REMEDIATION_APPROVED = "RemediationApproved"
    REMEDIATION_REJECTED = "RemediationRejected"
    REMEDIATION_EXPIRED = "RemediationExpired"
    REMEDIATION_DEFERRED = "RemediationDeferred"
    COST_ALERT = "CostAlert"


@dataclasses.dataclass(frozen=True, slots=True)
class DriftItem:
    """One classified difference between desired and actual state."""

    rule_id: str
    field: str
    desired: str
    actual: str
    drift_class: DriftClass
    severity: Severity
    action: Action
    message: str
    changed_by: str = ""
    monthly_cost_delta: float | None = None
    detect_time: datetime.datetime | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class DriftEvent:
    """One entry of the event log; ``sequence`` is strictly increasing and never reused."""

    sequence: int
    kind: EventKind
    deployment_id: DeploymentId
    namespace: Namespace
    resource_type: ResourceType
    resource_name: ResourceName
    event_time: datetime.datetime
    message: str
    phase: Phase
    health: Health | None
    generation: int
    items: tuple[DriftItem, ...] = ()

    @classmethod
    def about(
        cls,
        deployment: Deployment,
        kind: EventKind,
        message: str,
        *,
        health: Health | None,
        items: tuple[DriftItem, ...] = (),
    ) -> DriftEvent:
        """A new event about ``deployment``; the store assigns its sequence and time."""
        return cls(
            sequence=0,
            kind=kind,
            deployment_id=deployment.deployment_id,
            namespace=deployment.namespace,
            resource_type=deployment.resource_type,
            resource_name=deployment.resource_name,
            event_time=datetime.datetime.now(datetime.UTC),
            message=message,
            phase=deployment.phase,
            health=health,
            generation=deployment.generation,
            items=items,
        )


@dataclasses.dataclass(frozen=True, slots=True)
class EventQuery:
    """Filters for reading the event log of one namespace."""

    namespace: Namespace
    deployment_id: DeploymentId | None = None
    kinds: frozenset[EventKind] = frozenset()
    resource_type: ResourceType | None = None
    resource_name: ResourceName | None = None
    after_sequence: int = 0

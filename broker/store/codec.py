"""What every store adapter writes and reads the same way: encodings, ids, positions, guards.

The SQLite and the PostgreSQL adapters keep the same rows in their own SQL dialects; how a spec,
an operation, a drift item, an event's payload or an idempotent answer becomes text, and where an
event listing continues, is decided once, here, so the two cannot drift apart. Page tokens are not
the store's: the service makes them of the positions listings return (``broker.paging``). What a
request does to a deployment (phases, generations, which phases a verdict may change) is the
lifecycle's decision (``broker.domain.lifecycle``); the SQL of an adapter takes those decisions,
and the unfinished operation states below, as parameters and decides nothing of its own.

A row is anything indexable by column name (``sqlite3.Row``, ``asyncpg.Record``); a time column is
ISO text on SQLite and a ``datetime`` on PostgreSQL, and ``as_time`` reads both.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import secrets
from typing import Any, Protocol

from broker import errors
from broker.domain import approval, model, policy, windows


class Row(Protocol):
    """A result row, by column name."""

    def __getitem__(self, key: str, /) -> Any: ...


# An operation in one of these states is work to do (or to resume after a restart).
UNFINISHED_STATES: tuple[model.OperationState, ...] = (
    model.OperationState.ACCEPTED,
    model.OperationState.IN_PROGRESS,
)


def now() -> datetime.datetime:
    """The current time, in UTC."""
    return datetime.datetime.now(datetime.UTC)


def ts(value: datetime.datetime) -> str:
    """A time as ISO text with microseconds (sortable as text when all are UTC)."""
    return value.isoformat(timespec="microseconds")


def as_time(value: str | datetime.datetime) -> datetime.datetime:
    """A time column's value: ISO text (SQLite) or a ``datetime`` already (PostgreSQL)."""
    return value if isinstance(value, datetime.datetime) else datetime.datetime.fromisoformat(value)


def spec_to_json(spec: model.ResourceSpec) -> str:
    """Canonical JSON of a spec: equal specs give equal text, so comparison is a string compare."""
    return json.dumps(dataclasses.asdict(spec), sort_keys=True, separators=(",", ":"))


def spec_from_json(text: str) -> model.ResourceSpec:
    """The inverse of ``spec_to_json``."""
    raw = json.loads(text)
    topic = raw.get("topic")
    resources = raw.get("resources")
    return model.ResourceSpec(
        engine=raw["engine"],
        version=raw["version"],
        size=raw["size"],
        replicas=raw.get("replicas"),
        topic=model.TopicSpec(**topic) if topic else None,
        resources=model.ComputeResources(**resources) if resources else None,
    )


def operation_to_dict(op: model.Operation) -> dict[str, Any]:
    """An operation as JSON-ready values (inside a remembered answer)."""
    return {
        "operation_id": op.operation_id,
        "type": op.type.value,
        "state": op.state.value,
        "generation": op.generation,
        "message": op.message,
        "create_time": ts(op.create_time),
        "update_time": ts(op.update_time),
    }


def operation_from_row(row: Row | dict[str, Any]) -> model.Operation:
    """An operation from a row (or from ``operation_to_dict``'s output)."""
    return model.Operation(
        operation_id=model.OperationId(row["operation_id"]),
        type=model.OperationType(row["type"]),
        state=model.OperationState(row["state"]),
        generation=row["generation"],
        message=row["message"],
        create_time=as_time(row["create_time"]),
        update_time=as_time(row["update_time"]),
    )


def result_to_json(result: model.MutationResult) -> str:
    """The answer to an idempotent request, as remembered under its request id."""
    return json.dumps(
        {
            "deployment_id": result.deployment_id,
            "phase": result.phase.value,
            "generation": result.generation,
            "operation": operation_to_dict(result.operation),
        },
        sort_keys=True,
    )


def result_from_json(text: str) -> model.MutationResult:
    """A remembered answer, given again (``changed`` is False: the repeat changed nothing)."""
    raw = json.loads(text)
    return model.MutationResult(
        deployment_id=model.DeploymentId(raw["deployment_id"]),
        phase=model.Phase(raw["phase"]),
        generation=raw["generation"],
        operation=operation_from_row(raw["operation"]),
        changed=False,
    )


def request_hash(method: str, payload: dict[str, Any]) -> str:
    """A digest of a request, so a request id reused for another request is recognised."""
    return hashlib.sha256(json.dumps([method, payload], sort_keys=True).encode()).hexdigest()


def provision_hash(command: model.ProvisionCommand) -> str:
    """The digest of a Provision request."""
    return request_hash(
        "provision",
        {
            "namespace": command.namespace,
            "resource_type": command.resource_type.value,
            "resource_name": command.resource_name,
            "spec": spec_to_json(command.spec),
            "callback_url": command.callback_url,
        },
    )


def deprovision_hash(command: model.DeprovisionCommand) -> str:
    """The digest of a Deprovision request."""
    return request_hash(
        "deprovision", {"deployment_id": command.deployment_id, "data_policy": command.data_policy.value}
    )


def reused_request_id(namespace: str, request_id: str) -> errors.AlreadyExists:
    """The error for a request id used before for a different request."""
    return errors.AlreadyExists(
        f"request_id {request_id!r} was already used for a different request in namespace "
        f"{namespace!r}; use a new request_id for a new request",
        reason="REQUEST_ID_REUSED",
    )


def new_deployment_id() -> model.DeploymentId:
    """A fresh deployment id: ``deploy-`` and 12 random hex digits."""
    return model.DeploymentId("deploy-" + secrets.token_hex(6))


def new_operation_id() -> model.OperationId:
    """A fresh operation id."""
    return model.OperationId("op-" + secrets.token_hex(8))


def new_delivery_id() -> str:
    """A fresh callback delivery id."""
    return "dlv-" + secrets.token_hex(8)


def new_operation(
    *,
    op_type: model.OperationType,
    generation: int,
    now: datetime.datetime,
    operation_id: model.OperationId | None = None,
) -> model.Operation:
    """An operation just accepted, waiting for a worker."""
    return model.Operation(
        operation_id=operation_id or new_operation_id(),
        type=op_type,
        state=model.OperationState.ACCEPTED,
        generation=generation,
        message="accepted; waiting for a worker",
        create_time=now,
        update_time=now,
    )


def unchanged(deployment: model.Deployment) -> model.MutationResult:
    """The answer to a mutation that changed nothing."""
    return model.MutationResult(
        deployment_id=deployment.deployment_id,
        phase=deployment.phase,
        generation=deployment.generation,
        operation=deployment.last_operation,
        changed=False,
    )


# The columns ``deployment_from_row`` reads: a deployment joined with its last operation.
DEPLOYMENT_COLUMNS = """
    d.deployment_id, d.namespace, d.resource_type, d.resource_name, d.desired_spec, d.generation,
    d.phase, d.callback_url, d.data_policy, d.create_time AS d_create_time,
    d.update_time AS d_update_time, o.operation_id, o.type, o.state, o.generation AS o_generation,
    o.message, o.create_time, o.update_time
"""


def deployment_from_row(row: Row) -> model.Deployment:
    """A deployment from a row of ``DEPLOYMENT_COLUMNS``."""
    op = operation_from_row(
        {
            "operation_id": row["operation_id"],
            "type": row["type"],
            "state": row["state"],
            "generation": row["o_generation"],
            "message": row["message"],
            "create_time": row["create_time"],
            "update_time": row["update_time"],
        }
    )
    return model.Deployment(
        deployment_id=model.DeploymentId(row["deployment_id"]),
        namespace=model.Namespace(row["namespace"]),
        resource_type=model.ResourceType(row["resource_type"]),
        resource_name=model.ResourceName(row["resource_name"]),
        desired_spec=spec_from_json(row["desired_spec"]),
        generation=row["generation"],
        phase=model.Phase(row["phase"]),
        callback_url=row["callback_url"],
        data_policy=model.DataPolicy(row["data_policy"]),
        last_operation=op,
        create_time=as_time(row["d_create_time"]),
        update_time=as_time(row["d_update_time"]),
    )


def item_to_dict(item: model.DriftItem) -> dict[str, Any]:
    """A drift item as JSON-ready values (every field is a plain value: no deep copy needed)."""
    return {
        "rule_id": item.rule_id,
        "field": item.field,
        "desired": item.desired,
        "actual": item.actual,
        "drift_class": item.drift_class.value,
        "severity": item.severity.value,
        "action": item.action.value,
        "message": item.message,
        "changed_by": item.changed_by,
        "monthly_cost_delta": item.monthly_cost_delta,
        "detect_time": ts(item.detect_time) if item.detect_time else None,
    }


def item_from_dict(raw: dict[str, Any]) -> model.DriftItem:
    """The inverse of ``item_to_dict``."""
    detect = raw.get("detect_time")
    return model.DriftItem(
        rule_id=raw["rule_id"],
        field=raw["field"],
        desired=raw["desired"],
        actual=raw["actual"],
        drift_class=model.DriftClass(raw["drift_class"]),
        severity=model.Severity(raw["severity"]),
        action=model.Action(raw["action"]),
        message=raw["message"],
        changed_by=raw.get("changed_by", ""),
        monthly_cost_delta=raw.get("monthly_cost_delta"),
        detect_time=as_time(detect) if detect else None,
    )


def items_to_json(items: tuple[model.DriftItem, ...]) -> str:
    """A verdict's items as JSON."""
    return json.dumps([item_to_dict(i) for i in items])


def items_from_json(text: str) -> tuple[model.DriftItem, ...]:
    """The inverse of ``items_to_json``."""
    return tuple(item_from_dict(i) for i in json.loads(text))


def event_payload(event: model.DriftEvent) -> str:
    """What an event says beyond its columns, as JSON."""
    return json.dumps(
        {
            "message": event.message,
            "phase": event.phase.value,
            "health": event.health.value if event.health else None,
            "generation": event.generation,
            "items": [item_to_dict(i) for i in event.items],
        }
    )


# The columns ``event_from_row`` reads.
EVENT_COLUMNS = "sequence, deployment_id, namespace, resource_type, resource_name, kind, payload, event_time"


def event_from_row(row: Row) -> model.DriftEvent:
    """An event from a row of ``EVENT_COLUMNS``."""
    payload = json.loads(row["payload"])
    health = payload.get("health")
    return model.DriftEvent(
        sequence=row["sequence"],
        kind=model.EventKind(row["kind"]),
        deployment_id=model.DeploymentId(row["deployment_id"]),
        namespace=model.Namespace(row["namespace"]),
        resource_type=model.ResourceType(row["resource_type"]),
        resource_name=model.ResourceName(row["resource_name"]),
        event_time=as_time(row["event_time"]),
        message=payload["message"],
        phase=model.Phase(payload["phase"]),
        health=model.Health(health) if health else None,
        generation=payload["generation"],
        items=tuple(item_from_dict(i) for i in payload.get("items", ())),
    )


def position_of(item: model.Deployment | model.DriftEvent) -> model.Position:
    """Where a listing continues after ``item``: the text of the columns it is ordered by."""
    if isinstance(item, model.DriftEvent):
        return "seq", str(item.sequence)
    return item.resource_type.value, item.resource_name


# The largest sequence a column holds (SQLite INTEGER, PostgreSQL BIGINT).
_MAX_SEQUENCE = 2**63 - 1


def event_position(query: model.EventQuery, after: model.Position | None) -> int:
    """The sequence an event listing starts after: the query's, or further on by a position.

    A position comes back from a caller inside a page token (short printable ASCII, no more, see
    ``broker.paging``), so it may be made up: one that is not ``("seq", digits)`` starts nowhere
    further, one past the column's range at its end.
    """
    position = query.after_sequence
    if after is not None and after[1].isascii() and after[1].isdigit():
        position = max(position, min(int(after[1]), _MAX_SEQUENCE))
    return position


# Pending remediations ---------------------------------------------------------------------------

REMEDIATION_COLUMNS = (
    "remediation_id, deployment_id, namespace, state, payload, create_time, expire_time, "
    "decided_by, decide_time, reason"
)


def remediation_payload(remediation: approval.Remediation) -> str:
    """What a proposal says beyond its indexed columns: the resource, generation and drift items."""
    return json.dumps(
        {
            "resource_type": remediation.resource_type.value,
            "resource_name": remediation.resource_name,
            "generation": remediation.generation,
            "operation_id": remediation.operation_id,
            "items": [item_to_dict(i) for i in remediation.items],
        },
        sort_keys=True,
    )


def remediation_from_row(row: Row) -> approval.Remediation:
    """A proposal from its row."""
    raw = json.loads(row["payload"])
    return approval.Remediation(
        remediation_id=row["remediation_id"],
        deployment_id=model.DeploymentId(row["deployment_id"]),
        namespace=model.Namespace(row["namespace"]),
        resource_type=model.ResourceType(raw["resource_type"]),
        resource_name=model.ResourceName(raw["resource_name"]),
        generation=int(raw["generation"]),
        operation_id=raw["operation_id"],
        items=tuple(item_from_dict(i) for i in raw["items"]),
        state=approval.State(row["state"]),
        create_time=as_time(row["create_time"]),
        expire_time=as_time(row["expire_time"]),
        decided_by=row["decided_by"],
        decide_time=as_time(row["decide_time"]) if row["decide_time"] is not None else None,
        reason=row["reason"],
    )


def not_pending(remediation_id: str, state: str) -> errors.FailedPrecondition:
    """The error for deciding a proposal that is no longer pending."""
    return errors.FailedPrecondition(
        f"remediation {remediation_id} is {state}, not pending: only a pending remediation can be "
        "approved or rejected (list the pending ones with ListPendingRemediations)",
        reason="REMEDIATION_NOT_PENDING",
    )


def decision_hash(decision: approval.Decision, remediation_id: str) -> str:
    """The idempotency hash of a decision: the same request_id must decide the same way, once."""
    return request_hash(decision.value, {"remediation_id": remediation_id})


def decision_response(remediation_id: str) -> str:
    """What an idempotency key of a decision remembers: which proposal it decided."""
    return json.dumps({"remediation_id": remediation_id})


def decided_remediation_id(response: str) -> str:
    """The proposal an idempotency key of a decision names."""
    return str(json.loads(response)["remediation_id"])


POLICY_COLUMNS = "namespace, resource_type, mode, ignore_fields, maintenance_window, rule_modes"


def policy_values(rule: policy.Rule) -> tuple[str, str, str, str, str, str]:
    """A policy rule as the values of ``POLICY_COLUMNS``."""
    return (
        rule.namespace,
        rule.resource_type.value if rule.resource_type else "",
        rule.mode.value,
        json.dumps(sorted(rule.ignore_fields)),
        window_to_json(rule.window),
        json.dumps({r: m.value for r, m in rule.rule_modes}, sort_keys=True) if rule.rule_modes else "",
    )


def rule_from_row(row: Row) -> policy.Rule:
    """A policy rule from a row of ``POLICY_COLUMNS``."""
    modes = json.loads(row["rule_modes"]) if row["rule_modes"] else {}
    return policy.Rule(
        namespace=row["namespace"],
        resource_type=model.ResourceType(row["resource_type"]) if row["resource_type"] else None,
        mode=policy.Mode(row["mode"]),
        ignore_fields=frozenset(json.loads(row["ignore_fields"])),
        window=window_from_json(row["maintenance_window"]),
        rule_modes=tuple(sorted((r, policy.Mode(m)) for r, m in modes.items())),
    )


def window_to_json(window: windows.Window | None) -> str:
    """A policy's maintenance window as stored ("" for none)."""
    if window is None:
        return ""
    return json.dumps(
        {
            "cron": window.cron,
            "duration": windows.format_duration(window.duration),
            "time_zone": window.time_zone,
        },
        sort_keys=True,
    )


def window_from_json(text: str) -> windows.Window | None:
    """A stored maintenance window (None for "")."""
    if not text:
        return None
    raw = json.loads(text)
    return windows.parse(cron=raw["cron"], duration=raw["duration"], time_zone=raw["time_zone"])

"""Conversion between the generated broker.v1 messages and the domain dataclasses.

This is the boundary: protobuf types stop here. Enum pairs are derived from names (the proto value
is the enum's prefix plus the domain member's name) and checked at import, so adding a value on one
side only fails loudly instead of mapping to nothing.
"""

from __future__ import annotations

import datetime
import enum
from typing import Any, TypeVar

from broker_client.v1 import broker_pb2 as pb
from google.protobuf import timestamp_pb2

from broker import errors, service
from broker.domain import approval, costs, model, policy, windows

E = TypeVar("E", bound=enum.Enum)


class _EnumMap:
    """A checked bijection between a domain enum and a proto enum (UNSPECIFIED maps to None)."""

    def __init__(self, domain: type[enum.Enum], proto: Any, prefix: str) -> None:
        self.domain = domain
        self._proto = proto
        self._to_proto: dict[enum.Enum, int] = {}
        self._to_domain: dict[int, enum.Enum] = {}
        for member in domain:
            number = proto.Value(prefix + member.name)
            self._to_proto[member] = number
            self._to_domain[number] = member
        extra = set(proto.values()) - set(self._to_domain) - {0}
        if extra:
            raise RuntimeError(
                f"proto enum values without a domain member: {sorted(proto.Name(v) for v in extra)}"
            )

    def name_of(self, value: enum.Enum) -> str:
        """The proto name of a domain value (``RESOURCE_TYPE_CACHE``)."""
        return str(self._proto.Name(self._to_proto[value]))

    def to_proto(self, value: enum.Enum | None) -> Any:
        """The proto number (typed Any: each generated enum has its own ValueType)."""
        return 0 if value is None else self._to_proto[value]

    def to_domain(self, number: int, kind: type[E]) -> E | None:
        value = self._to_domain.get(number)
        return value if isinstance(value, kind) else None


RESOURCE_TYPES = _EnumMap(model.ResourceType, pb.ResourceType, "RESOURCE_TYPE_")
PHASES = _EnumMap(model.Phase, pb.State, "STATE_")
HEALTH = _EnumMap(model.Health, pb.HealthStatus, "HEALTH_STATUS_")
DATA_POLICIES = _EnumMap(model.DataPolicy, pb.DataPolicy, "DATA_POLICY_")
OPERATION_TYPES = _EnumMap(model.OperationType, pb.OperationType, "OPERATION_TYPE_")
OPERATION_STATES = _EnumMap(model.OperationState, pb.OperationState, "OPERATION_STATE_")
DRIFT_CLASSES = _EnumMap(model.DriftClass, pb.DriftClass, "DRIFT_CLASS_")
SEVERITIES = _EnumMap(model.Severity, pb.Severity, "SEVERITY_")
ACTIONS = _EnumMap(model.Action, pb.RecommendedAction, "RECOMMENDED_ACTION_")
EVENT_KINDS = _EnumMap(model.EventKind, pb.DriftEventKind, "DRIFT_EVENT_KIND_")
MODES = _EnumMap(policy.Mode, pb.RemediationMode, "REMEDIATION_MODE_")
BUDGET_SOURCES = _EnumMap(costs.Source, pb.CostBudgetSource, "COST_BUDGET_SOURCE_")
REMEDIATION_STATES = _EnumMap(approval.State, pb.RemediationState, "REMEDIATION_STATE_")


_ALL_MAPS = (RESOURCE_TYPES, PHASES, HEALTH, DATA_POLICIES, OPERATION_TYPES, OPERATION_STATES)
_MAPS: dict[type[enum.Enum], _EnumMap] = {
    m.domain: m
    for m in (
        *_ALL_MAPS,
        DRIFT_CLASSES,
        SEVERITIES,
        ACTIONS,
        EVENT_KINDS,
        MODES,
        BUDGET_SOURCES,
        REMEDIATION_STATES,
    )
}


def proto_spelling(value: enum.Enum) -> str:
    """A domain enum value as gRPC clients write it (``RESOURCE_TYPE_CACHE``), for error messages."""
    enum_map = _MAPS.get(type(value))
    return enum_map.name_of(value) if enum_map is not None else str(value.value)


def timestamp(value: datetime.datetime) -> timestamp_pb2.Timestamp:
    """A protobuf Timestamp of an aware datetime."""
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value.astimezone(datetime.UTC))
    return ts


# Requests -----------------------------------------------------------------------------------------


def spec_from_proto(spec: pb.ResourceSpec) -> model.ResourceSpec:
    """A domain spec from a request's spec (defaults are filled in later, by validation)."""
    topic = None
    if spec.HasField("topic"):
        topic = model.TopicSpec(partitions=spec.topic.partitions, retention_ms=spec.topic.retention_ms)
    return model.ResourceSpec(
        engine=spec.engine,
        version=spec.version,
        size=spec.size,
        replicas=spec.replicas if spec.HasField("replicas") else None,
        topic=topic,
    )


def resource_type(number: int) -> model.ResourceType | None:
    """The resource type of a request; None when unspecified, InvalidArgument when unknown."""
    value = RESOURCE_TYPES.to_domain(number, model.ResourceType)
    if value is None and number != 0:
        raise errors.InvalidArgument(
            [
                errors.FieldViolation(
                    "resource_type", f"{number} is not a resource type", tuple(model.ResourceType)
                )
            ]
        )
    return value


def provision_input(request: pb.ProvisionRequest) -> service.ProvisionInput:
    """The service input of a ProvisionRequest."""
    return service.ProvisionInput(
        namespace=request.namespace,
        resource_type=resource_type(request.resource_type),
        resource_name=request.resource_name,
        spec=spec_from_proto(request.spec) if request.HasField("spec") else None,
        callback_url=request.callback_url,
        request_id=request.request_id,
    )


def resource_state_input(request: pb.GetResourceStateRequest) -> service.ResourceStateInput:
    """The service input of a GetResourceStateRequest."""
    return service.ResourceStateInput(
        namespace=request.namespace,
        resource_type=resource_type(request.resource_type),
        resource_name=request.resource_name,
        deployment_id=request.deployment_id,
        page_size=request.page_size,
        page_token=request.page_token,
    )


def events_input(request: pb.ListDriftEventsRequest) -> service.EventsInput:
    """The service input of a ListDriftEventsRequest."""
    kinds = frozenset(k for k in (EVENT_KINDS.to_domain(n, model.EventKind) for n in request.kinds) if k)
    return service.EventsInput(
        namespace=request.namespace,
        deployment_id=request.deployment_id,
        kinds=kinds,
        page_size=request.page_size,
        page_token=request.page_token,
        resource_type=resource_type(request.resource_type),
        resource_name=request.resource_name,
        after_sequence=request.after_sequence if request.HasField("after_sequence") else None,
    )


def watch_input(request: pb.WatchDriftRequest) -> service.WatchInput:
    """The service input of a WatchDriftRequest."""
    kinds = frozenset(k for k in (EVENT_KINDS.to_domain(n, model.EventKind) for n in request.kinds) if k)
    return service.WatchInput(
        namespaces=tuple(request.namespaces),
        resource_type=resource_type(request.resource_type),
        resource_name=request.resource_name,
        deployment_id=request.deployment_id,
        kinds=kinds,
        send_initial_state=request.send_initial_state,
        after_sequence=request.after_sequence if request.HasField("after_sequence") else None,
    )


def data_policy(number: int) -> model.DataPolicy:
    """The data policy of a request; unspecified means keep, the safe default."""
    return DATA_POLICIES.to_domain(number, model.DataPolicy) or model.DataPolicy.KEEP


# Responses ----------------------------------------------------------------------------------------


def spec_to_proto(spec: model.ResourceSpec) -> pb.ResourceSpec:
    """The proto of a domain spec."""
    out = pb.ResourceSpec(engine=spec.engine, version=spec.version, size=spec.size)
    if spec.replicas is not None:
        out.replicas = spec.replicas
    if spec.topic is not None:
        out.topic.partitions = spec.topic.partitions
        out.topic.retention_ms = spec.topic.retention_ms
    if spec.resources is not None:
        r = spec.resources
        out.resources.CopyFrom(
            pb.ComputeResources(
                cpu_request=r.cpu_request,
                cpu_limit=r.cpu_limit,
                memory_request=r.memory_request,
                memory_limit=r.memory_limit,
                storage=r.storage,
            )
        )
    return out


def operation_to_proto(op: model.Operation) -> pb.Operation:
    """The proto of an operation."""
    return pb.Operation(
        operation_id=op.operation_id,
        type=OPERATION_TYPES.to_proto(op.type),
        state=OPERATION_STATES.to_proto(op.state),
        generation=op.generation,
        message=op.message,
        create_time=timestamp(op.create_time),
        update_time=timestamp(op.update_time),
    )


def provision_response(result: model.MutationResult) -> pb.ProvisionResponse:
    """The ProvisionResponse of a provision result."""
    return pb.ProvisionResponse(
        deployment_id=result.deployment_id,
        phase=PHASES.to_proto(result.phase),
        generation=result.generation,
        operation=operation_to_proto(result.operation),
    )


def deprovision_input(request: pb.DeprovisionRequest) -> service.DeprovisionInput:
    """The service input of a DeprovisionRequest."""
    return service.DeprovisionInput(
        namespace=request.namespace,
        deployment_id=request.deployment_id,
        data_policy=data_policy(request.data_policy),
        request_id=request.request_id,
    )


def deprovision_response(result: model.MutationResult) -> pb.DeprovisionResponse:
    """The DeprovisionResponse of a deprovision result."""
    return pb.DeprovisionResponse(
        deployment_id=result.deployment_id,
        phase=PHASES.to_proto(result.phase),
        operation=operation_to_proto(result.operation),
    )


def deployment_to_proto(d: model.Deployment) -> pb.Deployment:
    """The proto of a deployment."""
    return pb.Deployment(
        deployment_id=d.deployment_id,
        namespace=d.namespace,
        resource_type=RESOURCE_TYPES.to_proto(d.resource_type),
        resource_name=d.resource_name,
        desired_spec=spec_to_proto(d.desired_spec),
        generation=d.generation,
        phase=PHASES.to_proto(d.phase),
        callback_url=d.callback_url,
        last_operation=operation_to_proto(d.last_operation),
        create_time=timestamp(d.create_time),
        update_time=timestamp(d.update_time),
    )


def drift_item_to_proto(item: model.DriftItem) -> pb.DriftItem:
    """The proto of a drift item."""
    out = pb.DriftItem(
        rule_id=item.rule_id,
        field=item.field,
        desired=item.desired,
        actual=item.actual,
        drift_class=DRIFT_CLASSES.to_proto(item.drift_class),
        severity=SEVERITIES.to_proto(item.severity),
        recommended_action=ACTIONS.to_proto(item.action),
        message=item.message,
        changed_by=item.changed_by,
    )
    if item.monthly_cost_delta is not None:
        out.monthly_cost_delta = item.monthly_cost_delta
    if item.detect_time is not None:
        out.detect_time.CopyFrom(timestamp(item.detect_time))
    return out


def resource_state_to_proto(view: service.ResourceView) -> pb.ResourceState:
    """The proto of what is known about one resource; the actual side only once observed."""
    d = view.deployment
    out = pb.ResourceState(
        deployment_id=d.deployment_id,
        resource_type=RESOURCE_TYPES.to_proto(d.resource_type),
        resource_name=d.resource_name,
        namespace=d.namespace,
        phase=PHASES.to_proto(view.phase),
        message=view.message,
        endpoint=view.endpoint,
        port=view.port,
        connection_secret=view.connection_secret,
        desired_spec=spec_to_proto(d.desired_spec),
        generation=d.generation,
    )
    evaluation = view.evaluation
    if evaluation is None:
        # Nothing observed (no cluster connected, or nothing created yet): health is not known,
        # which is a fact to state, not a field to leave out.
        out.health_status = HEALTH.to_proto(model.Health.UNKNOWN)
        return out
    out.health_status = HEALTH.to_proto(evaluation.health)
    out.last_checked.CopyFrom(timestamp(evaluation.checked_at))
    if evaluation.actual_spec is not None:
        out.actual_spec.CopyFrom(spec_to_proto(evaluation.actual_spec))
    out.drift_detected = bool(evaluation.items)
    out.drift_details.extend(evaluation.details())
    out.drift_items.extend(drift_item_to_proto(i) for i in evaluation.items)
    if evaluation.usage is not None:
        u = evaluation.usage
        usage = pb.ResourceUsage(replicas=u.replicas)
        if u.cpu is not None:
            usage.cpu_usage = u.cpu
        if u.memory is not None:
            usage.memory_usage = u.memory
        if u.storage is not None:
            usage.storage_usage = u.storage
        out.resource_usage.CopyFrom(usage)
    if evaluation.monthly_cost is not None:
        out.estimated_monthly_cost = evaluation.monthly_cost
    return out


def resource_page_to_proto(
    namespace: str, page: model.Page[service.ResourceView]
) -> pb.GetResourceStateResponse:
    """The GetResourceStateResponse of a page of resource views."""
    return pb.GetResourceStateResponse(
        resources=[resource_state_to_proto(v) for v in page.items],
        total=page.total,
        namespace=namespace,
        next_page_token=page.next_token,
    )


def event_to_proto(event: model.DriftEvent) -> pb.DriftEvent:
    """The proto of an event-log entry."""
    return pb.DriftEvent(
        sequence=event.sequence,
        kind=EVENT_KINDS.to_proto(event.kind),
        deployment_id=event.deployment_id,
        namespace=event.namespace,
        resource_type=RESOURCE_TYPES.to_proto(event.resource_type),
        resource_name=event.resource_name,
        event_time=timestamp(event.event_time),
        message=event.message,
        drift_items=[drift_item_to_proto(i) for i in event.items],
        phase=PHASES.to_proto(event.phase),
        health_status=HEALTH.to_proto(event.health),
        generation=event.generation,
    )


def events_page_to_proto(page: model.Page[model.DriftEvent]) -> pb.ListDriftEventsResponse:
    """The ListDriftEventsResponse of a page of events."""
    return pb.ListDriftEventsResponse(
        events=[event_to_proto(e) for e in page.items], next_page_token=page.next_token
    )


def rule_from_proto(msg: pb.RemediationPolicy) -> policy.Rule:
    """A policy rule from a request; the mode is required."""
    mode = MODES.to_domain(msg.mode, policy.Mode)
    if mode is None:
        raise errors.InvalidArgument(
            [errors.FieldViolation("policy.mode", "is required", tuple(policy.Mode))]
        )
    window = None
    if msg.HasField("maintenance_window"):
        w = msg.maintenance_window
        try:
            window = windows.parse(cron=w.cron, duration=w.duration, time_zone=w.time_zone)
        except windows.WindowError as e:
            raise errors.InvalidArgument(
                [errors.FieldViolation(f"policy.maintenance_window.{e.part}", str(e))]
            ) from e
    rule_modes: dict[str, policy.Mode] = {}
    for index, entry in enumerate(msg.rule_modes):
        entry_mode = MODES.to_domain(entry.mode, policy.Mode)
        if entry_mode is None:
            raise errors.InvalidArgument(
                [errors.FieldViolation(f"policy.rule_modes[{index}].mode", "is required", tuple(policy.Mode))]
            )
        rule_modes[entry.rule_id] = entry_mode
    return policy.Rule(
        namespace=msg.namespace,
        resource_type=resource_type(msg.resource_type),
        mode=mode,
        ignore_fields=frozenset(msg.ignore_fields),
        window=window,
        rule_modes=tuple(sorted(rule_modes.items())),
    )


def rule_to_proto(rule: policy.Rule) -> pb.RemediationPolicy:
    """The proto of a policy rule."""
    message = pb.RemediationPolicy(
        namespace=rule.namespace,
        resource_type=RESOURCE_TYPES.to_proto(rule.resource_type),
        mode=MODES.to_proto(rule.mode),
        ignore_fields=sorted(rule.ignore_fields),
        rule_modes=[pb.RuleMode(rule_id=r, mode=MODES.to_proto(m)) for r, m in rule.rule_modes],
    )
    if rule.window is not None:
        message.maintenance_window.CopyFrom(
            pb.MaintenanceWindow(
                cron=rule.window.cron,
                duration=windows.format_duration(rule.window.duration),
                time_zone=rule.window.time_zone,
            )
        )
    return message


def policy_response(rule: policy.Rule, now: datetime.datetime) -> pb.GetRemediationPolicyResponse:
    """The policy in effect, with its current or next maintenance window."""
    response = pb.GetRemediationPolicyResponse(policy=rule_to_proto(rule))
    if rule.window is not None:
        start, end = rule.window.current_or_next(now)
        response.next_window_start.CopyFrom(timestamp(start))
        response.next_window_end.CopyFrom(timestamp(end))
    return response


def remediation_to_proto(r: approval.Remediation) -> pb.PendingRemediation:
    """The proto of a proposed remediation: what it would change, field by field."""
    message = pb.PendingRemediation(
        remediation_id=r.remediation_id,
        namespace=r.namespace,
        deployment_id=r.deployment_id,
        resource_type=RESOURCE_TYPES.to_proto(r.resource_type),
        resource_name=r.resource_name,
        state=REMEDIATION_STATES.to_proto(r.state),
        generation=r.generation,
        create_time=timestamp(r.create_time),
        expire_time=timestamp(r.expire_time),
        decided_by=r.decided_by,
        reason=r.reason,
    )
    for change in r.changes:
        proposed = message.changes.add(
            rule_id=change.rule_id,
            field=change.field,
            to=change.to_value,
            changed_by=change.changed_by,
            message=change.message,
        )
        setattr(proposed, "from", change.from_value)  # "from" is a Python keyword
        if change.monthly_cost_delta is not None:
            proposed.monthly_cost_delta = change.monthly_cost_delta
    if r.monthly_cost_delta is not None:
        message.monthly_cost_delta = r.monthly_cost_delta
    if r.decide_time is not None:
        message.decide_time.CopyFrom(timestamp(r.decide_time))
    return message


def budget_input(msg: pb.CostBudget) -> service.BudgetInput:
    """A set-budget request: an absent monthly_budget removes the namespace's API budget."""
    return service.BudgetInput(
        namespace=msg.namespace, monthly=msg.monthly_budget if msg.HasField("monthly_budget") else None
    )


def budget_to_proto(budget: costs.Budget) -> pb.CostBudget:
    """The proto of a namespace's budget in effect."""
    return pb.CostBudget(
        namespace=budget.namespace,
        monthly_budget=budget.monthly,
        source=BUDGET_SOURCES.to_proto(budget.source),
    )


def cost_summary_to_proto(summary: costs.Summary) -> pb.GetCostSummaryResponse:
    """The proto of a namespace's cost summary."""
    return pb.GetCostSummaryResponse(
        namespace=summary.namespace,
        desired_monthly_cost=summary.desired,
        actual_monthly_cost=summary.actual,
        budget=budget_to_proto(summary.budget),
        budget_exceeded=summary.exceeded,
        top_drifts=[
            pb.CostDrift(
                deployment_id=d.deployment.deployment_id,
                resource_type=RESOURCE_TYPES.to_proto(d.deployment.resource_type),
                resource_name=d.deployment.resource_name,
                rule_id=d.item.rule_id,
                field=d.item.field,
                desired=d.item.desired,
                actual=d.item.actual,
                monthly_cost_delta=d.item.monthly_cost_delta or 0.0,
                message=d.item.message,
            )
            for d in summary.top_drifts
        ],
        resources=[
            pb.ResourceCost(
                deployment_id=r.deployment.deployment_id,
                resource_type=RESOURCE_TYPES.to_proto(r.deployment.resource_type),
                resource_name=r.deployment.resource_name,
                desired_monthly_cost=r.desired,
                actual_monthly_cost=r.actual,
            )
            for r in summary.resources
        ],
        cost_alert_threshold=summary.threshold,
    )


def watch_item_to_proto(item: service.WatchItem) -> pb.WatchDriftResponse:
    """One message of the drift stream."""
    if isinstance(item, model.DriftEvent):
        return pb.WatchDriftResponse(event=event_to_proto(item))
    if isinstance(item, service.ResourceView):
        return pb.WatchDriftResponse(initial_state=resource_state_to_proto(item))
    if isinstance(item, service.SnapshotComplete):
        return pb.WatchDriftResponse(snapshot_complete=pb.SnapshotComplete(sequence=item.sequence))
    return pb.WatchDriftResponse(
        heartbeat=pb.Heartbeat(
            sequence=item.sequence, send_time=timestamp(datetime.datetime.now(datetime.UTC))
        )
    )

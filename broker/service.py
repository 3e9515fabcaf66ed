"""The service layer: what every transport calls after parsing a request and authenticating.

Each method validates its input (bad input never reaches the store), checks the principal's
namespace grant before looking anything up, calls the store, and writes an audit line for every
mutating call. It knows nothing of gRPC, protobuf or HTTP.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import AsyncGenerator, Callable, Hashable
from typing import Any, Protocol

from broker import auth, errors, events, paging
from broker.domain import (
    admission,
    approval,
    costs,
    drift,
    lifecycle,
    model,
    naming,
    policy,
    rules,
    validation,
)
from broker.domain import catalog as catalog_mod
from broker.store import port

audit_log = logging.getLogger("broker.audit")


@dataclasses.dataclass(frozen=True, slots=True)
class ProvisionInput:
    """A provision request as a transport parsed it, before validation."""

    namespace: str
    resource_type: model.ResourceType | None
    resource_name: str
    spec: model.ResourceSpec | None
    callback_url: str
    request_id: str


@dataclasses.dataclass(frozen=True, slots=True)
class ResourceStateInput:
    """A resource-state query as a transport parsed it, before validation."""

    namespace: str
    resource_type: model.ResourceType | None = None
    resource_name: str = ""
    deployment_id: str = ""
    page_size: int = 0
    page_token: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class EventsInput:
    """A drift-history query as a transport parsed it, before validation."""

    namespace: str
    deployment_id: str = ""
    kinds: frozenset[model.EventKind] = frozenset()
    page_size: int = 0
    page_token: str = ""
    resource_type: model.ResourceType | None = None
    resource_name: str = ""
    after_sequence: int | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class DeploymentInput:
    """One deployment of a namespace, as a transport parsed the request, before validation."""

    namespace: str
    deployment_id: str


@dataclasses.dataclass(frozen=True, slots=True)
class DeprovisionInput:
    """A deprovision request as a transport parsed it, before validation."""

    namespace: str
    deployment_id: str
    data_policy: model.DataPolicy = model.DataPolicy.KEEP
    request_id: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class AcceptDriftInput:
    """An accept-drift request (which observed fields become desired) before validation."""

    namespace: str
    deployment_id: str
    fields: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class PolicyInput:
    """Which policy to read: a namespace, and a resource type or all of them."""

    namespace: str
    resource_type: model.ResourceType | None = None


@dataclasses.dataclass(frozen=True)
class RemediationsInput:
    """Which proposed remediations to list, as a transport parsed the request."""

    namespace: str
    deployment_id: str = ""
    include_decided: bool = False


@dataclasses.dataclass(frozen=True)
class DecisionInput:
    """An approval or rejection of one pending remediation, before validation."""

    namespace: str
    remediation_id: str
    request_id: str = ""
    reason: str = ""


class ClusterView(Protocol):
    """What the service needs of the cluster: an observation from the caches, never an API call."""

    def observe(self, deployment: model.Deployment) -> drift.Observation:
        """The current observation of one deployment's objects."""
        ...

    @property
    def synced(self) -> bool:
        """Whether the caches can be trusted now (False during an API outage)."""
        ...


class Verdicts(Protocol):
    """What the detector concluded about each deployment it evaluates (the only evaluator)."""

    def verdict(self, deployment: model.Deployment) -> drift.Evaluation | None:
        """The last verdict for the deployment's current operation, if any."""
        ...

    def reevaluate(self, namespace: str, resource_type: model.ResourceType | None) -> None:
        """Evaluate a namespace's deployments (of a type) again now: their policy changed."""
        ...

    def version(self, namespace: str) -> int:
        """A number that changes whenever a verdict on a deployment of the namespace does."""
        ...


class CallbackCheck(Protocol):
    """Refuses callback URLs that point at forbidden addresses (SSRF)."""

    def check_literal(self, url: str) -> None:
        """Raise PermissionDenied for a forbidden literal host."""
        ...


@dataclasses.dataclass(frozen=True, slots=True)
class ResourceView:
    """What the broker knows about one resource: the deployment and, once observed, its verdict.

    ``evaluation`` is None when no cluster is connected; the actual side is then absent, never
    invented. ``phase`` is the effective phase: Ready becomes DriftDetected while unexpected drift
    is open.
    """

    deployment: model.Deployment
    phase: model.Phase
    endpoint: str
    port: int
    connection_secret: str
    message: str
    evaluation: drift.Evaluation | None


class PolicyBook:
    """The remediation policy in effect: configured rules, overridden by rules set through the API."""

    def __init__(self, configured: policy.Policy, stored: list[policy.Rule] | None = None) -> None:
        self._configured = configured
        self.current = configured
        for rule in stored or ():
            self.current = self.current.with_rule(rule)
        self.listeners: list[Callable[[], None]] = []
        """Called after every change (drift prevention re-applies its admission policies)."""

    def set(self, rule: policy.Rule) -> None:
        """Put a rule in effect."""
        self.current = self.current.with_rule(rule)
        for listener in self.listeners:
            listener()

    def replace(self, stored: list[policy.Rule]) -> bool:
        """Put the stored rules in effect over the configured ones (as read again from a store that
        other replicas write too); whether that changed anything."""
        current = self._configured
        for rule in stored:
            current = current.with_rule(rule)
        if current == self.current:
            return False
        self.current = current
        for listener in self.listeners:
            listener()
        return True


class BudgetBook:
    """The cost budgets in effect: configured ones, overridden by those set through the API."""

    def __init__(
        self, configured: dict[str, float] | None = None, stored: dict[str, float] | None = None
    ) -> None:
        self.current = costs.Budgets(configured=dict(configured or {}), stored=dict(stored or {}))
        self.listeners: list[Callable[[str], None]] = []
        """Called with the namespace after every change (the detector re-checks its budget)."""

    def set(self, namespace: str, monthly: float | None) -> None:
        """Put a namespace's API budget in effect (None removes it)."""
        self.current = self.current.with_stored(namespace, monthly)
        for listener in self.listeners:
            listener(namespace)


@dataclasses.dataclass(frozen=True, slots=True)
class BudgetInput:
    """A set-budget request as a transport parsed it, before validation; None removes the budget."""

    namespace: str
    monthly: float | None


@dataclasses.dataclass(frozen=True, slots=True)
class CostSummaryInput:
    """A cost-summary request as a transport parsed it, before validation."""

    namespace: str
    max_drifts: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class WatchInput:
    """A drift subscription as a transport parsed it, before validation."""

    namespaces: tuple[str, ...] = ()
    resource_type: model.ResourceType | None = None
    resource_name: str = ""
    deployment_id: str = ""
    kinds: frozenset[model.EventKind] = frozenset()
    send_initial_state: bool = False
    after_sequence: int | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class SnapshotComplete:
    """All initial states were sent; live events follow after ``sequence``."""

    sequence: int


@dataclasses.dataclass(frozen=True, slots=True)
class Heartbeat:
    """Nothing happened for a while; the stream has handed on everything up to ``sequence``.

    A client that resumes with ``after_sequence=sequence`` misses nothing it asked for.
    """

    sequence: int


WatchItem = model.DriftEvent | ResourceView | SnapshotComplete | Heartbeat


@dataclasses.dataclass(frozen=True, slots=True)
class WatchLimits:
    """Bounds of the drift streams: per-subscriber lag, per-principal streams, heartbeats.

    A subscriber is cut off (resumably) when more than ``buffer`` matching events wait for it,
    or when the transport has not taken a message for ``max_lag_seconds``.
    """

    buffer: int = 1000
    max_lag_seconds: float = 30.0
    streams_per_principal: int = 100
    heartbeat_interval: float = 15.0
    replay_page: int = 500


class BrokerService:
    """Provision, read and deprovision resources on behalf of authenticated principals."""

    def __init__(
        self,
        *,
        store: port.Store,
        catalog: catalog_mod.Catalog,
        cluster: ClusterView | None = None,
        verdicts: Verdicts | None = None,
        policies: PolicyBook | None = None,
        callback_check: CallbackCheck | None = None,
        on_accepted: Callable[[str], None] = lambda deployment_id: None,
        on_desired_changed: Callable[[str], None] = lambda deployment_id: None,
        hub: events.EventHub | None = None,
        watch_limits: WatchLimits | None = None,
        prevention: admission.Prevention | None = None,
        budgets: BudgetBook | None = None,
        cost_alert_threshold: float = costs.DEFAULT_THRESHOLD,
        on_approved: Callable[[str], None] = lambda deployment_id: None,
    ) -> None:
        # A remediation was approved: the leader's detector carries it out (see detector.py).
        self._on_approved = on_approved
        self.prevention = prevention or admission.Prevention()
        self.budgets = budgets or BudgetBook()
        self.cost_alert_threshold = cost_alert_threshold
        self._hub = hub if hub is not None else events.EventHub()
        self.watch_limits = watch_limits or WatchLimits()
        self._streams: dict[str, int] = {}
        self._store = store
        self._catalog = catalog
        self._cluster = cluster
        self._verdicts = verdicts
        self.policies = policies or PolicyBook(policy.Policy())
        self._callback_check = callback_check
        self._on_accepted = on_accepted
        # The desired state changed without anything to apply (accepted drift): re-evaluate it now.
        self._on_desired_changed = on_desired_changed
        # The last view of each deployment, handed out again while its deployment (the store gives
        # the same object for an unchanged row) and its verdict are the same objects: an unchanged
        # resource costs a lookup, and the transports keep its encoding by the view's identity.
        self._views: dict[str, ResourceView] = {}
        self._pages = _KeptPages()

    @property
    def shutting_down(self) -> bool:
        """Whether the broker is draining: streams end, resumably, instead of waiting on."""
        return self._hub.shutting_down

    async def provision(self, principal: auth.Principal, request: ProvisionInput) -> model.MutationResult:
        """Validate and persist a desired state; answer at once (the workload comes later)."""
        command = validation.provision_command(
            namespace=request.namespace,
            resource_type=request.resource_type,
            resource_name=request.resource_name,
            spec=request.spec,
            callback_url=request.callback_url,
            request_id=request.request_id,
            catalog=self._catalog,
        )
        target = f"{command.resource_type.value}/{command.resource_name}"
        with _audited(principal, "Provision", command.namespace, target) as record:
            principal.require(command.namespace)
            if command.callback_url and self._callback_check is not None:
                try:
                    self._callback_check.check_literal(command.callback_url)
                except errors.PermissionDenied as e:
                    raise errors.InvalidArgument([errors.FieldViolation("callback_url", e.message)]) from e
            result = await self._store.provision(command)
            if result.changed:
                self._on_accepted(result.deployment_id)
            record(
                deployment_id=result.deployment_id,
                generation=result.generation,
                outcome="changed" if result.changed else "unchanged",
            )
        return result

    async def deprovision(self, principal: auth.Principal, request: DeprovisionInput) -> model.MutationResult:
        """Mark a deployment for deletion, keeping or deleting its volumes as asked."""
        namespace, deployment_id = request.namespace, request.deployment_id
        data_policy, request_id = request.data_policy, request.request_id
        violations: list[errors.FieldViolation] = []
        validation.check_namespace(namespace, violations)
        validation.check_deployment_id(deployment_id, violations, required=True)
        validation.check_request_id(request_id, violations)
        validation.raise_if(violations)
        with _audited(principal, "Deprovision", namespace, deployment_id) as record:
            principal.require(namespace)
            result = await self._store.deprovision(
                model.DeprovisionCommand(
                    namespace=model.Namespace(namespace),
                    deployment_id=model.DeploymentId(deployment_id),
                    data_policy=data_policy,
                    request_id=request_id,
                )
            )
            if result.changed:
                self._on_accepted(result.deployment_id)
            record(
                deployment_id=result.deployment_id,
                data_policy=data_policy.value,
                outcome="changed" if result.changed else "unchanged",
            )
        return result

    async def get_deployment(self, principal: auth.Principal, request: DeploymentInput) -> model.Deployment:
        """One deployment's desired spec, phase and last operation."""
        namespace, deployment_id = request.namespace, request.deployment_id
        violations: list[errors.FieldViolation] = []
        validation.check_namespace(namespace, violations)
        validation.check_deployment_id(deployment_id, violations, required=True)
        validation.raise_if(violations)
        principal.require(namespace)
        return await self._store.get_deployment(model.Namespace(namespace), model.DeploymentId(deployment_id))

    async def get_resource_state(
        self, principal: auth.Principal, request: ResourceStateInput
    ) -> model.Page[ResourceView]:
        """The resources of one namespace, filtered and paginated, with what is known of each."""
        violations: list[errors.FieldViolation] = []
        validation.check_namespace(request.namespace, violations)
        validation.check_resource_name(request.resource_name, violations, required=False)
        validation.check_deployment_id(request.deployment_id, violations, required=False)
        size = validation.page_size(request.page_size, violations)
        validation.raise_if(violations)
        principal.require(request.namespace)
        query = model.ResourceQuery(
            namespace=model.Namespace(request.namespace),
            resource_type=request.resource_type,
            resource_name=model.ResourceName(request.resource_name) if request.resource_name else None,
            deployment_id=model.DeploymentId(request.deployment_id) if request.deployment_id else None,
        )
        # A page is kept while the store has committed nothing and the detector changed no verdict
        # of the namespace: the same object again, whose encoding the transports kept. Kept by the
        # token as given: only a token that decoded is ever kept, and a kept page decodes none.
        version = self._page_version(request.namespace)
        key = (query, size, request.page_token)
        kept = self._pages.get(key, version)
        if kept is not None:
            return kept
        page = model.PageRequest(size=size, after=paging.position(query, request.page_token))
        deployments = await self._store.list_deployments(query, page)
        settled = True
        views = []
        for deployment in deployments.items:
            view, reusable = self._view_of(deployment)
            views.append(view)
            settled = settled and reusable
        result = model.Page(
            items=tuple(views),
            total=deployments.total,
            next_token=paging.token(query, deployments.next_after),
        )
        if settled:
            self._pages.put(key, version, result)
        return result

    def is_kept(self, page: model.Page[ResourceView]) -> bool:
        """Whether a page read from ``get_resource_state`` will be handed out again while current."""
        return self._pages.holds(page)

    def _page_version(self, namespace: str) -> Hashable | None:
        store_version = self._store.deployments_version()
        if store_version is None:
            return None
        verdicts_version = self._verdicts.version(namespace) if self._verdicts is not None else 0
        return (store_version, verdicts_version, self._cluster is None or self._cluster.synced)

    async def list_drift_events(
        self, principal: auth.Principal, request: EventsInput
    ) -> model.Page[model.DriftEvent]:
        """The recorded drift history of a namespace or one deployment, oldest first."""
        violations: list[errors.FieldViolation] = []
        validation.check_namespace(request.namespace, violations)
        validation.check_deployment_id(request.deployment_id, violations, required=False)
        validation.check_resource_name(request.resource_name, violations, required=False)
        if request.after_sequence is not None and request.after_sequence < 0:
            violations.append(errors.FieldViolation("after_sequence", "must not be negative"))
        size = validation.page_size(request.page_size, violations)
        validation.raise_if(violations)
        principal.require(request.namespace)
        query = model.EventQuery(
            namespace=model.Namespace(request.namespace),
            deployment_id=model.DeploymentId(request.deployment_id) if request.deployment_id else None,
            kinds=request.kinds,
            resource_type=request.resource_type,
            resource_name=model.ResourceName(request.resource_name) if request.resource_name else None,
            after_sequence=request.after_sequence or 0,
        )
        page = model.PageRequest(size=size, after=paging.position(query, request.page_token))
        listed = await self._store.list_events(query, page)
        return model.Page(
            items=listed.items, total=listed.total, next_token=paging.token(query, listed.next_after)
        )

    async def accept_drift(
        self, principal: auth.Principal, request: AcceptDriftInput
    ) -> tuple[model.Deployment, list[str]]:
        """Make observed values the desired state: a new generation that matches what runs."""
        namespace, deployment_id, fields = request.namespace, request.deployment_id, request.fields
        violations: list[errors.FieldViolation] = []
        validation.check_namespace(namespace, violations)
        validation.check_deployment_id(deployment_id, violations, required=True)
        unknown = sorted(set(fields) - set(rules.ACCEPTABLE))
        if unknown:
            violations.append(
                errors.FieldViolation(
                    "fields", f"{', '.join(unknown)} cannot be accepted; use {', '.join(rules.ACCEPTABLE)}"
                )
            )
        validation.raise_if(violations)
        with _audited(principal, "AcceptDrift", namespace, deployment_id) as record:
            principal.require(namespace)
            deployment = await self._store.get_deployment(
                model.Namespace(namespace), model.DeploymentId(deployment_id)
            )
            view = self._view(deployment)
            if view.evaluation is None or view.evaluation.actual_spec is None:
                raise errors.FailedPrecondition(
                    f"deployment {deployment_id} has no observed state to accept (phase {view.phase.value})",
                    reason="NOTHING_OBSERVED",
                )
            wanted = set(fields or rules.ACCEPTABLE)
            drifted = {i.field for i in view.evaluation.items} & wanted
            spec, accepted = _accepted_spec(
                deployment.desired_spec, view.evaluation.actual_spec, drifted, self._catalog
            )
            if not accepted:
                raise errors.FailedPrecondition(
                    f"deployment {deployment_id} has no acceptable drift on {', '.join(sorted(wanted))}",
                    reason="NO_DRIFT",
                )
            # Nothing is applied: what runs already has these values. Drift on other fields stays.
            if not await self._store.accept(
                deployment, spec, f"accepted the observed {', '.join(accepted)} as desired; nothing applied"
            ):
                raise errors.FailedPrecondition(
                    f"deployment {deployment_id} changed while its drift was being accepted; "
                    "read it and retry",
                    reason="DEPLOYMENT_CHANGED",
                )
            self._on_desired_changed(deployment_id)
            record(deployment_id=deployment_id, accepted=",".join(accepted))
        updated = await self._store.get_deployment(
            model.Namespace(namespace), model.DeploymentId(deployment_id)
        )
        return updated, accepted

    async def set_policy(self, principal: auth.Principal, rule: policy.Rule) -> policy.Rule:
        """Store a remediation policy for a namespace (and type) and put it in effect."""
        violations: list[errors.FieldViolation] = []
        validation.check_namespace(rule.namespace, violations, field="policy.namespace")
        unknown = sorted(rule.ignore_fields - drift.FIELDS)
        if unknown:
            violations.append(
                errors.FieldViolation(
                    "policy.ignore_fields",
                    f"unknown fields {', '.join(unknown)}; use {', '.join(sorted(drift.FIELDS))}",
                )
            )
        unknown_rules = sorted(r for r, _ in rule.rule_modes if r not in rules.BY_ID)
        if unknown_rules:
            violations.append(
                errors.FieldViolation(
                    "policy.rule_modes",
                    f"unknown drift rules {', '.join(unknown_rules)}; use {', '.join(sorted(rules.BY_ID))}",
                )
            )
        validation.raise_if(violations)
        with _audited(
            principal,
            "SetRemediationPolicy",
            rule.namespace,
            rule.resource_type.value if rule.resource_type else "*",
        ) as record:
            principal.require(rule.namespace)
            await self._store.set_policy(rule)
            self.policies.set(rule)
            if self._verdicts is not None:
                self._verdicts.reevaluate(rule.namespace, rule.resource_type)
            record(
                mode=rule.mode.value,
                ignore=",".join(sorted(rule.ignore_fields)),
                window=rule.window.describe() if rule.window is not None else "",
                rule_modes=",".join(f"{r}={m.value}" for r, m in rule.rule_modes),
            )
        return rule

    def admission_policy(
        self, principal: auth.Principal, mode: str = ""
    ) -> tuple[list[dict[str, Any]], bool]:
        """The drift-prevention admission objects for the policies in effect, and whether they are applied.

        ``mode`` overrides the configured modes (``deny``, ``warn,labels=audit``). The objects name
        the namespaces whose policies waive a field, so only a principal granted ``*`` may read them.
        """
        if mode:
            try:
                modes = admission.parse_modes(mode)
            except ValueError as e:
                raise errors.InvalidArgument([errors.FieldViolation("mode", str(e))]) from e
            prevention = dataclasses.replace(self.prevention, modes=modes)
        else:
            prevention = self.prevention
        principal.require("*")
        return admission.objects(prevention, self.policies.current), self.prevention.enabled

    def get_policy(self, principal: auth.Principal, request: PolicyInput) -> policy.Rule:
        """The policy in effect for a namespace and type (the default when none was set)."""
        namespace, resource_type = request.namespace, request.resource_type
        violations: list[errors.FieldViolation] = []
        validation.check_namespace(namespace, violations)
        validation.raise_if(violations)
        principal.require(namespace)
        if resource_type is None:
            rules = [
                r for r in self.policies.current.rules if r.namespace == namespace and r.resource_type is None
            ]
            found = rules[-1] if rules else policy.Rule()
        else:
            found = self.policies.current.rule_for(namespace, resource_type)
        return dataclasses.replace(
            found, namespace=namespace, resource_type=found.resource_type or resource_type
        )

    async def set_budget(self, principal: auth.Principal, request: BudgetInput) -> costs.Budget:
        """Store a namespace's monthly budget (or remove the API's) and put it in effect.

        Authorized like ``set_policy``: a principal granted the namespace sets its budget.
        """
        violations: list[errors.FieldViolation] = []
        validation.check_namespace(request.namespace, violations, field="budget.namespace")
        if request.monthly is not None:
            problem = costs.amount_problem(request.monthly)
            if problem:
                violations.append(errors.FieldViolation("budget.monthly_budget", problem))
        validation.raise_if(violations)
        with _audited(principal, "SetCostBudget", request.namespace, "budget") as record:
            principal.require(request.namespace)
            await self._store.set_budget(request.namespace, request.monthly)
            self.budgets.set(request.namespace, request.monthly)
            record(monthly_budget="removed" if request.monthly is None else f"{request.monthly:g}")
        return self.budgets.current.budget_for(request.namespace)

    def get_budget(self, principal: auth.Principal, namespace: str) -> costs.Budget:
        """The budget in effect for a namespace (none, configured, or set through the API)."""
        violations: list[errors.FieldViolation] = []
        validation.check_namespace(namespace, violations)
        validation.raise_if(violations)
        principal.require(namespace)
        return self.budgets.current.budget_for(namespace)

    async def cost_summary(self, principal: auth.Principal, request: CostSummaryInput) -> costs.Summary:
        """A namespace's desired against actual monthly cost, its budget and its costliest drifts.

        The figures are those every read shows: the detector's verdicts (or, for a deployment it
        has not judged yet, an evaluation from the caches).
        """
        violations: list[errors.FieldViolation] = []
        validation.check_namespace(request.namespace, violations)
        if not 0 <= request.max_drifts <= costs.MAX_DRIFTS:
            violations.append(
                errors.FieldViolation(
                    "max_drifts", f"must be 1 to {costs.MAX_DRIFTS} (0 means {costs.DEFAULT_MAX_DRIFTS})"
                )
            )
        validation.raise_if(violations)
        principal.require(request.namespace)
        deployments = await self._store.live_deployments(_SNAPSHOT_PHASES, [request.namespace])
        resources = []
        for deployment in deployments:
            view = self._view(deployment)
            evaluation = view.evaluation
            resources.append(
                costs.ResourceCost(
                    deployment=deployment,
                    desired=costs.desired_cost(deployment, self._catalog),
                    actual=evaluation.monthly_cost if evaluation is not None else None,
                    items=evaluation.items if evaluation is not None else (),
                )
            )
        return costs.summarize(
            request.namespace,
            resources,
            budget=self.budgets.current.budget_for(request.namespace),
            threshold=self.cost_alert_threshold,
            max_drifts=request.max_drifts or costs.DEFAULT_MAX_DRIFTS,
        )

    async def list_remediations(
        self, principal: auth.Principal, request: RemediationsInput
    ) -> list[approval.Remediation]:
        """The proposed remediations of a namespace: pending ones first, then decided ones if asked."""
        violations: list[errors.FieldViolation] = []
        validation.check_namespace(request.namespace, violations)
        validation.check_deployment_id(request.deployment_id, violations, required=False)
        validation.raise_if(violations)
        principal.require(request.namespace)
        found = await self._store.list_remediations(
            namespace=request.namespace,
            deployment_id=request.deployment_id or None,
            states=None if request.include_decided else frozenset({approval.State.PENDING}),
        )
        pending = [r for r in found if r.state is approval.State.PENDING]
        decided = sorted(
            (r for r in found if r.state is not approval.State.PENDING),
            key=lambda r: r.decide_time or r.create_time,
            reverse=True,
        )
        return pending + decided

    async def decide_remediation(
        self, principal: auth.Principal, request: DecisionInput, decision: approval.Decision
    ) -> approval.Remediation:
        """Approve or reject a pending remediation; the approver is recorded and audited.

        An approval is refused (FailedPrecondition) when the proposal is stale: the drift it was
        made from is not what is observed now. A repeated request_id gets the first answer.
        """
        namespace, remediation_id = request.namespace, request.remediation_id
        violations: list[errors.FieldViolation] = []
        validation.check_namespace(namespace, violations)
        if not remediation_id:
            violations.append(errors.FieldViolation("remediation_id", "is required"))
        elif not approval.is_id(remediation_id):
            violations.append(
                errors.FieldViolation(
                    "remediation_id",
                    f"{remediation_id[:80]!r} is not a remediation id "
                    "(they look like 'rem-3f9c2a1b7d4e5f60')",
                )
            )
        validation.check_request_id(request.request_id, violations)
        if len(request.reason) > 500:
            violations.append(errors.FieldViolation("reason", "must be at most 500 characters"))
        validation.raise_if(violations)
        action = "ApproveRemediation" if decision is approval.Decision.APPROVE else "RejectRemediation"
        with _audited(principal, action, namespace, remediation_id) as record:
            principal.require(namespace)
            principal.require_approver(namespace)
            replay = await self._store.decision_replay(
                namespace, request.request_id, decision, remediation_id
            )
            if replay is not None:
                record(deployment_id=replay.deployment_id, outcome="replayed")
                return replay
            remediation = await self._store.get_remediation(namespace, remediation_id)
            record(deployment_id=remediation.deployment_id)
            if remediation.state is not approval.State.PENDING:
                detail = f" ({remediation.reason})" if remediation.reason else ""
                by = f" by {remediation.decided_by}" if remediation.decided_by else ""
                raise errors.FailedPrecondition(
                    f"remediation {remediation_id} is {remediation.state.value}{by}{detail}; only a "
                    "pending remediation can be approved or rejected",
                    reason="REMEDIATION_NOT_PENDING",
                )
            deployment = await self._store.get_deployment(remediation.namespace, remediation.deployment_id)
            view = self._view(deployment)
            if decision is approval.Decision.APPROVE:
                # The drift the proposal names, as observed now (whatever action this replica's
                # copy of the policy gives it: the leader proposed it under mode approve).
                named = {(i.rule_id, i.field) for i in remediation.items}
                current = tuple(
                    i
                    for i in (view.evaluation.unexpected if view.evaluation is not None else ())
                    if (i.rule_id, i.field) in named
                )
                stale = approval.staleness(remediation, deployment, current)
                if stale:
                    raise errors.FailedPrecondition(
                        f"remediation {remediation_id} is stale and was not approved: {stale}; "
                        "list the pending remediations again and decide on the current proposal",
                        reason="REMEDIATION_STALE",
                    )
            who = f"{principal.name}" + (f": {request.reason}" if request.reason else "")
            verb = "Approved" if decision is approval.Decision.APPROVE else "Rejected"
            message = f"{verb} by {who}: {remediation.summary()}"
            decided = await self._store.decide_remediation(
                remediation,
                decision=decision,
                by=principal.name,
                reason=request.reason,
                request_id=request.request_id,
                event=approval.event(remediation, decision.event_kind, message, phase=view.phase),
            )
            if decision is approval.Decision.APPROVE:
                self._on_approved(remediation.deployment_id)
            record(outcome=decided.state.value)
        return decided

    async def watch(
        self, principal: auth.Principal, request: WatchInput, *, on_end: Callable[[], None] | None = None
    ) -> AsyncGenerator[WatchItem, None]:
        """Drift events as they happen, optionally after a snapshot or resumed after a sequence.

        Ends with Unavailable on shutdown and ResourceExhausted when the subscriber fell behind,
        both carrying ``resume_after_sequence`` in their metadata; OutOfRange when the resume point
        is no longer in the log (the client must re-read state).
        """
        violations: list[errors.FieldViolation] = []
        for index, namespace in enumerate(request.namespaces):
            validation.check_namespace(namespace, violations, field=f"namespaces[{index}]")
        validation.check_resource_name(request.resource_name, violations, required=False)
        validation.check_deployment_id(request.deployment_id, violations, required=False)
        if request.after_sequence is not None and request.after_sequence < 0:
            violations.append(errors.FieldViolation("after_sequence", "must not be negative"))
        validation.raise_if(violations)
        for namespace in request.namespaces:
            principal.require(namespace)
        namespaces = frozenset(request.namespaces)
        everywhere = not namespaces and auth.ALL_NAMESPACES in principal.namespaces
        visible = namespaces or frozenset(principal.namespaces - {auth.ALL_NAMESPACES})

        def wanted(event: model.DriftEvent) -> bool:
            return (
                (everywhere or event.namespace in visible)
                and (request.resource_type is None or event.resource_type is request.resource_type)
                and (not request.resource_name or event.resource_name == request.resource_name)
                and (not request.deployment_id or event.deployment_id == request.deployment_id)
                and (not request.kinds or event.kind in request.kinds)
            )

        if self._hub.shutting_down:
            raise errors.Unavailable("the broker is shutting down; reconnect to another instance or retry")
        open_streams = self._streams.get(principal.name, 0)
        if open_streams >= self.watch_limits.streams_per_principal:
            raise errors.ResourceExhausted(
                f"principal {principal.name!r} already has {open_streams} drift streams open "
                f"(the limit is {self.watch_limits.streams_per_principal}); close some first",
                reason="TOO_MANY_STREAMS",
            )
        self._streams[principal.name] = open_streams + 1
        # Subscribe before reading anything, so nothing committed meanwhile can be missed.
        # ``on_end``: the transport stops a write in progress, so a cut-off never waits for a write.
        subscription = self._hub.subscribe(wanted, limit=self.watch_limits.buffer, on_end=on_end)
        try:
            oldest, newest = await self._store.event_bounds()
            last = newest
            if request.send_initial_state:
                namespace_list = None if everywhere else sorted(visible)
                for deployment in await self._store.live_deployments(_SNAPSHOT_PHASES, namespace_list):
                    if _matches(deployment, request):
                        yield self._view(deployment)
                yield SnapshotComplete(sequence=newest)
            elif request.after_sequence is not None:
                after = request.after_sequence
                first_available = oldest or newest + 1
                if after > newest or after < first_available - 1:
                    raise errors.OutOfRange(
                        f"sequence {after} is outside the retained event log ({oldest}..{newest}); "
                        "re-read the state (send_initial_state) and watch from there",
                        reason="SEQUENCE_EXPIRED",
                        metadata={"oldest_sequence": str(oldest), "newest_sequence": str(newest)},
                    )
                last = after
                while True:
                    page = await self._store.events_after(last, self.watch_limits.replay_page)
                    for event in page:
                        last = event.sequence
                        if wanted(event):
                            yield event
                    if len(page) < self.watch_limits.replay_page:
                        break
            else:
                # Live only: tell the client where it starts, so it can resume from there.
                yield Heartbeat(sequence=last)
            while True:
                live = await subscription.next(self.watch_limits.heartbeat_interval)
                if live is not None:
                    # Replayed or snapshotted already when not newer than the position.
                    if live.sequence > last:
                        last = live.sequence
                        yield live
                    continue
                if subscription.overflowed:
                    raise errors.ResourceExhausted(
                        f"this stream fell more than {self.watch_limits.buffer} events behind and was "
                        f"cut off; resume with after_sequence={last}",
                        reason="SUBSCRIBER_TOO_SLOW",
                        metadata={"resume_after_sequence": str(last)},
                    )
                if subscription.closed:
                    raise errors.Unavailable(
                        f"the broker is shutting down; resume with after_sequence={last}",
                        reason="SHUTTING_DOWN",
                        metadata={"resume_after_sequence": str(last)},
                    )
                idle = subscription.idle_position()
                if idle is not None:
                    last = max(last, idle)
                yield Heartbeat(sequence=last)
        finally:
            subscription.close()
            self._streams[principal.name] -= 1

    def _view(self, deployment: model.Deployment) -> ResourceView:
        """What is known of a deployment: the detector's verdict where it keeps one.

        The detector is the only evaluator of running resources; only a deployment it has not
        judged yet (being provisioned, failed, being deleted, or Ready a moment ago) is evaluated
        here, from the caches.
        """
        return self._view_of(deployment)[0]

    def _view_of(self, deployment: model.Deployment) -> tuple[ResourceView, bool]:
        """The view, and whether it may be handed out again (False: evaluated here, live)."""
        evaluation = None
        phase = deployment.phase
        # Whether the cluster can be read is live: during an outage a kept verdict is not shown
        # as current (the evaluation of an unreadable observation says Unknown, at no cost).
        readable = self._cluster is None or self._cluster.synced
        if self._verdicts is not None and readable:
            evaluation = self._verdicts.verdict(deployment)
        live = phase not in (model.Phase.PENDING, model.Phase.DELETED)
        kept = self._views.get(deployment.deployment_id)
        # A view evaluated here (no verdict yet) is never reused: its observation is live.
        reusable = evaluation is not None or not live or self._cluster is None
        if kept is not None and reusable and kept.deployment is deployment and kept.evaluation is evaluation:
            return kept, True
        if evaluation is None and self._cluster is not None and live:
            evaluation = drift.evaluate(
                deployment,
                self._cluster.observe(deployment),
                catalog=self._catalog,
                rules=self.policies.current,
            )
        judged = evaluation is not None and evaluation.health is not model.Health.UNKNOWN
        phase = lifecycle.shown_phase(phase, evaluation.items if judged and evaluation is not None else None)
        view = ResourceView(
            deployment=deployment,
            phase=phase,
            endpoint=naming.endpoint(
                deployment.resource_type, deployment.namespace, deployment.resource_name
            ),
            port=naming.port(self._catalog, deployment.resource_type, deployment.desired_spec.engine),
            connection_secret=naming.secret_name(deployment.resource_type, deployment.resource_name),
            message=_message(deployment, phase, evaluation),
            evaluation=evaluation,
        )
        if deployment.phase is model.Phase.DELETED:
            self._views.pop(deployment.deployment_id, None)
        else:
            self._views[deployment.deployment_id] = view
        return view, reusable


class _KeptPages:
    """The most recently read pages, each valid while the version it was read at is current.

    Bounded by the items the pages hold (a page of one counts as two), so that thousands of
    managers each polling its own resource are kept as well as a few polling whole namespaces.
    """

    def __init__(self, max_items: int = 20_000) -> None:
        self._max_items = max_items
        self._items = 0
        self._keys: dict[int, Hashable] = {}  # by the identity of each kept page
        self._pages: collections.OrderedDict[Hashable, tuple[Hashable, model.Page[ResourceView]]] = (
            collections.OrderedDict()
        )

    def holds(self, page: model.Page[ResourceView]) -> bool:
        """Whether ``page`` is one of the kept pages (handed out again while it is current)."""
        key = self._keys.get(id(page))
        return key is not None and self._pages[key][1] is page

    def get(self, key: Hashable, version: Hashable | None) -> model.Page[ResourceView] | None:
        kept = self._pages.get(key)
        if version is None or kept is None or kept[0] != version:
            return None
        self._pages.move_to_end(key)
        return kept[1]

    def put(self, key: Hashable, version: Hashable | None, page: model.Page[ResourceView]) -> None:
        if version is None:
            return
        self._drop(self._pages.pop(key, None))
        self._pages[key] = (version, page)
        self._keys[id(page)] = key
        self._items += len(page.items) + 1
        while self._items > self._max_items and len(self._pages) > 1:
            self._drop(self._pages.popitem(last=False)[1])

    def _drop(self, kept: tuple[Hashable, model.Page[ResourceView]] | None) -> None:
        if kept is not None:
            self._items -= len(kept[1].items) + 1
            del self._keys[id(kept[1])]


_SNAPSHOT_PHASES = tuple(p for p in model.Phase if p is not model.Phase.DELETED)


def _matches(deployment: model.Deployment, request: WatchInput) -> bool:
    return (
        (request.resource_type is None or deployment.resource_type is request.resource_type)
        and (not request.resource_name or deployment.resource_name == request.resource_name)
        and (not request.deployment_id or deployment.deployment_id == request.deployment_id)
    )


def _accepted_spec(
    desired: model.ResourceSpec, actual: model.ResourceSpec, fields: set[str], catalog: catalog_mod.Catalog
) -> tuple[model.ResourceSpec, list[str]]:
    """The desired spec with the accepted fields taken from the actual one, and which were taken."""
    spec = desired
    accepted: list[str] = []
    if "replicas" in fields and actual.replicas is not None:
        spec = dataclasses.replace(spec, replicas=actual.replicas)
        accepted.append("replicas")
    if "version" in fields and actual.version:
        spec = dataclasses.replace(spec, version=actual.version)
        accepted.append("version")
    if "size" in fields and actual.size in catalog.sizes:
        spec = dataclasses.replace(spec, size=actual.size, resources=catalog.sizes[actual.size])
        accepted.append("size")
    if desired.topic is not None and actual.topic is not None:
        topic = desired.topic
        if "partitions" in fields:
            topic = dataclasses.replace(topic, partitions=actual.topic.partitions)
            accepted.append("partitions")
        if "retention_ms" in fields:
            topic = dataclasses.replace(topic, retention_ms=actual.topic.retention_ms)
            accepted.append("retention_ms")
        spec = dataclasses.replace(spec, topic=topic)
    return spec, accepted


def _message(deployment: model.Deployment, phase: model.Phase, evaluation: drift.Evaluation | None) -> str:
    op = deployment.last_operation
    if phase is model.Phase.PENDING:
        return f"Accepted generation {deployment.generation}; the workload has not been created yet"
    if phase is model.Phase.PROVISIONING:
        waiting = op.message if op.message.startswith("retrying: ") else ""
        return f"Provisioning generation {deployment.generation}" + (f"; {waiting}" if waiting else "")
    if phase is model.Phase.FAILED:
        return f"Provisioning failed: {op.message}"
    if phase is model.Phase.DELETING:
        return "Deletion accepted; the workload is being removed"
    if evaluation is not None and evaluation.health is model.Health.UNKNOWN:
        return "The cluster cannot be read; the last known desired state is shown"
    if phase is model.Phase.DRIFT_DETECTED and evaluation is not None:
        return "Unexpected drift: " + "; ".join(i.message for i in evaluation.unexpected)
    if evaluation is not None and evaluation.health is not model.Health.HEALTHY:
        # Not the last operation's words ("... is running and healthy"): they may be stale now.
        return f"Running; health is {evaluation.health.value}"
    return op.message


class _audited:
    """Context manager writing one audit line per mutating call: who, what, which resource, result.

    The ``record`` callable it yields adds the outcome's details; an exception is logged with its
    class and re-raised. No request content beyond identities goes into the line.
    """

    def __init__(self, principal: auth.Principal, action: str, namespace: str, target: str) -> None:
        self._fields: dict[str, object] = {
            "principal": principal.name,
            "action": action,
            "namespace": namespace,
            "resource": target,
        }

    def __enter__(self) -> Callable[..., None]:
        return self._record

    def _record(self, **details: object) -> None:
        self._fields.update(details)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if exc is None:
            self._fields.setdefault("outcome", "ok")
            audit_log.info("audit", extra={"audit": dict(self._fields, result="ok")})
        elif isinstance(exc, errors.BrokerError):
            audit_log.info("audit", extra={"audit": dict(self._fields, result="rejected", error=exc.reason)})
        else:
            audit_log.error(
                "audit", extra={"audit": dict(self._fields, result="error", error=type(exc).__name__)}
            )

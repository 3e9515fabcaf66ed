"""An async client for the resource broker, for manager services.

::

    async with await BrokerClient.connect("broker:50051", token=TOKEN) as broker:
        reply = await broker.provision(
            namespace="team-platform", resource_type="database", resource_name="postgres-app-db",
            engine="postgresql", version="15", size="medium", callback_url="http://manager/v1/callback",
        )
        state = await broker.wait_ready(reply.deployment_id, namespace="team-platform")
        async for message in broker.watch_drift(namespaces=["team-platform"]):
            ...  # one unbroken stream: reconnects and resumes by itself

Every call has a deadline. Idempotent unary calls (reads, and Provision/Deprovision, which always
carry a request id) are retried on UNAVAILABLE by gRPC itself through the channel's service
config. Failures surface as the typed exceptions of ``broker_client.errors``.

Enum arguments (``resource_type``, ``mode``, ``kinds``, ``data_policy``) take the seed's lowercase
spelling (``"database"``, ``"auto"``, ``"drift_detected"``, ``"keep"``; case, ``_`` and ``-`` do not
matter, and the full proto name ``"RESOURCE_TYPE_DATABASE"`` works too) or the proto enum value
(``pb.RESOURCE_TYPE_DATABASE``); anything else is a ``ValueError`` before any call is made.

List calls (``get_resource_state``, ``list_drift_events``) return a ``Page``: its ``items``, the
``next_page_token`` that continues it and the ``total`` where the broker counts one. A ``Page`` is a
sequence of its items, so ``for state in page``, ``page[0]`` and ``len(page)`` work.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import random
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar, overload

import grpc
from google.protobuf import descriptor, json_format

from broker_client import errors
from broker_client.v1 import broker_pb2 as pb
from broker_client.v1 import broker_pb2_grpc

_SERVICE = "broker.v1.BrokerService"
_RETRIED = (
    "GetResourceState",
    "GetDeployment",
    "ListDriftEvents",
    "GetRemediationPolicy",
    "GetCostBudget",
    "GetCostSummary",
    "Provision",
    "Deprovision",
)
SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{"service": _SERVICE, "method": m} for m in _RETRIED],
                "retryPolicy": {
                    "maxAttempts": 5,
                    "initialBackoff": "0.1s",
                    "maxBackoff": "2s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)
# A stream ends with these when the broker restarts or is unreachable: resume, don't fail.
_RESUMABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL)
# RESOURCE_EXHAUSTED is resumable only when this reader fell behind, not when a limit was hit.
_TOO_SLOW = "SUBSCRIBER_TOO_SLOW"

T = TypeVar("T")

# What an enum argument may be: the seed's spelling ("database") or the proto enum value.
EnumArg = str | int


def _enum_number(
    value: EnumArg | None,
    enum: descriptor.EnumDescriptor,
    *,
    prefix: str,
    what: str,
    required: bool,
) -> int:
    """The proto number of an enum argument given by name or number.

    Names are matched without the proto prefix, ignoring case, ``_`` and ``-``: "database",
    "DATABASE" and "RESOURCE_TYPE_DATABASE" are one value. None (and the proto's UNSPECIFIED)
    mean "not given", which is a ValueError when the argument is ``required``.
    """
    numbers = {v.name.removeprefix(prefix).replace("_", ""): v.number for v in enum.values}
    choices = ", ".join(repr(v.name.removeprefix(prefix).lower()) for v in enum.values if v.number != 0)
    number: int | None = None
    if value is None:
        number = 0
    elif isinstance(value, bool):
        pass  # an int to Python, never an enum value to a caller
    elif isinstance(value, int):
        number = value if value in numbers.values() else None
    elif isinstance(value, str):
        key = value.strip().upper().replace("-", "_").removeprefix(prefix).replace("_", "")
        number = numbers.get(key)
    if number is None:
        raise ValueError(f"unknown {what} {value!r}: use one of {choices} or a {enum.name} value")
    if number == 0 and required:
        raise ValueError(f"{what} is required: use one of {choices} or a {enum.name} value")
    return number


def resource_type_number(value: EnumArg | None, *, required: bool = False) -> pb.ResourceType.ValueType:
    """A resource type from its name ("database") or proto value; None is unspecified (all types)."""
    return pb.ResourceType.ValueType(
        _enum_number(
            value,
            pb.ResourceType.DESCRIPTOR,
            prefix="RESOURCE_TYPE_",
            what="resource type",
            required=required,
        )
    )


def remediation_mode_number(value: EnumArg) -> pb.RemediationMode.ValueType:
    """A remediation mode from its name ("auto", "alert", "approve", "off") or proto value."""
    return pb.RemediationMode.ValueType(
        _enum_number(
            value, pb.RemediationMode.DESCRIPTOR, prefix="REMEDIATION_MODE_", what="mode", required=True
        )
    )


def event_kind_number(value: EnumArg) -> pb.DriftEventKind.ValueType:
    """A drift event kind from its name ("drift_detected", "DriftDetected") or proto value."""
    return pb.DriftEventKind.ValueType(
        _enum_number(
            value, pb.DriftEventKind.DESCRIPTOR, prefix="DRIFT_EVENT_KIND_", what="event kind", required=True
        )
    )


def data_policy_number(value: EnumArg | None) -> pb.DataPolicy.ValueType:
    """A data policy from its name ("keep", "delete") or proto value; None is the broker's default."""
    return pb.DataPolicy.ValueType(
        _enum_number(
            value, pb.DataPolicy.DESCRIPTOR, prefix="DATA_POLICY_", what="data policy", required=False
        )
    )


# Kept for callers of the earlier private helper.
_type_number = resource_type_number


@dataclasses.dataclass(frozen=True, eq=False)
class Page(Sequence[T]):
    """One page of a list call, and a read-only sequence of its ``items``.

    ``next_page_token`` continues the listing (pass it as ``page_token`` with the same filters);
    it is empty on the last page, and always when the call read every page. ``total`` is the number
    of matches across all pages where the broker counts them (GetResourceState), else None.

    A page compares equal to a list or tuple of the same items, so code written when these calls
    returned plain lists (``assert await client.get_resource_state(ns) == []``) keeps working.
    """

    items: tuple[T, ...] = ()
    next_page_token: str = ""
    total: int | None = None

    @overload
    def __getitem__(self, index: int) -> T: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[T]: ...

    def __getitem__(self, index: int | slice) -> T | Sequence[T]:
        return self.items[index]

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[T]:
        return iter(self.items)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Page):
            return (self.items, self.next_page_token, self.total) == (
                other.items,
                other.next_page_token,
                other.total,
            )
        if isinstance(other, (list, tuple)):
            return list(self.items) == list(other)
        return NotImplemented


# The largest page the broker serves; reading "all pages" uses it to make few round trips.
_MAX_PAGE_SIZE = 1000


class BrokerClient:
    """A connection to one broker; create with ``connect``, close with ``close`` or ``async with``."""

    def __init__(self, channel: grpc.aio.Channel, *, token: str | None, deadline: float) -> None:
        self._channel = channel
        self._stub = broker_pb2_grpc.BrokerServiceStub(channel)
        self._metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()
        self._deadline = deadline

    @classmethod
    async def connect(
        cls,
        target: str,
        *,
        token: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        certificate_chain: bytes | None = None,
        private_key: bytes | None = None,
        deadline: float = 10.0,
    ) -> BrokerClient:
        """Open a channel to ``target`` (``host:port``); ``tls`` for a TLS-terminated broker.

        ``root_certificates`` verifies the broker (system roots when None); ``certificate_chain`` and
        ``private_key`` present a client certificate to a broker that requires one (mTLS).

        ``deadline`` is how long each unary call may take, retries included.
        """
        options = [("grpc.service_config", SERVICE_CONFIG), ("grpc.enable_retries", 1)]
        if tls:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=root_certificates,
                private_key=private_key,
                certificate_chain=certificate_chain,
            )
            channel = grpc.aio.secure_channel(target, credentials, options=options)
        else:
            channel = grpc.aio.insecure_channel(target, options=options)
        return cls(channel, token=token, deadline=deadline)

    async def close(self) -> None:
        """Close the channel (ending open streams)."""
        await self._channel.close()

    async def __aenter__(self) -> BrokerClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, method: Any, request: Any) -> Any:
        try:
            return await method(request, metadata=self._metadata, timeout=self._deadline)
        except grpc.RpcError as e:
            raise errors.from_rpc_error(e) from e

    async def provision(
        self,
        *,
        namespace: str,
        resource_type: EnumArg,
        resource_name: str,
        engine: str,
        version: str = "",
        size: str = "",
        replicas: int | None = None,
        partitions: int | None = None,
        retention_ms: int | None = None,
        callback_url: str = "",
        request_id: str | None = None,
    ) -> pb.ProvisionResponse:
        """Create or update a resource; answers at once with its deployment id.

        A request id is generated when none is given, so a retried call is never applied twice.
        ``wait_ready(reply.deployment_id, namespace=...)`` then waits for the workload.
        """
        spec = pb.ResourceSpec(engine=engine, version=version, size=size)
        if replicas is not None:
            spec.replicas = replicas
        if partitions is not None or retention_ms is not None:
            spec.topic.CopyFrom(pb.TopicSpec(partitions=partitions or 0, retention_ms=retention_ms or 0))
        request = pb.ProvisionRequest(
            namespace=namespace,
            resource_type=resource_type_number(resource_type, required=True),
            resource_name=resource_name,
            spec=spec,
            callback_url=callback_url,
            request_id=request_id or str(uuid.uuid4()),
        )
        reply: pb.ProvisionResponse = await self._call(self._stub.Provision, request)
        return reply

    async def get_resource_state(
        self,
        namespace: str,
        *,
        resource_type: EnumArg | None = None,
        resource_name: str = "",
        deployment_id: str = "",
        page_size: int | None = None,
        page_token: str = "",
    ) -> Page[pb.ResourceState]:
        """The matching resources of a namespace, as a ``Page`` with the broker's ``total``.

        Without ``page_size`` every page is read and returned as one; with it, one page of at most
        that many resources from ``page_token``, whose ``next_page_token`` continues the listing.
        """

        async def one(size: int, token: str) -> tuple[Sequence[pb.ResourceState], str, int | None]:
            reply: pb.GetResourceStateResponse = await self._call(
                self._stub.GetResourceState,
                pb.GetResourceStateRequest(
                    namespace=namespace,
                    resource_type=resource_type_number(resource_type),
                    resource_name=resource_name,
                    deployment_id=deployment_id,
                    page_size=size,
                    page_token=token,
                ),
            )
            return reply.resources, reply.next_page_token, reply.total

        return await _paged(one, page_size=page_size, page_token=page_token)

    async def get_deployment(self, namespace: str, deployment_id: str) -> pb.Deployment:
        """One deployment: desired spec, phase, last operation."""
        reply: pb.GetDeploymentResponse = await self._call(
            self._stub.GetDeployment,
            pb.GetDeploymentRequest(namespace=namespace, deployment_id=deployment_id),
        )
        return reply.deployment

    async def deprovision(
        self,
        namespace: str,
        deployment_id: str,
        *,
        data_policy: EnumArg | None = None,
        delete_data: bool = False,
        request_id: str | None = None,
    ) -> pb.DeprovisionResponse:
        """Delete a resource; its volumes are kept unless ``data_policy="delete"``.

        ``delete_data=True`` is the older spelling of ``data_policy="delete"``.
        """
        policy = data_policy_number(data_policy)
        if delete_data:
            if policy == pb.DATA_POLICY_KEEP:
                raise ValueError("delete_data=True contradicts data_policy='keep'")
            policy = pb.DATA_POLICY_DELETE
        reply: pb.DeprovisionResponse = await self._call(
            self._stub.Deprovision,
            pb.DeprovisionRequest(
                namespace=namespace,
                deployment_id=deployment_id,
                data_policy=policy or pb.DATA_POLICY_KEEP,
                request_id=request_id or str(uuid.uuid4()),
            ),
        )
        return reply

    async def list_drift_events(
        self,
        namespace: str,
        *,
        deployment_id: str = "",
        kinds: Iterable[EnumArg] = (),
        page_size: int | None = None,
        page_token: str = "",
    ) -> Page[pb.DriftEvent]:
        """The drift history of a namespace or deployment, oldest first, as a ``Page``.

        Paged like ``get_resource_state``; ``total`` is None (the broker does not count events).
        """
        wanted = [event_kind_number(k) for k in kinds]

        async def one(size: int, token: str) -> tuple[Sequence[pb.DriftEvent], str, int | None]:
            reply: pb.ListDriftEventsResponse = await self._call(
                self._stub.ListDriftEvents,
                pb.ListDriftEventsRequest(
                    namespace=namespace,
                    deployment_id=deployment_id,
                    kinds=wanted,
                    page_size=size,
                    page_token=token,
                ),
            )
            return reply.events, reply.next_page_token, None

        return await _paged(one, page_size=page_size, page_token=page_token)

    async def accept_drift(
        self, namespace: str, deployment_id: str, fields: Sequence[str] = ()
    ) -> pb.AcceptDriftResponse:
        """Make observed values the desired state."""
        reply: pb.AcceptDriftResponse = await self._call(
            self._stub.AcceptDrift,
            pb.AcceptDriftRequest(namespace=namespace, deployment_id=deployment_id, fields=list(fields)),
        )
        return reply

    async def set_remediation_policy(
        self,
        namespace: str,
        *,
        mode: EnumArg,
        resource_type: EnumArg | None = None,
        ignore_fields: Iterable[str] = (),
        maintenance_window: pb.MaintenanceWindow | None = None,
    ) -> pb.RemediationPolicy:
        """Set auto / alert / approve / off for a namespace (and type), with fields to ignore and
        an optional maintenance window (``pb.MaintenanceWindow(cron=..., duration=..., time_zone=...)``)."""
        policy = pb.RemediationPolicy(
            namespace=namespace,
            resource_type=resource_type_number(resource_type),
            mode=remediation_mode_number(mode),
            ignore_fields=list(ignore_fields),
        )
        if maintenance_window is not None:
            policy.maintenance_window.CopyFrom(maintenance_window)
        reply: pb.SetRemediationPolicyResponse = await self._call(
            self._stub.SetRemediationPolicy, pb.SetRemediationPolicyRequest(policy=policy)
        )
        return reply.policy

    async def get_remediation_policy_window(
        self, namespace: str, *, resource_type: EnumArg | None = None
    ) -> pb.GetRemediationPolicyResponse:
        """The policy in effect with its current or next maintenance window (when it has one)."""
        reply: pb.GetRemediationPolicyResponse = await self._call(
            self._stub.GetRemediationPolicy,
            pb.GetRemediationPolicyRequest(
                namespace=namespace, resource_type=resource_type_number(resource_type)
            ),
        )
        return reply

    async def list_pending_remediations(
        self, namespace: str, *, deployment_id: str = "", include_decided: bool = False
    ) -> Sequence[pb.PendingRemediation]:
        """The remediations of a namespace that wait for approval (and decided ones, if asked)."""
        reply: pb.ListPendingRemediationsResponse = await self._call(
            self._stub.ListPendingRemediations,
            pb.ListPendingRemediationsRequest(
                namespace=namespace, deployment_id=deployment_id, include_decided=include_decided
            ),
        )
        return list(reply.remediations)

    async def approve_remediation(
        self, namespace: str, remediation_id: str, *, request_id: str = "", reason: str = ""
    ) -> pb.PendingRemediation:
        """Approve a pending remediation (needs the approve grant); the broker then carries it out."""
        request = pb.ApproveRemediationRequest(
            namespace=namespace, remediation_id=remediation_id, request_id=request_id, reason=reason
        )
        return await self._decide(self._stub.ApproveRemediation, request)

    async def reject_remediation(
        self, namespace: str, remediation_id: str, *, request_id: str = "", reason: str = ""
    ) -> pb.PendingRemediation:
        """Reject a pending remediation (needs the approve grant); the drift stays."""
        request = pb.RejectRemediationRequest(
            namespace=namespace, remediation_id=remediation_id, request_id=request_id, reason=reason
        )
        return await self._decide(self._stub.RejectRemediation, request)

    async def _decide(self, method: Any, request: Any) -> pb.PendingRemediation:
        """Approve or reject: both answer the decided remediation."""
        reply = await self._call(method, request)
        remediation: pb.PendingRemediation = reply.remediation
        return remediation

    async def get_remediation_policy(
        self, namespace: str, *, resource_type: EnumArg | None = None
    ) -> pb.RemediationPolicy:
        """The policy in effect for a namespace (and type): the default when none was set."""
        reply: pb.GetRemediationPolicyResponse = await self._call(
            self._stub.GetRemediationPolicy,
            pb.GetRemediationPolicyRequest(
                namespace=namespace, resource_type=resource_type_number(resource_type)
            ),
        )
        return reply.policy

    async def admission_policy(self, *, mode: str = "") -> tuple[list[dict[str, Any]], bool]:
        """The drift-prevention ValidatingAdmissionPolicies and bindings, and whether the broker applies them.

        ``mode`` overrides the broker's ``--drift-prevention`` setting (``"deny"``,
        ``"warn,labels=audit"``). Needs a principal granted every namespace.
        """
        reply: pb.GetAdmissionPolicyResponse = await self._call(
            self._stub.GetAdmissionPolicy, pb.GetAdmissionPolicyRequest(mode=mode)
        )
        return [json_format.MessageToDict(o) for o in reply.objects], reply.applied

    async def set_cost_budget(self, namespace: str, monthly_budget: float | None) -> pb.CostBudget:
        """Set a namespace's monthly cost budget; None removes the one set through the API.

        Returns the budget in effect afterwards (a configured one, once the API's is removed).
        """
        budget = pb.CostBudget(namespace=namespace)
        if monthly_budget is not None:
            budget.monthly_budget = monthly_budget
        reply: pb.SetCostBudgetResponse = await self._call(
            self._stub.SetCostBudget, pb.SetCostBudgetRequest(budget=budget)
        )
        return reply.budget

    async def get_cost_budget(self, namespace: str) -> pb.CostBudget:
        """The budget in effect for a namespace (``monthly_budget`` unset when it has none)."""
        reply: pb.GetCostBudgetResponse = await self._call(
            self._stub.GetCostBudget, pb.GetCostBudgetRequest(namespace=namespace)
        )
        return reply.budget

    async def get_cost_summary(self, namespace: str, *, max_drifts: int = 0) -> pb.GetCostSummaryResponse:
        """A namespace's desired against actual monthly cost, its budget, and the costliest drifts."""
        reply: pb.GetCostSummaryResponse = await self._call(
            self._stub.GetCostSummary, pb.GetCostSummaryRequest(namespace=namespace, max_drifts=max_drifts)
        )
        return reply

    async def wait_ready(
        self,
        deployment_id: str,
        *,
        namespace: str,
        timeout: float | None = None,  # noqa: ASYNC109 - the wait's own budget, as in asyncio.wait_for
    ) -> pb.ResourceState:
        """Wait until a deployment is Ready and return its state (endpoint, port, secret name...).

        Returns at once when it is Ready already, or DriftDetected (which only ever follows Ready:
        it runs, but someone changed it; the state says how). Raises ``errors.ProvisioningFailed``
        when it is Failed or being deleted, ``errors.NotFound`` when the namespace has no such
        deployment (or it was deleted), and ``errors.WaitTimeout`` (a ``TimeoutError``) after
        ``timeout`` seconds (None: as long as it takes; the broker itself fails provisioning after
        its ``--ready-timeout``). After an update, the broker reports the new generation as
        Pending/Provisioning from the moment Provision answers, so the wait is for that generation.

        How it avoids the race with an early Ready: it opens one ``WatchDrift`` stream with
        ``send_initial_state`` filtered on the deployment id, and decides on the snapshot, then on
        the live events. Reading first with ``GetResourceState`` and then watching is not safe: a
        read carries no log position, so a live-only watch opened after it starts at "now", and a
        Ready committed between the read and the subscription is in neither (the read predates
        it, the watch postdates it); the caller waits forever for a resource that is Ready.
        Opening a live watch first and reading afterwards would be safe too, but needs two calls
        and a wait for the subscription to be established. The snapshot does both in the right
        order on the server: it subscribes, then reads, and its ``snapshot_complete`` names the
        log sequence that read is consistent with; live events follow from exactly there on the
        same stream, and a reconnect resumes after the last sequence seen (``watch_drift``).
        """
        timer = asyncio.timeout(timeout)
        try:
            async with timer:
                return await self._wait_ready(deployment_id, namespace=namespace)
        except TimeoutError:
            if not timer.expired():
                raise
            raise errors.WaitTimeout(
                f"deployment {deployment_id} in namespace {namespace!r} was not Ready within {timeout:g} s",
                deployment_id=deployment_id,
            ) from None

    async def _wait_ready(self, deployment_id: str, *, namespace: str) -> pb.ResourceState:
        seen = False
        stream = self.watch_drift(
            namespaces=[namespace], deployment_id=deployment_id, send_initial_state=True
        )
        async with contextlib.aclosing(stream):
            async for message in stream:
                which = message.WhichOneof("message")
                if which == "initial_state":
                    state = message.initial_state
                    seen = True
                    _raise_if_failed(state.phase, state.message, state, deployment_id)
                    if state.phase in _READY:
                        return state
                elif which == "snapshot_complete" and not seen:
                    raise errors.NotFound(
                        f"no deployment {deployment_id} in namespace {namespace!r}",
                        code=grpc.StatusCode.NOT_FOUND,
                    )
                elif which == "event":
                    event = message.event
                    if event.kind == pb.DRIFT_EVENT_KIND_PROVISIONING_FAILED:
                        _raise_if_failed(pb.STATE_FAILED, event.message, event, deployment_id)
                    _raise_if_failed(event.phase, event.message, event, deployment_id)
                    if event.kind == pb.DRIFT_EVENT_KIND_PROVISIONING_SUCCEEDED or event.phase in _READY:
                        found = await self.get_resource_state(namespace, deployment_id=deployment_id)
                        if not found:
                            raise errors.NotFound(
                                f"deployment {deployment_id} in namespace {namespace!r} is gone",
                                code=grpc.StatusCode.NOT_FOUND,
                            )
                        return found[0]
        raise errors.Unavailable(  # watch_drift does not end by itself; the broker ended it cleanly
            f"the drift stream ended before deployment {deployment_id} was Ready",
            code=grpc.StatusCode.UNAVAILABLE,
        )

    async def watch_drift(
        self,
        *,
        namespaces: Sequence[str] = (),
        resource_type: EnumArg | None = None,
        resource_name: str = "",
        deployment_id: str = "",
        kinds: Iterable[EnumArg] = (),
        send_initial_state: bool = False,
        after_sequence: int | None = None,
        heartbeats: bool = False,
        max_backoff: float = 10.0,
    ) -> AsyncGenerator[pb.WatchDriftResponse, None]:
        """Drift events as one unbroken stream, reconnecting and resuming after the last sequence.

        The broker ends streams resumably when it restarts or when this reader falls behind; the
        iterator then reconnects with backoff and asks for every event after the last one it
        delivered, so nothing is missed and nothing repeats. OutOfRange (the resume point left the
        log) and authorization errors are raised: the caller must re-read the state.
        """
        type_number = resource_type_number(resource_type)
        kind_numbers = [event_kind_number(k) for k in kinds]
        last = after_sequence
        snapshot = send_initial_state
        delay = 0.1
        while True:
            request = pb.WatchDriftRequest(
                namespaces=list(namespaces),
                resource_type=type_number,
                resource_name=resource_name,
                deployment_id=deployment_id,
                kinds=kind_numbers,
                send_initial_state=snapshot,
            )
            if last is not None and not snapshot:
                request.after_sequence = last
            call = self._stub.WatchDrift(request, metadata=self._metadata)
            try:
                async for message in call:
                    delay = 0.1
                    which = message.WhichOneof("message")
                    if which == "event":
                        last = message.event.sequence
                    elif which == "snapshot_complete":
                        last = message.snapshot_complete.sequence
                        snapshot = False
                    elif which == "heartbeat":
                        last = (
                            message.heartbeat.sequence
                            if last is None
                            else max(last, message.heartbeat.sequence)
                        )
                        if not heartbeats:
                            continue
                    yield message
                return  # the server ended the stream cleanly (it does not, normally)
            except grpc.RpcError as e:
                slow = e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and errors.trailers(e)[0] == _TOO_SLOW
                if e.code() not in _RESUMABLE and not slow:
                    raise errors.from_rpc_error(e) from e
            finally:
                call.cancel()
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))  # noqa: S311 - jitter
            delay = min(max_backoff, delay * 2)


# Phases in which a deployment has been provisioned and runs.
_READY = (pb.STATE_READY, pb.STATE_DRIFT_DETECTED)
# Phases from which it will not become Ready (without a new Provision).
_GONE = (pb.STATE_FAILED, pb.STATE_DELETING, pb.STATE_DELETED)


def _raise_if_failed(
    phase: int, message: str, about: pb.ResourceState | pb.DriftEvent, deployment_id: str
) -> None:
    if phase not in _GONE:
        return
    where = f"{about.namespace}/{about.resource_name} ({deployment_id})"
    if phase == pb.STATE_FAILED:
        reason = message.removeprefix("Provisioning failed: ")
        text = f"provisioning of {where} failed: {reason}"
    else:
        text = f"{where} is being deleted or was deleted: it will not become Ready"
    raise errors.ProvisioningFailed(text, deployment_id=deployment_id, generation=about.generation)


async def _paged(
    fetch: Callable[[int, str], Awaitable[tuple[Sequence[T], str, int | None]]],
    *,
    page_size: int | None,
    page_token: str,
) -> Page[T]:
    """One page (``page_size`` given) or every page from ``page_token`` (None) as one ``Page``.

    ``fetch(size, token)`` returns one reply's items, next page token and total.
    """
    if page_size is not None:
        if page_size < 1:
            raise ValueError(f"page_size must be at least 1, not {page_size}")
        items, token, total = await fetch(page_size, page_token)
        return Page(items=tuple(items), next_page_token=token, total=total)
    found: list[T] = []
    token, total = page_token, None
    while True:
        items, token, page_total = await fetch(_MAX_PAGE_SIZE, token)
        found.extend(items)
        total = page_total if total is None else total
        if not token:
            return Page(items=tuple(found), next_page_token="", total=total)

"""The gRPC servicer of broker.v1.BrokerService: authenticate, convert, call the service, convert back.

Errors leave through ``abort``, which attaches a google.rpc.Status (ErrorInfo, BadRequest) in the
``grpc-status-details-bin`` trailer, the way grpcio-status clients and grpcurl read it.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable
from typing import NoReturn, TypeVar

import grpc
from broker_client.v1 import broker_pb2 as pb
from broker_client.v1 import broker_pb2_grpc

from broker import auth, errors, service
from broker.api import convert, status
from broker.domain import model

R = TypeVar("R")


async def abort(context: grpc.aio.ServicerContext, exc: BaseException) -> NoReturn:
    """End the call with the status ``exc`` maps to, its details in the trailers."""
    public = status.public_error(exc)
    rich = status.rich_status(public, convert.proto_spelling)
    # The reason and its details also travel as plain trailers, for clients without the
    # google.rpc protos (the client library reads them to tell a slow reader from a limit).
    trailers = [("grpc-status-details-bin", rich.SerializeToString()), ("broker-error-reason", public.reason)]
    trailers += [(f"broker-{key.replace('_', '-')}", value) for key, value in sorted(public.metadata.items())]
    await context.abort(status.mapping_of(public).grpc_code, rich.message, trailing_metadata=tuple(trailers))
    raise AssertionError("context.abort returned")  # pragma: no cover - abort always raises


def _authorization(context: grpc.aio.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return value if isinstance(value, str) else value.decode()
    return None


class BrokerServicer(broker_pb2_grpc.BrokerServiceServicer):
    """Implements the RPCs on top of ``service.BrokerService``."""

    def __init__(self, *, service: service.BrokerService, authenticator: auth.Authenticator) -> None:
        self._service = service
        self._auth = authenticator
        # The same event goes to every subscriber: convert it once (messages are never mutated).
        self._encoded: collections.OrderedDict[int, pb.WatchDriftResponse] = collections.OrderedDict()

    def _encode(self, item: service.WatchItem) -> pb.WatchDriftResponse:
        if not isinstance(item, model.DriftEvent):
            return convert.watch_item_to_proto(item)
        message = self._encoded.get(item.sequence)
        if message is None:
            message = self._encoded[item.sequence] = convert.watch_item_to_proto(item)
            if len(self._encoded) > 4096:
                self._encoded.popitem(last=False)
        return message

    async def _unary(
        self, context: grpc.aio.ServicerContext, call: Callable[[auth.Principal], Awaitable[R]]
    ) -> R:
        try:
            principal = self._auth.authenticate(_authorization(context))
            return await call(principal)
        except Exception as e:
            await abort(context, e)

    async def Provision(
        self, request: pb.ProvisionRequest, context: grpc.aio.ServicerContext
    ) -> pb.ProvisionResponse:
        """Create or update a resource's desired state."""

        async def call(principal: auth.Principal) -> pb.ProvisionResponse:
            result = await self._service.provision(principal, convert.provision_input(request))
            return convert.provision_response(result)

        return await self._unary(context, call)

    async def GetResourceState(
        self, request: pb.GetResourceStateRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetResourceStateResponse:
        """Read desired and actual state of a namespace's resources."""

        async def call(principal: auth.Principal) -> pb.GetResourceStateResponse:
            page = await self._service.get_resource_state(principal, convert.resource_state_input(request))
            return convert.resource_page_to_proto(request.namespace, page)

        return await self._unary(context, call)

    async def Deprovision(
        self, request: pb.DeprovisionRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeprovisionResponse:
        """Delete a resource's workload."""

        async def call(principal: auth.Principal) -> pb.DeprovisionResponse:
            result = await self._service.deprovision(
                principal,
                namespace=request.namespace,
                deployment_id=request.deployment_id,
                data_policy=convert.data_policy(request.data_policy),
                request_id=request.request_id,
            )
            return convert.deprovision_response(result)

        return await self._unary(context, call)

    async def GetDeployment(
        self, request: pb.GetDeploymentRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetDeploymentResponse:
        """Read one deployment."""

        async def call(principal: auth.Principal) -> pb.GetDeploymentResponse:
            deployment = await self._service.get_deployment(
                principal, namespace=request.namespace, deployment_id=request.deployment_id
            )
            return pb.GetDeploymentResponse(deployment=convert.deployment_to_proto(deployment))

        return await self._unary(context, call)

    async def ListDriftEvents(
        self, request: pb.ListDriftEventsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListDriftEventsResponse:
        """Read the drift history."""

        async def call(principal: auth.Principal) -> pb.ListDriftEventsResponse:
            page = await self._service.list_drift_events(principal, convert.events_input(request))
            return convert.events_page_to_proto(page)

        return await self._unary(context, call)

    async def AcceptDrift(
        self, request: pb.AcceptDriftRequest, context: grpc.aio.ServicerContext
    ) -> pb.AcceptDriftResponse:
        """Make observed values the desired state."""

        async def call(principal: auth.Principal) -> pb.AcceptDriftResponse:
            deployment, accepted = await self._service.accept_drift(
                principal,
                namespace=request.namespace,
                deployment_id=request.deployment_id,
                fields=list(request.fields),
            )
            return pb.AcceptDriftResponse(
                deployment=convert.deployment_to_proto(deployment), accepted_fields=accepted
            )

        return await self._unary(context, call)

    async def SetRemediationPolicy(
        self, request: pb.SetRemediationPolicyRequest, context: grpc.aio.ServicerContext
    ) -> pb.SetRemediationPolicyResponse:
        """Set how drift is handled for a namespace and type."""

        async def call(principal: auth.Principal) -> pb.SetRemediationPolicyResponse:
            rule = await self._service.set_policy(principal, convert.rule_from_proto(request.policy))
            return pb.SetRemediationPolicyResponse(policy=convert.rule_to_proto(rule))

        return await self._unary(context, call)

    async def GetRemediationPolicy(
        self, request: pb.GetRemediationPolicyRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetRemediationPolicyResponse:
        """Read the policy in effect."""

        async def call(principal: auth.Principal) -> pb.GetRemediationPolicyResponse:
            rule = self._service.get_policy(
                principal,
                namespace=request.namespace,
                resource_type=convert.resource_type(request.resource_type),
            )
            return pb.GetRemediationPolicyResponse(policy=convert.rule_to_proto(rule))

        return await self._unary(context, call)

    # grpc.aio serves a streaming method that writes itself; the generated stub only knows iterators.
    async def WatchDrift(  # type: ignore[override]
        self, request: pb.WatchDriftRequest, context: grpc.aio.ServicerContext
    ) -> None:
        """Stream drift events: optional snapshot, then live events, resumable after a sequence.

        Each message goes to the transport with a deadline: a subscriber whose transport has not
        taken a message for ``max_lag_seconds`` (its flow-control window and socket buffers are
        full: it stopped reading) is cut off with a resumable RESOURCE_EXHAUSTED. The message being
        written stays queued ahead of the status, so the resume sequence includes it.
        """
        position: int | None = None
        try:
            principal = self._auth.authenticate(_authorization(context))
            async for item in self._service.watch(principal, convert.watch_input(request)):
                write = asyncio.ensure_future(context.write(self._encode(item)))
                if not isinstance(item, service.ResourceView):
                    position = item.sequence
                try:
                    await asyncio.wait((write,), timeout=self._service.watch_limits.max_lag_seconds)
                finally:
                    if not write.done():  # cut off below, or the call was cancelled meanwhile
                        write.add_done_callback(_forget)
                if not write.done():
                    raise _too_slow(self._service.watch_limits.max_lag_seconds, position)
                write.result()
        except Exception as e:
            await abort(context, e)


def _forget(write: asyncio.Future[None]) -> None:
    """The write of a stream already ended: its outcome no longer matters to anyone."""
    if not write.cancelled():
        write.exception()


def _too_slow(lag: float, position: int | None) -> errors.ResourceExhausted:
    if position is None:
        # Cut off inside the snapshot: there is no resume point, only a fresh snapshot.
        return errors.ResourceExhausted(
            f"this stream took no message for {lag:g} s during its snapshot and was cut off; "
            "watch again with send_initial_state",
            reason="SUBSCRIBER_TOO_SLOW",
        )
    return errors.ResourceExhausted(
        f"this stream took no message for {lag:g} s and was cut off; resume with after_sequence={position}",
        reason="SUBSCRIBER_TOO_SLOW",
        metadata={"resume_after_sequence": str(position)},
    )

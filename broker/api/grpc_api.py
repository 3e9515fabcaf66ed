"""The gRPC side of broker.v1.BrokerService: one method per row of ``rpcs.TABLE``, plus WatchDrift.

Each call authenticates from the ``authorization`` metadata and runs the row's handler.

Errors leave through ``abort``, which attaches a google.rpc.Status (ErrorInfo, BadRequest) in the
``grpc-status-details-bin`` trailer, the way grpcio-status clients and grpcurl read it.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

import grpc
from broker_client.v1 import broker_pb2 as pb
from google.protobuf import message

from broker import auth, errors, service
from broker.api import convert, rpcs, status
from broker.domain import model


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


SERVICE_NAME = pb.DESCRIPTOR.services_by_name["BrokerService"].full_name


class BrokerServicer:
    """Serves broker.v1.BrokerService: the unary RPCs of ``rpcs.TABLE``, and WatchDrift."""

    def __init__(self, *, service: service.BrokerService, authenticator: auth.Authenticator) -> None:
        self._service = service
        self._auth = authenticator
        # The same event goes to every subscriber: convert it once (messages are never mutated).
        self._encoded: collections.OrderedDict[int, pb.WatchDriftResponse] = collections.OrderedDict()

    def handler(self) -> grpc.GenericRpcHandler:
        """The generic handler of every method, to register on a grpc.aio server."""
        methods = {
            rpc.name: grpc.unary_unary_rpc_method_handler(
                self._unary(rpc), request_deserializer=rpc.request.FromString, response_serializer=_serialize
            )
            for rpc in rpcs.TABLE
        }
        methods["WatchDrift"] = grpc.unary_stream_rpc_method_handler(
            self.WatchDrift,
            request_deserializer=pb.WatchDriftRequest.FromString,
            response_serializer=_serialize,
        )
        return grpc.method_handlers_generic_handler(SERVICE_NAME, methods)

    def _unary(self, rpc: rpcs.Rpc) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]:
        handler, svc, authenticator = rpc.handler, self._service, self._auth

        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                return await handler(svc, authenticator.authenticate(_authorization(context)), request)
            except Exception as e:
                await abort(context, e)

        return call

    def _encode(self, item: service.WatchItem) -> pb.WatchDriftResponse:
        if not isinstance(item, model.DriftEvent):
            return convert.watch_item_to_proto(item)
        message = self._encoded.get(item.sequence)
        if message is None:
            message = self._encoded[item.sequence] = convert.watch_item_to_proto(item)
            if len(self._encoded) > 4096:
                self._encoded.popitem(last=False)
        return message

    async def WatchDrift(self, request: pb.WatchDriftRequest, context: grpc.aio.ServicerContext) -> None:
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


def _serialize(response: message.Message) -> bytes:
    return response.SerializeToString()


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

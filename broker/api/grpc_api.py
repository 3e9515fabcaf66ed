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
from broker.api import convert, encoded, rpcs, status
from broker.domain import model


async def abort(context: grpc.aio.ServicerContext, exc: BaseException) -> NoReturn:
    """End the call with the status ``exc`` maps to, its details in the trailers."""
    public = status.public_error(exc)
    rich = status.rich_status(public, convert.proto_spelling)
    # The reason and its details also travel as plain trailers, for clients without the
    # google.rpc protos (the client library reads them to tell a slow reader from a limit).
    trailers = [("grpc-status-details-bin", rich.SerializeToString()), ("broker-error-reason", public.reason)]
    trailers += [(f"broker-{key.replace('_', '-')}", value) for key, value in sorted(public.metadata.items())]
    code = status.mapping_of(public).grpc_code
    sending = asyncio.ensure_future(context.abort(code, rich.message, trailing_metadata=tuple(trailers)))
    # On a stream whose client stopped reading, the status waits behind the messages flow control
    # holds back: the call must end on the server all the same (its status still reaches the
    # client, after those messages, whenever it reads again).
    await asyncio.wait((sending,), timeout=ABORT_WAIT)
    if sending.done():
        sending.result()  # raises AbortError, as context.abort does
    sending.add_done_callback(_forget)
    raise grpc.aio.AbortError(f"{code.name}: {rich.message}")


# How long an abort waits for its status to be sent before the call ends without waiting for it.
ABORT_WAIT = 1.0


def _authorization(context: grpc.aio.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return value if isinstance(value, str) else value.decode()
    return None


SERVICE_NAME = pb.DESCRIPTOR.services_by_name["BrokerService"].full_name


class _Stalls:
    """The writes under way on the open WatchDrift streams, and one watchdog for all of them.

    A write the transport has not taken for ``lag()`` seconds is cut off (its ``cut_off`` is
    called), within a quarter of the lag (a second at most) after that. One watchdog, not a timer
    per write: at 10,000 deliveries a second, creating and cancelling them was 3.6 % of the broker's
    profile samples (and a heap push and a cancelled handle on the event loop per message).
    """

    def __init__(self, lag: Callable[[], float]) -> None:
        self._lag = lag
        self._open = 0
        self._writing: dict[object, tuple[float, Callable[[], None]]] = {}
        self._watchdog: asyncio.Task[None] | None = None

    def opened(self) -> None:
        """A stream opened: the watchdog runs while any is open."""
        self._open += 1
        if self._watchdog is None:
            self._watchdog = asyncio.get_running_loop().create_task(self._watch())

    def closed(self, stream: object) -> None:
        self._writing.pop(stream, None)
        self._open -= 1
        if not self._open and self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    def writing(self, stream: object, cut_off: Callable[[], None], now: float) -> None:
        self._writing[stream] = (now, cut_off)

    def written(self, stream: object) -> None:
        self._writing.pop(stream, None)  # gone already if the watchdog cut it off

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            lag = self._lag()
            await asyncio.sleep(min(1.0, lag / 4))
            stalled = loop.time() - lag
            for stream, (since, cut_off) in list(self._writing.items()):
                if since <= stalled:
                    del self._writing[stream]
                    cut_off()


class BrokerServicer:
    """Serves broker.v1.BrokerService: the unary RPCs of ``rpcs.TABLE``, and WatchDrift."""

    def __init__(self, *, service: service.BrokerService, authenticator: auth.Authenticator) -> None:
        self._service = service
        self._auth = authenticator
        # The same event goes to every subscriber: convert and serialize it once.
        self._encoded: collections.OrderedDict[int, bytes] = collections.OrderedDict()
        self._stalls = _Stalls(lambda: service.watch_limits.max_lag_seconds)

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

    def _encode(self, item: service.WatchItem) -> pb.WatchDriftResponse | bytes:
        if not isinstance(item, model.DriftEvent):
            return convert.watch_item_to_proto(item)
        message = self._encoded.get(item.sequence)
        if message is None:
            message = self._encoded[item.sequence] = convert.watch_item_to_proto(item).SerializeToString()
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
        lag = self._service.watch_limits.max_lag_seconds
        loop = asyncio.get_running_loop()
        handler = asyncio.current_task()
        writing = False
        cut: errors.BrokerError | None = None

        def cut_off(why: str) -> None:
            # A write that the transport does not take (flow control: the client stopped reading),
            # or the subscription ended meanwhile: stop waiting for it. Its message stays queued
            # ahead of the status, so the resume position includes it.
            nonlocal cut
            if writing and cut is None and handler is not None:
                shutting_down = why == "ended" and self._service.shutting_down
                cut = _shutting_down(position) if shutting_down else _too_slow(lag, position)
                handler.cancel()

        def stalled() -> None:
            cut_off("lag")

        watch = None
        stalls = self._stalls
        stalls.opened()
        try:
            principal = self._auth.authenticate(_authorization(context))
            watch = self._service.watch(
                principal, convert.watch_input(request), on_end=lambda: cut_off("ended")
            )
            async for item in watch:
                if not isinstance(item, service.ResourceView):
                    position = item.sequence
                stalls.writing(handler, stalled, loop.time())
                writing = True
                try:
                    await context.write(self._encode(item))
                except asyncio.CancelledError:
                    if cut is None:
                        raise  # the call itself was cancelled
                    handler.uncancel()  # type: ignore[union-attr]
                    raise cut from None
                finally:
                    writing = False
                    stalls.written(handler)
        except Exception as e:
            if watch is not None:
                await watch.aclose()  # the subscription ends now, not when the generator is collected
            await abort(context, e)
        finally:
            stalls.closed(handler)


def _shutting_down(position: int | None) -> errors.Unavailable:
    resume = {"resume_after_sequence": str(position)} if position is not None else {}
    where = f"; resume with after_sequence={position}" if position is not None else ""
    return errors.Unavailable(f"the broker is shutting down{where}", reason="SHUTTING_DOWN", metadata=resume)


def _serialize(response: message.Message | encoded.Encoded | bytes) -> bytes:
    if isinstance(response, bytes):
        return response  # a drift event, serialized once for all its subscribers
    if isinstance(response, encoded.Encoded):
        return response.proto
    return response.SerializeToString()


def _forget(sending: asyncio.Future[Any]) -> None:
    """A write (or status) of a call already ended: its outcome no longer matters to anyone."""
    if not sending.cancelled():
        sending.exception()


def _too_slow(lag: float, position: int | None) -> errors.ResourceExhausted:
    """The subscriber lags: it was cut off, or its transport took nothing for ``lag`` seconds."""
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

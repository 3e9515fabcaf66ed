"""Request bodies that protobuf cannot parse get INVALID_ARGUMENT, not UNKNOWN and a traceback.

grpc.aio parses a request with the handler's deserializer before any servicer code runs; when
that raises, it answers ``UNKNOWN`` and logs the whole traceback at ERROR, for every such call and
before authentication. That is a log-flood lever (hundreds of bytes of log per five-byte request)
and the wrong status. ``DecodeGuard`` is a server interceptor that takes the parsing over for every
service on the server (the broker's, health, reflection): the handler it returns receives raw
bytes, parses them itself, and answers a body that does not parse with ``INVALID_ARGUMENT`` and a
short message. Such calls are logged in one line, at most once per ``LOG_EVERY`` seconds, with the
number suppressed since the last line.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeAlias

import grpc
from google.protobuf import message as pb_message

from broker import errors

log = logging.getLogger(__name__)

LOG_EVERY = 10.0

Deserializer = Callable[[bytes], Any]
Context: TypeAlias = grpc.aio.ServicerContext


class _Throttle:
    """One log line per ``every`` seconds, counting what it held back."""

    def __init__(self, every: float) -> None:
        self._every = every
        self._next = 0.0
        self._held = 0

    def warn(self, method: str, error: str) -> None:
        now = time.monotonic()
        if now < self._next:
            self._held += 1
            return
        self._next = now + self._every
        held, self._held = self._held, 0
        log.warning(
            "undecodable request body refused",
            extra={"method": method, "error": error[:120], "suppressed_since_last": held},
        )


class DecodeGuard(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Parses request bodies itself, so garbage is INVALID_ARGUMENT (see the module docstring)."""

    def __init__(self, abort: Callable[[grpc.aio.ServicerContext, BaseException], Awaitable[Any]]) -> None:
        self._abort = abort
        self._throttle = _Throttle(LOG_EVERY)
        # Handlers are stateless per method: wrap each once, not on every call.
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        """The method's handler, taking raw bytes."""
        method = str(handler_call_details.method)
        wrapped = self._wrapped.get(method)
        if wrapped is not None:
            return wrapped
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        wrapped = self._wrap(method, handler)
        self._wrapped[method] = wrapped
        return wrapped

    async def _decode(self, method: str, deserialize: Deserializer, raw: bytes, context: Any) -> Any:
        try:
            return deserialize(raw)
        except (pb_message.DecodeError, ValueError, TypeError) as e:
            self._throttle.warn(method, f"{type(e).__name__}: {e}")
            name = method.rsplit("/", 1)[-1]
            await self._abort(
                context,
                errors.InvalidArgument(
                    [
                        errors.FieldViolation(
                            "(body)",
                            f"{len(raw)} bytes that protobuf cannot parse as a {name} request; "
                            "send the message the service's .proto defines",
                        )
                    ],
                    reason="MALFORMED_REQUEST",
                ),
            )

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        deserialize: Deserializer = handler.request_deserializer
        decode = self._decode
        streaming = bool(handler.request_streaming)
        inner = handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream

        async def request_of(raw: Any, context: Context) -> Any:
            if not streaming:
                return await decode(method, deserialize, raw, context)

            async def parsed() -> AsyncIterator[Any]:
                async for one in raw:
                    yield await decode(method, deserialize, one, context)

            return parsed()

        behaviour: Callable[[Any, Context], Any]
        if inspect.isasyncgenfunction(inner):

            async def generator(raw: Any, context: Context) -> AsyncIterator[Any]:
                async for item in inner(await request_of(raw, context), context):
                    yield item

            behaviour = generator
        else:

            async def coroutine(raw: Any, context: Context) -> Any:
                return await inner(await request_of(raw, context), context)

            behaviour = coroutine
        factory = _FACTORIES[(streaming, bool(handler.response_streaming))]
        return factory(behaviour, response_serializer=handler.response_serializer)


_FACTORIES: dict[tuple[bool, bool], Callable[..., grpc.RpcMethodHandler]] = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}

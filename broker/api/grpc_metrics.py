"""The gRPC server's RPC metrics: a server interceptor counting and timing every call."""

from __future__ import annotations

import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from broker import metrics as metrics_mod


class RpcInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Counts and times every RPC of the gRPC server (the gateway counts its own, as transport=http)."""

    def __init__(self, metrics: metrics_mod.Metrics) -> None:
        self._metrics = metrics
        # Handlers are stateless per method: wrap each once, not on every call.
        self._wrapped: dict[str, grpc.RpcMethodHandler | None] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        path = str(handler_call_details.method)
        wrapped = self._wrapped.get(path)
        if wrapped is None:
            wrapped = self._wrapped[path] = self._wrap(path, await continuation(handler_call_details))
        return wrapped

    def _wrap(self, path: str, handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler | None:
        """The handler, counted and timed (unary calls, and streams that write their messages)."""
        if handler is None:
            return None
        method = path.rsplit("/", 1)[-1]
        count = self._metrics.count_rpc
        inner = handler.unary_unary or handler.unary_stream
        if inner is None or inspect.isasyncgenfunction(inner):
            return handler
        default = "UNKNOWN" if handler.unary_unary is not None else "CANCELLED"

        async def counted(request: Any, context: grpc.aio.ServicerContext) -> Any:
            start = time.perf_counter()
            code = "OK"
            try:
                return await inner(request, context)
            except BaseException:
                code = _code(context, default=default)
                raise
            finally:
                count(method, code, "grpc", time.perf_counter() - start)

        factory = (
            grpc.unary_unary_rpc_method_handler
            if handler.unary_unary
            else grpc.unary_stream_rpc_method_handler
        )
        return factory(
            counted,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def _code(context: grpc.aio.ServicerContext, *, default: str) -> str:
    code = context.code()
    return code.name if isinstance(code, grpc.StatusCode) else default

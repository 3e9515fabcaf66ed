"""Graceful drain of the gRPC server on SIGTERM: calls in flight finish, new ones are refused.

``grpc.aio.Server.stop(grace)`` gives the calls whose handler is already running ``grace`` seconds,
but cancels every call it has received and not yet handed to a handler: under load, dozens of
calls that arrived a few milliseconds before SIGTERM ended CANCELLED. ``Drain`` is a server
interceptor that counts the unary calls in flight and, once draining, answers new ones at once with
a resumable UNAVAILABLE ("retry on another replica"); the broker waits until none is in flight
(bounded by the grace period) before it stops the server, so stopping cancels nothing that was
accepted. Streams are ended by the event hub, each with its resume sequence.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from broker import errors


class Drain(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Counts unary calls in flight; refuses new ones while draining."""

    def __init__(self, abort: Callable[[grpc.aio.ServicerContext, BaseException], Awaitable[Any]]) -> None:
        self._abort = abort
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.draining = False
        self._wrapped: dict[str, grpc.RpcMethodHandler | None] = {}

    @property
    def in_flight(self) -> int:
        """Unary calls being handled now."""
        return self._in_flight

    def start(self) -> None:
        """Refuse new calls from now on."""
        self.draining = True

    async def wait_idle(self, within: float) -> bool:
        """Until no unary call is in flight, or ``within`` seconds; whether it got there."""
        try:
            async with asyncio.timeout(within):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        """The method's handler; unary ones counted and refused while draining."""
        path = str(handler_call_details.method)
        if path not in self._wrapped:
            self._wrapped[path] = self._wrap(await continuation(handler_call_details))
        return self._wrapped[path]

    def _wrap(self, handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler | None:
        if handler is None or handler.unary_unary is None:
            return handler
        inner = handler.unary_unary

        async def counted(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if self.draining:
                await self._abort(
                    context,
                    errors.Unavailable(
                        "the broker is shutting down; retry (another replica, or this one once restarted)",
                        reason="SHUTTING_DOWN",
                    ),
                )
            self._in_flight += 1
            self._idle.clear()
            try:
                return await inner(request, context)
            finally:
                self._in_flight -= 1
                if self._in_flight == 0:
                    self._idle.set()

        return grpc.unary_unary_rpc_method_handler(
            counted,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

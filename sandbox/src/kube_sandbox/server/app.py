"""The :class:`ApiServer`: the aiohttp application that puts routing, handlers and watches together.

It owns what is the application's rather than a request's: the middleware that turns
:class:`kube_sandbox.errors.ApiError` into ``Status`` responses (the one place that does), the
fixed routes (``/version``, health, the fault-injection routes) and the settings the sandbox
changes while running (the address discovery advertises, the forced ``410 Gone`` fault). Every
other path goes to :func:`kube_sandbox.server.routing.dispatch`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from kube_sandbox import admission, errors, store, users
from kube_sandbox.server import discovery, handlers, routing, watching, wire

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

log = logging.getLogger(__name__)


class ApiServer:
    """The aiohttp application serving the Kubernetes API from a :class:`store.Store`."""

    def __init__(
        self,
        *,
        st: store.Store,
        metrics: handlers.MetricsProvider,
        bookmark_interval: float,
        before_request: Callable[[web.Request], None],
        fault_routes: Callable[[web.Application], None],
        identities: users.Users | None = None,
        admission_plugin: admission.Admission | None = None,
    ) -> None:
        self.store = st
        self.registry = st.registry
        self.users = identities or users.Users(users.DEFAULT_USERS)
        self.admission = admission_plugin
        self._handlers = handlers.Handlers(st=st, metrics=metrics, admission=admission_plugin)
        self._watches = watching.Watches(st=st, bookmark_interval=bookmark_interval)
        self._before_request = before_request
        self._fault_routes = fault_routes
        self.address = ""

    @property
    def metrics(self) -> handlers.MetricsProvider:
        """Where ``metrics.k8s.io`` pod metrics come from (the simulator)."""
        return self._handlers.metrics

    @metrics.setter
    def metrics(self, value: handlers.MetricsProvider) -> None:
        self._handlers.metrics = value

    @property
    def bookmark_interval(self) -> float:
        """How often idle watches that allow bookmarks get one, in seconds."""
        return self._watches.bookmark_interval

    @bookmark_interval.setter
    def bookmark_interval(self, value: float) -> None:
        self._watches.bookmark_interval = value

    @property
    def forced_gone(self) -> int:
        """How many of the next watches are answered with ``410 Gone`` at once (a fault)."""
        return self._watches.forced_gone

    @forced_gone.setter
    def forced_gone(self, value: int) -> None:
        self._watches.forced_gone = value

    def application(self) -> web.Application:
        """Build the aiohttp application."""
        app = web.Application(middlewares=[self._middleware], client_max_size=16 * 1024 * 1024)
        self._fault_routes(app)
        app.router.add_get("/sandbox/v1/audit", self._audit)
        app.router.add_delete("/sandbox/v1/audit", self._audit_clear)
        app.router.add_get("/version", self._version)
        app.router.add_get("/healthz", self._ok)
        app.router.add_get("/livez", self._ok)
        app.router.add_get("/readyz", self._ok)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        return app

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        response = await self._handle(request, handler)
        review = request.get(handlers.REVIEW_KEY)
        if review is not None and review.warnings and not response.prepared:
            # What kube-apiserver sends for warnings (validationActions: Warn); kubectl prints them.
            for text in review.warnings:
                escaped = text.replace("\\", "\\\\").replace('"', '\\"')
                response.headers.add("Warning", f'299 - "{escaped}"')
        return response

    async def _handle(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            if not request.path.startswith("/sandbox/"):
                self._before_request(request)
                request[handlers.USER_KEY] = self.users.authenticate(request.headers.get("Authorization"))
            return await handler(request)
        except errors.ApiError as exc:
            return wire.error_response(exc)
        except web.HTTPException:
            raise
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception as exc:
            log.exception("sandbox API handler failed on %s %s", request.method, request.path_qs)
            return wire.error_response(errors.InternalError(f"sandbox internal error: {exc}"))

    async def _audit(self, request: web.Request) -> web.Response:
        events = self.admission.audit.events() if self.admission is not None else []
        return wire.json_response({"kind": "EventList", "apiVersion": "audit.k8s.io/v1", "items": events})

    async def _audit_clear(self, request: web.Request) -> web.Response:
        if self.admission is not None:
            self.admission.audit.clear()
        return web.Response(status=204)

    async def _version(self, request: web.Request) -> web.Response:
        return wire.json_response(discovery.SERVER_VERSION)

    async def _ok(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        return await routing.dispatch(
            request,
            registry=self.registry,
            address=self.address,
            verbs=self._handlers,
            watches=self._watches,
        )

"""The /v1 HTTP/JSON gateway: the original design's paths over the same RPC handlers as gRPC.

Every path is a ``Route`` of a row of ``rpcs.TABLE``: the gateway collects the request's fields
(query string or JSON body, plus path parameters), parses them with ``seed_json`` into the very
message the gRPC method takes, runs the row's handler, and renders the answer with the seed's
spellings. Errors, aiohttp's own included, leave through the one error table (``status``).

Paths (all but the probes need ``Authorization: Bearer <token>`` unless the broker runs --insecure):

- ``POST /v1/provision``                       Provision, 202 with ``deploymentId``
- ``GET|POST /v1/resources``                   GetResourceState (query string or JSON body)
- ``GET /v1/deployments/{id}``                 GetDeployment (``?namespace=``)
- ``DELETE /v1/deployments/{id}``              Deprovision (``?namespace=&dataPolicy=&requestId=``), 202
- ``POST /v1/deprovision``                     Deprovision with a JSON body, 202
- ``GET /v1/events``                           ListDriftEvents (``?namespace=&afterSequence=&kinds=``...)
- ``POST /v1/deployments/{id}:acceptDrift``    AcceptDrift
- ``GET|PUT /v1/policies``                     Get/SetRemediationPolicy
- ``GET /v1/openapi.json``                     the OpenAPI document of these paths (``openapi``), public
- ``GET /v1/admission-policy``                 GetAdmissionPolicy (``?mode=``)
- ``GET|PUT /v1/budgets``                      Get/SetCostBudget
- ``GET /v1/costs``                            GetCostSummary (``?namespace=&maxDrifts=``)
- ``GET /healthz``, ``GET /readyz``            liveness and readiness; ``GET /metrics``
- ``/ui/...``                                  the operator's web view (``ui``), same authentication
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import prometheus_client
from aiohttp import web

from broker import auth, errors, metrics, service
from broker.api import encoded, openapi, rpcs, seed_json, status, ui
from broker.domain import catalog as catalog_mod

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _http_error(exc: web.HTTPException, request: web.Request) -> errors.BrokerError:
    """aiohttp's own refusals (no route, wrong method, body too large) as the broker's errors."""
    if exc.status == 404:
        return errors.NotFound(f"no such path: {request.path}", reason="NOT_FOUND")
    if exc.status == 405:
        return errors.MethodNotAllowed(f"{request.method} is not allowed on {request.path}")
    if exc.status == 413:
        return errors.RequestTooLarge(f"the request body is larger than {MAX_BODY_BYTES} bytes")
    return errors.InvalidArgument([errors.FieldViolation("request", exc.reason)], reason="HTTP_ERROR")


class Gateway:
    """The aiohttp application serving /v1, /healthz, /readyz and /metrics."""

    def __init__(
        self,
        *,
        service: service.BrokerService,
        authenticator: auth.Authenticator,
        readiness: Callable[[], Awaitable[str | None]],
        metrics_registry: prometheus_client.CollectorRegistry | None = None,
        rpc_metrics: metrics.Metrics | None = None,
        catalog: catalog_mod.Catalog = catalog_mod.DEFAULT_CATALOG,
    ) -> None:
        self._service = service
        self._auth = authenticator
        self._readiness = readiness
        self._registry = metrics_registry or prometheus_client.CollectorRegistry()
        self._metrics = rpc_metrics
        self._openapi = json.dumps(openapi.document(authentication=not authenticator.insecure)).encode()
        self.app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[self._errors])
        self.app.add_routes(
            [
                web.route(route.method, route.path, self._route(rpc, route))
                for rpc in rpcs.TABLE
                for route in rpc.routes
            ]
            + [
                web.route("GET", openapi.PATH, self.openapi),
                web.get("/healthz", self.healthz),
                web.get("/readyz", self.readyz),
                web.get("/metrics", self.metrics),
                web.get("/ui", self.to_ui),
            ]
        )
        self.app.add_subapp(
            "/ui", ui.OperatorView(service=service, authenticator=authenticator, catalog=catalog).app
        )

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            code, body = status.http_body(_http_error(e, request))
            # A 405 says which methods the path takes (RFC 9110 requires the Allow header).
            allow = {"Allow": e.headers["Allow"]} if code == 405 and "Allow" in e.headers else None
            return web.json_response(body, status=code, headers=allow)
        except Exception as e:  # every other failure leaves as a mapped JSON error
            code, body = status.http_body(status.public_error(e))
            return web.json_response(body, status=code)

    def _route(self, rpc: rpcs.Rpc, route: rpcs.Route) -> Handler:
        svc, authenticator, counted = self._service, self._auth, self._metrics

        async def handle(request: web.Request) -> web.Response:
            start = time.perf_counter()
            code = "OK"
            try:
                principal = authenticator.authenticate(request.headers.get("Authorization"))
                data = await self._json(request) if route.body else self._query(request, route.repeated)
                if route.wrap and isinstance(data, dict) and route.wrap not in data and data:
                    data = {route.wrap: data}
                if isinstance(data, dict):
                    for name, value in request.match_info.items():
                        data.pop(_camel(name), None)
                        data[name] = value
                reply = await rpc.handler(svc, principal, seed_json.parse(data, rpc.request()))
                if isinstance(reply, encoded.Encoded):
                    body = reply.json()
                    return web.Response(body=body, status=route.status, content_type="application/json")
                return web.json_response(seed_json.render(reply), status=route.status)
            except Exception as e:
                code = (
                    status.mapping_of(e).grpc_code.name if isinstance(e, errors.BrokerError) else "INTERNAL"
                )
                raise
            finally:
                if counted is not None:
                    counted.count_rpc(rpc.name, code, "http", time.perf_counter() - start)

        return handle

    @staticmethod
    async def _json(request: web.Request) -> Any:
        if not request.can_read_body:
            raise errors.InvalidArgument([errors.FieldViolation("body", "a JSON body is required")])
        try:
            return json.loads(await request.read())
        except (ValueError, UnicodeDecodeError) as e:
            raise errors.InvalidArgument([errors.FieldViolation("body", f"is not valid JSON: {e}")]) from e
        except RecursionError as e:  # arrays or objects nested deeper than the decoder goes
            raise errors.InvalidArgument(
                [errors.FieldViolation("body", "is not valid JSON: nested too deeply")]
            ) from e

    @staticmethod
    def _query(request: web.Request, repeated: tuple[str, ...] = ()) -> dict[str, Any]:
        data: dict[str, Any] = {}
        for key in request.query:
            values = request.query.getall(key)
            if key in repeated:
                data[key] = [v for value in values for v in value.split(",") if v]
            elif len(values) > 1:
                raise errors.InvalidArgument([errors.FieldViolation(key, "is given more than once")])
            else:
                data[key] = values[0]
        return data

    async def openapi(self, request: web.Request) -> web.Response:
        """The OpenAPI document of /v1, derived from the RPC table; public, as it names no namespace."""
        return web.Response(body=self._openapi, content_type="application/json")

    async def metrics(self, request: web.Request) -> web.Response:
        """Prometheus metrics; they name namespaces, so only a principal granted every namespace may read."""
        principal = self._auth.authenticate(request.headers.get("Authorization"))
        principal.require(auth.ALL_NAMESPACES)
        body = prometheus_client.generate_latest(self._registry)
        return web.Response(body=body, headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST})

    async def to_ui(self, request: web.Request) -> web.Response:
        """``/ui`` is the web view's folder: its page is ``/ui/``."""
        raise web.HTTPPermanentRedirect("/ui/")

    async def healthz(self, request: web.Request) -> web.Response:
        """Liveness: the process serves HTTP."""
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        """Readiness: 200 when every dependency is ready, else 503 naming what is not."""
        problem = await self._readiness()
        if problem:
            return web.json_response({"status": "not ready", "reason": problem}, status=503)
        return web.json_response({"status": "ready"})


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.capitalize() for part in rest)

"""The /v1 HTTP/JSON gateway: the original design's paths over the same service layer as gRPC.

Requests are parsed as proto3 JSON into the very same generated messages the gRPC API takes, then
converted and handed to ``service.BrokerService``; answers are rendered from the same messages.
The only thing the gateway adds is spelling: the original design writes enum values as
``"database"``, ``"Ready"`` and ``"Healthy"`` where proto3 JSON would write
``"RESOURCE_TYPE_DATABASE"``; both spellings are accepted on input, the original one is written.

Paths (all but the probes need ``Authorization: Bearer <token>`` unless the broker runs --insecure):

- ``POST /v1/provision``                 Provision, 202 with ``deploymentId``
- ``GET|POST /v1/resources``             GetResourceState (query string or JSON body)
- ``GET /v1/deployments/{id}``           GetDeployment (``?namespace=``)
- ``DELETE /v1/deployments/{id}``        Deprovision (``?namespace=&dataPolicy=&requestId=``), 202
- ``POST /v1/deprovision``               Deprovision with a JSON body, 202
- ``GET /v1/events``                     ListDriftEvents (``?namespace=&deploymentId=&kinds=``)
- ``GET /healthz``, ``GET /readyz``      liveness and readiness
"""

from __future__ import annotations

import functools
import json
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import prometheus_client
from aiohttp import web
from broker_client.v1 import broker_pb2 as pb
from google.protobuf import descriptor, json_format, message

from broker import auth, errors, service
from broker.api import convert, status

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20

M = TypeVar("M", bound=message.Message)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# Enum spellings -----------------------------------------------------------------------------------


def _enum_prefix(enum_desc: Any) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", enum_desc.name).upper() + "_"


def _spelling(enum_desc: Any, name: str) -> str:
    """The original design's spelling of an enum value: lower case for resource types, else Pascal."""
    rest = name.removeprefix(_enum_prefix(enum_desc))
    if enum_desc.full_name == "broker.v1.ResourceType":
        return rest.lower()
    return "".join(part.capitalize() for part in rest.split("_"))


def _respell(desc: Any, data: dict[str, Any], *, to_seed: bool) -> None:
    """Rewrite enum values in a proto3-JSON dict in place, guided by the message descriptor."""
    for field in desc.fields:
        key = field.json_name if field.json_name in data else field.name
        if key not in data:
            continue
        value = data[key]
        if field.type == descriptor.FieldDescriptor.TYPE_ENUM:
            enum_desc = field.enum_type
            if to_seed and value == enum_desc.values[0].name:
                # Zero (UNSPECIFIED) means "not known yet": absent, rather than an invented value.
                del data[key]
                continue
            respelled = [_respell_enum(enum_desc, v, to_seed=to_seed) for v in _as_list(value)]
            data[key] = respelled if isinstance(value, list) else respelled[0]
        elif (
            field.type == descriptor.FieldDescriptor.TYPE_MESSAGE
            and field.message_type.full_name.startswith("broker.v1.")
        ):
            children = value if isinstance(value, list) else [value]
            for child in children:
                if isinstance(child, dict):
                    _respell(field.message_type, child, to_seed=to_seed)


@functools.cache
def _spellings(enum_desc: Any) -> tuple[dict[str, str], dict[str, str]]:
    """Proto name -> seed spelling, and lower-cased seed spelling -> proto name, per enum (cached)."""
    to_seed = {v.name: _spelling(enum_desc, v.name) for v in enum_desc.values}
    return to_seed, {seed.lower(): name for name, seed in to_seed.items()}


def _respell_enum(enum_desc: Any, value: Any, *, to_seed: bool) -> Any:
    """One enum value in the other spelling; anything unrecognised is left for the parser to reject."""
    if not isinstance(value, str):
        return value
    seeds, names = _spellings(enum_desc)
    return seeds.get(value, value) if to_seed else names.get(value.lower(), value)


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def render(msg: message.Message) -> dict[str, Any]:
    """A message as the original design's JSON: proto3 JSON names, every field, seed enum spellings."""
    data = json_format.MessageToDict(msg, always_print_fields_with_no_presence=True)
    _respell(msg.DESCRIPTOR, data, to_seed=True)
    return data


def parse(data: Any, msg: M) -> M:
    """Parse proto3 JSON (either enum spelling) into ``msg``; anything malformed is InvalidArgument."""
    if not isinstance(data, dict):
        raise errors.InvalidArgument([errors.FieldViolation("body", "must be a JSON object")])
    _respell(msg.DESCRIPTOR, data, to_seed=False)
    try:
        return json_format.ParseDict(data, msg)
    except json_format.ParseError as e:
        raise errors.InvalidArgument([errors.FieldViolation(_field_of(str(e)), _describe(str(e)))]) from e


def _describe(parse_error: str) -> str:
    """A parse error in words a caller can act on: an unknown enum value lists the valid ones."""
    first_line = parse_error.splitlines()[0]
    match = re.search(r"Invalid enum value (\S+) for enum type ([\w.]+)", first_line)
    if match:
        enum_desc = pb.DESCRIPTOR.pool.FindEnumTypeByName(match.group(2))
        valid = [_spelling(enum_desc, v.name) for v in enum_desc.values[1:]]
        return f"{match.group(1)!r} is not a valid value: use one of {', '.join(valid)}"
    return first_line


def _field_of(parse_error: str) -> str:
    """The proto field path (``spec.replicas``) a protobuf JSON parse error is about."""
    unknown = re.search(r'has no field named "(\w+)" at "\w+((?:\.\w+)*)"', parse_error)
    if unknown:
        path = [*unknown.group(2).split(".")[1:], unknown.group(1)]
    elif located := re.search(r" at \w+((?:\.\w+)+)\.?$", parse_error.splitlines()[0]):
        path = located.group(1).split(".")[1:]
    else:
        path = re.findall(r"Failed to parse (\w+) field", parse_error)
    return ".".join(_snake(part) for part in path) or "body"


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


# Handlers -----------------------------------------------------------------------------------------


class Gateway:
    """The aiohttp application serving /v1, /healthz and /readyz."""

    def __init__(
        self,
        *,
        service: service.BrokerService,
        authenticator: auth.Authenticator,
        readiness: Callable[[], Awaitable[str | None]],
        metrics_registry: prometheus_client.CollectorRegistry | None = None,
    ) -> None:
        self._service = service
        self._auth = authenticator
        self._readiness = readiness
        self._registry = metrics_registry or prometheus_client.CollectorRegistry()
        self.app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[self._errors])
        self.app.add_routes(
            [
                web.post("/v1/provision", self.provision),
                web.get("/v1/resources", self.resources_get),
                web.post("/v1/resources", self.resources_post),
                web.get("/v1/deployments/{deployment_id}", self.deployment_get),
                web.delete("/v1/deployments/{deployment_id}", self.deployment_delete),
                web.post("/v1/deprovision", self.deprovision),
                web.get("/v1/events", self.events),
                web.post("/v1/deployments/{deployment_id}:acceptDrift", self.accept_drift),
                web.get("/v1/policies", self.policy_get),
                web.put("/v1/policies", self.policy_put),
                web.get("/healthz", self.healthz),
                web.get("/readyz", self.readyz),
                web.get("/metrics", self.metrics),
            ]
        )

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            # aiohttp's own answers (404 no route, 405, 413 too large) in the same JSON error shape.
            reason = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED", 413: "REQUEST_TOO_LARGE"}.get(
                e.status, "HTTP_ERROR"
            )
            status_name = {404: "NOT_FOUND", 405: "UNIMPLEMENTED", 413: "INVALID_ARGUMENT"}.get(
                e.status, "UNKNOWN"
            )
            message_text = {
                404: f"no such path: {request.path}",
                405: f"{request.method} is not allowed on {request.path}",
                413: f"the request body is larger than {MAX_BODY_BYTES} bytes",
            }.get(e.status, e.reason)
            return web.json_response(
                {
                    "error": {
                        "code": e.status,
                        "status": status_name,
                        "message": message_text,
                        "reason": reason,
                    }
                },
                status=e.status,
            )
        except Exception as e:  # every other failure leaves as a mapped JSON error
            public = status.public_error(e)
            code, body = status.http_body(public)
            return web.json_response(body, status=code)

    def _principal(self, request: web.Request) -> auth.Principal:
        return self._auth.authenticate(request.headers.get("Authorization"))

    @staticmethod
    async def _json(request: web.Request) -> Any:
        if not request.can_read_body:
            raise errors.InvalidArgument([errors.FieldViolation("body", "a JSON body is required")])
        try:
            return json.loads(await request.read())
        except (ValueError, UnicodeDecodeError) as e:
            raise errors.InvalidArgument([errors.FieldViolation("body", f"is not valid JSON: {e}")]) from e

    @staticmethod
    def _query(request: web.Request, *, repeated: tuple[str, ...] = ()) -> dict[str, Any]:
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

    async def provision(self, request: web.Request) -> web.Response:
        """POST /v1/provision: accept a desired state, answer 202 with the deployment id."""
        principal = self._principal(request)
        msg = parse(await self._json(request), pb.ProvisionRequest())
        result = await self._service.provision(principal, convert.provision_input(msg))
        return web.json_response(render(convert.provision_response(result)), status=202)

    async def _resources(self, request: web.Request, data: dict[str, Any]) -> web.Response:
        principal = self._principal(request)
        if not data.get("namespace"):
            raise errors.InvalidArgument(
                [
                    errors.FieldViolation(
                        "namespace", "is required, e.g. /v1/resources?namespace=team-platform"
                    )
                ]
            )
        msg = parse(data, pb.GetResourceStateRequest())
        page = await self._service.get_resource_state(principal, convert.resource_state_input(msg))
        return web.json_response(render(convert.resource_page_to_proto(msg.namespace, page)))

    async def resources_get(self, request: web.Request) -> web.Response:
        """GET /v1/resources?namespace=...&resourceType=...&resourceName=...&deploymentId=..."""
        return await self._resources(request, self._query(request))

    async def resources_post(self, request: web.Request) -> web.Response:
        """POST /v1/resources with the same filters as a JSON body."""
        data = await self._json(request)
        if not isinstance(data, dict):
            raise errors.InvalidArgument([errors.FieldViolation("body", "must be a JSON object")])
        return await self._resources(request, data)

    async def deployment_get(self, request: web.Request) -> web.Response:
        """GET /v1/deployments/{id}?namespace=...: one deployment and its last operation."""
        principal = self._principal(request)
        data = self._query(request)
        data["deploymentId"] = request.match_info["deployment_id"]
        msg = parse(data, pb.GetDeploymentRequest())
        deployment = await self._service.get_deployment(
            principal, namespace=msg.namespace, deployment_id=msg.deployment_id
        )
        return web.json_response(
            render(pb.GetDeploymentResponse(deployment=convert.deployment_to_proto(deployment)))
        )

    async def _deprovision(self, request: web.Request, data: dict[str, Any]) -> web.Response:
        principal = self._principal(request)
        msg = parse(data, pb.DeprovisionRequest())
        result = await self._service.deprovision(
            principal,
            namespace=msg.namespace,
            deployment_id=msg.deployment_id,
            data_policy=convert.data_policy(msg.data_policy),
            request_id=msg.request_id,
        )
        return web.json_response(render(convert.deprovision_response(result)), status=202)

    async def deployment_delete(self, request: web.Request) -> web.Response:
        """DELETE /v1/deployments/{id}?namespace=...&dataPolicy=keep|delete: deprovision, 202."""
        data = self._query(request)
        data["deploymentId"] = request.match_info["deployment_id"]
        return await self._deprovision(request, data)

    async def deprovision(self, request: web.Request) -> web.Response:
        """POST /v1/deprovision with {namespace, deploymentId, dataPolicy, requestId}: 202."""
        return await self._deprovision(request, await self._json(request))

    async def events(self, request: web.Request) -> web.Response:
        """GET /v1/events?namespace=...&deploymentId=...&kinds=...: the drift history, oldest first."""
        principal = self._principal(request)
        msg = parse(self._query(request, repeated=("kinds",)), pb.ListDriftEventsRequest())
        page = await self._service.list_drift_events(principal, convert.events_input(msg))
        return web.json_response(render(convert.events_page_to_proto(page)))

    async def accept_drift(self, request: web.Request) -> web.Response:
        """POST /v1/deployments/{id}:acceptDrift with {namespace, fields}: observed becomes desired."""
        principal = self._principal(request)
        data = await self._json(request)
        if isinstance(data, dict):
            data["deploymentId"] = request.match_info["deployment_id"]
        msg = parse(data, pb.AcceptDriftRequest())
        deployment, accepted = await self._service.accept_drift(
            principal, namespace=msg.namespace, deployment_id=msg.deployment_id, fields=list(msg.fields)
        )
        reply = pb.AcceptDriftResponse(
            deployment=convert.deployment_to_proto(deployment), accepted_fields=accepted
        )
        return web.json_response(render(reply))

    async def policy_get(self, request: web.Request) -> web.Response:
        """GET /v1/policies?namespace=...&resourceType=...: the remediation policy in effect."""
        principal = self._principal(request)
        msg = parse(self._query(request), pb.GetRemediationPolicyRequest())
        rule = self._service.get_policy(
            principal, namespace=msg.namespace, resource_type=convert.resource_type(msg.resource_type)
        )
        return web.json_response(render(pb.GetRemediationPolicyResponse(policy=convert.rule_to_proto(rule))))

    async def policy_put(self, request: web.Request) -> web.Response:
        """PUT /v1/policies with what GET returns ({policy: {...}}) or the bare policy object."""
        principal = self._principal(request)
        data = await self._json(request)
        if isinstance(data, dict) and "policy" not in data and "namespace" in data:
            data = {"policy": data}
        msg = parse(data, pb.SetRemediationPolicyRequest())
        rule = await self._service.set_policy(principal, convert.rule_from_proto(msg.policy))
        return web.json_response(render(pb.SetRemediationPolicyResponse(policy=convert.rule_to_proto(rule))))

    async def metrics(self, request: web.Request) -> web.Response:
        """Prometheus metrics; they name namespaces, so only a principal granted every namespace may read."""
        principal = self._principal(request)
        principal.require(auth.ALL_NAMESPACES)
        body = prometheus_client.generate_latest(self._registry)
        return web.Response(body=body, headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST})

    async def healthz(self, request: web.Request) -> web.Response:
        """Liveness: the process serves HTTP."""
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        """Readiness: 200 when every dependency is ready, else 503 naming what is not."""
        problem = await self._readiness()
        if problem:
            return web.json_response({"status": "not ready", "reason": problem}, status=503)
        return web.json_response({"status": "ready"})

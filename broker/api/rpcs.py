"""Every unary RPC once: its request type, its handler, and the /v1 routes that map onto it.

A handler takes the authenticated principal and the request message, calls the service layer and
returns the response message: protobuf in, protobuf out, nothing about the transport. The gRPC
server registers one method per row (``grpc_api``), the gateway one aiohttp route per ``Route``
(``gateway``), so an RPC cannot exist on one transport and be forgotten on the other. WatchDrift,
the one streaming RPC, has no /v1 path and is served by ``grpc_api`` itself.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Awaitable, Callable
from typing import Any

from broker_client.v1 import broker_pb2 as pb
from google.protobuf import json_format, message, struct_pb2

from broker import auth, service
from broker.api import convert, encoded
from broker.domain import approval

# A handler answers a message, or a response it keeps encoded (``encoded.Encoded``).
Handler = Callable[[service.BrokerService, auth.Principal, Any], Awaitable[message.Message | encoded.Encoded]]


@dataclasses.dataclass(frozen=True)
class Route:
    """One /v1 path of an RPC.

    The request's fields come from the JSON body when ``body`` is set, else from the query string
    (``repeated`` names the keys that may repeat or take comma lists). Path parameters are
    request fields of the same (proto) name. ``wrap`` names the field a bare JSON object stands
    for (``PUT /v1/policies`` takes the policy itself as well as ``{"policy": ...}``).
    """

    method: str
    path: str
    status: int = 200
    body: bool = False
    repeated: tuple[str, ...] = ()
    wrap: str = ""


@dataclasses.dataclass(frozen=True)
class Rpc:
    """One unary RPC of broker.v1.BrokerService."""

    name: str
    request: type[message.Message]
    handler: Handler
    routes: tuple[Route, ...] = ()


async def _provision(svc: service.BrokerService, principal: auth.Principal, req: Any) -> message.Message:
    return convert.provision_response(await svc.provision(principal, convert.provision_input(req)))


async def _resource_state(svc: service.BrokerService, principal: auth.Principal, req: Any) -> encoded.Encoded:
    page = await svc.get_resource_state(principal, convert.resource_state_input(req))
    return encoded.of(svc).page(req.namespace, page, keep=svc.is_kept(page))


async def _deprovision(svc: service.BrokerService, principal: auth.Principal, req: Any) -> message.Message:
    return convert.deprovision_response(await svc.deprovision(principal, convert.deprovision_input(req)))


async def _deployment(svc: service.BrokerService, principal: auth.Principal, req: Any) -> message.Message:
    deployment = await svc.get_deployment(
        principal, service.DeploymentInput(req.namespace, req.deployment_id)
    )
    return pb.GetDeploymentResponse(deployment=convert.deployment_to_proto(deployment))


async def _events(svc: service.BrokerService, principal: auth.Principal, req: Any) -> message.Message:
    return convert.events_page_to_proto(await svc.list_drift_events(principal, convert.events_input(req)))


async def _accept(svc: service.BrokerService, principal: auth.Principal, req: Any) -> message.Message:
    request = service.AcceptDriftInput(req.namespace, req.deployment_id, tuple(req.fields))
    deployment, accepted = await svc.accept_drift(principal, request)
    return pb.AcceptDriftResponse(
        deployment=convert.deployment_to_proto(deployment), accepted_fields=accepted
    )


async def _set_policy(svc: service.BrokerService, principal: auth.Principal, req: Any) -> message.Message:
    rule = await svc.set_policy(principal, convert.rule_from_proto(req.policy))
    return pb.SetRemediationPolicyResponse(policy=convert.rule_to_proto(rule))


async def _get_policy(svc: service.BrokerService, principal: auth.Principal, req: Any) -> message.Message:
    request = service.PolicyInput(req.namespace, convert.resource_type(req.resource_type))
    rule = svc.get_policy(principal, request)
    return convert.policy_response(rule, datetime.datetime.now(datetime.UTC))


async def _remediations(svc: service.BrokerService, principal: auth.Principal, req: Any) -> message.Message:
    request = service.RemediationsInput(req.namespace, req.deployment_id, req.include_decided)
    found = await svc.list_remediations(principal, request)
    return pb.ListPendingRemediationsResponse(remediations=[convert.remediation_to_proto(r) for r in found])


def _decision_input(req: Any) -> service.DecisionInput:
    return service.DecisionInput(req.namespace, req.remediation_id, req.request_id, req.reason)


async def _approve(svc: service.BrokerService, principal: auth.Principal, req: Any) -> message.Message:
    decided = await svc.decide_remediation(principal, _decision_input(req), approval.Decision.APPROVE)
    return pb.ApproveRemediationResponse(remediation=convert.remediation_to_proto(decided))


async def _reject(svc: service.BrokerService, principal: auth.Principal, req: Any) -> message.Message:
    decided = await svc.decide_remediation(principal, _decision_input(req), approval.Decision.REJECT)
    return pb.RejectRemediationResponse(remediation=convert.remediation_to_proto(decided))


async def _admission_policy(
    svc: service.BrokerService, principal: auth.Principal, req: Any
) -> message.Message:
    objects, applied = svc.admission_policy(principal, req.mode)
    return pb.GetAdmissionPolicyResponse(
        objects=[json_format.ParseDict(obj, struct_pb2.Struct()) for obj in objects], applied=applied
    )


async def _set_budget(svc: service.BrokerService, principal: auth.Principal, req: Any) -> message.Message:
    budget = await svc.set_budget(principal, convert.budget_input(req.budget))
    return pb.SetCostBudgetResponse(budget=convert.budget_to_proto(budget))


async def _get_budget(svc: service.BrokerService, principal: auth.Principal, req: Any) -> message.Message:
    return pb.GetCostBudgetResponse(budget=convert.budget_to_proto(svc.get_budget(principal, req.namespace)))


async def _cost_summary(svc: service.BrokerService, principal: auth.Principal, req: Any) -> message.Message:
    summary = await svc.cost_summary(principal, service.CostSummaryInput(req.namespace, req.max_drifts))
    return convert.cost_summary_to_proto(summary)


TABLE: tuple[Rpc, ...] = (
    Rpc("Provision", pb.ProvisionRequest, _provision, (Route("POST", "/v1/provision", 202, body=True),)),
    Rpc(
        "GetResourceState",
        pb.GetResourceStateRequest,
        _resource_state,
        (Route("GET", "/v1/resources"), Route("POST", "/v1/resources", body=True)),
    ),
    Rpc(
        "Deprovision",
        pb.DeprovisionRequest,
        _deprovision,
        (
            Route("DELETE", "/v1/deployments/{deployment_id}", 202),
            Route("POST", "/v1/deprovision", 202, body=True),
        ),
    ),
    Rpc(
        "GetDeployment",
        pb.GetDeploymentRequest,
        _deployment,
        (Route("GET", "/v1/deployments/{deployment_id}"),),
    ),
    Rpc(
        "ListDriftEvents",
        pb.ListDriftEventsRequest,
        _events,
        (Route("GET", "/v1/events", repeated=("kinds",)),),
    ),
    Rpc(
        "AcceptDrift",
        pb.AcceptDriftRequest,
        _accept,
        (Route("POST", "/v1/deployments/{deployment_id}:acceptDrift", body=True),),
    ),
    Rpc(
        "SetRemediationPolicy",
        pb.SetRemediationPolicyRequest,
        _set_policy,
        (Route("PUT", "/v1/policies", body=True, wrap="policy"),),
    ),
    Rpc("GetRemediationPolicy", pb.GetRemediationPolicyRequest, _get_policy, (Route("GET", "/v1/policies"),)),
    Rpc(
        "GetAdmissionPolicy",
        pb.GetAdmissionPolicyRequest,
        _admission_policy,
        (Route("GET", "/v1/admission-policy"),),
    ),
    Rpc(
        "SetCostBudget",
        pb.SetCostBudgetRequest,
        _set_budget,
        (Route("PUT", "/v1/budgets", body=True, wrap="budget"),),
    ),
    Rpc("GetCostBudget", pb.GetCostBudgetRequest, _get_budget, (Route("GET", "/v1/budgets"),)),
    Rpc("GetCostSummary", pb.GetCostSummaryRequest, _cost_summary, (Route("GET", "/v1/costs"),)),
    Rpc(
        "ListPendingRemediations",
        pb.ListPendingRemediationsRequest,
        _remediations,
        (Route("GET", "/v1/remediations"),),
    ),
    Rpc(
        "ApproveRemediation",
        pb.ApproveRemediationRequest,
        _approve,
        (Route("POST", "/v1/remediations/{remediation_id}:approve", body=True),),
    ),
    Rpc(
        "RejectRemediation",
        pb.RejectRemediationRequest,
        _reject,
        (Route("POST", "/v1/remediations/{remediation_id}:reject", body=True),),
    ),
)
STREAMING = frozenset({"WatchDrift"})


def _check() -> None:
    """Every method of the service is in the table (or streams), and nothing else is."""
    methods = {m.name for m in pb.DESCRIPTOR.services_by_name["BrokerService"].methods}
    listed = {rpc.name for rpc in TABLE} | STREAMING
    if methods != listed:
        raise RuntimeError(f"RPC table and broker.proto disagree: {sorted(methods ^ listed)}")


_check()

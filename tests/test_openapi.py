"""The OpenAPI document of /v1: served at /v1/openapi.json, derived from the RPC table, and true.

Schemathesis reads the document the live gateway serves and sends what it generates from it, valid
and invalid, to a broker that manages the sandbox cluster; every answer must be documented (status,
content type, body) and none may be a 5xx. Real traffic (a provisioned database, a drift made with
kubectl, events, policies, a deprovision) is checked against the document the same way.

Schemathesis sends with ``requests``, which blocks: it runs in a worker thread while the broker keeps
serving on the test's event loop.
"""

from __future__ import annotations

import asyncio
import collections
import pathlib
import shutil
from typing import Any

import aiohttp
import hypothesis
import jsonschema_rs
import pytest
import requests
import schemathesis
from conftest import ADMIN_TOKEN, PLATFORM_TOKEN, RunningBroker, broker_running, until
from hypothesis import strategies as st
from schemathesis import checks as st_checks
from test_e2e_drift import Kubectl

from broker import auth
from broker.api import gateway, openapi, rpcs

NS = "team-platform"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
PLATFORM = {"Authorization": f"Bearer {PLATFORM_TOKEN}"}

needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not on PATH")

# Positive data the gateway refuses is allowed: cross-field rules (the engines of a resource type, the
# version catalog, the configured size tiers, the callback address rules) are 400s with field
# violations that JSON Schema cannot state. Everything else schemathesis checks is on.
EXCLUDED_CHECKS = [st_checks.positive_data_acceptance]
MAX_EXAMPLES = 25
SEED_PROVISION = {
    "namespace": NS,
    "resourceType": "database",
    "resourceName": "postgres-app-db",
    "spec": {"engine": "postgresql", "version": "15", "size": "medium", "replicas": 1},
}


def v1_routes(app: Any) -> set[tuple[str, str]]:
    """(method, path template) of every /v1 route of an aiohttp application."""
    routes = set()
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("path") or info.get("formatter", "")
        if path.startswith("/v1/") and route.method != "HEAD":
            routes.add((route.method, path))
    return routes


def test_the_document_describes_exactly_the_gateways_v1_routes(tokens_file: pathlib.Path):
    app = gateway.Gateway(
        service=None,  # routing only: no request is served
        authenticator=auth.Authenticator.from_file(tokens_file),
        readiness=None,
    ).app
    document = openapi.document(authentication=True)

    documented = {(method.upper(), path) for path, item in document["paths"].items() for method in item}

    assert documented == v1_routes(app)
    table = {(route.method, route.path) for rpc in rpcs.TABLE for route in rpc.routes}
    assert documented == table | {("GET", openapi.PATH)}


async def test_the_gateway_serves_the_document_without_credentials(running_broker: RunningBroker):
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{running_broker.http_url}{openapi.PATH}") as response,
    ):
        assert response.status == 200
        assert response.content_type == "application/json"
        served = await response.json()

    assert served == openapi.document(authentication=True)
    assert served["openapi"] == "3.1.0"
    scheme = served["components"]["securitySchemes"]["bearerAuth"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    assert served["security"] == [{"bearerAuth": []}]
    assert served["paths"][openapi.PATH]["get"]["security"] == []


async def test_an_insecure_broker_documents_no_credentials(tmp_path: pathlib.Path):
    async with (
        broker_running(tmp_path / "data", None, insecure=True) as running,
        aiohttp.ClientSession() as http,
        http.get(f"{running.http_url}{openapi.PATH}") as response,
    ):
        served = await response.json()

    assert "security" not in served
    assert "securitySchemes" not in served["components"]
    # No 401 is documented where none can happen.
    assert "401" not in served["paths"]["/v1/resources"]["get"]["responses"]


def test_response_schemas_use_the_seed_spelling():
    schemas = openapi.document(authentication=True)["components"]["schemas"]

    state = schemas["ResourceState"]
    assert {"deploymentId", "resourceType", "healthStatus", "lastChecked", "estimatedMonthlyCost"} <= set(
        state["properties"]
    )
    assert state["properties"]["resourceType"]["enum"] == ["database", "cache", "topic"]
    assert "Ready" in state["properties"]["phase"]["enum"]
    assert state["properties"]["healthStatus"]["enum"] == ["Healthy", "Degraded", "Unhealthy", "Unknown"]
    assert state["properties"]["port"]["type"] == "integer"
    assert state["properties"]["lastChecked"] == {"type": "string", "format": "date-time"}
    assert state["properties"]["generation"]["type"] == "string"  # int64: a decimal string in proto3 JSON
    assert state["additionalProperties"] is False
    # Always written: fields without presence; enums (left out at zero) and messages are not.
    assert {"deploymentId", "driftDetected", "driftDetails", "port"} <= set(state["required"])
    assert not {"phase", "healthStatus", "actualSpec", "estimatedMonthlyCost"} & set(state["required"])
    usage = schemas["ResourceUsage"]["properties"]
    assert usage["cpuUsage"] == {"type": "string"}
    errors = schemas["Error400"]["properties"]["error"]
    assert errors["properties"]["status"]["enum"] == [
        "INVALID_ARGUMENT",
        "FAILED_PRECONDITION",
        "OUT_OF_RANGE",
    ]
    assert "fieldViolations" in errors["properties"]


def test_the_document_is_valid_openapi_3_1():
    document = openapi.document(authentication=True)

    schemathesis.openapi.from_dict(document).validate()  # the OpenAPI 3.1 meta-schema
    for schema in document["components"]["schemas"].values():
        jsonschema_rs.meta.validate(schema)  # each schema is valid JSON Schema 2020-12


# The response of the original design's document, verbatim: a manager written against it must work.
SEED_EXAMPLE = {
    "resources": [
        {
            "deploymentId": "deploy-abc123",
            "resourceType": "database",
            "resourceName": "postgres-app-db",
            "namespace": "team-platform",
            "phase": "Ready",
            "healthStatus": "Healthy",
            "message": "Database is running and healthy",
            "lastChecked": "2025-10-03T09:30:00Z",
            "endpoint": "postgres-app-db.team-platform.svc.cluster.local",
            "port": 5432,
            "connectionSecret": "postgres-app-db-credentials",
            "actualSpec": {"engine": "postgresql", "version": "15.2", "size": "medium", "replicas": 1},
            "desiredSpec": {"engine": "postgresql", "version": "15", "size": "medium", "replicas": 1},
            "driftDetected": True,
            "driftDetails": [
                "Version mismatch: desired=15, actual=15.2",
                "This is expected patch version drift",
            ],
            "resourceUsage": {
                "cpuUsage": "250m",
                "memoryUsage": "512Mi",
                "storageUsage": "5Gi",
                "replicas": 1,
            },
            "estimatedMonthlyCost": 45.50,
        }
    ],
    "total": 1,
    "namespace": "team-platform",
}


def without_required(schema: Any) -> Any:
    """A schema with every ``required`` list dropped (the seed's example leaves out newer fields)."""
    if isinstance(schema, dict):
        return {k: without_required(v) for k, v in schema.items() if k != "required"}
    if isinstance(schema, list):
        return [without_required(v) for v in schema]
    return schema


@pytest.mark.parametrize("path", ["/v1/resources"])
@pytest.mark.parametrize("method", ["get", "post"])
def test_the_seed_example_fits_the_documented_answer(method: str, path: str):
    document = openapi.document(authentication=True)
    answer = document["paths"][path][method]["responses"]["200"]["content"]["application/json"]["schema"]
    validator = jsonschema_rs.validator_for(
        {**answer, "components": without_required(document["components"])}
    )

    # Every field name, value type and spelling of the seed is the document's.
    validator.validate(SEED_EXAMPLE)
    # And the check can tell: the spellings gRPC uses are not.
    respelled = {**SEED_EXAMPLE, "resources": [{**SEED_EXAMPLE["resources"][0], "phase": "STATE_READY"}]}
    assert not validator.is_valid(respelled)
    assert not validator.is_valid({**SEED_EXAMPLE, "total": "1"})


def load(running: RunningBroker) -> Any:
    """The document the broker serves, as schemathesis reads it."""
    return schemathesis.openapi.from_url(f"{running.http_url}{openapi.PATH}", timeout=10)


def known_values(deployment_id: str) -> dict[str, st.SearchStrategy[Any]]:
    """Values the broker takes for fields that JSON Schema leaves open (names, ids, specs, pages).

    Valid requests made of random strings rarely get past the first field check; a generated request
    with some of its fields replaced by these reaches the service with the rest still generated.
    """
    specs = [
        {"engine": "postgresql", "version": "15", "size": "medium", "replicas": 1},
        {"engine": "redis", "version": "7", "size": "small"},
        {"engine": "kafka", "version": "3", "size": "small", "topic": {"partitions": 3}},
    ]
    return {
        "namespace": st.just(NS),
        "deploymentId": st.just(deployment_id),
        "deployment_id": st.just(deployment_id),
        "resourceName": st.sampled_from(["postgres-app-db", "sessions", "orders"]),
        "resourceType": st.sampled_from(["database", "cache", "topic"]),
        "spec": st.sampled_from(specs),
        "pageSize": st.integers(0, 1000),
        "pageToken": st.just(""),
        "requestId": st.uuids().map(str),
        "callbackUrl": st.just(""),
        "afterSequence": st.integers(0, 50),
        "fields": st.lists(st.sampled_from(["replicas", "version", "size"]), max_size=2),
    }


def fillable(document: dict[str, Any]) -> dict[str, tuple[set[str], list[set[str]]]]:
    """Per operation label: its query parameter names, and the property names of each shape its JSON
    body may take (``PUT /v1/policies`` takes two)."""
    schemas = document["components"]["schemas"]

    def properties(schema: dict[str, Any]) -> set[str]:
        if "$ref" in schema:
            schema = schemas[schema["$ref"].rsplit("/", 1)[1]]
        return set(schema.get("properties", {}))

    fields = {}
    for path, item in document["paths"].items():
        for method, operation in item.items():
            query = {p["name"] for p in operation.get("parameters", []) if p["in"] == "query"}
            body = (
                operation.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
            )
            shapes = [] if body is None else [properties(shape) for shape in body.get("anyOf", [body])]
            fields[f"{method.upper()} {path}"] = (query, shapes)
    return fields


def overlay(
    case: Any,
    data: st.DataObject,
    known: dict[str, st.SearchStrategy[Any]],
    fields: tuple[set[str], list[set[str]]],
) -> None:
    """Set most of the fields of a valid case that have known values (``data`` draws which and what).

    Generated objects are often sparse (``{}`` is the simplest valid body), so known fields are added
    where the operation takes them, not only replaced.
    """
    query, shapes = fields
    targets: list[tuple[dict[str, Any], set[str]]] = []
    if query:
        if case.query is None:
            case.query = {}
        targets.append((case.query, query))
    if isinstance(case.body, dict):
        # The shape the body has, and of those the one that takes the most known fields.
        fitting = [shape for shape in shapes if set(case.body) <= shape]
        if fitting:
            targets.append((case.body, max(fitting, key=lambda shape: len(shape & set(known)))))
    if case.path_parameters:
        targets.append((case.path_parameters, set(case.path_parameters)))
    for part, keys in targets:
        for key in sorted(keys & set(known)):
            # Most of them: a request with a few fields left generated tells most about those.
            if data.draw(st.integers(0, 4), label=f"set {key}") > 0:
                part[key] = data.draw(known[key], label=key)


class Fuzzer:
    """Sends generated requests for one operation and mode at a time, and keeps what it saw."""

    def __init__(self, base_url: str, deployment_id: str) -> None:
        self.failures: list[str] = []
        self.answered: collections.Counter[tuple[str, str, int]] = collections.Counter()
        self.known = known_values(deployment_id)
        self.shapes = fillable(openapi.document(authentication=True))
        self.session = requests.Session()
        self.transport = {"base_url": base_url, "session": self.session, "headers": ADMIN}
        self.settings = hypothesis.settings(
            max_examples=MAX_EXAMPLES,
            derandomize=True,
            database=None,
            deadline=None,
            suppress_health_check=list(hypothesis.HealthCheck),
            phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
        )

    def run(self, operation: Any, mode: schemathesis.GenerationMode) -> None:
        """``MAX_EXAMPLES`` generated requests of ``operation``, each answer checked against the document."""
        label = f"{operation.label} ({mode.value})"
        fill = self.shapes[operation.label] if mode is schemathesis.GenerationMode.POSITIVE else None

        @self.settings
        @hypothesis.given(case=operation.as_strategy(generation_mode=mode), data=st.data())
        def send(case: Any, data: st.DataObject) -> None:
            if fill is not None:
                overlay(case, data, self.known, fill)
            try:
                response = case.call(**self.transport)
                self.answered[operation.label, mode.value, response.status_code] += 1
                case.validate_response(
                    response, headers=ADMIN, excluded_checks=EXCLUDED_CHECKS, transport_kwargs=self.transport
                )
            except Exception as e:
                self.failures.append(f"{label}: {e}")
                if len(self.failures) > 20:
                    raise

        send()


def fuzz(schema: Any, base_url: str, deployment_id: str) -> Fuzzer:
    """Every operation with generated valid and invalid requests."""
    fuzzer = Fuzzer(base_url, deployment_id)
    for result in schema.get_all_operations():
        operation = result.ok()
        fuzzer.run(operation, schemathesis.GenerationMode.POSITIVE)
        if list(operation.iter_parameters()) or operation.body:  # with nothing to send, nothing to negate
            fuzzer.run(operation, schemathesis.GenerationMode.NEGATIVE)
    fuzzer.session.close()
    return fuzzer


async def test_schemathesis_finds_nothing_against_the_live_gateway(cluster_broker: RunningBroker):
    async with (
        aiohttp.ClientSession(base_url=cluster_broker.http_url, headers=PLATFORM) as http,
        http.post("/v1/provision", json=SEED_PROVISION) as response,
    ):
        assert response.status == 202
        deployment_id = (await response.json())["deploymentId"]
    schema = await asyncio.to_thread(load, cluster_broker)

    fuzzer = await asyncio.to_thread(fuzz, schema, cluster_broker.http_url, deployment_id)
    failures, answered = fuzzer.failures, fuzzer.answered

    assert not failures, "\n\n".join(failures)
    print("\n".join(f"{label} {mode}: {code} x{n}" for (label, mode, code), n in sorted(answered.items())))
    # Every operation was exercised (schemathesis leaves out the document it was loaded from), and
    # valid requests got past validation.
    document = openapi.document(authentication=True)
    labels = {f"{method.upper()} {path}" for path, item in document["paths"].items() for method in item}
    exercised = {(label, mode) for label, mode, _ in answered}
    assert exercised == {
        (label, mode) for label in labels - {f"GET {openapi.PATH}"} for mode in ("positive", "negative")
    }
    assert {code for _, mode, code in answered if mode == "positive"} >= {200, 202, 400}


def check(schema: Any, base_url: str, method: str, path: str, **parts: Any) -> Any:
    """Send one real request through schemathesis and validate the answer against the document."""
    case = schema[path][method].Case(**parts)
    return case.call_and_validate(base_url=base_url, headers=PLATFORM, excluded_checks=EXCLUDED_CHECKS)


@needs_kubectl
async def test_real_traffic_conforms_to_the_document(cluster_broker: RunningBroker, kubectl: Kubectl) -> None:
    schema = await asyncio.to_thread(load, cluster_broker)
    url = cluster_broker.http_url

    async def call(method: str, path: str, **parts: Any) -> Any:
        return await asyncio.to_thread(check, schema, url, method, path, **parts)

    provisioned = await call("POST", "/v1/provision", body=SEED_PROVISION)
    assert provisioned.status_code == 202
    deployment_id = provisioned.json()["deploymentId"]

    async def state() -> dict[str, Any]:
        response = await call("GET", "/v1/resources", query={"namespace": NS})
        return dict(response.json())

    await until(state, lambda s: s["resources"][0].get("phase") == "Ready", within=20, what="Ready")
    await kubectl.run("scale", "statefulset", "postgres-app-db", "--replicas=3")
    drifted = await until(
        state,
        lambda s: any(i["field"] == "replicas" for i in s["resources"][0]["driftItems"]),
        within=20,
        what="replica drift",
    )
    resource = drifted["resources"][0]
    # The seed's example, as the document describes it: numbers stay numbers, spellings are the seed's.
    assert resource["healthStatus"] in ("Healthy", "Degraded")
    assert resource["actualSpec"]["replicas"] == 3
    assert "resourceUsage" in resource

    posted = await call("POST", "/v1/resources", body={"namespace": NS, "resourceType": "database"})
    assert posted.json()["total"] == 1
    deployment = await call(
        "GET",
        "/v1/deployments/{deployment_id}",
        path_parameters={"deployment_id": deployment_id},
        query={"namespace": NS},
    )
    assert deployment.json()["deployment"]["lastOperation"]["state"] == "Succeeded"
    events = await call(
        "GET", "/v1/events", query={"namespace": NS, "kinds": ["DriftDetected", "ProvisioningSucceeded"]}
    )
    assert events.json()["events"]
    policy = await call(
        "PUT", "/v1/policies", body={"namespace": NS, "resourceType": "database", "mode": "alert"}
    )
    assert policy.json()["policy"]["mode"] == "Alert"
    read = await call("GET", "/v1/policies", query={"namespace": NS, "resourceType": "database"})
    assert read.json() == policy.json()
    accepted = await call(
        "POST",
        "/v1/deployments/{deployment_id}:acceptDrift",
        path_parameters={"deployment_id": deployment_id},
        body={"namespace": NS, "fields": ["replicas"]},
    )
    assert accepted.json()["acceptedFields"] == ["replicas"]
    missing = await call(
        "GET",
        "/v1/deployments/{deployment_id}",
        path_parameters={"deployment_id": "deploy-000000000000"},
        query={"namespace": NS},
    )
    assert missing.status_code == 404
    refused = await call("GET", "/v1/resources", query={"namespace": "team-other"})
    assert refused.status_code == 403
    deleted = await call(
        "DELETE",
        "/v1/deployments/{deployment_id}",
        path_parameters={"deployment_id": deployment_id},
        query={"namespace": NS, "dataPolicy": "delete"},
    )
    assert deleted.json()["phase"] == "Deleting"
    document = await call("GET", openapi.PATH)
    assert document.json()["paths"].keys() == schema.raw_schema["paths"].keys()


@pytest.fixture
def kubectl(sandbox_kubeconfig: pathlib.Path, tmp_path: pathlib.Path) -> Kubectl:
    return Kubectl(sandbox_kubeconfig, tmp_path / "kube-cache")

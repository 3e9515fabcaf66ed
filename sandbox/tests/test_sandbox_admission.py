"""ValidatingAdmissionPolicies in the sandbox: CEL judged on what each kind of request would store.

Requests go over HTTPS with the users' bearer tokens, as kubectl sends them; policies are written
through the API like any object.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from kube_sandbox import admission, cluster, profiles, users

NS = "team-a"
CM = f"/api/v1/namespaces/{NS}/configmaps"
STS = f"/apis/apps/v1/namespaces/{NS}/statefulsets"
VAP = "/apis/admissionregistration.k8s.io/v1/validatingadmissionpolicies"
BINDINGS = "/apis/admissionregistration.k8s.io/v1/validatingadmissionpolicybindings"


@pytest.fixture
def sandbox_options() -> dict[str, Any]:
    namespace = {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": NS, "labels": {"tier": "gold"}},
    }
    return {"ready_delay": 0.05, "tls": True, "profile": profiles.Profile(name="test", objects=(namespace,))}


class Api:
    """Raw HTTPS calls as one of the sandbox's users."""

    def __init__(self, sandbox: cluster.Sandbox, session: aiohttp.ClientSession) -> None:
        self.sandbox = sandbox
        self.session = session

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        user: users.User | None = users.JANE,
        content_type: str = "application/json",
        query: dict[str, str] | None = None,
    ) -> tuple[int, Any, aiohttp.typedefs.LooseHeaders]:
        headers = {"Content-Type": content_type}
        if user is not None:
            headers["Authorization"] = f"Bearer {user.bearer_token}"
        data = None if body is None else json.dumps(body)
        async with self.session.request(
            method,
            self.sandbox.url + path,
            data=data,
            headers=headers,
            params=query,
            ssl=self.sandbox.client_ssl_context(),
        ) as r:
            text = await r.text()
            return r.status, json.loads(text) if text.startswith("{") else text, r.headers

    async def ok(self, method: str, path: str, body: Any = None, **kw: Any) -> Any:
        status, doc, _ = await self.call(method, path, body, **kw)
        assert status < 300, (status, doc)
        return doc

    async def policy(
        self,
        name: str,
        validations: list[dict[str, Any]],
        *,
        resources: list[str],
        group: str = "",
        operations: tuple[str, ...] = ("CREATE", "UPDATE", "DELETE"),
        actions: tuple[str, ...] = ("Deny",),
        **spec: Any,
    ) -> None:
        """A policy and its binding, written by the administrator."""
        rule = {
            "apiGroups": [group],
            "apiVersions": ["v1"],
            "operations": list(operations),
            "resources": resources,
        }
        body = {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicy",
            "metadata": {"name": name},
            "spec": {"matchConstraints": {"resourceRules": [rule]}, "validations": validations, **spec},
        }
        await self.ok("POST", VAP, body, user=users.ADMIN)
        binding = {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicyBinding",
            "metadata": {"name": name},
            "spec": {"policyName": name, "validationActions": list(actions)},
        }
        await self.ok("POST", BINDINGS, binding, user=users.ADMIN)


@pytest.fixture
async def api(sandbox: cluster.Sandbox) -> AsyncIterator[Api]:
    async with aiohttp.ClientSession() as session:
        yield Api(sandbox, session)


def configmap(name: str, **data: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": data}


def statefulset(name: str, replicas: int = 1) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "replicas": replicas,
            "serviceName": name,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "c", "image": "i"}]},
            },
        },
    }


NO_SECRET = [{"expression": "!('secret' in object.data)", "message": "no secrets in config maps"}]


def denial(doc: dict[str, Any], policy: str, message: str, resource: str = "configmaps") -> None:
    """The Status kube-apiserver sends for a denial by ``policy`` (binding of the same name)."""
    full = f"ValidatingAdmissionPolicy '{policy}' with binding '{policy}' denied request: {message}"
    assert doc["code"] == 422
    assert doc["reason"] == "Invalid"
    assert doc["message"].endswith(f"is forbidden: {full}"), doc["message"]
    assert doc["message"].startswith(f"{resource} ")
    assert doc["details"]["causes"] == [{"message": full}]


async def test_create_update_and_every_patch_are_judged_on_the_object_they_would_store(api: Api) -> None:
    await api.policy("no-secrets", NO_SECRET, resources=["configmaps"])
    status, doc, _ = await api.call("POST", CM, configmap("a", secret="x"))
    assert status == 422
    denial(doc, "no-secrets", "no secrets in config maps")
    await api.ok("POST", CM, configmap("a", plain="x"))
    attempts = [
        ("PUT", configmap("a", secret="x"), "application/json"),
        ("PATCH", {"data": {"secret": "x"}}, "application/merge-patch+json"),
        ("PATCH", {"data": {"secret": "x"}}, "application/strategic-merge-patch+json"),
        ("PATCH", [{"op": "add", "path": "/data/secret", "value": "x"}], "application/json-patch+json"),
        ("PATCH", configmap("a", secret="x"), "application/apply-patch+yaml"),
    ]
    for method, body, content_type in attempts:
        status, doc, _ = await api.call(
            method, f"{CM}/a", body, content_type=content_type, query={"fieldManager": "test"}
        )
        assert status == 422, (content_type, doc)
        denial(doc, "no-secrets", "no secrets in config maps")
    assert (await api.ok("GET", f"{CM}/a"))["data"] == {"plain": "x"}
    # Apply that creates, and a dry run, are judged too; a harmless patch is not refused.
    status, _, _ = await api.call(
        "PATCH",
        f"{CM}/b",
        configmap("b", secret="x"),
        content_type="application/apply-patch+yaml",
        query={"fieldManager": "test"},
    )
    assert status == 422
    status, _, _ = await api.call("POST", CM, configmap("c", secret="x"), query={"dryRun": "All"})
    assert status == 422
    await api.ok("PATCH", f"{CM}/a", {"data": {"more": "y"}}, content_type="application/merge-patch+json")


async def test_delete_has_no_object_and_the_stored_one_as_old_object(api: Api) -> None:
    keep = [
        {
            "expression": "object == null && oldObject.metadata.name != 'keep'",
            "messageExpression": "request.operation + ' of ' + oldObject.metadata.name + ' refused'",
        }
    ]
    await api.policy("keep", keep, resources=["configmaps"], operations=("DELETE",))
    await api.ok("POST", CM, configmap("keep"))
    await api.ok("POST", CM, configmap("other"))
    status, doc, _ = await api.call("DELETE", f"{CM}/keep")
    assert status == 422
    denial(doc, "keep", "DELETE of keep refused")
    assert doc["details"]["name"] == "keep"
    await api.ok("DELETE", f"{CM}/other")
    # A collection delete judges every object, and fails with the first refusal, as kube-apiserver's does.
    await api.ok("POST", CM, configmap("zz-last"))
    status, doc, _ = await api.call("DELETE", CM)
    assert status == 422
    denial(doc, "keep", "DELETE of keep refused")
    assert "keep" in [c["metadata"]["name"] for c in (await api.ok("GET", CM))["items"]]


async def test_the_scale_subresource_is_judged_as_a_scale_and_only_by_rules_that_name_it(api: Api) -> None:
    await api.ok("POST", STS, statefulset("db"))
    at_most_two = [
        {
            "expression": "object.kind == 'Scale' && object.spec.replicas <= 2",
            "messageExpression": "'at most 2 replicas, not ' + string(object.spec.replicas) + "
            "' (was ' + string(oldObject.spec.replicas) + ')'",
        }
    ]
    await api.policy(
        "scale-limit", at_most_two, group="apps", resources=["statefulsets/scale"], operations=("UPDATE",)
    )
    # A rule for the StatefulSet itself does not see scale requests, nor does a label selector (a Scale has none).
    await api.policy(
        "sts-frozen",
        [{"expression": "false"}],
        group="apps",
        resources=["statefulsets"],
        operations=("UPDATE",),
        matchConditions=[{"name": "scale-only", "expression": "has(request.subResource)"}],
    )
    await api.policy(
        "labelled",
        [{"expression": "false"}],
        group="apps",
        resources=["statefulsets/*"],
        operations=("UPDATE",),
        matchConstraints={
            "resourceRules": [
                {
                    "apiGroups": ["apps"],
                    "apiVersions": ["v1"],
                    "operations": ["UPDATE"],
                    "resources": ["statefulsets/*"],
                }
            ],
            "objectSelector": {"matchLabels": {"app": "db"}},
        },
    )
    for method, body, content_type in [
        ("PATCH", {"spec": {"replicas": 3}}, "application/merge-patch+json"),
        (
            "PUT",
            {
                "kind": "Scale",
                "apiVersion": "autoscaling/v1",
                "metadata": {"name": "db"},
                "spec": {"replicas": 3},
            },
            "application/json",
        ),
    ]:
        status, doc, _ = await api.call(method, f"{STS}/db/scale", body, content_type=content_type)
        assert status == 422, doc
        denial(doc, "scale-limit", "at most 2 replicas, not 3 (was 1)", resource="statefulsets.apps")
    assert (await api.ok("GET", f"{STS}/db"))["spec"]["replicas"] == 1
    scaled = await api.ok(
        "PATCH", f"{STS}/db/scale", {"spec": {"replicas": 2}}, content_type="application/merge-patch+json"
    )
    assert scaled["spec"]["replicas"] == 2


async def test_message_falls_back_from_message_expression_to_message_to_the_expression(api: Api) -> None:
    validations = [
        {"expression": "object.data.a == '1'", "messageExpression": "42", "message": "a must be 1"},
        {"expression": "object.data.b == '1'"},
    ]
    await api.policy("messages", validations, resources=["configmaps"])
    _, doc, _ = await api.call("POST", CM, configmap("m", a="2", b="1"))
    denial(doc, "messages", "a must be 1")
    _, doc, _ = await api.call("POST", CM, configmap("m", a="1", b="2"))
    denial(doc, "messages", "failed expression: object.data.b == '1'")


@pytest.mark.parametrize("failure_policy", ["Fail", "Ignore"])
async def test_failure_policy_decides_about_cel_errors(api: Api, failure_policy: str) -> None:
    await api.policy(
        "broken",
        [{"expression": "object.data.missing == 'x'"}],
        resources=["configmaps"],
        failurePolicy=failure_policy,
    )
    status, doc, _ = await api.call("POST", CM, configmap("e", present="y"))
    if failure_policy == "Ignore":
        assert status == 201, doc
        return
    assert status == 422
    assert "denied request: expression 'object.data.missing == 'x'' resulted in error" in doc["message"]


@pytest.mark.parametrize("failure_policy", ["Fail", "Ignore"])
async def test_match_conditions_skip_the_policy_and_their_errors_follow_the_failure_policy(
    api: Api, failure_policy: str
) -> None:
    await api.policy(
        "people-only",
        [{"expression": "false", "message": "read-only for people"}],
        resources=["configmaps"],
        failurePolicy=failure_policy,
        matchConditions=[
            {"name": "not-admin", "expression": "request.userInfo.username != 'kubernetes-admin'"},
            {"name": "errs-on-flag", "expression": "!has(object.data) || object.data.flag == 'x'"},
        ],
    )
    await api.ok("POST", CM, configmap("by-admin", flag="y"), user=users.ADMIN)  # a false condition: skipped
    status, doc, _ = await api.call("POST", CM, configmap("by-jane", flag="x"))
    assert status == 422
    denial(doc, "people-only", "read-only for people")
    status, doc, _ = await api.call("POST", CM, configmap("errs", other="z"))  # no data.flag: an error
    if failure_policy == "Fail":
        assert status == 422
        assert "resulted in error" in doc["message"]
    else:
        assert status == 201, doc


async def test_variables_request_and_namespace_object(api: Api) -> None:
    await api.policy(
        "gold-owners",
        [
            {
                "expression": "variables.gold ? variables.owner == request.userInfo.username : true",
                "messageExpression": "'gold namespaces need owner=' + request.userInfo.username + ', got ' + variables.owner",
            }
        ],
        resources=["configmaps"],
        variables=[
            {"name": "gold", "expression": "namespaceObject.metadata.labels.tier == 'gold'"},
            {"name": "owner", "expression": "has(object.data.owner) ? object.data.owner : 'nobody'"},
        ],
    )
    _, doc, _ = await api.call("POST", CM, configmap("v"))
    denial(doc, "gold-owners", "gold namespaces need owner=jane@example.com, got nobody")
    await api.ok("POST", CM, configmap("v", owner="jane@example.com"))


async def test_warn_sends_a_warning_header_and_audit_records_an_annotation(api: Api) -> None:
    await api.policy(
        "soft",
        [{"expression": "!('secret' in object.data)", "message": "no secrets, please"}],
        resources=["configmaps"],
        actions=("Warn", "Audit"),
        auditAnnotations=[{"key": "who", "valueExpression": "request.userInfo.username"}],
    )
    status, _, headers = await api.call("POST", CM, configmap("w", secret="x"))
    assert status == 201
    assert headers.getall("Warning") == [
        "299 - \"Validation failed for ValidatingAdmissionPolicy 'soft' with binding 'soft': no secrets, please\""
    ]
    log = await api.ok("GET", "/sandbox/v1/audit", user=None)
    event = log["items"][-1]
    assert event["objectRef"] == {"resource": "configmaps", "apiVersion": "v1", "namespace": NS, "name": "w"}
    assert event["user"]["username"] == "jane@example.com"
    assert event["annotations"]["soft/who"] == "jane@example.com"
    failure = json.loads(event["annotations"][admission.VALIDATION_FAILURE_ANNOTATION])
    assert failure == [
        {
            "message": "no secrets, please",
            "policy": "soft",
            "binding": "soft",
            "expressionIndex": 0,
            "validationActions": ["Warn", "Audit"],
        }
    ]


async def test_policies_that_cannot_work_are_refused_when_written(api: Api) -> None:
    broken = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": "broken"},
        "spec": {
            "matchConstraints": {
                "resourceRules": [
                    {
                        "apiGroups": [""],
                        "apiVersions": ["v1"],
                        "operations": ["CREATE"],
                        "resources": ["pods"],
                    }
                ]
            },
            "validations": [{"expression": "object.spec.("}],
        },
    }
    status, doc, _ = await api.call("POST", VAP, broken, user=users.ADMIN)
    assert status == 422
    assert doc["details"]["causes"][0]["field"] == "spec.validations[0].expression"
    binding = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": "both"},
        "spec": {"policyName": "x", "validationActions": ["Deny", "Warn"]},
    }
    status, doc, _ = await api.call("POST", BINDINGS, binding, user=users.ADMIN)
    assert status == 422
    assert "must not contain both Deny and Warn" in doc["message"]
    # Defaults as kube-apiserver fills them in.
    await api.policy("fine", [{"expression": "true"}], resources=["configmaps"])
    stored = await api.ok("GET", f"{VAP}/fine")
    assert stored["spec"]["failurePolicy"] == "Fail"
    assert stored["spec"]["matchConstraints"]["matchPolicy"] == "Equivalent"


async def test_tokens_name_users_and_an_unknown_one_is_unauthorized(api: Api) -> None:
    await api.policy(
        "who",
        [{"expression": "false", "messageExpression": "request.userInfo.username"}],
        resources=["configmaps"],
    )
    _, doc, _ = await api.call("POST", CM, configmap("x"), user=None)
    denial(doc, "who", "kubernetes-admin")
    _, doc, _ = await api.call("POST", CM, configmap("x"))
    denial(doc, "who", "jane@example.com")
    status, doc, _ = await api.call(
        "GET", CM, user=users.User(name="nobody", username="nobody", token="wrong")
    )
    assert status == 401
    assert doc["reason"] == "Unauthorized"

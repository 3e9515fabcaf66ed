"""What ships for monitoring (deploy/monitoring), checked against the tools and the broker it is for.

- The alert rules pass ``promtool check rules`` and their unit tests (``promtool test rules``), every
  alert has a case where it fires and one where it stays quiet, and the PrometheusRule holds exactly
  the groups of the plain rule file.
- Every metric the alerts and the Grafana dashboard query is one a running broker exports, after it
  provisioned, called a manager back and remediated a drift made with kubectl; the labels they match
  on are the broker's.
- ``kubectl apply --dry-run=server`` of ``-k deploy/`` and ``-k deploy/monitoring/`` is accepted by the
  sandbox's API server for every kind it serves (the Prometheus operator's kinds once their CRDs are
  installed); the kinds the sandbox does not serve are named in ``SANDBOX_UNSERVED``.
"""

from __future__ import annotations

import json
import pathlib
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
import yaml
from conftest import ADMIN_TOKEN, PLATFORM_TOKEN, CallbackReceiver, cluster_settings, until
from kube_sandbox import cluster as sandbox_cluster
from prometheus_client import parser
from test_e2e_drift import Kubectl

from broker import server

ROOT = pathlib.Path(__file__).resolve().parent.parent
MONITORING = ROOT / "deploy" / "monitoring"
RULES = MONITORING / "broker-rules.yaml"
RULE_TESTS = MONITORING / "broker-rules.test.yaml"
PROMETHEUS_RULE = MONITORING / "prometheusrule.yaml"
DASHBOARD = MONITORING / "grafana-dashboard.json"
NS = "team-platform"

needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not on PATH")

# Metrics the rules may name that the broker does not export itself.
FROM_PROMETHEUS = {"up"}  # the scrape's own health
# Metrics that other branches add, referenced here ahead of them. A name leaves this table when the
# broker exports it (the test below says so): from then on it is checked like every other.
PENDING: dict[str, str] = {}
# Labels Prometheus (operator) adds to every series of a scraped target.
TARGET_LABELS = {"job", "instance", "pod", "namespace", "service", "endpoint", "container"}
# Kinds under deploy/ that the sandbox does not serve (kube_sandbox documents it: no Deployments,
# ServiceAccounts or RBAC). Any other unserved kind is a mistake in a manifest, such as a wrong apiVersion.
SANDBOX_UNSERVED = {
    ("apps/v1", "Deployment"),
    ("v1", "ServiceAccount"),
    ("rbac.authorization.k8s.io/v1", "ClusterRole"),
    ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"),
    ("rbac.authorization.k8s.io/v1", "Role"),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"),
}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not on PATH: ./dev.sh installs it (Debian's prometheus package)")
    return subprocess.run([path, *args], capture_output=True, text=True, check=False, timeout=60)


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


# Rules ---------------------------------------------------------------------------------------------


def test_promtool_checks_the_rules():
    result = promtool("check", "rules", str(RULES))

    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_the_rules_unit_tests_pass():
    result = promtool("test", "rules", str(RULE_TESTS))

    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_is_tested_firing_and_quiet():
    cases = [
        case for test in yaml.safe_load(RULE_TESTS.read_text())["tests"] for case in test["alert_rule_test"]
    ]
    alerts = {rule["alert"] for rule in alert_rules()}

    assert {case["alertname"] for case in cases if case["exp_alerts"]} == alerts
    assert {case["alertname"] for case in cases if not case["exp_alerts"]} == alerts
    for rule in alert_rules():
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        assert rule["annotations"]["description"], rule["alert"]


def test_the_prometheusrule_holds_the_rule_file():
    rule = yaml.safe_load(PROMETHEUS_RULE.read_text())

    assert (rule["apiVersion"], rule["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    assert rule["spec"] == yaml.safe_load(RULES.read_text())
    check = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_monitoring.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0, check.stderr


# The queries ---------------------------------------------------------------------------------------

_NOT_METRICS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}
_NOT_METRICS |= {"and", "or", "unless", "inf", "nan"}
_LABEL_LISTS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_SELECTOR = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*\{([^}]*)\}")
_MATCHER = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not its functions, keywords or label names)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"label_values\(\s*([^,()]*?)\s*,\s*\w+\s*\)", r"\1", text)  # Grafana's, in variables
    text = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", text)
    text = _LABEL_LISTS.sub(" ", text)
    names = set()
    for match in re.finditer(r"(?<![\w$.])[A-Za-z_:][A-Za-z0-9_:]*", text):
        if text[match.end() :].lstrip().startswith("(") or match.group(0).lower() in _NOT_METRICS:
            continue  # a function or a keyword
        names.add(match.group(0))
    return names


def matched_labels(expr: str) -> set[tuple[str, str]]:
    """(metric, label name) of every label matcher of an expression."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    return {(m.group(1), label) for m in _SELECTOR.finditer(text) for label in _MATCHER.findall(m.group(2))}


def dashboard_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from dashboard_panels(panel.get("panels", []))


def queries() -> dict[str, str]:
    """Every PromQL query that ships: alert expressions, dashboard targets and variables, by where."""
    found = {f"alert {rule['alert']}": rule["expr"] for rule in alert_rules()}
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard_panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            found[f"panel {panel['title']!r} {target['refId']}"] = target["expr"]
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        if variable["type"] == "query":
            found[f"variable {variable['name']}"] = query["query"] if isinstance(query, dict) else query
    return found


def test_the_query_parser_reads_promql():
    expr = 'histogram_quantile(0.99, sum by (le, job) (rate(broker_x_bucket{job="$job", code!="OK"}[5m]))) / on (job) up'

    assert metric_names(expr) == {"broker_x_bucket", "up"}
    assert matched_labels(expr) == {("broker_x_bucket", "job"), ("broker_x_bucket", "code")}
    assert metric_names("label_values(broker_y_total, job)") == {"broker_y_total"}
    assert metric_names("sum(broker_z) or vector(0)") == {"broker_z"}


def test_the_dashboard_is_a_grafana_dashboard():
    dashboard = json.loads(DASHBOARD.read_text())
    panels = list(dashboard_panels(dashboard["panels"]))

    assert dashboard["uid"] == "resource-broker"
    assert len({p["id"] for p in panels}) == len(panels)
    graphs = [p for p in panels if p["type"] != "row"]
    assert len(graphs) >= 10
    for panel in graphs:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"]), panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
    assert {v["name"] for v in dashboard["templating"]["list"]} == {"datasource", "job"}


def exported(text: str) -> tuple[set[str], dict[str, set[str]]]:
    """The sample names a /metrics page can hold (suffixes by type), and the label names of each."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("", "_sum", "_count", "_created"),
        "gauge": ("",),
        "info": ("_info",),
        "unknown": ("",),
    }
    names: set[str] = set()
    labels: dict[str, set[str]] = {}
    for family in parser.text_string_to_metric_families(text):
        base = family.name.removesuffix("_total") if family.type == "counter" else family.name
        names |= {base + suffix for suffix in suffixes[family.type]}
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
    return names, labels


@pytest.fixture
def kubectl(sandbox_kubeconfig: pathlib.Path, tmp_path: pathlib.Path) -> Kubectl:
    return Kubectl(sandbox_kubeconfig, tmp_path / "kube-cache")


@needs_kubectl
async def test_every_metric_the_alerts_and_the_dashboard_use_is_exported(
    tmp_path: pathlib.Path,
    tokens_file: pathlib.Path,
    sandbox_kubeconfig: pathlib.Path,
    callback_receiver: CallbackReceiver,
    kubectl: Kubectl,
):
    broker = server.Broker(
        cluster_settings(tmp_path / "data", tokens_file, sandbox_kubeconfig, remediate=True)
    )
    await broker.start()
    try:
        assert broker.cluster is not None
        assert await broker.cluster.wait_synced(10.0)
        url = f"http://127.0.0.1:{broker.http_port}"
        async with aiohttp.ClientSession(base_url=url) as http:

            async def scrape() -> str:
                async with http.get("/metrics", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as r:
                    assert r.status == 200
                    return await r.text()

            async def state() -> dict[str, Any]:
                async with http.get("/v1/resources", params={"namespace": NS}, headers=platform) as r:
                    return dict(await r.json())

            platform = {"Authorization": f"Bearer {PLATFORM_TOKEN}"}
            body = {
                "namespace": NS,
                "resourceType": "database",
                "resourceName": "orders-db",
                "spec": {"engine": "postgresql", "version": "15", "size": "small", "replicas": 1},
                "callbackUrl": callback_receiver.url,
            }
            async with http.post("/v1/provision", json=body, headers=platform) as response:
                assert response.status == 202
            await until(state, lambda s: s["resources"][0].get("phase") == "Ready", within=20, what="Ready")
            await callback_receiver.wait_for(1)
            await kubectl.run("scale", "statefulset", "orders-db", "--replicas=3")
            text = await until(
                scrape,
                lambda t: 'broker_remediations_total{outcome="succeeded"}' in t,
                within=30,
                what="a remediation of the scaled StatefulSet",
            )
    finally:
        await broker.stop()
    names, labels = exported(text)
    assert 'broker_callback_deliveries_total{result="delivered"} 1.0' in text
    assert 'broker_drift_items_total{action="AutoRemediate",drift_class="Unexpected"}' in text

    used = {(where, name) for where, expr in queries().items() for name in metric_names(expr)}
    missing = sorted(
        (where, name) for where, name in used if name not in names | FROM_PROMETHEUS | set(PENDING)
    )
    assert not missing, f"queries name metrics the broker does not export: {missing}"
    for name, why in PENDING.items():
        assert name not in names, f"{name} is exported now ({why}): remove it from PENDING"
    assert {name for _, name in used} >= {"broker_open_drifts", "broker_remediations_total"}
    wrong_labels = sorted(
        (where, metric, label)
        for where, expr in queries().items()
        for metric, label in matched_labels(expr)
        if metric in labels and label not in labels[metric] | TARGET_LABELS
    )
    assert not wrong_labels, f"queries match labels the metrics do not have: {wrong_labels}"


# The manifests -------------------------------------------------------------------------------------

# The Prometheus operator's kinds, as the sandbox needs them to serve the kinds (it validates no schema).
MONITORING_CRDS = [
    {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.monitoring.coreos.com"},
        "spec": {
            "group": "monitoring.coreos.com",
            "scope": "Namespaced",
            "names": {"plural": plural, "singular": kind.lower(), "kind": kind, "listKind": f"{kind}List"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
                    },
                }
            ],
        },
    }
    for plural, kind in (("prometheusrules", "PrometheusRule"), ("servicemonitors", "ServiceMonitor"))
]


async def served_kinds(kubectl: Kubectl, api_versions: set[str]) -> set[tuple[str, str]]:
    """(apiVersion, kind) the API server serves, of the given API versions (from discovery)."""
    served = set()
    for api_version in api_versions:
        path = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
        code, out, _ = await kubectl.run("get", "--raw", path, check=False)
        if code == 0:
            served |= {(api_version, r["kind"]) for r in json.loads(out)["resources"] if "/" not in r["name"]}
    return served


@needs_kubectl
async def test_the_manifests_pass_a_server_dry_run_for_every_kind_the_sandbox_serves(
    sandbox: sandbox_cluster.Sandbox, sandbox_kubeconfig: pathlib.Path, tmp_path: pathlib.Path
):
    kubectl = Kubectl(sandbox_kubeconfig, tmp_path / "kube-cache")
    kubectl.base = kubectl.base[:-2]  # no -n: the objects name their own namespace
    crds = tmp_path / "monitoring-crds.yaml"
    crds.write_text(yaml.safe_dump_all(MONITORING_CRDS))
    await kubectl.run("apply", "-f", str(crds))
    await kubectl.run("create", "namespace", "resource-broker")  # namespaced dry runs need it to exist
    objects = []
    for directory in (ROOT / "deploy", ROOT / "deploy" / "replicas", MONITORING):
        _, out, _ = await kubectl.run("kustomize", str(directory))
        objects += [doc for doc in yaml.safe_load_all(out) if doc]
    kinds = {(o["apiVersion"], o["kind"]) for o in objects}
    served = await served_kinds(kubectl, {api_version for api_version, _ in kinds})

    assert kinds - served == SANDBOX_UNSERVED
    assert {"PrometheusRule", "ServiceMonitor", "ConfigMap", "Service", "Namespace"} <= {k for _, k in served}
    accepted = [o for o in objects if (o["apiVersion"], o["kind"]) in served]
    manifest = tmp_path / "served.yaml"
    manifest.write_text(yaml.safe_dump_all(accepted))
    code, out, err = await kubectl.run("apply", "--dry-run=server", "-f", str(manifest), check=False)

    assert code == 0, err
    for o in accepted:
        assert re.search(rf"\b{re.escape(o['metadata']['name'])} \w+ \(server dry run\)", out), (
            o["kind"],
            out,
        )
    # A dry run: nothing of it was created.
    _, listed, _ = await kubectl.run(
        "get", "prometheusrules,servicemonitors,configmaps", "-n", "resource-broker", "-o", "name"
    )
    assert "resource-broker" not in listed.replace("configmap/kube-root-ca.crt", "")
    dashboard = next(o for o in accepted if o["kind"] == "ConfigMap")
    assert json.loads(dashboard["data"]["resource-broker.json"]) == json.loads(DASHBOARD.read_text())


@needs_kubectl
async def test_the_replicas_variant_runs_three_on_postgresql_with_leader_election(
    sandbox_kubeconfig: pathlib.Path, tmp_path: pathlib.Path
):
    kubectl = Kubectl(sandbox_kubeconfig, tmp_path / "kube-cache")
    _, out, _ = await kubectl.run("kustomize", str(ROOT / "deploy" / "replicas"))
    objects = [doc for doc in yaml.safe_load_all(out) if doc]
    assert "PersistentVolumeClaim" not in {o["kind"] for o in objects}
    (deployment,) = [o for o in objects if o["kind"] == "Deployment"]
    assert deployment["spec"]["replicas"] == 3
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert "--leader-election" in container["args"]
    env = {e["name"]: e for e in container["env"]}
    assert env["BROKER_STORE_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "resource-broker-store",
        "key": "url",
    }
    assert env["BROKER_CALLBACK_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "resource-broker-store"
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    (data,) = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "data"]
    assert data == {"name": "data", "emptyDir": {}}

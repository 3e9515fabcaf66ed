"""What the broker deploys follows each official image's contract, as docs/image-contracts.md states it.

The page's tables are the test data: every row is checked against the manifests the broker
builds, for every engine and size tier, and against the StatefulSet and Secret a real broker
applied to the sandbox, read back from its API. Anything a built manifest sets that no row states
(a container or pod field, a variable, an argument, a Secret key) fails too, so the page and the
code cannot drift apart. The sandbox runs no containers; the probe scripts are run here, by ``sh``,
against stand-ins for ``pg_isready``, ``mysqladmin`` and ``redis-cli``.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import json
import pathlib
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import grpc
import pytest
from broker_client.v1 import broker_pb2 as pb
from broker_client.v1 import broker_pb2_grpc
from conftest import RunningBroker
from kubernetes_asyncio import client as k8s
from test_e2e_drift import HTTP_HEADERS, NS, Manager, unexpected_rules

from broker.domain import catalog, model, naming, quantity
from broker.kube import manifests

DOC = pathlib.Path(__file__).resolve().parent.parent / "docs" / "image-contracts.md"
CATALOG = catalog.DEFAULT_CATALOG
ENGINES = ("postgresql", "mysql", "redis")
EVERY_ENGINE = "Every engine"
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")
GENERATED = re.compile(r"[A-Za-z0-9]{32}")
PLACEHOLDER = re.compile(r"\{(name|namespace|deployment_id|port|maxmemory|tier\.[a-z_]+)\}")
K8S_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
SETTING = re.compile(
    r"^(image|mount|args|probe|env [A-Z_][A-Z0-9_]*|secret [a-z][a-z-]*|(pod|container|claim)(\.\w+)+)$"
)


# The page's tables --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of a contract table: a setting, the value it must have, and why."""

    setting: str
    value: str
    why: str


def _unquote(cell: str) -> str:
    cell = cell.strip()
    return cell[1:-1] if len(cell) >= 2 and cell.startswith("`") and cell.endswith("`") else cell


def load_contracts(text: str) -> dict[str, list[Row]]:
    """The rows that apply to each engine: its own table's, then the "Every engine" table's."""
    tables: dict[str, list[Row]] = {}
    section = ""
    for number, line in enumerate(text.splitlines(), start=1):
        if line.startswith("## "):
            section = line[3:].strip()
            continue
        if not line.startswith("|") or section not in (*ENGINES, EVERY_ENGINE):
            continue
        cells = line.strip().strip("|").split("|")
        assert len(cells) == 3, f"{DOC.name}:{number}: a row needs setting | value | why: {line}"
        setting, value, why = (c.strip() for c in cells)
        if setting == "setting" or set(setting) <= {"-"}:
            continue  # the header and its separator
        row = Row(_unquote(setting), _unquote(value), why)
        assert SETTING.match(row.setting), f"{DOC.name}:{number}: unknown setting {row.setting!r}"
        assert row.why, f"{DOC.name}:{number}: {row.setting} says no why"
        if row.setting == "args" or "." in row.setting:
            try:
                json.loads(PLACEHOLDER.sub("0", row.value))
            except ValueError as e:
                pytest.fail(f"{DOC.name}:{number}: the value of {row.setting} is not JSON: {e}")
        tables.setdefault(section, []).append(row)
    assert set(tables) == {*ENGINES, EVERY_ENGINE}, f"{DOC.name} has tables for {sorted(tables)}"
    for engine in ENGINES:
        settings = [r.setting for r in tables[engine] + tables[EVERY_ENGINE]]
        duplicated = sorted({s for s in settings if settings.count(s) > 1})
        assert not duplicated, f"{DOC.name}: {engine} states {duplicated} twice"
    return {engine: tables[engine] + tables[EVERY_ENGINE] for engine in ENGINES}


CONTRACTS = load_contracts(DOC.read_text())


def rows(engine: str, kind: str) -> dict[str, str]:
    """The engine's rows of one kind (``env``, ``secret``), by the name after the kind."""
    return {
        r.setting.split(" ", 1)[1]: r.value for r in CONTRACTS[engine] if r.setting.startswith(kind + " ")
    }


# Checking a manifest against the rows -------------------------------------------------------------


def _deployment(engine: str, size: str, *, replicas: int = 1) -> model.Deployment:
    now = datetime.datetime(2025, 10, 3, 9, 30, tzinfo=datetime.UTC)
    resource_type = CATALOG.engines[engine].resource_type
    return model.Deployment(
        deployment_id=model.DeploymentId("deploy-abc123"),
        namespace=model.Namespace("team-platform"),
        resource_type=resource_type,
        resource_name=model.ResourceName(f"{engine}-app"),
        desired_spec=model.ResourceSpec(
            engine=engine,
            version=CATALOG.engines[engine].versions[-1],
            size=size,
            replicas=replicas,
            resources=CATALOG.sizes[size],
        ),
        generation=1,
        phase=model.Phase.PENDING,
        callback_url="",
        last_operation=model.Operation(
            operation_id=model.OperationId("op-1"),
            type=model.OperationType.PROVISION,
            state=model.OperationState.ACCEPTED,
            generation=1,
            message="",
            create_time=now,
            update_time=now,
        ),
        create_time=now,
        update_time=now,
    )


@dataclasses.dataclass(frozen=True)
class Target:
    """What the rows are checked against: a deployment's StatefulSet and its Secret, decoded."""

    engine: str
    name: str
    namespace: str
    deployment_id: str
    tier: model.ComputeResources
    statefulset: dict[str, Any]
    secret: dict[str, str]

    @property
    def pod(self) -> dict[str, Any]:
        return dict(self.statefulset["spec"]["template"]["spec"])

    @property
    def container(self) -> dict[str, Any]:
        (only,) = self.pod["containers"]
        return dict(only)

    @property
    def claim(self) -> dict[str, Any]:
        (only,) = self.statefulset["spec"]["volumeClaimTemplates"]
        return dict(only)

    def fill(self, value: str) -> str:
        """The value with its placeholders replaced."""

        def one(match: re.Match[str]) -> str:
            key = match.group(1)
            if key.startswith("tier."):
                return str(getattr(self.tier, key.removeprefix("tier.")))
            return {
                "name": self.name,
                "namespace": self.namespace,
                "deployment_id": self.deployment_id,
                "port": str(CATALOG.engines[self.engine].port),
                "maxmemory": str(int(quantity.parse(self.tier.memory_limit) * 3 // 4)),
            }[key]

        return PLACEHOLDER.sub(one, value)


def decoded(secret: dict[str, Any]) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}


def built(engine: str, size: str = "medium", *, replicas: int = 1) -> Target:
    deployment = _deployment(engine, size, replicas=replicas)
    return Target(
        engine=engine,
        name=deployment.resource_name,
        namespace=deployment.namespace,
        deployment_id=deployment.deployment_id,
        tier=CATALOG.sizes[size],
        statefulset=manifests.statefulset(deployment, CATALOG),
        secret=decoded(manifests.secret(deployment, CATALOG)),
    )


def contains(actual: Any, expected: Any) -> bool:
    """Whether ``actual`` has everything ``expected`` states: objects at least its keys, lists item by item."""
    if isinstance(expected, dict):
        return isinstance(actual, dict) and all(
            k in actual and contains(actual[k], v) for k, v in expected.items()
        )
    if isinstance(expected, list):
        return (
            isinstance(actual, list)
            and len(actual) == len(expected)
            and all(contains(a, e) for a, e in zip(actual, expected, strict=True))
        )
    return bool(actual == expected)


def _at(node: Any, path: list[str]) -> Any:
    for step in path:
        node = node.get(step) if isinstance(node, dict) else None
    return node


def actual_of(target: Target, row: Row) -> Any:
    """What the target has for a row's setting."""
    container = target.container
    kind, _, rest = row.setting.partition(" ")
    if kind == "image":
        return str(container["image"]).rpartition(":")[0]
    if kind == "mount":
        return container.get("volumeMounts")
    if kind == "args":
        return container.get("args")
    if kind == "probe":
        return {p: _at(container, [p, "exec", "command"]) for p in PROBES}
    if kind == "env":
        return next((e for e in container.get("env") or [] if e.get("name") == rest), None)
    if kind == "secret":
        return target.secret.get(rest)
    root, *path = row.setting.split(".")
    return _at({"pod": target.pod, "container": container, "claim": target.claim}[root], path)


def expected_of(target: Target, row: Row) -> Any:
    """What a row says the target must have, in the shape ``actual_of`` returns."""
    value = target.fill(row.value)
    kind, _, rest = row.setting.partition(" ")
    secret_name = naming.secret_name(CATALOG.engines[target.engine].resource_type, target.name)
    if kind in ("image", "secret"):
        return value
    if kind == "mount":
        return [{"name": "data", "mountPath": value}]
    if kind == "probe":
        return {p: ["sh", "-c", value] for p in PROBES}
    if kind == "env":
        if value.startswith("secret "):
            key = value.removeprefix("secret ")
            return {"name": rest, "valueFrom": {"secretKeyRef": {"name": secret_name, "key": key}}}
        return {"name": rest, "value": value}
    return json.loads(value)


def mismatches(target: Target) -> list[str]:
    """Every row the target does not satisfy, with what it has instead."""
    found = []
    for row in CONTRACTS[target.engine]:
        actual = actual_of(target, row)
        if row.setting.startswith("secret ") and row.value == "generated":
            ok = isinstance(actual, str) and GENERATED.fullmatch(actual) is not None
            shown: Any = "<not 32 letters and digits>" if actual else None
        else:
            expected = expected_of(target, row)
            ok = contains(actual, expected)
            shown = actual
        if not ok:
            found.append(f"{row.setting}: the page says {row.value!r}, the manifest has {shown!r}")
    return found


# The built manifests ------------------------------------------------------------------------------


@pytest.mark.parametrize("size", sorted(CATALOG.sizes))
@pytest.mark.parametrize("engine", ENGINES)
def test_the_built_statefulset_and_secret_satisfy_every_row_of_the_page(engine: str, size: str) -> None:
    assert mismatches(built(engine, size)) == []


@pytest.mark.parametrize("engine", ENGINES)
def test_the_built_container_and_pod_set_nothing_the_page_does_not_state(engine: str) -> None:
    target = built(engine)
    settings = [r.setting for r in CONTRACTS[engine]]
    kinds = {s.partition(" ")[0] for s in settings}
    stated_container = {f.split(".")[1] for f in settings if f.startswith("container.")}
    stated_container |= {
        field
        for kind, fields in {
            "image": ["image"],
            "mount": ["volumeMounts"],
            "env": ["env"],
            "args": ["args"],
            "probe": list(PROBES),
        }.items()
        if kind in kinds
        for field in fields
    }
    stated_pod = {f.split(".")[1] for f in settings if f.startswith("pod.")}

    assert set(target.container) - {"name"} == stated_container
    assert set(target.pod) - {"containers"} == stated_pod
    assert {e["name"] for e in target.container["env"]} == set(rows(engine, "env"))
    assert set(target.secret) == set(rows(engine, "secret"))
    pod_security = {f.split(".")[2] for f in settings if f.startswith("pod.securityContext.")}
    assert set(target.pod["securityContext"]) == pod_security


@pytest.mark.parametrize("engine", ENGINES)
def test_the_page_refers_only_to_secret_keys_the_secret_has(engine: str) -> None:
    referenced = {v.removeprefix("secret ") for v in rows(engine, "env").values() if v.startswith("secret ")}

    assert referenced <= set(rows(engine, "secret"))
    assert {"username", "password", "host", "port"} <= set(rows(engine, "secret"))


@pytest.mark.parametrize(
    ("engine", "data_dir"),
    [
        ("postgresql", lambda c: {e["name"]: e.get("value") for e in c["env"]}["PGDATA"]),
        ("mysql", lambda c: next(a for a in c["args"] if a.startswith("--datadir=")).partition("=")[2]),
    ],
)
def test_database_files_live_in_a_subdirectory_of_the_volume_never_at_its_root(engine, data_dir) -> None:
    """initdb and mysqld --initialize both refuse a directory holding lost+found, as fresh volumes do."""
    container = built(engine).container
    (mount,) = container["volumeMounts"]

    directory = pathlib.PurePosixPath(data_dir(container))

    assert pathlib.PurePosixPath(mount["mountPath"]) in directory.parents


def test_redis_requires_the_secrets_password_through_an_argument_kubernetes_expands() -> None:
    """The official image ignores REDIS_PASSWORD: only ``--requirepass`` protects the cache."""
    target = built("redis")
    env = {e["name"]: target.secret[e["valueFrom"]["secretKeyRef"]["key"]] for e in target.container["env"]}

    # Kubernetes replaces $(VAR) in args with the container's variable of that name.
    args = [K8S_VAR.sub(lambda m: env.get(m.group(1), m.group(0)), a) for a in target.container["args"]]

    assert args[args.index("--requirepass") + 1] == target.secret["password"]
    assert not any(K8S_VAR.search(a) for a in args), "an argument refers to a variable the container lacks"
    assert target.secret["password"] not in json.dumps(target.statefulset)


@pytest.mark.parametrize("size", sorted(CATALOG.sizes))
def test_redis_maxmemory_leaves_headroom_below_the_memory_limit(size: str) -> None:
    target = built("redis", size)
    args = target.container["args"]

    maxmemory = int(args[args.index("--maxmemory") + 1])

    limit = quantity.parse(CATALOG.sizes[size].memory_limit)
    assert 0.5 * float(limit) < maxmemory < 0.8 * float(limit)


@pytest.mark.parametrize("engine", ENGINES)
def test_scaling_does_not_change_the_pod_template(engine: str) -> None:
    """A changed template restarts every replica, so a scale-up would restart the running database."""
    one, three = built(engine, replicas=1), built(engine, replicas=3)

    assert one.statefulset["spec"]["template"] == three.statefulset["spec"]["template"]
    assert three.statefulset["spec"]["replicas"] == 3


def test_every_secret_gets_fresh_passwords_of_letters_and_digits() -> None:
    first, second = built("mysql").secret, built("mysql").secret

    assert first["password"] != second["password"]
    assert first["password"] != first["root-password"]
    assert all(GENERATED.fullmatch(s[k]) for s in (first, second) for k in ("password", "root-password"))


# The probe scripts, run by sh ---------------------------------------------------------------------

# Stand-ins record how they were called; the redis one answers as a server would.
STUBS = {
    "pg_isready": 'printf "%s\\n" "$@" > "$STUB_OUT"',
    "mysqladmin": 'printf "%s\\n" "MYSQL_PWD=$MYSQL_PWD" "$@" > "$STUB_OUT"',
    "redis-cli": (
        'printf "%s\\n" "$@" > "$STUB_OUT"\n'
        'if [ -n "$STUB_REPLY" ]; then echo "$STUB_REPLY"\n'
        'elif [ "$REDISCLI_AUTH" = "$STUB_PASSWORD" ]; then echo PONG\n'
        'else echo "NOAUTH Authentication required."; fi'
    ),
}


def run_probe(target: Target, tmp_path: pathlib.Path, **stub_env: str) -> tuple[int, list[str]]:
    """Run the target's readiness command with the container's variables, as the kubelet would."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in STUBS.items():
        stub = bin_dir / name
        stub.write_text(f"#!/bin/sh\n{body}\nexit 0\n")  # exit 0: the real tools do on error replies
        stub.chmod(0o755)
    env = {
        e["name"]: e["value"] if "value" in e else target.secret[e["valueFrom"]["secretKeyRef"]["key"]]
        for e in target.container["env"]
    }
    out = tmp_path / "called-with"
    env.update(PATH=f"{bin_dir}:/usr/bin:/bin", STUB_OUT=str(out), **stub_env)
    command = target.container["readinessProbe"]["exec"]["command"]
    code = subprocess.run(command, env=env, check=False, capture_output=True, timeout=10).returncode
    return code, out.read_text().splitlines() if out.exists() else []


needs_sh = pytest.mark.skipif(shutil.which("sh") is None, reason="no sh")


@needs_sh
def test_the_postgres_probe_asks_the_server_over_tcp_as_the_secrets_user(tmp_path: pathlib.Path) -> None:
    target = built("postgresql")

    code, argv = run_probe(target, tmp_path)

    assert code == 0
    assert argv == ["-U", target.secret["username"], "-d", target.secret["database"], "-h", "127.0.0.1"]


@needs_sh
def test_the_mysql_probe_pings_over_tcp_with_the_applications_credentials(tmp_path: pathlib.Path) -> None:
    target = built("mysql")

    code, argv = run_probe(target, tmp_path)

    assert code == 0
    assert argv == [
        f"MYSQL_PWD={target.secret['password']}",
        "ping",
        "-h",
        "127.0.0.1",
        "-u",
        target.secret["username"],
        "--silent",
    ]
    assert "MYSQL_PWD" not in {e["name"] for e in target.container["env"]}


@needs_sh
def test_the_redis_probe_passes_only_when_the_server_answers_pong(tmp_path: pathlib.Path) -> None:
    target = built("redis")
    password = target.secret["password"]

    assert run_probe(target, tmp_path, STUB_PASSWORD=password) == (0, ["-h", "127.0.0.1", "ping"])
    # redis-cli exits 0 on error replies; the probe must not.
    assert run_probe(target, tmp_path, STUB_PASSWORD="another")[0] != 0
    assert run_probe(target, tmp_path, STUB_PASSWORD=password, STUB_REPLY="LOADING Redis is loading")[0] != 0


# End to end: what a real broker applied to the sandbox --------------------------------------------


@pytest.fixture
async def manager(cluster_broker: RunningBroker) -> AsyncIterator[Manager]:
    async with (
        grpc.aio.insecure_channel(cluster_broker.grpc_target) as channel,
        aiohttp.ClientSession(base_url=cluster_broker.http_url, headers=HTTP_HEADERS) as http,
    ):
        yield Manager(broker_pb2_grpc.BrokerServiceStub(channel), http)


async def _raw(call: Any, name: str) -> dict[str, Any]:
    """An object as the API server sends it (no client-side model in between)."""
    response = await call(name, NS, _preload_content=False)
    return dict(json.loads(await response.read()))


@pytest.mark.parametrize(
    ("engine", "resource_type", "version"),
    [
        ("postgresql", pb.RESOURCE_TYPE_DATABASE, "15"),
        ("mysql", pb.RESOURCE_TYPE_DATABASE, "8.4"),
        ("redis", pb.RESOURCE_TYPE_CACHE, "7"),
    ],
)
async def test_a_provisioned_workload_in_the_cluster_follows_the_page_and_shows_no_drift(
    manager: Manager, kube_api: Any, engine: str, resource_type: int, version: str
) -> None:
    name = f"{engine}-contract"
    reply = await manager.provision(
        name, {"engine": engine, "version": version, "size": "small"}, resource_type=resource_type
    )
    state = await manager.wait_ready(reply.deployment_id)

    statefulset = await _raw(k8s.AppsV1Api(kube_api).read_namespaced_stateful_set, name)
    secret = await _raw(k8s.CoreV1Api(kube_api).read_namespaced_secret, f"{name}-credentials")
    live = Target(
        engine=engine,
        name=name,
        namespace=NS,
        deployment_id=reply.deployment_id,
        tier=CATALOG.sizes["small"],
        statefulset=statefulset,
        secret=decoded(secret),
    )

    assert mismatches(live) == []
    # The connection details the broker reports are the ones the Secret holds.
    assert (state.endpoint, str(state.port)) == (live.secret["host"], live.secret["port"])
    assert state.connection_secret == secret["metadata"]["name"]
    # The extra variables, arguments, probes and security contexts read back as no drift.
    assert unexpected_rules(state) == []
    assert state.health_status == pb.HEALTH_STATUS_HEALTHY

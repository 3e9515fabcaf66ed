"""The container image, built by ``./dev.sh image`` and started the way an operator starts it.

The container runs the image's own entrypoint and command (``broker serve --tokens
/etc/broker/tokens.yaml``) as its non-root user, on a read-only root filesystem with no tmpfs
anywhere, with host networking so that it reaches this test's sandbox cluster on loopback through
a mounted kubeconfig. Checked from outside: ``/readyz``, the image's HEALTHCHECK, ``grpcurl list``,
one Provision that reaches Ready with its objects in the sandbox, the store on the data volume, and a
SIGTERM that drains to exit 0; and that the sandbox is not in the image.

The image is (re)built first: with the layer cache that takes seconds; from scratch, minutes. CI
starts that build in ``.ci/run`` as the tests begin; the build here waits for it (builds take a
lock) and then finds its layers cached.

Engine: docker when its daemon answers, else podman, as ``scripts/build_image.sh`` chooses.
Where the runtime cannot set the default resource limits (this project's machines: runc's "error
setting rlimit type 7: operation not permitted"), the container gets the caller's own limits.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import pathlib
import re
import resource
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Sequence

import aiohttp
import grpc
import pytest
from broker_client.v1 import broker_pb2 as pb
from broker_client.v1 import broker_pb2_grpc
from conftest import ADMIN_TOKEN, bearer, until
from kube_sandbox import cluster as sandbox_cluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

REPO = pathlib.Path(__file__).resolve().parent.parent
GRPCURL = pathlib.Path(sys.executable).parent / "grpcurl"
UID = 10001  # the image's user
NS = "team-platform"


def _version() -> str:
    found = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.MULTILINE)
    assert found, "no version in pyproject.toml"
    return found.group(1)


IMAGE = os.environ.get("BROKER_IMAGE") or f"resource-broker:{_version()}"


def _engine() -> str:
    """docker when its daemon answers, else podman: the choice ``scripts/build_image.sh`` makes."""
    if os.environ.get("BROKER_IMAGE_ENGINE") != "podman" and shutil.which("docker"):
        answered = subprocess.run(["docker", "info"], capture_output=True, check=False, timeout=60)
        if answered.returncode == 0:
            return "docker"
    return "podman"


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Builds the image from this work tree with ``./dev.sh image``; the engine that has it."""
    log = tmp_path_factory.mktemp("image") / "build.log"
    with log.open("wb") as out:
        built = subprocess.run(
            ["./dev.sh", "image"], cwd=REPO, stdout=out, stderr=subprocess.STDOUT, check=False, timeout=1100
        )
    text = log.read_text(errors="replace")
    assert built.returncode == 0, f"./dev.sh image failed ({built.returncode}):\n{text[-6000:]}"
    return _engine()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _own_limits() -> list[str]:
    """--ulimit flags at this process's hard limits (nproc no higher than pid_max, as podman's is)."""
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nproc = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    with contextlib.suppress(OSError, ValueError):
        pid_max = int(pathlib.Path("/proc/sys/kernel/pid_max").read_text())
        nproc = pid_max if nproc == resource.RLIM_INFINITY else min(nproc, pid_max)
    return ["--ulimit", f"nofile={nofile}:{nofile}", "--ulimit", f"nproc={nproc}:{nproc}"]


async def run(*argv: str, limit: float = 120) -> tuple[int, str, str]:
    """Run a command without blocking the event loop (the sandbox serves on it meanwhile)."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout=limit)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


@dataclasses.dataclass
class Container:
    engine: str
    name: str
    grpc_target: str
    http_url: str
    data_dir: pathlib.Path

    async def logs(self) -> str:
        _, out, err = await run(self.engine, "logs", self.name)
        return out + err

    async def exec(self, *argv: str) -> tuple[int, str, str]:
        return await run(self.engine, "exec", self.name, *argv)

    async def inspect(self, template: str) -> str:
        code, out, err = await run(self.engine, "inspect", "--format", template, self.name)
        assert code == 0, err
        return out.strip()


async def start_container(engine: str, name: str, args: Sequence[str]) -> None:
    """``run -d`` the image; with the caller's limits where the runtime cannot set its defaults."""
    code, _, err = await run(engine, "run", "-d", "--name", name, *args)
    if code != 0 and engine == "podman" and "error setting rlimit" in err:
        await run(engine, "rm", "-f", name)
        code, _, err = await run(engine, "run", "-d", "--name", name, *_own_limits(), *args)
    assert code == 0, f"{engine} run failed ({code}):\n{err}"


@pytest.fixture
async def container(
    engine: str,
    tmp_path: pathlib.Path,
    tokens_file: pathlib.Path,
    sandbox: sandbox_cluster.Sandbox,
) -> AsyncIterator[Container]:
    """The image's broker in a container, pointed at the ``sandbox`` fixture's cluster."""
    kubeconfig = sandbox.write_kubeconfig(tmp_path / "kubeconfig")
    for readable in (kubeconfig, tokens_file):
        readable.chmod(0o644)  # the container's user is not the files' owner
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    os.chown(data_dir, UID, UID)
    grpc_port, http_port = _free_port(), _free_port()
    name = f"broker-test-{uuid.uuid4().hex[:10]}"
    args = [
        "--read-only",
        "--network",
        "host",
        "-v",
        f"{tokens_file}:/etc/broker/tokens.yaml:ro",
        "-v",
        f"{kubeconfig}:/etc/broker/kubeconfig:ro",
        "-v",
        f"{data_dir}:/var/lib/broker",
        "-e",
        f"BROKER_GRPC_ADDR=127.0.0.1:{grpc_port}",
        "-e",
        f"BROKER_HTTP_ADDR=127.0.0.1:{http_port}",
        "-e",
        "BROKER_KUBECONFIG=/etc/broker/kubeconfig",
        "-e",
        "BROKER_SHUTDOWN_GRACE=5",
    ]
    if engine == "podman":
        args.insert(1, "--read-only-tmpfs=false")  # podman's --read-only adds tmpfs on /tmp, /run: none
    try:
        await start_container(engine, name, [*args, IMAGE])
        yield Container(engine, name, f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}", data_dir)
    finally:
        await run(engine, "rm", "-f", name)


async def test_the_image_serves_a_provision_on_a_read_only_root_as_its_own_user(
    container: Container, kube_api: object
) -> None:
    logs = container.logs

    # Readiness from outside, then the image's own HEALTHCHECK inside.
    async def readyz() -> tuple[int, str]:
        try:
            async with aiohttp.ClientSession() as http, http.get(f"{container.http_url}/readyz") as r:
                return r.status, await r.text()
        except aiohttp.ClientError as e:
            return 0, f"{e!r}\n{await logs()}"

    _, body = await until(readyz, lambda r: r[0] == 200, within=90, what="/readyz 200")
    assert json.loads(body) == {"status": "ready"}

    healthcheck = await container.inspect("{{json .Config.Healthcheck}}")
    assert "/opt/broker/healthcheck.py" in healthcheck, healthcheck
    if container.engine == "podman":
        code, out, err = await run("podman", "healthcheck", "run", container.name)
        assert code == 0, out + err
    await until(
        lambda: container.inspect("{{.State.Health.Status}}"),
        lambda s: s == "healthy",
        within=60,
        what="the HEALTHCHECK's verdict healthy",
    )

    # Who and where: the image's user, nothing writable but the data volume.
    code, out, err = await container.exec("id", "-u")
    assert (code, out.strip()) == (0, str(UID)), err
    for path in ("/opt/broker/written", "/tmp/written", "/etc/broker/written"):
        code, _, err = await container.exec("touch", path)
        assert code != 0, f"{path} is writable"
        assert "Read-only file system" in err, (path, err)

    # The sandbox is a distribution of its own, never in the broker's image (DESIGN section 9).
    code, _, err = await container.exec("python3", "-c", "import kube_sandbox")
    assert code != 0, "kube_sandbox is importable in the image"
    assert "No module named 'kube_sandbox'" in err, err

    # An operator's grpcurl sees the services through reflection.
    code, out, err = await run(str(GRPCURL), "-plaintext", "-max-time", "20", container.grpc_target, "list")
    assert code == 0, err
    assert {"broker.v1.BrokerService", "grpc.health.v1.Health"} <= set(out.split())

    # One Provision, through to Ready, with its objects in the sandbox.
    async with grpc.aio.insecure_channel(container.grpc_target) as channel:
        stub = broker_pb2_grpc.BrokerServiceStub(channel)
        accepted = await stub.Provision(
            pb.ProvisionRequest(
                namespace=NS,
                resource_type=pb.RESOURCE_TYPE_DATABASE,
                resource_name="image-db",
                spec=pb.ResourceSpec(engine="postgresql", version="15", size="small"),
                request_id="image-test-1",
            ),
            metadata=bearer(ADMIN_TOKEN),
            timeout=20,
        )

        async def state() -> pb.ResourceState | None:
            response = await stub.GetResourceState(
                pb.GetResourceStateRequest(namespace=NS, deployment_id=accepted.deployment_id),
                metadata=bearer(ADMIN_TOKEN),
                timeout=20,
            )
            return response.resources[0] if response.resources else None

        ready = await until(
            state,
            lambda s: s is not None and s.phase == pb.STATE_READY,
            within=60,
            what="the provisioned database Ready",
        )
    assert ready is not None
    assert ready.health_status == pb.HEALTH_STATUS_HEALTHY
    assert ready.endpoint == "image-db.team-platform.svc.cluster.local"

    from kubernetes_asyncio import client

    statefulset = await client.AppsV1Api(kube_api).read_namespaced_stateful_set("image-db", NS)
    assert statefulset.metadata.labels["app.kubernetes.io/managed-by"]
    assert (container.data_dir / "broker.db").stat().st_uid == UID

    # SIGTERM (the engine's stop) drains and exits 0.
    code, _, err = await run(container.engine, "stop", "-t", "30", container.name, limit=60)
    assert code == 0, err
    exit_code = await container.inspect("{{.State.ExitCode}}")
    text = await logs()
    assert exit_code == "0", text
    assert "broker stopped" in text

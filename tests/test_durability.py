"""The broker as a real process: acknowledged provisions survive SIGKILL, SIGTERM drains and exits 0,
and start-up failures (a taken port, no authentication) exit 2 with a message a person can act on."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import pathlib
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator

import grpc
import pytest
from broker_client.v1 import broker_pb2 as pb
from broker_client.v1 import broker_pb2_grpc
from conftest import ADMIN_TOKEN, bearer
from grpc_health.v1 import health_pb2, health_pb2_grpc

NS = "team-platform"
AUTH = bearer(ADMIN_TOKEN)
START_TIMEOUT = 20.0

pytestmark = pytest.mark.slow


def free_port() -> int:
    """A port nothing listens on right now (bound to 0 and released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env() -> dict[str, str]:
    """The environment without broker settings a developer may have exported."""
    return {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}


def serve_argv(
    *, grpc_port: int, http_port: int, data_dir: pathlib.Path, tokens: pathlib.Path | None
) -> list[str]:
    argv = [
        sys.executable,
        "-m",
        "broker",
        "serve",
        "--grpc-addr",
        f"127.0.0.1:{grpc_port}",
        "--http-addr",
        f"127.0.0.1:{http_port}",
        "--data-dir",
        str(data_dir),
        "--shutdown-grace",
        "2",
    ]
    if tokens is not None:
        argv += ["--tokens", str(tokens)]
    return argv


@dataclasses.dataclass
class BrokerProcess:
    proc: asyncio.subprocess.Process
    grpc_port: int
    http_port: int
    log_path: pathlib.Path

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def _open_log(path: pathlib.Path):
    return path.open("wb")


async def wait_serving(broker: BrokerProcess) -> None:
    """Poll the gRPC health service until it says SERVING; fail early if the process died."""
    deadline = time.monotonic() + START_TIMEOUT
    async with grpc.aio.insecure_channel(broker.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            if broker.proc.returncode is not None:
                pytest.fail(f"broker exited with {broker.proc.returncode} while starting:\n{broker.log()}")
            try:
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"broker did not become healthy within {START_TIMEOUT}s:\n{broker.log()}")
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def broker_process(
    tmp_path: pathlib.Path, data_dir: pathlib.Path, tokens: pathlib.Path, name: str
) -> AsyncIterator[BrokerProcess]:
    """A ``broker serve`` subprocess on fresh ports, healthy on entry, killed on exit if still running."""
    log_path = tmp_path / f"{name}.log"
    grpc_port, http_port = free_port(), free_port()
    with _open_log(log_path) as log:
        proc = await asyncio.create_subprocess_exec(
            *serve_argv(grpc_port=grpc_port, http_port=http_port, data_dir=data_dir, tokens=tokens),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=child_env(),
        )
    broker = BrokerProcess(proc=proc, grpc_port=grpc_port, http_port=http_port, log_path=log_path)
    try:
        await wait_serving(broker)
        yield broker
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def run_to_exit(argv: list[str]) -> tuple[int, str]:
    """Run a command that is expected to exit on its own; its exit code and stderr."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=child_env(),
    )
    try:
        _, err = await asyncio.wait_for(proc.communicate(), timeout=START_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.communicate()
        pytest.fail(f"{argv[3:5]} did not exit within {START_TIMEOUT}s")
    assert proc.returncode is not None
    return proc.returncode, err.decode(errors="replace")


def spec_for(i: int) -> pb.ResourceSpec:
    return pb.ResourceSpec(
        engine="postgresql" if i % 2 else "mysql",
        version="15" if i % 2 else "8.0",
        size=("small", "medium", "large")[i % 3],
        replicas=1 + i % 3,
    )


# Durability ---------------------------------------------------------------------------------------


async def test_acknowledged_provisions_survive_sigkill(tmp_path: pathlib.Path, tokens_file: pathlib.Path):
    data_dir = tmp_path / "data"
    acknowledged: dict[str, tuple[str, pb.ResourceSpec, int]] = {}

    async with broker_process(tmp_path, data_dir, tokens_file, "first") as first:
        async with grpc.aio.insecure_channel(first.target) as channel:
            stub = broker_pb2_grpc.BrokerServiceStub(channel)

            async def create(i: int) -> None:
                reply = await stub.Provision(
                    pb.ProvisionRequest(
                        namespace=NS,
                        resource_type=pb.RESOURCE_TYPE_DATABASE,
                        resource_name=f"db-{i:03d}",
                        spec=spec_for(i),
                        request_id=f"create-{i}",
                    ),
                    metadata=AUTH,
                )
                acknowledged[reply.deployment_id] = (f"db-{i:03d}", spec_for(i), reply.generation)

            await asyncio.gather(*(create(i) for i in range(50)))
            # Ten acknowledged updates on top: generation 2 must survive as well.
            for deployment_id, (name, spec, _) in list(acknowledged.items())[:10]:
                updated = pb.ResourceSpec()
                updated.CopyFrom(spec)
                updated.size = "xlarge"
                reply = await stub.Provision(
                    pb.ProvisionRequest(
                        namespace=NS,
                        resource_type=pb.RESOURCE_TYPE_DATABASE,
                        resource_name=name,
                        spec=updated,
                    ),
                    metadata=AUTH,
                )
                assert reply.generation == 2
                acknowledged[deployment_id] = (name, updated, 2)
            # Right after the last acknowledgement: no chance to flush anything on the way out.
            first.proc.send_signal(signal.SIGKILL)
        assert await first.proc.wait() == -signal.SIGKILL

    assert len(acknowledged) == 50
    async with (
        broker_process(tmp_path, data_dir, tokens_file, "second") as second,
        grpc.aio.insecure_channel(second.target) as channel,
    ):
        stub = broker_pb2_grpc.BrokerServiceStub(channel)
        for deployment_id, (name, spec, generation) in acknowledged.items():
            deployment = (
                await stub.GetDeployment(
                    pb.GetDeploymentRequest(namespace=NS, deployment_id=deployment_id), metadata=AUTH
                )
            ).deployment
            assert deployment.resource_name == name
            assert deployment.generation == generation
            assert deployment.desired_spec.engine == spec.engine
            assert deployment.desired_spec.version == spec.version
            assert deployment.desired_spec.size == spec.size
            assert deployment.desired_spec.replicas == spec.replicas
        state = await stub.GetResourceState(
            pb.GetResourceStateRequest(namespace=NS, page_size=100), metadata=AUTH
        )
        assert state.total == 50
        assert {r.deployment_id for r in state.resources} == set(acknowledged)
        # Idempotency keys survived too: a retry after the crash gets the first answer, no new deployment.
        retry = await stub.Provision(
            pb.ProvisionRequest(
                namespace=NS,
                resource_type=pb.RESOURCE_TYPE_DATABASE,
                resource_name="db-007",
                spec=spec_for(7),
                request_id="create-7",
            ),
            metadata=AUTH,
        )
        assert acknowledged[retry.deployment_id][0] == "db-007"
        assert retry.generation == 1


# Start-up and shutdown ----------------------------------------------------------------------------


async def test_sigterm_drains_and_exits_0(tmp_path: pathlib.Path, tokens_file: pathlib.Path):
    async with broker_process(tmp_path, tmp_path / "data", tokens_file, "term") as broker:
        async with grpc.aio.insecure_channel(broker.target) as channel:
            stub = broker_pb2_grpc.BrokerServiceStub(channel)
            await stub.Provision(
                pb.ProvisionRequest(
                    namespace=NS,
                    resource_type=pb.RESOURCE_TYPE_DATABASE,
                    resource_name="db",
                    spec=spec_for(1),
                ),
                metadata=AUTH,
            )
        broker.proc.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(broker.proc.wait(), timeout=5)
        except TimeoutError:
            pytest.fail(f"the broker did not exit within 5 s of SIGTERM:\n{broker.log()}")

    assert code == 0, broker.log()
    assert "broker stopped" in broker.log()


@pytest.mark.parametrize("taken", ["grpc", "http"])
async def test_a_second_broker_on_a_taken_port_exits_2_with_a_readable_message(
    tmp_path: pathlib.Path, tokens_file: pathlib.Path, taken: str
):
    async with broker_process(tmp_path, tmp_path / "data", tokens_file, "first") as first:
        grpc_port = first.grpc_port if taken == "grpc" else free_port()
        http_port = first.http_port if taken == "http" else free_port()

        code, stderr = await run_to_exit(
            serve_argv(
                grpc_port=grpc_port, http_port=http_port, data_dir=tmp_path / "second", tokens=tokens_file
            )
        )

        assert code == 2, stderr
        taken_addr = f"127.0.0.1:{grpc_port if taken == 'grpc' else http_port}"
        assert f"cannot listen for {'gRPC' if taken == 'grpc' else 'HTTP'} on {taken_addr}" in stderr
        assert "Traceback" not in stderr
        # The first broker is unharmed and still answers.
        await wait_serving(first)
        async with grpc.aio.insecure_channel(first.target) as channel:
            state = await broker_pb2_grpc.BrokerServiceStub(channel).GetResourceState(
                pb.GetResourceStateRequest(namespace=NS), metadata=AUTH
            )
        assert state.total == 0


async def test_serve_without_tokens_or_insecure_exits_2(tmp_path: pathlib.Path):
    code, stderr = await run_to_exit(
        serve_argv(grpc_port=free_port(), http_port=free_port(), data_dir=tmp_path / "data", tokens=None)
    )

    assert code == 2
    assert "no authentication configured" in stderr
    assert "--tokens" in stderr
    assert "--insecure" in stderr
    assert "Traceback" not in stderr

"""The client distribution (``clients/python``) stands alone.

It is installed by itself into a fresh virtual environment (pip resolves grpcio and protobuf from the
machine's configured wheel mirror). There, none of the server's dependencies nor the server package
may be importable, and a script run with that environment's python talks to a broker this test
started in-process: reads state, and gets typed errors.
"""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import shutil
import sys
import textwrap

import pytest
from broker_client.client import BrokerClient
from conftest import PLATFORM_TOKEN, RunningBroker

CLIENT_SOURCE = pathlib.Path(__file__).resolve().parents[1] / "clients" / "python"
SERVER_ONLY = (
    "broker",
    "aiohttp",
    "kubernetes_asyncio",
    "aiosqlite",
    "yaml",
    "prometheus_client",
    "grpc_status",
)


def isolated_env() -> dict[str, str]:
    """This environment minus anything that would leak the test's own packages into the new venv."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")
        and not k.startswith("BROKER_")
    }
    env["PYTHONNOUSERSITE"] = "1"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


async def run(*args: str, cwd: pathlib.Path, limit: float) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *args,
        cwd=cwd,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=isolated_env(),
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), limit)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        pytest.fail(f"{' '.join(args)} took longer than {limit:g}s")
    return proc.returncode or 0, out.decode(), err.decode()


SCRIPT = textwrap.dedent(
    """
    import asyncio, json, sys

    from broker_client import errors
    from broker_client.client import BrokerClient

    async def main(target, token):
        async with await BrokerClient.connect(target, token=token) as client:
            states = await client.get_resource_state("team-platform")
            try:
                await client.get_resource_state("team-other")
                denied = None
            except errors.PermissionDenied as e:
                denied = [type(e).__name__, e.code.name]
        server_side = sorted(m for m in sys.modules if m.split(".")[0] in {server_only})
        print(json.dumps({{
            "resources": [[s.resource_name, s.deployment_id] for s in states],
            "denied": denied,
            "server_modules_loaded": server_side,
            "prefix": sys.prefix,
        }}))

    asyncio.run(main(sys.argv[1], sys.argv[2]))
    """
).format(server_only=repr(set(SERVER_ONLY)))


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_the_client_installs_alone_and_talks_to_a_broker_without_the_servers_dependencies(
    tmp_path: pathlib.Path, running_broker: RunningBroker
) -> None:
    # Build from a copy, so the install leaves nothing (build/, egg-info) in the working tree.
    source = tmp_path / "resource-broker-client"
    shutil.copytree(
        CLIENT_SOURCE, source, ignore=shutil.ignore_patterns("build", "dist", "*.egg-info", "__pycache__")
    )
    venv = tmp_path / "venv"
    python = venv / "bin" / "python"
    work = tmp_path / "elsewhere"  # not the repository: its cwd must not put `broker` on sys.path
    work.mkdir()

    code, out, err = await run(sys.executable, "-m", "venv", str(venv), cwd=work, limit=120)
    assert code == 0, err
    code, out, err = await run(
        str(python), "-m", "pip", "install", "--no-input", str(source), cwd=work, limit=240
    )
    assert code == 0, f"pip install failed:\n{out}\n{err}"

    # What got installed: the client and its two dependencies (and theirs), nothing of the server.
    code, out, err = await run(str(python), "-m", "pip", "list", "--format=json", cwd=work, limit=60)
    assert code == 0, err
    installed = {p["name"].lower().replace("_", "-") for p in json.loads(out)}
    assert {"resource-broker-client", "grpcio", "protobuf"} <= installed, installed
    for name in ("resource-broker", "aiohttp", "kubernetes-asyncio", "aiosqlite", "pyyaml", "grpcio-status"):
        assert name not in installed, f"{name} was installed with the client"

    # None of the server's modules can be imported there.
    probe = (
        "import importlib.util, json; "
        f"print(json.dumps({{m: importlib.util.find_spec(m) is not None for m in {list(SERVER_ONLY)!r}}}))"
    )
    code, out, err = await run(str(python), "-c", probe, cwd=work, limit=60)
    assert code == 0, err
    importable = json.loads(out)
    assert importable == dict.fromkeys(SERVER_ONLY, False), importable
    # ...while the client's own modules, the stubs included, import fine.
    code, out, err = await run(
        str(python),
        "-c",
        "import broker_client.client, broker_client.errors, broker_client.callbacks, broker_client.v1.broker_pb2_grpc; "
        "print(broker_client.client.__file__)",
        cwd=work,
        limit=60,
    )
    assert code == 0, err
    assert out.strip().startswith(str(venv)), out
    # The example manager says what it needs instead of half-working.
    code, out, err = await run(
        str(python), "-c", "import broker_client.examples.database_manager", cwd=work, limit=60
    )
    assert code != 0
    assert "kubernetes_asyncio" in err

    # A resource to read back, made through the in-process broker.
    async with await BrokerClient.connect(running_broker.grpc_target, token=PLATFORM_TOKEN) as client:
        reply = await client.provision(
            namespace="team-platform",
            resource_type="database",
            resource_name="standalone-db",
            engine="postgresql",
            version="15",
            size="small",
        )

    script = work / "manager.py"
    script.write_text(SCRIPT)
    code, out, err = await run(
        str(python), str(script), running_broker.grpc_target, PLATFORM_TOKEN, cwd=work, limit=60
    )
    assert code == 0, f"the standalone script failed:\n{out}\n{err}"
    result = json.loads(out.strip().splitlines()[-1])
    assert result["resources"] == [["standalone-db", reply.deployment_id]]
    assert result["denied"] == ["PermissionDenied", "PERMISSION_DENIED"]
    assert result["server_modules_loaded"] == []
    assert pathlib.Path(result["prefix"]) == venv

"""The settings table: every setting has a flag, an environment variable and a config-file key, the
README shows them as the code defines them, and a value set any of the three ways takes effect.
"""

from __future__ import annotations

import asyncio
import pathlib
import re
import subprocess
import sys

import grpc
import pytest
from aiohttp import web
from broker_client.v1 import broker_pb2 as pb
from broker_client.v1 import broker_pb2_grpc
from conftest import ADMIN_TOKEN, bearer, cluster_settings, until
from test_watch_support import value

from broker import cli, config, server, settings

ROOT = pathlib.Path(__file__).resolve().parent.parent


def parse(*argv: str) -> object:
    return cli._parser().parse_args(["serve", *argv])


def test_every_setting_lands_in_a_field_of_settings_with_a_default() -> None:
    fields = set()
    for setting in settings.TABLE:
        settings.default_of(server.Settings, setting.field)  # raises when the field does not exist
        fields.add(setting.field)
    assert len(fields) == len(settings.TABLE)
    assert len({s.flag for s in settings.TABLE}) == len(settings.TABLE)
    assert len({s.env for s in settings.TABLE}) == len(settings.TABLE)


def test_the_readme_table_is_the_one_the_code_defines() -> None:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- settings:begin[^>]*-->\n(.*?)\n<!-- settings:end -->", readme, re.DOTALL)
    assert block is not None
    assert block.group(1) == settings.markdown_table(server.Settings), "run ./dev.sh gen"


def test_the_issue_named_settings_exist_with_their_names() -> None:
    by_flag = {s.flag: s for s in settings.TABLE}
    assert by_flag["--event-retention"].env == "BROKER_EVENT_RETENTION"
    assert by_flag["--heartbeat-interval"].key == "heartbeat_interval"
    assert by_flag["--callback-max-backoff"].field == "callback_max_backoff"
    assert settings.default_of(server.Settings, "callback_max_backoff") == 60.0
    assert "--event-prune-interval" in by_flag


def test_a_flag_beats_the_environment_which_beats_the_file() -> None:
    file_values = {"heartbeat_interval": 7, "event_retention": 500, "callback_max_backoff": 9}
    environ = {"BROKER_HEARTBEAT_INTERVAL": "3", "BROKER_EVENT_RETENTION": "900"}
    values = settings.resolve(parse("--heartbeat-interval", "1.5"), file_values, environ)
    built = settings.build(server.Settings, values)
    assert built.watch.heartbeat_interval == 1.5  # flag
    assert built.event_retention == 900  # environment
    assert built.callback_max_backoff == 9.0  # file
    assert built.watch.buffer == server.Settings().watch.buffer  # untouched: the default


def test_switches_read_true_and_false_everywhere() -> None:
    values = settings.resolve(parse("--no-remediation"), {"insecure": True}, {"BROKER_NO_REFLECTION": "yes"})
    built = settings.build(server.Settings, values)
    assert built.remediate is False
    assert built.insecure is True
    assert built.reflection is False
    assert settings.build(server.Settings, settings.resolve(parse(), {"sandbox": False}, {})).sandbox is False


@pytest.mark.parametrize(
    ("argv", "file_values", "environ", "message"),
    [
        (("--heartbeat-interval", "soon"), {}, {}, "--heartbeat-interval"),
        (("--heartbeat-interval", "-1"), {}, {}, "positive"),
        ((), {}, {"BROKER_EVENT_RETENTION": "0"}, "BROKER_EVENT_RETENTION"),
        ((), {"grpc_addr": "nowhere"}, {}, "config file: grpc_addr"),
        ((), {"insecure": "maybe"}, {}, "switch"),
        ((), {"heartbeat_intervall": 3}, {}, "unknown keys heartbeat_intervall"),
    ],
)
def test_a_bad_value_names_where_it_came_from(
    argv: tuple[str, ...], file_values: dict[str, object], environ: dict[str, str], message: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        settings.resolve(parse(*argv), file_values, environ)


def test_the_config_file_takes_settings_beside_the_catalog(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "broker.yaml"
    path.write_text("max_replicas: 4\nheartbeat_interval: 2\nhttp_max_connections: 50\n")
    loaded = config.load(path)
    assert loaded.catalog.max_replicas == 4
    built = settings.build(server.Settings, settings.resolve(parse(), loaded.settings, {}))
    assert built.watch.heartbeat_interval == 2.0
    assert built.http.max_connections == 50
    path.write_text("heartbeat_intervall: 2\n")
    with pytest.raises(ValueError, match="unknown keys heartbeat_intervall"):
        config.load(path)


async def test_broker_serve_takes_the_heartbeat_from_its_config_file_and_the_environment(
    tmp_path: pathlib.Path,
) -> None:
    """The real command: a heartbeat interval from the environment, the port from the file."""
    path = tmp_path / "broker.yaml"
    path.write_text("grpc_addr: 127.0.0.1:0\nhttp_addr: 127.0.0.1:0\ninsecure: true\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "broker",
        "serve",
        "--config",
        str(path),
        "--data-dir",
        str(tmp_path / "data"),
        env={"BROKER_HEARTBEAT_INTERVAL": "0.2", "PATH": "/usr/bin:/bin"},
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stderr is not None
        port = None
        async with asyncio.timeout(30):
            while port is None:
                line = (await proc.stderr.readline()).decode()
                assert line, "the broker exited before serving"
                found = re.search(r"grpc=127\.0\.0\.1:(\d+)", line)
                port = int(found.group(1)) if found else None
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = broker_pb2_grpc.BrokerServiceStub(channel).WatchDrift(
                pb.WatchDriftRequest(namespaces=["team-platform"])
            )
            beats = 0
            async with asyncio.timeout(10):  # the 15 s default would send at most the first one
                async for message in call:
                    beats += message.WhichOneof("message") == "heartbeat"
                    if beats >= 4:
                        break
            call.cancel()
        assert beats >= 4
    finally:
        proc.terminate()
        await proc.wait()


async def test_the_callback_backoff_cap_bounds_the_wait_between_attempts(
    tmp_path: pathlib.Path, tokens_file: pathlib.Path, sandbox_kubeconfig: pathlib.Path
) -> None:
    """A receiver that keeps failing is retried at least every ``callback_max_backoff`` seconds
    (uncapped, the exponential backoff would space eight attempts over more than a minute)."""
    attempts: list[float] = []

    async def failing(request: web.Request) -> web.Response:
        attempts.append(asyncio.get_running_loop().time())
        return web.Response(status=503)

    app = web.Application()
    app.router.add_post("/cb", failing)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/cb"
    broker = server.Broker(
        cluster_settings(tmp_path / "data", tokens_file, sandbox_kubeconfig, callback_max_backoff=0.2)
    )
    await broker.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{broker.grpc_port}") as channel:
            await broker_pb2_grpc.BrokerServiceStub(channel).Provision(
                pb.ProvisionRequest(
                    namespace="team-platform",
                    resource_type=pb.RESOURCE_TYPE_CACHE,
                    resource_name="backoff-cache",
                    spec=pb.ResourceSpec(engine="redis", version="7", size="small", replicas=1),
                    callback_url=url,
                ),
                metadata=bearer(ADMIN_TOKEN),
            )
        await until(lambda: value(len(attempts)), lambda n: n >= 8, within=20, what="eight attempts")
    finally:
        await broker.stop()
        await runner.cleanup()

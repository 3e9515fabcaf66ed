"""Starting the sandbox: the async context manager, kubeconfig files and standalone mode."""

from __future__ import annotations

import asyncio
import contextlib
import pathlib

import aiohttp
import pytest
import yaml
from kube_sandbox import Sandbox, run_standalone
from kubernetes_asyncio import client, config


async def test_context_manager_serves_on_an_ephemeral_loopback_port(tmp_path: pathlib.Path) -> None:
    async with Sandbox(ready_delay=0.01) as sandbox:
        assert sandbox.url.startswith("http://127.0.0.1:")
        assert sandbox.port > 0
        path = sandbox.write_kubeconfig(tmp_path / "kc.yaml")
        doc = yaml.safe_load(path.read_text())
        assert doc["current-context"] == "sandbox"
        assert doc["clusters"] == [{"name": "sandbox", "cluster": {"server": sandbox.url}}]
        assert doc["users"][0]["name"] == "sandbox"
        assert doc["users"][0]["user"]["token"]
        assert doc["contexts"][0]["context"] == {
            "cluster": "sandbox",
            "user": "sandbox",
            "namespace": "default",
        }
        assert path.stat().st_mode & 0o777 == 0o600
        configuration = client.Configuration()
        await config.load_kube_config(config_file=str(path), client_configuration=configuration)
        async with client.ApiClient(configuration) as api:
            namespaces = await client.CoreV1Api(api).list_namespace()
        assert [n.metadata.name for n in namespaces.items] == [
            "default",
            "kube-node-lease",
            "kube-public",
            "kube-system",
        ]
        url = sandbox.url
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientConnectorError):
            await http.get(f"{url}/version")


async def test_run_standalone_writes_a_kubeconfig_and_says_it_is_a_sandbox(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    task = asyncio.create_task(run_standalone(host="127.0.0.1", port=0, data_dir=tmp_path))
    kubeconfig = tmp_path / "sandbox.kubeconfig"
    try:
        for _ in range(250):
            if kubeconfig.exists():
                break
            await asyncio.sleep(0.02)
        server = yaml.safe_load(kubeconfig.read_text())["clusters"][0]["cluster"]["server"]
        async with aiohttp.ClientSession() as http, http.get(f"{server}/api/v1/namespaces/default") as resp:
            assert resp.status == 200
            assert (await resp.json())["status"]["phase"] == "Active"
        out = capsys.readouterr().out
        assert "NOT A CLUSTER" in out
        assert server in out
        assert str(kubeconfig) in out
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert task.cancelled()


async def test_pod_logs_explain_there_are_none(sandbox, kube_api) -> None:
    core = client.CoreV1Api(kube_api)
    await core.create_namespaced_pod(
        "default",
        {"metadata": {"name": "l"}, "spec": {"containers": [{"name": "c", "image": "busybox:1.36"}]}},
    )
    text = await core.read_namespaced_pod_log("l", "default")
    assert "no logs" in text

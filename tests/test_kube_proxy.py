"""The Kubernetes client takes the proxy the environment names for the API server, as client-go does.

It is looked up once, when the client connects (the HTTP session no longer looks it up, and reads
no ``~/.netrc``, at every request); ``NO_PROXY`` still exempts hosts.
"""

from __future__ import annotations

import pathlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from broker import errors
from broker.kube import client as kube_client

PROXY_VARIABLES = ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy")


@pytest.fixture
async def proxy() -> AsyncIterator[tuple[str, list[str]]]:
    """A forward proxy on loopback that answers every request itself (503), recording its target."""
    seen: list[str] = []

    async def answer(request: web.Request) -> web.Response:
        seen.append(f"{request.method} {request.url}")
        return web.json_response({"kind": "Status", "message": "from the proxy"}, status=503)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}", seen
    finally:
        await runner.cleanup()


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


async def test_requests_go_through_the_proxy_the_environment_names(
    sandbox: Any,
    sandbox_kubeconfig: pathlib.Path,
    proxy: tuple[str, list[str]],
    clean_environment: pytest.MonkeyPatch,
) -> None:
    url, seen = proxy
    clean_environment.setenv("HTTP_PROXY", url)
    client = await kube_client.Client.connect(sandbox_kubeconfig)
    clean_environment.delenv("HTTP_PROXY")  # looked up at connect: the client keeps what it found
    try:
        with pytest.raises(errors.Unavailable, match="503"):
            await client.get("Secret", "team-platform", "db-credentials")
        with pytest.raises(errors.Unavailable, match="503"):
            await client.get("Secret", "team-platform", "db-credentials")
    finally:
        await client.close()
    assert seen == [f"GET {sandbox.url}/api/v1/namespaces/team-platform/secrets/db-credentials"] * 2


async def test_no_proxy_exempts_the_api_server(
    sandbox: Any,
    sandbox_kubeconfig: pathlib.Path,
    proxy: tuple[str, list[str]],
    clean_environment: pytest.MonkeyPatch,
) -> None:
    url, seen = proxy
    clean_environment.setenv("HTTP_PROXY", url)
    clean_environment.setenv("NO_PROXY", "127.0.0.1,localhost")
    client = await kube_client.Client.connect(sandbox_kubeconfig)
    try:
        with pytest.raises(errors.NotFound):  # the sandbox itself answered
            await client.get("Secret", "team-platform", "no-such-secret")
    finally:
        await client.close()
    assert seen == []

"""pytest fixtures that give each test its own running sandbox cluster.

Installing the distribution registers it (a ``pytest11`` entry point); the ``kube_api`` fixture
needs kubernetes-asyncio (``pip install 'kube-sandbox[pytest]'``).

* ``sandbox_options``: keyword arguments for :class:`kube_sandbox.Sandbox`; override the fixture
  in a module or conftest to change them (the default makes pods ready after 50 ms).
* ``sandbox``: a started sandbox on an ephemeral loopback port, stopped after the test.
* ``sandbox_kubeconfig``: the path of a kubeconfig for it in ``tmp_path``.
* ``kube_api``: a kubernetes-asyncio ``ApiClient`` configured from that kubeconfig, closed after.
"""

from __future__ import annotations

import pathlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from kube_sandbox import cluster


@pytest.fixture
def sandbox_options() -> dict[str, Any]:
    """Keyword arguments for the ``sandbox`` fixture's :class:`Sandbox`; override to customise."""
    return {"ready_delay": 0.05}


@pytest_asyncio.fixture
async def sandbox(sandbox_options: dict[str, Any]) -> AsyncIterator[cluster.Sandbox]:
    """A started sandbox cluster on 127.0.0.1 and an ephemeral port."""
    instance = cluster.Sandbox(**sandbox_options)
    await instance.start(host="127.0.0.1", port=0)
    try:
        yield instance
    finally:
        await instance.stop()


@pytest.fixture
def sandbox_kubeconfig(sandbox: cluster.Sandbox, tmp_path: pathlib.Path) -> pathlib.Path:
    """A kubeconfig (context ``sandbox``) for the ``sandbox`` fixture."""
    return sandbox.write_kubeconfig(tmp_path / "sandbox.kubeconfig")


@pytest_asyncio.fixture
async def kube_api(sandbox_kubeconfig: pathlib.Path) -> AsyncIterator[Any]:
    """A kubernetes-asyncio ``ApiClient`` loaded from ``sandbox_kubeconfig``."""
    from kubernetes_asyncio import client, config  # only tests that ask for it need the library

    configuration = client.Configuration()
    await config.load_kube_config(config_file=str(sandbox_kubeconfig), client_configuration=configuration)
    api = client.ApiClient(configuration)
    try:
        yield api
    finally:
        await api.close()

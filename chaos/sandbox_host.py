"""The sandbox cluster with a second, control port: ``python -m chaos.sandbox_host``.

``broker sandbox`` serves the Kubernetes API and the fault switchboard (``/sandbox/v1/faults``) on
one listener, and the pause fault closes that listener: while the API is paused nothing can reach
the sandbox over HTTP, not even to change a workload behind the broker's back. The sandbox does
offer a path the pause does not block, its in-process Python API (``Sandbox.faults``,
``Sandbox.store``), which is what this host exposes on its own loopback port:

=====================  ===============================================================
``GET  /state``        ``{"paused": bool, "url": ...}``
``POST /pause``        close the API listener until ``/resume`` (no duration)
``POST /resume``       listen again on the same port
``POST /scale``        ``{"namespace", "name", "replicas"}``: set a StatefulSet's replicas
                       in the store directly, as ``kubectl scale`` would (field manager
                       ``kubectl``, subresource ``scale``); works while paused
=====================  ===============================================================

It prints ``sandbox API server: URL`` and ``sandbox control: URL`` and writes
``<data-dir>/sandbox.kubeconfig``, like ``broker sandbox``. SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import pathlib
import signal
from typing import Any

from aiohttp import web
from kube_sandbox import cluster, store


class Control:
    """The control endpoints around one running sandbox."""

    def __init__(self, sandbox: cluster.Sandbox) -> None:
        self.sandbox = sandbox

    def app(self) -> web.Application:
        """The aiohttp application of the control port."""
        app = web.Application()
        app.router.add_get("/state", self._state)
        app.router.add_post("/pause", self._pause)
        app.router.add_post("/resume", self._resume)
        app.router.add_post("/scale", self._scale)
        return app

    def _describe(self) -> dict[str, Any]:
        return {"paused": self.sandbox.paused, "url": self.sandbox.url}

    async def _state(self, request: web.Request) -> web.Response:
        return web.json_response(self._describe())

    async def _pause(self, request: web.Request) -> web.Response:
        if not self.sandbox.paused:
            await self.sandbox.faults.pause()
        return web.json_response(self._describe())

    async def _resume(self, request: web.Request) -> web.Response:
        await self.sandbox.faults.resume()
        return web.json_response(self._describe())

    async def _scale(self, request: web.Request) -> web.Response:
        body = await request.json()
        namespace, name, replicas = body.get("namespace"), body.get("name"), body.get("replicas")
        if not isinstance(namespace, str) or not isinstance(name, str) or not isinstance(replicas, int):
            return web.json_response({"error": "namespace, name (strings), replicas (int)"}, status=400)
        rt = self.sandbox.store.registry.by_kind(api_version="apps/v1", kind="StatefulSet")
        assert rt is not None
        current = self.sandbox.store.find(rt.storage_key, namespace, name)
        if current is None:
            return web.json_response({"error": f"statefulset {namespace}/{name} not found"}, status=404)
        changed = store.thaw(current)
        changed["spec"]["replicas"] = replicas
        updated = self.sandbox.store.update(rt, changed, manager="kubectl", subresource="scale")
        return web.json_response(
            {"resourceVersion": updated["metadata"]["resourceVersion"], **self._describe()}
        )


async def serve(*, host: str, port: int, data_dir: pathlib.Path, ready_delay: float) -> None:
    """Run the sandbox and its control port until SIGTERM or SIGINT."""
    sandbox = cluster.Sandbox(ready_delay=ready_delay)
    await sandbox.start(host=host, port=port)
    runner = web.AppRunner(Control(sandbox).app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, 0)
    await site.start()
    control_port = runner.addresses[0][1]
    path = sandbox.write_kubeconfig(data_dir / "sandbox.kubeconfig")
    print("THIS IS AN IN-MEMORY KUBERNETES SANDBOX, NOT A CLUSTER (chaos host).", flush=True)
    print(f"sandbox API server: {sandbox.url}", flush=True)
    print(f"sandbox control: http://{host}:{control_port}", flush=True)
    print(f"kubeconfig: {path}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        with contextlib.suppress(Exception):
            await sandbox.stop()


def main() -> None:
    """Parse the command line and serve."""
    parser = argparse.ArgumentParser(prog="python -m chaos.sandbox_host", description=__doc__)
    parser.add_argument("--addr", default="127.0.0.1:0", help="API listen address (loopback)")
    parser.add_argument("--data-dir", type=pathlib.Path, required=True)
    parser.add_argument("--ready-delay", type=float, default=0.2, help="seconds until a pod is Ready")
    args = parser.parse_args()
    host, _, port = args.addr.rpartition(":")
    if host != "127.0.0.1":
        parser.error("the chaos sandbox listens on 127.0.0.1 only")
    args.data_dir.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(host=host, port=int(port), data_dir=args.data_dir, ready_delay=args.ready_delay))


if __name__ == "__main__":
    main()

"""``kube-sandbox``: run the sandbox Kubernetes API on its own, for kubectl and clients.

    kube-sandbox --addr 127.0.0.1:8001 --data-dir .sandbox --profile platform

It prints its URL and writes ``<data-dir>/sandbox.kubeconfig``; its objects are kept in
``<data-dir>/sandbox/state.json`` across runs. Ctrl-C or SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import pathlib
import signal
import sys

from kube_sandbox import cluster, profiles


def _addr(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT (for example 127.0.0.1:8001)")
    return host.strip("[]"), int(port)


def parser() -> argparse.ArgumentParser:
    """The command line of ``kube-sandbox``."""
    p = argparse.ArgumentParser(prog="kube-sandbox", description=__doc__.splitlines()[0])
    p.add_argument("--addr", type=_addr, default=("127.0.0.1", 0), help="HOST:PORT (default a free port)")
    p.add_argument(
        "--data-dir", type=pathlib.Path, default=pathlib.Path(".sandbox"), help="kubeconfig and state"
    )
    p.add_argument(
        "--profile",
        choices=sorted(profiles.PROFILES),
        default="empty",
        help="objects a fresh sandbox starts with (platform: team-platform and Strimzi's KafkaTopic CRD)",
    )
    return p


async def _serve(args: argparse.Namespace) -> None:
    host, port = args.addr
    task = asyncio.create_task(
        cluster.run_standalone(
            host=host, port=port, data_dir=args.data_dir, profile=profiles.PROFILES[args.profile]
        )
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await task


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``kube-sandbox`` console script."""
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(_serve(args))
    except OSError as e:
        print(f"kube-sandbox: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

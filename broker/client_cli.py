"""``broker get``, ``broker watch`` and ``broker admission-policy``: the broker for people, over gRPC."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import Coroutine
from typing import Any

import yaml
from broker_client import errors as client_errors
from broker_client import flags
from broker_client.client import BrokerClient
from broker_client.v1 import broker_pb2 as pb
from google.protobuf import json_format


def add_arguments(parser: argparse.ArgumentParser, *, watch: bool) -> None:
    """The flags of ``get`` and ``watch``, spelled as in every client program (``broker_client.flags``)."""
    flags.add_connection_flags(parser)
    flags.add_namespace_flag(
        parser,
        repeatable=watch,
        required=not watch,
        help="namespace" + (" (repeatable; default: all the token may see)" if watch else ""),
    )
    parser.add_argument("--type", choices=["database", "cache", "topic"], help="only this resource type")
    parser.add_argument("--name", default="", help="only this resource name")
    parser.add_argument("-o", "--output", choices=["table", "json"], default="table")


def add_admission_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``admission-policy``: the connection flags of ``get``, a mode, an output format."""
    flags.add_connection_flags(parser)
    parser.add_argument(
        "--mode",
        default="",
        help="drift-prevention modes in --drift-prevention's syntax (deny, warn,labels=audit, ...); "
        "default: the broker's setting",
    )
    parser.add_argument("-o", "--output", choices=["yaml", "json"], default="yaml")


async def admission_policy(args: argparse.Namespace) -> int:
    """Print the drift-prevention policies and bindings as YAML documents (or a JSON List)."""
    async with await BrokerClient.connect(args.target, token=args.token, tls=args.tls) as client:
        objects, _ = await client.admission_policy(mode=args.mode)
    if not objects:
        print("# drift prevention is off for every category: no admission objects", file=sys.stderr)
    if args.output == "json":
        print(json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}, indent=2, sort_keys=True))
    else:
        # Sorted keys: the objects come through a protobuf Struct (no order), and Git wants stable diffs.
        print(yaml.safe_dump_all(objects, sort_keys=True, width=1000), end="")
    return 0


def _short(enum: Any, number: int, prefix: str) -> str:
    return "".join(part.capitalize() for part in enum.Name(number).removeprefix(prefix).split("_"))


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows)


async def get(args: argparse.Namespace) -> int:
    """Print resource states as a table (or JSON)."""
    async with await BrokerClient.connect(args.target, token=args.token, tls=args.tls) as client:
        states = await client.get_resource_state(
            args.namespace, resource_type=args.type, resource_name=args.name
        )
    if args.output == "json":
        print(json.dumps([json_format.MessageToDict(s) for s in states], indent=2))
        return 0
    rows = [["NAME", "TYPE", "PHASE", "HEALTH", "DRIFT", "COST/MONTH", "DEPLOYMENT"]]
    for s in states:
        unexpected = [i.message for i in s.drift_items if i.drift_class == pb.DRIFT_CLASS_UNEXPECTED]
        drift = "; ".join(unexpected) or ("expected only" if s.drift_items else "none")
        rows.append(
            [
                s.resource_name,
                _short(pb.ResourceType, s.resource_type, "RESOURCE_TYPE_").lower(),
                _short(pb.State, s.phase, "STATE_"),
                _short(pb.HealthStatus, s.health_status, "HEALTH_STATUS_") if s.health_status else "-",
                drift,
                f"{s.estimated_monthly_cost:.2f}" if s.HasField("estimated_monthly_cost") else "-",
                s.deployment_id,
            ]
        )
    print(_table(rows) if len(rows) > 1 else f"no resources in namespace {args.namespace}")
    return 0


async def watch(args: argparse.Namespace) -> int:
    """Print drift events as they happen, until interrupted."""
    async with await BrokerClient.connect(args.target, token=args.token, tls=args.tls) as client:
        async for message in client.watch_drift(
            namespaces=args.namespace or (), resource_type=args.type, resource_name=args.name
        ):
            if message.WhichOneof("message") != "event":
                continue
            event = message.event
            if args.output == "json":
                print(json.dumps(json_format.MessageToDict(event)), flush=True)
                continue
            when = event.event_time.ToDatetime().strftime("%H:%M:%S")
            kind = _short(pb.DriftEventKind, event.kind, "DRIFT_EVENT_KIND_")
            where = f"{event.namespace}/{event.resource_name}"
            print(f"{when}  #{event.sequence:<6} {where}  {kind:<22} {event.message}", flush=True)
    return 0


def run(command: str, args: argparse.Namespace) -> int:
    """Run a client command; broker errors become a message and exit code 1, Ctrl-C exit code 130."""
    commands = {"get": get, "watch": watch, "admission-policy": admission_policy}
    try:
        return asyncio.run(_interruptible(commands[command](args)))
    except client_errors.BrokerError as e:
        print(f"broker {command}: {e.code.name}: {e.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


async def _interruptible(command: Coroutine[Any, Any, int]) -> int:
    """Run ``command``; SIGINT cancels it (closing its streams) and makes the exit code 130.

    The handler is the event loop's own, installed whatever SIGINT's inherited disposition: a
    process started in the background of a non-interactive shell (a script's ``broker watch &``,
    a CI runner's test suite) inherits SIGINT *ignored*, and then ``asyncio.run`` installs no
    handler of its own, so Ctrl-C or ``kill -INT`` did nothing and ``watch`` ran on. A second
    SIGINT, should closing hang, interrupts at once.
    """
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    task = asyncio.ensure_future(command)
    interrupted = False

    def on_sigint() -> None:
        nonlocal interrupted
        if interrupted:
            raise KeyboardInterrupt
        interrupted = True
        task.cancel()

    try:
        loop.add_signal_handler(signal.SIGINT, on_sigint)
    except (NotImplementedError, RuntimeError):  # no loop signal handlers here (Windows)
        return await task
    try:
        return await task
    except asyncio.CancelledError:
        if interrupted and main is not None and not main.cancelling():
            return 130
        raise
    finally:
        with contextlib.suppress(Exception):
            loop.remove_signal_handler(signal.SIGINT)

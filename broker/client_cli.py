"""``broker get`` and ``broker watch``: the broker's state for people, over gRPC with the client library."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Any

from broker_client import errors as client_errors
from broker_client.client import BrokerClient
from broker_client.v1 import broker_pb2 as pb
from google.protobuf import json_format


def add_arguments(parser: argparse.ArgumentParser, *, watch: bool) -> None:
    """The flags shared by ``get`` and ``watch``."""
    parser.add_argument(
        "--target",
        default=os.environ.get("BROKER_TARGET", "localhost:50051"),
        help="broker gRPC address (default localhost:50051, or $BROKER_TARGET)",
    )
    parser.add_argument(
        "--token", default=os.environ.get("BROKER_TOKEN"), help="bearer token (or $BROKER_TOKEN)"
    )
    parser.add_argument("--tls", action="store_true", help="the broker's gRPC port is behind TLS")
    parser.add_argument(
        "-n",
        "--namespace",
        required=not watch,
        action="append" if watch else "store",
        help="namespace" + (" (repeatable; default: all the token may see)" if watch else ""),
    )
    parser.add_argument("--type", choices=["database", "cache", "topic"], help="only this resource type")
    parser.add_argument("--name", default="", help="only this resource name")
    parser.add_argument("-o", "--output", choices=["table", "json"], default="table")


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
    """Run ``get`` or ``watch``; broker errors become a message and exit code 1."""
    try:
        return asyncio.run(get(args) if command == "get" else watch(args))
    except client_errors.BrokerError as e:
        print(f"broker {command}: {e.code.name}: {e.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130

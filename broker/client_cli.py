"""``broker get``, ``watch``, ``costs``, ``budget``, ``admission-policy``, ``pending``, ``approve`` and
``reject``: the broker for people, over gRPC."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import signal
import sys
import uuid
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


def add_costs_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``costs``: those of ``get`` for one namespace, how many drifts, an output format."""
    flags.add_connection_flags(parser)
    flags.add_namespace_flag(parser, repeatable=False, required=True, help="namespace")
    parser.add_argument(
        "--max-drifts", type=int, default=0, help="how many of the costliest drifts to show (default 10)"
    )
    parser.add_argument("-o", "--output", choices=["table", "json"], default="table")


def add_budget_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``budget``: those of ``get`` for one namespace, and an amount (or ``--remove``)."""
    flags.add_connection_flags(parser)
    flags.add_namespace_flag(parser, repeatable=False, required=True, help="namespace")
    what = parser.add_mutually_exclusive_group()
    what.add_argument(
        "amount", nargs="?", type=float, default=None, help="the monthly budget to set (leave out to show it)"
    )
    what.add_argument(
        "--remove",
        action="store_true",
        help="remove the budget set through the API (a configured one applies)",
    )
    parser.add_argument("-o", "--output", choices=["table", "json"], default="table")


def add_pending_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``pending``: those of ``get`` (connection, ``-n``), decided ones, an output format."""
    flags.add_connection_flags(parser)
    flags.add_namespace_flag(parser, repeatable=False, required=True, help="namespace")
    parser.add_argument("--deployment", default="", help="only this deployment id")
    parser.add_argument("--all", action="store_true", help="decided, expired and superseded ones too")
    parser.add_argument("-o", "--output", choices=["table", "json"], default="table")


def add_decision_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``approve`` and ``reject``: those of ``get``, the remediation id, a reason."""
    flags.add_connection_flags(parser)
    flags.add_namespace_flag(parser, repeatable=False, required=True, help="namespace")
    parser.add_argument("remediation_id", metavar="ID", help="the remediation id (broker pending lists them)")
    parser.add_argument("--reason", default="", help="a note for the audit log and the event (a ticket, say)")
    parser.add_argument(
        "--request-id",
        default="",
        help="makes the call idempotent: a retry with the same id gets the first answer "
        "(default: a new UUID)",
    )
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


def _window(reply: pb.GetRemediationPolicyResponse, now: datetime.datetime) -> str:
    """When automatic remediation may next run: ``open until 03:00Z``, ``next 02:00Z``, or ``always``."""
    if not reply.HasField("next_window_start"):
        return "always"
    start = reply.next_window_start.ToDatetime(datetime.UTC)
    end = reply.next_window_end.ToDatetime(datetime.UTC)
    if start <= now < end:
        return f"open until {end.strftime('%Y-%m-%d %H:%MZ')}"
    return f"next {start.strftime('%Y-%m-%d %H:%MZ')}"


async def get(args: argparse.Namespace) -> int:
    """Print resource states as a table (or JSON), with each type's next maintenance window."""
    async with await BrokerClient.connect(args.target, token=args.token, tls=args.tls) as client:
        states = await client.get_resource_state(
            args.namespace, resource_type=args.type, resource_name=args.name
        )
        summary = (
            await _summary_or_none(client, args.namespace) if args.output == "table" and states else None
        )
        types = sorted({s.resource_type for s in states})
        policies = {
            t: await client.get_remediation_policy_window(args.namespace, resource_type=t) for t in types
        }
    if args.output == "json":
        print(json.dumps([json_format.MessageToDict(s) for s in states], indent=2))
        return 0
    now = datetime.datetime.now(datetime.UTC)
    rows = [["NAME", "TYPE", "PHASE", "HEALTH", "DRIFT", "COST/MONTH", "WINDOW", "DEPLOYMENT"]]
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
                _window(policies[s.resource_type], now),
                s.deployment_id,
            ]
        )
    if len(rows) == 1:
        print(f"no resources in namespace {args.namespace}")
        return 0
    print(_table(rows))
    if summary is not None:
        print()
        print(_cost_line(summary))
    return 0


async def _summary_or_none(client: BrokerClient, namespace: str) -> pb.GetCostSummaryResponse | None:
    """The namespace's cost summary; None from a broker that predates cost budgets."""
    try:
        return await client.get_cost_summary(namespace)
    except client_errors.BrokerError as e:
        if e.code.name == "UNIMPLEMENTED":
            return None
        raise


def _money(value: float) -> str:
    return f"{value:.2f}"


def _budget_text(budget: pb.CostBudget) -> str:
    if not budget.HasField("monthly_budget"):
        return "none"
    source = (
        _short(pb.CostBudgetSource, budget.source, "COST_BUDGET_SOURCE_").lower() if budget.source else ""
    )
    return _money(budget.monthly_budget) + (f" ({source})" if source else "")


def _cost_line(summary: pb.GetCostSummaryResponse) -> str:
    """One line of a namespace's monthly cost: desired, actual, budget and whether it is exceeded."""
    line = (
        f"COST/MONTH  desired {_money(summary.desired_monthly_cost)}  actual "
        f"{_money(summary.actual_monthly_cost)}  budget {_budget_text(summary.budget)}"
    )
    return line + ("  EXCEEDED" if summary.budget_exceeded else "")


async def costs(args: argparse.Namespace) -> int:
    """Print a namespace's cost summary: totals and budget, per resource, the costliest drifts."""
    async with await BrokerClient.connect(args.target, token=args.token, tls=args.tls) as client:
        summary = await client.get_cost_summary(args.namespace, max_drifts=args.max_drifts)
    if args.output == "json":
        print(
            json.dumps(
                json_format.MessageToDict(summary, always_print_fields_with_no_presence=True), indent=2
            )
        )
        return 0
    print(f"NAMESPACE {summary.namespace}")
    print(_cost_line(summary))
    print(f"COST ALERT THRESHOLD  {summary.cost_alert_threshold * 100:g}% above the desired cost")
    if summary.resources:
        rows = [["NAME", "TYPE", "DESIRED/MONTH", "ACTUAL/MONTH", "DEPLOYMENT"]]
        for r in summary.resources:
            rows.append(
                [
                    r.resource_name,
                    _short(pb.ResourceType, r.resource_type, "RESOURCE_TYPE_").lower(),
                    _money(r.desired_monthly_cost) if r.HasField("desired_monthly_cost") else "-",
                    _money(r.actual_monthly_cost) if r.HasField("actual_monthly_cost") else "-",
                    r.deployment_id,
                ]
            )
        print()
        print(_table(rows))
    if summary.top_drifts:
        rows = [["NAME", "FIELD", "DESIRED", "ACTUAL", "COST/MONTH", "DRIFT"]]
        for d in summary.top_drifts:
            rows.append(
                [d.resource_name, d.field, d.desired, d.actual, f"+{_money(d.monthly_cost_delta)}", d.message]
            )
        print()
        print("COSTLIEST DRIFTS")
        print(_table(rows))
    return 0


async def budget(args: argparse.Namespace) -> int:
    """Show a namespace's budget, set it, or remove the one set through the API."""
    async with await BrokerClient.connect(args.target, token=args.token, tls=args.tls) as client:
        if args.remove or args.amount is not None:
            shown = await client.set_cost_budget(args.namespace, None if args.remove else args.amount)
        else:
            shown = await client.get_cost_budget(args.namespace)
    if args.output == "json":
        print(json.dumps(json_format.MessageToDict(shown), indent=2))
    else:
        print(f"namespace {shown.namespace}: monthly budget {_budget_text(shown)}")
    return 0


def _change_line(c: pb.ProposedChange) -> str:
    by = f" (changed by {c.changed_by})" if c.changed_by else ""
    cost = f", {c.monthly_cost_delta:+.2f}/month" if c.HasField("monthly_cost_delta") else ""
    return f"{c.field} {getattr(c, 'from') or '(missing)'} -> {c.to}{by}{cost}"


def _print_remediations(remediations: list[pb.PendingRemediation], output: str) -> None:
    if output == "json":
        print(json.dumps([json_format.MessageToDict(r) for r in remediations], indent=2))
        return
    rows = [["ID", "RESOURCE", "STATE", "CHANGES", "COST/MONTH", "EXPIRES", "DECIDED BY"]]
    for r in remediations:
        rows.append(
            [
                r.remediation_id,
                f"{_short(pb.ResourceType, r.resource_type, 'RESOURCE_TYPE_').lower()}/{r.resource_name}",
                _short(pb.RemediationState, r.state, "REMEDIATION_STATE_"),
                "; ".join(_change_line(c) for c in r.changes),
                f"{r.monthly_cost_delta:+.2f}" if r.HasField("monthly_cost_delta") else "-",
                r.expire_time.ToDatetime(datetime.UTC).strftime("%Y-%m-%d %H:%MZ"),
                r.decided_by or "-",
            ]
        )
    print(_table(rows))


async def pending(args: argparse.Namespace) -> int:
    """Print the remediations that wait for approval (JSON: a list of PendingRemediation)."""
    async with await BrokerClient.connect(args.target, token=args.token, tls=args.tls) as client:
        found = await client.list_pending_remediations(
            args.namespace, deployment_id=args.deployment, include_decided=args.all
        )
    if not found and args.output == "table":
        print(f"no pending remediations in namespace {args.namespace}")
        return 0
    _print_remediations(list(found), args.output)
    return 0


async def _decide(args: argparse.Namespace, *, approve: bool) -> int:
    request_id = args.request_id or str(uuid.uuid4())
    async with await BrokerClient.connect(args.target, token=args.token, tls=args.tls) as client:
        decide = client.approve_remediation if approve else client.reject_remediation
        decided = await decide(args.namespace, args.remediation_id, request_id=request_id, reason=args.reason)
    if args.output == "json":
        print(json.dumps(json_format.MessageToDict(decided), indent=2))
        return 0
    verb = "approved; the broker re-applies" if approve else "rejected; the drift stays:"
    print(f"{decided.remediation_id} {verb} " + "; ".join(_change_line(c) for c in decided.changes))
    return 0


async def approve(args: argparse.Namespace) -> int:
    """Approve one pending remediation; the broker carries it out."""
    return await _decide(args, approve=True)


async def reject(args: argparse.Namespace) -> int:
    """Reject one pending remediation; the drift stays."""
    return await _decide(args, approve=False)


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
    commands = {
        "get": get,
        "watch": watch,
        "costs": costs,
        "budget": budget,
        "admission-policy": admission_policy,
        "pending": pending,
        "approve": approve,
        "reject": reject,
    }
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

"""The ``broker`` command: ``broker serve`` runs the broker, ``broker migrate`` prepares its store.

The settings of ``serve`` are ``broker.settings.TABLE``: each has a flag, an environment variable
and a config-file key. ``BROKER_LOG_LEVEL`` and ``BROKER_LOG_FORMAT`` set the logging of every
command; a flag wins over its variable.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pathlib
import sys

from broker import client_cli, config, errors, logs, server, settings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="broker", description="Resource broker for Kubernetes manager services."
    )
    parser.add_argument(
        "--log-level",
        default=os.environ.get("BROKER_LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"],
    )
    parser.add_argument(
        "--log-format", default=os.environ.get("BROKER_LOG_FORMAT", "text"), choices=["text", "json"]
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser(
        "serve",
        help="run the broker (gRPC and the /v1 HTTP gateway)",
        description="Every setting also reads its environment variable and its key in the --config "
        "file (flag first, then environment, then file); the README has the table.",
    )
    settings.add_arguments(serve, server.Settings)
    serve.add_argument(
        "--config",
        type=pathlib.Path,
        default=os.environ.get("BROKER_CONFIG") or None,
        metavar="FILE",
        help="YAML file with size tiers, versions, prices, remediation policies and any setting above "
        "(see broker/config.py) (env BROKER_CONFIG)",
    )

    migrate = commands.add_parser("migrate", help="create or upgrade the store's schema, then exit")
    _data_dir(migrate)
    store_url = settings.BY_KEY["store_url"]
    migrate.add_argument(
        store_url.flag,
        metavar=store_url.kind.metavar,
        default=os.environ.get(store_url.env) or None,
        help=f"{store_url.help} (env {store_url.env})",
    )

    demo = commands.add_parser("demo", help="the whole story on the sandbox: provision, drift, remediation")
    demo.add_argument(
        "--data-dir", type=pathlib.Path, default=None, help="keep the demo's data here (default: a temp dir)"
    )
    get = commands.add_parser("get", help="resource states of a namespace, as a table")
    client_cli.add_arguments(get, watch=False)
    watch = commands.add_parser("watch", help="a live feed of drift events")
    client_cli.add_arguments(watch, watch=True)
    cost = commands.add_parser(
        "costs", help="a namespace's monthly cost, desired against actual, its budget and costliest drifts"
    )
    client_cli.add_costs_arguments(cost)
    budget = commands.add_parser("budget", help="show, set or remove a namespace's monthly cost budget")
    client_cli.add_budget_arguments(budget)
    pending = commands.add_parser("pending", help="remediations waiting for approval (policy mode approve)")
    client_cli.add_pending_arguments(pending)
    approve = commands.add_parser("approve", help="approve a pending remediation: the broker carries it out")
    client_cli.add_decision_arguments(approve)
    reject = commands.add_parser("reject", help="reject a pending remediation: the drift stays")
    client_cli.add_decision_arguments(reject)
    prevention = commands.add_parser(
        "admission-policy",
        help="print the drift-prevention ValidatingAdmissionPolicies and bindings (for GitOps)",
    )
    client_cli.add_admission_arguments(prevention)

    sandbox = commands.add_parser(
        "sandbox", help="run only the embedded sandbox Kubernetes API (for kubectl)"
    )
    sandbox.add_argument(
        "--addr", default="127.0.0.1:0", help="listen address HOST:PORT (default a free port)"
    )
    _data_dir(sandbox)
    return parser


def _data_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir",
        type=pathlib.Path,
        default=pathlib.Path(os.environ.get("BROKER_DATA_DIR", ".broker")),
        help="directory holding broker.db (default ./.broker)",
    )


async def _migrate(data_dir: pathlib.Path, store_url: str | None) -> int:
    given = settings.BY_KEY["store_url"]
    url = server.store_url_of(
        server.Settings(
            data_dir=data_dir, store_url=given.parse(store_url, given.flag) if store_url else None
        )
    )
    store = await server.open_store(url)
    try:
        version = await store.schema_version()
    finally:
        await store.close()
    print(f"store {server.shown_store_url(url)} is at schema version {version}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``broker`` console command."""
    args = _parser().parse_args(argv)
    logs.configure(level=args.log_level, fmt=args.log_format)
    try:
        if args.command == "migrate":
            return asyncio.run(_migrate(args.data_dir, args.store_url))
        if args.command == "demo":
            from broker import demo  # pulls in the example manager and its Kubernetes client

            return demo.main(args.data_dir)
        if args.command in (
            "get",
            "watch",
            "costs",
            "budget",
            "admission-policy",
            "pending",
            "approve",
            "reject",
        ):
            return client_cli.run(args.command, args)
        if args.command == "sandbox":
            kube_sandbox = server.load_sandbox()  # the other commands do not need the sandbox
            host, port = server.split_addr(args.addr)
            profile = kube_sandbox.profiles.platform(server.Settings().sandbox_namespaces)
            asyncio.run(
                kube_sandbox.run_standalone(host=host, port=port, data_dir=args.data_dir, profile=profile)
            )
            return 0
        configured = config.load(args.config)
        values = settings.resolve(args, configured.settings, os.environ, where=f"config file {args.config}")
        asyncio.run(
            server.run(
                settings.build(
                    server.Settings,
                    values,
                    catalog=configured.catalog,
                    rules=configured.rules,
                    budgets=configured.budgets,
                )
            )
        )
    except (ValueError, OSError, errors.BrokerError) as e:
        print(f"broker: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0

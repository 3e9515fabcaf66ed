"""The ``broker`` command: ``broker serve`` runs the broker, ``broker migrate`` prepares its store.

Every flag of ``serve`` can also come from an environment variable (``BROKER_GRPC_ADDR``,
``BROKER_HTTP_ADDR``, ``BROKER_DATA_DIR``, ``BROKER_TOKENS``, ``BROKER_INSECURE=1``,
``BROKER_LOG_FORMAT``, ``BROKER_LOG_LEVEL``); a flag wins over its variable.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pathlib
import sys

from broker import client_cli, config, errors, logs, server, service
from broker.store import sqlite


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


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

    serve = commands.add_parser("serve", help="run the broker (gRPC and the /v1 HTTP gateway)")
    serve.add_argument(
        "--grpc-addr",
        default=os.environ.get("BROKER_GRPC_ADDR", "0.0.0.0:50051"),
        help="gRPC listen address HOST:PORT (default 0.0.0.0:50051)",
    )
    serve.add_argument(
        "--http-addr",
        default=os.environ.get("BROKER_HTTP_ADDR", "0.0.0.0:8082"),
        help="HTTP gateway listen address HOST:PORT (default 0.0.0.0:8082)",
    )
    _data_dir(serve)
    serve.add_argument(
        "--insecure",
        action="store_true",
        default=_env_flag("BROKER_INSECURE"),
        help="no authentication: every caller may use every namespace (local use only)",
    )
    serve.add_argument(
        "--tokens",
        type=pathlib.Path,
        default=os.environ.get("BROKER_TOKENS") or None,
        metavar="FILE",
        help="YAML file mapping bearer tokens to principals and namespaces",
    )
    serve.add_argument(
        "--sandbox",
        action="store_true",
        default=_env_flag("BROKER_SANDBOX"),
        help="run the embedded sandbox Kubernetes API in-process and manage workloads there; "
        "writes <data-dir>/sandbox.kubeconfig for kubectl",
    )
    serve.add_argument(
        "--kubeconfig",
        type=pathlib.Path,
        default=os.environ.get("BROKER_KUBECONFIG") or None,
        metavar="FILE",
        help="manage workloads in the cluster of this kubeconfig "
        "(default: in-cluster when run in a pod, else no cluster)",
    )
    serve.add_argument(
        "--ready-timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="how long a workload may take to become ready before provisioning fails (default 300)",
    )
    serve.add_argument(
        "--callback-key-file",
        type=pathlib.Path,
        default=None,
        metavar="FILE",
        help="HMAC key for signing callbacks (default: $BROKER_CALLBACK_KEY, else generated "
        "into <data-dir>/callback.key)",
    )
    serve.add_argument(
        "--callback-allow-loopback",
        action="store_true",
        help="allow callbacks to loopback addresses (local development and tests only)",
    )
    serve.add_argument(
        "--no-remediation",
        action="store_true",
        default=_env_flag("BROKER_NO_REMEDIATION"),
        help="dry run: report drift and the recommended action, never change the cluster to fix it",
    )
    serve.add_argument(
        "--tls-cert",
        type=pathlib.Path,
        default=None,
        metavar="FILE",
        help="serve gRPC and HTTP over TLS with this certificate (PEM)",
    )
    serve.add_argument(
        "--tls-key", type=pathlib.Path, default=None, metavar="FILE", help="its private key (PEM)"
    )
    serve.add_argument(
        "--tls-client-ca",
        type=pathlib.Path,
        default=None,
        metavar="FILE",
        help="require client certificates signed by this CA (mTLS), on gRPC and HTTP",
    )
    serve.add_argument(
        "--max-streams-per-principal",
        type=int,
        default=100,
        metavar="N",
        help="WatchDrift streams one principal may hold open (default 100)",
    )
    serve.add_argument(
        "--config",
        type=pathlib.Path,
        default=os.environ.get("BROKER_CONFIG") or None,
        metavar="FILE",
        help="YAML file with size tiers, versions, prices and remediation policies (see broker/config.py)",
    )
    serve.add_argument("--no-reflection", action="store_true", help="turn gRPC server reflection off")
    serve.add_argument(
        "--shutdown-grace",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="how long in-flight calls may take to finish on SIGTERM (default 10)",
    )

    migrate = commands.add_parser("migrate", help="create or upgrade the store's schema, then exit")
    _data_dir(migrate)

    demo = commands.add_parser("demo", help="the whole story on the sandbox: provision, drift, remediation")
    demo.add_argument(
        "--data-dir", type=pathlib.Path, default=None, help="keep the demo's data here (default: a temp dir)"
    )
    get = commands.add_parser("get", help="resource states of a namespace, as a table")
    client_cli.add_arguments(get, watch=False)
    watch = commands.add_parser("watch", help="a live feed of drift events")
    client_cli.add_arguments(watch, watch=True)

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


async def _migrate(data_dir: pathlib.Path) -> int:
    store = await sqlite.Store.open(data_dir)
    try:
        version = await store.schema_version()
    finally:
        await store.close()
    print(f"store {data_dir / sqlite.DB_FILENAME} is at schema version {version}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``broker`` console command."""
    args = _parser().parse_args(argv)
    logs.configure(level=args.log_level, fmt=args.log_format)
    try:
        if args.command == "migrate":
            return asyncio.run(_migrate(args.data_dir))
        if args.command == "demo":
            from broker import demo  # pulls in the example manager and its Kubernetes client

            return demo.main(args.data_dir)
        if args.command in ("get", "watch"):
            return client_cli.run(args.command, args)
        if args.command == "sandbox":
            from broker import sandbox  # the other commands do not need the sandbox

            host, port = server.split_addr(args.addr)
            asyncio.run(sandbox.run_standalone(host=host, port=port, data_dir=args.data_dir))
            return 0
        configured = config.load(args.config)
        settings = server.Settings(
            catalog=configured.catalog,
            rules=configured.rules,
            grpc_addr=args.grpc_addr,
            http_addr=args.http_addr,
            data_dir=args.data_dir,
            insecure=args.insecure,
            tokens_file=args.tokens,
            reflection=not args.no_reflection,
            shutdown_grace=args.shutdown_grace,
            sandbox=args.sandbox,
            kubeconfig=args.kubeconfig,
            ready_timeout=args.ready_timeout,
            callback_key_file=args.callback_key_file,
            callback_allow_loopback=args.callback_allow_loopback,
            remediate=not args.no_remediation,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            tls_client_ca=args.tls_client_ca,
            watch=service.WatchLimits(streams_per_principal=args.max_streams_per_principal),
        )
        asyncio.run(server.run(settings))
    except (ValueError, OSError, errors.BrokerError) as e:
        print(f"broker: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0

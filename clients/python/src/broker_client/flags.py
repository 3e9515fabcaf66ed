"""The command-line flags every broker client program spells the same way.

``broker get``, ``broker watch`` and the example Database manager all take:

==============================  ===================================================================
``--target HOST:PORT``          the broker's gRPC address (default ``$BROKER_TARGET``, else
                                ``localhost:50051``)
``--token TOKEN``               the bearer token (default ``$BROKER_TOKEN``)
``--tls``                       the broker's gRPC port is behind TLS (system roots verify it)
``-n/--namespace NAMESPACE``    the namespace (repeatable where a program serves several)
==============================  ===================================================================

Older spellings a program used to accept stay as hidden aliases that warn on stderr (the example
manager's ``--broker``). Only the standard library is used here, so the client distribution keeps
needing nothing but grpcio and protobuf.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

DEFAULT_TARGET = "localhost:50051"


class _DeprecatedAlias(argparse.Action):
    """Stores into the new flag's destination and says on stderr which flag to use instead."""

    def __init__(self, option_strings: Sequence[str], dest: str, *, replacement: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.replacement = replacement

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        print(
            f"{parser.prog}: warning: {option_string} is deprecated; use {self.replacement}",
            file=sys.stderr,
        )
        setattr(namespace, self.dest, values)


def add_connection_flags(
    parser: argparse.ArgumentParser, *, deprecated_target_aliases: Sequence[str] = ()
) -> None:
    """``--target``, ``--token`` and ``--tls``; ``deprecated_target_aliases`` (e.g. ``--broker``)
    are accepted for ``--target`` without being shown in ``--help``."""
    parser.add_argument(
        "--target",
        metavar="HOST:PORT",
        default=os.environ.get("BROKER_TARGET") or DEFAULT_TARGET,
        help=f"broker gRPC address (default $BROKER_TARGET, else {DEFAULT_TARGET})",
    )
    for alias in deprecated_target_aliases:
        parser.add_argument(
            alias,
            dest="target",
            metavar="HOST:PORT",
            action=_DeprecatedAlias,
            replacement="--target",
            help=argparse.SUPPRESS,
        )
    parser.add_argument(
        "--token",
        metavar="TOKEN",
        default=os.environ.get("BROKER_TOKEN") or None,
        help="bearer token (default $BROKER_TOKEN)",
    )
    parser.add_argument("--tls", action="store_true", help="the broker's gRPC port is behind TLS")


def add_namespace_flag(
    parser: argparse.ArgumentParser, *, repeatable: bool, required: bool, help: str
) -> None:
    """``-n/--namespace``: one value, or (``repeatable``) a list in ``args.namespace``."""
    parser.add_argument(
        "-n",
        "--namespace",
        metavar="NAMESPACE",
        required=required,
        action="append" if repeatable else "store",
        help=help,
    )

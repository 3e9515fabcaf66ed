"""``python -m chaos [NAME ...] [--short] [--keep]``: run fault scenarios, one line each, PASS/FAIL.

Exits 0 when every scenario passed, 1 when any failed, 64 for an unknown name. Each scenario's
processes, logs and data live in a temporary directory, removed afterwards unless it failed (its
path is printed then) or ``--keep`` is given.
"""

from __future__ import annotations

import argparse
import asyncio
import pathlib
import shutil
import sys
import tempfile

from chaos import scenarios


async def _run(names: list[str], *, short: bool, keep: bool) -> int:
    failed = 0
    for name in names:
        workdir = pathlib.Path(tempfile.mkdtemp(prefix=f"chaos-{name}-"))
        result = await scenarios.SCENARIOS[name](workdir, short=short)
        print(result.line(), flush=True)
        if result.detail:
            print(f"    {result.detail}", flush=True)
        if not result.passed:
            failed += 1
        if keep or not result.passed:
            print(f"    logs and data: {workdir}", flush=True)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, run the scenarios, return the exit code."""
    parser = argparse.ArgumentParser(prog="./dev.sh chaos", description=__doc__)
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"one of: {', '.join(scenarios.SCENARIOS)}")
    parser.add_argument("--short", action="store_true", help="the test-suite size (seconds each)")
    parser.add_argument("--keep", action="store_true", help="keep every scenario's directory")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in scenarios.SCENARIOS]
    if unknown:
        print(
            f"unknown scenario {', '.join(unknown)}; known: {', '.join(scenarios.SCENARIOS)}", file=sys.stderr
        )
        return 64
    return asyncio.run(_run(args.names or list(scenarios.SCENARIOS), short=args.short, keep=args.keep))


if __name__ == "__main__":
    sys.exit(main())

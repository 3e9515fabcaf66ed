"""Rewrite the README's table of settings from ``broker/settings.py``.

Usage: ``python scripts/gen_settings.py`` (write) or ``--check`` (exit 1 when the README differs).
"""

from __future__ import annotations

import argparse
import pathlib
import re
import sys

from broker import server, settings

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
BLOCK = re.compile(r"(<!-- settings:begin[^>]*-->\n).*?(\n<!-- settings:end -->)", re.DOTALL)


def rendered(text: str) -> str:
    """``text`` with its settings block replaced by the table the code defines."""
    if not BLOCK.search(text):
        raise SystemExit("README.md has no <!-- settings:begin --> ... <!-- settings:end --> block")
    table = settings.markdown_table(server.Settings)
    return BLOCK.sub(lambda m: m.group(1) + table + m.group(2), text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    current = README.read_text()
    wanted = rendered(current)
    if args.check:
        if current != wanted:
            print("README.md's settings table is stale: run ./dev.sh gen", file=sys.stderr)
            return 1
        return 0
    README.write_text(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main())

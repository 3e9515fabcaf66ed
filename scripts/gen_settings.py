"""Rewrite the README's generated tables: the settings (``broker/settings.py``) and the drift rules
(``broker/domain/rules.py``).

Usage: ``python scripts/gen_settings.py`` (write) or ``--check`` (exit 1 when the README differs).
"""

from __future__ import annotations

import argparse
import pathlib
import re
import sys

from broker import server, settings
from broker.domain import rules

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def _block(name: str) -> re.Pattern[str]:
    return re.compile(rf"(<!-- {name}:begin[^>]*-->\n).*?(<!-- {name}:end -->)", re.DOTALL)


def rendered(text: str) -> str:
    """``text`` with each generated block replaced by the table the code defines."""
    for name, table in (
        ("settings", settings.markdown_table(server.Settings)),
        ("rules", rules.markdown_table()),
    ):
        block = _block(name)
        if not block.search(text):
            raise SystemExit(f"README.md has no <!-- {name}:begin --> ... <!-- {name}:end --> block")
        text = block.sub(lambda m, table=table: m.group(1) + table + "\n" + m.group(2), text)
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    current = README.read_text()
    wanted = rendered(current)
    if args.check:
        if current != wanted:
            print("README.md's generated tables are stale: run ./dev.sh gen", file=sys.stderr)
            return 1
        return 0
    README.write_text(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main())

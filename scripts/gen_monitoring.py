"""Write ``deploy/monitoring/prometheusrule.yaml`` from the plain rule file ``broker-rules.yaml``.

promtool checks and unit-tests plain rule files; the Prometheus operator takes the same groups inside
a PrometheusRule. The rule file is the source and the PrometheusRule embeds it verbatim (comments
included), so the two cannot disagree.

Usage: ``python scripts/gen_monitoring.py`` (write) or ``--check`` (exit 1 when the file is stale).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

MONITORING = pathlib.Path(__file__).resolve().parent.parent / "deploy" / "monitoring"
RULES = MONITORING / "broker-rules.yaml"
PROMETHEUS_RULE = MONITORING / "prometheusrule.yaml"

HEADER = """\
# Generated from broker-rules.yaml by scripts/gen_monitoring.py (./dev.sh gen): edit that file.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: resource-broker
  labels:
    app.kubernetes.io/name: resource-broker
spec:
"""


def rendered(rules: str) -> str:
    """The PrometheusRule whose spec is the rule file from its ``groups:`` line on."""
    lines = rules.splitlines()
    try:
        start = lines.index("groups:")
    except ValueError:
        raise SystemExit(f"{RULES} has no top-level 'groups:' line") from None
    return HEADER + "".join(f"  {line}\n" if line else "\n" for line in lines[start:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    wanted = rendered(RULES.read_text())
    if args.check:
        if not PROMETHEUS_RULE.exists() or PROMETHEUS_RULE.read_text() != wanted:
            print(f"{PROMETHEUS_RULE} is stale: run ./dev.sh gen", file=sys.stderr)
            return 1
        return 0
    PROMETHEUS_RULE.write_text(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main())

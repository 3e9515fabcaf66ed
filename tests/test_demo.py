"""``broker demo`` run as a person would: a subprocess that tells the whole story and exits 0."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not on PATH"),
]


def test_broker_demo_tells_the_whole_story_and_exits_0(tmp_path: pathlib.Path) -> None:
    # Its temporary data directory goes under tmp_path, so that we can see it cleaned up.
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env["TMPDIR"] = str(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "broker", "demo"],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    out = proc.stdout
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{out}\nstderr:\n{proc.stderr}"
    for line in (
        "database.platform.company.com/postgres-app-db created",
        "PROVISIONING_SUCCEEDED",
        "signature verified",
        "DRIFT_DETECTED: Replica count mismatch: desired=1, actual=3",
        "Kubernetes Event from the manager: Warning DriftDetected",
        "REMEDIATION_SUCCEEDED",
        "DRIFT_RESOLVED",
        "the broker scaled the StatefulSet back to 1 replica",
        "Done",
    ):
        assert line in out, f"{line!r} missing from:\n{out}"
    assert "FAILED" not in out
    # The story is told in order.
    positions = [
        out.index(marker)
        for marker in (
            "PROVISIONING_SUCCEEDED",
            "DRIFT_DETECTED",
            "REMEDIATION_STARTED",
            "DRIFT_RESOLVED",
            "Done",
        )
    ]
    assert positions == sorted(positions), out
    # A remediation succeeds once an observation shows the drift gone: not before it started.
    assert out.index("REMEDIATION_STARTED") < out.index("REMEDIATION_SUCCEEDED") < out.index("Done"), out
    # Output is for people: no terminal escapes when it is not a terminal.
    assert "\033[" not in out
    # It ran in a temporary directory and removed it.
    assert "broker-demo-" in out  # the kubeconfig path it printed
    assert list(tmp_path.glob("broker-demo-*")) == []

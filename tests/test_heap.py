"""The heap a broker builds at start-up is frozen, and no full collection walks it meanwhile.

Each case runs a broker the way ``broker serve`` does (``freeze_heap=True``) in a process of its
own: the collector's settings are the process's, which a test must not change for the others.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from typing import Any

import pytest

_CHILD = textwrap.dedent(
    """
    import asyncio, gc, json, pathlib, sys, tempfile

    from broker import server

    seen_at_sweep_end = []
    original = server.Broker._started_up

    def started_up(self) -> None:  # the detector's first sweep is done: what did it run under?
        seen_at_sweep_end.append(gc.get_threshold())
        original(self)

    server.Broker._started_up = started_up

    async def main(with_cluster: bool) -> None:
        before = gc.get_threshold()
        settings = server.Settings(
            grpc_addr="127.0.0.1:0", http_addr="127.0.0.1:0", insecure=True,
            data_dir=pathlib.Path(tempfile.mkdtemp()), shutdown_grace=0.5, sandbox=with_cluster,
        )
        broker = server.Broker(settings, freeze_heap=True)
        await broker.start()
        during = gc.get_threshold()
        for _ in range(600):
            if seen_at_sweep_end or not with_cluster:
                break
            await asyncio.sleep(0.05)
        after = gc.get_threshold()
        frozen = gc.get_freeze_count()
        await broker.stop()
        print(json.dumps({"before": before, "during": during, "after": after, "frozen": frozen,
                          "at_sweep_end": seen_at_sweep_end}))

    asyncio.run(main(sys.argv[1] == "cluster"))
    """
)


def _run(mode: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, mode], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.slow
def test_full_collections_wait_for_the_first_sweep_and_what_it_built_is_frozen() -> None:
    result = _run("cluster")
    before, after, at_sweep_end = result["before"], result["after"], result["at_sweep_end"]
    # Until the detector's first sweep is done, only the young generations are collected.
    assert len(at_sweep_end) == 1, "the first sweep never finished"
    assert at_sweep_end[0][:2] == before[:2]
    assert at_sweep_end[0][2] > 1_000_000
    # Then the collector is as it was, and what survived start-up is frozen.
    assert after == before
    assert result["frozen"] > 10_000


def test_without_a_cluster_full_collections_resume_once_serving() -> None:
    result = _run("none")
    assert result["during"] == result["before"]
    assert result["frozen"] > 0

"""The fault scenarios of ``chaos/`` (``./dev.sh chaos``) at their short size, each against real
broker and sandbox processes on loopback: each must meet its goals. Below them, quick checks that
the verdicts behind the figures do fail on bad input.
"""

from __future__ import annotations

import pathlib
import sqlite3
import sys
from typing import Any

import pytest
from broker_client.v1 import broker_pb2 as pb

# chaos/ is a top-level folder of the repository, not an installed package.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from chaos import failover, harness, resume_under_churn, scenarios, slow_consumer

K = pb.DriftEventKind

# failover starts PostgreSQL, a sandbox and three brokers one after the other, then waits out a lease.
LONGER = {failover.NAME: 360}


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.timeout(LONGER[n])) if n in LONGER else n
        for n in scenarios.SCENARIOS
    ],
)
async def test_the_scenario_meets_its_goals(name: str, tmp_path: pathlib.Path) -> None:
    result = await scenarios.SCENARIOS[name](tmp_path, short=True)

    print(result.line())
    if result.detail:
        print(f"    {result.detail}")
    if not result.figures:
        pytest.fail(f"{name} could not run: {result.detail}\nlogs: {tmp_path}")
    assert result.passed, f"{result.line()}\n{result.detail}\nlogs: {tmp_path}"


# The verdicts can fail: the checks behind the figures, on made-up input -----------------------------


@pytest.mark.parametrize(
    ("received", "expected"),
    [
        ([(1, 9, "d1"), (2, 9, "d2"), (3, 1, "d1")], {}),
        ([(1, 9, "d1"), (3, 1, "d1")], {"gaps": 1}),
        ([(1, 9, "d1"), (2, 9, "d2"), (2, 9, "d2"), (3, 1, "d1")], {"dups": 1, "disorder": 1}),
        ([(2, 9, "d2"), (1, 9, "d1"), (3, 1, "d1")], {"disorder": 1}),
        ([(1, 9, "d1"), (2, 9, "d1"), (3, 1, "d1"), (4, 1, "d1")], {"mismatch": 1, "unknown": 1}),
    ],
)
def test_a_subscriber_is_compared_with_the_log_event_by_event(
    received: list[tuple[int, int, str]], expected: dict[str, int]
) -> None:
    log = [(1, 9, "d1"), (2, 9, "d2"), (3, 1, "d1")]

    counts = resume_under_churn.compare(received, log)

    assert {k: v for k, v in counts.items() if v} == expected


def test_the_integrity_check_reports_a_damaged_file_and_dangling_references(tmp_path: pathlib.Path) -> None:
    db = tmp_path / "broker.db"
    connection = sqlite3.connect(db)
    connection.executescript(
        "CREATE TABLE p (id INTEGER PRIMARY KEY); CREATE TABLE c (pid REFERENCES p (id));"
        "INSERT INTO p VALUES (1); INSERT INTO c VALUES (1);"
    )
    connection.executemany("INSERT INTO p VALUES (?)", [(i,) for i in range(2, 5000)])
    connection.commit()
    assert harness.integrity_check(db) == "ok"

    connection.execute("DELETE FROM p WHERE id = 1")  # foreign keys are off: c now dangles
    connection.commit()
    connection.close()
    assert harness.integrity_check(db) == "1 foreign key violations"

    damaged = bytearray(db.read_bytes())
    damaged[4096 * 3 : 4096 * 3 + 2000] = b"\xab" * 2000
    db.write_bytes(bytes(damaged))
    assert harness.integrity_check(db) != "ok"


def _event(sequence: int, kind: int, deployment_id: str = "d1") -> Any:
    return pb.DriftEvent(sequence=sequence, kind=kind, deployment_id=deployment_id)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kinds", "expected"),
    [
        ([], (0, 0)),
        ([K.DRIFT_EVENT_KIND_REMEDIATION_STARTED, K.DRIFT_EVENT_KIND_REMEDIATION_SUCCEEDED], (1, 0)),
        # the leader died between starting and finishing; the next one did it again: resumed, not double
        (
            [
                K.DRIFT_EVENT_KIND_REMEDIATION_STARTED,
                K.DRIFT_EVENT_KIND_REMEDIATION_STARTED,
                K.DRIFT_EVENT_KIND_REMEDIATION_SUCCEEDED,
            ],
            (1, 1),
        ),
        # two that ran to their end: a double remediation
        (
            [
                K.DRIFT_EVENT_KIND_REMEDIATION_STARTED,
                K.DRIFT_EVENT_KIND_REMEDIATION_SUCCEEDED,
                K.DRIFT_EVENT_KIND_REMEDIATION_STARTED,
                K.DRIFT_EVENT_KIND_REMEDIATION_SUCCEEDED,
            ],
            (2, 0),
        ),
        ([K.DRIFT_EVENT_KIND_REMEDIATION_STARTED], (0, 1)),
    ],
)
def test_remediations_are_counted_per_deployment_completed_apart_from_interrupted(
    kinds: list[int], expected: tuple[int, int]
) -> None:
    log = [_event(i + 1, kind) for i, kind in enumerate(kinds)]
    log.append(_event(len(log) + 1, K.DRIFT_EVENT_KIND_REMEDIATION_SUCCEEDED, "d2"))  # another's

    assert failover.remediations(log, "d1") == expected


def test_latency_pairs_each_edit_with_the_event_naming_its_value() -> None:
    flips = [slow_consumer.Flip("d1", 2, at=10.0), slow_consumer.Flip("d1", 3, at=11.0)]
    events = [(5, "d1", "2", 10.25), (6, "d2", "3", 10.5), (7, "d1", "3", 11.5)]

    assert slow_consumer.latencies(flips, events) == [0.25, 0.5]

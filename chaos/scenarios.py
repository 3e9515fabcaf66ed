"""The scenarios by name, each with its full size (``./dev.sh chaos``) and its short size (tests)."""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Awaitable, Callable
from typing import Any

from chaos import (
    api_pause,
    callback_receiver_down,
    failover,
    harness,
    resume_under_churn,
    sigkill_under_load,
    sigterm_drain,
    slow_consumer,
)

Run = Callable[..., Awaitable[harness.Result]]


@dataclasses.dataclass(frozen=True)
class Scenario:
    """One scenario: its ``run(workdir, **size)`` and the keyword arguments of each size."""

    name: str
    run: Run
    full: dict[str, Any]
    short: dict[str, Any]

    async def __call__(self, workdir: pathlib.Path, *, short: bool = False) -> harness.Result:
        """Run at the full or the short size; a scenario that could not run is a failed result."""
        try:
            return await self.run(workdir, **(self.short if short else self.full))
        except harness.ChaosError as e:
            return harness.Result(self.name, {}, problems=(f"could not run: {e}",))
        except Exception as e:  # a call the scenario relies on failed: a failure, with its reason
            return harness.Result(self.name, {}, problems=(f"could not run: {type(e).__name__}: {e}"[:2000],))


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            sigkill_under_load.NAME,
            sigkill_under_load.run,
            full={"provisions": 1000, "in_flight": 64, "kills": 3},
            short={"provisions": 60, "in_flight": 16, "kills": 2, "ready_within": 60.0},
        ),
        Scenario(
            resume_under_churn.NAME,
            resume_under_churn.run,
            full={"subscribers": 5, "duration": 60.0, "reconnect_every": (2.0, 10.0), "resources": 12},
            short={
                "subscribers": 5,
                "duration": 6.0,
                "reconnect_every": (0.3, 1.5),
                "resources": 4,
                "new_during_churn": 2,
            },
        ),
        Scenario(
            api_pause.NAME,
            api_pause.run,
            full={"resources": 6, "pause_for": 60.0, "late_for": 70.0},
            short={"resources": 3, "pause_for": 3.0, "late_for": 0.0},
        ),
        Scenario(
            callback_receiver_down.NAME,
            callback_receiver_down.run,
            full={"provisions": 30, "down_for": 20.0},
            short={"provisions": 5, "down_for": 4.0},
        ),
        Scenario(
            slow_consumer.NAME,
            slow_consumer.run,
            full={"resources": 100, "normal": 3, "baseline_flips": 600, "slow_events": 4000},
            short={
                "resources": 40,
                "normal": 3,
                "baseline_flips": 100,
                "slow_events": 1300,
                "cut_off_within": 3.0,
                "drain_within": 10.0,
            },
        ),
        Scenario(
            sigterm_drain.NAME,
            sigterm_drain.run,
            full={"callers": 16, "streams": 5, "warm_up": 5.0, "grace": 10.0, "resources": 10},
            short={"callers": 16, "streams": 3, "warm_up": 2.0, "grace": 5.0, "resources": 4},
        ),
        Scenario(
            failover.NAME,
            failover.run,
            # client-go's lease timings at full size; shorter ones keep the test quick (goal: 10 s).
            # About 2 Provisions a second: as many as 2 shared cores provision steadily beside three
            # replicas, PostgreSQL and the sandbox (at 6 a second the backlog grew without end).
            full={"kills": 2, "workers": 3, "pace": 1.5, "warm_up": 20.0, "between_kills": 20.0, "pool": 16},
            short={
                "lease_duration": 5,
                "renew_deadline": 3.5,
                "retry_period": 0.5,
                "kills": 1,
                "workers": 2,
                "pace": 0.5,
                "warm_up": 4.0,
                "after": 3.0,
                "pool": 6,
                "scale_every": 1.0,
                "subscribers_per_replica": 1,
            },
        ),
    )
}

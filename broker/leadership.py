"""Leader-only work: the workers that must run once across replicas (DESIGN section 12).

The detector, the remediator, the provisioner and the callback dispatcher act on the cluster and
on managers; two replicas running them would remediate twice and call back twice. ``LeaderOnly``
holds them and decides where they run:

- leader election off (one replica, the SQLite quick start): each is started in the broker's
  supervisor at once, exactly as before;
- leader election on: the supervisor runs one worker, ``leader-election``, the Lease elector
  (``broker.kube.lease``). Each term of leadership starts the leader-only workers under a
  supervisor of their own and ends by cancelling them and running the ``on_term_end`` hooks
  (cancelling scheduled remediations). Losing the lease is not a failure: the replica goes on
  serving RPCs and campaigns again. A leader-only worker that fails is one: the term ends, the
  lease is released and ``leader-election`` fails with it, so the broker stops as it does for any
  failed worker (see ``broker.workers``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from broker import workers
from broker.kube import lease

log = logging.getLogger(__name__)

Worker = Callable[[], Coroutine[Any, Any, None]]


class LeaderWorkerFailed(RuntimeError):
    """A leader-only worker failed; its exception is the cause."""


class LeaderOnly:
    """The leader-only workers, run at once or only while this replica holds the Lease."""

    def __init__(self, supervisor: workers.Supervisor, *, elected: bool) -> None:
        self._supervisor = supervisor
        self.elected = elected
        self._workers: dict[str, Worker] = {}
        self._term_end: list[Callable[[], Awaitable[None]]] = []
        self.elector: lease.LeaderElector | None = None
        self._running = False

    def add(self, name: str, worker: Worker) -> None:
        """A leader-only worker; ``worker()`` makes a fresh run of it (one per term)."""
        if self.elected:
            self._workers[name] = worker
        else:
            self._supervisor.start(name, worker())

    def on_term_end(self, hook: Callable[[], Awaitable[None]]) -> None:
        """Awaited after the workers of a term have stopped (for work they leave behind)."""
        self._term_end.append(hook)

    def elect(self, elector: lease.LeaderElector) -> None:
        """Start campaigning: the workers run in the terms ``elector`` wins."""
        if not self.elected:
            raise ValueError("leader election is off: the leader-only workers run already")
        self.elector = elector
        self._supervisor.start("leader-election", elector.run(self._term))

    @property
    def running(self) -> bool:
        """Whether the leader-only workers run in this replica now."""
        return not self.elected or self._running

    @property
    def names(self) -> list[str]:
        """The leader-only workers held for terms of leadership."""
        return sorted(self._workers)

    async def _term(self) -> None:
        """One term: the workers under their own supervisor, until cancelled or one fails."""
        loop = asyncio.get_running_loop()
        failed: asyncio.Future[tuple[str, BaseException]] = loop.create_future()

        def failure(name: str, exc: BaseException) -> None:
            if not failed.done():
                failed.set_result((name, exc))

        term = workers.Supervisor(failure)
        self._running = True
        try:
            for name, worker in self._workers.items():
                term.start(name, worker())
            log.info("leader-only workers started", extra={"workers": self.names})
            name, exc = await failed
            raise LeaderWorkerFailed(
                f"leader-only worker {name} failed: {type(exc).__name__}: {exc}"
            ) from exc
        finally:
            await term.stop()
            for hook in self._term_end:
                await hook()
            self._running = False
            log.info("leader-only workers stopped", extra={"workers": self.names})

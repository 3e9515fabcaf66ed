"""Background workers: one supervisor that owns them, and the loop and shutdown they all share.

A background task nobody awaits is a silent outage: the detector dies on a bug and the broker goes
on answering ready while nothing is detected any more. Every long-running worker (informers,
metrics poller, detector, provisioner, callback dispatcher, event-log pruning) therefore runs under
``Supervisor``. A worker never returns; when one raises, or returns, the supervisor logs it once
with its traceback and reports the failure to its owner, which turns health NOT_SERVING and
``/readyz`` 503 and stops the process with a non-zero exit code.

Why exit rather than restart the worker in place: the failure is a bug, and the state around a
crashed worker (its caches, half-done work) is not known to be sound. Exiting gives a clean start,
which Kubernetes does with backoff, and makes the failure visible (a restart count, CrashLoopBackOff)
instead of a process that quietly loops over the same bug. kopf and temporal's worker do the same.

``run_forever`` is the wake-up-or-timeout loop every worker is written as, with kopf's test seam:
``_iterations=N`` runs it N times and returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any

log = logging.getLogger(__name__)


class Wakeup:
    """Set by producers of work; a worker waits on it with a timeout."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def set(self) -> None:
        """There is work: the waiting worker runs its next step at once."""
        self._event.set()

    async def wait(self, within: float) -> bool:
        """Until set or ``within`` seconds pass; whether it was set. Clears it either way."""
        try:
            if not self._event.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.0, within)):
                        await self._event.wait()
            return self._event.is_set()
        finally:
            self._event.clear()


async def run_forever(
    step: Callable[[], Awaitable[float | None]],
    *,
    interval: float,
    wake: Wakeup | None = None,
    _iterations: int | None = None,
) -> None:
    """Run ``step`` again and again: after each, wait for ``wake`` or ``interval`` seconds.

    ``step`` may return how long to wait this time instead (0: run again at once).
    """
    done = 0
    while _iterations is None or done < _iterations:
        delay = await step()
        done += 1
        if _iterations is not None and done >= _iterations:
            return
        wait = interval if delay is None else delay
        if wake is not None:
            await wake.wait(wait)
        elif wait > 0:
            await asyncio.sleep(wait)
        else:
            await asyncio.sleep(0)


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancel tasks and wait until each has ended (its own errors are logged, not raised)."""
    pending = [t for t in tasks if not t.done()]
    for task in pending:
        task.cancel()
    for task in pending:
        try:
            await task
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("task failed while stopping", extra={"task": task.get_name()})


class Supervisor:
    """Starts the workers, notices the first one that fails, and stops them all."""

    def __init__(self, on_failure: Callable[[str, BaseException], None]) -> None:
        self._on_failure = on_failure
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._stopping = False
        self.failure: tuple[str, BaseException] | None = None

    def start(self, name: str, worker: Coroutine[Any, Any, None]) -> None:
        """Run ``worker`` (which must never return) under supervision."""
        if name in self._tasks:
            raise ValueError(f"a worker named {name!r} is running already")
        task = asyncio.create_task(worker, name=name)
        self._tasks[name] = task
        task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        if self._stopping or task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            exc = RuntimeError(f"worker {task.get_name()} returned; workers run until stopped")
        if self.failure is not None:
            return  # the first failure is what is reported; the rest follow from the stop
        self.failure = (task.get_name(), exc)
        log.critical(
            "background worker failed; the broker stops (and is restarted by its supervisor)",
            extra={"worker": task.get_name()},
            exc_info=exc,
        )
        self._on_failure(task.get_name(), exc)

    @property
    def names(self) -> list[str]:
        """The supervised workers, by name."""
        return sorted(self._tasks)

    async def stop(self) -> None:
        """Cancel every worker and wait for each to end."""
        self._stopping = True
        await cancel_and_wait(self._tasks.values())
        self._tasks.clear()

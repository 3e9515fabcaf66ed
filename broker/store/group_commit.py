"""Group commit for SQLite: one thread owns the write connection and commits waiting writes together.

A write is a plain function of a ``Tx`` (the connection, the time, the events it appends), run on
the writer thread from start to end: no thread round trip per statement, no event-loop turn while a
transaction is open (both held the old asyncio write lock for most of its time). Writes that queue
up while one group is being committed form the next group: one ``BEGIN IMMEDIATE``, each write in
its own SAVEPOINT (a write that raises is rolled back alone, and its caller gets the exception), one
``COMMIT`` (one fsync) for all. A caller is answered only after the commit that made its write
durable; the events of a group reach ``on_commit`` after that commit, in sequence order (one writer
assigns the sequences, so commit order is sequence order).

A caller that is cancelled after submitting does not undo its write: the write commits with its
group, as a request whose client went away does.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import logging
import pathlib
import queue
import sqlite3
import threading
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

from broker import errors
from broker.domain import model

log = logging.getLogger(__name__)

T = TypeVar("T")

# At most this many writes share one transaction: a group's latency stays bounded under any load.
MAX_GROUP = 256


@dataclasses.dataclass
class Tx:
    """What a write sees: the connection (inside its savepoint), its clock, the events it appended."""

    db: sqlite3.Connection
    now: datetime.datetime
    appended: list[model.DriftEvent] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _Job(Generic[T]):
    run: Callable[[Tx], T]
    future: asyncio.Future[T]
    loop: asyncio.AbstractEventLoop


# A write's job, its result and its error (one of the two is None).
_Outcome = tuple[_Job[Any], Any, BaseException | None]


class Writer:
    """The writer thread and its queue of writes."""

    def __init__(
        self,
        path: pathlib.Path,
        *,
        connect: Callable[[pathlib.Path], sqlite3.Connection],
        on_commit: Callable[[list[model.DriftEvent]], None],
    ) -> None:
        self._path = path
        self._connect = connect
        self._on_commit = on_commit
        self._jobs: queue.SimpleQueue[_Job[Any] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._open_error: BaseException | None = None
        self.groups = 0  # how many transactions committed (for tests and benchmarks)
        self.writes = 0

    async def start(self) -> None:
        """Start the thread and open its connection; raise what opening it raised."""
        self._thread = threading.Thread(target=self._main, name="broker-store-writer", daemon=True)
        self._thread.start()
        await asyncio.to_thread(self._started.wait)
        if self._open_error is not None:
            raise self._open_error

    async def stop(self) -> None:
        """Commit what is queued, close the connection and end the thread; safe to call twice."""
        thread, self._thread = self._thread, None
        if thread is not None and thread.is_alive():
            self._jobs.put(None)
            await asyncio.to_thread(thread.join)

    async def write(self, run: Callable[[Tx], T]) -> T:
        """Run ``run`` in the next group's transaction; its result once that group committed."""
        if self._thread is None:
            raise errors.Unavailable("the store is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._jobs.put(_Job(run, future, loop))
        return await future

    def _main(self) -> None:
        try:
            db = self._connect(self._path)
        except BaseException as e:  # reported to ``start``'s caller
            self._open_error = e
            self._started.set()
            return
        self._started.set()
        try:
            while True:
                first = self._jobs.get()
                if first is None:
                    return
                group, stopping = [first], False
                while len(group) < MAX_GROUP:
                    try:
                        job = self._jobs.get_nowait()
                    except queue.Empty:
                        break
                    if job is None:
                        stopping = True
                        break
                    group.append(job)
                try:
                    self._commit(db, group)
                except BaseException as e:
                    log.exception("a store transaction failed")
                    with contextlib.suppress(sqlite3.Error):
                        if db.in_transaction:
                            db.execute("ROLLBACK")
                    failure = errors.Unavailable(f"the store failed to write: {type(e).__name__}")
                    failure.__cause__ = e
                    self._answer([(job, None, failure) for job in group], [])
                if stopping:
                    return
        finally:
            db.close()

    def _commit(self, db: sqlite3.Connection, group: list[_Job[Any]]) -> None:
        """Run a group of writes in one transaction and answer each caller after the commit."""
        now = datetime.datetime.now(datetime.UTC)
        outcomes: list[_Outcome] = []
        appended: list[model.DriftEvent] = []
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as e:
            failure = errors.Unavailable(f"the store failed to start a transaction: {type(e).__name__}")
            failure.__cause__ = e
            self._answer([(job, None, failure) for job in group], [])
            return
        for job in group:
            tx = Tx(db=db, now=now)
            db.execute("SAVEPOINT write")
            try:
                value = job.run(tx)
            except BaseException as e:
                db.execute("ROLLBACK TO write")
                db.execute("RELEASE write")
                outcomes.append((job, None, _translated(e)))
                continue
            db.execute("RELEASE write")
            outcomes.append((job, value, None))
            appended += tx.appended
        try:
            db.execute("COMMIT")
        except sqlite3.Error as e:
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                log.exception("rollback after a failed commit failed")
            failure = errors.Unavailable(f"the store failed to commit: {type(e).__name__}")
            failure.__cause__ = e
            self._answer([(job, None, error or failure) for job, _, error in outcomes], [])
            return
        self.groups += 1
        self.writes += len(group)
        self._answer(outcomes, appended)

    def _answer(
        self, outcomes: list[tuple[_Job[Any], Any, BaseException | None]], appended: list[model.DriftEvent]
    ) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Job[Any], Any, BaseException | None]]] = {}
        for outcome in outcomes:
            by_loop.setdefault(outcome[0].loop, []).append(outcome)
        for loop, answers in by_loop.items():
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits any more
                loop.call_soon_threadsafe(self._deliver, answers, appended)
            appended = []  # the listeners run once, on the first loop

    def _deliver(self, answers: Iterable[_Outcome], appended: list[model.DriftEvent]) -> None:
        # Events first: a caller that reads the log right after its answer finds them published.
        if appended:
            self._on_commit(appended)
        for job, value, error in answers:
            if job.future.done():  # the caller was cancelled; its write stands
                continue
            if error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(value)


def _translated(e: BaseException) -> BaseException:
    """A write's failure as its caller should see it: the broker's errors as they are, SQLite's mapped."""
    if isinstance(e, sqlite3.Error):
        failure = errors.Unavailable(f"the store failed to write: {type(e).__name__}")
        failure.__cause__ = e
        return failure
    return e

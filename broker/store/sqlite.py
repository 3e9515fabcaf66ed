"""The desired-state store on SQLite (aiosqlite): the only module that imports it.

Durability: WAL journal with ``synchronous=FULL``, so an acknowledged Provision survives a crash or
power loss; foreign keys on; migrations at start-up.

Concurrency: one writer connection guarded by an asyncio lock (every write is one ``BEGIN
IMMEDIATE`` transaction) and one reader connection, which under WAL never sees a half-written
transaction of another coroutine. Every read runs and finishes its statement in one call
(``execute_fetchall``): a statement left open between two awaits would keep the reader's read
transaction open, and another coroutine's query would then run in that older snapshot and miss
what was committed since. SQLite errors are translated into ``errors.Unavailable`` with the
cause chained; nothing of a request's content is put in that message.

One replica: a broker holds an exclusive ``flock`` on ``<database>.lock`` for as long as its store
is open, so a second broker (or ``broker migrate``) on the same file refuses to start instead of
reporting and remediating every drift a second time. The kernel releases the lock when the process
ends, however it ends. Several replicas share a PostgreSQL store (``broker.store.postgres``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import fcntl
import hashlib
import json
import logging
import os
import pathlib
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterable, Sequence, Set
from typing import Any

import aiosqlite

from broker import errors
from broker.domain import approval, lifecycle, model, policy
from broker.store import codec, migrations, port

log = logging.getLogger(__name__)

DB_FILENAME = "broker.db"
# ``--store-url sqlite:///PATH``: the file path is what follows the third slash, so
# ``sqlite:///data/broker.db`` is relative and ``sqlite:////var/lib/broker/broker.db`` absolute.
URL_PREFIX = "sqlite:///"


def url_of(path: pathlib.Path) -> str:
    """The store URL of a database file."""
    return URL_PREFIX + str(path)


def path_of(url: str) -> pathlib.Path:
    """The database file of a ``sqlite:///PATH`` URL; ValueError for any other."""
    if not url.startswith(URL_PREFIX) or not url.removeprefix(URL_PREFIX):
        raise ValueError("a SQLite store URL is sqlite:///PATH (sqlite:////PATH for an absolute path)")
    return pathlib.Path(url.removeprefix(URL_PREFIX))


def _lock(path: pathlib.Path) -> int:
    """Take the single-replica lock of the database at ``path``: an open file descriptor."""
    lock_path = path.with_name(path.name + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as e:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise errors.Unavailable(
            f"the store {path} is in use by another broker (process {holder} holds {lock_path}): "
            "SQLite is single-replica; stop the other broker, or run several replicas on one "
            "PostgreSQL store with --store-url postgresql://..."
        ) from e
    except BaseException:
        os.close(fd)
        raise
    # Who holds it, for the message above (the lock, not this text, is what excludes).
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


_BY_NAMESPACE_AND_ID = (
    f"SELECT {codec.DEPLOYMENT_COLUMNS} FROM deployments d "
    "JOIN operations o ON o.operation_id = d.last_operation_id "
    "WHERE d.namespace = ? AND d.deployment_id = ?"
)


class _Parsed:
    """Deployments already parsed from rows, reused while their row is unchanged.

    Reads are mostly of rows that did not change since the last read (every manager polls); parsing
    a row (its spec's JSON, timestamps, enums) costs far more than comparing it with the row it was
    parsed from. The same row gives the same object, so readers further up (the views, their
    encodings) can tell "unchanged" by identity. A row is remembered by a 128-bit digest of its
    values, not the values (its JSON text would be kept twice). Deleted deployments are not kept.
    """

    __slots__ = ("_rows",)

    def __init__(self) -> None:
        self._rows: dict[str, tuple[bytes, model.Deployment]] = {}

    def deployment(self, row: sqlite3.Row) -> model.Deployment:
        """The deployment of a row of ``codec.DEPLOYMENT_COLUMNS``."""
        values = tuple(row)
        deployment_id = values[0]
        digest = hashlib.blake2b(repr(values).encode(), digest_size=16).digest()
        kept = self._rows.get(deployment_id)
        if kept is not None and kept[0] == digest:
            return kept[1]
        deployment = codec.deployment_from_row(row)
        if deployment.phase is model.Phase.DELETED:
            self._rows.pop(deployment_id, None)
        else:
            self._rows[deployment_id] = (digest, deployment)
        return deployment


class Store:
    """Desired state, operations, idempotency keys, the drift event log and the callback outbox."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path
        self._lock_fd: int | None = None
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._write_lock = asyncio.Lock()
        # Events appended by the transaction holding the write lock, published after its commit.
        self._appended: list[model.DriftEvent] = []
        self.listeners: list[Callable[[list[model.DriftEvent]], None]] = []
        # One replica: no other process commits events, so nothing ever wakes these.
        self.wakers: list[Callable[[], None]] = []
        # Nor gives a deployment work: the service kicks this process's workers itself.
        self.changed: list[Callable[[str], None]] = []
        self.policy_listeners: list[Callable[[], None]] = []
        self._parsed = _Parsed()
        # Counts committed write transactions: this process is the only writer (see ``_lock``).
        self._version = 0

    @classmethod
    async def open(cls, data_dir: pathlib.Path) -> Store:
        """Open (creating if needed) ``<data_dir>/broker.db`` and apply pending migrations."""
        return await cls.open_file(data_dir / DB_FILENAME)

    @classmethod
    async def open_file(cls, path: pathlib.Path) -> Store:
        """Open (creating if needed) the database at ``path``, lock it, and apply pending migrations.

        Unavailable when another broker has it open (see the module docstring).
        """
        await asyncio.to_thread(path.parent.mkdir, parents=True, exist_ok=True)
        store = cls(path)
        try:
            store._lock_fd = _lock(path)
        except OSError as e:
            raise errors.Unavailable(f"cannot open the store at {path}: {e}") from e
        try:
            store._writer = await _connect(store.path)
            await store._migrate()
            store._reader = await _connect(store.path)
        except (sqlite3.Error, OSError) as e:
            await store.close()
            raise errors.Unavailable(f"cannot open the store at {store.path}: {e}") from e
        return store

    async def close(self) -> None:
        """Close both connections and release the lock; safe to call twice."""
        try:
            for conn in (self._reader, self._writer):
                if conn is not None:
                    await conn.close()
        finally:
            self._reader = self._writer = None
            fd, self._lock_fd = self._lock_fd, None
            if fd is not None:
                os.close(fd)  # closing the last descriptor releases the flock

    async def schema_version(self) -> int:
        """The newest applied migration."""
        async with self._read() as db:
            row = await _one(db, "SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
        return int(row[0]) if row else 0

    async def ping(self) -> None:
        """Raise Unavailable unless the store answers a trivial query (used by readiness)."""
        async with self._read() as db:
            await db.execute("SELECT 1")

    async def _migrate(self) -> None:
        db = self._conn(self._writer)
        await db.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations "
            "(version INTEGER PRIMARY KEY, description TEXT NOT NULL, applied_time TEXT NOT NULL)"
        )
        await db.commit()
        # Every version not applied yet, in order (not only those above the newest: a database
        # may have been made by a build that had a later version but not an earlier one).
        applied = {int(r[0]) for r in await db.execute_fetchall("SELECT version FROM schema_migrations")}
        for version, description, sql in migrations.MIGRATIONS:
            if version in applied:
                continue
            # executescript would COMMIT first and run outside our transaction; run each statement.
            await db.execute("BEGIN IMMEDIATE")
            try:
                for statement in _statements(sql):
                    await db.execute(statement)
                await db.execute(
                    "INSERT INTO schema_migrations (version, description, applied_time) VALUES (?, ?, ?)",
                    (version, description, codec.ts(codec.now())),
                )
                await db.commit()
            except BaseException:
                await db.rollback()
                raise
            log.info("applied store migration", extra={"version": version, "description": description})

    @staticmethod
    def _conn(conn: aiosqlite.Connection | None) -> aiosqlite.Connection:
        if conn is None:
            raise errors.Unavailable("the store is closed")
        return conn

    @contextlib.asynccontextmanager
    async def _read(self) -> AsyncIterator[aiosqlite.Connection]:
        try:
            yield self._conn(self._reader)
        except sqlite3.Error as e:
            raise errors.Unavailable(f"the store failed to read: {type(e).__name__}") from e

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        async with self._write_lock:
            db = self._conn(self._writer)
            try:
                await db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as e:
                raise errors.Unavailable(
                    f"the store failed to start a transaction: {type(e).__name__}"
                ) from e
            self._appended = []
            try:
                yield db
            except BaseException:
                self._appended = []
                with contextlib.suppress(sqlite3.Error):  # a broken connection must not mask the cause
                    await db.rollback()
                raise
            try:
                await db.commit()
            except sqlite3.Error as e:
                self._appended = []
                with contextlib.suppress(sqlite3.Error):
                    await db.rollback()
                raise errors.Unavailable(f"the store failed to commit: {type(e).__name__}") from e
            self._version += 1
            # Still under the lock: listeners see events in commit order, which is sequence order.
            appended, self._appended = self._appended, []
            if appended:
                for listener in self.listeners:
                    listener(appended)

    # Provision / deprovision -------------------------------------------------------------------

    async def provision(self, command: model.ProvisionCommand) -> model.MutationResult:
        """Persist a provision request in one transaction and return the answer to give.

        Same request_id: the first answer. Same identity and spec: a no-op (``changed`` False),
        except that a failed deployment is retried. Different spec: an update with a new generation.
        """
        request_hash = codec.provision_hash(command)
        async with self._transaction() as db:
            replay = await self._replay(db, command.namespace, command.request_id, request_hash)
            if replay is not None:
                return replay
            existing = await self._live_deployment(db, command)
            now = codec.now()
            if existing is None:
                result = await self._create(db, command, now)
            else:
                result = await self._update(db, existing, command, now)
            if command.request_id:
                await self._remember(
                    db, command.namespace, command.request_id, "provision", request_hash, result, now
                )
            return result

    async def _replay(
        self, db: aiosqlite.Connection, namespace: str, request_id: str, request_hash: str
    ) -> model.MutationResult | None:
        if not request_id:
            return None
        row = await _one(
            db,
            "SELECT request_hash, response FROM idempotency_keys WHERE namespace = ? AND request_id = ?",
            (namespace, request_id),
        )
        if row is None:
            return None
        if row["request_hash"] != request_hash:
            raise codec.reused_request_id(namespace, request_id)
        return codec.result_from_json(row["response"])

    async def _remember(
        self,
        db: aiosqlite.Connection,
        namespace: str,
        request_id: str,
        method: str,
        request_hash: str,
        result: model.MutationResult,
        now: datetime.datetime,
    ) -> None:
        await db.execute(
            "INSERT INTO idempotency_keys "
            "(namespace, request_id, method, request_hash, deployment_id, response, create_time) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                namespace,
                request_id,
                method,
                request_hash,
                result.deployment_id,
                codec.result_to_json(result),
                codec.ts(now),
            ),
        )

    async def _live_deployment(
        self, db: aiosqlite.Connection, command: model.ProvisionCommand
    ) -> model.Deployment | None:
        row = await _one(
            db,
            f"SELECT {codec.DEPLOYMENT_COLUMNS} FROM deployments d "
            "JOIN operations o ON o.operation_id = d.last_operation_id "
            "WHERE d.namespace = ? AND d.resource_type = ? AND d.resource_name = ? AND d.phase != ?",
            (
                command.namespace,
                command.resource_type.value,
                command.resource_name,
                model.Phase.DELETED.value,
            ),
        )
        return self._parsed.deployment(row) if row else None

    async def _insert_operation(
        self,
        db: aiosqlite.Connection,
        *,
        deployment_id: model.DeploymentId,
        op_type: model.OperationType,
        generation: int,
        now: datetime.datetime,
        operation_id: model.OperationId | None = None,
    ) -> model.Operation:
        op = codec.new_operation(op_type=op_type, generation=generation, now=now, operation_id=operation_id)
        await db.execute(
            "INSERT INTO operations (operation_id, deployment_id, type, state, generation, message, "
            "create_time, update_time) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                op.operation_id,
                deployment_id,
                op.type.value,
                op.state.value,
                op.generation,
                op.message,
                codec.ts(now),
                codec.ts(now),
            ),
        )
        return op

    async def _create(
        self, db: aiosqlite.Connection, command: model.ProvisionCommand, now: datetime.datetime
    ) -> model.MutationResult:
        deployment_id = codec.new_deployment_id()
        # The operation references its deployment, so the deployment goes first, already naming the
        # operation id chosen up front.
        op_id = codec.new_operation_id()
        await db.execute(
            "INSERT INTO deployments (deployment_id, namespace, resource_type, resource_name, desired_spec, "
            "generation, phase, callback_url, last_operation_id, create_time, update_time) "
            "VALUES (?, ?, ?, ?, ?, 1, ?, ?, ?, ?, ?)",
            (
                deployment_id,
                command.namespace,
                command.resource_type.value,
                command.resource_name,
                codec.spec_to_json(command.spec),
                model.Phase.PENDING.value,
                command.callback_url,
                op_id,
                codec.ts(now),
                codec.ts(now),
            ),
        )
        op = await self._insert_operation(
            db,
            deployment_id=deployment_id,
            op_type=model.OperationType.PROVISION,
            generation=1,
            now=now,
            operation_id=op_id,
        )
        return model.MutationResult(
            deployment_id=deployment_id, phase=model.Phase.PENDING, generation=1, operation=op, changed=True
        )

    async def _update(
        self,
        db: aiosqlite.Connection,
        existing: model.Deployment,
        command: model.ProvisionCommand,
        now: datetime.datetime,
    ) -> model.MutationResult:
        decision = lifecycle.on_provision(existing, command)
        generation = decision.generation
        if not decision.changed:
            if existing.callback_url != command.callback_url:
                await db.execute(
                    "UPDATE deployments SET callback_url = ?, update_time = ? WHERE deployment_id = ?",
                    (command.callback_url, codec.ts(now), existing.deployment_id),
                )
            return codec.unchanged(existing)
        op = await self._insert_operation(
            db,
            deployment_id=existing.deployment_id,
            op_type=model.OperationType.UPDATE,
            generation=generation,
            now=now,
        )
        await db.execute(
            "UPDATE deployments SET desired_spec = ?, generation = ?, phase = ?, callback_url = ?, "
            "last_operation_id = ?, update_time = ? WHERE deployment_id = ?",
            (
                codec.spec_to_json(command.spec),
                generation,
                model.Phase.PENDING.value,
                command.callback_url,
                op.operation_id,
                codec.ts(now),
                existing.deployment_id,
            ),
        )
        return model.MutationResult(
            deployment_id=existing.deployment_id,
            phase=model.Phase.PENDING,
            generation=generation,
            operation=op,
            changed=True,
        )

    async def deprovision(self, command: model.DeprovisionCommand) -> model.MutationResult:
        """Mark a deployment for deletion in one transaction; repeating it is a no-op."""
        request_hash = codec.deprovision_hash(command)
        async with self._transaction() as db:
            replay = await self._replay(db, command.namespace, command.request_id, request_hash)
            if replay is not None:
                return replay
            existing = await self._deployment(db, command.namespace, command.deployment_id)
            now = codec.now()
            if not lifecycle.on_deprovision(existing):
                result = codec.unchanged(existing)
            else:
                op = await self._insert_operation(
                    db,
                    deployment_id=existing.deployment_id,
                    op_type=model.OperationType.DEPROVISION,
                    generation=existing.generation,
                    now=now,
                )
                await db.execute(
                    "UPDATE deployments SET phase = ?, data_policy = ?, last_operation_id = ?, "
                    "update_time = ? WHERE deployment_id = ?",
                    (
                        model.Phase.DELETING.value,
                        command.data_policy.value,
                        op.operation_id,
                        codec.ts(now),
                        existing.deployment_id,
                    ),
                )
                result = model.MutationResult(
                    deployment_id=existing.deployment_id,
                    phase=model.Phase.DELETING,
                    generation=existing.generation,
                    operation=op,
                    changed=True,
                )
            if command.request_id:
                await self._remember(
                    db, command.namespace, command.request_id, "deprovision", request_hash, result, now
                )
            return result

    # Operations, the event log and the callback outbox ---------------------------------------------

    async def unfinished(self) -> list[model.Deployment]:
        """Deployments whose last operation is accepted or in progress (work to do or to resume)."""
        async with self._read() as db:
            rows = list(
                await db.execute_fetchall(
                    f"SELECT {codec.DEPLOYMENT_COLUMNS} FROM deployments d "
                    "JOIN operations o ON o.operation_id = d.last_operation_id "
                    f"WHERE o.state IN ({_marks(codec.UNFINISHED_STATES)}) ORDER BY o.create_time",
                    _values(codec.UNFINISHED_STATES),
                )
            )
        return [self._parsed.deployment(r) for r in rows]

    async def live_deployments(
        self, phases: tuple[model.Phase, ...], namespaces: list[str] | None = None
    ) -> list[model.Deployment]:
        """Deployments in the given phases (of the given namespaces, or all), by namespace and name."""
        where = [f"d.phase IN ({', '.join('?' * len(phases))})"]
        params: list[Any] = [p.value for p in phases]
        if namespaces is not None:
            where.append(f"d.namespace IN ({', '.join('?' * len(namespaces))})")
            params.extend(namespaces)
        async with self._read() as db:
            rows = list(
                await db.execute_fetchall(
                    f"SELECT {codec.DEPLOYMENT_COLUMNS} FROM deployments d "
                    "JOIN operations o ON o.operation_id = d.last_operation_id "
                    f"WHERE {' AND '.join(where)} ORDER BY d.namespace, d.resource_type, d.resource_name",
                    params,
                )
            )
        return [self._parsed.deployment(r) for r in rows]

    async def deployment_by_id(self, deployment_id: str) -> model.Deployment | None:
        """A deployment by id alone (for the broker's own workers, which are not namespace-scoped)."""
        async with self._read() as db:
            row = await _one(
                db,
                f"SELECT {codec.DEPLOYMENT_COLUMNS} FROM deployments d "
                "JOIN operations o ON o.operation_id = d.last_operation_id WHERE d.deployment_id = ?",
                (deployment_id,),
            )
        return self._parsed.deployment(row) if row else None

    async def start_operation(self, deployment: model.Deployment) -> model.Deployment | None:
        """Mark the deployment's last operation in progress (and the phase Provisioning).

        Returns the updated deployment, or None when a newer operation superseded this one.
        """
        op = deployment.last_operation
        now = codec.now()
        async with self._transaction() as db:
            cur = await db.execute(
                "UPDATE operations SET state = ?, message = ?, update_time = ? "
                f"WHERE operation_id = ? AND state IN ({_marks(codec.UNFINISHED_STATES)}) AND operation_id = "
                "(SELECT last_operation_id FROM deployments WHERE deployment_id = ?)",
                (
                    model.OperationState.IN_PROGRESS.value,
                    "in progress",
                    codec.ts(now),
                    op.operation_id,
                    *_values(codec.UNFINISHED_STATES),
                    deployment.deployment_id,
                ),
            )
            if cur.rowcount == 0:
                return None
            running = lifecycle.phase_when_started(op.type)
            if running is not None:
                await db.execute(
                    "UPDATE deployments SET phase = ?, update_time = ? WHERE deployment_id = ?",
                    (running.value, codec.ts(now), deployment.deployment_id),
                )
            return await self._deployment(db, deployment.namespace, deployment.deployment_id)

    async def note_progress(self, deployment: model.Deployment, message: str) -> None:
        """Say why an operation in progress is waiting (shown by GetDeployment and the state)."""
        async with self._transaction() as db:
            await db.execute(
                "UPDATE operations SET message = ?, update_time = ? WHERE operation_id = ? AND state = ?",
                (
                    message,
                    codec.ts(codec.now()),
                    deployment.last_operation.operation_id,
                    model.OperationState.IN_PROGRESS.value,
                ),
            )

    async def finish_operation(
        self,
        deployment: model.Deployment,
        *,
        succeeded: bool,
        message: str,
        event: model.DriftEvent | None,
        callback: tuple[str, dict[str, Any]] | None,
    ) -> bool:
        """Finish the deployment's last operation: its state, the phase, an event and a callback.

        All in one transaction, so the callback is enqueued if and only if the outcome is recorded.
        Returns False (and changes nothing) when a newer operation superseded this one.
        """
        op = deployment.last_operation
        now = codec.now()
        phase = lifecycle.phase_when_finished(op.type, succeeded=succeeded)
        async with self._transaction() as db:
            cur = await db.execute(
                "UPDATE operations SET state = ?, message = ?, update_time = ? WHERE operation_id = ? "
                f"AND state IN ({_marks(codec.UNFINISHED_STATES)}) AND operation_id = "
                "(SELECT last_operation_id FROM deployments WHERE deployment_id = ?)",
                (
                    (model.OperationState.SUCCEEDED if succeeded else model.OperationState.FAILED).value,
                    message,
                    codec.ts(now),
                    op.operation_id,
                    *_values(codec.UNFINISHED_STATES),
                    deployment.deployment_id,
                ),
            )
            if cur.rowcount == 0:
                return False
            await db.execute(
                "UPDATE deployments SET phase = ?, update_time = ? WHERE deployment_id = ?",
                (phase.value, codec.ts(now), deployment.deployment_id),
            )
            if event is not None:
                await self._append_event(db, dataclasses.replace(event, phase=phase), now)
            if callback is not None:
                url, payload = callback
                await db.execute(
                    "INSERT INTO callback_outbox "
                    "(delivery_id, deployment_id, url, payload, next_attempt_time, create_time) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        codec.new_delivery_id(),
                        deployment.deployment_id,
                        url,
                        json.dumps(payload),
                        codec.ts(now),
                        codec.ts(now),
                    ),
                )
            return True

    async def _append_events(
        self, db: aiosqlite.Connection, events: Sequence[model.DriftEvent], now: datetime.datetime
    ) -> None:
        """Append events in one statement. Under the write lock, the log's AUTOINCREMENT issues
        their sequences one after another from the highest issued so far, checked after."""
        if len(events) <= 1:
            for event in events:
                await self._append_event(db, event, now)
            return
        issued = "SELECT COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'drift_events'), 0)"
        before = await _one(db, issued)
        first = int(before[0] if before else 0) + 1
        await db.executemany(
            "INSERT INTO drift_events "
            "(deployment_id, namespace, resource_type, resource_name, kind, payload, event_time) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            [_event_values(event, now) for event in events],
        )
        after = await _one(db, issued)
        if after is None or int(after[0]) != first + len(events) - 1:
            raise errors.Unavailable("the store issued event sequences out of order")  # rolled back
        self._appended.extend(
            dataclasses.replace(event, sequence=first + i, event_time=now) for i, event in enumerate(events)
        )

    async def _append_event(
        self, db: aiosqlite.Connection, event: model.DriftEvent, now: datetime.datetime
    ) -> int:
        cur = await db.execute(
            "INSERT INTO drift_events "
            "(deployment_id, namespace, resource_type, resource_name, kind, payload, event_time) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            _event_values(event, now),
        )
        sequence = int(cur.lastrowid or 0)
        self._appended.append(dataclasses.replace(event, sequence=sequence, event_time=now))
        return sequence

    async def due_callbacks(self, limit: int = 50) -> list[port.Delivery]:
        """Undelivered callbacks whose next attempt is due, the longest due first."""
        async with self._read() as db:
            rows = list(
                await db.execute_fetchall(
                    "SELECT delivery_id, url, payload, attempts FROM callback_outbox "
                    "WHERE delivered_time IS NULL AND next_attempt_time <= ? "
                    "ORDER BY next_attempt_time LIMIT ?",
                    (codec.ts(codec.now()), limit),
                )
            )
        return [port.Delivery(r["delivery_id"], r["url"], r["payload"], r["attempts"]) for r in rows]

    async def callback_attempted(
        self, delivery_id: str, *, delivered: bool, error: str = "", retry_at: datetime.datetime | None = None
    ) -> None:
        """Record one delivery attempt: delivered, or failed with the time of the next attempt."""
        now = codec.now()
        async with self._transaction() as db:
            if delivered:
                await db.execute(
                    "UPDATE callback_outbox SET attempts = attempts + 1, delivered_time = ?, last_error = '' "
                    "WHERE delivery_id = ?",
                    (codec.ts(now), delivery_id),
                )
            else:
                await db.execute(
                    "UPDATE callback_outbox SET attempts = attempts + 1, last_error = ?, "
                    "next_attempt_time = ? WHERE delivery_id = ?",
                    (error[:500], codec.ts(retry_at or now), delivery_id),
                )

    async def accept(self, deployment: model.Deployment, spec: model.ResourceSpec, message: str) -> bool:
        """Make ``spec`` the desired state as already in place: a new generation, nothing to apply.

        Accepting drift records observed values as desired; the workload already runs them, so the
        generation's operation is finished at once and the phase stays as it was (the detector
        re-evaluates). Nothing is written when the deployment moved on since it was read; returns
        whether it was.
        """
        now = codec.now()
        async with self._transaction() as db:
            generation = deployment.generation + 1
            op = await self._insert_operation(
                db,
                deployment_id=deployment.deployment_id,
                op_type=model.OperationType.UPDATE,
                generation=generation,
                now=now,
            )
            await db.execute(
                "UPDATE operations SET state = ?, message = ? WHERE operation_id = ?",
                (model.OperationState.SUCCEEDED.value, message, op.operation_id),
            )
            cur = await db.execute(
                "UPDATE deployments SET desired_spec = ?, generation = ?, last_operation_id = ?, "
                "update_time = ? WHERE deployment_id = ? AND last_operation_id = ? "
                f"AND phase IN ({_marks(lifecycle.EVALUATED)})",
                (
                    codec.spec_to_json(spec),
                    generation,
                    op.operation_id,
                    codec.ts(now),
                    deployment.deployment_id,
                    deployment.last_operation.operation_id,
                    *_values(lifecycle.EVALUATED),
                ),
            )
            if cur.rowcount == 0:
                await db.execute("DELETE FROM operations WHERE operation_id = ?", (op.operation_id,))
                return False
            return True

    async def record_evaluations(self, verdicts: Sequence[port.Verdict]) -> list[bool]:
        """Store what the detector now reports, the resulting phases, and the events, in one transaction.

        A verdict whose deployment has moved on (another operation, or deleted) since it was
        evaluated writes nothing; returns whether each was written. A batch is a few statements
        whatever its size (each statement is a round trip to the connection's thread).
        """
        if not verdicts:
            return []
        now = codec.now()
        when = codec.ts(now)
        async with self._transaction() as db:
            cur = await db.executemany(
                "UPDATE deployments SET phase = ?, update_time = ? WHERE deployment_id = ? "
                f"AND last_operation_id = ? AND phase IN ({_marks(lifecycle.EVALUATED)})",
                [
                    (
                        v.phase.value,
                        when,
                        v.deployment.deployment_id,
                        v.deployment.last_operation.operation_id,
                        *_values(lifecycle.EVALUATED),
                    )
                    for v in verdicts
                ],
            )
            if cur.rowcount == len(verdicts):
                written = [True] * len(verdicts)
            else:
                # Some moved on. In this transaction a row matches after the update exactly when it
                # matched before it (the update keeps the operation and sets an evaluated phase).
                rows = await db.execute_fetchall(
                    "SELECT deployment_id, last_operation_id, phase FROM deployments "
                    f"WHERE deployment_id IN ({_marks(tuple(verdicts))})",
                    [v.deployment.deployment_id for v in verdicts],
                )
                found = {r[0]: (r[1], r[2]) for r in rows}
                evaluated = set(_values(lifecycle.EVALUATED))
                written = [
                    (row := found.get(v.deployment.deployment_id)) is not None
                    and row[0] == v.deployment.last_operation.operation_id
                    and row[1] in evaluated
                    for v in verdicts
                ]
            kept = [v for v, w in zip(verdicts, written, strict=True) if w]
            await db.executemany(
                "INSERT INTO drift_state (deployment_id, items, health, update_time) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (deployment_id) DO UPDATE SET items = excluded.items, "
                "health = excluded.health, update_time = excluded.update_time",
                [
                    (v.deployment.deployment_id, codec.items_to_json(v.items), v.health.value, when)
                    for v in kept
                ],
            )
            for v in kept:
                if v.crossings[0] or v.crossings[1]:
                    await self._cross(db, *v.crossings, now)
            await self._append_events(
                db, [dataclasses.replace(e, phase=v.phase) for v in kept for e in v.events], now
            )
        return written

    async def append_events(self, events: list[model.DriftEvent]) -> None:
        """Append events that describe no stored state (remediation attempts)."""
        now = codec.now()
        async with self._transaction() as db:
            await self._append_events(db, events, now)

    async def drift_states(self) -> dict[str, tuple[tuple[model.DriftItem, ...], model.Health]]:
        """What the detector last reported, per deployment (to resume without re-announcing)."""
        async with self._read() as db:
            rows = list(await db.execute_fetchall("SELECT deployment_id, items, health FROM drift_state"))
        return {
            r["deployment_id"]: (
                codec.items_from_json(r["items"]),
                model.Health(r["health"]),
            )
            for r in rows
        }

    async def event_bounds(self) -> tuple[int, int]:
        """The oldest retained and the newest sequence (0, 0 for an empty log)."""
        # One statement, one snapshot: read apart, a commit in between made a fresh log look pruned.
        async with self._read() as db:
            row = await _one(
                db,
                "SELECT COALESCE(MIN(sequence), 0), COALESCE(MAX(sequence), 0), "
                "(SELECT COALESCE(MAX(seq), 0) FROM sqlite_sequence WHERE name = 'drift_events') "
                "FROM drift_events",
            )
        oldest, highest, issued = (int(v) for v in row) if row else (0, 0, 0)
        return oldest, max(highest, issued)

    async def events_after(self, sequence: int, limit: int) -> list[model.DriftEvent]:
        """Events with a greater sequence, oldest first, across namespaces (callers filter)."""
        async with self._read() as db:
            rows = list(
                await db.execute_fetchall(
                    "SELECT sequence, deployment_id, namespace, resource_type, resource_name, kind, payload, "
                    "event_time FROM drift_events WHERE sequence > ? ORDER BY sequence LIMIT ?",
                    (sequence, limit),
                )
            )
        return [codec.event_from_row(r) for r in rows]

    async def prune_events(self, *, keep: int) -> int:
        """Delete all but the newest ``keep`` events; returns how many were deleted."""
        async with self._transaction() as db:
            cur = await db.execute(
                "DELETE FROM drift_events WHERE sequence <= (SELECT MAX(sequence) FROM drift_events) - ?",
                (keep,),
            )
            return int(cur.rowcount)

    async def prune_history(
        self, *, keys_before: datetime.datetime, deliveries_before: datetime.datetime
    ) -> tuple[int, int]:
        """Delete idempotency keys and delivered callbacks older than the given times."""
        async with self._transaction() as db:
            keys = await db.execute(
                "DELETE FROM idempotency_keys WHERE create_time < ?", (codec.ts(keys_before),)
            )
            deliveries = await db.execute(
                "DELETE FROM callback_outbox WHERE delivered_time IS NOT NULL AND delivered_time < ?",
                (codec.ts(deliveries_before),),
            )
            return int(keys.rowcount), int(deliveries.rowcount)

    async def prune_remediations(self, *, decided_before: datetime.datetime) -> int:
        """Delete proposals decided before the given time (never pending or approved ones)."""
        async with self._transaction() as db:
            cur = await db.execute(
                "DELETE FROM remediations WHERE state NOT IN (?, ?) AND decide_time < ?",
                (approval.State.PENDING.value, approval.State.APPROVED.value, codec.ts(decided_before)),
            )
            return int(cur.rowcount)

    async def set_policy(self, rule: policy.Rule) -> None:
        """Store a remediation policy, replacing the one for the same namespace and type."""
        async with self._transaction() as db:
            await db.execute(
                f"INSERT INTO policies ({codec.POLICY_COLUMNS}, update_time) VALUES (?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (namespace, resource_type) DO UPDATE SET mode = excluded.mode, "
                "ignore_fields = excluded.ignore_fields, maintenance_window = excluded.maintenance_window, "
                "rule_modes = excluded.rule_modes, update_time = excluded.update_time",
                (*codec.policy_values(rule), codec.ts(codec.now())),
            )

    async def policies(self) -> list[policy.Rule]:
        """Every stored remediation policy."""
        async with self._read() as db:
            rows = list(await db.execute_fetchall(f"SELECT {codec.POLICY_COLUMNS} FROM policies"))
        return [codec.rule_from_row(r) for r in rows]

    async def set_budget(self, namespace: str, monthly: float | None) -> None:
        """Store a namespace's budget, replacing its earlier one; None removes it."""
        async with self._transaction() as db:
            if monthly is None:
                await db.execute("DELETE FROM cost_budgets WHERE namespace = ?", (namespace,))
                return
            await db.execute(
                "INSERT INTO cost_budgets (namespace, monthly_budget, update_time) VALUES (?, ?, ?) "
                "ON CONFLICT (namespace) DO UPDATE SET monthly_budget = excluded.monthly_budget, "
                "update_time = excluded.update_time",
                (namespace, monthly, codec.ts(codec.now())),
            )

    async def budgets(self) -> dict[str, float]:
        """Every stored budget, by namespace."""
        async with self._read() as db:
            rows = list(await db.execute_fetchall("SELECT namespace, monthly_budget FROM cost_budgets"))
        return {r["namespace"]: float(r["monthly_budget"]) for r in rows}

    async def cost_alerts(self) -> set[str]:
        """The subjects over their cost threshold or budget now."""
        async with self._read() as db:
            rows = list(await db.execute_fetchall("SELECT subject FROM cost_alerts"))
        return {r["subject"] for r in rows}

    async def record_cost_alerts(
        self, *, raised: Set[str], cleared: Set[str], events: list[model.DriftEvent]
    ) -> None:
        """Remember subjects that went over, forget those back below, append the alerts: one transaction."""
        now = codec.now()
        async with self._transaction() as db:
            await self._cross(db, raised, cleared, now)
            for event in events:
                await self._append_event(db, event, now)

    @staticmethod
    async def _cross(
        db: aiosqlite.Connection, raised: Set[str], cleared: Set[str], now: datetime.datetime
    ) -> None:
        for subject in sorted(cleared):
            await db.execute("DELETE FROM cost_alerts WHERE subject = ?", (subject,))
        for subject in sorted(raised):
            await db.execute(
                "INSERT INTO cost_alerts (subject, since) VALUES (?, ?) ON CONFLICT (subject) DO NOTHING",
                (subject, codec.ts(now)),
            )

    # Pending remediations ------------------------------------------------------------------------

    async def propose_remediation(
        self, remediation: approval.Remediation, *, event: model.DriftEvent
    ) -> None:
        """Store a new pending proposal and its event; older pending ones of the deployment are superseded."""
        now = codec.now()
        async with self._transaction() as db:
            await db.execute(
                "UPDATE remediations SET state = ?, decide_time = ?, reason = ? "
                "WHERE deployment_id = ? AND state = ?",
                (
                    approval.State.SUPERSEDED.value,
                    codec.ts(now),
                    f"superseded by {remediation.remediation_id}: the drift changed",
                    remediation.deployment_id,
                    approval.State.PENDING.value,
                ),
            )
            await db.execute(
                f"INSERT INTO remediations ({codec.REMEDIATION_COLUMNS}) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    remediation.remediation_id,
                    remediation.deployment_id,
                    remediation.namespace,
                    remediation.state.value,
                    codec.remediation_payload(remediation),
                    codec.ts(remediation.create_time),
                    codec.ts(remediation.expire_time),
                    remediation.decided_by,
                    codec.ts(remediation.decide_time) if remediation.decide_time else None,
                    remediation.reason,
                ),
            )
            await self._append_event(db, event, now)

    async def list_remediations(
        self,
        *,
        namespace: str | None,
        deployment_id: str | None = None,
        states: frozenset[approval.State] | None = None,
    ) -> list[approval.Remediation]:
        """Proposals of a namespace (or every namespace), oldest first."""
        where, params = [], []
        if namespace is not None:
            where.append("namespace = ?")
            params.append(namespace)
        if deployment_id:
            where.append("deployment_id = ?")
            params.append(deployment_id)
        if states is not None:
            chosen = sorted(s.value for s in states)
            where.append(f"state IN ({_marks(tuple(chosen))})")
            params.extend(chosen)
        sql = f"SELECT {codec.REMEDIATION_COLUMNS} FROM remediations"
        if where:
            sql += " WHERE " + " AND ".join(where)
        async with self._read() as db:
            rows = list(await db.execute_fetchall(sql + " ORDER BY create_time, remediation_id", params))
        return [codec.remediation_from_row(r) for r in rows]

    async def get_remediation(self, namespace: str, remediation_id: str) -> approval.Remediation:
        """One proposal of a namespace; NotFound otherwise."""
        async with self._read() as db:
            row = await _one(
                db,
                f"SELECT {codec.REMEDIATION_COLUMNS} FROM remediations "
                "WHERE namespace = ? AND remediation_id = ?",
                (namespace, remediation_id),
            )
        if row is None:
            raise errors.NotFound(f"remediation {remediation_id!r} not found in namespace {namespace!r}")
        return codec.remediation_from_row(row)

    async def decision_replay(
        self, namespace: str, request_id: str, decision: approval.Decision, remediation_id: str
    ) -> approval.Remediation | None:
        """The proposal a request_id already decided, None for a new one.

        AlreadyExists when the request_id was used for another request.
        """
        if not request_id:
            return None
        async with self._read() as db:
            row = await _one(
                db,
                "SELECT request_hash, response FROM idempotency_keys WHERE namespace = ? AND request_id = ?",
                (namespace, request_id),
            )
        if row is None:
            return None
        if row["request_hash"] != codec.decision_hash(decision, remediation_id):
            raise codec.reused_request_id(namespace, request_id)
        return await self.get_remediation(namespace, codec.decided_remediation_id(row["response"]))

    async def decide_remediation(
        self,
        remediation: approval.Remediation,
        *,
        decision: approval.Decision,
        by: str,
        reason: str,
        request_id: str,
        event: model.DriftEvent,
    ) -> approval.Remediation:
        """Approve or reject a pending proposal with its event and request_id, in one transaction."""
        now = codec.now()
        async with self._transaction() as db:
            cur = await db.execute(
                "UPDATE remediations SET state = ?, decided_by = ?, decide_time = ?, reason = ? "
                "WHERE remediation_id = ? AND state = ?",
                (
                    decision.state.value,
                    by,
                    codec.ts(now),
                    reason,
                    remediation.remediation_id,
                    approval.State.PENDING.value,
                ),
            )
            if cur.rowcount == 0:
                row = await _one(
                    db,
                    "SELECT state FROM remediations WHERE remediation_id = ?",
                    (remediation.remediation_id,),
                )
                raise codec.not_pending(remediation.remediation_id, row["state"] if row else "gone")
            if request_id:
                await db.execute(
                    "INSERT INTO idempotency_keys "
                    "(namespace, request_id, method, request_hash, deployment_id, response, create_time) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        remediation.namespace,
                        request_id,
                        decision.value,
                        codec.decision_hash(decision, remediation.remediation_id),
                        remediation.deployment_id,
                        codec.decision_response(remediation.remediation_id),
                        codec.ts(now),
                    ),
                )
            await self._append_event(db, event, now)
        return dataclasses.replace(
            remediation, state=decision.state, decided_by=by, decide_time=now, reason=reason
        )

    async def close_remediation(
        self,
        remediation_id: str,
        *,
        from_states: frozenset[approval.State],
        to: approval.State,
        reason: str,
        event: model.DriftEvent | None = None,
    ) -> bool:
        """Move a proposal on (expired, superseded, applied), with an optional event."""
        now = codec.now()
        chosen = sorted(s.value for s in from_states)
        async with self._transaction() as db:
            cur = await db.execute(
                "UPDATE remediations SET state = ?, reason = ?, decide_time = COALESCE(decide_time, ?) "
                f"WHERE remediation_id = ? AND state IN ({_marks(tuple(chosen))})",
                (to.value, reason, codec.ts(now), remediation_id, *chosen),
            )
            if cur.rowcount == 0:
                return False
            if event is not None:
                await self._append_event(db, event, now)
            return True

    # Reads ----------------------------------------------------------------------------------------

    async def _deployment(
        self, db: aiosqlite.Connection, namespace: str, deployment_id: str
    ) -> model.Deployment:
        row = await _one(db, _BY_NAMESPACE_AND_ID, (namespace, deployment_id))
        if row is None:
            raise errors.NotFound(f"deployment {deployment_id!r} not found in namespace {namespace!r}")
        return self._parsed.deployment(row)

    async def get_deployment(
        self, namespace: model.Namespace, deployment_id: model.DeploymentId
    ) -> model.Deployment:
        """One deployment of a namespace, deleted ones included; NotFound otherwise."""
        async with self._read() as db:
            return await self._deployment(db, namespace, deployment_id)

    def deployments_version(self) -> int:
        """Committed write transactions so far (any of them may change a listing)."""
        return self._version

    async def list_deployments(
        self, query: model.ResourceQuery, page: model.PageRequest
    ) -> model.Listing[model.Deployment]:
        """The live (not deleted) deployments matching a query, ordered by type and name."""
        where = ["d.namespace = ?", "d.phase != ?"]
        params: list[Any] = [query.namespace, model.Phase.DELETED.value]
        if query.resource_type is not None:
            where.append("d.resource_type = ?")
            params.append(query.resource_type.value)
        if query.resource_name is not None:
            where.append("d.resource_name = ?")
            params.append(query.resource_name)
        if query.deployment_id is not None:
            where.append("d.deployment_id = ?")
            params.append(query.deployment_id)
        async with self._read() as db:
            total_row = await _one(
                db,
                f"SELECT COUNT(*) FROM deployments d WHERE {' AND '.join(where)}",
                params,
            )
            page_where = list(where)
            page_params = list(params)
            if page.after is not None:
                page_where.append("(d.resource_type, d.resource_name) > (?, ?)")
                page_params.extend(page.after)
            rows = list(
                await db.execute_fetchall(
                    f"SELECT {codec.DEPLOYMENT_COLUMNS} FROM deployments d "
                    "JOIN operations o ON o.operation_id = d.last_operation_id "
                    f"WHERE {' AND '.join(page_where)} ORDER BY d.resource_type, d.resource_name LIMIT ?",
                    [*page_params, page.size + 1],
                )
            )
        items = tuple(self._parsed.deployment(r) for r in rows[: page.size])
        return model.Listing(
            items=items,
            total=int(total_row[0]) if total_row else 0,
            next_after=codec.position_of(items[-1]) if len(rows) > page.size else None,
        )

    async def list_events(
        self, query: model.EventQuery, page: model.PageRequest
    ) -> model.Listing[model.DriftEvent]:
        """Events of a namespace (optionally one deployment and some kinds), oldest first."""
        where = ["namespace = ?"]
        params: list[Any] = [query.namespace]
        if query.deployment_id is not None:
            where.append("deployment_id = ?")
            params.append(query.deployment_id)
        if query.kinds:
            kinds = sorted(k.value for k in query.kinds)
            where.append(f"kind IN ({', '.join('?' * len(kinds))})")
            params.extend(kinds)
        if query.resource_type is not None:
            where.append("resource_type = ?")
            params.append(query.resource_type.value)
        if query.resource_name is not None:
            where.append("resource_name = ?")
            params.append(query.resource_name)
        position = codec.event_position(query, page.after)
        if position:
            where.append("sequence > ?")
            params.append(position)
        async with self._read() as db:
            rows = list(
                await db.execute_fetchall(
                    "SELECT sequence, deployment_id, namespace, resource_type, resource_name, kind, payload, "
                    f"event_time FROM drift_events WHERE {' AND '.join(where)} ORDER BY sequence LIMIT ?",
                    [*params, page.size + 1],
                )
            )
        items = tuple(codec.event_from_row(r) for r in rows[: page.size])
        # The log is not counted (a scan nobody asked for: ListDriftEvents reports no total).
        return model.Listing(
            items=items,
            total=len(items),
            next_after=codec.position_of(items[-1]) if len(rows) > page.size else None,
        )

    async def count_deployments(self) -> int:
        """How many deployments exist, deleted ones included (for tests and metrics)."""
        async with self._read() as db:
            row = await _one(db, "SELECT COUNT(*) FROM deployments")
        return int(row[0]) if row else 0


def _event_values(event: model.DriftEvent, now: datetime.datetime) -> tuple[str, ...]:
    return (
        event.deployment_id,
        event.namespace,
        event.resource_type.value,
        event.resource_name,
        event.kind.value,
        codec.event_payload(event),
        codec.ts(now),
    )


def _marks(values: tuple[Any, ...]) -> str:
    """One placeholder per value, for ``IN (...)``."""
    return ", ".join("?" * len(values))


def _values(values: tuple[model.Phase, ...] | tuple[model.OperationState, ...]) -> list[str]:
    return [v.value for v in values]


async def _one(db: aiosqlite.Connection, sql: str, params: Any = ()) -> sqlite3.Row | None:
    """The first row of a query, run and finished in one call (see ``Store``: reads never interleave)."""
    rows = await db.execute_fetchall(sql, params)
    return next(iter(rows), None)


def _statements(sql: str) -> Iterable[str]:
    """Split a migration script into statements with SQLite's own tokenizer (comments may hold ';')."""
    buffer = ""
    for line in sql.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            yield buffer.strip()
            buffer = ""
    leftover = [ln for ln in buffer.splitlines() if ln.strip() and not ln.strip().startswith("--")]
    if leftover:
        raise ValueError(f"incomplete statement at the end of a migration: {buffer.strip()[:60]}")


async def _connect(path: pathlib.Path) -> aiosqlite.Connection:
    conn = await aiosqlite.connect(path, isolation_level=None)
    conn.row_factory = sqlite3.Row
    pragmas: Iterable[str] = (
        "PRAGMA journal_mode=WAL",
        "PRAGMA synchronous=FULL",
        "PRAGMA foreign_keys=ON",
        "PRAGMA busy_timeout=5000",
    )
    for pragma in pragmas:
        await conn.execute(pragma)
    return conn


def _conforms(store: Store) -> port.Store:
    """mypy proves here that the SQLite adapter is a whole ``port.Store``."""
    return store

"""The desired-state store on PostgreSQL (asyncpg, with a pool): the only module that imports it.

The adapter of several replicas (``--store-url postgresql://...``): the same rows and the same
behaviour as ``broker.store.sqlite``, checked by the same contract suite, in PostgreSQL's dialect
(``migrations.POSTGRESQL``). What a value means and what a transition may do is decided in Python
(``broker.store.codec``); the SQL takes those decisions as parameters.

Concurrency. SQLite has one writer at a time; here several connections of several replicas write at
once, so each write transaction (READ COMMITTED) takes the locks that make it behave as if it ran
alone, always in one order, so that no two can deadlock:

1. Provision and Deprovision first take a transaction-scoped advisory lock on their namespace: the
   idempotency keys, the one-live-deployment-per-name rule and the replay of a request id are all
   per namespace, and two requests for one namespace now decide one after the other.
2. A transaction that moves a deployment on locks its row (``FOR NO KEY UPDATE``, which does not
   block the foreign-key checks of rows that refer to it) and checks in Python that it is still the
   deployment the caller read (same last operation, a phase the transition allows); a verdict is
   one compare-and-set ``UPDATE``.
3. Events are appended last, just before the commit (see below).

The event log's visibility contract (``broker.store.port``). A sequence taken from a SERIAL at
INSERT would be handed out in insert order while transactions commit in any order: a reader of
``events_after(N)`` could see N+2 committed while N+1 is still in flight, move on to N+2, and never
look at N+1 again. Two remedies exist. One holds back the tail: expose only events below the oldest
transaction still in flight (``pg_snapshot_xmin`` against a transaction id stored per event); every
reader then lags behind the slowest writer of the whole database, related or not, and each event
carries an ``xid8``. The other, taken here, assigns sequences in commit order: an event-appending
transaction takes the next sequences by ``UPDATE drift_event_counter SET issued = issued + n`` as
its last statement before ``COMMIT``. That row lock is held until the commit (it acts as a
``pg_advisory_xact_lock``, and is transactional too), so the next appender gets its sequences only
after the previous one has committed and is visible to every new snapshot. A snapshot that sees
sequence N+1 therefore sees N as well, and the numbers have no holes: a transaction that rolls back
returns its sequences with it. The price is that appenders queue for the span of one INSERT and one
COMMIT; events are few next to reads, and everything else a transaction does runs before it joins
the queue. Within one process the same critical section also calls the ``listeners``, so they hear
this replica's commits in sequence order, as on SQLite.

Errors of asyncpg, of the server and of the network become ``errors.Unavailable`` with the cause
chained; no message carries a password or a request's content.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import enum
import hashlib
import json
import logging
import urllib.parse
from collections.abc import AsyncIterator, Callable, Iterable, Sequence, Set
from typing import Any, TypeAlias

import asyncpg

from broker import errors
from broker.domain import approval, lifecycle, model, policy
from broker.store import codec, migrations, port

log = logging.getLogger(__name__)

# asyncpg's errors (server, protocol, client-side state) and the network's.
_FAILURES: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
    OSError,
)

# Connecting fails in these ways too: asyncpg raises ValueError for a malformed URL.
_OPEN_FAILURES: tuple[type[BaseException], ...] = (*_FAILURES, ValueError)

# Advisory lock classes (the first half of the two-key form); the broker's own, in its database.
_LOCK_MIGRATIONS = 0x62726B01
_LOCK_NAMESPACE = 0x62726B02

_Connection: TypeAlias = "asyncpg.pool.PoolConnectionProxy[asyncpg.Record]"


def redacted(url: str) -> str:
    """A connection URL fit for logs and messages: the password replaced by ``***``."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    user = urllib.parse.quote(parts.username or "", safe="")
    host = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def _key(text: str) -> int:
    """A 32-bit signed advisory-lock key for ``text`` (collisions only serialize a little more)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big", signed=True)


def _count(status: str) -> int:
    """The row count of a command status such as ``UPDATE 1``."""
    return int(status.rpartition(" ")[2] or 0)


def _values(values: Iterable[enum.Enum]) -> list[str]:
    return [str(v.value) for v in values]


class _Params:
    """Positional parameters of a statement assembled from clauses: ``add`` returns ``$n``."""

    def __init__(self) -> None:
        self.values: list[Any] = []

    def add(self, value: Any) -> str:
        self.values.append(value)
        return f"${len(self.values)}"


@dataclasses.dataclass
class _Tx:
    """A write transaction: its connection, and the events to append just before its commit."""

    conn: _Connection
    events: list[tuple[model.DriftEvent, datetime.datetime]] = dataclasses.field(default_factory=list)


# Replicas LISTEN on this channel; a commit that appended events NOTIFYs it with its last sequence.
NOTIFY_CHANNEL = "broker_events"
# And on this one: a commit that gave a deployment new work (a Provision or Deprovision that changed
# something, an accepted drift) NOTIFYs it with the deployment id, for the leader's workers.
CHANGED_CHANNEL = "broker_deployments"
# And on this one: a commit that set a remediation policy NOTIFYs it, so every replica reads them again.
POLICIES_CHANNEL = "broker_policies"


class Store:
    """Desired state, operations, idempotency keys, the drift event log and the callback outbox."""

    def __init__(self, pool: asyncpg.Pool[asyncpg.Record]) -> None:
        self._pool: asyncpg.Pool[asyncpg.Record] | None = pool
        # Held from taking sequences to calling the listeners (see the module docstring).
        self._append_lock = asyncio.Lock()
        self.listeners: list[port.Listener] = []
        self.wakers: list[Callable[[], None]] = []
        self.changed: list[Callable[[str], None]] = []
        self.policy_listeners: list[Callable[[], None]] = []
        self._notified: asyncpg.Connection[asyncpg.Record] | None = None

    @classmethod
    async def open(cls, url: str, *, pool_size: int = 10) -> Store:
        """Connect a pool to ``url`` (``postgresql://...``) and apply pending migrations."""
        shown = redacted(url)
        try:
            pool = await asyncpg.create_pool(
                url,
                min_size=1,
                max_size=pool_size,
                command_timeout=60,
                server_settings={"application_name": "resource-broker"},
            )
        except _OPEN_FAILURES as e:
            raise errors.Unavailable(f"cannot open the store at {shown}: {type(e).__name__}: {e}") from e
        store = cls(pool)
        try:
            await store._migrate(pool)
            await store._listen(url)
        except _FAILURES as e:
            await store.close()
            raise errors.Unavailable(f"cannot migrate the store at {shown}: {type(e).__name__}: {e}") from e
        except BaseException:
            await store.close()
            raise
        return store

    async def _listen(self, url: str) -> None:
        """LISTEN for other replicas' commits on a connection of its own (not the pool's).

        A notification only wakes the tailers (``wakers``); the log stays the source of truth,
        so a notification lost with its connection costs latency (the tailers poll), never an event.
        """
        self._notified = await asyncpg.connect(
            url, server_settings={"application_name": "resource-broker-listen"}
        )
        await self._notified.add_listener(NOTIFY_CHANNEL, self._woken)
        await self._notified.add_listener(CHANGED_CHANNEL, self._deployment_changed)
        await self._notified.add_listener(POLICIES_CHANNEL, self._policies_changed)

    def _woken(self, *_: object) -> None:
        for wake in self.wakers:
            wake()

    def _deployment_changed(self, _conn: object, _pid: object, _channel: object, payload: object) -> None:
        # Work accepted by any replica (this one too) reaches the leader's provisioner and detector
        # now, not at their next full sweep. A lost notification costs that latency, never the work.
        for changed in self.changed:
            changed(str(payload))

    def _policies_changed(self, *_: object) -> None:
        for listener in self.policy_listeners:
            listener()

    @staticmethod
    async def _announce(tx: _Tx, deployment_id: str) -> None:
        """NOTIFY every replica, at commit, that a deployment has new work (``changed``)."""
        await tx.conn.execute("SELECT pg_notify($1, $2)", CHANGED_CHANNEL, deployment_id)

    async def close(self) -> None:
        """Close the listening connection and the pool; safe to call twice."""
        notified, self._notified = self._notified, None
        if notified is not None:
            with contextlib.suppress(*_FAILURES):
                await notified.close()
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    async def _migrate(self, pool: asyncpg.Pool[asyncpg.Record]) -> None:
        async with pool.acquire() as conn:
            for version, description, sql in migrations.POSTGRESQL:
                # Replicas starting together migrate one after the other; the later ones find
                # the work done.
                async with conn.transaction():
                    await conn.execute("SELECT pg_advisory_xact_lock($1, 0)", _LOCK_MIGRATIONS)
                    await conn.execute(
                        "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, "
                        "description TEXT NOT NULL, applied_time TIMESTAMPTZ NOT NULL)"
                    )
                    # Every version not applied yet (not only those above the newest; see SQLite's).
                    if await conn.fetchval("SELECT 1 FROM schema_migrations WHERE version = $1", version):
                        continue
                    await conn.execute(sql)
                    await conn.execute(
                        "INSERT INTO schema_migrations (version, description, applied_time) "
                        "VALUES ($1, $2, $3)",
                        version,
                        description,
                        codec.now(),
                    )
                log.info("applied store migration", extra={"version": version, "description": description})

    def _live(self) -> asyncpg.Pool[asyncpg.Record]:
        if self._pool is None:
            raise errors.Unavailable("the store is closed")
        return self._pool

    async def _fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        try:
            return await self._live().fetch(sql, *args)
        except _FAILURES as e:
            raise errors.Unavailable(f"the store failed to read: {type(e).__name__}") from e

    async def _fetchrow(self, sql: str, *args: Any) -> asyncpg.Record | None:
        try:
            return await self._live().fetchrow(sql, *args)
        except _FAILURES as e:
            raise errors.Unavailable(f"the store failed to read: {type(e).__name__}") from e

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[_Tx]:
        pool = self._live()
        try:
            async with pool.acquire() as conn:
                transaction = conn.transaction()
                await transaction.start()
                tx = _Tx(conn)
                committed = False
                try:
                    yield tx
                    if not tx.events:
                        await transaction.commit()
                        committed = True
                        return
                    async with self._append_lock:
                        published = await self._insert_events(conn, tx.events)
                        await transaction.commit()
                        committed = True
                        # Still in the critical section: listeners hear commits in sequence order.
                        for listener in self.listeners:
                            listener(published)
                except BaseException:
                    if not committed:
                        with contextlib.suppress(*_FAILURES):  # a broken connection must not mask the cause
                            await transaction.rollback()
                    raise
        except _FAILURES as e:
            raise errors.Unavailable(f"the store failed to write: {type(e).__name__}") from e

    async def _insert_events(
        self, conn: _Connection, pending: list[tuple[model.DriftEvent, datetime.datetime]]
    ) -> list[model.DriftEvent]:
        """Take the next sequences (the row lock that orders commits) and insert the events."""
        issued = int(
            await conn.fetchval(
                "UPDATE drift_event_counter SET issued = issued + $1 RETURNING issued", len(pending)
            )
        )
        first = issued - len(pending) + 1
        events = [
            dataclasses.replace(event, sequence=first + i, event_time=at)
            for i, (event, at) in enumerate(pending)
        ]
        await conn.execute(
            "INSERT INTO drift_events "
            "(sequence, deployment_id, namespace, resource_type, resource_name, kind, payload, event_time) "
            "SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], "
            "$7::text[], $8::timestamptz[])",
            [e.sequence for e in events],
            [e.deployment_id for e in events],
            [e.namespace for e in events],
            [e.resource_type.value for e in events],
            [e.resource_name for e in events],
            [e.kind.value for e in events],
            [codec.event_payload(e) for e in events],
            [e.event_time for e in events],
        )
        # Delivered at commit, to every replica's listening connection: their tailers read at once.
        await conn.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, str(issued))
        return events

    async def schema_version(self) -> int:
        """The newest applied migration."""
        row = await self._fetchrow("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
        return int(row[0]) if row else 0

    async def ping(self) -> None:
        """Raise Unavailable unless the store answers a trivial query (used by readiness)."""
        await self._fetchrow("SELECT 1")

    async def count_deployments(self) -> int:
        """How many deployments exist, deleted ones included (for tests and metrics)."""
        row = await self._fetchrow("SELECT COUNT(*) FROM deployments")
        return int(row[0]) if row else 0

    # Provision / deprovision -------------------------------------------------------------------

    async def provision(self, command: model.ProvisionCommand) -> model.MutationResult:
        """Persist a provision request in one transaction and return the answer to give.

        Same request_id: the first answer. Same identity and spec: a no-op (``changed`` False),
        except that a failed deployment is retried. Different spec: an update with a new generation.
        """
        request_hash = codec.provision_hash(command)
        async with self._transaction() as tx:
            await tx.conn.execute(
                "SELECT pg_advisory_xact_lock($1, $2)", _LOCK_NAMESPACE, _key(command.namespace)
            )
            replay = await self._replay(tx, command.namespace, command.request_id, request_hash)
            if replay is not None:
                return replay
            row = await tx.conn.fetchrow(
                f"SELECT {codec.DEPLOYMENT_COLUMNS} FROM deployments d "
                "JOIN operations o ON o.operation_id = d.last_operation_id "
                "WHERE d.namespace = $1 AND d.resource_type = $2 AND d.resource_name = $3 AND d.phase <> $4 "
                "FOR NO KEY UPDATE OF d",
                command.namespace,
                command.resource_type.value,
                command.resource_name,
                model.Phase.DELETED.value,
            )
            now = codec.now()
            if row is None:
                result = await self._create(tx, command, now)
            else:
                result = await self._update(tx, codec.deployment_from_row(row), command, now)
            if command.request_id:
                await self._remember(tx, command, "provision", request_hash, result, now)
            if result.changed:
                await self._announce(tx, result.deployment_id)
            return result

    async def _replay(
        self, tx: _Tx, namespace: str, request_id: str, request_hash: str
    ) -> model.MutationResult | None:
        if not request_id:
            return None
        row = await tx.conn.fetchrow(
            "SELECT request_hash, response FROM idempotency_keys WHERE namespace = $1 AND request_id = $2",
            namespace,
            request_id,
        )
        if row is None:
            return None
        if row["request_hash"] != request_hash:
            raise codec.reused_request_id(namespace, request_id)
        return codec.result_from_json(row["response"])

    async def _remember(
        self,
        tx: _Tx,
        command: model.ProvisionCommand | model.DeprovisionCommand,
        method: str,
        request_hash: str,
        result: model.MutationResult,
        now: datetime.datetime,
    ) -> None:
        await tx.conn.execute(
            "INSERT INTO idempotency_keys "
            "(namespace, request_id, method, request_hash, deployment_id, response, create_time) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7)",
            command.namespace,
            command.request_id,
            method,
            request_hash,
            result.deployment_id,
            codec.result_to_json(result),
            now,
        )

    async def _insert_operation(self, tx: _Tx, deployment_id: str, op: model.Operation) -> None:
        await tx.conn.execute(
            "INSERT INTO operations (operation_id, deployment_id, type, state, generation, message, "
            "create_time, update_time) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            op.operation_id,
            deployment_id,
            op.type.value,
            op.state.value,
            op.generation,
            op.message,
            op.create_time,
            op.update_time,
        )

    async def _create(
        self, tx: _Tx, command: model.ProvisionCommand, now: datetime.datetime
    ) -> model.MutationResult:
        deployment_id = codec.new_deployment_id()
        # The operation references its deployment, so the deployment goes first, already naming the
        # operation id chosen up front.
        op = codec.new_operation(op_type=model.OperationType.PROVISION, generation=1, now=now)
        await tx.conn.execute(
            "INSERT INTO deployments (deployment_id, namespace, resource_type, resource_name, desired_spec, "
            "generation, phase, callback_url, last_operation_id, create_time, update_time) "
            "VALUES ($1, $2, $3, $4, $5, 1, $6, $7, $8, $9, $9)",
            deployment_id,
            command.namespace,
            command.resource_type.value,
            command.resource_name,
            codec.spec_to_json(command.spec),
            model.Phase.PENDING.value,
            command.callback_url,
            op.operation_id,
            now,
        )
        await self._insert_operation(tx, deployment_id, op)
        return model.MutationResult(
            deployment_id=deployment_id, phase=model.Phase.PENDING, generation=1, operation=op, changed=True
        )

    async def _update(
        self,
        tx: _Tx,
        existing: model.Deployment,
        command: model.ProvisionCommand,
        now: datetime.datetime,
    ) -> model.MutationResult:
        decision = lifecycle.on_provision(existing, command)
        generation = decision.generation
        if not decision.changed:
            if existing.callback_url != command.callback_url:
                await tx.conn.execute(
                    "UPDATE deployments SET callback_url = $1, update_time = $2 WHERE deployment_id = $3",
                    command.callback_url,
                    now,
                    existing.deployment_id,
                )
            return codec.unchanged(existing)
        op = codec.new_operation(op_type=model.OperationType.UPDATE, generation=generation, now=now)
        await self._insert_operation(tx, existing.deployment_id, op)
        await tx.conn.execute(
            "UPDATE deployments SET desired_spec = $1, generation = $2, phase = $3, callback_url = $4, "
            "last_operation_id = $5, update_time = $6 WHERE deployment_id = $7",
            codec.spec_to_json(command.spec),
            generation,
            model.Phase.PENDING.value,
            command.callback_url,
            op.operation_id,
            now,
            existing.deployment_id,
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
        async with self._transaction() as tx:
            await tx.conn.execute(
                "SELECT pg_advisory_xact_lock($1, $2)", _LOCK_NAMESPACE, _key(command.namespace)
            )
            replay = await self._replay(tx, command.namespace, command.request_id, request_hash)
            if replay is not None:
                return replay
            existing = await self._deployment(tx.conn, command.namespace, command.deployment_id, lock=True)
            now = codec.now()
            if not lifecycle.on_deprovision(existing):
                result = codec.unchanged(existing)
            else:
                op = codec.new_operation(
                    op_type=model.OperationType.DEPROVISION, generation=existing.generation, now=now
                )
                await self._insert_operation(tx, existing.deployment_id, op)
                await tx.conn.execute(
                    "UPDATE deployments SET phase = $1, data_policy = $2, last_operation_id = $3, "
                    "update_time = $4 WHERE deployment_id = $5",
                    model.Phase.DELETING.value,
                    command.data_policy.value,
                    op.operation_id,
                    now,
                    existing.deployment_id,
                )
                result = model.MutationResult(
                    deployment_id=existing.deployment_id,
                    phase=model.Phase.DELETING,
                    generation=existing.generation,
                    operation=op,
                    changed=True,
                )
            if command.request_id:
                await self._remember(tx, command, "deprovision", request_hash, result, now)
            if result.changed:
                await self._announce(tx, result.deployment_id)
            return result

    # Operations, the event log and the callback outbox ---------------------------------------------

    async def _lock_deployment(self, tx: _Tx, deployment_id: str) -> asyncpg.Record | None:
        """Lock a deployment's row for this transaction; its last operation id and phase."""
        return await tx.conn.fetchrow(
            "SELECT last_operation_id, phase FROM deployments WHERE deployment_id = $1 FOR NO KEY UPDATE",
            deployment_id,
        )

    async def unfinished(self) -> list[model.Deployment]:
        """Deployments whose last operation is accepted or in progress (work to do or to resume)."""
        rows = await self._fetch(
            f"SELECT {codec.DEPLOYMENT_COLUMNS} FROM deployments d "
            "JOIN operations o ON o.operation_id = d.last_operation_id "
            "WHERE o.state = ANY($1::text[]) ORDER BY o.create_time",
            _values(codec.UNFINISHED_STATES),
        )
        return [codec.deployment_from_row(r) for r in rows]

    async def live_deployments(
        self, phases: tuple[model.Phase, ...], namespaces: list[str] | None = None
    ) -> list[model.Deployment]:
        """Deployments in the given phases (of the given namespaces, or all), by namespace and name."""
        params = _Params()
        where = [f"d.phase = ANY({params.add(_values(phases))}::text[])"]
        if namespaces is not None:
            where.append(f"d.namespace = ANY({params.add(list(namespaces))}::text[])")
        rows = await self._fetch(
            f"SELECT {codec.DEPLOYMENT_COLUMNS} FROM deployments d "
            "JOIN operations o ON o.operation_id = d.last_operation_id "
            f"WHERE {' AND '.join(where)} ORDER BY d.namespace, d.resource_type, d.resource_name",
            *params.values,
        )
        return [codec.deployment_from_row(r) for r in rows]

    async def deployment_by_id(self, deployment_id: str) -> model.Deployment | None:
        """A deployment by id alone (for the broker's own workers, which are not namespace-scoped)."""
        row = await self._fetchrow(
            f"SELECT {codec.DEPLOYMENT_COLUMNS} FROM deployments d "
            "JOIN operations o ON o.operation_id = d.last_operation_id WHERE d.deployment_id = $1",
            deployment_id,
        )
        return codec.deployment_from_row(row) if row else None

    async def start_operation(self, deployment: model.Deployment) -> model.Deployment | None:
        """Mark the deployment's last operation in progress (and the phase Provisioning).

        Returns the updated deployment, or None when a newer operation superseded this one.
        """
        op = deployment.last_operation
        now = codec.now()
        async with self._transaction() as tx:
            current = await self._lock_deployment(tx, deployment.deployment_id)
            if current is None or current["last_operation_id"] != op.operation_id:
                return None
            status = await tx.conn.execute(
                "UPDATE operations SET state = $1, message = $2, update_time = $3 "
                "WHERE operation_id = $4 AND state = ANY($5::text[])",
                model.OperationState.IN_PROGRESS.value,
                "in progress",
                now,
                op.operation_id,
                _values(codec.UNFINISHED_STATES),
            )
            if _count(status) == 0:
                return None
            running = lifecycle.phase_when_started(op.type)
            if running is not None:
                await tx.conn.execute(
                    "UPDATE deployments SET phase = $1, update_time = $2 WHERE deployment_id = $3",
                    running.value,
                    now,
                    deployment.deployment_id,
                )
            return await self._deployment(tx.conn, deployment.namespace, deployment.deployment_id)

    async def note_progress(self, deployment: model.Deployment, message: str) -> None:
        """Say why an operation in progress is waiting (shown by GetDeployment and the state)."""
        async with self._transaction() as tx:
            await tx.conn.execute(
                "UPDATE operations SET message = $1, update_time = $2 WHERE operation_id = $3 AND state = $4",
                message,
                codec.now(),
                deployment.last_operation.operation_id,
                model.OperationState.IN_PROGRESS.value,
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
        state = model.OperationState.SUCCEEDED if succeeded else model.OperationState.FAILED
        async with self._transaction() as tx:
            current = await self._lock_deployment(tx, deployment.deployment_id)
            if current is None or current["last_operation_id"] != op.operation_id:
                return False
            status = await tx.conn.execute(
                "UPDATE operations SET state = $1, message = $2, update_time = $3 "
                "WHERE operation_id = $4 AND state = ANY($5::text[])",
                state.value,
                message,
                now,
                op.operation_id,
                _values(codec.UNFINISHED_STATES),
            )
            if _count(status) == 0:
                return False
            await tx.conn.execute(
                "UPDATE deployments SET phase = $1, update_time = $2 WHERE deployment_id = $3",
                phase.value,
                now,
                deployment.deployment_id,
            )
            if event is not None:
                tx.events.append((dataclasses.replace(event, phase=phase), now))
            if callback is not None:
                url, payload = callback
                await tx.conn.execute(
                    "INSERT INTO callback_outbox "
                    "(delivery_id, deployment_id, url, payload, next_attempt_time, create_time) "
                    "VALUES ($1, $2, $3, $4, $5, $5)",
                    codec.new_delivery_id(),
                    deployment.deployment_id,
                    url,
                    json.dumps(payload),
                    now,
                )
            return True

    async def due_callbacks(self, limit: int = 50) -> list[port.Delivery]:
        """Undelivered callbacks whose next attempt is due, the longest due first."""
        rows = await self._fetch(
            "SELECT delivery_id, url, payload, attempts FROM callback_outbox "
            "WHERE delivered_time IS NULL AND next_attempt_time <= $1 "
            "ORDER BY next_attempt_time LIMIT $2",
            codec.now(),
            limit,
        )
        return [port.Delivery(r["delivery_id"], r["url"], r["payload"], r["attempts"]) for r in rows]

    async def callback_attempted(
        self, delivery_id: str, *, delivered: bool, error: str = "", retry_at: datetime.datetime | None = None
    ) -> None:
        """Record one delivery attempt: delivered, or failed with the time of the next attempt."""
        now = codec.now()
        async with self._transaction() as tx:
            if delivered:
                await tx.conn.execute(
                    "UPDATE callback_outbox SET attempts = attempts + 1, delivered_time = $1, "
                    "last_error = '' WHERE delivery_id = $2",
                    now,
                    delivery_id,
                )
            else:
                await tx.conn.execute(
                    "UPDATE callback_outbox SET attempts = attempts + 1, last_error = $1, "
                    "next_attempt_time = $2 WHERE delivery_id = $3",
                    error[:500],
                    retry_at or now,
                    delivery_id,
                )

    async def accept(self, deployment: model.Deployment, spec: model.ResourceSpec, message: str) -> bool:
        """Make ``spec`` the desired state as already in place: a new generation, nothing to apply.

        Accepting drift records observed values as desired; the workload already runs them, so the
        generation's operation is finished at once and the phase stays as it was (the detector
        re-evaluates). Nothing is written when the deployment moved on since it was read; returns
        whether it was.
        """
        now = codec.now()
        async with self._transaction() as tx:
            current = await self._lock_deployment(tx, deployment.deployment_id)
            if (
                current is None
                or current["last_operation_id"] != deployment.last_operation.operation_id
                or model.Phase(current["phase"]) not in lifecycle.EVALUATED
            ):
                return False
            generation = deployment.generation + 1
            op = dataclasses.replace(
                codec.new_operation(op_type=model.OperationType.UPDATE, generation=generation, now=now),
                state=model.OperationState.SUCCEEDED,
                message=message,
            )
            await self._insert_operation(tx, deployment.deployment_id, op)
            await tx.conn.execute(
                "UPDATE deployments SET desired_spec = $1, generation = $2, last_operation_id = $3, "
                "update_time = $4 WHERE deployment_id = $5",
                codec.spec_to_json(spec),
                generation,
                op.operation_id,
                now,
                deployment.deployment_id,
            )
            await self._announce(tx, deployment.deployment_id)
            return True

    async def record_evaluations(self, verdicts: Sequence[port.Verdict]) -> list[bool]:
        """Store what the detector now reports, the resulting phases, and the events, in one transaction.

        A verdict whose deployment has moved on (another operation, or deleted) since it was
        evaluated writes nothing; returns whether each was written.
        """
        if not verdicts:
            return []
        now = codec.now()
        ids = [v.deployment.deployment_id for v in verdicts]
        async with self._transaction() as tx:
            if len(set(ids)) < len(ids):
                # One deployment twice: its verdicts are applied in turn, each seeing the one before.
                written = [await self._record_batch(tx, [v], now) for v in verdicts]
                return [w for (w,) in written]
            return await self._record_batch(tx, verdicts, now)

    async def _record_batch(
        self, tx: _Tx, verdicts: Sequence[port.Verdict], now: datetime.datetime
    ) -> list[bool]:
        """``record_evaluations`` of verdicts on distinct deployments: two statements for all of them."""
        rows = await tx.conn.fetch(
            "UPDATE deployments AS d SET phase = v.phase, update_time = $1 "
            "FROM unnest($2::text[], $3::text[], $4::text[]) AS v (deployment_id, operation_id, phase) "
            "WHERE d.deployment_id = v.deployment_id AND d.last_operation_id = v.operation_id "
            "AND d.phase = ANY($5::text[]) RETURNING d.deployment_id",
            now,
            [v.deployment.deployment_id for v in verdicts],
            [v.deployment.last_operation.operation_id for v in verdicts],
            [v.phase.value for v in verdicts],
            _values(lifecycle.EVALUATED),
        )
        updated = {r["deployment_id"] for r in rows}
        written = [v.deployment.deployment_id in updated for v in verdicts]
        kept = [v for v, w in zip(verdicts, written, strict=True) if w]
        if kept:
            await tx.conn.execute(
                "INSERT INTO drift_state (deployment_id, items, health, update_time) "
                "SELECT v.deployment_id, v.items, v.health, $1 "
                "FROM unnest($2::text[], $3::text[], $4::text[]) AS v (deployment_id, items, health) "
                "ON CONFLICT (deployment_id) DO UPDATE SET "
                "items = excluded.items, health = excluded.health, update_time = excluded.update_time",
                now,
                [v.deployment.deployment_id for v in kept],
                [codec.items_to_json(v.items) for v in kept],
                [v.health.value for v in kept],
            )
        for verdict in kept:
            await self._cross(tx, *verdict.crossings, now)  # in turn: a later verdict's crossing wins
            tx.events.extend(
                (dataclasses.replace(event, phase=verdict.phase), now) for event in verdict.events
            )
        return written

    async def append_events(self, events: list[model.DriftEvent]) -> None:
        """Append events that describe no stored state (remediation attempts)."""
        now = codec.now()
        async with self._transaction() as tx:
            tx.events.extend((event, now) for event in events)

    async def drift_states(self) -> dict[str, tuple[tuple[model.DriftItem, ...], model.Health]]:
        """What the detector last reported, per deployment (to resume without re-announcing)."""
        rows = await self._fetch("SELECT deployment_id, items, health FROM drift_state")
        return {
            r["deployment_id"]: (codec.items_from_json(r["items"]), model.Health(r["health"])) for r in rows
        }

    async def event_bounds(self) -> tuple[int, int]:
        """The oldest retained and the newest sequence (0, 0 for an empty log)."""
        # One statement, one snapshot: read apart, a commit in between made a fresh log look pruned.
        row = await self._fetchrow(
            "SELECT COALESCE(MIN(sequence), 0), COALESCE(MAX(sequence), 0), "
            "(SELECT issued FROM drift_event_counter) FROM drift_events"
        )
        oldest, highest, issued = (int(v or 0) for v in row) if row else (0, 0, 0)
        return oldest, max(highest, issued)

    async def events_after(self, sequence: int, limit: int) -> list[model.DriftEvent]:
        """Events with a greater sequence, oldest first, across namespaces (callers filter)."""
        rows = await self._fetch(
            f"SELECT {codec.EVENT_COLUMNS} FROM drift_events WHERE sequence > $1 ORDER BY sequence LIMIT $2",
            sequence,
            limit,
        )
        return [codec.event_from_row(r) for r in rows]

    async def prune_events(self, *, keep: int) -> int:
        """Delete all but the newest ``keep`` events; returns how many were deleted."""
        async with self._transaction() as tx:
            status = await tx.conn.execute(
                "DELETE FROM drift_events WHERE sequence <= (SELECT MAX(sequence) FROM drift_events) - $1",
                keep,
            )
            return _count(status)

    async def prune_history(
        self, *, keys_before: datetime.datetime, deliveries_before: datetime.datetime
    ) -> tuple[int, int]:
        """Delete idempotency keys and delivered callbacks older than the given times."""
        async with self._transaction() as tx:
            keys = await tx.conn.execute("DELETE FROM idempotency_keys WHERE create_time < $1", keys_before)
            deliveries = await tx.conn.execute(
                "DELETE FROM callback_outbox WHERE delivered_time IS NOT NULL AND delivered_time < $1",
                deliveries_before,
            )
            return _count(keys), _count(deliveries)

    async def prune_remediations(self, *, decided_before: datetime.datetime) -> int:
        """Delete proposals decided before the given time (never pending or approved ones)."""
        async with self._transaction() as tx:
            status = await tx.conn.execute(
                "DELETE FROM remediations WHERE state <> ALL($1::text[]) AND decide_time < $2",
                [approval.State.PENDING.value, approval.State.APPROVED.value],
                decided_before,
            )
            return _count(status)

    async def set_policy(self, rule: policy.Rule) -> None:
        """Store a remediation policy, replacing the one for the same namespace and type."""
        async with self._transaction() as tx:
            await tx.conn.execute(
                f"INSERT INTO policies ({codec.POLICY_COLUMNS}, update_time) "
                "VALUES ($1, $2, $3, $4, $5, $6, $7) "
                "ON CONFLICT (namespace, resource_type) DO UPDATE SET mode = excluded.mode, "
                "ignore_fields = excluded.ignore_fields, maintenance_window = excluded.maintenance_window, "
                "rule_modes = excluded.rule_modes, update_time = excluded.update_time",
                *codec.policy_values(rule),
                codec.now(),
            )
            # Delivered at commit: every replica (this one too) reads the policies again.
            await tx.conn.execute("SELECT pg_notify($1, $2)", POLICIES_CHANNEL, rule.namespace)

    async def policies(self) -> list[policy.Rule]:
        """Every stored remediation policy."""
        rows = await self._fetch(f"SELECT {codec.POLICY_COLUMNS} FROM policies")
        return [codec.rule_from_row(r) for r in rows]

    async def set_budget(self, namespace: str, monthly: float | None) -> None:
        """Store a namespace's budget, replacing its earlier one; None removes it."""
        async with self._transaction() as tx:
            # Budgets go with policies: every replica reads both again (``policy_listeners``).
            await tx.conn.execute("SELECT pg_notify($1, $2)", POLICIES_CHANNEL, namespace)
            if monthly is None:
                await tx.conn.execute("DELETE FROM cost_budgets WHERE namespace = $1", namespace)
                return
            await tx.conn.execute(
                "INSERT INTO cost_budgets (namespace, monthly_budget, update_time) VALUES ($1, $2, $3) "
                "ON CONFLICT (namespace) DO UPDATE SET monthly_budget = excluded.monthly_budget, "
                "update_time = excluded.update_time",
                namespace,
                monthly,
                codec.now(),
            )

    async def budgets(self) -> dict[str, float]:
        """Every stored budget, by namespace."""
        rows = await self._fetch("SELECT namespace, monthly_budget FROM cost_budgets")
        return {r["namespace"]: float(r["monthly_budget"]) for r in rows}

    async def cost_alerts(self) -> set[str]:
        """The subjects over their cost threshold or budget now."""
        rows = await self._fetch("SELECT subject FROM cost_alerts")
        return {r["subject"] for r in rows}

    async def record_cost_alerts(
        self, *, raised: Set[str], cleared: Set[str], events: list[model.DriftEvent]
    ) -> None:
        """Remember subjects that went over, forget those back below, append the alerts: one transaction."""
        now = codec.now()
        async with self._transaction() as tx:
            await self._cross(tx, raised, cleared, now)
            tx.events.extend((event, now) for event in events)

    @staticmethod
    async def _cross(tx: _Tx, raised: Set[str], cleared: Set[str], now: datetime.datetime) -> None:
        if cleared:
            await tx.conn.execute("DELETE FROM cost_alerts WHERE subject = ANY($1::text[])", sorted(cleared))
        if raised:
            await tx.conn.execute(
                "INSERT INTO cost_alerts (subject, since) SELECT unnest($1::text[]), $2 "
                "ON CONFLICT (subject) DO NOTHING",
                sorted(raised),
                now,
            )

    # Pending remediations ------------------------------------------------------------------------

    async def propose_remediation(
        self, remediation: approval.Remediation, *, event: model.DriftEvent
    ) -> None:
        """Store a new pending proposal and its event; older pending ones of the deployment are superseded."""
        now = codec.now()
        async with self._transaction() as tx:
            await tx.conn.execute(
                "UPDATE remediations SET state = $1, decide_time = $2, reason = $3 "
                "WHERE deployment_id = $4 AND state = $5",
                approval.State.SUPERSEDED.value,
                now,
                f"superseded by {remediation.remediation_id}: the drift changed",
                remediation.deployment_id,
                approval.State.PENDING.value,
            )
            await tx.conn.execute(
                f"INSERT INTO remediations ({codec.REMEDIATION_COLUMNS}) "
                "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
                remediation.remediation_id,
                remediation.deployment_id,
                remediation.namespace,
                remediation.state.value,
                codec.remediation_payload(remediation),
                remediation.create_time,
                remediation.expire_time,
                remediation.decided_by,
                remediation.decide_time,
                remediation.reason,
            )
            tx.events.append((event, now))

    async def list_remediations(
        self,
        *,
        namespace: str | None,
        deployment_id: str | None = None,
        states: frozenset[approval.State] | None = None,
    ) -> list[approval.Remediation]:
        """Proposals of a namespace (or every namespace), oldest first."""
        where: list[str] = []
        params: list[Any] = []
        if namespace is not None:
            params.append(namespace)
            where.append(f"namespace = ${len(params)}")
        if deployment_id:
            params.append(deployment_id)
            where.append(f"deployment_id = ${len(params)}")
        if states is not None:
            params.append(sorted(s.value for s in states))
            where.append(f"state = ANY(${len(params)}::text[])")
        sql = f"SELECT {codec.REMEDIATION_COLUMNS} FROM remediations"
        if where:
            sql += " WHERE " + " AND ".join(where)
        rows = await self._fetch(sql + " ORDER BY create_time, remediation_id", *params)
        return [codec.remediation_from_row(r) for r in rows]

    async def get_remediation(self, namespace: str, remediation_id: str) -> approval.Remediation:
        """One proposal of a namespace; NotFound otherwise."""
        row = await self._fetchrow(
            f"SELECT {codec.REMEDIATION_COLUMNS} FROM remediations "
            "WHERE namespace = $1 AND remediation_id = $2",
            namespace,
            remediation_id,
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
        row = await self._fetchrow(
            "SELECT request_hash, response FROM idempotency_keys WHERE namespace = $1 AND request_id = $2",
            namespace,
            request_id,
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
        async with self._transaction() as tx:
            status = await tx.conn.execute(
                "UPDATE remediations SET state = $1, decided_by = $2, decide_time = $3, reason = $4 "
                "WHERE remediation_id = $5 AND state = $6",
                decision.state.value,
                by,
                now,
                reason,
                remediation.remediation_id,
                approval.State.PENDING.value,
            )
            if _count(status) == 0:
                state = await tx.conn.fetchval(
                    "SELECT state FROM remediations WHERE remediation_id = $1", remediation.remediation_id
                )
                raise codec.not_pending(remediation.remediation_id, state or "gone")
            if request_id:
                # Concurrent decisions with one request_id: the second waits on the key and fails.
                await tx.conn.execute(
                    "INSERT INTO idempotency_keys "
                    "(namespace, request_id, method, request_hash, deployment_id, response, create_time) "
                    "VALUES ($1, $2, $3, $4, $5, $6, $7)",
                    remediation.namespace,
                    request_id,
                    decision.value,
                    codec.decision_hash(decision, remediation.remediation_id),
                    remediation.deployment_id,
                    codec.decision_response(remediation.remediation_id),
                    now,
                )
            tx.events.append((event, now))
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
        async with self._transaction() as tx:
            status = await tx.conn.execute(
                "UPDATE remediations SET state = $1, reason = $2, decide_time = COALESCE(decide_time, $3) "
                "WHERE remediation_id = $4 AND state = ANY($5::text[])",
                to.value,
                reason,
                now,
                remediation_id,
                sorted(s.value for s in from_states),
            )
            if _count(status) == 0:
                return False
            if event is not None:
                tx.events.append((event, now))
            return True

    # Reads ----------------------------------------------------------------------------------------

    async def _deployment(
        self, conn: _Connection, namespace: str, deployment_id: str, *, lock: bool = False
    ) -> model.Deployment:
        row = await conn.fetchrow(
            f"SELECT {codec.DEPLOYMENT_COLUMNS} FROM deployments d "
            "JOIN operations o ON o.operation_id = d.last_operation_id "
            "WHERE d.namespace = $1 AND d.deployment_id = $2" + (" FOR NO KEY UPDATE OF d" if lock else ""),
            namespace,
            deployment_id,
        )
        if row is None:
            raise errors.NotFound(f"deployment {deployment_id!r} not found in namespace {namespace!r}")
        return codec.deployment_from_row(row)

    async def get_deployment(
        self, namespace: model.Namespace, deployment_id: model.DeploymentId
    ) -> model.Deployment:
        """One deployment of a namespace, deleted ones included; NotFound otherwise."""
        try:
            async with self._live().acquire() as conn:
                return await self._deployment(conn, namespace, deployment_id)
        except _FAILURES as e:
            raise errors.Unavailable(f"the store failed to read: {type(e).__name__}") from e

    def deployments_version(self) -> None:
        """Other replicas commit too, unseen by this process: every listing is read."""
        return None

    async def list_deployments(
        self, query: model.ResourceQuery, page: model.PageRequest
    ) -> model.Listing[model.Deployment]:
        """The live (not deleted) deployments matching a query, ordered by type and name."""
        params = _Params()
        where = [
            f"d.namespace = {params.add(query.namespace)}",
            f"d.phase <> {params.add(model.Phase.DELETED.value)}",
        ]
        if query.resource_type is not None:
            where.append(f"d.resource_type = {params.add(query.resource_type.value)}")
        if query.resource_name is not None:
            where.append(f"d.resource_name = {params.add(query.resource_name)}")
        if query.deployment_id is not None:
            where.append(f"d.deployment_id = {params.add(query.deployment_id)}")
        total_row = await self._fetchrow(
            f"SELECT COUNT(*) FROM deployments d WHERE {' AND '.join(where)}", *params.values
        )
        if page.after is not None:
            after_type, after_name = page.after
            where.append(
                f"(d.resource_type, d.resource_name) > ({params.add(after_type)}, {params.add(after_name)})"
            )
        limit = params.add(page.size + 1)
        rows = await self._fetch(
            f"SELECT {codec.DEPLOYMENT_COLUMNS} FROM deployments d "
            "JOIN operations o ON o.operation_id = d.last_operation_id "
            f"WHERE {' AND '.join(where)} ORDER BY d.resource_type, d.resource_name LIMIT {limit}",
            *params.values,
        )
        items = tuple(codec.deployment_from_row(r) for r in rows[: page.size])
        return model.Listing(
            items=items,
            total=int(total_row[0]) if total_row else 0,
            next_after=codec.position_of(items[-1]) if len(rows) > page.size else None,
        )

    async def list_events(
        self, query: model.EventQuery, page: model.PageRequest
    ) -> model.Listing[model.DriftEvent]:
        """Events of a namespace (optionally one deployment and some kinds), oldest first."""
        params = _Params()
        where = [f"namespace = {params.add(query.namespace)}"]
        if query.deployment_id is not None:
            where.append(f"deployment_id = {params.add(query.deployment_id)}")
        if query.kinds:
            where.append(f"kind = ANY({params.add(sorted(k.value for k in query.kinds))}::text[])")
        if query.resource_type is not None:
            where.append(f"resource_type = {params.add(query.resource_type.value)}")
        if query.resource_name is not None:
            where.append(f"resource_name = {params.add(query.resource_name)}")
        position = codec.event_position(query, page.after)
        if position:
            where.append(f"sequence > {params.add(position)}")
        limit = params.add(page.size + 1)
        rows = await self._fetch(
            f"SELECT {codec.EVENT_COLUMNS} FROM drift_events WHERE {' AND '.join(where)} "
            f"ORDER BY sequence LIMIT {limit}",
            *params.values,
        )
        items = tuple(codec.event_from_row(r) for r in rows[: page.size])
        # The log is not counted (a scan nobody asked for: ListDriftEvents reports no total).
        return model.Listing(
            items=items,
            total=len(items),
            next_after=codec.position_of(items[-1]) if len(rows) > page.size else None,
        )


def _conforms(store: Store) -> port.Store:
    """mypy proves here that the PostgreSQL adapter is a whole ``port.Store``."""
    return store

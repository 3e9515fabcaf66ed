"""The desired-state store on SQLite (aiosqlite): the only module that imports it.

Durability: WAL journal with ``synchronous=FULL``, so an acknowledged Provision survives a crash or
power loss; foreign keys on; migrations at start-up.

Concurrency: writes run whole on one writer thread with its own connection, several to a
transaction (``group_commit``: each in a savepoint, one commit for the group), and one reader
connection, which under WAL never sees a half-written transaction. Every read runs and finishes
its statement in one call (``execute_fetchall``): a statement left open between two awaits would
keep the reader's read transaction open, and another coroutine's query would then run in that
older snapshot and miss what was committed since. SQLite errors are translated into
``errors.Unavailable`` with the cause chained; nothing of a request's content is put in that
message.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import datetime
import hashlib
import json
import logging
import pathlib
import secrets
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import aiosqlite

from broker import errors
from broker.domain import lifecycle, model, policy
from broker.store import group_commit, migrations, port

log = logging.getLogger(__name__)

DB_FILENAME = "broker.db"


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _ts(value: datetime.datetime) -> str:
    return value.isoformat(timespec="microseconds")


def _parse_ts(value: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(value)


def spec_to_json(spec: model.ResourceSpec) -> str:
    """Canonical JSON of a spec: equal specs give equal text, so comparison is a string compare."""
    return json.dumps(dataclasses.asdict(spec), sort_keys=True, separators=(",", ":"))


def spec_from_json(text: str) -> model.ResourceSpec:
    """The inverse of ``spec_to_json``."""
    raw = json.loads(text)
    topic = raw.get("topic")
    resources = raw.get("resources")
    return model.ResourceSpec(
        engine=raw["engine"],
        version=raw["version"],
        size=raw["size"],
        replicas=raw.get("replicas"),
        topic=model.TopicSpec(**topic) if topic else None,
        resources=model.ComputeResources(**resources) if resources else None,
    )


def _operation_to_dict(op: model.Operation) -> dict[str, Any]:
    return {
        "operation_id": op.operation_id,
        "type": op.type.value,
        "state": op.state.value,
        "generation": op.generation,
        "message": op.message,
        "create_time": _ts(op.create_time),
        "update_time": _ts(op.update_time),
    }


def _operation_from_row(row: sqlite3.Row | dict[str, Any]) -> model.Operation:
    return model.Operation(
        operation_id=model.OperationId(row["operation_id"]),
        type=model.OperationType(row["type"]),
        state=model.OperationState(row["state"]),
        generation=row["generation"],
        message=row["message"],
        create_time=_parse_ts(row["create_time"]),
        update_time=_parse_ts(row["update_time"]),
    )


def _result_to_json(result: model.MutationResult) -> str:
    return json.dumps(
        {
            "deployment_id": result.deployment_id,
            "phase": result.phase.value,
            "generation": result.generation,
            "operation": _operation_to_dict(result.operation),
        },
        sort_keys=True,
    )


def _result_from_json(text: str) -> model.MutationResult:
    raw = json.loads(text)
    return model.MutationResult(
        deployment_id=model.DeploymentId(raw["deployment_id"]),
        phase=model.Phase(raw["phase"]),
        generation=raw["generation"],
        operation=_operation_from_row(raw["operation"]),
        changed=False,
    )


def _request_hash(method: str, payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps([method, payload], sort_keys=True).encode()).hexdigest()


def new_deployment_id() -> model.DeploymentId:
    """A fresh deployment id: ``deploy-`` and 12 random hex digits."""
    return model.DeploymentId("deploy-" + secrets.token_hex(6))


def _new_operation_id() -> model.OperationId:
    return model.OperationId("op-" + secrets.token_hex(8))


_DEPLOYMENT_COLUMNS = """
    d.deployment_id, d.namespace, d.resource_type, d.resource_name, d.desired_spec, d.generation,
    d.phase, d.callback_url, d.data_policy, d.create_time AS d_create_time,
    d.update_time AS d_update_time, o.operation_id, o.type, o.state, o.generation AS o_generation,
    o.message, o.create_time, o.update_time
"""


_BY_NAMESPACE_AND_ID = (
    f"SELECT {_DEPLOYMENT_COLUMNS} FROM deployments d "
    "JOIN operations o ON o.operation_id = d.last_operation_id "
    "WHERE d.namespace = ? AND d.deployment_id = ?"
)


def _deployment_from_row(row: sqlite3.Row) -> model.Deployment:
    op = _operation_from_row(
        {
            "operation_id": row["operation_id"],
            "type": row["type"],
            "state": row["state"],
            "generation": row["o_generation"],
            "message": row["message"],
            "create_time": row["create_time"],
            "update_time": row["update_time"],
        }
    )
    return model.Deployment(
        deployment_id=model.DeploymentId(row["deployment_id"]),
        namespace=model.Namespace(row["namespace"]),
        resource_type=model.ResourceType(row["resource_type"]),
        resource_name=model.ResourceName(row["resource_name"]),
        desired_spec=spec_from_json(row["desired_spec"]),
        generation=row["generation"],
        phase=model.Phase(row["phase"]),
        callback_url=row["callback_url"],
        data_policy=model.DataPolicy(row["data_policy"]),
        last_operation=op,
        create_time=_parse_ts(row["d_create_time"]),
        update_time=_parse_ts(row["d_update_time"]),
    )


class _Parsed:
    """Deployments already parsed from rows, reused while their row is unchanged.

    Reads are mostly of rows that did not change since the last read (every manager polls); parsing
    a row (its spec's JSON, timestamps, enums) costs far more than comparing it with the row it was
    parsed from. The same row gives the same object, so readers further up (the views, their
    encodings) can tell "unchanged" by identity. Deleted deployments are not kept.
    """

    __slots__ = ("_rows",)

    def __init__(self) -> None:
        self._rows: dict[str, tuple[tuple[Any, ...], model.Deployment]] = {}

    def deployment(self, row: sqlite3.Row) -> model.Deployment:
        """The deployment of a row of ``_DEPLOYMENT_COLUMNS``."""
        values = tuple(row)
        deployment_id = values[0]
        kept = self._rows.get(deployment_id)
        if kept is not None and kept[0] == values:
            return kept[1]
        deployment = _deployment_from_row(row)
        if deployment.phase is model.Phase.DELETED:
            self._rows.pop(deployment_id, None)
        else:
            self._rows[deployment_id] = (values, deployment)
        return deployment


def _item_to_dict(item: model.DriftItem) -> dict[str, Any]:
    return {
        **dataclasses.asdict(item),
        "drift_class": item.drift_class.value,
        "severity": item.severity.value,
        "action": item.action.value,
        "detect_time": _ts(item.detect_time) if item.detect_time else None,
    }


def _item_from_dict(raw: dict[str, Any]) -> model.DriftItem:
    detect = raw.get("detect_time")
    return model.DriftItem(
        rule_id=raw["rule_id"],
        field=raw["field"],
        desired=raw["desired"],
        actual=raw["actual"],
        drift_class=model.DriftClass(raw["drift_class"]),
        severity=model.Severity(raw["severity"]),
        action=model.Action(raw["action"]),
        message=raw["message"],
        changed_by=raw.get("changed_by", ""),
        monthly_cost_delta=raw.get("monthly_cost_delta"),
        detect_time=_parse_ts(detect) if detect else None,
    )


def _event_from_row(row: sqlite3.Row) -> model.DriftEvent:
    payload = json.loads(row["payload"])
    health = payload.get("health")
    return model.DriftEvent(
        sequence=row["sequence"],
        kind=model.EventKind(row["kind"]),
        deployment_id=model.DeploymentId(row["deployment_id"]),
        namespace=model.Namespace(row["namespace"]),
        resource_type=model.ResourceType(row["resource_type"]),
        resource_name=model.ResourceName(row["resource_name"]),
        event_time=_parse_ts(row["event_time"]),
        message=payload["message"],
        phase=model.Phase(payload["phase"]),
        health=model.Health(health) if health else None,
        generation=payload["generation"],
        items=tuple(_item_from_dict(i) for i in payload.get("items", ())),
    )


def _query_key(query: model.ResourceQuery | model.EventQuery) -> str:
    """A digest of a query's filters by name, so a page token only fits the query that made it."""
    fields = {
        k: sorted(x.value for x in v) if isinstance(v, frozenset) else getattr(v, "value", v)
        for k, v in dataclasses.asdict(query).items()
    }
    return hashlib.sha256(json.dumps([type(query).__name__, fields], sort_keys=True).encode()).hexdigest()[
        :16
    ]


def _encode_page_token(query_key: str, last: tuple[str, str]) -> str:
    raw = json.dumps({"q": query_key, "after": list(last)}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_page_token(token: str, query_key: str) -> tuple[str, str] | None:
    if not token:
        return None
    try:
        raw = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        after = raw["after"]
        if raw["q"] != query_key or len(after) != 2:
            raise ValueError("token of another query")
        return str(after[0]), str(after[1])
    except (ValueError, KeyError, TypeError) as e:
        raise errors.InvalidArgument(
            [
                errors.FieldViolation(
                    "page_token",
                    "is not a token this query returned; repeat the query without it, with the same filters",
                )
            ]
        ) from e


class Store:
    """Desired state, operations, idempotency keys, the drift event log and the callback outbox."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path
        self._reader: aiosqlite.Connection | None = None
        self.listeners: list[Callable[[list[model.DriftEvent]], None]] = []
        self._writer = group_commit.Writer(path, connect=_connect_writer, on_commit=self._committed)
        self._parsed = _Parsed()

    @classmethod
    async def open(cls, data_dir: pathlib.Path) -> Store:
        """Open (creating if needed) ``<data_dir>/broker.db`` and apply pending migrations."""
        await asyncio.to_thread(data_dir.mkdir, parents=True, exist_ok=True)
        store = cls(data_dir / DB_FILENAME)
        try:
            migrator = await _connect(store.path)
            try:
                await store._migrate(migrator)
            finally:
                await migrator.close()
            await store._writer.start()
            store._reader = await _connect(store.path)
        except (sqlite3.Error, OSError) as e:
            await store.close()
            raise errors.Unavailable(f"cannot open the store at {store.path}: {e}") from e
        return store

    async def close(self) -> None:
        """Commit what is queued, then close both connections; safe to call twice."""
        await self._writer.stop()
        if self._reader is not None:
            await self._reader.close()
        self._reader = None

    def _committed(self, events: list[model.DriftEvent]) -> None:
        """After each commit, on the event loop: the listeners hear its events, in sequence order."""
        for listener in self.listeners:
            listener(events)

    async def schema_version(self) -> int:
        """The newest applied migration."""
        async with self._read() as db:
            row = await _one(db, "SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
        return int(row[0]) if row else 0

    async def ping(self) -> None:
        """Raise Unavailable unless the store answers a trivial query (used by readiness)."""
        async with self._read() as db:
            await db.execute("SELECT 1")

    async def _migrate(self, db: aiosqlite.Connection) -> None:
        await db.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations "
            "(version INTEGER PRIMARY KEY, description TEXT NOT NULL, applied_time TEXT NOT NULL)"
        )
        await db.commit()
        row = await _one(db, "SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
        current = int(row[0]) if row else 0
        for version, description, sql in migrations.MIGRATIONS:
            if version <= current:
                continue
            # executescript would COMMIT first and run outside our transaction; run each statement.
            await db.execute("BEGIN IMMEDIATE")
            try:
                for statement in _statements(sql):
                    await db.execute(statement)
                await db.execute(
                    "INSERT INTO schema_migrations (version, description, applied_time) VALUES (?, ?, ?)",
                    (version, description, _ts(_now())),
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

    # Provision / deprovision -------------------------------------------------------------------

    async def provision(self, command: model.ProvisionCommand) -> model.MutationResult:
        """Persist a provision request in one transaction and return the answer to give.

        Same request_id: the first answer. Same identity and spec: a no-op (``changed`` False),
        except that a failed deployment is retried. Different spec: an update with a new generation.
        """
        payload = {
            "namespace": command.namespace,
            "resource_type": command.resource_type.value,
            "resource_name": command.resource_name,
            "spec": spec_to_json(command.spec),
            "callback_url": command.callback_url,
        }
        request_hash = _request_hash("provision", payload)

        def body(tx: group_commit.Tx) -> model.MutationResult:
            db = tx.db
            replay = self._replay(db, command.namespace, command.request_id, request_hash)
            if replay is not None:
                return replay
            existing = self._live_deployment(db, command)
            now = _now()
            decision = lifecycle.on_provision(existing, command)
            if existing is None:
                result = self._create(db, command, now)
            else:
                result = self._update(db, existing, command, decision, now)
            if command.request_id:
                self._remember(
                    db, command.namespace, command.request_id, "provision", request_hash, result, now
                )
            return result

        return await self._writer.write(body)

    def _replay(
        self, db: sqlite3.Connection, namespace: str, request_id: str, request_hash: str
    ) -> model.MutationResult | None:
        if not request_id:
            return None
        row = _one_sync(
            db,
            "SELECT request_hash, response FROM idempotency_keys WHERE namespace = ? AND request_id = ?",
            (namespace, request_id),
        )
        if row is None:
            return None
        if row["request_hash"] != request_hash:
            raise errors.AlreadyExists(
                f"request_id {request_id!r} was already used for a different request in namespace "
                f"{namespace!r}; use a new request_id for a new request",
                reason="REQUEST_ID_REUSED",
            )
        return _result_from_json(row["response"])

    def _remember(
        self,
        db: sqlite3.Connection,
        namespace: str,
        request_id: str,
        method: str,
        request_hash: str,
        result: model.MutationResult,
        now: datetime.datetime,
    ) -> None:
        db.execute(
            "INSERT INTO idempotency_keys "
            "(namespace, request_id, method, request_hash, deployment_id, response, create_time) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                namespace,
                request_id,
                method,
                request_hash,
                result.deployment_id,
                _result_to_json(result),
                _ts(now),
            ),
        )

    def _live_deployment(
        self, db: sqlite3.Connection, command: model.ProvisionCommand
    ) -> model.Deployment | None:
        row = _one_sync(
            db,
            f"SELECT {_DEPLOYMENT_COLUMNS} FROM deployments d "
            "JOIN operations o ON o.operation_id = d.last_operation_id "
            "WHERE d.namespace = ? AND d.resource_type = ? AND d.resource_name = ? AND d.phase != 'Deleted'",
            (command.namespace, command.resource_type.value, command.resource_name),
        )
        return self._parsed.deployment(row) if row else None

    def _insert_operation(
        self,
        db: sqlite3.Connection,
        *,
        deployment_id: model.DeploymentId,
        op_type: model.OperationType,
        generation: int,
        now: datetime.datetime,
        operation_id: model.OperationId | None = None,
    ) -> model.Operation:
        op = model.Operation(
            operation_id=operation_id or _new_operation_id(),
            type=op_type,
            state=model.OperationState.ACCEPTED,
            generation=generation,
            message="accepted; waiting for a worker",
            create_time=now,
            update_time=now,
        )
        db.execute(
            "INSERT INTO operations (operation_id, deployment_id, type, state, generation, message, "
            "create_time, update_time) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                op.operation_id,
                deployment_id,
                op.type.value,
                op.state.value,
                op.generation,
                op.message,
                _ts(now),
                _ts(now),
            ),
        )
        return op

    def _create(
        self, db: sqlite3.Connection, command: model.ProvisionCommand, now: datetime.datetime
    ) -> model.MutationResult:
        deployment_id = new_deployment_id()
        # The operation references its deployment, so the deployment goes first, already naming the
        # operation id chosen up front.
        op_id = _new_operation_id()
        db.execute(
            "INSERT INTO deployments (deployment_id, namespace, resource_type, resource_name, desired_spec, "
            "generation, phase, callback_url, last_operation_id, create_time, update_time) "
            "VALUES (?, ?, ?, ?, ?, 1, ?, ?, ?, ?, ?)",
            (
                deployment_id,
                command.namespace,
                command.resource_type.value,
                command.resource_name,
                spec_to_json(command.spec),
                model.Phase.PENDING.value,
                command.callback_url,
                op_id,
                _ts(now),
                _ts(now),
            ),
        )
        op = self._insert_operation(
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

    def _update(
        self,
        db: sqlite3.Connection,
        existing: model.Deployment,
        command: model.ProvisionCommand,
        decision: lifecycle.ProvisionDecision,
        now: datetime.datetime,
    ) -> model.MutationResult:
        if not decision.changed:
            if existing.callback_url != command.callback_url:
                db.execute(
                    "UPDATE deployments SET callback_url = ?, update_time = ? WHERE deployment_id = ?",
                    (command.callback_url, _ts(now), existing.deployment_id),
                )
            return model.MutationResult(
                deployment_id=existing.deployment_id,
                phase=existing.phase,
                generation=existing.generation,
                operation=existing.last_operation,
                changed=False,
            )
        generation = decision.generation
        op = self._insert_operation(
            db,
            deployment_id=existing.deployment_id,
            op_type=lifecycle.operation_type(decision.change),
            generation=generation,
            now=now,
        )
        db.execute(
            "UPDATE deployments SET desired_spec = ?, generation = ?, phase = ?, callback_url = ?, "
            "last_operation_id = ?, update_time = ? WHERE deployment_id = ?",
            (
                spec_to_json(command.spec),
                generation,
                model.Phase.PENDING.value,
                command.callback_url,
                op.operation_id,
                _ts(now),
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
        request_hash = _request_hash(
            "deprovision", {"deployment_id": command.deployment_id, "data_policy": command.data_policy.value}
        )

        def body(tx: group_commit.Tx) -> model.MutationResult:
            db = tx.db
            replay = self._replay(db, command.namespace, command.request_id, request_hash)
            if replay is not None:
                return replay
            existing = self._deployment_sync(db, command.namespace, command.deployment_id)
            now = _now()
            if not lifecycle.on_deprovision(existing):
                result = model.MutationResult(
                    deployment_id=existing.deployment_id,
                    phase=existing.phase,
                    generation=existing.generation,
                    operation=existing.last_operation,
                    changed=False,
                )
            else:
                op = self._insert_operation(
                    db,
                    deployment_id=existing.deployment_id,
                    op_type=model.OperationType.DEPROVISION,
                    generation=existing.generation,
                    now=now,
                )
                db.execute(
                    "UPDATE deployments SET phase = ?, data_policy = ?, last_operation_id = ?, "
                    "update_time = ? WHERE deployment_id = ?",
                    (
                        model.Phase.DELETING.value,
                        command.data_policy.value,
                        op.operation_id,
                        _ts(now),
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
                self._remember(
                    db, command.namespace, command.request_id, "deprovision", request_hash, result, now
                )
            return result

        return await self._writer.write(body)

    # Operations, the event log and the callback outbox ---------------------------------------------

    async def unfinished(self) -> list[model.Deployment]:
        """Deployments whose last operation is accepted or in progress (work to do or to resume)."""
        async with self._read() as db:
            rows = list(
                await db.execute_fetchall(
                    f"SELECT {_DEPLOYMENT_COLUMNS} FROM deployments d "
                    "JOIN operations o ON o.operation_id = d.last_operation_id "
                    "WHERE o.state IN ('accepted', 'in_progress') ORDER BY o.create_time"
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
                    f"SELECT {_DEPLOYMENT_COLUMNS} FROM deployments d "
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
                f"SELECT {_DEPLOYMENT_COLUMNS} FROM deployments d "
                "JOIN operations o ON o.operation_id = d.last_operation_id WHERE d.deployment_id = ?",
                (deployment_id,),
            )
        return self._parsed.deployment(row) if row else None

    async def start_operation(self, deployment: model.Deployment) -> model.Deployment | None:
        """Mark the deployment's last operation in progress (and the phase Provisioning).

        Returns the updated deployment, or None when a newer operation superseded this one.
        """
        op = deployment.last_operation
        now = _now()

        def body(tx: group_commit.Tx) -> model.Deployment | None:
            db = tx.db
            cur = db.execute(
                "UPDATE operations SET state = 'in_progress', message = ?, update_time = ? "
                "WHERE operation_id = ? AND state IN ('accepted', 'in_progress') AND operation_id = "
                "(SELECT last_operation_id FROM deployments WHERE deployment_id = ?)",
                ("in progress", _ts(now), op.operation_id, deployment.deployment_id),
            )
            if cur.rowcount == 0:
                return None
            running = lifecycle.phase_when_started(op.type)
            if running is not None:
                db.execute(
                    "UPDATE deployments SET phase = ?, update_time = ? WHERE deployment_id = ?",
                    (running.value, _ts(now), deployment.deployment_id),
                )
            return self._deployment_sync(db, deployment.namespace, deployment.deployment_id)

        return await self._writer.write(body)

    async def note_progress(self, deployment: model.Deployment, message: str) -> None:
        """Say why an operation in progress is waiting (shown by GetDeployment and the state)."""

        def body(tx: group_commit.Tx) -> None:
            db = tx.db
            db.execute(
                "UPDATE operations SET message = ?, update_time = ? "
                "WHERE operation_id = ? AND state = 'in_progress'",
                (message, _ts(_now()), deployment.last_operation.operation_id),
            )

        return await self._writer.write(body)

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
        now = _now()
        phase = lifecycle.phase_when_finished(op.type, succeeded=succeeded)

        def body(tx: group_commit.Tx) -> bool:
            db = tx.db
            cur = db.execute(
                "UPDATE operations SET state = ?, message = ?, update_time = ? WHERE operation_id = ? "
                "AND state IN ('accepted', 'in_progress') AND operation_id = "
                "(SELECT last_operation_id FROM deployments WHERE deployment_id = ?)",
                (
                    (model.OperationState.SUCCEEDED if succeeded else model.OperationState.FAILED).value,
                    message,
                    _ts(now),
                    op.operation_id,
                    deployment.deployment_id,
                ),
            )
            if cur.rowcount == 0:
                return False
            db.execute(
                "UPDATE deployments SET phase = ?, update_time = ? WHERE deployment_id = ?",
                (phase.value, _ts(now), deployment.deployment_id),
            )
            if event is not None:
                self._append_event(tx, dataclasses.replace(event, phase=phase))
            if callback is not None:
                url, payload = callback
                db.execute(
                    "INSERT INTO callback_outbox "
                    "(delivery_id, deployment_id, url, payload, next_attempt_time, create_time) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        "dlv-" + secrets.token_hex(8),
                        deployment.deployment_id,
                        url,
                        json.dumps(payload),
                        _ts(now),
                        _ts(now),
                    ),
                )
            return True

        return await self._writer.write(body)

    @staticmethod
    def _append_event(tx: group_commit.Tx, event: model.DriftEvent) -> int:
        now = tx.now
        payload = {
            "message": event.message,
            "phase": event.phase.value,
            "health": event.health.value if event.health else None,
            "generation": event.generation,
            "items": [_item_to_dict(i) for i in event.items],
        }
        cur = tx.db.execute(
            "INSERT INTO drift_events "
            "(deployment_id, namespace, resource_type, resource_name, kind, payload, event_time) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                event.deployment_id,
                event.namespace,
                event.resource_type.value,
                event.resource_name,
                event.kind.value,
                json.dumps(payload),
                _ts(now),
            ),
        )
        sequence = int(cur.lastrowid or 0)
        tx.appended.append(dataclasses.replace(event, sequence=sequence, event_time=now))
        return sequence

    async def due_callbacks(self, limit: int = 50) -> list[tuple[str, str, str, int]]:
        """Undelivered callbacks whose next attempt is due: (delivery id, url, payload, attempts)."""
        async with self._read() as db:
            rows = list(
                await db.execute_fetchall(
                    "SELECT delivery_id, url, payload, attempts FROM callback_outbox "
                    "WHERE delivered_time IS NULL AND next_attempt_time <= ? "
                    "ORDER BY next_attempt_time LIMIT ?",
                    (_ts(_now()), limit),
                )
            )
        return [(r["delivery_id"], r["url"], r["payload"], r["attempts"]) for r in rows]

    async def callback_attempted(
        self, delivery_id: str, *, delivered: bool, error: str = "", retry_at: datetime.datetime | None = None
    ) -> None:
        """Record one delivery attempt: delivered, or failed with the time of the next attempt."""
        now = _now()

        def body(tx: group_commit.Tx) -> None:
            db = tx.db
            if delivered:
                db.execute(
                    "UPDATE callback_outbox SET attempts = attempts + 1, delivered_time = ?, last_error = '' "
                    "WHERE delivery_id = ?",
                    (_ts(now), delivery_id),
                )
            else:
                db.execute(
                    "UPDATE callback_outbox SET attempts = attempts + 1, last_error = ?, "
                    "next_attempt_time = ? WHERE delivery_id = ?",
                    (error[:500], _ts(retry_at or now), delivery_id),
                )

        return await self._writer.write(body)

    async def accept(self, deployment: model.Deployment, spec: model.ResourceSpec, message: str) -> bool:
        """Make ``spec`` the desired state as already in place: a new generation, nothing to apply.

        Accepting drift records observed values as desired; the workload already runs them, so the
        generation's operation is finished at once and the phase stays as it was (the detector
        re-evaluates). Nothing is written when the deployment moved on since it was read; returns
        whether it was.
        """
        now = _now()

        def body(tx: group_commit.Tx) -> bool:
            db = tx.db
            generation = deployment.generation + 1
            op = self._insert_operation(
                db,
                deployment_id=deployment.deployment_id,
                op_type=model.OperationType.UPDATE,
                generation=generation,
                now=now,
            )
            db.execute(
                "UPDATE operations SET state = ?, message = ? WHERE operation_id = ?",
                (model.OperationState.SUCCEEDED.value, message, op.operation_id),
            )
            cur = db.execute(
                "UPDATE deployments SET desired_spec = ?, generation = ?, last_operation_id = ?, "
                "update_time = ? WHERE deployment_id = ? AND last_operation_id = ? "
                "AND phase IN ('Ready', 'DriftDetected')",
                (
                    spec_to_json(spec),
                    generation,
                    op.operation_id,
                    _ts(now),
                    deployment.deployment_id,
                    deployment.last_operation.operation_id,
                ),
            )
            if cur.rowcount == 0:
                db.execute("DELETE FROM operations WHERE operation_id = ?", (op.operation_id,))
                return False
            return True

        return await self._writer.write(body)

    async def record_evaluation(
        self,
        deployment: model.Deployment,
        *,
        items: tuple[model.DriftItem, ...],
        health: model.Health,
        phase: model.Phase,
        events: list[model.DriftEvent],
    ) -> bool:
        """Store what the detector now reports, the resulting phase, and the events, in one transaction.

        Nothing is written when the deployment has moved on (another operation, or deleted) since it
        was evaluated; returns whether anything was written.
        """
        now = _now()

        def body(tx: group_commit.Tx) -> bool:
            db = tx.db
            cur = db.execute(
                "UPDATE deployments SET phase = ?, update_time = ? WHERE deployment_id = ? "
                "AND last_operation_id = ? AND phase IN ('Ready', 'DriftDetected')",
                (phase.value, _ts(now), deployment.deployment_id, deployment.last_operation.operation_id),
            )
            if cur.rowcount == 0:
                return False
            db.execute(
                "INSERT INTO drift_state (deployment_id, items, health, update_time) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (deployment_id) DO UPDATE SET items = excluded.items, health = excluded.health, "
                "update_time = excluded.update_time",
                (
                    deployment.deployment_id,
                    json.dumps([_item_to_dict(i) for i in items]),
                    health.value,
                    _ts(now),
                ),
            )
            for event in events:
                self._append_event(tx, dataclasses.replace(event, phase=phase))
            return True

        return await self._writer.write(body)

    async def append_events(self, events: list[model.DriftEvent]) -> None:
        """Append events that describe no stored state (remediation attempts)."""

        def body(tx: group_commit.Tx) -> None:
            for event in events:
                self._append_event(tx, event)

        return await self._writer.write(body)

    async def drift_states(self) -> dict[str, tuple[tuple[model.DriftItem, ...], model.Health]]:
        """What the detector last reported, per deployment (to resume without re-announcing)."""
        async with self._read() as db:
            rows = list(await db.execute_fetchall("SELECT deployment_id, items, health FROM drift_state"))
        return {
            r["deployment_id"]: (
                tuple(_item_from_dict(i) for i in json.loads(r["items"])),
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
        return [_event_from_row(r) for r in rows]

    async def prune_events(self, *, keep: int) -> int:
        """Delete all but the newest ``keep`` events; returns how many were deleted."""

        def body(tx: group_commit.Tx) -> int:
            db = tx.db
            cur = db.execute(
                "DELETE FROM drift_events WHERE sequence <= (SELECT MAX(sequence) FROM drift_events) - ?",
                (keep,),
            )
            return int(cur.rowcount)

        return await self._writer.write(body)

    async def set_policy(self, rule: policy.Rule) -> None:
        """Store a remediation policy, replacing the one for the same namespace and type."""

        def body(tx: group_commit.Tx) -> None:
            db = tx.db
            db.execute(
                "INSERT INTO policies (namespace, resource_type, mode, ignore_fields, update_time) "
                "VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (namespace, resource_type) DO UPDATE SET mode = excluded.mode, "
                "ignore_fields = excluded.ignore_fields, update_time = excluded.update_time",
                (
                    rule.namespace,
                    rule.resource_type.value if rule.resource_type else "",
                    rule.mode.value,
                    json.dumps(sorted(rule.ignore_fields)),
                    _ts(_now()),
                ),
            )

        return await self._writer.write(body)

    async def policies(self) -> list[policy.Rule]:
        """Every stored remediation policy."""
        async with self._read() as db:
            rows = list(
                await db.execute_fetchall(
                    "SELECT namespace, resource_type, mode, ignore_fields FROM policies"
                )
            )
        return [
            policy.Rule(
                namespace=r["namespace"],
                resource_type=model.ResourceType(r["resource_type"]) if r["resource_type"] else None,
                mode=policy.Mode(r["mode"]),
                ignore_fields=frozenset(json.loads(r["ignore_fields"])),
            )
            for r in rows
        ]

    # Reads ----------------------------------------------------------------------------------------

    async def _deployment(
        self, db: aiosqlite.Connection, namespace: str, deployment_id: str
    ) -> model.Deployment:
        row = await _one(db, _BY_NAMESPACE_AND_ID, (namespace, deployment_id))
        return self._found(row, namespace, deployment_id)

    def _deployment_sync(
        self, db: sqlite3.Connection, namespace: str, deployment_id: str
    ) -> model.Deployment:
        return self._found(
            _one_sync(db, _BY_NAMESPACE_AND_ID, (namespace, deployment_id)), namespace, deployment_id
        )

    def _found(self, row: sqlite3.Row | None, namespace: str, deployment_id: str) -> model.Deployment:
        if row is None:
            raise errors.NotFound(f"deployment {deployment_id!r} not found in namespace {namespace!r}")
        return self._parsed.deployment(row)

    async def get_deployment(
        self, namespace: model.Namespace, deployment_id: model.DeploymentId
    ) -> model.Deployment:
        """One deployment of a namespace, deleted ones included; NotFound otherwise."""
        async with self._read() as db:
            return await self._deployment(db, namespace, deployment_id)

    async def list_deployments(
        self, query: model.ResourceQuery, page: model.PageRequest
    ) -> model.Page[model.Deployment]:
        """The live (not deleted) deployments matching a query, ordered by type and name."""
        where = ["d.namespace = ?", "d.phase != 'Deleted'"]
        params: list[Any] = [query.namespace]
        if query.resource_type is not None:
            where.append("d.resource_type = ?")
            params.append(query.resource_type.value)
        if query.resource_name is not None:
            where.append("d.resource_name = ?")
            params.append(query.resource_name)
        if query.deployment_id is not None:
            where.append("d.deployment_id = ?")
            params.append(query.deployment_id)
        query_key = _query_key(query)
        after = _decode_page_token(page.token, query_key)
        async with self._read() as db:
            total_row = await _one(
                db,
                f"SELECT COUNT(*) FROM deployments d WHERE {' AND '.join(where)}",
                params,
            )
            page_where = list(where)
            page_params = list(params)
            if after is not None:
                page_where.append("(d.resource_type, d.resource_name) > (?, ?)")
                page_params.extend(after)
            rows = list(
                await db.execute_fetchall(
                    f"SELECT {_DEPLOYMENT_COLUMNS} FROM deployments d "
                    "JOIN operations o ON o.operation_id = d.last_operation_id "
                    f"WHERE {' AND '.join(page_where)} ORDER BY d.resource_type, d.resource_name LIMIT ?",
                    [*page_params, page.size + 1],
                )
            )
        items = tuple(self._parsed.deployment(r) for r in rows[: page.size])
        next_token = ""
        if len(rows) > page.size:
            last = items[-1]
            next_token = _encode_page_token(query_key, (last.resource_type.value, last.resource_name))
        return model.Page(items=items, total=int(total_row[0]) if total_row else 0, next_token=next_token)

    async def list_events(
        self, query: model.EventQuery, page: model.PageRequest
    ) -> model.Page[model.DriftEvent]:
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
        query_key = _query_key(query)
        after = _decode_page_token(page.token, query_key)
        position = query.after_sequence
        if after is not None:
            position = max(position, int(after[1]) if after[1].isdigit() else 0)
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
        items = tuple(_event_from_row(r) for r in rows[: page.size])
        next_token = ""
        if len(rows) > page.size:
            next_token = _encode_page_token(query_key, ("seq", str(items[-1].sequence)))
        # The log is not counted (a scan nobody asked for: ListDriftEvents reports no total).
        return model.Page(items=items, total=len(items), next_token=next_token)

    async def count_deployments(self) -> int:
        """How many deployments exist, deleted ones included (for tests and metrics)."""
        async with self._read() as db:
            row = await _one(db, "SELECT COUNT(*) FROM deployments")
        return int(row[0]) if row else 0


def _one_sync(db: sqlite3.Connection, sql: str, params: Any = ()) -> sqlite3.Row | None:
    """The first row of a query, on the writer's connection (inside a write)."""
    row: sqlite3.Row | None = db.execute(sql, params).fetchone()
    return row


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


_PRAGMAS = (
    "PRAGMA journal_mode=WAL",
    "PRAGMA synchronous=FULL",
    "PRAGMA foreign_keys=ON",
    "PRAGMA busy_timeout=5000",
)


async def _connect(path: pathlib.Path) -> aiosqlite.Connection:
    conn = await aiosqlite.connect(path, isolation_level=None)
    conn.row_factory = sqlite3.Row
    for pragma in _PRAGMAS:
        await conn.execute(pragma)
    return conn


def _connect_writer(path: pathlib.Path) -> sqlite3.Connection:
    """The writer thread's connection (created on that thread, used by it alone)."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.row_factory = sqlite3.Row
    for pragma in _PRAGMAS:
        conn.execute(pragma)
    return conn


def _conforms(store: Store) -> port.Store:
    """mypy proves here that the SQLite adapter is a whole ``port.Store``."""
    return store

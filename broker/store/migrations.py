"""Versioned schema migrations, applied in order at start-up (and by ``broker migrate``).

Append new migrations; never edit one that has shipped. Each runs in its own transaction together
with the bump of ``schema_migrations``, so a crash leaves the schema at a whole version.

Every adapter has its list in its own dialect: ``MIGRATIONS`` (SQLite) and ``POSTGRESQL``. A version
means the same tables and columns in both (a test compares versions and descriptions), so a new
migration is appended to both lists at once. The PostgreSQL dialect differs where it must or where
it can do better: times are ``TIMESTAMPTZ``, the identity and ordering columns use the ``"C"``
collation (byte order, as SQLite compares text, so pages sort alike on both), and event sequences
come from a one-row counter instead of ``AUTOINCREMENT`` (see ``broker.store.postgres``).
"""

from __future__ import annotations

MIGRATIONS: tuple[tuple[int, str, str], ...] = (
    (
        1,
        "deployments, operations, idempotency keys, drift event log, callback outbox",
        """
        CREATE TABLE deployments (
            deployment_id     TEXT PRIMARY KEY,
            namespace         TEXT NOT NULL,
            resource_type     TEXT NOT NULL,
            resource_name     TEXT NOT NULL,
            desired_spec      TEXT NOT NULL,
            generation        INTEGER NOT NULL CHECK (generation >= 1),
            phase             TEXT NOT NULL,
            callback_url      TEXT NOT NULL,
            data_policy       TEXT NOT NULL DEFAULT 'keep',
            last_operation_id TEXT NOT NULL,
            create_time       TEXT NOT NULL,
            update_time       TEXT NOT NULL
        );
        -- One live deployment per (namespace, type, name); deleted ones are kept for history.
        CREATE UNIQUE INDEX deployments_live_identity
            ON deployments (namespace, resource_type, resource_name) WHERE phase != 'Deleted';
        CREATE INDEX deployments_by_namespace ON deployments (namespace, resource_type, resource_name);

        CREATE TABLE operations (
            operation_id  TEXT PRIMARY KEY,
            deployment_id TEXT NOT NULL REFERENCES deployments (deployment_id),
            type          TEXT NOT NULL,
            state         TEXT NOT NULL,
            generation    INTEGER NOT NULL,
            message       TEXT NOT NULL DEFAULT '',
            create_time   TEXT NOT NULL,
            update_time   TEXT NOT NULL
        );
        CREATE INDEX operations_by_deployment ON operations (deployment_id, create_time);
        CREATE INDEX operations_unfinished ON operations (state) WHERE state IN ('accepted', 'in_progress');

        CREATE TABLE idempotency_keys (
            namespace     TEXT NOT NULL,
            request_id    TEXT NOT NULL,
            method        TEXT NOT NULL,
            request_hash  TEXT NOT NULL,
            deployment_id TEXT NOT NULL REFERENCES deployments (deployment_id),
            response      TEXT NOT NULL,
            create_time   TEXT NOT NULL,
            PRIMARY KEY (namespace, request_id)
        );

        -- AUTOINCREMENT: a sequence is never reused, even after the newest events are pruned.
        CREATE TABLE drift_events (
            sequence      INTEGER PRIMARY KEY AUTOINCREMENT,
            deployment_id TEXT NOT NULL REFERENCES deployments (deployment_id),
            namespace     TEXT NOT NULL,
            resource_type TEXT NOT NULL,
            resource_name TEXT NOT NULL,
            kind          TEXT NOT NULL,
            payload       TEXT NOT NULL,
            event_time    TEXT NOT NULL
        );
        CREATE INDEX drift_events_by_namespace ON drift_events (namespace, sequence);
        CREATE INDEX drift_events_by_deployment ON drift_events (deployment_id, sequence);

        CREATE TABLE callback_outbox (
            delivery_id       TEXT PRIMARY KEY,
            deployment_id     TEXT NOT NULL REFERENCES deployments (deployment_id),
            url               TEXT NOT NULL,
            payload           TEXT NOT NULL,
            attempts          INTEGER NOT NULL DEFAULT 0,
            next_attempt_time TEXT NOT NULL,
            delivered_time    TEXT,
            last_error        TEXT NOT NULL DEFAULT '',
            create_time       TEXT NOT NULL
        );
        CREATE INDEX callback_outbox_due ON callback_outbox (next_attempt_time) WHERE delivered_time IS NULL;
        """,
    ),
    (
        2,
        "drift state per deployment, remediation policies",
        """
        -- What the detector last reported per deployment, so a restart does not re-announce old drift.
        CREATE TABLE drift_state (
            deployment_id TEXT PRIMARY KEY REFERENCES deployments (deployment_id),
            items         TEXT NOT NULL,
            health        TEXT NOT NULL,
            update_time   TEXT NOT NULL
        );

        CREATE TABLE policies (
            namespace     TEXT NOT NULL,
            resource_type TEXT NOT NULL,
            mode          TEXT NOT NULL,
            ignore_fields TEXT NOT NULL,
            update_time   TEXT NOT NULL,
            PRIMARY KEY (namespace, resource_type)
        );
        """,
    ),
    (
        3,
        "pending remediations (approval mode), maintenance windows of policies",
        """
        -- A policy's maintenance window as JSON (cron, duration, time zone); '' for none.
        ALTER TABLE policies ADD COLUMN maintenance_window TEXT NOT NULL DEFAULT '';

        -- Remediations proposed under policy mode approve, and what became of them.
        CREATE TABLE remediations (
            remediation_id TEXT PRIMARY KEY,
            deployment_id  TEXT NOT NULL REFERENCES deployments (deployment_id),
            namespace      TEXT NOT NULL,
            state          TEXT NOT NULL,
            payload        TEXT NOT NULL,
            create_time    TEXT NOT NULL,
            expire_time    TEXT NOT NULL,
            decided_by     TEXT NOT NULL DEFAULT '',
            decide_time    TEXT,
            reason         TEXT NOT NULL DEFAULT ''
        );
        CREATE INDEX remediations_by_namespace ON remediations (namespace, create_time);
        CREATE INDEX remediations_open ON remediations (deployment_id) WHERE state IN ('pending', 'approved');
        """,
    ),
    (
        4,
        "cost budgets per namespace, cost alert crossings",
        """
        -- Monthly budgets set through SetCostBudget (configured ones live in the config file).
        CREATE TABLE cost_budgets (
            namespace      TEXT PRIMARY KEY,
            monthly_budget REAL NOT NULL CHECK (monthly_budget >= 0),
            update_time    TEXT NOT NULL
        );

        -- Subjects ("resource:<deployment id>", "namespace:<name>") over their cost threshold or
        -- budget: a crossing is alerted once, and again only after the subject went back below.
        CREATE TABLE cost_alerts (
            subject     TEXT PRIMARY KEY,
            since       TEXT NOT NULL
        );
        """,
    ),
    (
        5,
        "a mode per drift rule in policies",
        """
        -- The policy's drift rules with a mode of their own, as JSON ({"replicas.changed": "approve"}).
        ALTER TABLE policies ADD COLUMN rule_modes TEXT NOT NULL DEFAULT '';
        """,
    ),
)


POSTGRESQL: tuple[tuple[int, str, str], ...] = (
    (
        1,
        "deployments, operations, idempotency keys, drift event log, callback outbox",
        """
        CREATE TABLE deployments (
            deployment_id     TEXT COLLATE "C" PRIMARY KEY,
            namespace         TEXT COLLATE "C" NOT NULL,
            resource_type     TEXT COLLATE "C" NOT NULL,
            resource_name     TEXT COLLATE "C" NOT NULL,
            desired_spec      TEXT NOT NULL,
            generation        INTEGER NOT NULL CHECK (generation >= 1),
            phase             TEXT NOT NULL,
            callback_url      TEXT NOT NULL,
            data_policy       TEXT NOT NULL DEFAULT 'keep',
            last_operation_id TEXT COLLATE "C" NOT NULL,
            create_time       TIMESTAMPTZ NOT NULL,
            update_time       TIMESTAMPTZ NOT NULL
        );
        -- One live deployment per (namespace, type, name); deleted ones are kept for history.
        CREATE UNIQUE INDEX deployments_live_identity
            ON deployments (namespace, resource_type, resource_name) WHERE phase <> 'Deleted';
        CREATE INDEX deployments_by_namespace ON deployments (namespace, resource_type, resource_name);

        CREATE TABLE operations (
            operation_id  TEXT COLLATE "C" PRIMARY KEY,
            deployment_id TEXT COLLATE "C" NOT NULL REFERENCES deployments (deployment_id),
            type          TEXT NOT NULL,
            state         TEXT NOT NULL,
            generation    INTEGER NOT NULL,
            message       TEXT NOT NULL DEFAULT '',
            create_time   TIMESTAMPTZ NOT NULL,
            update_time   TIMESTAMPTZ NOT NULL
        );
        CREATE INDEX operations_by_deployment ON operations (deployment_id, create_time);
        CREATE INDEX operations_unfinished ON operations (state) WHERE state IN ('accepted', 'in_progress');

        CREATE TABLE idempotency_keys (
            namespace     TEXT COLLATE "C" NOT NULL,
            request_id    TEXT COLLATE "C" NOT NULL,
            method        TEXT NOT NULL,
            request_hash  TEXT NOT NULL,
            deployment_id TEXT COLLATE "C" NOT NULL REFERENCES deployments (deployment_id),
            response      TEXT NOT NULL,
            create_time   TIMESTAMPTZ NOT NULL,
            PRIMARY KEY (namespace, request_id)
        );

        -- Sequences are assigned by the adapter from drift_event_counter, in commit order.
        CREATE TABLE drift_events (
            sequence      BIGINT PRIMARY KEY CHECK (sequence >= 1),
            deployment_id TEXT COLLATE "C" NOT NULL REFERENCES deployments (deployment_id),
            namespace     TEXT COLLATE "C" NOT NULL,
            resource_type TEXT COLLATE "C" NOT NULL,
            resource_name TEXT COLLATE "C" NOT NULL,
            kind          TEXT COLLATE "C" NOT NULL,
            payload       TEXT NOT NULL,
            event_time    TIMESTAMPTZ NOT NULL
        );
        CREATE INDEX drift_events_by_namespace ON drift_events (namespace, sequence);
        CREATE INDEX drift_events_by_deployment ON drift_events (deployment_id, sequence);

        -- The newest sequence ever issued (one row): never reused, even after the newest are pruned.
        CREATE TABLE drift_event_counter (
            one     BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (one),
            issued  BIGINT NOT NULL CHECK (issued >= 0)
        );
        INSERT INTO drift_event_counter (issued) VALUES (0);

        CREATE TABLE callback_outbox (
            delivery_id       TEXT COLLATE "C" PRIMARY KEY,
            deployment_id     TEXT COLLATE "C" NOT NULL REFERENCES deployments (deployment_id),
            url               TEXT NOT NULL,
            payload           TEXT NOT NULL,
            attempts          INTEGER NOT NULL DEFAULT 0,
            next_attempt_time TIMESTAMPTZ NOT NULL,
            delivered_time    TIMESTAMPTZ,
            last_error        TEXT NOT NULL DEFAULT '',
            create_time       TIMESTAMPTZ NOT NULL
        );
        CREATE INDEX callback_outbox_due ON callback_outbox (next_attempt_time) WHERE delivered_time IS NULL;
        """,
    ),
    (
        2,
        "drift state per deployment, remediation policies",
        """
        -- What the detector last reported per deployment, so a restart does not re-announce old drift.
        CREATE TABLE drift_state (
            deployment_id TEXT COLLATE "C" PRIMARY KEY REFERENCES deployments (deployment_id),
            items         TEXT NOT NULL,
            health        TEXT NOT NULL,
            update_time   TIMESTAMPTZ NOT NULL
        );

        CREATE TABLE policies (
            namespace     TEXT COLLATE "C" NOT NULL,
            resource_type TEXT COLLATE "C" NOT NULL,
            mode          TEXT NOT NULL,
            ignore_fields TEXT NOT NULL,
            update_time   TIMESTAMPTZ NOT NULL,
            PRIMARY KEY (namespace, resource_type)
        );
        """,
    ),
    (
        3,
        "pending remediations (approval mode), maintenance windows of policies",
        """
        -- A policy's maintenance window as JSON (cron, duration, time zone); '' for none.
        ALTER TABLE policies ADD COLUMN maintenance_window TEXT NOT NULL DEFAULT '';

        -- Remediations proposed under policy mode approve, and what became of them.
        CREATE TABLE remediations (
            remediation_id TEXT COLLATE "C" PRIMARY KEY,
            deployment_id  TEXT COLLATE "C" NOT NULL REFERENCES deployments (deployment_id),
            namespace      TEXT COLLATE "C" NOT NULL,
            state          TEXT COLLATE "C" NOT NULL,
            payload        TEXT NOT NULL,
            create_time    TIMESTAMPTZ NOT NULL,
            expire_time    TIMESTAMPTZ NOT NULL,
            decided_by     TEXT NOT NULL DEFAULT '',
            decide_time    TIMESTAMPTZ,
            reason         TEXT NOT NULL DEFAULT ''
        );
        CREATE INDEX remediations_by_namespace ON remediations (namespace, create_time);
        CREATE INDEX remediations_open ON remediations (deployment_id) WHERE state IN ('pending', 'approved');
        """,
    ),
    (
        4,
        "cost budgets per namespace, cost alert crossings",
        """
        -- Monthly budgets set through SetCostBudget (configured ones live in the config file).
        CREATE TABLE cost_budgets (
            namespace      TEXT COLLATE "C" PRIMARY KEY,
            monthly_budget DOUBLE PRECISION NOT NULL CHECK (monthly_budget >= 0),
            update_time    TIMESTAMPTZ NOT NULL
        );

        -- Subjects ("resource:<deployment id>", "namespace:<name>") over their cost threshold or
        -- budget: a crossing is alerted once, and again only after the subject went back below.
        CREATE TABLE cost_alerts (
            subject     TEXT COLLATE "C" PRIMARY KEY,
            since       TIMESTAMPTZ NOT NULL
        );
        """,
    ),
    (
        5,
        "a mode per drift rule in policies",
        """
        -- The policy's drift rules with a mode of their own, as JSON ({"replicas.changed": "approve"}).
        ALTER TABLE policies ADD COLUMN rule_modes TEXT NOT NULL DEFAULT '';
        """,
    ),
)

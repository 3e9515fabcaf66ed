"""Fault scenarios against real broker and sandbox processes: ``./dev.sh chaos [NAME]``.

Each scenario starts the sandbox cluster (``python -m broker sandbox``, or ``chaos.sandbox_host``
where it needs a control path the faults do not block) and the broker (``python -m broker serve``)
as separate subprocesses on loopback, injects one kind of fault, measures what a platform team would
check afterwards and returns a :class:`chaos.harness.Result` (name, figures, passed, detail).

Scenarios (``chaos.scenarios.SCENARIOS``), each with a full and a short size:

- ``sigkill-under-load``: concurrent Provisions while the broker is SIGKILLed and restarted;
- ``resume-under-churn``: WatchDrift subscribers that keep reconnecting with ``after_sequence``;
- ``api-pause``: the cluster API refuses connections while workloads are changed behind it;
- ``callback-receiver-down``: the manager's callback endpoint is down, and the broker is killed;
- ``slow-consumer``: a WatchDrift subscriber that never reads, next to normal ones;
- ``sigterm-drain``: SIGTERM with unary calls and streams in flight;
- ``failover``: three replicas on one PostgreSQL, their leader SIGKILLed under load.

``python -m chaos`` runs them (full size by default, ``--short`` for the test-suite size);
``tests/test_chaos.py`` runs every one at the short size.
"""

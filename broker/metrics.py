"""Prometheus metrics, served at ``/metrics`` on the HTTP port.

Each broker has its own registry (tests run several in one process). Counts that components keep
anyway (informer relists, callback deliveries, subscribers, open drift) are read at scrape time by a
collector instead of being duplicated; the rest are updated where they happen.

- ``broker_rpc_requests_total{method,code,transport}``, ``broker_rpc_duration_seconds{method,transport}``
- ``broker_drift_events_total{kind}``, ``broker_drift_items_total{drift_class,action}``
- ``broker_open_drifts{namespace,resource_type}``
- ``broker_remediations_total{outcome}``
- ``broker_kube_watch_reconnects_total{kind}``, ``broker_kube_relists_total{kind}``
- ``broker_callback_deliveries_total{result}``
- ``broker_watch_subscribers``
- ``broker_cost_alerts_total{namespace,reason}`` (reason ``cost_raised`` or ``over_budget``),
  ``broker_namespace_cost_monthly{namespace,kind}`` (kind ``desired`` or ``actual``; on the leader,
  which evaluates), ``broker_namespace_cost_budget{namespace}``
- ``broker_leader`` (1 while this replica runs the leader-only workers),
  ``broker_leader_transitions_total{transition}``
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from broker.domain import model


class Metrics:
    """The broker's metrics on one registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.rpc_requests = Counter(
            "broker_rpc_requests",
            "RPCs handled, by method, status code and transport (grpc, or http for the /v1 gateway).",
            ["method", "code", "transport"],
            registry=self.registry,
        )
        self.rpc_duration = Histogram(
            "broker_rpc_duration_seconds",
            "Time to handle unary RPCs (streams: to their end), by method and transport.",
            ["method", "transport"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 60, 600),
            registry=self.registry,
        )
        self.drift_events = Counter(
            "broker_drift_events",
            "Events appended to the drift event log, by kind.",
            ["kind"],
            registry=self.registry,
        )
        self.drift_items = Counter(
            "broker_drift_items",
            "Drift items carried by drift events, by class and recommended action.",
            ["drift_class", "action"],
            registry=self.registry,
        )
        self.remediations = Counter(
            "broker_remediations", "Remediation attempts, by outcome.", ["outcome"], registry=self.registry
        )
        self.cost_alerts = Counter(
            "broker_cost_alerts",
            "COST_ALERT events, by namespace and reason: cost_raised (drift raised a resource's cost past "
            "the threshold) or over_budget (the namespace's actual cost crossed its budget).",
            ["namespace", "reason"],
            registry=self.registry,
        )

        self.startup = Gauge(
            "broker_startup_seconds",
            "From the start of the process's broker to the end of its start-up: the caches listed and "
            "every deployment evaluated once (on a follower: until it first led). 0 until then.",
            registry=self.registry,
        )

    def count_cost_alert(self, namespace: str, reason: str) -> None:
        """Count one cost alert the detector wrote."""
        self.cost_alerts.labels(namespace, reason).inc()

    def count_rpc(self, method: str, code: str, transport: str, seconds: float) -> None:
        """Count one call of an RPC (``code`` is the gRPC status name) over a transport."""
        self.rpc_requests.labels(method, code, transport).inc()
        self.rpc_duration.labels(method, transport).observe(seconds)

    def on_events(self, events: list[model.DriftEvent]) -> None:
        """Count committed events (a store listener)."""
        for event in events:
            self.drift_events.labels(event.kind.value).inc()
            if event.kind is model.EventKind.REMEDIATION_SUCCEEDED:
                self.remediations.labels("succeeded").inc()
            elif event.kind is model.EventKind.REMEDIATION_FAILED:
                self.remediations.labels("failed").inc()
            elif event.kind in (
                model.EventKind.DRIFT_DETECTED,
                model.EventKind.DRIFT_CHANGED,
                model.EventKind.RESOURCE_MISSING,
            ):
                for item in event.items:
                    self.drift_items.labels(item.drift_class.value, item.action.value).inc()

    def add_collector(self, collector: Collector) -> None:
        """Register a scrape-time collector."""
        self.registry.register(collector)


class ScrapeCollector(Collector):
    """Reads counts components keep anyway, at scrape time."""

    def __init__(self, read: Callable[[], dict[str, Any]]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        """The current figures."""
        data = self._read()
        reconnects = CounterMetricFamily(
            "broker_kube_watch_reconnects", "Kubernetes watch failures, by kind.", labels=["kind"]
        )
        relists = CounterMetricFamily(
            "broker_kube_relists", "Kubernetes full lists (first and after 410), by kind.", labels=["kind"]
        )
        for kind, (reconnect_count, relist_count) in data.get("informers", {}).items():
            reconnects.add_metric([kind], reconnect_count)
            relists.add_metric([kind], relist_count)
        callbacks = CounterMetricFamily(
            "broker_callback_deliveries", "Callback delivery attempts, by result.", labels=["result"]
        )
        delivered, failed = data.get("callbacks", (0, 0))
        callbacks.add_metric(["delivered"], delivered)
        callbacks.add_metric(["failed"], failed)
        subscribers = GaugeMetricFamily("broker_watch_subscribers", "Connected WatchDrift streams.")
        subscribers.add_metric([], data.get("subscribers", 0))
        open_drifts = GaugeMetricFamily(
            "broker_open_drifts",
            "Open unexpected drift items, by namespace and resource type.",
            labels=["namespace", "resource_type"],
        )
        for (namespace, resource_type), count in sorted(data.get("open_drifts", {}).items()):
            open_drifts.add_metric([namespace, resource_type], count)
        open_connections, refused = data.get("http_connections", (0, {}))
        connections = GaugeMetricFamily("broker_http_connections", "Open connections to the HTTP port.")
        connections.add_metric([], open_connections)
        refusals = CounterMetricFamily(
            "broker_http_connections_refused",
            "HTTP connections closed by the port's limits, by reason (max_connections, header_timeout).",
            labels=["reason"],
        )
        for reason in ("max_connections", "header_timeout"):
            refusals.add_metric([reason], refused.get(reason, 0))
        namespace_costs = GaugeMetricFamily(
            "broker_namespace_cost_monthly",
            "Estimated monthly cost of a namespace's evaluated resources, desired or actual (leader only).",
            labels=["namespace", "kind"],
        )
        for namespace, (desired, actual) in sorted(data.get("namespace_costs", {}).items()):
            namespace_costs.add_metric([namespace, "desired"], desired)
            namespace_costs.add_metric([namespace, "actual"], actual)
        budgets = GaugeMetricFamily(
            "broker_namespace_cost_budget",
            "Monthly cost budget of a namespace (configured or set through SetCostBudget).",
            labels=["namespace"],
        )
        for namespace, amount in sorted(data.get("budgets", {}).items()):
            budgets.add_metric([namespace], amount)
        yield from (
            reconnects,
            relists,
            callbacks,
            subscribers,
            open_drifts,
            connections,
            refusals,
            namespace_costs,
            budgets,
        )


LEADER_TRANSITIONS = ("acquired", "lost", "released")


class LeaderCollector(Collector):
    """Leadership, read at scrape time: ``read()`` gives whether the leader-only workers run here
    and the elector's transition counts (empty without leader election)."""

    def __init__(self, read: Callable[[], tuple[bool, Mapping[str, int]]]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        """The current figures."""
        leading, transitions = self._read()
        leader = GaugeMetricFamily(
            "broker_leader",
            "1 while this replica runs the leader-only workers (detector, remediator, provisioner, "
            "callback dispatcher): it holds the leader Lease, or leader election is off. 0 otherwise.",
        )
        leader.add_metric([], 1 if leading else 0)
        changes = CounterMetricFamily(
            "broker_leader_transitions",
            "Leadership changes of this replica: acquired the Lease, lost it (renew deadline passed "
            "or another holder seen), released it on shutdown.",
            labels=["transition"],
        )
        for transition in LEADER_TRANSITIONS:
            changes.add_metric([transition], transitions.get(transition, 0))
        yield from (leader, changes)

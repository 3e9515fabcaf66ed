"""The settings of ``broker serve``, each defined once: flag, environment variable, config-file key.

Every row of ``TABLE`` names a field of ``server.Settings`` (dotted for a nested group such as
``watch.heartbeat_interval``), its flag, its type and its help. The rest is derived, so the four
ways of setting a value cannot disagree:

- the environment variable is ``BROKER_`` + the flag in upper snake case (``--heartbeat-interval``
  is ``BROKER_HEARTBEAT_INTERVAL``);
- the config-file key is the flag in snake case (``heartbeat_interval: 5``), at the top level of
  the ``--config`` file beside ``sizes``, ``prices`` and ``policies``;
- the default is the field's default in ``server.Settings``;
- the README's table is ``markdown_table()`` (a test compares them).

A value given several ways is taken from the flag, then the environment, then the file. Boolean
settings are switches (``--insecure``); in the environment and the file they read ``1``/``true``/
``yes`` and ``0``/``false``/``no``. A ``--no-x`` switch sets its field to false.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any

from broker.domain import admission, costs

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise ValueError(f"must be a positive number of seconds, not {text!r}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"must be a positive whole number, not {text!r}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    problem = costs.threshold_problem(value)
    if problem:
        raise ValueError(f"{problem}, not {text!r}")
    return value


def _addr(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{text!r} is not HOST:PORT (for example 0.0.0.0:50051 or [::1]:50051)")
    return text


_STORE_URL_FORMS = (
    "sqlite:///PATH (one replica; sqlite:////PATH for an absolute path) or "
    "postgresql://USER:PASSWORD@HOST:PORT/DATABASE (several replicas)"
)


def _store_url(text: str) -> str:
    """A store URL, checked here so a typo fails at start-up with the setting's name.

    No message repeats the URL: it may carry a password.
    """
    scheme, sep, rest = text.partition("://")
    if not sep:
        raise ValueError(f"is not a store URL: use {_STORE_URL_FORMS}")
    if scheme == "sqlite":
        if not rest.startswith("/") or not rest.removeprefix("/"):
            raise ValueError(f"a sqlite:// URL names a file after its third slash: use {_STORE_URL_FORMS}")
        return text
    if scheme in ("postgresql", "postgres"):
        parts = urllib.parse.urlsplit(text)
        try:
            parts.port  # noqa: B018 - urllib checks the port only when it is read
        except ValueError as e:
            raise ValueError("the port of the postgresql:// URL is not a number from 1 to 65535") from e
        if not parts.hostname and "host=" not in parts.query:
            raise ValueError(f"the postgresql:// URL names no server: use {_STORE_URL_FORMS}")
        return text
    raise ValueError(f"{scheme!r} is not a store this broker knows: use {_STORE_URL_FORMS}")


@dataclasses.dataclass(frozen=True)
class Kind:
    """How a setting's text becomes a value, and how it is shown."""

    parse: Callable[[str], Any]
    metavar: str | None
    switch: bool = False


def _prevention_modes(text: str) -> str:
    admission.parse_modes(text)  # refuses what it cannot read; the text is kept, as the README shows it
    return text.strip()


ADDR = Kind(_addr, "HOST:PORT")
FILE = Kind(pathlib.Path, "FILE")
DIR = Kind(pathlib.Path, "DIR")
SECONDS = Kind(_positive_float, "SECONDS")
COUNT = Kind(_positive_int, "N")
EVENTS = Kind(_positive_int, "EVENTS")
NAME = Kind(str, "NAME")
STORE_URL = Kind(_store_url, "URL")
SWITCH = Kind(bool, None, switch=True)
MODES = Kind(_prevention_modes, "MODES")
USER = Kind(str, "USERNAME")
FRACTION = Kind(_fraction, "FRACTION")


@dataclasses.dataclass(frozen=True)
class Setting:
    """One setting: where it lands in ``server.Settings``, its flag, type and help."""

    field: str
    flag: str
    kind: Kind
    help: str
    # A ``--no-x`` switch turns its field off instead of on.
    negated: bool = False

    @property
    def env(self) -> str:
        """The environment variable."""
        return "BROKER_" + self.flag.removeprefix("--").replace("-", "_").upper()

    @property
    def key(self) -> str:
        """The config-file key."""
        return self.flag.removeprefix("--").replace("-", "_")

    def parse(self, text: str, where: str) -> Any:
        """The value of ``text`` from ``where`` (a flag, a variable, a file key), or ValueError."""
        if self.kind.switch:
            lowered = text.strip().lower()
            if lowered not in _TRUE | _FALSE:
                raise ValueError(f"{where}: {text!r} is not a switch value (use true or false)")
            on = lowered in _TRUE
            return not on if self.negated else on
        try:
            return self.kind.parse(text)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from e


TABLE: tuple[Setting, ...] = (
    Setting("grpc_addr", "--grpc-addr", ADDR, "gRPC listen address"),
    Setting("http_addr", "--http-addr", ADDR, "HTTP listen address: the /v1 gateway, probes, /metrics"),
    Setting(
        "data_dir",
        "--data-dir",
        DIR,
        "directory holding broker.db (unless --store-url names another store), the callback key "
        "and the sandbox's state",
    ),
    Setting(
        "store_url",
        "--store-url",
        STORE_URL,
        "where the store lives: sqlite:///PATH, one replica (default: broker.db in --data-dir), "
        "or postgresql://USER:PASSWORD@HOST:PORT/DATABASE, shared by several replicas",
    ),
    Setting("tokens_file", "--tokens", FILE, "YAML file mapping bearer tokens to principals and namespaces"),
    Setting(
        "insecure",
        "--insecure",
        SWITCH,
        "no authentication: every caller may use every namespace (local use only)",
    ),
    Setting(
        "sandbox",
        "--sandbox",
        SWITCH,
        "run the embedded sandbox Kubernetes API in-process and manage workloads there",
    ),
    Setting(
        "kubeconfig",
        "--kubeconfig",
        FILE,
        "manage the cluster of this kubeconfig (default: in-cluster in a pod, else none)",
    ),
    Setting(
        "kube_context",
        "--kube-context",
        NAME,
        "the kubeconfig context to use (default: its current context; the sandbox's broker context)",
    ),
    Setting(
        "drift_prevention",
        "--drift-prevention",
        MODES,
        "admission policies against hand edits: off, warn, deny or audit for all categories, "
        "or per category (spec, labels, secret, deletion), e.g. deny,labels=warn",
    ),
    Setting(
        "broker_identity",
        "--broker-identity",
        USER,
        "the Kubernetes username the broker acts as; drift prevention never stops it",
    ),
    Setting(
        "ready_timeout",
        "--ready-timeout",
        SECONDS,
        "how long a workload may take to become ready before provisioning fails",
    ),
    Setting(
        "resync_interval",
        "--resync-interval",
        SECONDS,
        "how often every deployment is re-evaluated, besides watch events",
    ),
    Setting(
        "metrics_interval",
        "--metrics-interval",
        SECONDS,
        "how often pod usage is read from metrics.k8s.io (metrics-server's own resolution is 15 s)",
    ),
    Setting(
        "kafka_cluster",
        "--kafka-cluster",
        NAME,
        "the Strimzi Kafka cluster topics are created in (strimzi.io/cluster)",
    ),
    Setting(
        "callback_key_file",
        "--callback-key-file",
        FILE,
        "HMAC key for signing callbacks (else $BROKER_CALLBACK_KEY, else one generated in <data-dir>)",
    ),
    Setting(
        "callback_allow_loopback",
        "--callback-allow-loopback",
        SWITCH,
        "allow callbacks to loopback addresses (local development and tests only)",
    ),
    Setting(
        "callback_allow_link_local",
        "--callback-allow-link-local",
        SWITCH,
        "allow callbacks to link-local addresses (cloud metadata addresses stay refused)",
    ),
    Setting(
        "callback_max_backoff",
        "--callback-max-backoff",
        SECONDS,
        "the longest wait between two attempts of one callback",
    ),
    Setting(
        "remediate",
        "--no-remediation",
        SWITCH,
        "dry run: report drift and the recommended action, never change the cluster",
        negated=True,
    ),
    Setting(
        "remediation_max_delay",
        "--remediation-max-backoff",
        SECONDS,
        "the longest wait between remediations of a drift another actor keeps undoing",
    ),
    Setting(
        "cost_alert_threshold",
        "--cost-alert-threshold",
        FRACTION,
        "a COST_ALERT when drift makes a resource cost more than this fraction above its desired cost "
        "(0.2: over 20 percent); namespace budgets are the budgets key of --config and SetCostBudget",
    ),
    Setting(
        "approval_ttl",
        "--approval-ttl",
        SECONDS,
        "how long a pending remediation (policy mode approve) waits for a decision before it expires",
    ),
    Setting("tls_cert", "--tls-cert", FILE, "serve gRPC and HTTP over TLS with this certificate (PEM)"),
    Setting("tls_key", "--tls-key", FILE, "the certificate's private key (PEM)"),
    Setting(
        "tls_client_ca",
        "--tls-client-ca",
        FILE,
        "require client certificates signed by this CA (mTLS), on gRPC and HTTP",
    ),
    Setting("reflection", "--no-reflection", SWITCH, "turn gRPC server reflection off", negated=True),
    Setting(
        "shutdown_grace",
        "--shutdown-grace",
        SECONDS,
        "how long in-flight calls may take to finish on SIGTERM",
    ),
    Setting(
        "drain_accept",
        "--drain-accept",
        SECONDS,
        "after SIGTERM, new calls are still served this long (load balancers take time to notice)",
    ),
    Setting(
        "watch.streams_per_principal",
        "--max-streams-per-principal",
        COUNT,
        "WatchDrift streams one principal may hold open",
    ),
    Setting(
        "watch.heartbeat_interval",
        "--heartbeat-interval",
        SECONDS,
        "a WatchDrift stream with nothing to send gets a heartbeat this often",
    ),
    Setting(
        "watch.buffer",
        "--watch-buffer",
        EVENTS,
        "matching events that may wait for one subscriber before it is cut off (resumably)",
    ),
    Setting(
        "watch.max_lag_seconds",
        "--watch-max-lag",
        SECONDS,
        "a subscriber whose transport takes no message for this long is cut off (resumably)",
    ),
    Setting(
        "event_retention",
        "--event-retention",
        EVENTS,
        "drift events kept in the log; resuming from an older sequence gets OUT_OF_RANGE",
    ),
    Setting(
        "event_prune_interval",
        "--event-prune-interval",
        SECONDS,
        "how often the event log is pruned to --event-retention (and old keys and deliveries dropped)",
    ),
    Setting(
        "request_id_retention",
        "--request-id-retention",
        SECONDS,
        "how long a request_id (and a decided remediation) is remembered; a retry after that is a "
        "new request",
    ),
    Setting(
        "delivered_callback_retention",
        "--delivered-callback-retention",
        SECONDS,
        "how long a delivered callback stays in the outbox (undelivered ones are never dropped)",
    ),
    Setting(
        "http.max_connections",
        "--http-max-connections",
        COUNT,
        "open connections the HTTP port accepts; more are answered 503 and closed",
    ),
    Setting(
        "http.header_timeout",
        "--http-header-timeout",
        SECONDS,
        "a new HTTP connection must send its request headers within this time",
    ),
    Setting(
        "http.keepalive_timeout",
        "--http-keepalive-timeout",
        SECONDS,
        "an idle keep-alive HTTP connection is closed after this time",
    ),
    Setting(
        "leader_election.enabled",
        "--leader-election",
        SWITCH,
        "several replicas: run the detector, remediator, provisioner and callback dispatcher only while "
        "this replica holds the leader Lease",
    ),
    Setting(
        "leader_election.namespace",
        "--leader-election-namespace",
        NAME,
        "namespace of the leader Lease (default $POD_NAMESPACE, else the pod's own, else default)",
    ),
    Setting("leader_election.lease_name", "--leader-election-lease-name", NAME, "name of the leader Lease"),
    Setting(
        "leader_election.identity",
        "--leader-election-identity",
        NAME,
        "this replica's holder identity, unique per replica (default $POD_NAME, else $HOSTNAME, else "
        "host name and process id)",
    ),
    Setting(
        "leader_election.lease_duration",
        "--leader-election-lease-duration",
        SECONDS,
        "whole seconds the Lease must stay unrenewed before another replica takes it over",
    ),
    Setting(
        "leader_election.renew_deadline",
        "--leader-election-renew-deadline",
        SECONDS,
        "a leader that cannot renew for this long stops its leader-only work (less than the lease duration)",
    ),
    Setting(
        "leader_election.retry_period",
        "--leader-election-retry-period",
        SECONDS,
        "how often the leader renews and the other replicas try to acquire",
    ),
)

BY_KEY = {s.key: s for s in TABLE}


def add_arguments(parser: argparse.ArgumentParser, defaults: type[Any]) -> None:
    """The flags of ``TABLE``, with the defaults of the settings dataclass ``defaults`` in their help.

    No flag has an argparse default, so ``resolve`` can tell what was given on the command line.
    """
    for setting in TABLE:
        default = default_of(defaults, setting.field)
        shown = "" if setting.kind.switch or default is None else f"default {_shown(default)}; "
        help_text = f"{setting.help} ({shown}env {setting.env})"
        if setting.kind.switch:
            parser.add_argument(
                setting.flag, dest=setting.key, action="store_const", const="true", help=help_text
            )
        else:
            parser.add_argument(setting.flag, dest=setting.key, metavar=setting.kind.metavar, help=help_text)


def resolve(
    args: argparse.Namespace,
    file_values: Mapping[str, Any],
    environ: Mapping[str, str],
    *,
    where: str = "config file",
) -> dict[str, Any]:
    """The given values, by dotted field: from the flag, else the environment, else the file."""
    unknown = sorted(set(file_values) - set(BY_KEY))
    if unknown:
        raise ValueError(f"{where}: unknown keys {', '.join(unknown)}")
    values: dict[str, Any] = {}
    for setting in TABLE:
        given = getattr(args, setting.key, None)
        if given is not None:
            values[setting.field] = setting.parse(given, setting.flag)
        elif environ.get(setting.env):
            values[setting.field] = setting.parse(environ[setting.env], setting.env)
        elif setting.key in file_values:
            raw = file_values[setting.key]
            text = ("true" if raw else "false") if isinstance(raw, bool) else str(raw)
            values[setting.field] = setting.parse(text, f"{where}: {setting.key}")
    return values


def build(cls: type[Any], values: Mapping[str, Any], **fixed: Any) -> Any:
    """An instance of the settings dataclass ``cls`` with dotted ``values`` put in their groups."""
    groups: dict[str, dict[str, Any]] = {}
    flat: dict[str, Any] = dict(fixed)
    for field, value in values.items():
        group, dot, name = field.partition(".")
        if dot:
            groups.setdefault(group, {})[name] = value
        else:
            flat[field] = value
    defaults = cls()
    for group, members in groups.items():
        flat[group] = dataclasses.replace(getattr(defaults, group), **members)
    return cls(**flat)


def default_of(cls: type[Any], field: str) -> Any:
    """The default of a dotted field of the settings dataclass ``cls``."""
    value: Any = cls()
    for part in field.split("."):
        value = getattr(value, part)
    return value


def markdown_table(cls: type[Any]) -> str:
    """The README's table of settings."""
    lines = ["| flag | environment | config key | default | |", "| --- | --- | --- | --- | --- |"]
    for setting in TABLE:
        flag = f"`{setting.flag}`" if setting.kind.switch else f"`{setting.flag} {setting.kind.metavar}`"
        default = default_of(cls, setting.field)
        if setting.kind.switch:
            shown = "on" if bool(default) != setting.negated else "off"
        else:
            shown = "none" if default is None else f"`{_shown(default)}`"
        lines.append(f"| {flag} | `{setting.env}` | `{setting.key}` | {shown} | {setting.help} |")
    return "\n".join(lines)


def _shown(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)

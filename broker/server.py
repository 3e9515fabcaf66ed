"""Assembles a running broker: store, service layer, gRPC server (with health and reflection) and
the /v1 HTTP gateway, and takes it down gracefully.

Shutdown order (SIGTERM/SIGINT): health goes NOT_SERVING and /readyz 503 so load balancers stop
sending work; the gRPC server stops accepting calls and gives in-flight ones ``shutdown_grace``
seconds to finish; then the gateway and the store close.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import dataclasses
import datetime
import gc
import logging
import os
import pathlib
import secrets
import signal
import ssl
import time
from typing import Any

import grpc
from aiohttp import web
from broker_client.v1 import broker_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from broker import auth, callbacks, errors, events, leadership, metrics, prevention, service, workers
from broker import detector as detection
from broker import provisioner as provisioning
from broker.api import connections, decoding, draining, gateway, grpc_api, grpc_metrics, reflection
from broker.domain import admission, costs, policy
from broker.domain import catalog as catalog_mod
from broker.kube import client as kube_client
from broker.kube import lease, observer
from broker.store import port, postgres, sqlite

log = logging.getLogger(__name__)

SERVICE_NAME = broker_pb2.DESCRIPTOR.services_by_name["BrokerService"].full_name

# Hardening: bounded messages and streams, keepalive enforcement (clients pinging more often than
# every 10 s without calls are cut off), and no SO_REUSEPORT, so a second broker on the same port
# fails to start instead of silently sharing it.
GRPC_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_receive_message_length", 4 * 1024 * 1024),
    ("grpc.max_send_message_length", 16 * 1024 * 1024),
    ("grpc.max_concurrent_streams", 1000),
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_ping_strikes", 2),
    ("grpc.so_reuseport", 0),
)


@dataclasses.dataclass(frozen=True)
class Settings:
    """How to run a broker; ``broker serve`` fills it from ``broker.settings.TABLE`` (flags,
    environment variables, config-file keys), whose defaults are these."""

    grpc_addr: str = "0.0.0.0:50051"
    http_addr: str = "0.0.0.0:8082"
    data_dir: pathlib.Path = pathlib.Path(".broker")
    # None: the SQLite file in ``data_dir`` (``store_url_of``).
    store_url: str | None = None
    insecure: bool = False
    tokens_file: pathlib.Path | None = None
    reflection: bool = True
    shutdown_grace: float = 10.0
    drain_accept: float = 1.0
    catalog: catalog_mod.Catalog = catalog_mod.DEFAULT_CATALOG
    rules: policy.Policy = dataclasses.field(default_factory=policy.Policy)
    kubeconfig: pathlib.Path | None = None
    kube_context: str | None = None
    drift_prevention: str = "off"
    broker_identity: str = admission.DEFAULT_IDENTITY
    sandbox: bool = False
    sandbox_namespaces: tuple[str, ...] = ("team-platform",)
    ready_timeout: float = 300.0
    callback_key_file: pathlib.Path | None = None
    callback_allow_loopback: bool = False
    callback_allow_link_local: bool = False
    kafka_cluster: str = "kafka"
    watch: service.WatchLimits = dataclasses.field(default_factory=service.WatchLimits)
    resync_interval: float = 60.0
    metrics_interval: float = 15.0
    tls_cert: pathlib.Path | None = None
    tls_key: pathlib.Path | None = None
    tls_client_ca: pathlib.Path | None = None
    remediate: bool = True
    remediation_base_delay: float = 1.0
    remediation_max_delay: float = 300.0
    cost_alert_threshold: float = costs.DEFAULT_THRESHOLD
    # Monthly budgets per namespace from the --config file; SetCostBudget overrides them.
    budgets: dict[str, float] = dataclasses.field(default_factory=dict)
    approval_ttl: float = 24 * 3600.0
    callback_max_backoff: float = 60.0
    event_retention: int = 100_000
    event_prune_interval: float = 600.0
    request_id_retention: float = 7 * 24 * 3600.0
    delivered_callback_retention: float = 24 * 3600.0
    http: connections.Limits = dataclasses.field(default_factory=connections.Limits)
    leader_election: lease.ElectionSettings = dataclasses.field(default_factory=lease.ElectionSettings)


@dataclasses.dataclass(frozen=True)
class ClusterParts:
    """The components a connected cluster brings: its caches and the workers that act on them."""

    state: observer.ClusterState
    provisioner: provisioning.Provisioner
    remediator: detection.Remediator
    detector: detection.Detector
    prevention: prevention.Prevention | None = None


def store_url_of(settings: Settings) -> str:
    """The store the settings name: ``--store-url``, else ``sqlite:///<data-dir>/broker.db``."""
    return settings.store_url or sqlite.url_of(settings.data_dir / sqlite.DB_FILENAME)


def shown_store_url(url: str) -> str:
    """A store URL fit for logs and messages (no password)."""
    return url if url.startswith(sqlite.URL_PREFIX) else postgres.redacted(url)


async def open_store(url: str) -> port.Store:
    """Open the store of a URL: ``sqlite:///PATH`` (one replica) or ``postgresql://...`` (several)."""
    if url.startswith(sqlite.URL_PREFIX):
        return await sqlite.Store.open_file(sqlite.path_of(url))
    if url.startswith(("postgresql://", "postgres://")):
        return await postgres.Store.open(url)
    raise ValueError("a store URL is sqlite:///PATH or postgresql://USER:PASSWORD@HOST:PORT/DATABASE")


def callback_key(settings: Settings) -> bytes:
    """The callback signing key: from a file, ``BROKER_CALLBACK_KEY``, or generated once and kept.

    A generated key is written to ``<data-dir>/callback.key`` (mode 0600) so that it survives
    restarts; managers read it from there (or, better, both sides are configured with one key).
    """
    if settings.callback_key_file is not None:
        return settings.callback_key_file.read_bytes().strip()
    if os.environ.get("BROKER_CALLBACK_KEY"):
        return os.environ["BROKER_CALLBACK_KEY"].encode()
    path = settings.data_dir / "callback.key"
    if not path.exists():
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        log.warning("generated a callback signing key", extra={"path": str(path)})
    return path.read_bytes().strip()


SANDBOX_BROKER_CONTEXT = "resource-broker"


def prevention_of(settings: Settings) -> admission.Prevention:
    """What drift prevention the settings ask for."""
    return admission.Prevention(
        modes=admission.parse_modes(settings.drift_prevention), identity=settings.broker_identity
    )


def sandbox_identity(kube_sandbox: Any, username: str) -> Any:
    """The sandbox user the broker connects as (a service account's groups when it is one)."""
    parts = username.split(":")
    if len(parts) == 4 and parts[:2] == ["system", "serviceaccount"]:
        return kube_sandbox.users.service_account(parts[2], parts[3], context=SANDBOX_BROKER_CONTEXT)
    return kube_sandbox.users.User(name=SANDBOX_BROKER_CONTEXT, username=username)


def split_addr(addr: str) -> tuple[str, int]:
    """``HOST:PORT`` (or ``[V6]:PORT``) as host and port; ValueError with a readable message."""
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{addr!r} is not HOST:PORT (for example 0.0.0.0:50051 or [::1]:50051)")
    return host.strip("[]"), int(port)


@dataclasses.dataclass(frozen=True)
class Tls:
    """Server certificate and key, and the CA whose client certificates are required (mTLS)."""

    cert_path: pathlib.Path
    key_path: pathlib.Path
    cert: bytes
    key: bytes
    client_ca: bytes | None

    @classmethod
    def from_settings(cls, settings: Settings) -> Tls | None:
        """The TLS material the settings name, or None for plaintext; ValueError when incomplete."""
        if settings.tls_cert is None and settings.tls_key is None:
            if settings.tls_client_ca is not None:
                raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
            return None
        if settings.tls_cert is None or settings.tls_key is None:
            raise ValueError("TLS needs both --tls-cert and --tls-key")
        try:
            return cls(
                cert_path=settings.tls_cert,
                key_path=settings.tls_key,
                cert=settings.tls_cert.read_bytes(),
                key=settings.tls_key.read_bytes(),
                client_ca=settings.tls_client_ca.read_bytes() if settings.tls_client_ca else None,
            )
        except OSError as e:
            raise ValueError(f"cannot read TLS material: {e}") from e

    def grpc_credentials(self) -> grpc.ServerCredentials:
        """Credentials for the gRPC port (client certificates required when a client CA is set)."""
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)],
            root_certificates=self.client_ca,
            require_client_auth=self.client_ca is not None,
        )

    def ssl_context(self) -> ssl.SSLContext:
        """The same for the HTTP gateway."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert_path, self.key_path)
        if self.client_ca is not None:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(cadata=self.client_ca.decode())
        return context


def authenticator_for(settings: Settings) -> auth.Authenticator:
    """The authenticator the settings ask for; refuses to run open unless --insecure says so."""
    if settings.tokens_file is not None:
        return auth.Authenticator.from_file(settings.tokens_file)
    if settings.insecure:
        return auth.Authenticator.insecure_mode()
    raise ValueError("no authentication configured: pass --tokens FILE, or --insecure for local use only")


# Full collections wait for start-up to be done (``Broker._suspend_full_collections``), this long at most.
FULL_COLLECTIONS_SUSPENDED_FOR = 120.0
_NEVER = 2**31 - 1  # a generation-2 threshold that is never reached


def _give_back_freed_memory() -> None:
    """Return the memory start-up freed to the system (glibc keeps it otherwise; a no-op elsewhere).

    Listing thousands of objects decodes them whole before keeping the few fields the broker
    reads: the peak is several times what stays, and malloc holds on to the difference.
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(name).malloc_trim(0)


class Broker:
    """One running broker; ``start`` binds its ports (0 picks free ones), ``stop`` drains it."""

    def __init__(self, settings: Settings, *, freeze_heap: bool = False) -> None:
        self.settings = settings
        self._freeze_heap = freeze_heap
        self._frozen_after_list = False
        self._thresholds: tuple[int, int, int] | None = None  # while full collections are suspended
        self._started_at = time.monotonic()
        # From the start to the first evaluation of everything (None until then).
        self.startup_seconds: float | None = None
        self.authenticator = authenticator_for(settings)
        self.tls = Tls.from_settings(settings)
        self.grpc_port = 0
        self.http_port = 0
        self._draining = False
        self._store: port.Store | None = None
        self._grpc: grpc.aio.Server | None = None
        self._health = HealthServicer()
        self._http: web.AppRunner | None = None
        self._sandbox: Any = None
        # What a connected cluster adds, built together or not at all.
        self._cluster: ClusterParts | None = None
        self.dispatcher: callbacks.Dispatcher | None = None
        self.hub = events.EventHub()
        self.metrics = metrics.Metrics()
        self.http_connections = connections.Counters()
        self.policies = service.PolicyBook(settings.rules)
        self.budgets = service.BudgetBook(settings.budgets)
        self.supervisor = workers.Supervisor(self._worker_failed)
        self.leader_only = leadership.LeaderOnly(self.supervisor, elected=settings.leader_election.enabled)
        self._drain = draining.Drain(grpc_api.abort)
        self.failed = asyncio.Event()

    @property
    def cluster(self) -> observer.ClusterState | None:
        """The cluster's caches and writes, when a cluster is connected."""
        return self._cluster.state if self._cluster else None

    @property
    def provisioner(self) -> provisioning.Provisioner | None:
        """The provisioning worker, when a cluster is connected."""
        return self._cluster.provisioner if self._cluster else None

    @property
    def detector(self) -> detection.Detector | None:
        """The drift detector, when a cluster is connected."""
        return self._cluster.detector if self._cluster else None

    @property
    def prevention(self) -> prevention.Prevention | None:
        """The drift-prevention worker, when prevention is on and a cluster is connected."""
        return self._cluster.prevention if self._cluster else None

    @property
    def remediator(self) -> detection.Remediator | None:
        """The remediator, when a cluster is connected."""
        return self._cluster.remediator if self._cluster else None

    def _started_up(self) -> None:
        """Start-up is done (the first evaluation of everything): freeze the heap, if asked to.

        What survives start-up (caches, verdicts) lives as long as the process; frozen, a full
        garbage collection never walks it again (at 10k resources one walk stopped the broker for
        seconds). Only a process that is the broker freezes: tests run many brokers in one.
        """
        if self.startup_seconds is None:
            self.startup_seconds = time.monotonic() - self._started_at
            self.metrics.startup.set(self.startup_seconds)
            log.info("start-up done", extra={"seconds": round(self.startup_seconds, 2)})
        if self._freeze_heap:
            self._resume_full_collections("start-up done")

    def _suspend_full_collections(self) -> None:
        """Until start-up is done, only the young generations are collected.

        Start-up builds what lives as long as the process (the caches' lists, a verdict per
        deployment), and a growing heap triggers a full collection each time it grows by a
        quarter, each walking all of it: at 10k resources over a dozen, the longest for seconds.
        Young collections still free the short-lived cycles; what survives them is frozen when
        start-up is done, or after ``FULL_COLLECTIONS_SUSPENDED_FOR`` at the latest (a follower
        never sweeps).
        """
        if self._thresholds is None:
            self._thresholds = gc.get_threshold()
            young, middle, _ = self._thresholds
            gc.set_threshold(young, middle, _NEVER)
            asyncio.get_running_loop().call_later(
                FULL_COLLECTIONS_SUSPENDED_FOR, self._resume_full_collections, "start-up took long"
            )

    def _resume_full_collections(self, why: str) -> None:
        thresholds, self._thresholds = self._thresholds, None
        if thresholds is None:
            return
        gc.collect(1)  # the young generations only: cheap, and what they free is not frozen
        gc.freeze()
        gc.set_threshold(*thresholds)
        _give_back_freed_memory()
        log.info(
            "the heap that survived start-up is frozen; full collections resume",
            extra={"reason": why, "objects": gc.get_freeze_count()},
        )

    def _listed(self, state: observer.ClusterState) -> None:
        """The caches' first list is in: freeze it at once, if asked to, not only after start-up.

        The listed objects live as long as the process; frozen, the full collections that the
        detector's first sweep of thousands of deployments triggers no longer walk them (at 10k
        resources each such walk stopped the broker for seconds). No collection first: that
        walk is what this avoids; the little garbage frozen with it is never freed.
        """
        if self._freeze_heap and state.synced and not self._frozen_after_list:
            self._frozen_after_list = True
            gc.freeze()
            log.info(
                "the caches' first list is frozen",
                extra={
                    "objects": gc.get_freeze_count(),
                    "seconds": round(time.monotonic() - self._started_at, 2),  # since start, as start-up's
                },
            )

    def _worker_failed(self, name: str, exc: BaseException) -> None:
        """A supervised worker failed: not ready from now on, and ``run`` stops the process."""
        self.failed.set()
        self._draining = True
        asyncio.get_running_loop().create_task(self._health.enter_graceful_shutdown())

    @property
    def store(self) -> port.Store:
        """The open store (after start)."""
        if self._store is None:
            raise errors.Unavailable("the broker is not running")
        return self._store

    async def start(self) -> None:
        """Open the store, then serve gRPC and HTTP; health is SERVING once both listen.

        If any step fails, everything started so far is stopped again before the error propagates.
        """
        self._started_at = time.monotonic()
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        settings = self.settings
        if self._freeze_heap:
            self._suspend_full_collections()
        grpc_host, grpc_port = split_addr(settings.grpc_addr)
        http_host, http_port = split_addr(settings.http_addr)
        if self.authenticator.insecure:
            log.warning(
                "INSECURE MODE: authentication is OFF; every caller may use every namespace. "
                "Use --tokens FILE for anything but local development."
            )
        self._store = await open_store(store_url_of(settings))
        self._store.listeners += [self.hub.notify, self.metrics.on_events]
        self._store.wakers.append(self.hub.notify)  # other replicas' commits (PostgreSQL)
        _, newest = await self._store.event_bounds()
        self.supervisor.start("event-fanout", self.hub.tail(self._store.events_after, start=newest))
        self.policies = service.PolicyBook(settings.rules, await self._store.policies())
        self.budgets = service.BudgetBook(settings.budgets, await self._store.budgets())
        callback_policy = callbacks.CallbackPolicy(
            allow_loopback=settings.callback_allow_loopback,
            allow_link_local=settings.callback_allow_link_local,
        )
        self.dispatcher = callbacks.Dispatcher(
            store=self._store,
            key=await asyncio.to_thread(callback_key, settings),
            policy=callback_policy,
            max_delay=settings.callback_max_backoff,
        )
        self.leader_only.add("callback-dispatcher", self.dispatcher.run)
        await self._start_cluster()
        self._start_leader_election()
        svc = service.BrokerService(
            store=self._store,
            catalog=settings.catalog,
            cluster=self.cluster,
            verdicts=self.detector,
            policies=self.policies,
            callback_check=callback_policy,
            on_accepted=self.provisioner.kick if self.provisioner else lambda deployment_id: None,
            on_desired_changed=self.detector.notify if self.detector else lambda deployment_id: None,
            on_approved=self.detector.approved if self.detector else lambda deployment_id: None,
            hub=self.hub,
            watch_limits=settings.watch,
            prevention=prevention_of(settings),
            budgets=self.budgets,
            cost_alert_threshold=settings.cost_alert_threshold,
        )
        self.metrics.add_collector(metrics.ScrapeCollector(self._scrape))
        self.supervisor.start("event-retention", self._prune_events())
        self.supervisor.start("policy-refresh", self._refresh_policies())

        server = grpc.aio.server(
            options=GRPC_OPTIONS,
            interceptors=[
                grpc_metrics.RpcInterceptor(self.metrics),
                self._drain,
                decoding.DecodeGuard(grpc_api.abort),
            ],
        )
        server.add_generic_rpc_handlers(
            (grpc_api.BrokerServicer(service=svc, authenticator=self.authenticator).handler(),)
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        names = [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name]
        if settings.reflection:
            reflection.enable(server, services=names)  # v1 and v1alpha, with the proto comments
        try:
            address = f"{_bracket(grpc_host)}:{grpc_port}"
            if self.tls is not None:
                self.grpc_port = server.add_secure_port(address, self.tls.grpc_credentials())
            else:
                self.grpc_port = server.add_insecure_port(address)
        except RuntimeError as e:
            raise OSError(
                f"cannot listen for gRPC on {settings.grpc_addr}: is another process using it?"
            ) from e
        await server.start()
        self._grpc = server

        app = gateway.Gateway(
            service=svc,
            authenticator=self.authenticator,
            readiness=self._not_ready_reason,
            metrics_registry=self.metrics.registry,
            rpc_metrics=self.metrics,
            catalog=settings.catalog,
        )
        runner = web.AppRunner(
            app.app, access_log=None, handle_signals=False, keepalive_timeout=settings.http.keepalive_timeout
        )
        await runner.setup()
        ssl_context = self.tls.ssl_context() if self.tls is not None else None
        site = connections.LimitedSite(
            runner,
            http_host,
            http_port,
            limits=settings.http,
            counters=self.http_connections,
            ssl_context=ssl_context,
        )
        try:
            await site.start()
        except OSError as e:
            await runner.cleanup()
            raise OSError(f"cannot listen for HTTP on {settings.http_addr}: {e.strerror}") from e
        self._http = runner
        self.http_port = runner.addresses[0][1]

        await self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self._health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        if self._cluster is None:
            self._resume_full_collections("start-up done (no cluster)")
        log.info(
            "broker serving",
            extra={
                "grpc": f"{grpc_host}:{self.grpc_port}",
                "http": f"{http_host}:{self.http_port}",
                "data_dir": str(settings.data_dir),
                "store": shown_store_url(store_url_of(settings)),
                "reflection": settings.reflection,
            },
        )

    async def _start_cluster(self) -> None:
        """Connect to the cluster the settings name (the sandbox, a kubeconfig, in-cluster), if any."""
        settings = self.settings
        kubeconfig = settings.kubeconfig
        context = settings.kube_context
        if settings.sandbox:
            kube_sandbox = load_sandbox()
            # Its objects live in the data dir too: a restart finds the workloads (and Secrets) it left.
            # HTTPS, and a context of its own for the broker: kubectl sends a context's token only
            # over TLS, and admission policies tell the broker from a person by it.
            self._sandbox = kube_sandbox.Sandbox(
                state_dir=kube_sandbox.state_dir_of(settings.data_dir),
                profile=kube_sandbox.profiles.platform(settings.sandbox_namespaces),
                extra_users=(sandbox_identity(kube_sandbox, settings.broker_identity),),
                tls=True,
            )
            context = context or SANDBOX_BROKER_CONTEXT
            await self._sandbox.start("127.0.0.1", 0)
            kubeconfig = self._sandbox.write_kubeconfig(settings.data_dir / "sandbox.kubeconfig")
            log.warning(
                "SANDBOX: a simulated Kubernetes API on loopback, not a cluster; its state is kept in "
                "the data dir",
                extra={
                    "url": self._sandbox.url,
                    "kubeconfig": str(kubeconfig),
                    "state": self._sandbox.restored.describe(),
                },
            )
        elif kubeconfig is None and not os.environ.get("KUBERNETES_SERVICE_HOST"):
            log.warning(
                "no cluster configured (--kubeconfig, --sandbox or in-cluster): deployments stay Pending"
            )
            return
        client = await kube_client.Client.connect(kubeconfig, context=context)
        state = observer.ClusterState(
            client,
            catalog=settings.catalog,
            kafka_cluster=settings.kafka_cluster,
            metrics_interval=settings.metrics_interval,
        )
        guard = None
        if prevention_of(settings).enabled:
            guard = prevention.Prevention(
                client=client,
                prevention=prevention_of(settings),
                rules=lambda: self.policies.current,
                interval=settings.resync_interval,
            )
            self.policies.listeners.append(guard.kick)
        remediator = detection.Remediator(
            store=self.store,
            cluster=state,
            base_delay=settings.remediation_base_delay,
            max_delay=settings.remediation_max_delay,
        )
        parts = self._cluster = ClusterParts(
            state=state,
            provisioner=provisioning.Provisioner(
                store=self.store,
                cluster=state,
                catalog=settings.catalog,
                ready_timeout=settings.ready_timeout,
                on_finished=self._operation_finished,
            ),
            remediator=remediator,
            detector=detection.Detector(
                store=self.store,
                cluster=state,
                catalog=settings.catalog,
                policies=lambda: self.policies.current,
                remediator=remediator if settings.remediate else None,
                resync_interval=settings.resync_interval,
                # A new leader first evaluates what changed since the old one could have seen it:
                # at most a lease duration and a few retries before it took over.
                catch_up_window=2 * settings.leader_election.lease_duration,
                on_started=self._started_up,
                cost_watch=detection.CostWatch(
                    store=self.store,
                    catalog=settings.catalog,
                    threshold=settings.cost_alert_threshold,
                    budgets=lambda: self.budgets.current,
                    on_alert=lambda namespace, reason: self.metrics.count_cost_alert(namespace, reason.value),
                ),
                approval_ttl=settings.approval_ttl,
            ),
            prevention=guard,
        )
        self.budgets.listeners.append(parts.detector.budget_changed)
        state.add_listener(parts.provisioner.notify)
        # While an operation is carried out its objects change by design, and the detector judges
        # only what has finished: it hears of the deployment when the operation does (on_finished),
        # and only that its kept verdict is of objects that changed now.
        state.add_listener(
            lambda d: parts.detector.touched(d) if parts.provisioner.busy(d) else parts.detector.notify(d)
        )
        state.add_usage_listener(parts.detector.usage_changed)
        # An approval made on any replica reaches the leader's detector through the log's tailer.
        self.hub.observers.append(parts.detector.approvals_in)
        # Work accepted by another replica: the leader's provisioner and detector hear of it now.
        self.store.changed += [parts.provisioner.kick, parts.detector.notify]
        # A cache's first list is no change of its objects (``broker.kube.informer``): it is news to
        # whoever reads everything, or waits on what the cluster shows.
        state.add_sync_listener(parts.detector.resync_now)
        state.add_sync_listener(parts.provisioner.listed)
        state.add_sync_listener(lambda: self._listed(state))
        for name, worker in state.workers().items():
            self.supervisor.start(name, worker)
        self.leader_only.add("provisioner", parts.provisioner.run)
        self.leader_only.add("detector", parts.detector.run)
        self.leader_only.on_term_end(remediator.stop)
        # A replica that no longer leads must not show its last term's verdicts as current.
        self.leader_only.on_term_end(parts.detector.forget_all)
        if parts.prevention is not None:
            self.leader_only.add("drift-prevention", parts.prevention.run)
        log.info("watching the cluster", extra={"api": client.host})

    def _start_leader_election(self) -> None:
        """With ``--leader-election``, the leader-only workers run only in the terms this replica
        holds the Lease (see ``broker.leadership``); ``broker_leader`` says whether they run here."""
        self.metrics.add_collector(metrics.LeaderCollector(self._leadership))
        election = self.settings.leader_election
        if not election.enabled:
            return
        if self.cluster is None:
            raise ValueError(
                "--leader-election needs a cluster to hold its Lease in "
                "(--kubeconfig, --sandbox or in-cluster)"
            )
        self.leader_only.elect(
            lease.LeaderElector(
                client=self.cluster.client,
                namespace=election.resolved_namespace(),
                name=election.lease_name,
                identity=election.resolved_identity(),
                timing=election.timing(),
            )
        )

    def _leadership(self) -> tuple[bool, dict[str, int]]:
        elector = self.leader_only.elector
        return self.leader_only.running, dict(elector.transitions) if elector else {}

    def _operation_finished(self, deployment_id: str) -> None:
        if self.dispatcher is not None:
            self.dispatcher.kick()
        if self.detector is not None:
            self.detector.notify(deployment_id)

    def _scrape(self) -> dict[str, Any]:
        informers = {}
        if self.cluster is not None:
            informers = {k: (i.reconnects, i.relists) for k, i in self.cluster.informers.items()}
        dispatcher = self.dispatcher
        return {
            "informers": informers,
            "callbacks": (dispatcher.delivered, dispatcher.failed) if dispatcher else (0, 0),
            "subscribers": len(self.hub),
            "http_connections": (self.http_connections.open, dict(self.http_connections.refused)),
            "open_drifts": self.detector.open_drifts() if self.detector else {},
            "namespace_costs": self.detector.costs.totals() if self.detector and self.detector.costs else {},
            "budgets": {
                ns: b.monthly
                for ns in self.budgets.current.namespaces()
                if (b := self.budgets.current.budget_for(ns)).monthly is not None
            },
        }

    async def _refresh_policies(self) -> None:
        """Read the stored policies and cost budgets again whenever a replica set one (PostgreSQL's
        notification), and every ``resync_interval`` in case a notification was lost: a policy or
        budget set through any replica is in force on the leader's detector and in every replica's
        reads."""
        wake = workers.Wakeup()
        self.store.policy_listeners.append(wake.set)

        async def refresh() -> None:
            with contextlib.suppress(errors.BrokerError):
                if self.policies.replace(await self.store.policies()) and self.detector is not None:
                    self.detector.resync_now()
                # Cost budgets set through another replica, likewise (each change is judged anew).
                stored, known = await self.store.budgets(), self.budgets.current.stored
                for namespace in sorted(stored.keys() | known.keys()):
                    if stored.get(namespace) != known.get(namespace):
                        self.budgets.set(namespace, stored.get(namespace))

        await workers.run_forever(refresh, interval=self.settings.resync_interval, wake=wake)

    async def _prune_events(self) -> None:
        """Keep the event log to ``event_retention`` entries (resumes older than that get OUT_OF_RANGE),
        idempotency keys and decided remediations for ``request_id_retention`` and delivered
        callbacks for ``delivered_callback_retention``: nothing the broker keeps grows without bound."""

        async def prune() -> None:
            with contextlib.suppress(errors.BrokerError):
                pruned = await self.store.prune_events(keep=self.settings.event_retention)
                now = datetime.datetime.now(datetime.UTC)
                keys_before = now - datetime.timedelta(seconds=self.settings.request_id_retention)
                keys, deliveries = await self.store.prune_history(
                    keys_before=keys_before,
                    deliveries_before=now
                    - datetime.timedelta(seconds=self.settings.delivered_callback_retention),
                )
                # Decided proposals go with the request ids that could replay their decisions.
                remediations = await self.store.prune_remediations(decided_before=keys_before)
                if pruned or keys or deliveries or remediations:
                    log.info(
                        "pruned the event log, request ids, delivered callbacks and decided remediations",
                        extra={
                            "events": pruned,
                            "request_ids": keys,
                            "deliveries": deliveries,
                            "remediations": remediations,
                        },
                    )

        await workers.run_forever(prune, interval=self.settings.event_prune_interval)

    async def _not_ready_reason(self) -> str | None:
        if self.supervisor.failure is not None:
            return f"background worker {self.supervisor.failure[0]} failed; the broker is stopping"
        if self._draining:
            return "shutting down"
        try:
            await self.store.ping()
        except errors.BrokerError as e:
            return e.message
        if self.cluster is not None:
            return self.cluster.not_synced_reason()
        return None

    async def stop(self, *, accept_for: float = 0.0) -> None:
        """Drain and stop; safe to call twice.

        ``accept_for`` seconds of serving new calls come first (health already NOT_SERVING): load
        balancers take a moment to stop sending, and calls sent just before SIGTERM still arrive.
        """
        self._draining = True
        await self._health.enter_graceful_shutdown()
        # Streams end first, each with a resumable status naming its last sequence.
        self.hub.close_all()
        if self._grpc is not None:
            # New calls are refused (UNAVAILABLE) and accepted ones finish before the server stops:
            # stopping it at once would cancel calls it had received but not yet started.
            if accept_for > 0:
                await asyncio.sleep(accept_for)
            self._drain.start()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.settings.shutdown_grace
            await self._drain.wait_idle(self.settings.shutdown_grace)
            await self._grpc.stop(max(0.0, deadline - loop.time()))
            self._grpc = None
        if self._http is not None:
            await self._http.cleanup()
            self._http = None
        await self.supervisor.stop()
        if self.remediator is not None:
            await self.remediator.stop()
        if self._cluster is not None:
            await self._cluster.state.stop()
            self._cluster = None
        if self._sandbox is not None:
            await self._sandbox.stop()
            self._sandbox = None
        if self._store is not None:
            await self._store.close()
            self._store = None
        log.info("broker stopped")


def load_sandbox() -> Any:
    """The sandbox distribution, imported only when asked for (it is not part of the broker)."""
    try:
        import kube_sandbox
    except ImportError as e:
        raise errors.FailedPrecondition(
            "the sandbox cluster is a distribution of its own and is not installed: "
            "pip install ./sandbox (from the broker's source tree) or pip install kube-sandbox; "
            "./dev.sh run installs it",
            reason="SANDBOX_NOT_INSTALLED",
        ) from e
    return kube_sandbox


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


async def run(settings: Settings) -> None:
    """Run a broker until SIGTERM or SIGINT, then shut it down gracefully."""
    broker = Broker(settings, freeze_heap=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await broker.start()
    try:
        stopped, failed = asyncio.create_task(stop.wait()), asyncio.create_task(broker.failed.wait())
        await asyncio.wait((stopped, failed), return_when=asyncio.FIRST_COMPLETED)
        await workers.cancel_and_wait((stopped, failed))
        log.info("shutdown requested; draining" if stop.is_set() else "a background worker failed; stopping")
    finally:
        await broker.stop(accept_for=0.0 if broker.failed.is_set() else settings.drain_accept)
    if broker.supervisor.failure is not None:
        name, exc = broker.supervisor.failure
        # Non-zero exit: Kubernetes restarts the pod (see broker.workers on why not in place).
        raise errors.Unavailable(f"background worker {name} failed: {type(exc).__name__}: {exc}")

"""The :class:`Sandbox`: store, API server, simulator and faults started and stopped as one."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import os
import pathlib
import ssl
from types import TracebackType
from typing import Any

from aiohttp import web

from kube_sandbox import (
    admission,
    certificates,
    controllers,
    errors,
    faults,
    kubeconfig,
    persistence,
    profiles,
    resources,
    server,
    store,
)
from kube_sandbox import users as users_module

log = logging.getLogger(__name__)


class Sandbox:
    """An in-memory Kubernetes API server on loopback plus simulated controllers.

    ``ready_delay`` is how long a pod takes from creation to Running and Ready; ``crash_interval``
    how often a crash-looping container restarts; ``watch_window`` how many events watches can
    resume across before ``410 Gone``, and ``watch_window_bytes`` how many bytes of serialized
    objects those events may hold (whichever is reached first); ``watch_queue_size`` how many
    undelivered events a watcher may hold before it is cut off; ``event_limit`` how many
    Kubernetes Events a namespace keeps (the least recently written go first);
    ``bookmark_interval`` how often idle watches that allow bookmarks get one;
    ``image_resolution`` maps spec images to what containers report running: by default none, so
    ``status.containerStatuses[].image`` is the spec's image as kubelet reports it; a mapping (say
    :data:`kube_sandbox.faults.DEFAULT_IMAGE_RESOLUTION`) simulates a runtime that reports its own
    spelling (a resolved tag, a digest); ``simulate=False``
    serves the API without any simulation (nothing creates pods).

    ``state_dir`` keeps the objects across restarts (see :mod:`kube_sandbox.persistence`):
    restored at :meth:`start`, saved ``save_interval`` seconds after changes and at :meth:`stop`.
    Without it (the default) the state lives in memory only. ``profile`` names the objects a
    fresh sandbox starts with (see :mod:`kube_sandbox.profiles`).

    ``users`` are the identities it knows (see :mod:`kube_sandbox.users`), by default an
    administrator (the default user and current context) and the person ``jane``; ``extra_users``
    adds more (a controller's service account, say) to the default ones. ValidatingAdmissionPolicies
    are enforced (see :mod:`kube_sandbox.admission`); :attr:`audit` holds what they audited.
    ``tls=True`` serves HTTPS with a certificate made at start (see :mod:`kube_sandbox.certificates`):
    kubectl sends a context's token only over TLS, so only then do its contexts act as different
    users (over plain HTTP every kubectl request is the default user's).
    """

    def __init__(
        self,
        *,
        ready_delay: float = 0.2,
        crash_interval: float = 1.0,
        image_resolution: dict[str, str] | None = None,
        watch_window: int = 10_000,
        watch_window_bytes: int = 32 * 1024 * 1024,
        watch_queue_size: int = 10_000,
        event_limit: int = 1_000,
        bookmark_interval: float = 60.0,
        simulate: bool = True,
        seed: int = 0,
        state_dir: str | os.PathLike[str] | None = None,
        save_interval: float = 1.0,
        profile: profiles.Profile = profiles.EMPTY,
        users: tuple[users_module.User, ...] | None = None,
        extra_users: tuple[users_module.User, ...] = (),
        tls: bool = False,
    ) -> None:
        self.certificate = certificates.issue() if tls else None
        self.profile = profile
        self.users = users_module.Users(
            (*(users_module.DEFAULT_USERS if users is None else users), *extra_users)
        )
        self.store = store.Store(
            registry=resources.Registry(),
            watch_window=watch_window,
            watch_window_bytes=watch_window_bytes,
            watch_queue_size=watch_queue_size,
            event_limit=event_limit,
        )
        self.persistence = (
            persistence.Persistence(state_dir, interval=save_interval) if state_dir is not None else None
        )
        self.restored: persistence.Restored | None = None
        self.faults = faults.Faults(image_resolution=image_resolution or {}, seed=seed)
        self.ready_delay = ready_delay
        self.crash_interval = crash_interval
        self.bookmark_interval = bookmark_interval
        self.simulate = simulate
        self._api = server.ApiServer(
            st=self.store,
            metrics=lambda namespace, name: controllers.pod_metrics(self.store, self.faults, namespace, name),
            bookmark_interval=bookmark_interval,
            before_request=self.faults.check_request,
            fault_routes=self.faults.add_routes,
            identities=self.users,
            admission_plugin=admission.Admission(self.store),
        )
        self._runner: web.AppRunner | None = None
        self._listener: asyncio.AbstractServer | None = None
        self._controllers: list[controllers.Runner] = []
        self._kubelet: controllers.Kubelet | None = None
        self.host = ""
        self.port = 0
        self.faults.on_drop_watches = lambda: self.store.close_watchers(reason="dropped by fault injection")
        self.faults.on_expire_watches = self._expire_watches
        self.faults.on_pod_fault = self._pod_fault
        self.faults.on_pause = self._pause
        self.faults.on_resume = self._resume

    @property
    def url(self) -> str:
        """The API server's base URL (``http://127.0.0.1:PORT``)."""
        if not self.port:
            raise RuntimeError("the sandbox is not started")
        scheme = "https" if self.certificate is not None else "http"
        return f"{scheme}://{self.host}:{self.port}"

    def client_ssl_context(self) -> ssl.SSLContext | None:
        """A TLS context trusting this sandbox, for in-process clients (None when it serves HTTP)."""
        return self.certificate.client_context() if self.certificate is not None else None

    @property
    def audit(self) -> admission.AuditLog:
        """Audit events of requests that policies annotated (``validationActions: Audit``)."""
        assert self._api.admission is not None
        return self._api.admission.audit

    @property
    def paused(self) -> bool:
        """Whether the listening socket is closed by a pause fault."""
        return self._runner is not None and self._listener is None

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Start serving on ``host:port`` (port 0 picks a free one) and start the simulator."""
        if self._runner is not None:
            raise RuntimeError("the sandbox is already started")
        if self.persistence is not None:
            # Before anything serves or simulates: clients must never see the state before the restore.
            self.restored = await self.persistence.open(self.store)
            log.log(logging.INFO if self.restored.clean else logging.WARNING, self.restored.describe())
        self._apply_profile()
        try:
            self._runner = web.AppRunner(self._api.application(), handler_cancellation=True, access_log=None)
            await self._runner.setup()
            self.host = host
            await self._listen(port)
        except BaseException:
            await self.stop()
            raise
        if self.simulate:
            self._kubelet = controllers.Kubelet(
                self.store,
                fault_state=self.faults,
                ready_delay=self.ready_delay,
                crash_interval=self.crash_interval,
            )
            self._controllers = [
                controllers.GarbageCollector(self.store),
                controllers.StatefulSetController(self.store),
                controllers.KafkaTopicController(self.store),
                self._kubelet,
            ]
            for runner in self._controllers:
                runner.start()

    def _apply_profile(self) -> None:
        """Create the profile's objects that do not exist yet (a restored state keeps its own)."""
        for obj in self.profile.objects:
            rt = self.store.registry.by_kind(api_version=obj["apiVersion"], kind=obj["kind"])
            if rt is None:
                raise ValueError(
                    f"profile {self.profile.name}: {obj['kind']} is not a kind the sandbox serves"
                )
            meta = obj["metadata"]
            with contextlib.suppress(errors.AlreadyExists):
                self.store.create(rt, copy.deepcopy(obj), manager=f"kube-sandbox-profile-{self.profile.name}")
                log.info("profile %s: created %s %s", self.profile.name, obj["kind"], meta.get("name"))

    async def _listen(self, port: int) -> None:
        assert self._runner is not None
        assert self._runner.server is not None
        loop = asyncio.get_running_loop()
        context = self.certificate.server_context() if self.certificate is not None else None
        self._listener = await loop.create_server(
            self._runner.server, self.host, port, reuse_address=True, ssl=context
        )
        self.port = self._listener.sockets[0].getsockname()[1]
        self._api.address = f"{self.host}:{self.port}"

    async def stop(self) -> None:
        """Stop the simulator and the server, closing every connection."""
        for runner in self._controllers:
            await runner.stop()
        self._controllers = []
        self.store.close_watchers(reason="the sandbox is stopping")
        await self._close_listener()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self.persistence is not None:
            # Last, when neither clients nor the simulator can write any more: the clean snapshot.
            await self.persistence.close()

    async def _close_listener(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._runner is not None and self._runner.server is not None:
            for handler in self._runner.server.connections:
                handler.force_close()

    async def _pause(self) -> None:
        self.store.close_watchers(reason="the API is paused")
        await self._close_listener()
        log.warning("sandbox API paused: %s refuses connections", self._api.address)

    async def _resume(self) -> None:
        if self._listener is None and self._runner is not None:
            await self._listen(self.port)
            log.warning("sandbox API resumed on %s", self._api.address)

    def _expire_watches(self, count: int) -> None:
        self._api.forced_gone = max(0, count)

    def _pod_fault(self, key: tuple[str, str]) -> None:
        if self._kubelet is not None:
            self._kubelet.sync(key)

    def write_kubeconfig(self, path: str | os.PathLike[str], *, namespace: str = "default") -> pathlib.Path:
        """Write a kubeconfig for this sandbox, a context per user (current: the default user's)."""
        return kubeconfig.write(
            path,
            server=self.url,
            namespace=namespace,
            users=self.users.all,
            certificate_authority=self.certificate.ca_pem if self.certificate is not None else None,
        )

    def load(self, *, api_version: str, kind: str, objects: list[dict[str, Any]]) -> int:
        """Bulk-create objects of one kind in-process (setup for benchmarks and demos)."""
        rt = self.store.registry.by_kind(api_version=api_version, kind=kind)
        if rt is None:
            raise ValueError(f"unknown kind {kind} in {api_version}")
        return self.store.bulk_load(rt, objects)

    async def __aenter__(self) -> Sandbox:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


def state_dir_of(data_dir: str | os.PathLike[str]) -> pathlib.Path:
    """Where a sandbox started for a data directory keeps its state: ``<data_dir>/sandbox``."""
    return pathlib.Path(data_dir) / "sandbox"


async def run_standalone(
    *, host: str, port: int, data_dir: str | os.PathLike[str], profile: profiles.Profile = profiles.EMPTY
) -> None:
    """Run a sandbox until cancelled, with a kubeconfig at ``<data_dir>/sandbox.kubeconfig``.

    Its objects are kept in ``<data_dir>/sandbox/state.json`` across runs.
    """
    sandbox = Sandbox(state_dir=state_dir_of(data_dir), profile=profile)
    await sandbox.start(host=host, port=port)
    path = sandbox.write_kubeconfig(pathlib.Path(data_dir) / "sandbox.kubeconfig")
    banner = "THIS IS A SIMULATED KUBERNETES SANDBOX, NOT A CLUSTER: nothing runs."
    log.warning(banner)
    log.warning("sandbox API server: %s", sandbox.url)
    log.warning("kubeconfig: %s (kubectl --kubeconfig %s get pods)", path, path)
    print(banner, flush=True)
    if sandbox.restored is not None:
        print(sandbox.restored.describe(), flush=True)
    print(f"sandbox API server: {sandbox.url}", flush=True)
    print(f"kubeconfig: {path}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        with contextlib.suppress(Exception):
            await sandbox.stop()

"""The provisioning worker: carries accepted operations out against the cluster.

Provision answers at once; this worker picks the operation up (at start-up too, so a restart in
the middle resumes the work: applying is idempotent), applies the objects, waits until the workload
is ready, then records the outcome, its event and the manager's callback in one transaction. A
workload not ready within ``ready_timeout`` fails with the reason the cluster shows. A newer
operation on the same deployment supersedes an older one still in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable
from typing import Any

from broker import errors, workers
from broker.domain import catalog as catalog_mod
from broker.domain import drift, model, naming
from broker.kube import manifests, observer
from broker.store import port

log = logging.getLogger(__name__)


def ready_problem(
    deployment: model.Deployment, obs: drift.Observation, catalog: catalog_mod.Catalog
) -> str | None:
    """Why the workload is not ready yet, or None when it serves the desired generation."""
    if not obs.readable:
        return "the cluster cannot be read"
    if deployment.resource_type is model.ResourceType.TOPIC:
        if obs.topic is None:
            return "the KafkaTopic does not exist yet"
        return None if obs.topic.ready else "the KafkaTopic is not Ready"
    if obs.workload is None:
        return "the StatefulSet does not exist yet"
    if not obs.service_present or not obs.secret_present:
        return "the Service or Secret does not exist yet"
    want = deployment.desired_spec.replicas or 1
    image = manifests.image_for(deployment, catalog)
    if obs.workload.image != image:
        return f"the StatefulSet does not run {image} yet"
    ready = [p for p in obs.pods if p.ready]
    if len(ready) < want or len(obs.pods) != want:
        waiting = sorted({p.waiting_reason for p in obs.pods if p.waiting_reason})
        detail = f" (pods waiting: {', '.join(waiting)})" if waiting else ""
        return f"{len(ready)}/{want} replicas ready{detail}"
    return None


def _unfinished(deployment: model.Deployment) -> bool:
    return deployment.last_operation.state in (
        model.OperationState.ACCEPTED,
        model.OperationState.IN_PROGRESS,
    )


class Provisioner:
    """Runs operations until cancelled; ``kick`` wakes it for new work, ``notify`` for cluster changes."""

    def __init__(
        self,
        *,
        store: port.ProvisionerStore,
        cluster: observer.ClusterState,
        catalog: catalog_mod.Catalog,
        ready_timeout: float = 300.0,
        poll_interval: float = 2.0,
        sweep_interval: float = 30.0,
        on_finished: Callable[[str], None] = lambda deployment_id: None,
    ) -> None:
        self._on_finished = on_finished
        self._store = store
        self._cluster = cluster
        self._catalog = catalog
        self._ready_timeout = ready_timeout
        self._poll_interval = poll_interval
        self._sweep_interval = sweep_interval
        self._wake = workers.Wakeup()
        self._kicked: set[str] = set()
        self._in_flight: dict[str, asyncio.Task[None]] = {}
        self._changed: dict[str, asyncio.Event] = {}
        # Deployments under way here for which new work was accepted since (``kick``).
        self._superseding: set[str] = set()
        self._running = False

    def kick(self, deployment_id: str) -> None:
        """New work was accepted for a deployment (here or, on PostgreSQL, by any replica)."""
        # A replica that does not lead hears of every deployment's work and must not keep it:
        # when it starts leading, the first pick-up reads every unfinished operation anyway.
        if self._running:
            self._kicked.add(deployment_id)
            self._wake.set()
            if (waiting := self._changed.get(deployment_id)) is not None:
                # An operation of it is under way here: it may be superseded, and reads its row now.
                self._superseding.add(deployment_id)
                waiting.set()

    def notify(self, deployment_id: str) -> None:
        """An object of the deployment changed in the cluster."""
        event = self._changed.get(deployment_id)
        if event is not None:
            event.set()

    def busy(self, deployment_id: str) -> bool:
        """Whether an operation of the deployment is being carried out here (its objects are ours)."""
        return deployment_id in self._changed

    def listed(self) -> None:
        """The caches were listed (or stopped being readable): every operation waiting looks again."""
        for event in self._changed.values():
            event.set()

    async def run(self) -> None:
        """Pick up unfinished operations forever (including those left by a previous process)."""
        loop = asyncio.get_running_loop()
        next_sweep = 0.0

        async def pick_up() -> None:
            nonlocal next_sweep
            try:
                # Kicks name their deployment; the full sweep (at start, to resume what a previous
                # process left, and now and then as a safety net) reads every unfinished one.
                if loop.time() >= next_sweep:
                    self._kicked.clear()
                    pending = await self._store.unfinished()
                    next_sweep = loop.time() + self._sweep_interval
                else:
                    kicked, self._kicked = self._kicked, set()
                    found = [await self._store.deployment_by_id(k) for k in sorted(kicked)]
                    pending = [d for d in found if d is not None and _unfinished(d)]
            except errors.BrokerError as e:
                log.warning("cannot read pending operations", extra={"error": e.message})
                return
            for deployment in pending:
                key = deployment.deployment_id
                task = self._in_flight.get(key)
                if task is None or task.done():  # done: its last act may have been to kick again
                    task = asyncio.create_task(self._carry_out(deployment), name=f"op-{key}")
                    self._in_flight[key] = task
                    task.add_done_callback(functools.partial(self._let_go, key))

        self._running = True
        try:
            await workers.run_forever(pick_up, interval=self._poll_interval, wake=self._wake)
        finally:
            self._running = False
            self._kicked.clear()
            await workers.cancel_and_wait(self._in_flight.values())

    def _let_go(self, key: str, task: asyncio.Task[None]) -> None:
        """A finished operation's task (and its coroutine) is dropped: kept, every deployment ever
        provisioned here held one for the life of the process."""
        if self._in_flight.get(key) is task:
            del self._in_flight[key]

    async def _carry_out(self, deployment: model.Deployment) -> None:
        started = await self._store.start_operation(deployment)
        if started is None:
            return
        op = started.last_operation
        extra = {
            "deployment_id": started.deployment_id,
            "operation": op.type.value,
            "generation": op.generation,
        }
        log.info("operation started", extra=extra)
        changed = self._changed.setdefault(started.deployment_id, asyncio.Event())
        superseded = False
        try:
            if op.type is model.OperationType.DEPROVISION:
                await self._deprovision(started, changed)
            else:
                superseded = await self._provision(started, changed)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("operation crashed; it will be retried", extra=extra)
            await asyncio.sleep(self._poll_interval)
            self.kick(started.deployment_id)
        finally:
            self._changed.pop(started.deployment_id, None)
            self._superseding.discard(started.deployment_id)
        if superseded:
            self.kick(started.deployment_id)  # the newer operation, now that this one gave way

    async def _wait(self, changed: asyncio.Event, deadline: float) -> bool:
        """Wait for a change or a poll interval; False once the deadline has passed."""
        loop = asyncio.get_running_loop()
        remaining = deadline - loop.time()
        if remaining <= 0:
            return False
        changed.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(min(self._poll_interval, remaining)):
                await changed.wait()
        return True

    async def _provision(self, deployment: model.Deployment, changed: asyncio.Event) -> bool:
        """Apply the objects and wait for them to be ready; True when a newer operation took over."""
        deadline = asyncio.get_running_loop().time() + self._ready_timeout
        problem: str | None = "not applied yet"
        while True:
            try:
                await self._cluster.apply(deployment)
                break
            except errors.FailedPrecondition as e:
                # The cluster rejects the objects (missing namespace, invalid): a permanent failure.
                await self._finish(deployment, succeeded=False, message=e.message)
                return False
            except errors.BrokerError as e:
                if e.message != problem:
                    # Say why once per reason, where people look: the logs, GetDeployment, the state.
                    log.warning(
                        "cannot apply yet; retrying",
                        extra={"deployment_id": deployment.deployment_id, "reason": e.message},
                    )
                    with contextlib.suppress(errors.BrokerError):
                        await self._store.note_progress(deployment, f"retrying: {e.message}")
                problem = e.message
                if not await self._wait(changed, deadline):
                    await self._finish(deployment, succeeded=False, message=f"could not apply: {problem}")
                    return False
        loop = asyncio.get_running_loop()
        read_at = loop.time()
        while True:
            problem = ready_problem(deployment, self._cluster.observe(deployment), self._catalog)
            if problem is None:
                await self._finish(deployment, succeeded=True, message=_ready_message(deployment))
                return False
            if not await self._wait(changed, deadline):
                await self._finish(
                    deployment,
                    succeeded=False,
                    message=f"not ready after {self._ready_timeout:g}s: {problem}",
                )
                return False
            # Superseded by a newer operation? Its row says, read when new work was accepted for
            # it (``kick``) and once per poll interval: not at each of its objects' many changes.
            if deployment.deployment_id in self._superseding or loop.time() - read_at >= self._poll_interval:
                self._superseding.discard(deployment.deployment_id)
                read_at = loop.time()
                current = await self._store.deployment_by_id(deployment.deployment_id)
                if (
                    current is None
                    or current.last_operation.operation_id != deployment.last_operation.operation_id
                ):
                    return True  # superseded by a newer operation

    async def _deprovision(self, deployment: model.Deployment, changed: asyncio.Event) -> None:
        deadline = asyncio.get_running_loop().time() + self._ready_timeout
        while True:
            try:
                await self._cluster.delete(deployment, deployment.data_policy)
                if self._cluster.synced and self._cluster.gone(deployment):
                    await self._finish(deployment, succeeded=True, message="deleted")
                    return
            except errors.BrokerError as e:
                log.warning(
                    "deprovision retrying",
                    extra={"deployment_id": deployment.deployment_id, "error": e.message},
                )
            if not await self._wait(changed, deadline):
                deadline = asyncio.get_running_loop().time() + self._ready_timeout

    async def _finish(self, deployment: model.Deployment, *, succeeded: bool, message: str) -> None:
        op = deployment.last_operation
        if op.type is model.OperationType.DEPROVISION:
            kind = model.EventKind.DEPROVISIONED
        else:
            kind = (
                model.EventKind.PROVISIONING_SUCCEEDED if succeeded else model.EventKind.PROVISIONING_FAILED
            )
        obs = self._cluster.observe(deployment)
        health = drift.health(deployment, obs) if op.type is not model.OperationType.DEPROVISION else None
        event = model.DriftEvent.about(deployment, kind, message, health=health)
        callback = None
        if deployment.callback_url and op.type is not model.OperationType.DEPROVISION:
            callback = (
                deployment.callback_url,
                self.callback_payload(deployment, succeeded=succeeded, message=message),
            )
        recorded = await self._store.finish_operation(
            deployment, succeeded=succeeded, message=message, event=event, callback=callback
        )
        if recorded:
            self._on_finished(deployment.deployment_id)
        log.info(
            "operation finished" if recorded else "operation superseded",
            extra={"deployment_id": deployment.deployment_id, "succeeded": succeeded, "detail": message},
        )

    def callback_payload(
        self, deployment: model.Deployment, *, succeeded: bool, message: str
    ) -> dict[str, Any]:
        """What the manager's callback receives (connection details by name, never credentials)."""
        engine = deployment.desired_spec.engine
        return {
            "deploymentId": deployment.deployment_id,
            "status": "Ready" if succeeded else "Failed",
            "message": message,
            "namespace": deployment.namespace,
            "resourceType": deployment.resource_type.value,
            "resourceName": deployment.resource_name,
            "generation": deployment.generation,
            "endpoint": naming.endpoint(
                deployment.resource_type, deployment.namespace, deployment.resource_name
            ),
            "port": naming.port(self._catalog, deployment.resource_type, engine),
            "connectionSecret": naming.secret_name(deployment.resource_type, deployment.resource_name),
        }


def _ready_message(deployment: model.Deployment) -> str:
    kind = {"database": "Database", "cache": "Cache", "topic": "Topic"}[deployment.resource_type.value]
    return f"{kind} is running and healthy"

"""Leader election with a ``coordination.k8s.io/v1`` Lease, with client-go's semantics.

Several replicas campaign for one Lease; the one that holds it runs the work that must happen once
(``run(lead)``). What is kept from client-go's ``tools/leaderelection``:

- **Acquire** when the Lease is absent (create it), released (empty ``holderIdentity``), held by
  this identity already (a restarted pod with the same name), or expired. A candidate writes only
  with the ``resourceVersion`` it read (PUT), so of two candidates that saw the same expired record
  one wins and the other gets 409 and reads again.
- **Expired is judged by the local clock.** The ``renewTime`` in the record comes from another
  machine's clock and is never compared with ours: a candidate notes *when it saw the record
  change* (``observed_at``, monotonic) and treats the lease as expired once that record has stayed
  the same for ``leaseDurationSeconds``. Clock skew between replicas does not matter, only their
  clock rates, which the margin between renew deadline and lease duration absorbs.
- **Renew** every ``retry_period`` while leading: first optimistically with the last object seen,
  then, on any failure, by reading the record again. ``acquireTime`` is kept while the holder stays
  the same, and ``leaseTransitions`` goes up by one whenever the holder changes. Times are written as
  ``metav1.MicroTime`` (``2006-01-02T15:04:05.000000Z``).
- **Stop at the renew deadline.** A leader that could not renew for ``renew_deadline`` seconds
  stops its leader-only work: the work is cancelled and awaited, then ``on_stopped_leading`` is
  called, at the deadline even if a request is still hanging (it is cancelled). The deadline counts
  from the moment the last successful renewal was *sent*; any other replica saw that renewal no
  earlier than that and waits a full lease duration after it, so with ``renew_deadline <
  lease_duration`` the work stops before anyone else can take the lease. (client-go starts its
  deadline when a renewal round begins, up to a retry period after the last success; counting from
  the success itself stops sooner and keeps the whole margin.) A leader that reads the record and
  finds another holder stops at once.
- **Retry at expiry.** A candidate retries every retry period with client-go's jitter, except that
  when it saw another holder's record it also wakes when that record expires by its clock, if that
  comes first. client-go only looks at its next jittered retry, up to ``2.2 * retry_period`` later
  (4.4 s by default); whoever tries first still needs the record unchanged for a whole lease
  duration, so this shortens a takeover after a crash without shortening anyone's lease.
- **Release on a clean stop** (``ReleaseOnCancel``): cancelling ``run`` stops the work first, then
  writes the record with an empty holder and ``leaseDurationSeconds: 1``, so another replica takes
  over at its next retry instead of after a lease duration.

Unlike client-go's ``Run``, which returns after leadership is lost (the process is expected to
exit), ``run`` campaigns again: losing the lease is not a failure of the replica.

Timing defaults are client-go's (15 s, 10 s, 2 s); the lease duration is a whole number of seconds
because the Lease stores it as one. Talks to the API through ``broker.kube.client`` only.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import enum
import logging
import os
import pathlib
import random
import socket
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

from broker import errors, workers
from broker.kube import client as kube_client

log = logging.getLogger(__name__)

JITTER_FACTOR = 1.2
"""Retries to acquire wait ``retry_period * (1 + random() * JITTER_FACTOR)``, as in client-go."""

EXPIRY_MARGIN = 0.01
"""A candidate that saw another's lease retries this long after it expires, if that comes before its
next jittered retry (see :meth:`LeaderElector._acquire`)."""

SERVICE_ACCOUNT_NAMESPACE = pathlib.Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


@dataclasses.dataclass(frozen=True)
class Timing:
    """How long a lease lasts, how long a leader keeps trying to renew it, how often anyone tries."""

    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0

    def __post_init__(self) -> None:
        if self.lease_duration < 1 or self.lease_duration != int(self.lease_duration):
            raise ValueError(
                "the leader election lease duration must be a whole number of seconds, at least 1 "
                f"(a Lease stores leaseDurationSeconds as an integer), not {self.lease_duration:g}"
            )
        if not 0 < self.renew_deadline < self.lease_duration:
            raise ValueError(
                f"the leader election renew deadline ({self.renew_deadline:g}s) must be shorter than the "
                f"lease duration ({self.lease_duration:g}s): a leader must stop before others may take over"
            )
        if not 0 < self.retry_period * JITTER_FACTOR < self.renew_deadline:
            raise ValueError(
                f"the leader election retry period ({self.retry_period:g}s) times {JITTER_FACTOR} must be "
                f"shorter than the renew deadline ({self.renew_deadline:g}s)"
            )


@dataclasses.dataclass(frozen=True)
class ElectionSettings:
    """The ``--leader-election*`` settings of ``broker serve`` (the ``leader_election`` group)."""

    enabled: bool = False
    namespace: str | None = None
    lease_name: str = "resource-broker"
    identity: str | None = None
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0

    def __post_init__(self) -> None:
        self.timing()  # refuse inconsistent durations at start-up, with the reason

    def timing(self) -> Timing:
        """The durations, checked."""
        return Timing(self.lease_duration, self.renew_deadline, self.retry_period)

    def resolved_identity(self, environ: Mapping[str, str] = os.environ) -> str:
        """The holder identity: the setting, else the pod's name (``POD_NAME``, ``HOSTNAME``).

        Outside a pod neither variable is usually exported; the host name with the process id is
        then unique on the machine, so two local replicas never share an identity.
        """
        for candidate in (self.identity, environ.get("POD_NAME"), environ.get("HOSTNAME")):
            if candidate:
                return candidate
        return f"{socket.gethostname()}_{os.getpid()}"

    def resolved_namespace(
        self,
        environ: Mapping[str, str] = os.environ,
        service_account: pathlib.Path = SERVICE_ACCOUNT_NAMESPACE,
    ) -> str:
        """The Lease's namespace: the setting, else ``POD_NAMESPACE``, else the pod's, else ``default``."""
        if self.namespace:
            return self.namespace
        if environ.get("POD_NAMESPACE"):
            return environ["POD_NAMESPACE"]
        with contextlib.suppress(OSError):
            namespace = service_account.read_text().strip()
            if namespace:
                return namespace
        return "default"


def micro_time(when: datetime.datetime | None = None) -> str:
    """``when`` (default now) as a ``metav1.MicroTime``: UTC, six fraction digits, ``Z``."""
    moment = when or datetime.datetime.now(datetime.UTC)
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclasses.dataclass(frozen=True)
class Record:
    """The leader election record a Lease's spec holds (client-go's ``LeaderElectionRecord``)."""

    holder: str = ""
    lease_duration_seconds: int = 0
    acquire_time: str | None = None
    renew_time: str | None = None
    transitions: int = 0

    @classmethod
    def of(cls, lease: kube_client.JsonDict) -> Record:
        """The record of a Lease object as the API returned it."""
        spec = lease.get("spec") or {}
        return cls(
            holder=str(spec.get("holderIdentity") or ""),
            lease_duration_seconds=int(spec.get("leaseDurationSeconds") or 0),
            acquire_time=spec.get("acquireTime"),
            renew_time=spec.get("renewTime"),
            transitions=int(spec.get("leaseTransitions") or 0),
        )

    def spec(self) -> kube_client.JsonDict:
        """The Lease spec that records this."""
        return {
            "holderIdentity": self.holder,
            "leaseDurationSeconds": self.lease_duration_seconds,
            "acquireTime": self.acquire_time,
            "renewTime": self.renew_time,
            "leaseTransitions": self.transitions,
        }


class Attempt(enum.Enum):
    """What one try to acquire or renew came to."""

    HELD = "held"  # this identity holds the lease now
    TAKEN = "taken"  # another holder's lease has not expired
    FAILED = "failed"  # the API refused or could not be reached: try again


Lead = Callable[[], Coroutine[Any, Any, None]]


def _no_callback(*_: object) -> None:
    return None


class LeaderElector:
    """Campaigns for one Lease and runs the leader-only work while it holds it.

    ``run(lead)`` never returns: it acquires, runs ``lead()`` while renewing, cancels it when the
    lease is lost (then campaigns again) and, cancelled itself, stops the work and releases the lease
    (``release_on_cancel``). ``lead`` must run until cancelled; if it raises or returns, ``run``
    releases the lease and raises :class:`LeaderWorkEnded`.

    Callbacks are plain functions, called on the event loop: ``on_started_leading()`` once the
    lease is held and before the work starts, ``on_stopped_leading(reason)`` once the work has
    stopped, ``on_new_leader(identity)`` whenever the observed holder changes ("" once released).
    """

    def __init__(
        self,
        *,
        client: kube_client.Client,
        namespace: str,
        name: str,
        identity: str,
        timing: Timing | None = None,
        release_on_cancel: bool = True,
        on_started_leading: Callable[[], None] = _no_callback,
        on_stopped_leading: Callable[[str], None] = _no_callback,
        on_new_leader: Callable[[str], None] = _no_callback,
    ) -> None:
        if not identity:
            raise ValueError("a leader election identity must not be empty")
        self._client = client
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.timing = timing or Timing()
        self.release_on_cancel = release_on_cancel
        self._on_started_leading = on_started_leading
        self._on_stopped_leading = on_stopped_leading
        self._on_new_leader = on_new_leader
        self._lease: kube_client.JsonDict | None = None  # the object last read or written
        self._observed: Record | None = None
        self._observed_at = 0.0  # loop time at which ``_observed`` was first seen
        self._reported_leader: str | None = None
        self._leading = False
        self._work: asyncio.Task[None] | None = None
        self._renewed_at: float | None = None
        self._last_problem = ""
        self.transitions: dict[str, int] = {"acquired": 0, "lost": 0, "released": 0}

    @property
    def is_leader(self) -> bool:
        """Whether this replica leads now: from acquiring the lease until its work has stopped."""
        return self._leading

    @property
    def leader(self) -> str:
        """The holder in the last record seen ("" when released or not seen yet)."""
        return self._observed.holder if self._observed else ""

    @property
    def renewed_at(self) -> float | None:
        """Loop time at which the last successful acquire or renewal of this term was sent.

        Nobody else can take the lease before ``renewed_at + lease_duration``; this replica stops
        leading at ``renewed_at + renew_deadline`` unless it renews again first.
        """
        return self._renewed_at

    @property
    def observed_at(self) -> float:
        """Loop time at which the last record seen was first seen (its expiry counts from there)."""
        return self._observed_at

    @property
    def record(self) -> Record | None:
        """The last record seen."""
        return self._observed

    def describe(self) -> str:
        """``namespace/name`` of the Lease."""
        return f"{self.namespace}/{self.name}"

    def _extra(self, **more: object) -> dict[str, object]:
        return {"identity": self.identity, "lease": self.describe(), **more}

    # ----- the loop --------------------------------------------------------------------------------

    async def run(self, lead: Lead | None = None) -> None:
        """Campaign, lead, lose, campaign again, until cancelled (see the class docstring)."""
        try:
            while True:
                renewed_at = await self._acquire()
                await self._lead(lead, renewed_at)
        finally:
            # Releasing while the work might still run would let another replica start it too.
            if self.release_on_cancel and (self._work is None or self._work.done()):
                await self._release()

    async def _acquire(self) -> float:
        """Try every retry period (jittered) until the lease is held; when the winning write was sent."""
        loop = asyncio.get_running_loop()
        log.info("campaigning for the leader lease", extra=self._extra())
        while True:
            sent = loop.time()
            attempt = await self._try_acquire_or_renew()
            if attempt is Attempt.HELD:
                return sent
            wait = self.timing.retry_period * (1 + random.random() * JITTER_FACTOR)  # noqa: S311
            observed = self._observed
            if attempt is Attempt.TAKEN and observed is not None:
                # Try again when the holder's record expires by our clock, if that comes first.
                expires = self._observed_at + observed.lease_duration_seconds
                wait = min(wait, max(0.0, expires - loop.time()) + EXPIRY_MARGIN)
            await asyncio.sleep(wait)

    async def _lead(self, lead: Lead | None, renewed_at: float) -> None:
        """One term: run the work while renewing; return once it has stopped after losing the lease."""
        self._leading = True
        self._renewed_at = renewed_at
        self.transitions["acquired"] += 1
        record = self._observed or Record()
        log.info(
            "became the leader",
            extra=self._extra(lease_transitions=record.transitions, acquire_time=record.acquire_time),
        )
        self._on_started_leading()
        work = self._work = asyncio.create_task((lead or _forever)(), name="leader-work")
        keeper = asyncio.create_task(self._keep(renewed_at), name="lease-renewal")
        reason = "shutting down"
        lost = False
        try:
            done, _ = await asyncio.wait((work, keeper), return_when=asyncio.FIRST_COMPLETED)
            if work in done:
                failure = None if work.cancelled() else work.exception()
                reason = "the leader-only work ended"
                raise LeaderWorkEnded(f"the leader-only work ended: {failure or 'it returned'}") from failure
            reason = keeper.result()
            lost = True
        finally:
            await workers.cancel_and_wait((keeper,))
            await _stop(work)
            self._leading = False
            if lost:
                self.transitions["lost"] += 1
            log.log(
                logging.WARNING if lost else logging.INFO, "stopped leading", extra=self._extra(reason=reason)
            )
            self._on_stopped_leading(reason)

    async def _keep(self, renewed_at: float) -> str:
        """Renew every retry period until the lease is lost; why it was lost."""
        loop = asyncio.get_running_loop()
        timing = self.timing
        while True:
            await asyncio.sleep(max(0.0, renewed_at + timing.retry_period - loop.time()))
            try:
                async with asyncio.timeout_at(renewed_at + timing.renew_deadline):
                    while True:
                        sent = loop.time()
                        attempt = await self._try_acquire_or_renew()
                        if attempt is Attempt.HELD:
                            renewed_at = self._renewed_at = sent
                            break
                        if attempt is Attempt.TAKEN:
                            return f"the lease is held by {self.leader}"
                        await asyncio.sleep(max(0.0, sent + timing.retry_period - loop.time()))
            except TimeoutError:
                return (
                    f"the lease could not be renewed within the renew deadline ({timing.renew_deadline:g}s)"
                )

    # ----- one attempt -----------------------------------------------------------------------------

    def _observe(self, lease: kube_client.JsonDict) -> Record:
        """Keep ``lease``; note the time when its record differs from the one seen before."""
        self._lease = lease
        record = Record.of(lease)
        if record != self._observed:
            self._observed = record
            self._observed_at = asyncio.get_running_loop().time()
        if record.holder != self._reported_leader:
            self._reported_leader = record.holder
            log.info("observed a new leader", extra=self._extra(leader=record.holder or "(released)"))
            self._on_new_leader(record.holder)
        return record

    def _valid(self, now: float) -> bool:
        """Whether the observed record has not stayed unchanged for its lease duration yet."""
        observed = self._observed
        return observed is not None and self._observed_at + observed.lease_duration_seconds > now

    def _problem(self, what: str, error: errors.BrokerError) -> None:
        # Every retry period while the API is away: say it once per distinct problem.
        text = f"{what}: {error.message}"
        if text != self._last_problem:
            self._last_problem = text
            log.warning("leader election: %s", text, extra=self._extra())

    async def _bounded(self, call: Coroutine[Any, Any, kube_client.JsonDict]) -> kube_client.JsonDict:
        """``call``, given up (Unavailable) after a renew deadline: no request may outlast one."""
        try:
            async with asyncio.timeout(self.timing.renew_deadline):
                return await call
        except TimeoutError as e:
            raise errors.Unavailable(
                f"the Kubernetes API did not answer within {self.timing.renew_deadline:g}s"
            ) from e

    async def _write(self, record: Record) -> None:
        """Replace the spec of the Lease last seen with ``record``, as of that object's version."""
        assert self._lease is not None
        metadata = {k: v for k, v in self._lease["metadata"].items() if k != "managedFields"}
        body = {**self._lease, "metadata": metadata, "spec": record.spec()}
        self._observe(await self._bounded(self._client.replace(body)))

    async def _try_acquire_or_renew(self) -> Attempt:
        """One try to acquire the lease, or renew it if held (client-go's ``tryAcquireOrRenew``)."""
        loop = asyncio.get_running_loop()
        now = micro_time()
        mine = Record(
            holder=self.identity,
            lease_duration_seconds=int(self.timing.lease_duration),
            acquire_time=now,
            renew_time=now,
        )
        observed = self._observed
        # 1. The holder renews optimistically from the object it wrote last.
        if observed is not None and observed.holder == self.identity and self._valid(loop.time()):
            try:
                await self._write(
                    dataclasses.replace(
                        mine, acquire_time=observed.acquire_time, transitions=observed.transitions
                    )
                )
            except errors.BrokerError:
                pass  # read the record again below
            else:
                self._last_problem = ""
                return Attempt.HELD
        # 2. Read the record, or create it.
        try:
            current = self._observe(await self._bounded(self._client.get("Lease", self.namespace, self.name)))
        except errors.NotFound:
            lease = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": dataclasses.replace(mine, transitions=0).spec(),
            }
            try:
                self._observe(await self._bounded(self._client.create(lease)))
            except errors.BrokerError as e:
                if not isinstance(e, kube_client.Conflict):  # created by another replica just now
                    self._problem("cannot create the lease", e)
                return Attempt.FAILED
            self._last_problem = ""
            return Attempt.HELD
        except errors.BrokerError as e:
            self._problem("cannot read the lease", e)
            return Attempt.FAILED
        # 3. Someone else's lease that has not expired by our clock: wait.
        if current.holder and current.holder != self.identity and self._valid(loop.time()):
            return Attempt.TAKEN
        # 4. Ours already (keep when it was acquired), released, or expired (one more transition).
        if current.holder == self.identity:
            mine = dataclasses.replace(
                mine, acquire_time=current.acquire_time, transitions=current.transitions
            )
        else:
            mine = dataclasses.replace(mine, transitions=current.transitions + 1)
        try:
            await self._write(mine)
        except errors.BrokerError as e:
            if not isinstance(e, kube_client.Conflict):
                self._problem("cannot update the lease", e)
            return Attempt.FAILED  # a conflict: another replica wrote first; read again next time
        self._last_problem = ""
        return Attempt.HELD

    async def _release(self) -> None:
        """Give the lease up if the record names this identity (client-go's ``release``)."""
        try:
            async with asyncio.timeout(self.timing.renew_deadline):
                while True:
                    self._lease = await self._client.get("Lease", self.namespace, self.name)
                    current = Record.of(self._lease)
                    if current.holder != self.identity:
                        return
                    now = micro_time()
                    released = Record(
                        lease_duration_seconds=1,
                        acquire_time=now,
                        renew_time=now,
                        transitions=current.transitions,
                    )
                    try:
                        await self._write(released)
                    except kube_client.Conflict:
                        continue  # a renewal cancelled in flight may have landed: read it and retry
                    break
        except errors.NotFound:
            return
        except (errors.BrokerError, TimeoutError) as e:
            message = e.message if isinstance(e, errors.BrokerError) else "timed out"
            log.warning(
                "could not release the leader lease; another replica takes over once it expires",
                extra=self._extra(error=message),
            )
            return
        self.transitions["released"] += 1
        log.info("released the leader lease", extra=self._extra())


class LeaderWorkEnded(RuntimeError):
    """The leader-only work raised or returned; it must run until leadership ends."""


async def _forever() -> None:
    await asyncio.Event().wait()


async def _stop(task: asyncio.Task[None]) -> None:
    """Cancel the work and wait until it has ended; its failure, if any, is the caller's to report.

    Waits even when cancelled meanwhile (and then raises CancelledError): work left running after
    the term ends would run beside the next leader's.
    """
    cancelled = False
    task.cancel()  # once: a second cancel would interrupt the work's own clean-up
    while not task.done():
        try:
            await asyncio.wait((task,))
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError

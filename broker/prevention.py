"""Keeps the drift-prevention admission policies applied while prevention is on.

``broker.domain.admission`` says what the policies are; this worker puts them in the cluster with
server-side apply under the broker's field manager, removes those of categories turned off, and
does it again when the remediation policy changes (a waived field, a namespace turned ``off``)
and every ``interval`` seconds, so that a policy deleted by hand comes back. A failure (no RBAC
for ``validatingadmissionpolicies``, the API away) is logged and retried; it never stops the broker,
which still detects and remediates what prevention would have stopped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from broker import errors, workers
from broker.domain import admission
from broker.domain import policy as policy_mod
from broker.kube import client as kube_client

log = logging.getLogger(__name__)


class Prevention:
    """Applies ``admission.objects`` for the current remediation policy."""

    def __init__(
        self,
        *,
        client: kube_client.Client,
        prevention: admission.Prevention,
        rules: Callable[[], policy_mod.Policy],
        interval: float,
        max_delay: float = 60.0,
    ) -> None:
        self._client = client
        self._prevention = prevention
        self._rules = rules
        self._interval = interval
        self._max_delay = max_delay
        self._wake = workers.Wakeup()
        self._failures = 0
        self.applied = 0
        """How many times every object was applied (tests and logs)."""

    def kick(self) -> None:
        """The remediation policy changed: apply again at once."""
        self._wake.set()

    async def apply_once(self) -> None:
        """Apply the policies and bindings, remove the retired ones; errors propagate."""
        objects = admission.objects(self._prevention, self._rules())
        for obj in objects:
            await self._client.apply(obj)
        for kind, name in admission.retired(self._prevention):
            await self._client.delete(kind, None, name)
        self.applied += 1
        log.info(
            "drift prevention applied",
            extra={"objects": [f"{o['kind']}/{o['metadata']['name']}" for o in objects]},
        )

    async def _step(self) -> float | None:
        try:
            await self.apply_once()
        except errors.BrokerError as e:
            self._failures += 1
            delay = min(self._max_delay, 2.0 ** min(self._failures, 6))
            log.error("cannot apply the drift-prevention policies; retrying in %.0fs: %s", delay, e.message)
            return delay
        self._failures = 0
        return None

    async def run(self) -> None:
        """Apply now, then on every change and every ``interval`` seconds."""
        await workers.run_forever(self._step, interval=self._interval, wake=self._wake)

"""Fault injection: make the sandbox misbehave the way real clusters do, on purpose.

Everything is reachable from Python (``sandbox.faults``) and over HTTP under ``/sandbox/v1/faults``
(JSON bodies), a prefix real Kubernetes never serves:

==========================================  ==========================================================
``GET    /sandbox/v1/faults``                the active faults
``DELETE /sandbox/v1/faults``                clear every fault (pods recover, errors stop)
``POST   /sandbox/v1/faults/crash-pod``      ``{"namespace", "name"}``: CrashLoopBackOff, rising restarts
``POST   /sandbox/v1/faults/fail-readiness`` ``{"namespace", "name"}``: running but never ready
``POST   /sandbox/v1/faults/heal-pod``       ``{"namespace", "name"}``: undo the two above
``POST   /sandbox/v1/faults/errors``         ``{"status": 500|429, "fraction", "durationSeconds",
                                             "count", "retryAfterSeconds", "pathPrefix"}``
``POST   /sandbox/v1/faults/drop-watches``   end every open watch now
``POST   /sandbox/v1/faults/expire-watches`` ``{"count"}``: the next N watches get ``410 Gone``
``POST   /sandbox/v1/faults/pause``          ``{"durationSeconds"}``: close the listening socket
``POST   /sandbox/v1/faults/image-resolution`` ``{"mapping": {"postgres:15": "postgres:15.2"}}``
==========================================  ==========================================================
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from kube_sandbox import errors

JsonDict = dict[str, Any]
PodKey = tuple[str, str]

DEFAULT_IMAGE_RESOLUTION: dict[str, str] = {
    "postgres:15": "postgres:15.2",
    "postgres:16": "postgres:16.4",
    "postgres:14": "postgres:14.13",
    "mysql:8.0": "mysql:8.0.36",
    "mysql:8.4": "mysql:8.4.2",
    "redis:7": "redis:7.2.4",
    "redis:7.2": "redis:7.2.4",
    "redis:6": "redis:6.2.14",
}
"""Floating tags and the concrete version a registry would serve for them today.

A fault, not the default: passed as ``image_resolution`` (or set with ``set_image_resolution``),
the sandbox reports these as the running image (``status.containerStatuses[].image``), as a
runtime that spells what it pulled its own way would; clients that read versions from the status
rather than the pod's spec see the difference.
"""


@dataclasses.dataclass(frozen=True)
class RequestErrors:
    """An active "answer with errors" fault."""

    status: int
    fraction: float
    until: float | None
    remaining: int | None
    retry_after: int
    path_prefix: str

    def describe(self) -> JsonDict:
        """The fault as JSON."""
        return {
            "status": self.status,
            "fraction": self.fraction,
            "secondsLeft": None if self.until is None else max(0.0, self.until - time.monotonic()),
            "count": self.remaining,
            "retryAfterSeconds": self.retry_after,
            "pathPrefix": self.path_prefix,
        }


class Faults:
    """The switchboard of injected faults; the sandbox wires its hooks at start."""

    def __init__(self, *, image_resolution: dict[str, str], seed: int = 0) -> None:
        self.image_resolution = dict(image_resolution)
        self.crashing: set[PodKey] = set()
        self.unready: set[PodKey] = set()
        self.request_errors: RequestErrors | None = None
        self._random = random.Random(seed)  # noqa: S311 - picks which requests fail, not secrets.
        self.on_pod_fault: Callable[[PodKey], None] = lambda key: None
        self.on_drop_watches: Callable[[], int] = lambda: 0
        self.on_expire_watches: Callable[[int], None] = lambda count: None
        self.on_pause: Callable[[], Awaitable[None]] | None = None
        self.on_resume: Callable[[], Awaitable[None]] | None = None
        self._resume_task: asyncio.Task[None] | None = None
        self._pause_task: asyncio.Task[None] | None = None

    # ----- pods ----------------------------------------------------------------------------------

    def crash_pod(self, *, namespace: str, name: str) -> None:
        """Put the pod's containers into CrashLoopBackOff (restartCount keeps rising, not ready)."""
        key = (namespace, name)
        self.crashing.add(key)
        self.unready.discard(key)
        self.on_pod_fault(key)

    def fail_readiness(self, *, namespace: str, name: str) -> None:
        """Keep the pod running but failing its readiness probe."""
        key = (namespace, name)
        self.unready.add(key)
        self.crashing.discard(key)
        self.on_pod_fault(key)

    def heal_pod(self, *, namespace: str, name: str) -> None:
        """Undo crash and readiness faults of one pod."""
        key = (namespace, name)
        self.crashing.discard(key)
        self.unready.discard(key)
        self.on_pod_fault(key)

    def resolve_image(self, image: str) -> str:
        """The image a container reports running for the image its spec asks for."""
        return self.image_resolution.get(image, image)

    def set_image_resolution(self, mapping: dict[str, str]) -> None:
        """Replace the tag resolution table (an empty mapping means identity)."""
        self.image_resolution = dict(mapping)

    # ----- API -----------------------------------------------------------------------------------

    def fail_requests(
        self,
        *,
        status: int = 500,
        fraction: float = 1.0,
        duration: float | None = None,
        count: int | None = None,
        retry_after: int = 1,
        path_prefix: str = "",
    ) -> None:
        """Answer a fraction of API requests with 500 or 429 (with Retry-After), for a while or N times."""
        if status not in (429, 500, 503):
            raise ValueError("status must be 429, 500 or 503")
        if not 0.0 <= fraction <= 1.0:
            raise ValueError("fraction must be within [0, 1]")
        self.request_errors = RequestErrors(
            status=status,
            fraction=fraction,
            until=None if duration is None else time.monotonic() + duration,
            remaining=count,
            retry_after=retry_after,
            path_prefix=path_prefix,
        )

    def check_request(self, request: web.Request) -> None:
        """Raise the injected error for this request, if a fault says so (called by the server)."""
        fault = self.request_errors
        if fault is None:
            return
        if fault.until is not None and time.monotonic() >= fault.until:
            self.request_errors = None
            return
        if fault.path_prefix and not request.path.startswith(fault.path_prefix):
            return
        if fault.fraction < 1.0 and self._random.random() >= fault.fraction:
            return
        if fault.remaining is not None:
            left = fault.remaining - 1
            self.request_errors = None if left <= 0 else dataclasses.replace(fault, remaining=left)
        if fault.status == 429:
            raise errors.TooManyRequests(
                "the sandbox is injecting rate limiting, please try again later",
                details={"retryAfterSeconds": fault.retry_after},
            )
        if fault.status == 503:
            raise errors.ServiceUnavailable("the sandbox is injecting unavailability")
        raise errors.InternalError("the sandbox is injecting an internal error")

    def drop_watches(self) -> int:
        """End every open watch connection now; returns how many were dropped."""
        return self.on_drop_watches()

    def expire_watches(self, count: int = 1) -> None:
        """Answer the next ``count`` watch requests with a 410 Gone ERROR event."""
        self.on_expire_watches(count)

    async def pause(self, duration: float | None = None) -> None:
        """Stop listening (clients get connection refused) until :meth:`resume` or ``duration``."""
        if self.on_pause is None:
            raise RuntimeError("the sandbox is not running")
        await self.on_pause()
        if duration is not None:
            self._resume_task = asyncio.create_task(self._resume_later(duration))

    async def _resume_later(self, duration: float) -> None:
        await asyncio.sleep(duration)
        await self.resume()

    async def resume(self) -> None:
        """Listen again on the same port."""
        if self.on_resume is None:
            raise RuntimeError("the sandbox is not running")
        await self.on_resume()

    def clear(self) -> None:
        """Remove every fault (pods recover on their own; tag resolution is left as configured)."""
        pods = self.crashing | self.unready
        self.crashing.clear()
        self.unready.clear()
        self.request_errors = None
        self.on_expire_watches(0)
        for key in sorted(pods):
            self.on_pod_fault(key)

    def describe(self) -> JsonDict:
        """The active faults as JSON."""
        return {
            "crashingPods": [f"{ns}/{name}" for ns, name in sorted(self.crashing)],
            "unreadyPods": [f"{ns}/{name}" for ns, name in sorted(self.unready)],
            "requestErrors": self.request_errors.describe() if self.request_errors else None,
            "imageResolution": dict(sorted(self.image_resolution.items())),
        }

    # ----- HTTP ----------------------------------------------------------------------------------

    def add_routes(self, app: web.Application) -> None:
        """Serve the fault switchboard under ``/sandbox/v1/faults``."""
        base = "/sandbox/v1/faults"
        app.router.add_get(base, self._http_describe)
        app.router.add_delete(base, self._http_clear)
        app.router.add_post(f"{base}/crash-pod", self._http_pod(self.crash_pod))
        app.router.add_post(f"{base}/fail-readiness", self._http_pod(self.fail_readiness))
        app.router.add_post(f"{base}/heal-pod", self._http_pod(self.heal_pod))
        app.router.add_post(f"{base}/errors", self._http_errors)
        app.router.add_post(f"{base}/drop-watches", self._http_drop)
        app.router.add_post(f"{base}/expire-watches", self._http_expire)
        app.router.add_post(f"{base}/pause", self._http_pause)
        app.router.add_post(f"{base}/image-resolution", self._http_images)

    async def _json(self, request: web.Request) -> JsonDict:
        if not request.can_read_body:
            return {}
        try:
            body = await request.json()
        except ValueError as exc:
            raise errors.BadRequest(f"the body must be JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise errors.BadRequest("the body must be a JSON object")
        return body

    async def _http_describe(self, request: web.Request) -> web.Response:
        return web.json_response(self.describe())

    async def _http_clear(self, request: web.Request) -> web.Response:
        self.clear()
        return web.json_response(self.describe())

    def _http_pod(self, action: Callable[..., None]) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handle(request: web.Request) -> web.Response:
            body = await self._json(request)
            namespace, name = body.get("namespace"), body.get("name")
            if not isinstance(namespace, str) or not isinstance(name, str):
                raise errors.BadRequest("namespace and name are required strings")
            action(namespace=namespace, name=name)
            return web.json_response(self.describe())

        return handle

    async def _http_errors(self, request: web.Request) -> web.Response:
        body = await self._json(request)
        try:
            self.fail_requests(
                status=int(body.get("status", 500)),
                fraction=float(body.get("fraction", 1.0)),
                duration=None if body.get("durationSeconds") is None else float(body["durationSeconds"]),
                count=None if body.get("count") is None else int(body["count"]),
                retry_after=int(body.get("retryAfterSeconds", 1)),
                path_prefix=str(body.get("pathPrefix", "")),
            )
        except (TypeError, ValueError) as exc:
            raise errors.BadRequest(str(exc)) from exc
        return web.json_response(self.describe())

    async def _http_drop(self, request: web.Request) -> web.Response:
        return web.json_response({"dropped": self.drop_watches()})

    async def _http_expire(self, request: web.Request) -> web.Response:
        body = await self._json(request)
        count = int(body.get("count", 1))
        self.expire_watches(count)
        return web.json_response({"expireNext": count})

    async def _http_pause(self, request: web.Request) -> web.Response:
        body = await self._json(request)
        duration = body.get("durationSeconds")
        if duration is None:
            raise errors.BadRequest(
                "durationSeconds is required over HTTP: nothing could resume a paused API"
            )
        self._pause_task = asyncio.create_task(self._pause_after_reply(float(duration)))
        return web.json_response({"pausedForSeconds": float(duration)})

    async def _pause_after_reply(self, duration: float) -> None:
        await asyncio.sleep(0.05)
        await self.pause(duration)

    async def _http_images(self, request: web.Request) -> web.Response:
        body = await self._json(request)
        mapping = body.get("mapping")
        if not isinstance(mapping, dict):
            raise errors.BadRequest("mapping must be an object of image -> resolved image")
        self.set_image_resolution({str(k): str(v) for k, v in mapping.items()})
        return web.json_response(self.describe())

"""The kubelet of the one simulated node: binds pods, starts them and keeps their status honest.

:class:`Kubelet` binds pods to ``sandbox-node``, starts them after ``ready_delay`` and writes
``status``: phase, conditions, ``containerStatuses`` with the running (resolved) image,
``restartCount``; crash and readiness faults show as CrashLoopBackOff / not ready. Timers model the
time that passes on a real node (container start-up, crash back-off). It is the only controller
with state of its own (start times, images, restarts, pod IPs), which :meth:`Kubelet.adopt`
rebuilds from the pods' status after a restore, as a restarted kubelet finds its containers
running, so a restore rewrites nothing that was already true.
"""

from __future__ import annotations

import asyncio
import logging

from kube_sandbox import faults, resources, store
from kube_sandbox.controllers import base

JsonDict = base.JsonDict
PodKey = base.PodKey

log = logging.getLogger(__name__)

NODE_NAME = "sandbox-node"
NODE_IP = "10.0.0.10"


class Kubelet(base.Runner):
    """Runs every pod on the single simulated node."""

    keys = frozenset({base.PODS})

    def __init__(
        self, st: store.Store, *, fault_state: faults.Faults, ready_delay: float, crash_interval: float
    ) -> None:
        super().__init__(st)
        self.faults = fault_state
        self.ready_delay = ready_delay
        self.crash_interval = crash_interval
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._started: dict[str, str] = {}
        self._images: dict[str, dict[str, str]] = {}
        self._restarts: dict[str, int] = {}
        self._last_crash: dict[str, tuple[str, str]] = {}
        self._ips: dict[str, str] = {}
        self._ips_in_use: set[str] = set()
        self._next_ip = 2

    def start(self) -> None:
        """Take over the stored pods' containers, then start consuming."""
        self.adopt()
        super().start()

    def adopt(self) -> None:
        """Rebuild what the node knows about running pods from their status (after a restore).

        A restarted kubelet finds its containers still running; here the status the previous run
        wrote is the only record, and reading start time, images, restarts and IP back from it makes
        the next status this kubelet computes identical, so restored pods stay Ready untouched.
        """
        for pod in self.store.objects(base.PODS):
            uid = pod["metadata"]["uid"]
            status = pod.get("status") or {}
            if status.get("phase") != "Running" or uid in self._started:
                continue
            containers = status.get("containerStatuses") or []
            started = next(
                (
                    c["state"]["running"].get("startedAt")
                    for c in containers
                    if isinstance((c.get("state") or {}).get("running"), dict)
                ),
                None,
            )
            self._started[uid] = str(started or status.get("startTime") or store.now())
            self._images[uid] = {str(c.get("name")): str(c.get("image", "")) for c in containers}
            restarts = max((int(c.get("restartCount") or 0) for c in containers), default=0)
            if restarts:
                self._restarts[uid] = restarts
            last = next(
                (
                    c["lastState"]["terminated"]
                    for c in containers
                    if isinstance((c.get("lastState") or {}).get("terminated"), dict)
                ),
                None,
            )
            if last is not None:
                self._last_crash[uid] = (str(last.get("startedAt", "")), str(last.get("finishedAt", "")))
            if status.get("podIP"):
                self._ips[uid] = str(status["podIP"])
                self._ips_in_use.add(self._ips[uid])

    async def stop(self) -> None:
        """Cancel timers and stop."""
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        await super().stop()

    def handle(self, batch: list[store.Event]) -> None:
        """Bring each changed pod's status up to date."""
        seen: set[PodKey] = set()
        for event in batch:
            meta = event.obj["metadata"]
            key = (meta.get("namespace", ""), meta["name"])
            if event.type == "DELETED":
                self._forget(meta["uid"])
                continue
            seen.add(key)
        for key in seen:
            self.sync(key)

    def _forget(self, uid: str) -> None:
        timer = self._timers.pop(uid, None)
        if timer is not None:
            timer.cancel()
        for table in (self._started, self._images, self._restarts, self._last_crash):
            table.pop(uid, None)
        self._ips_in_use.discard(self._ips.pop(uid, ""))

    def _rt(self) -> resources.ResourceType:
        rt = self.store.registry.preferred(base.PODS)
        assert rt is not None
        return rt

    def _later(self, uid: str, delay: float, key: PodKey, action: str) -> None:
        if uid in self._timers:
            return
        loop = asyncio.get_running_loop()
        self._timers[uid] = loop.call_later(delay, self._fire, uid, key, action)

    def _fire(self, uid: str, key: PodKey, action: str) -> None:
        self._timers.pop(uid, None)
        pod = self.store.find(base.PODS, *key)
        if pod is None or pod["metadata"]["uid"] != uid:
            return
        stamp = store.now()
        if action == "start":
            self._started[uid] = stamp
            self._images[uid] = self._wanted_images(pod)
        elif action == "crash":
            if key not in self.faults.crashing:
                self.sync(key)
                return
            self._restarts[uid] = self._restarts.get(uid, 0) + 1
            self._last_crash[uid] = (self._last_crash.get(uid, (stamp, stamp))[1], stamp)
        elif action == "restart":
            self._restarts[uid] = self._restarts.get(uid, 0) + 1
            self._last_crash[uid] = (self._started.get(uid, stamp), stamp)
            self._started[uid] = stamp
            self._images[uid] = self._wanted_images(pod)
        try:
            self.sync(key)
        except Exception:
            log.exception("sandbox kubelet failed to sync pod %s/%s", *key)

    def _wanted_images(self, pod: JsonDict) -> dict[str, str]:
        return {
            str(c.get("name")): self.faults.resolve_image(str(c.get("image", "")))
            for c in (pod.get("spec") or {}).get("containers") or []
        }

    def sync(self, key: PodKey) -> None:
        """Reconcile one pod's node binding and status with the simulated node."""
        pod = self.store.find(base.PODS, *key)
        if pod is None or pod["metadata"].get("deletionTimestamp"):
            return
        uid = pod["metadata"]["uid"]
        if not (pod.get("spec") or {}).get("nodeName"):
            bound = store.thaw(pod)
            bound["spec"]["nodeName"] = NODE_NAME
            self.store.update(self._rt(), bound, manager="default-scheduler")
            return
        if uid not in self._started:
            self._write_status(pod, self._pending_status(pod))
            self._later(uid, self.ready_delay, key, "start")
            return
        crashing = key in self.faults.crashing
        if crashing:
            self._later(uid, self.crash_interval, key, "crash")
        elif self._wanted_images(pod) != self._images.get(uid):
            self._later(uid, self.ready_delay, key, "restart")
        self._write_status(pod, self._running_status(pod, crashing=crashing))

    def _write_status(self, pod: JsonDict, status: JsonDict) -> None:
        if pod.get("status") == status:
            return
        self.store.update(self._rt(), base.status_write(pod, status), manager="kubelet", subresource="status")

    def _condition(
        self, pod: JsonDict, kind: str, value: bool, reason: str = "", message: str = ""
    ) -> JsonDict:
        status = "True" if value else "False"
        previous = next(
            (c for c in (pod.get("status") or {}).get("conditions") or [] if c.get("type") == kind), None
        )
        since = (
            previous["lastTransitionTime"] if previous and previous.get("status") == status else store.now()
        )
        out: JsonDict = {"type": kind, "status": status, "lastTransitionTime": since}
        if reason:
            out["reason"] = reason
        if message:
            out["message"] = message
        return out

    def _pending_status(self, pod: JsonDict) -> JsonDict:
        current = pod.get("status") or {}
        names = [str(c.get("name")) for c in (pod.get("spec") or {}).get("containers") or []]
        unready = f"containers with unready status: [{' '.join(names)}]"
        return {
            "phase": "Pending",
            "conditions": [
                self._condition(pod, "PodReadyToStartContainers", False),
                self._condition(pod, "Initialized", True),
                self._condition(pod, "Ready", False, "ContainersNotReady", unready),
                self._condition(pod, "ContainersReady", False, "ContainersNotReady", unready),
                self._condition(pod, "PodScheduled", True),
            ],
            "hostIP": NODE_IP,
            "hostIPs": [{"ip": NODE_IP}],
            "startTime": current.get("startTime") or store.now(),
            "qosClass": current.get("qosClass", "BestEffort"),
            "containerStatuses": [
                {
                    "name": str(c.get("name")),
                    "image": str(c.get("image", "")),
                    "imageID": "",
                    "ready": False,
                    "started": False,
                    "restartCount": 0,
                    "state": {"waiting": {"reason": "ContainerCreating"}},
                    "lastState": {},
                }
                for c in (pod.get("spec") or {}).get("containers") or []
            ],
        }

    def _pod_ip(self, uid: str) -> str:
        """The pod's IP in 10.244.0.0/16: the next one no live pod holds (reused after deletion)."""
        if uid not in self._ips:
            for _ in range(250 * 256):
                self._next_ip += 1
                n = self._next_ip % (250 * 256)
                ip = f"10.244.{n // 250}.{n % 250 + 2}"
                if ip not in self._ips_in_use:
                    break
            self._ips[uid] = ip
            self._ips_in_use.add(ip)
        return self._ips[uid]

    def _running_status(self, pod: JsonDict, *, crashing: bool) -> JsonDict:
        meta = pod["metadata"]
        uid = meta["uid"]
        key = (meta.get("namespace", ""), meta["name"])
        ready = not crashing and key not in self.faults.unready
        restarts = self._restarts.get(uid, 0)
        started = self._started[uid]
        images = self._images.get(uid, {})
        current = pod.get("status") or {}
        statuses: list[JsonDict] = []
        names: list[str] = []
        for container in (pod.get("spec") or {}).get("containers") or []:
            name = str(container.get("name"))
            names.append(name)
            image = images.get(name, str(container.get("image", "")))
            repo = image.split("@")[0].rsplit(":", 1)[0] if ":" in image.rsplit("/", 1)[-1] else image
            if "/" not in repo:
                repo = f"docker.io/library/{repo}"
            elif "." not in repo.split("/", 1)[0]:
                repo = f"docker.io/{repo}"
            entry: JsonDict = {
                "name": name,
                "image": image,
                "imageID": f"{repo}@sha256:{base.digest(image)}",
                "containerID": f"containerd://{base.digest(f'{uid}/{name}/{restarts}')}",
                "ready": ready,
                "started": not crashing,
                "restartCount": restarts,
            }
            last = self._last_crash.get(uid)
            if crashing:
                backoff = min(300, 10 * 2 ** max(0, restarts - 1))
                entry["state"] = {
                    "waiting": {
                        "reason": "CrashLoopBackOff",
                        "message": f"back-off {backoff}s restarting failed container={name} "
                        f"pod={meta['name']}_{key[0]}({uid})",
                    }
                }
            else:
                entry["state"] = {"running": {"startedAt": started}}
            if last is not None:
                entry["lastState"] = {
                    "terminated": {
                        "exitCode": 1 if crashing else 0,
                        "reason": "Error" if crashing else "Completed",
                        "startedAt": last[0],
                        "finishedAt": last[1],
                        "containerID": f"containerd://{base.digest(f'{uid}/{name}/{restarts - 1}')}",
                    }
                }
            else:
                entry["lastState"] = {}
            statuses.append(entry)
        unready = f"containers with unready status: [{' '.join(names)}]"
        return {
            "phase": "Running",
            "conditions": [
                self._condition(pod, "PodReadyToStartContainers", True),
                self._condition(pod, "Initialized", True),
                self._condition(
                    pod, "Ready", ready, "" if ready else "ContainersNotReady", "" if ready else unready
                ),
                self._condition(
                    pod,
                    "ContainersReady",
                    ready,
                    "" if ready else "ContainersNotReady",
                    "" if ready else unready,
                ),
                self._condition(pod, "PodScheduled", True),
            ],
            "hostIP": NODE_IP,
            "hostIPs": [{"ip": NODE_IP}],
            "podIP": self._pod_ip(uid),
            "podIPs": [{"ip": self._pod_ip(uid)}],
            "startTime": current.get("startTime") or started,
            "qosClass": current.get("qosClass", "BestEffort"),
            "containerStatuses": statuses,
        }

"""``metrics.k8s.io`` pod metrics, synthesized from the running pods' requests.

:func:`pod_metrics` is what metrics-server would report: cpu 25-50 % of the request, memory about
half, stable within a minute, for running pods that are not crash-looping. It is a read, not a
controller (nothing is stored), so it lives apart from the loops.
"""

from __future__ import annotations

import datetime

from kube_sandbox import faults, store
from kube_sandbox.controllers import base

JsonDict = base.JsonDict


def _fraction(seed: str, low: float, high: float) -> float:
    return low + (int(base.digest(seed)[:8], 16) / 0xFFFFFFFF) * (high - low)


def pod_metrics(
    st: store.Store, fault_state: faults.Faults, namespace: str | None, name: str | None
) -> list[JsonDict]:
    """PodMetrics for running pods: cpu 25-50% of the request, memory about half (stable per minute)."""
    now = datetime.datetime.now(datetime.UTC)
    minute = now.strftime("%Y%m%d%H%M")
    out: list[JsonDict] = []
    for pod in sorted(
        st.objects(base.PODS, namespace),
        key=lambda p: (p["metadata"].get("namespace"), p["metadata"]["name"]),
    ):
        meta = pod["metadata"]
        if name is not None and meta["name"] != name:
            continue
        status = pod.get("status") or {}
        if (
            status.get("phase") != "Running"
            or (meta.get("namespace", ""), meta["name"]) in fault_state.crashing
        ):
            continue
        containers = []
        for container in (pod.get("spec") or {}).get("containers") or []:
            resources_ = container.get("resources") or {}
            requests = {**(resources_.get("limits") or {}), **(resources_.get("requests") or {})}
            try:
                cpu = base.parse_quantity(requests.get("cpu", "100m"))
                memory = base.parse_quantity(requests.get("memory", "128Mi"))
            except ValueError:
                cpu, memory = 0.1, 128 * 2.0**20
            seed = f"{meta['uid']}/{container.get('name')}/{minute}"
            used_cpu = cpu * _fraction(seed + "/cpu", 0.25, 0.5)
            used_memory = memory * _fraction(seed + "/mem", 0.45, 0.55)
            containers.append(
                {
                    "name": container.get("name"),
                    "usage": {"cpu": f"{int(used_cpu * 1e9)}n", "memory": f"{int(used_memory / 1024)}Ki"},
                }
            )
        out.append(
            {
                "kind": "PodMetrics",
                "apiVersion": "metrics.k8s.io/v1beta1",
                "metadata": {
                    "name": meta["name"],
                    "namespace": meta.get("namespace"),
                    "creationTimestamp": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
                    "labels": dict(meta.get("labels") or {}),
                },
                "timestamp": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "window": "30s",
                "containers": containers,
            }
        )
    return out

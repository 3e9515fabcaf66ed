"""Sandbox API server benchmark: big lists and watch fan-out, against the kubernetes-asyncio baseline.

Not a test: it prints figures. Run with ``.venv/bin/python benchmarks/sandbox/bench_sandbox.py``.

Setup (in-process bulk load, not measured as API work): 10k StatefulSets, 10k Services, 10k
Secrets and 10k Pods in one namespace, with the simulator off (``simulate=False``) so no pods or
status writes come from controllers.

Measured over HTTP on loopback, medians of a few repetitions:

* full list of each kind, via kubernetes-asyncio (deserialized into models, what a client pays)
  and as raw JSON (the server's share);
* watch fan-out: 10k ConfigMap updates delivered to 10 concurrent watchers (raw HTTP line readers in
  a separate process, so the server's delivery rate is what is measured), as events/s delivered;
* the baseline: how many events/s one kubernetes-asyncio watch client can ingest (in the same
  separate process, replaying the same 10k events from the watch window), i.e. the rate beyond
  which a faster server makes no difference to a kubernetes-asyncio consumer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from typing import Any

import aiohttp
from kube_sandbox import Sandbox
from kubernetes_asyncio import client, config, watch

NAMESPACE = "bench"
OBJECTS = 10_000
EVENTS = 10_000
WATCHERS = 10
REPEATS = 3


def _statefulset(i: int) -> dict[str, Any]:
    name = f"db-{i:05d}"
    return {
        "metadata": {
            "name": name,
            "namespace": NAMESPACE,
            "labels": {"app": name, "app.kubernetes.io/managed-by": "broker"},
        },
        "spec": {
            "replicas": 0,
            "serviceName": name,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "containers": [
                        {
                            "name": "postgres",
                            "image": "postgres:15",
                            "ports": [{"containerPort": 5432}],
                            "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}},
                        }
                    ]
                },
            },
            "volumeClaimTemplates": [
                {
                    "metadata": {"name": "data"},
                    "spec": {
                        "accessModes": ["ReadWriteOnce"],
                        "resources": {"requests": {"storage": "10Gi"}},
                    },
                }
            ],
        },
    }


def _service(i: int) -> dict[str, Any]:
    name = f"db-{i:05d}"
    return {
        "metadata": {"name": name, "namespace": NAMESPACE, "labels": {"app": name}},
        "spec": {"selector": {"app": name}, "ports": [{"port": 5432}]},
    }


def _secret(i: int) -> dict[str, Any]:
    name = f"db-{i:05d}-credentials"
    return {
        "metadata": {"name": name, "namespace": NAMESPACE, "labels": {"app": name}},
        "stringData": {"username": "app", "password": f"pw-{i:08d}"},
    }


def _pod(i: int) -> dict[str, Any]:
    name = f"db-{i:05d}-0"
    return {
        "metadata": {"name": name, "namespace": NAMESPACE, "labels": {"app": f"db-{i:05d}"}},
        "spec": {"nodeName": "sandbox-node", "containers": [{"name": "postgres", "image": "postgres:15"}]},
    }


def _median(values: list[float]) -> float:
    return statistics.median(values)


async def _load(sandbox: Sandbox) -> dict[str, float]:
    sandbox.load(api_version="v1", kind="Namespace", objects=[{"metadata": {"name": NAMESPACE}}])
    timings = {}
    for api_version, kind, make in (
        ("apps/v1", "StatefulSet", _statefulset),
        ("v1", "Service", _service),
        ("v1", "Secret", _secret),
        ("v1", "Pod", _pod),
    ):
        started = time.perf_counter()
        sandbox.load(api_version=api_version, kind=kind, objects=[make(i) for i in range(OBJECTS)])
        timings[kind] = time.perf_counter() - started
    return timings


async def _bench_lists(sandbox: Sandbox, api: client.ApiClient) -> None:
    apps = client.AppsV1Api(api)
    core = client.CoreV1Api(api)
    kinds: dict[str, tuple[Any, str]] = {
        "StatefulSet": (apps.list_namespaced_stateful_set, "/apis/apps/v1/namespaces/bench/statefulsets"),
        "Service": (core.list_namespaced_service, "/api/v1/namespaces/bench/services"),
        "Secret": (core.list_namespaced_secret, "/api/v1/namespaces/bench/secrets"),
        "Pod": (core.list_namespaced_pod, "/api/v1/namespaces/bench/pods"),
    }
    print(f"\nfull list of {OBJECTS} objects (median of {REPEATS})")
    print(f"  {'kind':<12} {'server (bytes)':>14} {'kubernetes-asyncio':>19} {'ratio':>7} {'MB':>6}")
    async with aiohttp.ClientSession() as http:
        for kind, (method, path) in kinds.items():
            raw_times, client_times = [], []
            size = 0
            for _ in range(REPEATS):
                started = time.perf_counter()
                async with http.get(f"{sandbox.url}{path}") as resp:
                    body = await resp.read()
                raw_times.append(time.perf_counter() - started)
                size = len(body)
                assert body.count(b'"resourceVersion"') == OBJECTS + 1
                started = time.perf_counter()
                listed = await method(NAMESPACE)
                client_times.append(time.perf_counter() - started)
                assert len(listed.items) == OBJECTS
            raw, typed = _median(raw_times), _median(client_times)
            cells = f"{raw * 1000:>11.0f} ms {typed * 1000:>16.0f} ms {typed / raw:>6.1f}x {size / 1e6:>6.1f}"
            print(f"  {kind:<12} {cells}")


async def _consumer(args: argparse.Namespace) -> None:
    """Child process: raw watchers (fan-out) or one kubernetes-asyncio watch (baseline)."""
    if args.mode == "raw":
        ready = 0
        done_at: list[float] = []

        async def one(http: aiohttp.ClientSession) -> None:
            nonlocal ready
            url = f"{args.url}/api/v1/namespaces/{NAMESPACE}/configmaps?watch=1&resourceVersion={args.rv}"
            async with http.get(url, timeout=aiohttp.ClientTimeout(total=None)) as resp:
                ready += 1
                if ready == args.watchers:
                    print(json.dumps({"ready": True}), flush=True)
                seen = 0
                async for _ in resp.content:
                    seen += 1
                    if seen == args.events:
                        break
                done_at.append(time.monotonic())

        connector = aiohttp.TCPConnector(limit=args.watchers + 2)
        async with aiohttp.ClientSession(connector=connector) as http:
            await asyncio.gather(*(one(http) for _ in range(args.watchers)))
        print(json.dumps({"done": max(done_at)}), flush=True)
        return
    configuration = client.Configuration()
    await config.load_kube_config(config_file=args.kubeconfig, client_configuration=configuration)
    async with client.ApiClient(configuration) as api:
        core = client.CoreV1Api(api)
        stream = watch.Watch()
        started = time.monotonic()
        seen = 0
        async for _ in stream.stream(
            core.list_namespaced_config_map, NAMESPACE, resource_version=args.rv, timeout_seconds=120
        ):
            seen += 1
            if seen == args.events:
                break
        elapsed = time.monotonic() - started
        await stream.close()
    print(json.dumps({"elapsed": elapsed, "events": seen}), flush=True)


async def _spawn(*extra: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--consume", *extra, stdout=asyncio.subprocess.PIPE
    )


async def _read_json(proc: asyncio.subprocess.Process) -> dict[str, Any]:
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 120)
    return dict(json.loads(line))


async def _produce(sandbox: Sandbox, names: list[str]) -> None:
    rt = sandbox.store.registry.lookup(group="", version="v1", plural="configmaps")
    assert rt is not None
    for i in range(EVENTS):
        name = names[i % len(names)]
        current = sandbox.store.get(rt, NAMESPACE, name)
        data = {"n": str(sandbox.store.resource_version)}
        sandbox.store.update(
            rt, {**current, "metadata": dict(current["metadata"]), "data": data}, manager="bench"
        )
        if i % 200 == 199:
            await asyncio.sleep(0)


async def _bench_watch(sandbox: Sandbox, kubeconfig: str) -> None:
    names = [f"cm-{i:03d}" for i in range(100)]
    sandbox.load(
        api_version="v1",
        kind="ConfigMap",
        objects=[{"metadata": {"name": n, "namespace": NAMESPACE}, "data": {"n": "0"}} for n in names],
    )
    fanout: list[float] = []
    baseline: list[float] = []
    for _ in range(REPEATS):
        rv = str(sandbox.store.resource_version)
        proc = await _spawn(
            "--mode",
            "raw",
            "--url",
            sandbox.url,
            "--rv",
            rv,
            "--watchers",
            str(WATCHERS),
            "--events",
            str(EVENTS),
        )
        await _read_json(proc)
        started = time.monotonic()
        await _produce(sandbox, names)
        finished = (await _read_json(proc))["done"]
        await proc.wait()
        fanout.append(WATCHERS * EVENTS / (finished - started))
        proc = await _spawn("--mode", "k8s", "--kubeconfig", kubeconfig, "--rv", rv, "--events", str(EVENTS))
        result = await _read_json(proc)
        await proc.wait()
        baseline.append(result["events"] / result["elapsed"])
    print(f"\nwatch: {EVENTS} events to {WATCHERS} watchers (median of {REPEATS})")
    print(
        f"  sandbox fan-out delivered       {_median(fanout):>10,.0f} events/s "
        f"(runs: {', '.join(f'{v:,.0f}' for v in fanout)})"
    )
    print(
        f"  kubernetes-asyncio ingest (1x)  {_median(baseline):>10,.0f} events/s "
        f"(runs: {', '.join(f'{v:,.0f}' for v in baseline)})"
    )
    print(f"  fan-out / one-client ingest     {_median(fanout) / _median(baseline):>10.1f}x")
    print(
        f"  per watcher                     {_median(fanout) / WATCHERS:>10,.0f} events/s "
        f"({_median(fanout) / WATCHERS / _median(baseline):.1f}x what kubernetes-asyncio can consume)"
    )
    goal = 5_000
    verdict = "meets" if _median(fanout) >= goal else "MISSES"
    print(f"  goal >= {goal:,} events/s: {verdict}")


async def _main() -> None:
    sandbox = Sandbox(simulate=False, watch_window=5 * EVENTS, watch_queue_size=2 * EVENTS)
    await sandbox.start()
    try:
        started = time.perf_counter()
        timings = await _load(sandbox)
        total = time.perf_counter() - started
        print(f"sandbox benchmark at {sandbox.url} (in-memory; controllers off)")
        print(
            f"bulk load (in-process setup): {4 * OBJECTS} objects in {total:.1f} s "
            + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items())
        )
        kubeconfig = str(sandbox.write_kubeconfig("/tmp/bench-sandbox.kubeconfig"))  # noqa: S108 - a throwaway file.
        configuration = client.Configuration()
        await config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
        async with client.ApiClient(configuration) as api:
            await _bench_lists(sandbox, api)
        await _bench_watch(sandbox, kubeconfig)
    finally:
        await sandbox.stop()


def main() -> None:
    """Run the benchmark (or, with --consume, one of its child consumers)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--consume", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=["raw", "k8s"], default="raw", help=argparse.SUPPRESS)
    parser.add_argument("--url", default="", help=argparse.SUPPRESS)
    parser.add_argument("--kubeconfig", default="", help=argparse.SUPPRESS)
    parser.add_argument("--rv", default="0", help=argparse.SUPPRESS)
    parser.add_argument("--watchers", type=int, default=WATCHERS, help=argparse.SUPPRESS)
    parser.add_argument("--events", type=int, default=EVENTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    asyncio.run(_consumer(args) if args.consume else _main())


if __name__ == "__main__":
    main()

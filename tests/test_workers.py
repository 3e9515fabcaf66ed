"""Background workers: the shared loop, the supervisor, and what a failed worker does to the broker.

A worker that dies must not leave a broker that answers ready while nothing works: it is logged
once with its traceback, health goes NOT_SERVING and /readyz 503, and ``broker serve`` exits
non-zero so that Kubernetes restarts it.
"""

from __future__ import annotations

import asyncio
import logging
import pathlib

import aiohttp
import grpc
import pytest
from conftest import RunningBroker, until
from grpc_health.v1 import health_pb2, health_pb2_grpc

from broker import callbacks, cli, workers


async def test_run_forever_runs_a_step_n_times_with_the_test_seam() -> None:
    calls: list[int] = []

    async def step() -> float:
        calls.append(len(calls))
        return 0.0

    await workers.run_forever(step, interval=60, _iterations=5)
    assert calls == [0, 1, 2, 3, 4]


async def test_a_wakeup_cuts_the_wait_short_and_a_timeout_ends_it() -> None:
    wake = workers.Wakeup()
    assert await wake.wait(0.01) is False
    wake.set()
    assert await wake.wait(60) is True  # returns at once: it was set
    assert await wake.wait(0.01) is False  # and it was cleared


async def test_the_supervisor_reports_the_first_failure_once_with_its_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    failures: list[tuple[str, BaseException]] = []
    supervisor = workers.Supervisor(lambda name, exc: failures.append((name, exc)))

    async def healthy() -> None:
        await asyncio.Event().wait()

    async def broken() -> None:
        await asyncio.sleep(0)
        raise ValueError("invalid literal for int() with base 10: 'three'")

    async def returns() -> None:
        return None

    supervisor.start("healthy", healthy())
    supervisor.start("broken", broken())
    await until(lambda: asyncio.sleep(0, failures), lambda f: len(f) == 1, within=5, what="the failure")
    supervisor.start("returns", returns())
    await asyncio.sleep(0.05)
    await supervisor.stop()
    assert [name for name, _ in failures] == ["broken"]
    assert isinstance(failures[0][1], ValueError)
    logged = [r for r in caplog.records if r.levelno == logging.CRITICAL]
    assert len(logged) == 1
    assert logged[0].exc_info is not None


async def test_a_worker_that_returns_is_a_failure_too() -> None:
    failures: list[str] = []
    supervisor = workers.Supervisor(lambda name, exc: failures.append(str(exc)))

    async def returns() -> None:
        return None

    supervisor.start("quitter", returns())
    await until(lambda: asyncio.sleep(0, failures), lambda f: bool(f), within=5, what="the failure")
    await supervisor.stop()
    assert "returned" in failures[0]


async def test_a_dead_detector_makes_the_broker_not_ready_and_not_serving(
    cluster_broker: RunningBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    broker = cluster_broker.broker
    assert broker.detector is not None

    async def bug(deployment_id: str, listed: object) -> None:
        raise RuntimeError("a bug in the detector")

    monkeypatch.setattr(broker.detector, "_judging", bug)  # what every evaluation goes through
    broker.detector.notify("deploy-000000000000")
    await asyncio.wait_for(broker.failed.wait(), 10)

    async with aiohttp.ClientSession() as http, http.get(f"{cluster_broker.http_url}/readyz") as r:
        assert r.status == 503
        assert "detector" in (await r.json())["reason"]
    async with grpc.aio.insecure_channel(cluster_broker.grpc_target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = await until(
            lambda: health.Check(health_pb2.HealthCheckRequest(service="")),
            lambda r: r.status == health_pb2.HealthCheckResponse.NOT_SERVING,
            within=5,
            what="NOT_SERVING",
        )
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert broker.supervisor.failure is not None
    assert broker.supervisor.failure[0] == "detector"


def test_broker_serve_exits_non_zero_when_a_worker_fails(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async def bug(self: callbacks.Dispatcher) -> None:
        raise RuntimeError("a bug in the dispatcher")

    monkeypatch.setattr(callbacks.Dispatcher, "run", bug)
    code = cli.main(
        [
            "serve",
            "--insecure",
            "--grpc-addr",
            "127.0.0.1:0",
            "--http-addr",
            "127.0.0.1:0",
            "--data-dir",
            str(tmp_path / "data"),
        ]
    )
    assert code != 0
    assert "background worker callback-dispatcher failed" in capsys.readouterr().err

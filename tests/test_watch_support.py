"""Helpers for the WatchDrift tests (``test_watch_*.py``): no tests of its own.

- ``broker_on``: a broker on the test's sandbox with the settings a test needs (and stopped after);
- ``Client``: what a manager holds (gRPC stub and HTTP session) for one principal;
- ``Watch``: one WatchDrift stream read by a background task, with everything it received and how it
  ended;
- ``Kubectl``: stock kubectl against the sandbox, in any namespace;
- ``until``: poll with a generous functional deadline (never a timing assertion);
- ``error_info``: the google.rpc ErrorInfo a failed call carries;
- ``filler_event``: a well-formed remediation-like event to append straight to the log when a test
  needs thousands of events quickly (the stream path is the same as for detector events).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import os
import pathlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import aiohttp
import grpc
import pytest
from broker_client.v1 import broker_pb2 as pb
from broker_client.v1 import broker_pb2_grpc
from conftest import bearer, cluster_settings, until
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from broker import server
from broker.domain import model

T = TypeVar("T")

PLATFORM = "team-platform"
OTHER = "team-other"
POSTGRES_15 = {"engine": "postgresql", "version": "15", "size": "medium"}


async def value(x: T) -> T:
    """An awaitable of a plain value, for ``until`` on in-memory state."""
    return x


@contextlib.asynccontextmanager
async def broker_on(
    data_dir: pathlib.Path, tokens: pathlib.Path, kubeconfig: pathlib.Path | None, **overrides: Any
) -> AsyncIterator[server.Broker]:
    """A started broker managing the sandbox (``kubeconfig``; None for no cluster); stopped after."""
    if kubeconfig is not None:
        settings = cluster_settings(data_dir, tokens, kubeconfig, **overrides)
    else:
        settings = server.Settings(
            grpc_addr="127.0.0.1:0",
            http_addr="127.0.0.1:0",
            data_dir=data_dir,
            tokens_file=tokens,
            shutdown_grace=1.0,
            **overrides,
        )
    broker = server.Broker(settings)
    await broker.start()
    try:
        if broker.cluster is not None:
            assert await broker.cluster.wait_synced(10.0)
        yield broker
    finally:
        await broker.stop()


def error_info(err: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    """The ErrorInfo detail of a failed call (fails the test when there is none)."""
    status = rpc_status.from_call(err)
    assert status is not None, f"no google.rpc.Status on {err.code()}: {err.details()}"
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    pytest.fail(f"no ErrorInfo on {err.code()}: {err.details()}")


class Watch:
    """One WatchDrift stream, read by a background task into ``messages`` until it ends."""

    def __init__(
        self, stub: broker_pb2_grpc.BrokerServiceStub, request: pb.WatchDriftRequest, token: str
    ) -> None:
        self.call = stub.WatchDrift(request, metadata=bearer(token))
        self.messages: list[pb.WatchDriftResponse] = []
        self.error: grpc.aio.AioRpcError | None = None
        self.ended = False
        self._arrived = asyncio.Event()
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for message in self.call:
                self.messages.append(message)
                self._arrived.set()
        except grpc.aio.AioRpcError as e:
            self.error = e
        finally:
            self.ended = True
            self._arrived.set()

    @property
    def events(self) -> list[pb.DriftEvent]:
        """The event messages received, in arrival order."""
        return [m.event for m in self.messages if m.WhichOneof("message") == "event"]

    def of(self, kind: str) -> list[Any]:
        """The payloads of one kind of message (``event``, ``initial_state``, ``heartbeat``, ...)."""
        return [getattr(m, kind) for m in self.messages if m.WhichOneof("message") == kind]

    @property
    def sequences(self) -> list[int]:
        """The sequences of the events received, in arrival order."""
        return [e.sequence for e in self.events]

    async def wait(self, ok: Callable[[Watch], object], *, within: float, what: str) -> None:
        """Until ``ok(self)`` holds; fails (with what arrived) when the stream ended first or time ran out."""
        deadline = time.monotonic() + within
        while True:
            self._arrived.clear()
            if ok(self):
                return
            if self.ended:
                pytest.fail(f"the stream ended ({self.error!r}) before {what}; received:\n{self.summary()}")
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {within:g}s waiting for {what}; received:\n{self.summary()}")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.1):
                    await self._arrived.wait()

    async def reach(self, sequence: int, *, within: float = 20.0) -> None:
        """Until an event with ``sequence`` or later has arrived."""
        await self.wait(
            lambda w: bool(w.sequences) and w.sequences[-1] >= sequence,
            within=within,
            what=f"event {sequence}",
        )

    async def wait_kinds(
        self, kinds: list[int], *, deployment_id: str = "", within: float = 20.0
    ) -> list[pb.DriftEvent]:
        """Until the events (of one deployment) contain ``kinds`` as an ordered subsequence."""
        names = [pb.DriftEventKind.Name(k) for k in kinds]  # type: ignore[arg-type]
        await self.wait(
            lambda w: has_in_order(w.kinds(deployment_id), kinds),
            within=within,
            what=f"events {names} in this order",
        )
        return [e for e in self.events if not deployment_id or e.deployment_id == deployment_id]

    def kinds(self, deployment_id: str = "") -> list[int]:
        """The kinds of the events received (of one deployment), in order."""
        return [e.kind for e in self.events if not deployment_id or e.deployment_id == deployment_id]

    async def ended_with(self, *, within: float = 20.0) -> grpc.aio.AioRpcError:
        """The error the stream ended with (fails when it does not end with one)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                await asyncio.shield(self._task)
        if not self.ended:
            pytest.fail(f"the stream did not end within {within:g}s; received:\n{self.summary()}")
        assert self.error is not None, f"the stream ended without an error; received:\n{self.summary()}"
        return self.error

    def summary(self) -> str:
        lines = []
        for m in self.messages[-40:]:
            which = m.WhichOneof("message")
            if which == "event":
                e = m.event
                lines.append(
                    f"  event #{e.sequence} {pb.DriftEventKind.Name(e.kind)} {e.namespace}/{e.resource_name}: "
                    f"{e.message[:120]}"
                )
            else:
                lines.append(f"  {which}")
        return "\n".join(lines) or "  (nothing)"

    async def close(self) -> None:
        """Cancel the call and wait for the reader."""
        self.call.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


def has_in_order(seen: list[int], wanted: list[int]) -> bool:
    """Whether ``wanted`` is a subsequence of ``seen``."""
    it = iter(seen)
    return all(any(k == w for k in it) for w in wanted)


class Client:
    """A manager's view of one broker as one principal: gRPC stub and HTTP session."""

    def __init__(self, channel: grpc.aio.Channel, http: aiohttp.ClientSession, token: str) -> None:
        self.channel = channel
        self.stub = broker_pb2_grpc.BrokerServiceStub(channel)
        self.http = http
        self.token = token
        self.auth = bearer(token)
        self.watches: list[Watch] = []

    async def provision(
        self, name: str, namespace: str = PLATFORM, spec: dict[str, Any] | None = None
    ) -> str:
        reply = await self.stub.Provision(
            pb.ProvisionRequest(
                namespace=namespace,
                resource_type=pb.RESOURCE_TYPE_DATABASE,
                resource_name=name,
                spec=pb.ResourceSpec(**(spec or POSTGRES_15)),
            ),
            metadata=self.auth,
        )
        return str(reply.deployment_id)

    async def state(self, deployment_id: str, namespace: str = PLATFORM) -> pb.ResourceState | None:
        reply = await self.stub.GetResourceState(
            pb.GetResourceStateRequest(namespace=namespace, deployment_id=deployment_id), metadata=self.auth
        )
        return reply.resources[0] if reply.resources else None

    async def wait_ready(
        self, deployment_id: str, namespace: str = PLATFORM, *, within: float = 20.0
    ) -> pb.ResourceState:
        state = await until(
            lambda: self.state(deployment_id, namespace),
            lambda s: (
                s is not None and s.phase == pb.STATE_READY and s.health_status == pb.HEALTH_STATUS_HEALTHY
            ),
            within=within,
            what=f"{deployment_id} to be Ready and Healthy",
        )
        assert state is not None
        return state

    async def events(
        self, namespace: str, *, deployment_id: str = "", page_size: int = 100
    ) -> list[pb.DriftEvent]:
        """The whole drift history of a namespace through ListDriftEvents, page by page."""
        out: list[pb.DriftEvent] = []
        token = ""
        for _ in range(10_000):
            reply = await self.stub.ListDriftEvents(
                pb.ListDriftEventsRequest(
                    namespace=namespace, deployment_id=deployment_id, page_size=page_size, page_token=token
                ),
                metadata=self.auth,
            )
            out.extend(reply.events)
            token = reply.next_page_token
            if not token:
                return out
        pytest.fail("ListDriftEvents never returned its last page")

    def watch(self, **request: Any) -> Watch:
        """Open a WatchDrift stream (closed with the client)."""
        w = Watch(self.stub, pb.WatchDriftRequest(**request), self.token)
        self.watches.append(w)
        return w

    async def close(self) -> None:
        for w in self.watches:
            await w.close()


@contextlib.asynccontextmanager
async def client_of(broker: server.Broker, token: str) -> AsyncIterator[Client]:
    """A Client on a running broker, closed (with its streams) after."""
    headers = {"Authorization": f"Bearer {token}"}
    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{broker.grpc_port}") as channel,
        aiohttp.ClientSession(base_url=f"http://127.0.0.1:{broker.http_port}", headers=headers) as http,
    ):
        c = Client(channel, http, token)
        try:
            yield c
        finally:
            await c.close()


class Kubectl:
    """Stock kubectl against the sandbox, run as a subprocess so the in-process servers keep serving."""

    def __init__(self, kubeconfig: pathlib.Path, cache: pathlib.Path) -> None:
        self.base = ["kubectl", f"--kubeconfig={kubeconfig}", f"--cache-dir={cache}"]

    async def run(self, *args: str, namespace: str = PLATFORM, check: bool = True) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            *self.base,
            "-n",
            namespace,
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=dict(os.environ),
        )
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        code = proc.returncode or 0
        if check and code != 0:
            pytest.fail(f"kubectl {' '.join(args)} failed ({code}): {err.decode()}")
        return code, out.decode(), err.decode()

    async def scale(self, name: str, replicas: int, namespace: str = PLATFORM) -> None:
        await self.run("scale", "statefulset", name, f"--replicas={replicas}", namespace=namespace)

    async def replicas(self, name: str, namespace: str = PLATFORM) -> int | None:
        """The StatefulSet's spec.replicas as the cluster has it."""
        _, out, _ = await self.run("get", "statefulset", name, "-o", "json", namespace=namespace)
        replicas = json.loads(out)["spec"].get("replicas")
        return None if replicas is None else int(replicas)


def filler_event(
    deployment_id: str, index: int, *, name: str = "filler", namespace: str = PLATFORM, size: int = 1000
) -> model.DriftEvent:
    """An event about an existing database ``name`` of ``namespace``, with ``size`` bytes of message."""
    return model.DriftEvent(
        sequence=0,
        kind=model.EventKind.REMEDIATION_FAILED,
        deployment_id=model.DeploymentId(deployment_id),
        namespace=model.Namespace(namespace),
        resource_type=model.ResourceType.DATABASE,
        resource_name=model.ResourceName(name),
        event_time=datetime.datetime.now(datetime.UTC),
        message=f"filler {index} " + "x" * size,
        phase=model.Phase.PENDING,
        health=None,
        generation=1,
    )

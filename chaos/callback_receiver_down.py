"""callback-receiver-down: callbacks reach a manager whose endpoint was down, across a broker SIGKILL.

A manager's callback receiver (aiohttp on loopback; the broker runs with
``--callback-allow-loopback``) is down for ``down_for`` seconds: first nothing listens on its port
(connection refused), then it answers 503. ``provisions`` resources with that callback URL are
provisioned meanwhile and become Ready, so their callbacks wait in the outbox. Halfway through the
outage the broker is SIGKILLed and restarted on the same data directory. Then the receiver comes
up and answers 204.

The broker backs off exponentially between attempts (up to 300 s by default); when ``broker serve``
has ``--callback-max-backoff SECONDS``, it is set to ``max_backoff`` so the wait after the outage
stays short, otherwise the scenario waits as long as the default backoff needs.

Goals: every provision's callback delivered (a 2xx answer); one delivery id per deployment
(retries repeat the id; duplicate deliveries of the same id are allowed, at least once); every
attempt validly signed (``broker_client.callbacks.CallbackVerifier`` with the broker's key, here
``BROKER_CALLBACK_KEY``).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import pathlib
import secrets
import sqlite3

from aiohttp import web
from broker_client import callbacks
from broker_client.v1 import broker_pb2_grpc

from chaos import harness

NAME = "callback-receiver-down"
MAX_BACKOFF_FLAG = "--callback-max-backoff"


@dataclasses.dataclass(frozen=True)
class Attempt:
    """One POST the receiver got."""

    delivery_id: str
    deployment_id: str
    status: int  # what the receiver answered
    signed: bool  # the signature verified with the broker's key


class Receiver:
    """The manager's callback endpoint: down (not listening), failing (503) or up (204)."""

    def __init__(self, key: bytes) -> None:
        self.verifier = callbacks.CallbackVerifier(key)
        self.port = harness.free_port()
        self.url = f"http://{harness.LOOPBACK}:{self.port}/v1/callback"
        self.failing = True
        self.attempts: list[Attempt] = []
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        try:
            delivery = self.verifier.check(request.headers, body)
            signed, delivery_id = True, delivery.delivery_id
            deployment_id = str(delivery.payload.get("deploymentId", ""))
        except callbacks.InvalidSignature:
            signed = False
            delivery_id = request.headers.get(callbacks.DELIVERY_HEADER, "")
            deployment_id = ""
        status = 503 if self.failing else (204 if signed else 401)
        self.attempts.append(Attempt(delivery_id, deployment_id, status, signed))
        return web.Response(status=status)

    async def listen(self) -> None:
        """Start listening on the port (answers 503 while ``failing``)."""
        app = web.Application()
        app.router.add_post("/v1/callback", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, harness.LOOPBACK, self.port).start()

    async def close(self) -> None:
        """Stop listening."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def delivered(self) -> dict[str, set[str]]:
        """Deployment id -> the delivery ids answered 2xx."""
        found: dict[str, set[str]] = collections.defaultdict(set)
        for a in self.attempts:
            if 200 <= a.status < 300:
                found[a.deployment_id].add(a.delivery_id)
        return found


def _outbox(db_path: pathlib.Path) -> tuple[int, int]:
    """(entries, undelivered entries) of the broker's callback outbox."""
    connection = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)
    try:
        row = connection.execute(
            "SELECT COUNT(*), COUNT(*) - COUNT(delivered_time) FROM callback_outbox"
        ).fetchone()
    except sqlite3.OperationalError:  # not created yet
        return 0, 0
    finally:
        connection.close()
    return int(row[0]), int(row[1])


async def run(
    workdir: pathlib.Path,
    *,
    provisions: int = 30,
    down_for: float = 20.0,
    max_backoff: float = 2.0,
) -> harness.Result:
    """Run the scenario; see the module docstring."""
    key = secrets.token_hex(32)
    receiver = Receiver(key.encode())
    has_flag = await harness.serve_has_flag(MAX_BACKOFF_FLAG)
    args = ["--callback-allow-loopback", "--ready-timeout", "300"]
    if has_flag:
        args += [MAX_BACKOFF_FLAG, f"{max_backoff:g}"]
    ids: dict[str, str] = {}
    pending_at_kill = 0
    all_delivered_after = float("inf")
    try:
        async with (
            harness.cluster(workdir, broker_args=args, broker_env={"BROKER_CALLBACK_KEY": key}) as (
                _,
                broker,
            ),
            harness.channel(broker.target) as channel,
        ):
            stub = broker_pb2_grpc.BrokerServiceStub(channel)
            start = harness.monotonic()
            for index in range(provisions):
                name = f"callback-{index:03d}"
                reply = await stub.Provision(
                    harness.provision_request(name, index, callback_url=receiver.url), timeout=30
                )
                ids[reply.deployment_id] = name

            # Refused for the first third of the outage, 503 after that.
            await asyncio.sleep(max(0.0, start + down_for / 3 - harness.monotonic()))
            await receiver.listen()
            # The kill comes once every callback is in the outbox, and halfway through the outage.
            await harness.poll(
                lambda: asyncio.to_thread(_outbox, broker.db_path),
                lambda counts: counts[0] >= provisions,
                within=60,
            )
            await asyncio.sleep(max(0.0, start + down_for / 2 - harness.monotonic()))
            pending_at_kill = (await asyncio.to_thread(_outbox, broker.db_path))[1]
            await broker.sigkill()
            await broker.start()
            await asyncio.sleep(max(0.0, start + down_for - harness.monotonic()))
            receiver.failing = False
            recovered = harness.monotonic()

            # The next attempt of each entry comes at most about one backoff step later.
            ceiling = max_backoff if has_flag else 300.0
            wait = min(ceiling, 2 * (harness.monotonic() - start)) + 30
            await harness.poll(
                lambda: harness.value(len(receiver.delivered())),
                lambda n: n >= provisions,
                within=wait,
                interval=0.1,
            )
            all_delivered_after = harness.monotonic() - recovered
    finally:
        await receiver.close()

    delivered = receiver.delivered()
    unsigned = sum(1 for a in receiver.attempts if not a.signed)
    unique = {a.delivery_id for a in receiver.attempts if a.signed}
    ids_per_deployment: dict[str, set[str]] = collections.defaultdict(set)
    for a in receiver.attempts:
        if a.signed:
            ids_per_deployment[a.deployment_id].add(a.delivery_id)
    several_ids = sorted(d for d, s in ids_per_deployment.items() if len(s) > 1)
    successes = sum(1 for a in receiver.attempts if 200 <= a.status < 300)
    strangers = sorted(set(delivered) - set(ids))
    figures: dict[str, harness.Figure] = {
        "delivered": f"{sum(1 for d in ids if d in delivered)}/{provisions}",
        "unique_ids": len(unique),
        "duplicate_deliveries": successes - sum(len(s) for s in delivered.values()),
        "attempts": len(receiver.attempts),
        "bad_signatures": unsigned,
        "pending_at_kill": pending_at_kill,
        "delivered_after_up_s": round(all_delivered_after, 1),
        "max_backoff": f"{max_backoff:g}s" if has_flag else "default(flag absent)",
    }
    problems, notes = [], []
    missing = [ids[d] for d in ids if d not in delivered]
    if missing:
        problems.append(f"never delivered: {missing[:10]}")
    if several_ids:
        problems.append(f"deployments with several delivery ids: {several_ids[:5]}")
    if unsigned:
        problems.append(f"{unsigned} attempts with an invalid signature")
    if strangers:
        problems.append(f"deliveries for unknown deployments: {strangers[:5]}")
    if not pending_at_kill:
        problems.append("no callback was pending when the broker was killed")
    if not has_flag:
        notes.append(f"broker serve has no {MAX_BACKOFF_FLAG}: waited on the default backoff")
    return harness.Result(NAME, figures, tuple(problems), tuple(notes))

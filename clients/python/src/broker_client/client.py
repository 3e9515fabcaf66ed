"""An async client for the resource broker, for manager services.

::

    async with await BrokerClient.connect("broker:50051", token=TOKEN) as broker:
        reply = await broker.provision(
            namespace="team-platform", resource_type="database", resource_name="postgres-app-db",
            engine="postgresql", version="15", size="medium", callback_url="http://manager/v1/callback",
        )
        async for message in broker.watch_drift(namespaces=["team-platform"]):
            ...  # one unbroken stream: reconnects and resumes by itself

Every call has a deadline. Idempotent unary calls (reads, and Provision/Deprovision, which always
carry a request id) are retried on UNAVAILABLE by gRPC itself through the channel's service
config. Failures surface as the typed exceptions of ``broker_client.errors``.
"""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

import grpc

from broker_client import errors
from broker_client.v1 import broker_pb2 as pb
from broker_client.v1 import broker_pb2_grpc

_SERVICE = "broker.v1.BrokerService"
_RETRIED = (
    "GetResourceState",
    "GetDeployment",
    "ListDriftEvents",
    "GetRemediationPolicy",
    "Provision",
    "Deprovision",
)
SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{"service": _SERVICE, "method": m} for m in _RETRIED],
                "retryPolicy": {
                    "maxAttempts": 5,
                    "initialBackoff": "0.1s",
                    "maxBackoff": "2s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)
# A stream ends with these when the broker restarts or is unreachable: resume, don't fail.
_RESUMABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL)
# RESOURCE_EXHAUSTED is resumable only when this reader fell behind, not when a limit was hit.
_TOO_SLOW = "SUBSCRIBER_TOO_SLOW"

_RESOURCE_TYPES = {
    "database": pb.RESOURCE_TYPE_DATABASE,
    "cache": pb.RESOURCE_TYPE_CACHE,
    "topic": pb.RESOURCE_TYPE_TOPIC,
}


def _type_number(value: str | int | None) -> pb.ResourceType.ValueType:
    """A resource type from its name ("database") or proto number; None means unspecified."""
    if value is None:
        return pb.RESOURCE_TYPE_UNSPECIFIED
    if isinstance(value, int):
        return pb.ResourceType.ValueType(value)
    try:
        return _RESOURCE_TYPES[value.lower()]
    except KeyError:
        raise ValueError(
            f"unknown resource type {value!r}: use one of {', '.join(_RESOURCE_TYPES)}"
        ) from None


class BrokerClient:
    """A connection to one broker; create with ``connect``, close with ``close`` or ``async with``."""

    def __init__(self, channel: grpc.aio.Channel, *, token: str | None, deadline: float) -> None:
        self._channel = channel
        self._stub = broker_pb2_grpc.BrokerServiceStub(channel)
        self._metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()
        self._deadline = deadline

    @classmethod
    async def connect(
        cls,
        target: str,
        *,
        token: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        certificate_chain: bytes | None = None,
        private_key: bytes | None = None,
        deadline: float = 10.0,
    ) -> BrokerClient:
        """Open a channel to ``target`` (``host:port``); ``tls`` for a TLS-terminated broker.

        ``root_certificates`` verifies the broker (system roots when None); ``certificate_chain`` and
        ``private_key`` present a client certificate to a broker that requires one (mTLS).

        ``deadline`` is how long each unary call may take, retries included.
        """
        options = [("grpc.service_config", SERVICE_CONFIG), ("grpc.enable_retries", 1)]
        if tls:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=root_certificates,
                private_key=private_key,
                certificate_chain=certificate_chain,
            )
            channel = grpc.aio.secure_channel(target, credentials, options=options)
        else:
            channel = grpc.aio.insecure_channel(target, options=options)
        return cls(channel, token=token, deadline=deadline)

    async def close(self) -> None:
        """Close the channel (ending open streams)."""
        await self._channel.close()

    async def __aenter__(self) -> BrokerClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, method: Any, request: Any) -> Any:
        try:
            return await method(request, metadata=self._metadata, timeout=self._deadline)
        except grpc.RpcError as e:
            raise errors.from_rpc_error(e) from e

    async def provision(
        self,
        *,
        namespace: str,
        resource_type: str | int,
        resource_name: str,
        engine: str,
        version: str = "",
        size: str = "",
        replicas: int | None = None,
        partitions: int | None = None,
        retention_ms: int | None = None,
        callback_url: str = "",
        request_id: str | None = None,
    ) -> pb.ProvisionResponse:
        """Create or update a resource; answers at once with its deployment id.

        A request id is generated when none is given, so a retried call is never applied twice.
        """
        spec = pb.ResourceSpec(engine=engine, version=version, size=size)
        if replicas is not None:
            spec.replicas = replicas
        if partitions is not None or retention_ms is not None:
            spec.topic.CopyFrom(pb.TopicSpec(partitions=partitions or 0, retention_ms=retention_ms or 0))
        request = pb.ProvisionRequest(
            namespace=namespace,
            resource_type=_type_number(resource_type),
            resource_name=resource_name,
            spec=spec,
            callback_url=callback_url,
            request_id=request_id or str(uuid.uuid4()),
        )
        reply: pb.ProvisionResponse = await self._call(self._stub.Provision, request)
        return reply

    async def get_resource_state(
        self,
        namespace: str,
        *,
        resource_type: str | int | None = None,
        resource_name: str = "",
        deployment_id: str = "",
    ) -> list[pb.ResourceState]:
        """Every matching resource of a namespace (all pages)."""
        states: list[pb.ResourceState] = []
        token = ""
        while True:
            reply: pb.GetResourceStateResponse = await self._call(
                self._stub.GetResourceState,
                pb.GetResourceStateRequest(
                    namespace=namespace,
                    resource_type=_type_number(resource_type),
                    resource_name=resource_name,
                    deployment_id=deployment_id,
                    page_size=1000,
                    page_token=token,
                ),
            )
            states.extend(reply.resources)
            token = reply.next_page_token
            if not token:
                return states

    async def get_deployment(self, namespace: str, deployment_id: str) -> pb.Deployment:
        """One deployment: desired spec, phase, last operation."""
        reply: pb.GetDeploymentResponse = await self._call(
            self._stub.GetDeployment,
            pb.GetDeploymentRequest(namespace=namespace, deployment_id=deployment_id),
        )
        return reply.deployment

    async def deprovision(
        self, namespace: str, deployment_id: str, *, delete_data: bool = False, request_id: str | None = None
    ) -> pb.DeprovisionResponse:
        """Delete a resource; its volumes are kept unless ``delete_data``."""
        reply: pb.DeprovisionResponse = await self._call(
            self._stub.Deprovision,
            pb.DeprovisionRequest(
                namespace=namespace,
                deployment_id=deployment_id,
                data_policy=pb.DATA_POLICY_DELETE if delete_data else pb.DATA_POLICY_KEEP,
                request_id=request_id or str(uuid.uuid4()),
            ),
        )
        return reply

    async def list_drift_events(self, namespace: str, *, deployment_id: str = "") -> list[pb.DriftEvent]:
        """The drift history of a namespace or deployment, oldest first (all pages)."""
        found: list[pb.DriftEvent] = []
        token = ""
        while True:
            reply: pb.ListDriftEventsResponse = await self._call(
                self._stub.ListDriftEvents,
                pb.ListDriftEventsRequest(
                    namespace=namespace, deployment_id=deployment_id, page_size=1000, page_token=token
                ),
            )
            found.extend(reply.events)
            token = reply.next_page_token
            if not token:
                return found

    async def accept_drift(
        self, namespace: str, deployment_id: str, fields: Sequence[str] = ()
    ) -> pb.AcceptDriftResponse:
        """Make observed values the desired state."""
        reply: pb.AcceptDriftResponse = await self._call(
            self._stub.AcceptDrift,
            pb.AcceptDriftRequest(namespace=namespace, deployment_id=deployment_id, fields=list(fields)),
        )
        return reply

    async def set_remediation_policy(
        self,
        namespace: str,
        *,
        mode: str,
        resource_type: str | int | None = None,
        ignore_fields: Iterable[str] = (),
    ) -> pb.RemediationPolicy:
        """Set auto / alert / off for a namespace (and type), with fields to ignore."""
        modes = {
            "auto": pb.REMEDIATION_MODE_AUTO,
            "alert": pb.REMEDIATION_MODE_ALERT,
            "off": pb.REMEDIATION_MODE_OFF,
        }
        if mode not in modes:
            raise ValueError(f"unknown mode {mode!r}: use auto, alert or off")
        reply: pb.SetRemediationPolicyResponse = await self._call(
            self._stub.SetRemediationPolicy,
            pb.SetRemediationPolicyRequest(
                policy=pb.RemediationPolicy(
                    namespace=namespace,
                    resource_type=_type_number(resource_type),
                    mode=modes[mode],
                    ignore_fields=list(ignore_fields),
                )
            ),
        )
        return reply.policy

    async def watch_drift(
        self,
        *,
        namespaces: Sequence[str] = (),
        resource_type: str | int | None = None,
        resource_name: str = "",
        deployment_id: str = "",
        kinds: Sequence[pb.DriftEventKind.ValueType] = (),
        send_initial_state: bool = False,
        after_sequence: int | None = None,
        heartbeats: bool = False,
        max_backoff: float = 10.0,
    ) -> AsyncIterator[pb.WatchDriftResponse]:
        """Drift events as one unbroken stream, reconnecting and resuming after the last sequence.

        The broker ends streams resumably when it restarts or when this reader falls behind; the
        iterator then reconnects with backoff and asks for every event after the last one it
        delivered, so nothing is missed and nothing repeats. OutOfRange (the resume point left the
        log) and authorization errors are raised: the caller must re-read the state.
        """
        last = after_sequence
        snapshot = send_initial_state
        delay = 0.1
        while True:
            request = pb.WatchDriftRequest(
                namespaces=list(namespaces),
                resource_type=_type_number(resource_type),
                resource_name=resource_name,
                deployment_id=deployment_id,
                kinds=list(kinds),
                send_initial_state=snapshot,
            )
            if last is not None and not snapshot:
                request.after_sequence = last
            call = self._stub.WatchDrift(request, metadata=self._metadata)
            try:
                async for message in call:
                    delay = 0.1
                    which = message.WhichOneof("message")
                    if which == "event":
                        last = message.event.sequence
                    elif which == "snapshot_complete":
                        last = message.snapshot_complete.sequence
                        snapshot = False
                    elif which == "heartbeat":
                        last = (
                            message.heartbeat.sequence
                            if last is None
                            else max(last, message.heartbeat.sequence)
                        )
                        if not heartbeats:
                            continue
                    yield message
                return  # the server ended the stream cleanly (it does not, normally)
            except grpc.RpcError as e:
                slow = e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and errors.trailers(e)[0] == _TOO_SLOW
                if e.code() not in _RESUMABLE and not slow:
                    raise errors.from_rpc_error(e) from e
            finally:
                call.cancel()
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))  # noqa: S311 - jitter
            delay = min(max_backoff, delay * 2)

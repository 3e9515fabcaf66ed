"""An example manager: a controller for ``Database`` resources (platform.company.com/v1) that asks
the broker for the workloads, as in the original design.

- A new or changed Database (``metadata.generation`` ahead of ``status.observedGeneration``) is
  provisioned through the broker; ``status.deploymentId`` records the answer, the phase becomes
  Provisioning. A finalizer makes sure deletion deprovisions, even if the manager was down.
- The broker's callback (verified, de-duplicated) sets ``status.phase`` Ready or Failed.
- Drift events from WatchDrift set ``status.phase: DriftDetected`` with the drift in the message and
  emit a Kubernetes Event: ``Remediating`` when the broker's policy auto-remediates, a Warning
  ``DriftAlert`` when it only alerts. ``DriftResolved`` returns the phase to Ready.

Run it with ``python -m broker_client.examples.database_manager --broker HOST:PORT --token ...``;
it needs ``pip install 'resource-broker-client[example]'`` (kubernetes-asyncio).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

from kubernetes_asyncio import client as k8s
from kubernetes_asyncio import config as k8s_config
from kubernetes_asyncio import watch as k8s_watch
from kubernetes_asyncio.client.exceptions import ApiException

from broker_client import callbacks, errors
from broker_client.client import BrokerClient
from broker_client.v1 import broker_pb2 as pb

log = logging.getLogger("database-manager")

GROUP, VERSION, PLURAL = "platform.company.com", "v1", "databases"
FINALIZER = "platform.company.com/deprovision"
COMPONENT = "database-manager"

# The CRD this manager serves (deploy/database-crd.yaml holds the same, for kubectl apply).
DATABASE_CRD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": f"{PLURAL}.{GROUP}"},
    "spec": {
        "group": GROUP,
        "scope": "Namespaced",
        "names": {
            "kind": "Database",
            "listKind": "DatabaseList",
            "plural": PLURAL,
            "singular": "database",
            "shortNames": ["db"],
        },
        "versions": [
            {
                "name": VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": [
                    {"name": "Engine", "type": "string", "jsonPath": ".spec.engine"},
                    {"name": "Version", "type": "string", "jsonPath": ".spec.version"},
                    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                ],
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {
                                "type": "object",
                                "required": ["engine", "version", "size"],
                                "properties": {
                                    "engine": {"type": "string", "enum": ["postgresql", "mysql"]},
                                    "version": {"type": "string"},
                                    "size": {"type": "string"},
                                    "replicas": {"type": "integer", "minimum": 1, "default": 1},
                                },
                            },
                            "status": {
                                "type": "object",
                                "properties": {
                                    "deploymentId": {"type": "string"},
                                    "phase": {"type": "string"},
                                    "message": {"type": "string"},
                                    "observedGeneration": {"type": "integer"},
                                },
                            },
                        },
                    }
                },
            }
        ],
    },
}

_DRIFT_KINDS = (
    pb.DRIFT_EVENT_KIND_DRIFT_DETECTED,
    pb.DRIFT_EVENT_KIND_DRIFT_CHANGED,
    pb.DRIFT_EVENT_KIND_RESOURCE_MISSING,
)


class DatabaseManager:
    """Reconciles Database resources through the broker."""

    def __init__(
        self,
        *,
        broker: BrokerClient,
        kube: k8s.ApiClient,
        callback_url: str,
        namespaces: list[str],
        on_event: Callable[[str, str, str], Awaitable[None] | None] | None = None,
    ) -> None:
        self._broker = broker
        self._custom = k8s.CustomObjectsApi(kube)
        self._core = k8s.CoreV1Api(kube)
        self._callback_url = callback_url
        self._namespaces = namespaces
        self._on_event = on_event
        # Generations already handed to the broker: our own finalizer and status patches come back
        # as watch events before the status shows observedGeneration.
        self._requested: set[str] = set()

    async def run(self) -> None:
        """Reconcile Databases and follow drift until cancelled."""
        await asyncio.gather(*(self._watch_databases(ns) for ns in self._namespaces), self._follow_drift())

    # Databases -------------------------------------------------------------------------------------

    async def _watch_databases(self, namespace: str) -> None:
        while True:
            try:
                listing = await self._custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)
                for item in listing.get("items", []):
                    await self._reconcile(item)
                watcher = k8s_watch.Watch()
                async with watcher.stream(
                    self._custom.list_namespaced_custom_object,
                    GROUP,
                    VERSION,
                    namespace,
                    PLURAL,
                    resource_version=listing["metadata"]["resourceVersion"],
                    timeout_seconds=300,
                ) as stream:
                    async for event in stream:
                        if event["type"] in ("ADDED", "MODIFIED"):
                            await self._reconcile(event["object"])
            except (ApiException, errors.BrokerError, OSError) as e:
                log.warning("database watch failed; retrying: %s", e)
                await asyncio.sleep(1)

    async def _reconcile(self, db: dict[str, Any]) -> None:
        meta, spec, status = db["metadata"], db.get("spec", {}), db.get("status") or {}
        namespace, name = meta["namespace"], meta["name"]
        if meta.get("deletionTimestamp"):
            if FINALIZER in (meta.get("finalizers") or []):
                if status.get("deploymentId"):
                    with contextlib.suppress(errors.NotFound):
                        await self._broker.deprovision(namespace, status["deploymentId"])
                    await self._emit(db, "Normal", "Deprovisioned", "Asked the broker to delete the database")
                finalizers = [f for f in meta["finalizers"] if f != FINALIZER]
                await self._custom.patch_namespaced_custom_object(
                    GROUP,
                    VERSION,
                    namespace,
                    PLURAL,
                    name,
                    {"metadata": {"finalizers": finalizers}},
                    _content_type="application/merge-patch+json",
                )
            return
        if FINALIZER not in (meta.get("finalizers") or []):
            await self._custom.patch_namespaced_custom_object(
                GROUP,
                VERSION,
                namespace,
                PLURAL,
                name,
                {"metadata": {"finalizers": [*(meta.get("finalizers") or []), FINALIZER]}},
                _content_type="application/merge-patch+json",
            )
        generation = int(meta.get("generation", 1))
        request_id = f"{meta['uid']}-{generation}"
        if status.get("observedGeneration") == generation or request_id in self._requested:
            return
        self._requested.add(request_id)
        try:
            reply = await self._broker.provision(
                namespace=namespace,
                resource_type="database",
                resource_name=name,
                engine=spec["engine"],
                version=str(spec["version"]),
                size=spec["size"],
                replicas=int(spec.get("replicas", 1)),
                callback_url=self._callback_url,
                request_id=request_id,
            )
        except errors.BrokerError:
            # Not handed over: the next reconcile retries (the request id makes that safe).
            self._requested.discard(request_id)
            raise
        await self._status(
            namespace,
            name,
            deploymentId=reply.deployment_id,
            phase="Provisioning",
            message="Provisioning requested from the broker",
            observedGeneration=generation,
        )
        await self._emit(
            db,
            "Normal",
            "Provisioning",
            f"Broker deployment {reply.deployment_id}, generation {reply.generation}",
        )

    # Callbacks and drift ---------------------------------------------------------------------------

    async def on_callback(self, delivery: callbacks.Delivery) -> None:
        """A verified broker callback: Ready or Failed."""
        payload = delivery.payload
        namespace, name = str(payload["namespace"]), str(payload["resourceName"])
        phase = "Ready" if payload.get("status") == "Ready" else "Failed"
        await self._status(namespace, name, phase=phase, message=str(payload.get("message", "")))
        db = await self._get(namespace, name)
        if db is not None:
            await self._emit(
                db, "Normal" if phase == "Ready" else "Warning", phase, str(payload.get("message", ""))
            )

    async def _follow_drift(self) -> None:
        async for message in self._broker.watch_drift(namespaces=self._namespaces, resource_type="database"):
            if message.WhichOneof("message") != "event":
                continue
            event = message.event
            db = await self._get(event.namespace, event.resource_name)
            if db is None or (db.get("status") or {}).get("deploymentId") != event.deployment_id:
                continue
            text = "; ".join(
                i.message for i in event.drift_items if i.drift_class == pb.DRIFT_CLASS_UNEXPECTED
            )
            if event.kind in _DRIFT_KINDS:
                await self._status(event.namespace, event.resource_name, phase="DriftDetected", message=text)
                auto = any(
                    i.recommended_action == pb.RECOMMENDED_ACTION_AUTO_REMEDIATE for i in event.drift_items
                )
                if auto:
                    await self._emit(
                        db, "Warning", "DriftDetected", f"{text}; the broker is re-applying the desired state"
                    )
                else:
                    await self._emit(db, "Warning", "DriftAlert", f"{text}; alert only, operators must act")
            elif event.kind == pb.DRIFT_EVENT_KIND_REMEDIATION_SUCCEEDED:
                await self._emit(db, "Normal", "Remediated", event.message)
            elif event.kind == pb.DRIFT_EVENT_KIND_DRIFT_RESOLVED:
                await self._status(
                    event.namespace, event.resource_name, phase="Ready", message="Drift resolved"
                )
                await self._emit(db, "Normal", "DriftResolved", event.message)

    # Kubernetes helpers ----------------------------------------------------------------------------

    async def _get(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            found: dict[str, Any] = await self._custom.get_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name
            )
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        return found

    async def _status(self, namespace: str, name: str, **fields: Any) -> None:
        with contextlib.suppress(ApiException):
            await self._custom.patch_namespaced_custom_object_status(
                GROUP,
                VERSION,
                namespace,
                PLURAL,
                name,
                {"status": fields},
                _content_type="application/merge-patch+json",
            )

    async def _emit(self, db: dict[str, Any], kind: str, reason: str, message: str) -> None:
        meta = db["metadata"]
        now = datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")
        body = {
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "Database",
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta["uid"],
            },
            "reason": reason,
            "message": message,
            "type": kind,
            "source": {"component": COMPONENT},
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        with contextlib.suppress(ApiException):
            await self._core.create_namespaced_event(meta["namespace"], body)
        if self._on_event is not None:
            result = self._on_event(kind, reason, message)
            if result is not None:
                await result


async def run_manager(
    *,
    broker_target: str,
    token: str | None,
    namespaces: list[str],
    callback_key: bytes,
    kubeconfig: str | None,
    callback_host: str,
    callback_port: int,
    advertise: str,
) -> None:
    """Run the manager with its callback endpoint until cancelled."""
    configuration = k8s.Configuration()
    if kubeconfig:
        await k8s_config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    else:
        k8s_config.load_incluster_config(client_configuration=configuration)
    async with (
        k8s.ApiClient(configuration) as kube,
        await BrokerClient.connect(broker_target, token=token) as broker,
    ):
        server: callbacks.CallbackServer | None = None
        manager: DatabaseManager | None = None

        async def handle(delivery: callbacks.Delivery) -> None:
            assert manager is not None
            await manager.on_callback(delivery)

        server = callbacks.CallbackServer(callbacks.CallbackVerifier(callback_key), handle)
        await server.start(callback_host, callback_port)
        manager = DatabaseManager(
            broker=broker,
            kube=kube,
            callback_url=f"{advertise}:{server.port}/v1/callback",
            namespaces=namespaces,
        )
        try:
            await manager.run()
        finally:
            await server.stop()


def main() -> None:
    """Command-line entry point of the example manager."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker", default="localhost:50051")
    parser.add_argument("--token", default=os.environ.get("BROKER_TOKEN"))
    parser.add_argument("--namespace", action="append", required=True, dest="namespaces")
    parser.add_argument("--callback-key-file", required=True)
    parser.add_argument("--kubeconfig")
    parser.add_argument("--listen", default="0.0.0.0:8080")
    parser.add_argument(
        "--advertise", default="http://database-manager", help="scheme://host the broker calls back"
    )
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    with open(args.callback_key_file, "rb") as f:
        key = f.read().strip()
    logging.basicConfig(level=logging.INFO)
    asyncio.run(
        run_manager(
            broker_target=args.broker,
            token=args.token,
            namespaces=args.namespaces,
            callback_key=key,
            kubeconfig=args.kubeconfig,
            callback_host=host,
            callback_port=int(port),
            advertise=args.advertise,
        )
    )


if __name__ == "__main__":
    main()

"""An example manager: a controller for ``Database`` resources (platform.company.com/v1) that asks
the broker for the workloads, as in the original design.

- At start it makes sure the ``Database`` CRD is served: it applies it (server-side apply, field
  manager ``database-manager``) when its credentials allow, uses the installed one when they do not,
  and stops with a message saying how to install it when it is missing (``--print-crd`` prints it).
- A new or changed Database (``metadata.generation`` ahead of ``status.observedGeneration``) is
  provisioned through the broker; ``status.deploymentId`` records the answer, the phase becomes
  Provisioning. A finalizer makes sure deletion deprovisions, even if the manager was down.
- A Provision the broker refuses (an invalid spec) is logged as ``provision of NS/NAME failed:
  ...``, sets ``status.phase: Failed`` with the reason and emits a Warning ``ProvisionFailed``
  Event; it is retried when the spec changes. One that could not reach the broker is retried with
  backoff.
- The broker's callback (verified, de-duplicated) sets ``status.phase`` Ready or Failed.
- Drift events from WatchDrift set ``status.phase: DriftDetected`` with the drift in the message and
  emit a Kubernetes Event: ``Remediating`` when the broker's policy auto-remediates, a Warning
  ``DriftAlert`` when it only alerts. ``DriftResolved`` returns the phase to Ready.

Run it with ``python -m broker_client.examples.database_manager --target HOST:PORT --token TOKEN
-n NAMESPACE --callback-key-file FILE --advertise http://database-manager:8080``; the flags are
those of ``broker get``/``broker watch`` (``broker_client.flags``). It needs
``pip install 'resource-broker-client[example]'`` (kubernetes-asyncio).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import ipaddress
import json
import logging
import re
import sys
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from kubernetes_asyncio import client as k8s
from kubernetes_asyncio import config as k8s_config
from kubernetes_asyncio import watch as k8s_watch
from kubernetes_asyncio.client.exceptions import ApiException

from broker_client import callbacks, errors, flags
from broker_client.client import BrokerClient
from broker_client.v1 import broker_pb2 as pb

log = logging.getLogger("database-manager")

GROUP, VERSION, PLURAL = "platform.company.com", "v1", "databases"
CRD_NAME = f"{PLURAL}.{GROUP}"
FINALIZER = "platform.company.com/deprovision"
COMPONENT = "database-manager"
INSTALL_HINT = (
    "install it as a cluster administrator with `kubectl apply -f deploy/database-crd.yaml` "
    "(or `python -m broker_client.examples.database_manager --print-crd | kubectl apply -f -`), "
    "or allow this manager to get and patch customresourcedefinitions"
)
# The broker refused the request itself: retrying the same spec cannot help.
_REFUSED = (errors.InvalidArgument, errors.FailedPrecondition, errors.AlreadyExists)
_MAX_RETRY_DELAY = 10.0

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


class ManagerError(Exception):
    """The manager cannot run as configured; the message says what to do."""


class CrdNotInstalled(ManagerError):
    """The Database CRD is not served and this manager could not install it."""


def _api_error(e: ApiException) -> str:
    """``403 Forbidden: <the Status message>``, trimmed (a body is never logged whole)."""
    message = ""
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        message = str(json.loads(e.body or "{}").get("message") or "")
    text = f"{e.status} {e.reason or ''}".strip()
    return f"{text}: {message[:300]}" if message else text


def _established(crd: dict[str, Any]) -> bool:
    conditions = (crd.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Established" and c.get("status") == "True" for c in conditions)


async def ensure_crd(kube: k8s.ApiClient, *, namespace: str, within: float = 30.0) -> bool:
    """Make sure the Database CRD is served before watching Databases; True if this call applied it.

    It is applied with server-side apply (field manager ``database-manager``), so re-applying
    an unchanged CRD changes nothing and an older one is brought up to date. A manager whose
    credentials may not write CRDs (403) uses the installed CRD, checked by listing Databases in
    ``namespace``; if there is none it raises ``CrdNotInstalled``, whose message says how to
    install it, rather than retrying 404s forever.
    """
    extensions = k8s.ApiextensionsV1Api(kube)
    try:
        applied = await extensions.patch_custom_resource_definition(
            CRD_NAME,
            DATABASE_CRD,
            field_manager=COMPONENT,
            force=True,
            _content_type="application/apply-patch+yaml",
        )
    except ApiException as e:
        if e.status != 403:
            raise CrdNotInstalled(
                f"could not install the Database CRD {CRD_NAME}: {_api_error(e)}; {INSTALL_HINT}"
            ) from e
        forbidden = _api_error(e)
    else:
        # A new CRD is served once Established (at once, usually); watching before gets 404s.
        crd = applied.to_dict()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while not _established(crd):
            if loop.time() > deadline:
                raise CrdNotInstalled(
                    f"the Database CRD {CRD_NAME} was applied but is not Established after {within:g} s"
                )
            await asyncio.sleep(0.2)
            crd = (await extensions.read_custom_resource_definition(CRD_NAME)).to_dict()
        log.info("applied the Database CRD %s (server-side apply as %s)", CRD_NAME, COMPONENT)
        return True
    try:
        await k8s.CustomObjectsApi(kube).list_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, limit=1
        )
    except ApiException as e:
        if e.status == 404:
            raise CrdNotInstalled(
                f"the Database CRD {CRD_NAME} is not installed, and this manager may not install it "
                f"({forbidden}); {INSTALL_HINT}"
            ) from e
        raise CrdNotInstalled(
            f"this manager may not install the Database CRD {CRD_NAME} ({forbidden}) and cannot list "
            f"Databases in {namespace!r} ({_api_error(e)}); {INSTALL_HINT}"
        ) from e
    log.info(
        "the Database CRD %s is installed; this manager may not update it (%s) and uses it as it is",
        CRD_NAME,
        forbidden,
    )
    return False


_HOST = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*$")


def callback_url(advertise: str) -> str:
    """The callback URL the broker is given: ``<advertise>/v1/callback``.

    ``advertise`` is where the broker reaches this manager: ``http(s)://host:port``, ``host:port``
    (taken as ``http://host:port``) or ``http(s)://host`` (the scheme's port, e.g. behind a
    Service on port 80). Anything else is a ValueError that says what is wrong: no port after a
    bare host, a port that is not 1..65535 (``host:port:port`` included), a path (the manager
    appends ``/v1/callback`` itself), a query, a fragment, user info, another scheme.
    """
    text = advertise.strip()
    example = f"http://{COMPONENT}:8080"
    if not text or any(c.isspace() for c in text):
        raise ValueError(
            f"{advertise!r} is not a URL; give the address the broker calls back, like {example}"
        )
    bare = "://" not in text
    if bare:
        text = f"http://{text}"
    parts = urllib.parse.urlsplit(text)
    if parts.scheme.lower() not in ("http", "https"):
        raise ValueError(f"{advertise!r}: the scheme must be http or https, like {example}")
    if "@" in parts.netloc:
        raise ValueError(f"{advertise!r}: user info is not allowed")
    if parts.path not in ("", "/"):
        raise ValueError(
            f"{advertise!r} has a path ({parts.path}); give only scheme://host:port, "
            f"the manager appends {callbacks.CALLBACK_PATH}"
        )
    if parts.query or parts.fragment or "?" in text or "#" in text:
        raise ValueError(f"{advertise!r}: a query or fragment is not allowed")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(
            f"{advertise!r}: the port must be one number between 1 and 65535, like {example}"
        ) from None
    host = parts.hostname or ""
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{advertise!r}: {host!r} is not an IPv6 address") from None
    elif not _HOST.match(host):
        raise ValueError(f"{advertise!r}: {host!r} is not a host name or IPv4 address, like {example}")
    if port == 0:
        raise ValueError(f"{advertise!r}: the port must be between 1 and 65535")
    if bare and port is None:
        raise ValueError(f"{advertise!r} has no port: give host:port or a URL, like {example}")
    return f"{parts.scheme.lower()}://{parts.netloc}{callbacks.CALLBACK_PATH}"


class _RetryLater(Exception):
    """A broker call failed in a way worth retrying; it was logged where it happened."""


def _reason(e: errors.BrokerError) -> str:
    return f"{e.code.name}: {e.message}"


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
        self._kube = kube
        self._custom = k8s.CustomObjectsApi(kube)
        self._core = k8s.CoreV1Api(kube)
        self.callback_url = callback_url
        self._namespaces = namespaces
        self._on_event = on_event
        # Generations already handed to the broker: our own finalizer and status patches come back
        # as watch events before the status shows observedGeneration.
        self._requested: set[str] = set()

    async def run(self) -> None:
        """Make sure the CRD is served, then reconcile Databases and follow drift until cancelled.

        Raises ``CrdNotInstalled`` when the CRD is missing and cannot be installed (``ensure_crd``).
        """
        await ensure_crd(self._kube, namespace=self._namespaces[0])
        await asyncio.gather(*(self._watch_databases(ns) for ns in self._namespaces), self._follow_drift())

    # Databases -------------------------------------------------------------------------------------

    async def _watch_databases(self, namespace: str) -> None:
        delay = 1.0
        while True:
            try:
                listing = await self._custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)
                for item in listing.get("items", []):
                    await self._reconcile(item)
                delay = 1.0
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
                continue  # the watch timed out: list again
            except _RetryLater:
                pass  # logged where it failed, as what failed
            except ApiException as e:
                if e.status == 404:
                    log.warning(
                        "listing Databases in %s failed: the Database CRD %s is not served (%s); %s",
                        namespace,
                        CRD_NAME,
                        _api_error(e),
                        INSTALL_HINT,
                    )
                else:
                    log.warning("database watch in %s failed; retrying: %s", namespace, _api_error(e))
            except (OSError, errors.BrokerError) as e:
                log.warning("database watch in %s failed; retrying: %s", namespace, e)
            await asyncio.sleep(delay)
            delay = min(_MAX_RETRY_DELAY, delay * 2)

    async def _reconcile(self, db: dict[str, Any]) -> None:
        meta, spec, status = db["metadata"], db.get("spec", {}), db.get("status") or {}
        namespace, name = meta["namespace"], meta["name"]
        if meta.get("deletionTimestamp"):
            if FINALIZER in (meta.get("finalizers") or []):
                if status.get("deploymentId"):
                    try:
                        await self._broker.deprovision(namespace, status["deploymentId"])
                    except errors.NotFound:
                        pass
                    except errors.BrokerError as e:
                        log.warning("deprovision of %s/%s failed: %s", namespace, name, _reason(e))
                        raise _RetryLater from e
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
            replicas = int(spec.get("replicas", 1))
        except (TypeError, ValueError):
            await self._refused(db, generation, f"spec.replicas {spec.get('replicas')!r} is not a number")
            return
        try:
            reply = await self._broker.provision(
                namespace=namespace,
                resource_type="database",
                resource_name=name,
                engine=str(spec.get("engine", "")),
                version=str(spec.get("version", "")),
                size=str(spec.get("size", "")),
                replicas=replicas,
                callback_url=self.callback_url,
                request_id=request_id,
            )
        except _REFUSED as e:
            await self._refused(db, generation, _reason(e))
            return
        except errors.BrokerError as e:
            # Not handed over: retried later (the request id makes that safe).
            log.warning("provision of %s/%s failed: %s; retrying", namespace, name, _reason(e))
            self._requested.discard(request_id)
            raise _RetryLater from e
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

    async def _refused(self, db: dict[str, Any], generation: int, reason: str) -> None:
        """This generation's spec cannot be provisioned: say so on the Database, until it changes."""
        namespace, name = db["metadata"]["namespace"], db["metadata"]["name"]
        log.warning("provision of %s/%s failed: %s", namespace, name, reason)
        await self._status(
            namespace,
            name,
            phase="Failed",
            message=f"Provision failed: {reason}",
            observedGeneration=generation,
        )
        await self._emit(db, "Warning", "ProvisionFailed", reason)

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


@contextlib.asynccontextmanager
async def kubernetes(kubeconfig: str | None) -> AsyncIterator[k8s.ApiClient]:
    """A Kubernetes API client from a kubeconfig file, or in-cluster config when None."""
    configuration = k8s.Configuration()
    if kubeconfig:
        await k8s_config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    else:
        k8s_config.load_incluster_config(client_configuration=configuration)
    async with k8s.ApiClient(configuration) as kube:
        yield kube


async def run_manager(
    *,
    broker_target: str,
    token: str | None,
    namespaces: list[str],
    callback_key: bytes,
    kubeconfig: str | None,
    callback_host: str,
    callback_port: int,
    advertise: str | None,
    tls: bool = False,
) -> None:
    """Run the manager with its callback endpoint until cancelled.

    ``advertise`` is the base URL the broker calls back (see ``callback_url``); None means
    ``http://database-manager:<the port listened on>``, a Service named after the manager.
    """
    url = callback_url(advertise) if advertise is not None else None
    async with (
        kubernetes(kubeconfig) as kube,
        await BrokerClient.connect(broker_target, token=token, tls=tls) as broker,
    ):
        manager: DatabaseManager | None = None

        async def handle(delivery: callbacks.Delivery) -> None:
            assert manager is not None
            await manager.on_callback(delivery)

        server = callbacks.CallbackServer(callbacks.CallbackVerifier(callback_key), handle)
        await server.start(callback_host, callback_port)
        try:
            manager = DatabaseManager(
                broker=broker,
                kube=kube,
                callback_url=url or callback_url(f"http://{COMPONENT}:{server.port}"),
                namespaces=namespaces,
            )
            log.info("serving callbacks on %s:%d for %s", callback_host, server.port, manager.callback_url)
            await manager.run()
        finally:
            await server.stop()


def _advertise(value: str) -> str:
    try:
        callback_url(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def _listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"{value!r} is not HOST:PORT (port 0 picks a free one)")
    return host.strip("[]") or "0.0.0.0", int(port)


class _PrintCrd(argparse.Action):
    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        print(json.dumps(DATABASE_CRD, indent=2))
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    """The manager's flags: the client programs' shared ones (``broker_client.flags``) and its own."""
    parser = argparse.ArgumentParser(
        prog="python -m broker_client.examples.database_manager",
        description="The example manager of Database resources: it provisions them through the broker.",
    )
    flags.add_connection_flags(parser, deprecated_target_aliases=["--broker"])
    flags.add_namespace_flag(
        parser, repeatable=True, required=True, help="namespace whose Databases to manage (repeatable)"
    )
    parser.add_argument(
        "--callback-key-file", metavar="FILE", required=True, help="the broker's callback HMAC key"
    )
    parser.add_argument("--kubeconfig", metavar="FILE", help="default: the pod's service account")
    parser.add_argument(
        "--listen",
        metavar="HOST:PORT",
        type=_listen,
        default="0.0.0.0:8080",
        help="where to serve callbacks (default 0.0.0.0:8080)",
    )
    parser.add_argument(
        "--advertise",
        metavar="URL",
        type=_advertise,
        help=(
            "how the broker reaches this manager: http(s)://host:port or host:port; the callback URL "
            f"is URL{callbacks.CALLBACK_PATH} (default http://{COMPONENT}:<listen port>)"
        ),
    )
    parser.add_argument("--print-crd", action=_PrintCrd, help="print the Database CRD (JSON) and exit")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point of the example manager; returns its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    host, port = args.listen
    with open(args.callback_key_file, "rb") as f:
        key = f.read().strip()
    logging.basicConfig(level=logging.INFO)
    try:
        asyncio.run(
            run_manager(
                broker_target=args.target,
                token=args.token,
                namespaces=args.namespace,
                callback_key=key,
                kubeconfig=args.kubeconfig,
                callback_host=host,
                callback_port=port,
                advertise=args.advertise,
                tls=args.tls,
            )
        )
    except ManagerError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

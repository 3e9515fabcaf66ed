"""A small raw-JSON Kubernetes client on kubernetes-asyncio's ApiClient (this package owns it).

Objects travel as plain dicts: the broker applies manifests it builds itself and reads a handful of
fields, so the generated model classes would only cost time. Library and HTTP errors are translated
here, once, into the broker's own exceptions; error text is trimmed to the API's ``message`` (never
a request body, which for a Secret holds credentials).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import pathlib
import urllib.parse
from collections.abc import AsyncIterator, Callable
from typing import Any, Generic, TypeVar

import aiohttp
import aiohttp.helpers
import msgspec
import yarl
from kubernetes_asyncio import client as k8s_client
from kubernetes_asyncio import config as k8s_config
from kubernetes_asyncio.client import exceptions as k8s_exceptions
from kubernetes_asyncio.config import config_exception

from broker import errors

log = logging.getLogger(__name__)

FIELD_MANAGER = "resource-broker"
JsonDict = dict[str, Any]
T = TypeVar("T")


@dataclasses.dataclass(frozen=True, slots=True)
class ListPage(Generic[T]):
    """One page of a list: its items (as the page's decoder made them), version and continue token."""

    items: list[T]
    resource_version: str
    continue_token: str


class _Envelope(msgspec.Struct):
    """A watch event with its object still undecoded (an ERROR event's is a Status)."""

    type: str = ""
    object: msgspec.Raw = msgspec.field(default_factory=lambda: msgspec.Raw(b"{}"))


_ENVELOPE = msgspec.json.Decoder(_Envelope)
_ENCODER = msgspec.json.Encoder()


@functools.cache
def _timeout(seconds: float | None) -> aiohttp.ClientTimeout:
    """A request's whole time limit (none for watches, which the server ends)."""
    return aiohttp.ClientTimeout(total=seconds) if seconds else aiohttp.ClientTimeout()


@dataclasses.dataclass(frozen=True)
class Kind:
    """Where a kind lives in the REST API."""

    name: str
    prefix: str  # "api/v1" or "apis/GROUP/VERSION"
    plural: str
    namespaced: bool = True


KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        Kind("StatefulSet", "apis/apps/v1", "statefulsets"),
        Kind("Service", "api/v1", "services"),
        Kind("Secret", "api/v1", "secrets"),
        Kind("Pod", "api/v1", "pods"),
        Kind("PersistentVolumeClaim", "api/v1", "persistentvolumeclaims"),
        Kind("KafkaTopic", "apis/kafka.strimzi.io/v1beta2", "kafkatopics"),
        Kind("PodMetrics", "apis/metrics.k8s.io/v1beta1", "pods"),
        Kind("Event", "api/v1", "events"),
        Kind("Namespace", "api/v1", "namespaces", namespaced=False),
        Kind("Lease", "apis/coordination.k8s.io/v1", "leases"),
        Kind(
            "ValidatingAdmissionPolicy",
            "apis/admissionregistration.k8s.io/v1",
            "validatingadmissionpolicies",
            namespaced=False,
        ),
        Kind(
            "ValidatingAdmissionPolicyBinding",
            "apis/admissionregistration.k8s.io/v1",
            "validatingadmissionpolicybindings",
            namespaced=False,
        ),
        Kind(
            "CustomResourceDefinition",
            "apis/apiextensions.k8s.io/v1",
            "customresourcedefinitions",
            namespaced=False,
        ),
    )
}


class Expired(errors.Unavailable):
    """A watch's resourceVersion is older than the API server keeps (410 Gone): relist."""

    default_reason = "WATCH_EXPIRED"


class Conflict(errors.FailedPrecondition):
    """409 Conflict: a write from a stale resourceVersion, or a create of an object that exists.

    Its own class so that optimistic-concurrency loops (leader election) can tell "someone else
    wrote first: read again" from other refusals; callers that do not care see FailedPrecondition.
    """

    default_reason = "KUBERNETES_CONFLICT"


class NamespaceMissing(errors.Unavailable):
    """A write was refused because its namespace does not exist (yet: it may be created soon)."""

    default_reason = "NAMESPACE_NOT_FOUND"


def _missing_namespace(body: Any) -> str:
    """The namespace a 404 Status body says is missing, or ""."""
    with contextlib.suppress(TypeError, ValueError, AttributeError):
        details = json.loads(body).get("details") or {}
        if details.get("kind") == "namespaces":
            return str(details.get("name", ""))
    return ""


def _message(status: int, body: Any) -> str:
    text = ""
    with contextlib.suppress(TypeError, ValueError, AttributeError):
        text = str(json.loads(body).get("message", ""))
    return (text or f"HTTP {status}")[:300]


def translate(exc: BaseException, what: str, *, body: bytes | None = None) -> errors.BrokerError:
    """The broker exception for a failed Kubernetes call about ``what``."""
    if isinstance(exc, k8s_exceptions.ApiException):
        status = int(exc.status or 0)
        message = _message(status, body if body is not None else exc.body)
        if status == 404:
            missing = _missing_namespace(body if body is not None else exc.body)
            if missing:
                # kube-apiserver's NamespaceLifecycle: the object is fine, its namespace is not there.
                return NamespaceMissing(
                    f"namespace {missing} does not exist in the cluster; create it "
                    f"(kubectl create namespace {missing}) or provision into a namespace that exists"
                )
            return errors.NotFound(f"{what}: not found ({message})")
        if status == 409:
            return Conflict(f"{what}: conflict ({message})")
        if status == 410:
            return Expired(f"{what}: {message}")
        if status == 422:
            return errors.FailedPrecondition(
                f"{what}: rejected as invalid ({message})", reason="KUBERNETES_INVALID"
            )
        if status in (401, 403):
            return errors.Unavailable(
                f"{what}: the Kubernetes API refused the broker's credentials ({message})",
                reason="KUBERNETES_FORBIDDEN",
            )
        return errors.Unavailable(f"{what}: the Kubernetes API answered {status} ({message})")
    return errors.Unavailable(f"{what}: cannot reach the Kubernetes API ({type(exc).__name__})")


def _proxy_once(api: k8s_client.ApiClient, host: str) -> None:
    """Take the proxy the environment names for the API server (``HTTPS_PROXY``, ``NO_PROXY``) once.

    The library's HTTP session trusts the environment, so it looked the proxy variables up and
    read ``~/.netrc`` (in a thread) at every request: 0.5-1 ms of CPU each, several per provision.
    Their answer does not change while the process runs. A kubeconfig's ``proxy-url`` still wins,
    and the API server's credentials are the kubeconfig's, never a netrc's.
    """
    rest = api.rest_client
    if not rest.proxy:
        with contextlib.suppress(LookupError):
            proxy, auth = aiohttp.helpers.get_env_proxy_for_url(yarl.URL(host))
            rest.proxy = str(proxy)
            if auth is not None:
                rest.proxy_headers = {**(rest.proxy_headers or {}), "Proxy-Authorization": auth.encode()}
    rest.pool_manager._trust_env = False  # the session's own per-request lookup, replaced by the above


class Client:
    """Apply, delete, list and watch objects as JSON dicts."""

    def __init__(self, api: k8s_client.ApiClient, *, host: str) -> None:
        self._api = api
        self.host = host

    @classmethod
    async def connect(cls, kubeconfig: pathlib.Path | None = None, *, context: str | None = None) -> Client:
        """Connect from a kubeconfig file, else the in-cluster service account, else ~/.kube/config."""
        configuration = k8s_client.Configuration()
        try:
            if kubeconfig is not None:
                await k8s_config.load_kube_config(
                    config_file=str(kubeconfig), context=context, client_configuration=configuration
                )
            else:
                try:
                    k8s_config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
                except config_exception.ConfigException:
                    await k8s_config.load_kube_config(context=context, client_configuration=configuration)
        except (config_exception.ConfigException, OSError) as e:
            raise errors.Unavailable(f"cannot load Kubernetes configuration: {e}") from e
        api = k8s_client.ApiClient(configuration)
        api.user_agent = f"{FIELD_MANAGER}/0.1"
        _proxy_once(api, str(configuration.host))
        return cls(api, host=str(configuration.host))

    async def close(self) -> None:
        """Close the HTTP connections."""
        await self._api.close()

    @staticmethod
    def path(kind: str, namespace: str | None = None, name: str | None = None) -> str:
        """The REST path of a kind's collection (all namespaces when ``namespace`` is None) or object."""
        k = KINDS[kind]
        path = f"/{k.prefix}"
        if k.namespaced and namespace is not None:
            path += f"/namespaces/{namespace}"
        path += f"/{k.plural}"
        if name is not None:
            path += f"/{name}"
        return path

    async def _call(
        self,
        method: str,
        path: str,
        *,
        what: str,
        query: list[tuple[str, Any]] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        request_timeout: float | None = 30.0,
    ) -> aiohttp.ClientResponse:
        """One request on the library's HTTP session, with its credentials; the body as JSON bytes.

        The library's ``call_api`` would walk every body to "sanitize" it (it is plain JSON already)
        and encode it with the standard library: a third of the CPU of each write, three writes per
        provision. Its session (TLS, proxy, connection pool) and its credentials (tokens refreshed
        by their hooks) are still the ones used.
        """
        api = self._api
        rest = api.rest_client
        headers = {**api.default_headers, "Accept": "application/json"}
        params = list(query or [])
        data = None
        if body is not None:
            headers["Content-Type"] = content_type
            data = _ENCODER.encode(body)
        try:
            await api.update_params_for_auth(headers, params, ["BearerToken"])
            url = f"{self.host}{path}?{urllib.parse.urlencode(params)}" if params else self.host + path
            response = await rest.pool_manager.request(
                method,
                url,
                data=data,
                headers=headers,
                timeout=_timeout(request_timeout),
                proxy=rest.proxy,
                proxy_headers=rest.proxy_headers,
                server_hostname=rest.server_hostname,
            )
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            raise translate(e, what) from e
        if response.status >= 400:
            # Read the Status body and translate.
            try:
                failed = await response.read()
            except (TimeoutError, aiohttp.ClientError):
                failed = b""
            finally:
                response.release()
            failure = k8s_exceptions.ApiException(status=response.status, reason=response.reason)
            raise translate(failure, what, body=failed)
        return response

    async def _bytes(self, method: str, path: str, *, what: str, **kw: Any) -> bytes:
        response = await self._call(method, path, what=what, **kw)
        try:
            return await response.read()
        except (TimeoutError, aiohttp.ClientError) as e:
            raise translate(e, what) from e
        finally:
            response.release()

    async def _json(self, method: str, path: str, *, what: str, **kw: Any) -> JsonDict:
        body = await self._bytes(method, path, what=what, **kw)
        try:
            data = msgspec.json.decode(body) if body else {}
        except ValueError as e:
            raise translate(e, what) from e
        if not isinstance(data, dict):
            raise errors.Unavailable(f"{what}: the Kubernetes API answered with no object")
        return data

    async def apply(self, obj: JsonDict, *, force: bool = True) -> JsonDict:
        """Server-side apply ``obj`` under the broker's field manager; returns the live object."""
        meta = obj["metadata"]
        what = f"apply {obj['kind']} {meta.get('namespace', '')}/{meta['name']}"
        return await self._json(
            "PATCH",
            self.path(obj["kind"], meta.get("namespace"), meta["name"]),
            what=what,
            query=[("fieldManager", FIELD_MANAGER), ("force", "true" if force else "false")],
            body=obj,
            content_type="application/apply-patch+yaml",
        )

    async def json_patch(self, kind: str, namespace: str, name: str, operations: list[JsonDict]) -> JsonDict:
        """Apply an RFC 6902 JSON patch under the broker's field manager; returns the live object.

        For what server-side apply cannot do: remove a field another manager owns (apply only drops
        fields the broker itself set). A ``test`` operation in ``operations`` makes it conditional.
        """
        return await self._json(
            "PATCH",
            self.path(kind, namespace, name),
            what=f"patch {kind} {namespace}/{name}",
            query=[("fieldManager", FIELD_MANAGER)],
            body=operations,
            content_type="application/json-patch+json",
        )

    async def create(self, obj: JsonDict) -> JsonDict:
        """Create ``obj`` (POST); Conflict when it already exists."""
        meta = obj["metadata"]
        return await self._json(
            "POST",
            self.path(obj["kind"], meta.get("namespace")),
            what=f"create {obj['kind']} {meta.get('namespace', '')}/{meta['name']}",
            query=[("fieldManager", FIELD_MANAGER)],
            body=obj,
        )

    async def get(self, kind: str, namespace: str | None, name: str) -> JsonDict:
        """One object; NotFound when it does not exist."""
        return await self._json(
            "GET", self.path(kind, namespace, name), what=f"get {kind} {namespace}/{name}"
        )

    async def replace(self, obj: JsonDict) -> JsonDict:
        """Replace ``obj`` (PUT) as of its ``metadata.resourceVersion``; returns the live object.

        Conflict when the object changed since that version (optimistic concurrency), NotFound
        when it is gone.
        """
        meta = obj["metadata"]
        return await self._json(
            "PUT",
            self.path(obj["kind"], meta.get("namespace"), meta["name"]),
            what=f"replace {obj['kind']} {meta.get('namespace', '')}/{meta['name']}",
            query=[("fieldManager", FIELD_MANAGER)],
            body=obj,
        )

    async def delete(
        self, kind: str, namespace: str | None, name: str, *, propagation: str = "Background"
    ) -> bool:
        """Delete an object (and its dependents); False when it was already gone."""
        try:
            await self._json(
                "DELETE",
                self.path(kind, namespace, name),
                what=f"delete {kind} {namespace}/{name}",
                body={"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": propagation},
            )
        except errors.NotFound:
            return False
        return True

    async def pages(
        self,
        kind: str,
        *,
        decode: Callable[[bytes], ListPage[T]],
        label_selector: str = "",
        namespace: str | None = None,
        limit: int = 500,
    ) -> AsyncIterator[ListPage[T]]:
        """The matching objects a page at a time (following ``continue``), each page's body given
        to ``decode``: a reader that keeps little of each object never holds the whole list."""
        token = ""
        while True:
            query: list[tuple[str, Any]] = [("limit", limit)]
            if label_selector:
                query.append(("labelSelector", label_selector))
            if token:
                query.append(("continue", token))
            what = f"list {kind}"
            body = await self._bytes("GET", self.path(kind, namespace), what=what, query=query)
            try:
                page = decode(body)
            except ValueError as e:
                raise translate(e, what) from e
            yield page
            token = page.continue_token
            if not token:
                return

    async def watch(
        self,
        kind: str,
        *,
        decode: Callable[[bytes], T],
        label_selector: str,
        resource_version: str,
        timeout_seconds: int,
    ) -> AsyncIterator[tuple[str, T]]:
        """Watch events (type, object as ``decode`` makes it of its JSON) after ``resource_version``,
        bookmarks included.

        Raises Expired when the server answers 410 Gone, as a status or as an ERROR event.
        """
        query: list[tuple[str, Any]] = [
            ("watch", "true"),
            ("resourceVersion", resource_version),
            ("allowWatchBookmarks", "true"),
            ("timeoutSeconds", timeout_seconds),
        ]
        if label_selector:
            query.append(("labelSelector", label_selector))
        what = f"watch {kind}"
        response = await self._call("GET", self.path(kind), what=what, query=query, request_timeout=None)
        try:
            async for line in response.content:
                if not line.strip():
                    continue
                event = _ENVELOPE.decode(line)
                if event.type == "ERROR":
                    status = msgspec.json.decode(event.object)
                    status = status if isinstance(status, dict) else {}
                    if int(status.get("code") or 0) == 410:
                        raise Expired(f"{what}: {status.get('message', 'resourceVersion too old')}")
                    raise errors.Unavailable(f"{what}: {str(status.get('message', 'error event'))[:300]}")
                yield event.type, decode(bytes(event.object))
        except (TimeoutError, aiohttp.ClientError, ValueError) as e:
            raise translate(e, what) from e
        finally:
            response.release()

"""The HTTP face of the sandbox: kube-apiserver's REST paths, discovery and ``Status`` bodies.

The handlers are thin: they parse the path, query and body, call the store, and render. The paths
are kube-apiserver's (``/api/v1/namespaces/{ns}/pods/{name}/status``,
``/apis/apps/v1/namespaces/{ns}/statefulsets/{name}/scale``, legacy ``/watch/`` prefixes), the
responses carry the same kinds, codes and reasons, and ``kubectl``'s server-side printing request
(``as=Table``) is honoured. Fault injection lives under ``/sandbox/v1/faults``, a prefix no real
cluster serves.

The package keeps routing apart from request handling:

* :mod:`~kube_sandbox.server.app`: :class:`ApiServer`, the application, its middleware and fixed
  routes;
* :mod:`~kube_sandbox.server.routing`: paths and methods to handlers;
* :mod:`~kube_sandbox.server.discovery`: discovery, OpenAPI and version documents;
* :mod:`~kube_sandbox.server.handlers`: the verbs (get, list, create, update, patch, apply,
  delete, subresources, pod metrics);
* :mod:`~kube_sandbox.server.watching`: the watch stream;
* :mod:`~kube_sandbox.server.wire`: the parsed :class:`Route`, query parsing and rendering they
  share.

Callers import the names below from ``kube_sandbox.server``.
"""

from kube_sandbox.server.app import ApiServer, Handler
from kube_sandbox.server.discovery import SERVER_VERSION
from kube_sandbox.server.handlers import PATCH_TYPES, RETURNS_DELETED_OBJECT, MetricsProvider
from kube_sandbox.server.watching import DEFAULT_WATCH_TIMEOUT
from kube_sandbox.server.wire import JSON, JsonDict, Route, error_response, field_manager

__all__ = [
    "DEFAULT_WATCH_TIMEOUT",
    "JSON",
    "PATCH_TYPES",
    "RETURNS_DELETED_OBJECT",
    "SERVER_VERSION",
    "ApiServer",
    "Handler",
    "JsonDict",
    "MetricsProvider",
    "Route",
    "error_response",
    "field_manager",
]

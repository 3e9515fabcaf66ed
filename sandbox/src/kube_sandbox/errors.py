"""The sandbox API server's exceptions, one per Kubernetes ``Status`` reason.

Every failure the store, the patch engines or the request handlers detect is raised as one of these;
the HTTP layer (:mod:`kube_sandbox.server`) is the single place that turns them into ``Status``
bodies, so the reasons, codes and messages match what kube-apiserver sends::

    ApiError                  (base: code + reason + message + details)
    ├── BadRequest            400 BadRequest
    ├── Unauthorized          401 Unauthorized (an unknown bearer token)
    ├── Forbidden             403 Forbidden
    ├── NotFound              404 NotFound
    ├── MethodNotAllowed      405 MethodNotAllowed
    ├── AlreadyExists         409 AlreadyExists
    ├── Conflict              409 Conflict (stale resourceVersion, server-side apply conflicts)
    ├── Gone                  410 Expired (too old resourceVersion or continue token)
    ├── UnsupportedMediaType  415 UnsupportedMediaType
    ├── Invalid               422 Invalid (with field causes)
    ├── AdmissionDenied       422 Invalid, or the reason a policy's validation names
    ├── TooManyRequests       429 TooManyRequests (injected faults)
    ├── InternalError         500 InternalError (injected faults)
    └── ServiceUnavailable    503 ServiceUnavailable (injected faults)
"""

from __future__ import annotations

from typing import Any

JsonDict = dict[str, Any]


class ApiError(Exception):
    """A failure that the API server reports to its client as a ``Status`` object."""

    code = 500
    reason = "InternalError"

    def __init__(self, message: str, *, details: JsonDict | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def status(self) -> JsonDict:
        """Render the ``Status`` body kube-apiserver would send for this failure."""
        body: JsonDict = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details is not None:
            body["details"] = self.details
        return body


def _details(*, name: str, group: str, plural: str) -> JsonDict:
    details: JsonDict = {"name": name, "kind": plural}
    if group:
        details["group"] = group
    return details


def qualified(*, group: str, plural: str) -> str:
    """Spell a resource as kube-apiserver does in messages: ``statefulsets.apps`` or ``pods``."""
    return f"{plural}.{group}" if group else plural


class BadRequest(ApiError):
    """The request is malformed (a selector that does not parse, a body that is not JSON)."""

    code = 400
    reason = "BadRequest"


class Unauthorized(ApiError):
    """The request's credentials are not known."""

    code = 401
    reason = "Unauthorized"


class Forbidden(ApiError):
    """The request is understood but refused (creating objects in a terminating namespace)."""

    code = 403
    reason = "Forbidden"


class NotFound(ApiError):
    """The object or the resource type does not exist."""

    code = 404
    reason = "NotFound"

    @classmethod
    def of(cls, *, group: str, plural: str, name: str) -> NotFound:
        """Build the error with kube-apiserver's message, e.g. ``pods "web-0" not found``."""
        return cls(
            f'{qualified(group=group, plural=plural)} "{name}" not found',
            details=_details(name=name, group=group, plural=plural),
        )


class MethodNotAllowed(ApiError):
    """The resource does not support the verb (e.g. writing pod metrics)."""

    code = 405
    reason = "MethodNotAllowed"


class AlreadyExists(ApiError):
    """Create of a name that is taken."""

    code = 409
    reason = "AlreadyExists"

    @classmethod
    def of(cls, *, group: str, plural: str, name: str) -> AlreadyExists:
        """Build the error with kube-apiserver's message."""
        return cls(
            f'{qualified(group=group, plural=plural)} "{name}" already exists',
            details=_details(name=name, group=group, plural=plural),
        )


class Conflict(ApiError):
    """Optimistic concurrency or field ownership conflict."""

    code = 409
    reason = "Conflict"

    @classmethod
    def stale(cls, *, group: str, plural: str, name: str) -> Conflict:
        """The client wrote with an out-of-date ``metadata.resourceVersion``."""
        return cls(
            f"Operation cannot be fulfilled on {qualified(group=group, plural=plural)} "
            f'"{name}": the object has been modified; please apply your changes to the latest '
            "version and try again",
            details=_details(name=name, group=group, plural=plural),
        )


class Gone(ApiError):
    """The requested resourceVersion is older than the retained history."""

    code = 410
    reason = "Expired"


class UnsupportedMediaType(ApiError):
    """The body's content type is not one the endpoint accepts."""

    code = 415
    reason = "UnsupportedMediaType"


class Invalid(ApiError):
    """The object fails validation; ``causes`` name the offending fields."""

    code = 422
    reason = "Invalid"

    @classmethod
    def of(cls, *, kind: str, group: str, name: str, causes: list[tuple[str, str, str]]) -> Invalid:
        """Build the error from ``(reason, field, message)`` causes, in kube-apiserver's wording."""
        qualified_kind = f"{kind}.{group}" if group else kind
        summary = ", ".join(f"{field}: {message}" for _, field, message in causes)
        count = f"[{summary}]" if len(causes) > 1 else summary
        details: JsonDict = {
            "name": name,
            "kind": kind,
            "causes": [
                {"reason": reason, "message": message, "field": field} for reason, field, message in causes
            ],
        }
        if group:
            details["group"] = group
        return cls(f'{qualified_kind} "{name}" is invalid: {count}', details=details)


class AdmissionDenied(ApiError):
    """A ValidatingAdmissionPolicy refused the request; reason and code come from the validation."""

    def __init__(self, message: str, *, reason: str, code: int, details: JsonDict | None = None) -> None:
        super().__init__(message, details=details)
        self.reason = reason
        self.code = code


class TooManyRequests(ApiError):
    """Rate limiting (only ever injected by faults: the sandbox has no real limits)."""

    code = 429
    reason = "TooManyRequests"


class InternalError(ApiError):
    """A server-side failure (injected by faults)."""

    code = 500
    reason = "InternalError"


class ServiceUnavailable(ApiError):
    """The server is unavailable (injected by faults)."""

    code = 503
    reason = "ServiceUnavailable"

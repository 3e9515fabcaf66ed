"""Typed errors of the broker client, mapped from gRPC status codes in one place (``from_rpc_error``).

Besides the errors of failed calls, two are raised by ``BrokerClient.wait_ready`` about the
deployment it waits for (the calls themselves succeeded); they subclass the nearest code so that
``except BrokerError`` still catches everything the client raises.

::

    BrokerError
    ├── InvalidArgument        INVALID_ARGUMENT   the request is malformed (fix it, do not retry)
    ├── Unauthenticated        UNAUTHENTICATED    no or a wrong token
    ├── PermissionDenied       PERMISSION_DENIED  the namespace is not granted to this token
    ├── NotFound               NOT_FOUND
    ├── AlreadyExists          ALREADY_EXISTS     e.g. a request_id reused for another request
    ├── FailedPrecondition     FAILED_PRECONDITION  the resource is in the wrong phase
    │   └── ProvisioningFailed                    wait_ready: the deployment is Failed (or being deleted)
    ├── OutOfRange             OUT_OF_RANGE       a resume sequence is no longer in the log: re-read state
    ├── ResourceExhausted      RESOURCE_EXHAUSTED
    ├── Unavailable            UNAVAILABLE        retry later (the client already retried safe calls)
    ├── DeadlineExceeded       DEADLINE_EXCEEDED
    │   └── WaitTimeout                           wait_ready gave up; also a builtin TimeoutError
    └── Internal               anything else
"""

from __future__ import annotations

import grpc


class BrokerError(Exception):
    """An error answered by the broker (or the transport), with its gRPC code and message."""

    def __init__(
        self, message: str, *, code: grpc.StatusCode, reason: str = "", details: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        # The broker's machine-readable reason (e.g. SUBSCRIBER_TOO_SLOW) and details such as
        # resume-after-sequence, from its trailers; empty when the failure is the transport's.
        self.reason = reason
        self.details = dict(details or {})


class InvalidArgument(BrokerError):
    """The request is malformed; the message lists every invalid field."""


class Unauthenticated(BrokerError):
    """No token, or one the broker does not know."""


class PermissionDenied(BrokerError):
    """The token is not granted the namespace."""


class NotFound(BrokerError):
    """No such deployment in the namespace."""


class AlreadyExists(BrokerError):
    """The request conflicts with an earlier one."""


class FailedPrecondition(BrokerError):
    """The resource's current phase does not allow the request."""


class OutOfRange(BrokerError):
    """A resume position is outside the retained event log: re-read the state, then watch again."""


class ResourceExhausted(BrokerError):
    """A limit was reached."""


class Unavailable(BrokerError):
    """The broker cannot be reached or is shutting down."""


class DeadlineExceeded(BrokerError):
    """The call took longer than its deadline."""


class Internal(BrokerError):
    """Any other failure."""


class ProvisioningFailed(FailedPrecondition):
    """The deployment ``wait_ready`` waited for failed, or is being deleted: it will not become Ready.

    ``message`` is the broker's reason (the deployment's last error); a new Provision of a fixed
    spec is the way out.
    """

    def __init__(self, message: str, *, deployment_id: str, generation: int = 0) -> None:
        super().__init__(message, code=grpc.StatusCode.FAILED_PRECONDITION, reason="PROVISIONING_FAILED")
        self.deployment_id = deployment_id
        self.generation = generation


class WaitTimeout(DeadlineExceeded, TimeoutError):
    """``wait_ready`` ran out of time before the deployment was Ready (or had failed).

    Also a ``TimeoutError``, so code written against ``asyncio.timeout`` catches it.
    """

    def __init__(self, message: str, *, deployment_id: str) -> None:
        super().__init__(message, code=grpc.StatusCode.DEADLINE_EXCEEDED, reason="WAIT_TIMEOUT")
        self.deployment_id = deployment_id


_BY_CODE: dict[grpc.StatusCode, type[BrokerError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.OUT_OF_RANGE: OutOfRange,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
}


def from_rpc_error(error: grpc.RpcError) -> BrokerError:
    """The typed error of a failed call."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    cls = _BY_CODE.get(code, Internal)
    reason, extra = trailers(error)
    return cls(details or code.name, code=code, reason=reason, details=extra)


def trailers(error: grpc.RpcError) -> tuple[str, dict[str, str]]:
    """The broker's error reason and details from a failed call's trailing metadata."""
    metadata = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    reason, extra = "", {}
    for key, value in metadata or ():
        if not isinstance(value, str) or not key.startswith("broker-"):
            continue
        if key == "broker-error-reason":
            reason = value
        else:
            extra[key.removeprefix("broker-")] = value
    return reason, extra

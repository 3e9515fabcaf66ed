"""The one place that maps the broker's exceptions to gRPC status codes and HTTP statuses.

HTTP statuses follow google.rpc.Code's documented HTTP mapping, so a gateway answer and a gRPC
answer to the same request always agree. Errors that are not ``BrokerError`` are bugs: callers get
INTERNAL / 500 with an incident id and no detail, and the detail goes to the log.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import secrets
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from broker import errors

log = logging.getLogger(__name__)

ERROR_DOMAIN = "resource-broker.platform"
# How a transport spells an enum value in an error message.
Spelling = Callable[[enum.Enum], str]


@dataclasses.dataclass(frozen=True)
class Mapping:
    """How one exception class appears on the wire."""

    grpc_code: grpc.StatusCode
    http_status: int


TABLE: dict[type[errors.BrokerError], Mapping] = {
    errors.InvalidArgument: Mapping(grpc.StatusCode.INVALID_ARGUMENT, 400),
    errors.Unauthenticated: Mapping(grpc.StatusCode.UNAUTHENTICATED, 401),
    errors.PermissionDenied: Mapping(grpc.StatusCode.PERMISSION_DENIED, 403),
    errors.NotFound: Mapping(grpc.StatusCode.NOT_FOUND, 404),
    errors.AlreadyExists: Mapping(grpc.StatusCode.ALREADY_EXISTS, 409),
    errors.FailedPrecondition: Mapping(grpc.StatusCode.FAILED_PRECONDITION, 400),
    errors.OutOfRange: Mapping(grpc.StatusCode.OUT_OF_RANGE, 400),
    errors.ResourceExhausted: Mapping(grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
    errors.Unavailable: Mapping(grpc.StatusCode.UNAVAILABLE, 503),
    errors.RequestTooLarge: Mapping(grpc.StatusCode.RESOURCE_EXHAUSTED, 413),
    errors.MethodNotAllowed: Mapping(grpc.StatusCode.UNIMPLEMENTED, 405),
}
INTERNAL = Mapping(grpc.StatusCode.INTERNAL, 500)


def mapping_of(exc: BaseException) -> Mapping:
    """The wire mapping of an exception (the nearest mapped base class of a BrokerError)."""
    for cls in type(exc).__mro__:
        if cls in TABLE:
            return TABLE[cls]
    return INTERNAL


def public_error(exc: BaseException) -> errors.BrokerError:
    """The exception as callers may see it: unexpected errors become an opaque internal error."""
    if isinstance(exc, errors.BrokerError):
        return exc
    incident = secrets.token_hex(4)
    log.error("internal error (incident %s)", incident, exc_info=exc)
    return errors.BrokerError(
        f"internal error (incident {incident}); the broker's log has the details", reason="INTERNAL"
    )


def rich_status(exc: errors.BrokerError, spell: Spelling | None = None) -> status_pb2.Status:
    """A google.rpc.Status with ErrorInfo and, for invalid input, BadRequest field violations.

    ``spell`` spells enum values in messages the way the caller's transport takes them.
    """
    mapping = mapping_of(exc)
    details = []
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason=exc.reason, domain=ERROR_DOMAIN, metadata=exc.metadata))
    details.append(info)
    if isinstance(exc, errors.InvalidArgument):
        bad = any_pb2.Any()
        bad.Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=v.field, description=v.describe(spell) if spell else v.describe()
                    )
                    for v in exc.violations
                ]
            )
        )
        details.append(bad)
    code = mapping.grpc_code.value[0] if mapping is not INTERNAL else code_pb2.INTERNAL
    return status_pb2.Status(code=code, message=message_of(exc, spell), details=details)


def message_of(exc: errors.BrokerError, spell: Spelling | None = None) -> str:
    """The error's message, enum values spelled by ``spell`` where it lists them."""
    if spell is not None and isinstance(exc, errors.InvalidArgument):
        return exc.message_with(spell)
    return exc.message


def http_body(exc: errors.BrokerError) -> tuple[int, dict[str, Any]]:
    """The HTTP status and JSON body of an error, in the shape of Google's JSON errors."""
    mapping = mapping_of(exc)
    error: dict[str, Any] = {
        "code": mapping.http_status,
        "status": mapping.grpc_code.name,
        "message": exc.message,
        "reason": exc.reason,
    }
    if exc.metadata:
        error["metadata"] = exc.metadata
    if isinstance(exc, errors.InvalidArgument):
        error["fieldViolations"] = [{"field": v.field, "description": v.describe()} for v in exc.violations]
    return mapping.http_status, {"error": error}

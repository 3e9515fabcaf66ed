"""The broker's exceptions: every error a caller can see is one of these.

The tree::

    BrokerError                      anything the broker reports to a caller
    ├── InvalidArgument              the request is malformed; carries field violations
    ├── RequestTooLarge              the request body is larger than the broker reads
    ├── MethodNotAllowed             an HTTP path called with a method it does not take
    ├── Unauthenticated              no or an unknown bearer token
    ├── PermissionDenied             the principal may not use the namespace
    ├── NotFound                     no such deployment (in a namespace the caller may see)
    ├── AlreadyExists                a request_id was reused for a different request
    ├── FailedPrecondition           the request is valid but the resource is in the wrong phase
    ├── OutOfRange                   a resume sequence older than the retained event log
    ├── ResourceExhausted            a per-principal limit was hit, or a subscriber fell behind
    └── Unavailable                  a dependency (store, cluster) cannot be reached or the broker
                                     is shutting down; retrying later is safe

Transports never raise these themselves and never see library exceptions: adapters translate their
library's errors into this tree (``raise ... from e``) and ``broker.api.status`` is the one place
that maps the tree to gRPC codes and HTTP statuses. Messages are written for a person: they say what
was wrong and what to do, and never contain secrets.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable


def _seed_spelling(value: enum.Enum) -> str:
    return str(value.value)


@dataclasses.dataclass(frozen=True)
class FieldViolation:
    """One invalid field of a request: its path (``spec.replicas``) and why it is invalid.

    ``choices`` are the values the field takes, when it is an enum: each transport spells them the
    way it accepts them (``cache`` on /v1, ``RESOURCE_TYPE_CACHE`` on gRPC) through ``describe``.
    """

    field: str
    description: str
    choices: tuple[enum.Enum, ...] = ()

    def describe(self, spell: Callable[[enum.Enum], str] = _seed_spelling) -> str:
        """The description, with the choices spelled by ``spell``."""
        if not self.choices:
            return self.description
        return f"{self.description}: use one of {', '.join(spell(c) for c in self.choices)}"


class BrokerError(Exception):
    """Base of every error the broker reports to a caller.

    ``reason`` is a stable UPPER_SNAKE identifier for programs (google.rpc.ErrorInfo.reason);
    the message is for people.
    """

    default_reason = "BROKER_ERROR"

    def __init__(
        self, message: str, *, reason: str | None = None, metadata: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        # Machine-readable details for clients (google.rpc.ErrorInfo.metadata), e.g. where to resume.
        self.metadata = dict(metadata or {})


class InvalidArgument(BrokerError):
    """The request is malformed; ``violations`` lists every invalid field, not just the first."""

    default_reason = "INVALID_ARGUMENT"

    def __init__(self, violations: list[FieldViolation], *, reason: str | None = None) -> None:
        self.violations = tuple(violations)
        super().__init__(self.message_with(_seed_spelling), reason=reason)

    def message_with(self, spell: Callable[[enum.Enum], str]) -> str:
        """The message with enum choices spelled by ``spell`` (a transport's spelling)."""
        return "invalid request: " + "; ".join(f"{v.field}: {v.describe(spell)}" for v in self.violations)


class RequestTooLarge(BrokerError):
    """The request body is larger than the broker reads."""

    default_reason = "REQUEST_TOO_LARGE"


class MethodNotAllowed(BrokerError):
    """The path exists, but not for this HTTP method."""

    default_reason = "METHOD_NOT_ALLOWED"


class Unauthenticated(BrokerError):
    """The caller presented no bearer token, or one the broker does not know."""

    default_reason = "UNAUTHENTICATED"


class PermissionDenied(BrokerError):
    """The caller is authenticated but not granted the namespace it asked for."""

    default_reason = "NAMESPACE_NOT_GRANTED"


class NotFound(BrokerError):
    """The named deployment does not exist in the namespace."""

    default_reason = "NOT_FOUND"


class AlreadyExists(BrokerError):
    """The request conflicts with an earlier one, such as a reused request_id."""

    default_reason = "ALREADY_EXISTS"


class FailedPrecondition(BrokerError):
    """The request is well formed but cannot be carried out in the resource's current phase."""

    default_reason = "FAILED_PRECONDITION"


class OutOfRange(BrokerError):
    """A resume position lies outside the retained event log; the client must re-read state."""

    default_reason = "OUT_OF_RANGE"


class ResourceExhausted(BrokerError):
    """A limit was reached: too many streams for a principal, or a subscriber fell too far behind."""

    default_reason = "RESOURCE_EXHAUSTED"


class Unavailable(BrokerError):
    """A dependency cannot be reached or the broker is shutting down; retrying later is safe."""

    default_reason = "UNAVAILABLE"

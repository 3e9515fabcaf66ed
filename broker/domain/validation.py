"""Input validation: every rule a request must pass before it may reach the store.

Violations are collected, not raised one at a time, so a caller learns everything wrong with a
request in one round trip. Field paths are the proto field paths (``spec.replicas``), on gRPC and
HTTP alike.
"""

from __future__ import annotations

import re
import urllib.parse

from broker import errors
from broker.domain import addresses, model
from broker.domain import catalog as catalog_mod

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_DEPLOYMENT_ID = re.compile(r"^deploy-[a-z0-9]{1,40}$")

# A StatefulSet's pods carry the label controller-revision-hash=<name>-<hash>, and label values stop
# at 63 characters, so Kubernetes effectively limits StatefulSet names to 52.
MAX_RESOURCE_NAME = 52
MAX_CALLBACK_URL = 2048
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
DEFAULT_TOPIC_PARTITIONS = 1
DEFAULT_TOPIC_RETENTION_MS = 7 * 24 * 3600 * 1000
MAX_TOPIC_PARTITIONS = 1000


def check_namespace(value: str, violations: list[errors.FieldViolation], *, field: str = "namespace") -> None:
    """Namespaces are DNS-1123 labels: lower-case alphanumerics and '-', at most 63 characters."""
    if not value:
        violations.append(errors.FieldViolation(field, "is required"))
    elif len(value) > 63 or not _DNS1123_LABEL.match(value):
        violations.append(
            errors.FieldViolation(
                field,
                f"{value[:80]!r} is not a valid Kubernetes namespace: use at most 63 lower-case letters, "
                "digits and '-', starting and ending with a letter or digit",
            )
        )


def check_resource_name(value: str, violations: list[errors.FieldViolation], *, required: bool) -> None:
    """Resource names become Service names (DNS-1035: start with a letter) and StatefulSet names."""
    if not value:
        if required:
            violations.append(errors.FieldViolation("resource_name", "is required"))
    elif len(value) > MAX_RESOURCE_NAME or not _DNS1035_LABEL.match(value):
        violations.append(
            errors.FieldViolation(
                "resource_name",
                f"{value[:80]!r} is not a valid resource name: use at most {MAX_RESOURCE_NAME} lower-case "
                "letters, digits and '-', starting with a letter and ending with a letter or digit",
            )
        )


def check_deployment_id(value: str, violations: list[errors.FieldViolation], *, required: bool) -> None:
    """Deployment ids are what Provision returned: ``deploy-`` and lower-case alphanumerics."""
    if not value:
        if required:
            violations.append(errors.FieldViolation("deployment_id", "is required"))
    elif not _DEPLOYMENT_ID.match(value):
        violations.append(
            errors.FieldViolation(
                "deployment_id",
                f"{value[:80]!r} is not a deployment id (they look like 'deploy-3f9c2a1b7d4e')",
            )
        )


def check_request_id(value: str, violations: list[errors.FieldViolation]) -> None:
    """Request ids are optional; when given, 1-128 characters of letters, digits and ``._:-``."""
    if value and not _REQUEST_ID.match(value):
        violations.append(
            errors.FieldViolation(
                "request_id", "must be 1-128 letters, digits or '._:-' (a UUID is recommended)"
            )
        )


def check_callback_url(value: str, violations: list[errors.FieldViolation]) -> None:
    """Callback URLs are optional; when given, absolute http(s) URLs with a host and no credentials.

    The broker will call this URL, so it is read strictly (SSRF): anything URL parsers may read
    differently (backslashes, whitespace, fragments, userinfo, ambiguous IPv4 spellings, zone ids)
    is refused here. Which addresses may be called depends on the policy and is checked by
    ``broker.callbacks.CallbackPolicy``, on the literal host now and on resolved addresses later.
    """
    if not value:
        return
    if len(value) > MAX_CALLBACK_URL:
        violations.append(
            errors.FieldViolation("callback_url", f"is longer than {MAX_CALLBACK_URL} characters")
        )
        return
    problem = _callback_url_problem(value)
    if problem:
        violations.append(errors.FieldViolation("callback_url", problem))


def _callback_url_problem(value: str) -> str | None:
    if any(ch.isspace() or not ch.isprintable() for ch in value):
        return "must not contain whitespace or control characters (percent-encode them in the path)"
    if "\\" in value:
        return "must not contain backslashes: URL parsers disagree on whether they end the host"
    try:
        parsed = urllib.parse.urlsplit(value)
        port = parsed.port
    except ValueError as e:
        return f"is not a valid URL: {e}"
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        return "must be an absolute http:// or https:// URL with a host"
    if "@" in parsed.netloc:
        return "must not contain credentials; the broker signs callbacks instead"
    if "#" in value:
        return "must not contain a '#' fragment: it is never sent, so it can only mislead a reader"
    if port == 0:
        return "has port 0, which cannot be called"
    return addresses.host_problem(parsed.hostname, bracketed=parsed.netloc.startswith("["))


def page_size(size: int, violations: list[errors.FieldViolation]) -> int:
    """A page size with the default filled in; sizes outside 0..1000 are violations."""
    if size < 0 or size > MAX_PAGE_SIZE:
        violations.append(errors.FieldViolation("page_size", f"must be between 0 and {MAX_PAGE_SIZE}"))
    return size or DEFAULT_PAGE_SIZE


def raise_if(violations: list[errors.FieldViolation]) -> None:
    """Raise InvalidArgument listing all violations, if there are any."""
    if violations:
        raise errors.InvalidArgument(violations)


def provision_command(
    *,
    namespace: str,
    resource_type: model.ResourceType | None,
    resource_name: str,
    spec: model.ResourceSpec | None,
    callback_url: str,
    request_id: str,
    catalog: catalog_mod.Catalog,
) -> model.ProvisionCommand:
    """Validate a provision request and return it with its spec normalized (defaults filled in).

    Normalizing here means two requests that differ only in spelled-out defaults are the same
    desired state, so repeating one is a no-op rather than a new generation.
    """
    violations: list[errors.FieldViolation] = []
    check_namespace(namespace, violations)
    check_resource_name(resource_name, violations, required=True)
    check_callback_url(callback_url, violations)
    check_request_id(request_id, violations)
    if resource_type is None:
        violations.append(errors.FieldViolation("resource_type", "is required", tuple(model.ResourceType)))
    if spec is None:
        violations.append(errors.FieldViolation("spec", "is required"))
    normalized = None
    if spec is not None and resource_type is not None:
        normalized = _normalized_spec(spec, resource_type, catalog, violations)
    raise_if(violations)
    # Both are set when there were no violations; the asserts tell the type checker.
    assert resource_type is not None
    assert normalized is not None
    return model.ProvisionCommand(
        namespace=model.Namespace(namespace),
        resource_type=resource_type,
        resource_name=model.ResourceName(resource_name),
        spec=normalized,
        callback_url=callback_url,
        request_id=request_id,
    )


def _normalized_spec(
    spec: model.ResourceSpec,
    resource_type: model.ResourceType,
    catalog: catalog_mod.Catalog,
    violations: list[errors.FieldViolation],
) -> model.ResourceSpec | None:
    engines = catalog.engines_for(resource_type)
    before = len(violations)
    if not spec.engine:
        violations.append(errors.FieldViolation("spec.engine", f"is required: one of {', '.join(engines)}"))
    elif spec.engine not in engines:
        violations.append(
            errors.FieldViolation(
                "spec.engine",
                f"{spec.engine[:40]!r} is not an engine for {resource_type.value}s: "
                f"use one of {', '.join(engines)}",
            )
        )
    is_topic = resource_type is model.ResourceType.TOPIC
    if spec.version and not catalog_mod.is_valid_version(spec.version):
        violations.append(
            errors.FieldViolation(
                "spec.version",
                f"{spec.version[:40]!r} is not a version: use MAJOR, MAJOR.MINOR or MAJOR.MINOR.PATCH "
                "in digits, for example '15' or '15.2'",
            )
        )
    elif not spec.version and not is_topic:
        violations.append(errors.FieldViolation("spec.version", "is required, for example '15'"))
    sizes = sorted(catalog.sizes)
    if spec.size and spec.size not in catalog.sizes:
        violations.append(
            errors.FieldViolation(
                "spec.size", f"{spec.size[:40]!r} is not a size tier: use one of {', '.join(sizes)}"
            )
        )
    elif not spec.size and not is_topic:
        violations.append(errors.FieldViolation("spec.size", f"is required: one of {', '.join(sizes)}"))
    replicas = 1 if spec.replicas is None else spec.replicas
    if not 1 <= replicas <= catalog.max_replicas:
        violations.append(
            errors.FieldViolation(
                "spec.replicas", f"must be between 1 and {catalog.max_replicas}, got {replicas}"
            )
        )
    topic = None
    if is_topic:
        topic = _normalized_topic(spec.topic, violations)
    elif spec.topic is not None:
        violations.append(
            errors.FieldViolation("spec.topic", f"applies to topics only, not to {resource_type.value}s")
        )
    if len(violations) > before:
        return None
    return model.ResourceSpec(
        engine=spec.engine,
        version=spec.version,
        size=spec.size,
        replicas=replicas,
        topic=topic,
        resources=catalog.sizes.get(spec.size),
    )


def _normalized_topic(
    topic: model.TopicSpec | None, violations: list[errors.FieldViolation]
) -> model.TopicSpec:
    partitions = topic.partitions if topic and topic.partitions else DEFAULT_TOPIC_PARTITIONS
    retention = topic.retention_ms if topic and topic.retention_ms else DEFAULT_TOPIC_RETENTION_MS
    if not 1 <= partitions <= MAX_TOPIC_PARTITIONS:
        violations.append(
            errors.FieldViolation("spec.topic.partitions", f"must be between 1 and {MAX_TOPIC_PARTITIONS}")
        )
    if retention < 0:
        violations.append(errors.FieldViolation("spec.topic.retention_ms", "must not be negative"))
    return model.TopicSpec(partitions=partitions, retention_ms=retention)

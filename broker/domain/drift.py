"""The drift engine: desired state against an observed snapshot, classified by rule and policy.

Pure code. The Kubernetes adapter turns cluster objects into an ``Observation``; ``evaluate`` turns
a deployment and an observation into the actual spec, classified drift items, health, usage and cost.

The rules, their classes, severities and default actions are the table in ``rules`` (DESIGN
section 5, the seed's drift rules); every item is made from its rule's row.

Usage varying and Kubernetes-managed metadata are expected and not reported at all.
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import functools
import re
from collections.abc import Mapping

import msgspec

from broker.domain import catalog as catalog_mod
from broker.domain import model, naming, policy, quantity, rules

CRASH_REASONS = frozenset({"CrashLoopBackOff", "Error", "ImagePullBackOff", "ErrImagePull"})
RESTARTS_DEGRADED = 3
# Restart counts only grow: restarts count as "repeated" only while the last one is this recent.
RECENT_RESTART = datetime.timedelta(minutes=10)

# Why an expected item is fine, as the seed's second sentence says it.
EXPLANATIONS = {"version.patch": "This is expected patch version drift"}

# Every ``DriftItem.field`` the rules produce: what policies may ignore.
FIELDS = rules.FIELDS


@dataclasses.dataclass(frozen=True, slots=True)
class PodObservation:
    """One pod of a workload as the cluster reports it."""

    name: str
    phase: str
    ready: bool
    restart_count: int
    waiting_reason: str
    image: str
    cpu_usage: decimal.Decimal | None = None
    memory_usage: decimal.Decimal | None = None
    last_restart: datetime.datetime | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class WorkloadObservation:
    """The StatefulSet of a database or cache.

    ``field_managers`` maps a compared field (``replicas``, ``image``, ``resources``, ``storage``,
    ``labels``) to the manager that last changed it, when that was not the broker.
    """

    replicas: int
    image: str
    resources: model.ComputeResources
    labels: Mapping[str, str]
    field_managers: Mapping[str, str] = dataclasses.field(default_factory=dict)
    config_changes: tuple[str, ...] = ()
    # Compared fields whose value could not be read (field -> the raw value, shown).
    unreadable: Mapping[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True, slots=True)
class TopicObservation:
    """The KafkaTopic of a topic; ``ready`` is its Ready condition (None when not reported)."""

    partitions: int
    replicas: int
    retention_ms: int
    ready: bool | None
    labels: Mapping[str, str]
    field_managers: Mapping[str, str] = dataclasses.field(default_factory=dict)
    unreadable: Mapping[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True, slots=True)
class Observation:
    """Everything observed about one deployment's objects at one moment.

    ``readable`` is False when the cluster could not be read; nothing else is then trusted.
    ``metrics_available`` is False when the cluster serves no pod metrics: usage is then absent,
    not zero.
    """

    readable: bool
    observed_at: datetime.datetime
    workload: WorkloadObservation | None = None
    service_present: bool = False
    secret_present: bool = False
    secret_changed: bool = False
    secret_changed_by: str = ""
    topic: TopicObservation | None = None
    pods: tuple[PodObservation, ...] = ()
    storage_capacity: decimal.Decimal | None = None
    metrics_available: bool = False


# A verdict and its usage are not tracked by the garbage collector (``gc=False``: they hold no
# reference that could lead back to them, so no cycle). Every metrics poll gives each kept verdict
# new usage, so a new verdict and usage per resource: tracked, they were the bulk of what every
# full collection walked after start-up (20,000 objects at 10k resources, 100,000 at 50k).


class Usage(msgspec.Struct, frozen=True, gc=False):
    """Observed consumption; cpu and memory are None when the cluster serves no metrics."""

    cpu: str | None
    memory: str | None
    storage: str | None
    replicas: int


class Evaluation(msgspec.Struct, frozen=True, gc=False):
    """The verdict on one deployment: what runs, how it differs, how healthy and costly it is."""

    actual_spec: model.ResourceSpec | None
    items: tuple[model.DriftItem, ...]
    health: model.Health
    usage: Usage | None
    monthly_cost: float | None
    checked_at: datetime.datetime

    @property
    def unexpected(self) -> tuple[model.DriftItem, ...]:
        """The items that need attention."""
        return tuple(i for i in self.items if i.drift_class is model.DriftClass.UNEXPECTED)

    def details(self) -> list[str]:
        """The human sentences of the seed: each item, and why an expected one is fine."""
        lines: list[str] = []
        for item in self.items:
            lines.append(item.message)
            if item.rule_id in EXPLANATIONS and item.drift_class is model.DriftClass.EXPECTED:
                lines.append(EXPLANATIONS[item.rule_id])
        return lines


# Parsing what runs --------------------------------------------------------------------------------

_TAG_VERSION = re.compile(r"^v?(\d+(?:\.\d+){0,2})")


def split_image(image: str) -> tuple[str, str]:
    """Repository name (without registry path) and tag of an image reference."""
    name = image.partition("@")[0]
    repo, sep, tag = name.rpartition(":")
    if not sep or "/" in tag:
        repo, tag = name, "latest"
    return repo.rsplit("/", 1)[-1], tag


def version_of(image: str) -> str:
    """The version an image tag names ("15.2" of "postgres:15.2-alpine"), or the raw tag."""
    _, tag = split_image(image)
    match = _TAG_VERSION.match(tag)
    return match.group(1) if match else tag


def engine_of(image: str, catalog: catalog_mod.Catalog) -> str:
    """The engine whose image is running, or the repository name when the catalog knows none."""
    repo, _ = split_image(image)
    for engine in catalog.engines.values():
        if engine.image and engine.image == repo:
            return engine.name
    return repo


def size_of(resources: model.ComputeResources, catalog: catalog_mod.Catalog) -> str:
    """The tier whose figures all match, or "custom"."""
    for name, tier in catalog.sizes.items():
        if all(
            quantity.equal(getattr(resources, f.name), getattr(tier, f.name))
            for f in dataclasses.fields(model.ComputeResources)
        ):
            return name
    return "custom"


@functools.lru_cache(maxsize=1024)  # a few sizes and replica counts: each evaluation asks twice
def monthly_cost(
    resources: model.ComputeResources,
    replicas: int,
    prices: catalog_mod.Prices,
    *,
    storage_bytes: decimal.Decimal | None = None,
) -> float:
    """Estimated monthly cost of ``replicas`` replicas with these requests and storage.

    ``storage_bytes`` is the storage actually held (every volume claim, retained ones of a
    scale-down included) when known; otherwise each replica is counted with the tier's storage.
    """
    try:
        cpu = quantity.parse(resources.cpu_request)
        memory = quantity.parse(resources.memory_request) / quantity.GIB
        storage = quantity.parse(resources.storage) / quantity.GIB * replicas
    except ValueError:
        return 0.0
    if storage_bytes is not None:
        storage = storage_bytes / quantity.GIB
    compute = cpu * decimal.Decimal(str(prices.cpu_core_month)) + memory * decimal.Decimal(
        str(prices.memory_gib_month)
    )
    total = compute * replicas + storage * decimal.Decimal(str(prices.storage_gib_month))
    return float(round(total, 2))


def _describe(resources: model.ComputeResources) -> str:
    return (
        f"cpu {resources.cpu_request}/{resources.cpu_limit}, memory {resources.memory_request}/"
        f"{resources.memory_limit}, storage {resources.storage}"
    )


# Rules --------------------------------------------------------------------------------------------


def _version_parts(version: str) -> tuple[int, ...]:
    try:
        return catalog_mod.version_key(version)
    except ValueError:
        return ()


def version_item(desired: str, actual: str, changed_by: str) -> model.DriftItem | None:
    """Classify a running version against the desired (possibly floating) one.

    An image whose tag names no version (``latest``, a digest only, a distribution name) says
    nothing about the version: that is an informational item, never an alert.
    """
    if actual == desired:
        return None
    want, have = _version_parts(desired), _version_parts(actual)
    if not have:
        return rules.item(
            "version.unknown",
            "version",
            desired,
            actual or "unknown",
            message=f"Version unknown: the image tag {actual or '(none)'!r} names no version; "
            f"desired={desired}",
        )
    message = f"Version mismatch: desired={desired}, actual={actual}"
    if not want or have[0] != want[0]:
        return rules.item(
            "version.major",
            "version",
            desired,
            actual,
            message=message,
            changed_by=changed_by,
        )
    if have[: len(want)] == want or (len(have) >= 2 and have[:2] == want[:2] and have > want):
        return rules.item(
            "version.patch",
            "version",
            desired,
            actual,
            message=message,
        )
    if len(want) >= 2 and len(have) >= 2 and have[1] != want[1]:
        return rules.item(
            "version.minor",
            "version",
            desired,
            actual,
            message=message,
            changed_by=changed_by,
        )
    return rules.item(
        "version.downgrade",
        "version",
        desired,
        actual,
        message=message,
        changed_by=changed_by,
    )


def _unreadable(field: str, desired: object, raw: str, changed_by: str) -> model.DriftItem:
    """A compared field whose value is not one the broker can read: drift, never a crash."""
    return rules.item(
        "field.unreadable",
        field,
        desired,
        raw,
        message=f"Unreadable {field}: {raw} is not a valid value (desired={desired})",
        changed_by=changed_by,
    )


def _missing(kind: str, name: str, rule: str = "object.missing") -> model.DriftItem:
    return rules.item(
        rule,
        kind.lower(),
        "present",
        "missing",
        message=f"{kind} {name} is missing",
    )


def _workload_items(
    deployment: model.Deployment, obs: Observation, catalog: catalog_mod.Catalog
) -> list[model.DriftItem]:
    desired = deployment.desired_spec
    name = deployment.resource_name
    items: list[model.DriftItem] = []
    workload = obs.workload
    if workload is None:
        items.append(_missing("StatefulSet", name))
    if not obs.service_present:
        items.append(_missing("Service", name))
    secret = naming.secret_name(deployment.resource_type, name)
    if not obs.secret_present:
        items.append(_missing("Secret", secret, rule="secret.missing"))
    elif obs.secret_changed:
        items.append(
            rules.item(
                "secret.changed",
                "secret",
                "as generated",
                "changed",
                message=f"Secret {secret} was changed outside the broker",
                changed_by=obs.secret_changed_by,
            )
        )
    if workload is None:
        return items
    managers = workload.field_managers
    running = _running_image(obs) or workload.image
    engine = engine_of(running, catalog)
    if engine != desired.engine:
        items.append(
            rules.item(
                "engine.changed",
                "engine",
                desired.engine,
                engine,
                message=f"Engine mismatch: desired={desired.engine}, actual={engine}",
                changed_by=managers.get("image", ""),
            )
        )
    else:
        version = version_item(desired.version, version_of(running), managers.get("image", ""))
        if version is not None:
            items.append(version)
    desired_replicas = desired.replicas or 1
    base_cost = (
        monthly_cost(desired.resources, desired_replicas, catalog.prices) if desired.resources else None
    )
    if "replicas" in workload.unreadable:
        items.append(
            _unreadable(
                "replicas", desired_replicas, workload.unreadable["replicas"], managers.get("replicas", "")
            )
        )
    elif workload.replicas != desired_replicas:
        delta = None
        if desired.resources and base_cost is not None:
            delta = round(monthly_cost(desired.resources, workload.replicas, catalog.prices) - base_cost, 2)
        items.append(
            rules.item(
                "replicas.changed",
                "replicas",
                desired_replicas,
                workload.replicas,
                message=f"Replica count mismatch: desired={desired_replicas}, actual={workload.replicas}",
                changed_by=managers.get("replicas", ""),
                cost_delta=delta,
            )
        )
    actual_size = size_of(workload.resources, catalog)
    if actual_size != desired.size:
        shown = actual_size if actual_size != "custom" else f"custom ({_describe(workload.resources)})"
        delta = None
        if base_cost is not None:
            delta = round(monthly_cost(workload.resources, desired_replicas, catalog.prices) - base_cost, 2)
        items.append(
            rules.item(
                "size.changed",
                "size",
                desired.size,
                shown,
                message=f"Size mismatch: desired={desired.size}, actual={shown}",
                changed_by=managers.get("resources") or managers.get("storage", ""),
                cost_delta=delta,
            )
        )
    items.extend(_label_items(deployment, workload.labels, managers))
    if workload.config_changes:
        changes = "; ".join(workload.config_changes)
        items.append(
            rules.item(
                "config.changed",
                "config",
                "as provisioned",
                changes,
                message=f"Configuration changed: {changes}",
                changed_by=managers.get("env", ""),
            )
        )
    return items


def _label_items(
    deployment: model.Deployment, labels: Mapping[str, str], managers: Mapping[str, str]
) -> list[model.DriftItem]:
    wanted = naming.labels(deployment.deployment_id, deployment.resource_type, deployment.resource_name)
    changed = sorted(k for k, v in wanted.items() if labels.get(k) != v)
    if not changed:
        return []
    return [
        rules.item(
            "labels.changed",
            "labels",
            ", ".join(f"{k}={wanted[k]}" for k in changed),
            ", ".join(f"{k}={labels.get(k, '<none>')}" for k in changed),
            message=f"Labels changed: {', '.join(changed)}",
            changed_by=managers.get("labels", ""),
        )
    ]


def _topic_items(deployment: model.Deployment, obs: Observation) -> list[model.DriftItem]:
    topic = obs.topic
    name = deployment.resource_name
    if topic is None:
        return [_missing("KafkaTopic", name)]
    desired = deployment.desired_spec
    want = desired.topic or model.TopicSpec(partitions=1, retention_ms=0)
    managers = topic.field_managers
    items: list[model.DriftItem] = []
    desired_replicas = desired.replicas or 1
    wanted = {"partitions": want.partitions, "retention_ms": want.retention_ms, "replicas": desired_replicas}
    for field, raw in sorted(topic.unreadable.items()):
        items.append(_unreadable(field, wanted.get(field, ""), raw, managers.get(field, "")))
    if "partitions" not in topic.unreadable and topic.partitions != want.partitions:
        fewer = topic.partitions < want.partitions
        items.append(
            rules.item(
                "topic.partitions.decreased" if fewer else "topic.partitions.increased",
                "partitions",
                want.partitions,
                topic.partitions,
                message=f"Partition count mismatch: desired={want.partitions}, actual={topic.partitions}",
                changed_by=managers.get("partitions", ""),
            )
        )
    if "retention_ms" not in topic.unreadable and topic.retention_ms != want.retention_ms:
        shorter = topic.retention_ms < want.retention_ms
        items.append(
            rules.item(
                "topic.retention.shortened" if shorter else "topic.retention.changed",
                "retention_ms",
                want.retention_ms,
                topic.retention_ms,
                message=f"Retention mismatch: desired={want.retention_ms}ms, actual={topic.retention_ms}ms",
                changed_by=managers.get("retention_ms", ""),
            )
        )
    if "replicas" not in topic.unreadable and topic.replicas != desired_replicas:
        items.append(
            rules.item(
                "topic.replicas.changed",
                "replicas",
                desired_replicas,
                topic.replicas,
                message=f"Replica count mismatch: desired={desired_replicas}, actual={topic.replicas}",
                changed_by=managers.get("replicas", ""),
            )
        )
    items.extend(_label_items(deployment, topic.labels, managers))
    return items


def _running_image(obs: Observation) -> str:
    """The image most pods were asked to run (what runs, not what the template asks for now)."""
    images = [p.image for p in obs.pods if p.image]
    return max(set(images), key=images.count) if images else ""


# Health, usage, the verdict -----------------------------------------------------------------------


def health(deployment: model.Deployment, obs: Observation) -> model.Health:
    """Healthy, Degraded, Unhealthy or Unknown (DESIGN section 5); never a made-up Healthy."""
    if not obs.readable:
        return model.Health.UNKNOWN
    if deployment.resource_type is model.ResourceType.TOPIC:
        if obs.topic is None or obs.topic.ready is False:
            return model.Health.UNHEALTHY
        return model.Health.HEALTHY if obs.topic.ready else model.Health.UNKNOWN
    if obs.workload is None or not obs.service_present or not obs.secret_present:
        return model.Health.UNHEALTHY  # a required object is missing (DESIGN section 5)
    desired = deployment.desired_spec.replicas or 1
    ready = sum(1 for p in obs.pods if p.ready)
    crashing = any(p.waiting_reason in CRASH_REASONS for p in obs.pods)
    if ready == 0:
        return model.Health.UNHEALTHY
    restarting = any(
        p.restart_count >= RESTARTS_DEGRADED
        and p.last_restart is not None
        and obs.observed_at - p.last_restart < RECENT_RESTART
        for p in obs.pods
    )
    if ready < desired or crashing or restarting:
        return model.Health.DEGRADED
    return model.Health.HEALTHY


def usage(obs: Observation) -> Usage | None:
    """Summed pod usage (absent without metrics) and volume capacity; None when nothing runs."""
    if not obs.readable or obs.workload is None:
        return None
    return usage_of(obs.pods, obs.storage_capacity, metrics_available=obs.metrics_available)


def usage_of(
    pods: tuple[PodObservation, ...], storage_capacity: decimal.Decimal | None, *, metrics_available: bool
) -> Usage:
    """The usage of a workload's pods and volumes (what a metrics poll changes, alone)."""
    cpu = memory = None
    if metrics_available and pods and all(p.cpu_usage is not None for p in pods):
        cpu = quantity.format_cpu(sum((p.cpu_usage or decimal.Decimal(0) for p in pods), decimal.Decimal(0)))
        memory = quantity.format_bytes(
            sum((p.memory_usage or decimal.Decimal(0) for p in pods), decimal.Decimal(0))
        )
    storage = quantity.format_bytes(storage_capacity) if storage_capacity is not None else None
    return Usage(cpu=cpu, memory=memory, storage=storage, replicas=len(pods))


def actual_spec(
    deployment: model.Deployment, obs: Observation, catalog: catalog_mod.Catalog
) -> model.ResourceSpec | None:
    """The spec of what runs, in the same terms as the desired spec; None when nothing was observed."""
    if not obs.readable:
        return None
    if deployment.resource_type is model.ResourceType.TOPIC:
        if obs.topic is None:
            return None
        return model.ResourceSpec(
            engine=deployment.desired_spec.engine,
            version=deployment.desired_spec.version,
            size=deployment.desired_spec.size,
            replicas=obs.topic.replicas,
            topic=model.TopicSpec(partitions=obs.topic.partitions, retention_ms=obs.topic.retention_ms),
        )
    workload = obs.workload
    if workload is None:
        return None
    running = _running_image(obs) or workload.image
    return model.ResourceSpec(
        engine=engine_of(running, catalog),
        version=version_of(running),
        size=size_of(workload.resources, catalog),
        replicas=workload.replicas,
        resources=workload.resources,
    )


def evaluate(
    deployment: model.Deployment,
    obs: Observation,
    *,
    catalog: catalog_mod.Catalog,
    rules: policy.Policy,
) -> Evaluation:
    """Compare a deployment's desired state with an observation and classify the differences."""
    items: list[model.DriftItem] = []
    if obs.readable:
        if deployment.resource_type is model.ResourceType.TOPIC:
            items = _topic_items(deployment, obs)
        else:
            items = _workload_items(deployment, obs, catalog)
    items = rules.apply(deployment.namespace, deployment.resource_type, items)
    spec = actual_spec(deployment, obs, catalog)
    cost = None
    if spec is not None and spec.resources is not None and spec.replicas is not None:
        # The same storage figure as the usage reports: what the volume claims hold.
        cost = monthly_cost(spec.resources, spec.replicas, catalog.prices, storage_bytes=obs.storage_capacity)
    return Evaluation(
        actual_spec=spec,
        items=tuple(items),
        health=health(deployment, obs),
        usage=usage(obs),
        monthly_cost=cost,
        checked_at=obs.observed_at,
    )

"""The Kubernetes objects of a deployment (DESIGN section 4), as plain manifests.

database (postgresql, mysql) and cache (redis): a StatefulSet with one container and a volume claim
template, a Service, and a Secret with generated credentials. topic (kafka): a Strimzi KafkaTopic.
Every object carries ``naming.labels``. The Secret is created once and never re-applied: applying
it again would rotate the password under a running database. Its data checksum is recorded in an
annotation so that an edit made outside the broker is noticed.

The sandbox runs no containers, so what the StatefulSet asks of each official image is written down
in ``CONTRACTS`` and stated, row by row with the reason, in ``docs/image-contracts.md``;
``tests/test_image_contracts.py`` reads that page's tables and checks the manifests against them.
"""

from __future__ import annotations

import base64
import dataclasses
import decimal
import hashlib
import secrets
import string
from typing import Any

from broker.domain import catalog as catalog_mod
from broker.domain import model, naming, quantity

JsonDict = dict[str, Any]
CHECKSUM_ANNOTATION = "broker.platform/data-checksum"
GENERATION_ANNOTATION = "broker.platform/generation"
# The deployment an object belongs to, as the broker wrote it: labels are selectable and get edited
# by hand (that is drift to report), the annotation is the broker's own record of ownership.
OWNER_ANNOTATION = "broker.platform/owner"
KAFKA_CLUSTER_LABEL = "strimzi.io/cluster"

# Letters and digits only: the password travels as a redis-server argument (where a leading "--"
# would start a new option) and inside the SQL the mysql entrypoint writes (where a quote would end
# the literal). 32 of 62 symbols are about 190 bits, as much as the token_urlsafe(24) they replace.
_PASSWORD_ALPHABET = string.ascii_letters + string.digits
_PASSWORD_LENGTH = 32

# The official postgres, mysql and redis images all create their server's user and group as 999.
IMAGE_USER = 999

# Redis gets this share of the container's memory limit as maxmemory, so that a full cache evicts
# keys instead of being OOM-killed; the rest covers fragmentation, buffers and the copy-on-write of
# a background save.
REDIS_MAXMEMORY_SHARE = decimal.Decimal("0.75")


@dataclasses.dataclass(frozen=True)
class ImageContract:
    """What one engine's official image needs from its pod (see ``docs/image-contracts.md``).

    ``secret_env`` maps a variable the image reads to the key of the deployment's Secret it comes
    from; ``plain_env`` holds literal variables. ``args`` replace the image's command arguments;
    ``{maxmemory}`` in them is filled in from the size tier. ``probe`` is a shell script, run by the
    startup, readiness and liveness probes, that succeeds only when the server itself answers.
    ``username`` and ``database`` are what the Secret advertises (no ``database`` when empty);
    ``passwords`` are the Secret keys that hold generated passwords.
    """

    data_mount: str
    secret_env: tuple[tuple[str, str], ...]
    plain_env: tuple[tuple[str, str], ...]
    args: tuple[str, ...]
    probe: str
    username: str
    database: str
    passwords: tuple[str, ...]
    user: int = IMAGE_USER


CONTRACTS: dict[str, ImageContract] = {
    "postgresql": ImageContract(
        data_mount="/var/lib/postgresql/data",
        secret_env=(
            ("POSTGRES_USER", "username"),
            ("POSTGRES_PASSWORD", "password"),
            ("POSTGRES_DB", "database"),
        ),
        # initdb refuses a mount point (lost+found): the data lives one level down.
        plain_env=(("PGDATA", "/var/lib/postgresql/data/pgdata"),),
        args=(),
        probe='pg_isready -U "$POSTGRES_USER" -d "$POSTGRES_DB" -h 127.0.0.1',
        username="app",
        database="app",
        passwords=("password",),
    ),
    "mysql": ImageContract(
        data_mount="/var/lib/mysql",
        secret_env=(
            ("MYSQL_ROOT_PASSWORD", "root-password"),
            ("MYSQL_USER", "username"),
            ("MYSQL_PASSWORD", "password"),
            ("MYSQL_DATABASE", "database"),
        ),
        plain_env=(),
        # mysqld --initialize aborts on a non-empty directory (lost+found): the data lives one
        # level down. Starting with "-", the arguments go to mysqld (the entrypoint prepends it).
        args=("--datadir=/var/lib/mysql/data",),
        # MYSQL_PWD only in the probe's environment: in the container's, the entrypoint's client
        # would send it as root's password while root has none yet, and initialization would fail.
        probe='MYSQL_PWD="$MYSQL_PASSWORD" mysqladmin ping -h 127.0.0.1 -u "$MYSQL_USER" --silent',
        username="app",
        database="app",
        passwords=("password", "root-password"),
    ),
    "redis": ImageContract(
        data_mount="/data",
        # The image reads no variable: REDIS_PASSWORD exists for the args and the probe below.
        secret_env=(("REDIS_PASSWORD", "password"),),
        plain_env=(),
        args=(
            "--requirepass",
            "$(REDIS_PASSWORD)",
            "--maxmemory",
            "{maxmemory}",
            "--maxmemory-policy",
            "allkeys-lru",
        ),
        # redis-cli exits 0 on error replies (NOAUTH, LOADING), so the reply itself is checked.
        probe='[ "$(REDISCLI_AUTH="$REDIS_PASSWORD" redis-cli -h 127.0.0.1 ping)" = PONG ]',
        # requirepass is the password of redis's "default" user.
        username="default",
        database="",
        passwords=("password",),
    ),
}

# The startup probe gives a first initialization (mysqld --initialize) or a crash recovery up to
# five minutes before liveness takes over; liveness restarts a server silent for a minute.
PROBE_TIMINGS: dict[str, JsonDict] = {
    "startupProbe": {
        "initialDelaySeconds": 5,
        "periodSeconds": 5,
        "timeoutSeconds": 5,
        "successThreshold": 1,
        "failureThreshold": 60,
    },
    "readinessProbe": {
        "initialDelaySeconds": 0,
        "periodSeconds": 5,
        "timeoutSeconds": 5,
        "successThreshold": 1,
        "failureThreshold": 3,
    },
    "livenessProbe": {
        "initialDelaySeconds": 0,
        "periodSeconds": 10,
        "timeoutSeconds": 5,
        "successThreshold": 1,
        "failureThreshold": 6,
    },
}


def _meta(deployment: model.Deployment, name: str, *, annotations: dict[str, str] | None = None) -> JsonDict:
    return {
        "name": name,
        "namespace": deployment.namespace,
        "labels": naming.labels(deployment.deployment_id, deployment.resource_type, deployment.resource_name),
        "annotations": {OWNER_ANNOTATION: deployment.deployment_id, **(annotations or {})},
    }


def image_for(deployment: model.Deployment, catalog: catalog_mod.Catalog) -> str:
    """The container image, with a floating version resolved through the catalog (15 -> 15.2)."""
    spec = deployment.desired_spec
    engine = catalog.engines[spec.engine]
    return f"{engine.image}:{catalog.resolve_version(spec.engine, spec.version)}"


def redis_maxmemory(resources: model.ComputeResources) -> str:
    """Redis's maxmemory in bytes: ``REDIS_MAXMEMORY_SHARE`` of the container's memory limit."""
    limit = quantity.parse(resources.memory_limit)
    return str(int((limit * REDIS_MAXMEMORY_SHARE).to_integral_value(rounding=decimal.ROUND_FLOOR)))


def container_env(deployment: model.Deployment) -> list[JsonDict]:
    """The environment of a database's or cache's container, as its StatefulSet sets it."""
    contract = CONTRACTS[deployment.desired_spec.engine]
    secret = naming.secret_name(deployment.resource_type, deployment.resource_name)
    env: list[JsonDict] = [
        {"name": var, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}
        for var, key in contract.secret_env
    ]
    env += [{"name": var, "value": value} for var, value in contract.plain_env]
    return env


def _probes(contract: ImageContract) -> JsonDict:
    # Exec probes run without a shell; the script needs one to read the container's variables.
    command = {"exec": {"command": ["sh", "-c", contract.probe]}}
    return {probe: {**command, **timings} for probe, timings in PROBE_TIMINGS.items()}


def statefulset(deployment: model.Deployment, catalog: catalog_mod.Catalog) -> JsonDict:
    """The StatefulSet of a database or cache, configured as its image's contract says."""
    spec = deployment.desired_spec
    resources = spec.resources or catalog.sizes[spec.size]
    name = deployment.resource_name
    contract = CONTRACTS[spec.engine]
    labels = naming.labels(deployment.deployment_id, deployment.resource_type, name)
    selector = {naming.LABEL_NAME: name, naming.LABEL_DEPLOYMENT: deployment.deployment_id}
    container: JsonDict = {
        "name": spec.engine,
        "image": image_for(deployment, catalog),
        "ports": [
            {
                "name": "client",
                "containerPort": naming.port(catalog, deployment.resource_type, spec.engine),
            }
        ],
        "env": container_env(deployment),
        "resources": {
            "requests": {"cpu": resources.cpu_request, "memory": resources.memory_request},
            "limits": {"cpu": resources.cpu_limit, "memory": resources.memory_limit},
        },
        "volumeMounts": [{"name": "data", "mountPath": contract.data_mount}],
        **_probes(contract),
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
    }
    if contract.args:
        maxmemory = redis_maxmemory(resources) if "{maxmemory}" in contract.args else ""
        container["args"] = [arg.replace("{maxmemory}", maxmemory) for arg in contract.args]
    pod_spec: JsonDict = {
        # The images start as root only to chown the volume and step down to their user; started
        # as that user with the volume group-owned (fsGroup), they skip both.
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": contract.user,
            "runAsGroup": contract.user,
            "fsGroup": contract.user,
            "fsGroupChangePolicy": "OnRootMismatch",
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        # Present at every replica count: the pod template must not change when replicas do, or
        # scaling would restart every running replica; with one pod the constraint is a no-op.
        "topologySpreadConstraints": [
            {
                "maxSkew": 1,
                "topologyKey": "kubernetes.io/hostname",
                "whenUnsatisfiable": "ScheduleAnyway",
                "labelSelector": {"matchLabels": dict(selector)},
            }
        ],
        "containers": [container],
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": _meta(deployment, name, annotations={GENERATION_ANNOTATION: str(deployment.generation)}),
        "spec": {
            "serviceName": name,
            "replicas": spec.replicas or 1,
            "selector": {"matchLabels": selector},
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
            "volumeClaimTemplates": [
                {
                    "metadata": {"name": "data", "labels": labels},
                    "spec": {
                        "accessModes": ["ReadWriteOnce"],
                        "resources": {"requests": {"storage": resources.storage}},
                    },
                }
            ],
        },
    }


def service(deployment: model.Deployment, catalog: catalog_mod.Catalog) -> JsonDict:
    """The ClusterIP Service clients connect through."""
    name = deployment.resource_name
    port = naming.port(catalog, deployment.resource_type, deployment.desired_spec.engine)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(deployment, name),
        "spec": {
            "type": "ClusterIP",
            "selector": {naming.LABEL_NAME: name, naming.LABEL_DEPLOYMENT: deployment.deployment_id},
            "ports": [{"name": "client", "port": port, "targetPort": "client", "protocol": "TCP"}],
        },
    }


def data_checksum(data: dict[str, str]) -> str:
    """A checksum of a Secret's base64 data, stable under key order."""
    digest = hashlib.sha256()
    for key in sorted(data):
        digest.update(key.encode() + b"\0" + data[key].encode() + b"\0")
    return digest.hexdigest()


def generate_password() -> str:
    """A fresh random password of letters and digits (see ``_PASSWORD_ALPHABET`` for why)."""
    return "".join(secrets.choice(_PASSWORD_ALPHABET) for _ in range(_PASSWORD_LENGTH))


def secret(deployment: model.Deployment, catalog: catalog_mod.Catalog) -> JsonDict:
    """The credentials Secret, with fresh passwords from ``secrets`` (never logged, never returned).

    Its keys are the ones the StatefulSet's environment refers to (``ImageContract.secret_env``),
    plus ``host`` and ``port``: the endpoint and port the broker reports for the deployment.
    """
    name = deployment.resource_name
    contract = CONTRACTS[deployment.desired_spec.engine]
    plain = {"username": contract.username}
    plain.update((key, generate_password()) for key in contract.passwords)
    if contract.database:
        plain["database"] = contract.database
    plain["host"] = naming.endpoint(deployment.resource_type, deployment.namespace, name)
    plain["port"] = str(naming.port(catalog, deployment.resource_type, deployment.desired_spec.engine))
    data = {k: base64.b64encode(v.encode()).decode() for k, v in plain.items()}
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": _meta(
            deployment,
            naming.secret_name(deployment.resource_type, name),
            annotations={CHECKSUM_ANNOTATION: data_checksum(data)},
        ),
        "data": data,
    }


def kafka_topic(deployment: model.Deployment, *, kafka_cluster: str) -> JsonDict:
    """The Strimzi KafkaTopic of a topic."""
    spec = deployment.desired_spec
    topic = spec.topic or model.TopicSpec(partitions=1, retention_ms=0)
    meta = _meta(deployment, deployment.resource_name)
    meta["labels"][KAFKA_CLUSTER_LABEL] = kafka_cluster
    config: JsonDict = {}
    if topic.retention_ms:
        config["retention.ms"] = topic.retention_ms
    return {
        "apiVersion": "kafka.strimzi.io/v1beta2",
        "kind": "KafkaTopic",
        "metadata": meta,
        "spec": {"partitions": topic.partitions, "replicas": spec.replicas or 1, "config": config},
    }

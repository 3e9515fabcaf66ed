"""The Kubernetes objects of a deployment (DESIGN section 4), as plain manifests.

database (postgresql, mysql) and cache (redis): a StatefulSet with one container and a volume claim
template, a Service, and a Secret with generated credentials. topic (kafka): a Strimzi KafkaTopic.
Every object carries ``naming.labels``. The Secret is created once and never re-applied: applying
it again would rotate the password under a running database. Its data checksum is recorded in an
annotation so that an edit made outside the broker is noticed.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from typing import Any

from broker.domain import catalog as catalog_mod
from broker.domain import model, naming

JsonDict = dict[str, Any]
CHECKSUM_ANNOTATION = "broker.platform/data-checksum"
GENERATION_ANNOTATION = "broker.platform/generation"
KAFKA_CLUSTER_LABEL = "strimzi.io/cluster"

_ENGINE_SETTINGS: dict[str, tuple[str, str, str]] = {
    # engine: (password variable, user variable or "", data directory)
    "postgresql": ("POSTGRES_PASSWORD", "POSTGRES_USER", "/var/lib/postgresql/data"),
    "mysql": ("MYSQL_ROOT_PASSWORD", "", "/var/lib/mysql"),
    "redis": ("REDIS_PASSWORD", "", "/data"),
}


def _meta(deployment: model.Deployment, name: str, **extra: Any) -> JsonDict:
    meta: JsonDict = {
        "name": name,
        "namespace": deployment.namespace,
        "labels": naming.labels(deployment.deployment_id, deployment.resource_type, deployment.resource_name),
    }
    meta.update(extra)
    return meta


def image_for(deployment: model.Deployment, catalog: catalog_mod.Catalog) -> str:
    """The container image, with a floating version resolved through the catalog (15 -> 15.2)."""
    spec = deployment.desired_spec
    engine = catalog.engines[spec.engine]
    return f"{engine.image}:{catalog.resolve_version(spec.engine, spec.version)}"


def statefulset(deployment: model.Deployment, catalog: catalog_mod.Catalog) -> JsonDict:
    """The StatefulSet of a database or cache."""
    spec = deployment.desired_spec
    resources = spec.resources or catalog.sizes[spec.size]
    name = deployment.resource_name
    password_var, user_var, data_dir = _ENGINE_SETTINGS[spec.engine]
    secret = naming.secret_name(deployment.resource_type, name)
    env: list[JsonDict] = [
        {"name": password_var, "valueFrom": {"secretKeyRef": {"name": secret, "key": "password"}}},
    ]
    if user_var:
        env.append({"name": user_var, "valueFrom": {"secretKeyRef": {"name": secret, "key": "username"}}})
    labels = naming.labels(deployment.deployment_id, deployment.resource_type, name)
    selector = {naming.LABEL_NAME: name, naming.LABEL_DEPLOYMENT: deployment.deployment_id}
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": _meta(deployment, name, annotations={GENERATION_ANNOTATION: str(deployment.generation)}),
        "spec": {
            "serviceName": name,
            "replicas": spec.replicas or 1,
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "containers": [
                        {
                            "name": spec.engine,
                            "image": image_for(deployment, catalog),
                            "ports": [
                                {
                                    "name": "client",
                                    "containerPort": naming.port(
                                        catalog, deployment.resource_type, spec.engine
                                    ),
                                }
                            ],
                            "env": env,
                            "resources": {
                                "requests": {
                                    "cpu": resources.cpu_request,
                                    "memory": resources.memory_request,
                                },
                                "limits": {"cpu": resources.cpu_limit, "memory": resources.memory_limit},
                            },
                            "volumeMounts": [{"name": "data", "mountPath": data_dir}],
                        }
                    ]
                },
            },
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


def secret(deployment: model.Deployment, catalog: catalog_mod.Catalog) -> JsonDict:
    """The credentials Secret, with a fresh password from ``secrets`` (never logged, never returned)."""
    name = deployment.resource_name
    plain = {
        "username": "app",
        "password": secrets.token_urlsafe(24),
        "host": naming.endpoint(deployment.resource_type, deployment.namespace, name),
        "port": str(naming.port(catalog, deployment.resource_type, deployment.desired_spec.engine)),
    }
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

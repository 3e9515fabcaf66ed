"""How a resource's Kubernetes objects and connection details are named, in one place."""

from __future__ import annotations

from broker.domain import catalog as catalog_mod
from broker.domain import model


def endpoint(resource_type: model.ResourceType, namespace: str, name: str) -> str:
    """The in-cluster DNS name clients connect to; topics are reached through their Kafka cluster."""
    if resource_type is model.ResourceType.TOPIC:
        return ""
    return f"{name}.{namespace}.svc.cluster.local"


def port(catalog: catalog_mod.Catalog, resource_type: model.ResourceType, engine: str) -> int:
    """The port clients connect to (5432, 3306, 6379), or 0 for topics and unknown engines."""
    known = catalog.engines.get(engine)
    if resource_type is model.ResourceType.TOPIC or known is None:
        return 0
    return known.port


def secret_name(resource_type: model.ResourceType, name: str) -> str:
    """The name of the Secret with the generated credentials; topics have none."""
    if resource_type is model.ResourceType.TOPIC:
        return ""
    return f"{name}-credentials"


MANAGED_BY = "resource-broker"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_NAME = "app.kubernetes.io/name"
LABEL_DEPLOYMENT = "broker.platform/deployment-id"
LABEL_TYPE = "broker.platform/resource-type"
# Watched by the deployment label's existence, not by ``managed-by``: a person who relabels
# ``app.kubernetes.io/managed-by`` (a label other tools also write) must see labels.changed, not the
# object reported missing. An object whose deployment label itself is changed leaves the selection;
# the cluster adapter then looks it up by name (``observer.ClusterState``'s strays).
SELECTOR = LABEL_DEPLOYMENT


def labels(deployment_id: str, resource_type: model.ResourceType, name: str) -> dict[str, str]:
    """The labels every object of a deployment carries; the broker watches by ``SELECTOR`` only."""
    return {
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_NAME: name,
        LABEL_DEPLOYMENT: deployment_id,
        LABEL_TYPE: resource_type.value,
    }

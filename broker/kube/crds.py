"""Custom resource definitions the broker relies on, for clusters (like the sandbox) that lack them.

A real cluster gets KafkaTopic from the Strimzi operator; the sandbox is seeded with this minimal
definition so topics can be provisioned there.
"""

from __future__ import annotations

from typing import Any

KAFKA_TOPIC: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "kafkatopics.kafka.strimzi.io"},
    "spec": {
        "group": "kafka.strimzi.io",
        "scope": "Namespaced",
        "names": {
            "kind": "KafkaTopic",
            "listKind": "KafkaTopicList",
            "plural": "kafkatopics",
            "singular": "kafkatopic",
            "shortNames": ["kt"],
        },
        "versions": [
            {
                "name": "v1beta2",
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "schema": {
                    "openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
                },
            }
        ],
    },
}

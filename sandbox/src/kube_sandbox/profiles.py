"""Profiles: what a fresh sandbox holds before anyone calls it.

A real platform cluster comes with namespaces for its teams and the CRDs of the operators it runs;
a sandbox that is to stand in for one starts with the same. ``platform`` is that profile for a
broker of databases, caches and topics: team namespaces and Strimzi's ``KafkaTopic`` CRD (a real
cluster gets it from the Strimzi operator). Objects of a profile are created at start unless they
exist already (a restored sandbox keeps its own), so a profile never overwrites anything.
"""

from __future__ import annotations

import dataclasses
from typing import Any

JsonDict = dict[str, Any]

STRIMZI_KAFKA_TOPIC_CRD: JsonDict = {
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
                "additionalPrinterColumns": [
                    {"name": "Partitions", "type": "integer", "jsonPath": ".spec.partitions"},
                    {
                        "name": "Ready",
                        "type": "string",
                        "jsonPath": '.status.conditions[?(@.type=="Ready")].status',
                    },
                ],
            }
        ],
    },
}


@dataclasses.dataclass(frozen=True)
class Profile:
    """A named set of objects a sandbox starts with."""

    name: str
    objects: tuple[JsonDict, ...] = ()


def namespace(name: str) -> JsonDict:
    """A Namespace object."""
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}


def platform(namespaces: tuple[str, ...] = ("team-platform",)) -> Profile:
    """Team namespaces and Strimzi's KafkaTopic CRD."""
    return Profile("platform", (STRIMZI_KAFKA_TOPIC_CRD, *(namespace(n) for n in namespaces)))


EMPTY = Profile("empty")
PROFILES = {"empty": EMPTY, "platform": platform()}

"""A stand-in for Strimzi's topic operator: every ``KafkaTopic`` becomes ``Ready``.

There is no Kafka cluster behind it; :class:`KafkaTopicController` only writes the status a real
topic operator would, so clients waiting for readiness proceed. Its own module because it serves a
custom resource, unlike the built-in controllers.
"""

from __future__ import annotations

from kube_sandbox import resources, store
from kube_sandbox.controllers import base

KAFKA_TOPICS: resources.StorageKey = ("kafka.strimzi.io", "kafkatopics")


class KafkaTopicController(base.Runner):
    """A stand-in for Strimzi's topic operator: every KafkaTopic becomes Ready."""

    keys = frozenset({KAFKA_TOPICS})

    def handle(self, batch: list[store.Event]) -> None:
        """Mark changed topics Ready with the generation they reflect."""
        for event in batch:
            if event.type == "DELETED":
                continue
            meta = event.obj["metadata"]
            topic = self.store.find(KAFKA_TOPICS, meta.get("namespace", ""), meta["name"])
            if topic is None or topic["metadata"].get("deletionTimestamp"):
                continue
            generation = topic["metadata"].get("generation", 1)
            status = topic.get("status") or {}
            if status.get("observedGeneration") == generation and any(
                c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or []
            ):
                continue
            rt = self.store.registry.preferred(KAFKA_TOPICS)
            if rt is None:
                return
            changed = store.thaw(topic)
            changed["status"] = {
                "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": store.now()}],
                "observedGeneration": generation,
                "topicName": (topic.get("spec") or {}).get("topicName") or meta["name"],
                "topicId": base.safe_hash(meta["uid"], 22),
            }
            self.store.update(
                rt,
                changed,
                manager="strimzi-topic-operator",
                subresource="status" if rt.status_subresource else "",
            )

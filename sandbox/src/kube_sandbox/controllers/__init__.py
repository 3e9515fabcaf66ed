"""The workload simulator: the controllers a real cluster runs, reduced to what brokers observe.

* :class:`Kubelet` binds pods to the one simulated node, starts them after ``ready_delay`` and keeps
  ``status`` honest: phase, conditions, ``containerStatuses`` with the running (resolved) image,
  ``restartCount``; crash and readiness faults show as CrashLoopBackOff / not ready.
* :class:`StatefulSetController` creates, scales (OrderedReady or Parallel) and rolls pods
  ``<name>-<ordinal>`` and their claims ``<template>-<name>-<ordinal>`` (which it never deletes,
  Kubernetes' default ``Retain`` policy) and keeps the StatefulSet's ``status`` true.
* :class:`KafkaTopicController` marks Strimzi ``KafkaTopic`` objects ``Ready``.
* :class:`GarbageCollector` deletes dependents of deleted owners (background), finishes foreground
  deletions and empties terminating namespaces.
* :func:`pod_metrics` answers ``metrics.k8s.io`` from the running pods' requests.

Every controller is driven by the store's change stream, never by polling, so reactions take
milliseconds; timers only model time that passes in a real cluster (container start-up, crash
back-off). Like a real controller, each starts from the current state (every stored object as
ADDED) before it follows changes, so after a restore it picks up where the previous run stopped;
the kubelet first takes over the restored pods' containers from their status, as a restarted
kubelet finds them running, so a restore rewrites nothing that was already true.

Events are recorded as client-go's ``EventCorrelator`` records them: a repeat of the same event
(same source, object, type, reason and message) increments ``count`` and ``lastTimestamp`` of one
Event object instead of adding another, so a StatefulSet scaled up and down all day has a handful
of Events, not one per pod.

One module per controller (:mod:`~kube_sandbox.controllers.kubelet`,
:mod:`~kube_sandbox.controllers.statefulset`, :mod:`~kube_sandbox.controllers.kafkatopic`,
:mod:`~kube_sandbox.controllers.garbage_collector`, :mod:`~kube_sandbox.controllers.metrics`), and
:mod:`~kube_sandbox.controllers.base` for what they share: the loop, Event recording, hashes and
quantity parsing. Callers import the names below from ``kube_sandbox.controllers``.
"""

from kube_sandbox.controllers.base import EVENTS, PODS, JsonDict, PodKey, Runner, parse_quantity, record_event
from kube_sandbox.controllers.garbage_collector import GarbageCollector
from kube_sandbox.controllers.kafkatopic import KAFKA_TOPICS, KafkaTopicController
from kube_sandbox.controllers.kubelet import NODE_IP, NODE_NAME, Kubelet
from kube_sandbox.controllers.metrics import pod_metrics
from kube_sandbox.controllers.statefulset import PVCS, STATEFULSETS, StatefulSetController, revision_of

__all__ = [
    "EVENTS",
    "KAFKA_TOPICS",
    "NODE_IP",
    "NODE_NAME",
    "PODS",
    "PVCS",
    "STATEFULSETS",
    "GarbageCollector",
    "JsonDict",
    "KafkaTopicController",
    "Kubelet",
    "PodKey",
    "Runner",
    "StatefulSetController",
    "parse_quantity",
    "pod_metrics",
    "record_event",
    "revision_of",
]

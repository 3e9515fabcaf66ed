"""An embedded Kubernetes API server with a workload simulator: "the sandbox".

Stock ``kubectl`` and ``kubernetes-asyncio`` talk to it over plain HTTP on loopback as if it were
a cluster::

    async with Sandbox(ready_delay=0.2) as sandbox:
        sandbox.write_kubeconfig("sandbox.kubeconfig")
        sandbox.faults.crash_pod(namespace="default", name="db-0")

It serves discovery, core/v1 (namespaces, services, secrets, configmaps, pods, events,
persistentvolumeclaims), apps/v1 statefulsets (with ``scale`` and ``status``),
coordination.k8s.io/v1 leases, apiextensions.k8s.io/v1 CRDs and their custom objects, and
metrics.k8s.io/v1beta1 pod metrics, with kube-apiserver's semantics: one global resourceVersion,
generation on spec changes, label and field selectors, managedFields, merge/JSON/strategic patches,
server-side apply with conflicts, optimistic concurrency, Status errors, owner references with
cascading deletion, paginated lists, resumable watches with 410 Gone and bookmarks, Tables for
``kubectl get``.

Deliberate differences from a real cluster (it is a sandbox, and says so when it starts):

* State lives in memory; with ``Sandbox(state_dir=...)`` (what ``broker serve --sandbox`` and
  ``broker sandbox`` use, in ``<data-dir>/sandbox``) it is also saved to a JSON snapshot, debounced
  and at stop, and restored at start with uids and resourceVersions intact, the watch history
  excepted (see :mod:`kube_sandbox.persistence`). There is no etcd and no authorization (RBAC
  is absent: every user may do everything). Authentication is a fixed token per user
  (:mod:`kube_sandbox.users`; a request without credentials is the default user, an unknown token
  401). TLS only with ``Sandbox(tls=True)`` (a certificate made at start); kubectl sends tokens
  only over TLS, so over plain HTTP all its contexts are the default user. Admission is
  ValidatingAdmissionPolicies only (:mod:`kube_sandbox.admission`, CEL by cel-python, without
  type checking, the ``authorizer`` variable or Kubernetes' CEL libraries); no webhooks, no
  mutating admission.
  Responses are always JSON; request bodies are JSON or YAML, plus protobuf for Namespace,
  ConfigMap and Secret only (what ``kubectl create namespace|configmap|secret`` send); other
  protobuf or CBOR bodies get 415, so e.g. ``kubectl create service`` fails (``kubectl
  apply``/``create -f`` work).
* No aggregated discovery (clients fall back to the per-group documents). OpenAPI v3 publishes only
  the PATCH operations kubectl checks for ``fieldValidation`` support, without schemas (``kubectl
  explain`` has nothing to show); there is no OpenAPI v2. ``fieldValidation=Strict`` is accepted but
  unknown fields are kept, never rejected.
* Pod logs (``pods/log``) answer with one line saying there are none; exec, attach, port-forward,
  proxy and eviction are not served.
* Only the kinds listed above exist: no Deployments, ReplicaSets, Nodes, PersistentVolumes,
  ControllerRevisions, ServiceAccounts or Endpoints. Pods are bound to one simulated node
  ``sandbox-node``; claims are Bound at once to a volume name that has no PersistentVolume object.
* Custom objects are not validated or pruned against the CRD's OpenAPI schema and CRD versions are
  not converted (every served version returns the same object with its own ``apiVersion``).
* Built-in validation covers the common mistakes only (names, required fields, StatefulSet
  selector/template and immutable spec fields, Service ports); defaulting covers what clients see
  most (Service type/clusterIP/ports, StatefulSet strategy fields, pod spec defaults).
* Strategic merge patch and server-side apply know merge keys by field name (containers, env, ports,
  volumeMounts, volumes, conditions, ownerReferences, ...), not from Go types or OpenAPI; other lists
  are atomic (``volumeClaimTemplates``, ``args``, ...). List-map keys do not include defaulted
  fields (container ports are keyed by ``containerPort`` alone). ``managedFields`` are recorded per
  (manager, operation, subresource), not per API version, and cannot be overwritten by clients;
  beyond 10 Update managers the oldest merge into ``ancient-changes``, as in kube-apiserver. Like
  kube-apiserver, the manager defaults to the User-Agent up to the first ``/``: kubectl 1.32
  sends ``fieldManager`` for ``edit``, ``patch``, ``label``, ``annotate``, ``set``, ``create`` and
  client-side ``apply``, but not for ``scale``, which therefore shows up as ``kubectl`` with
  subresource ``scale``.
* Built-in kinds drop ``null`` fields on write (as decoding into Go structs does), so e.g. a pod
  template's ``metadata.creationTimestamp: null`` is not echoed back.
* Paginated lists continue from the current state rather than an MVCC snapshot at the first page's
  resourceVersion; a continue token older than the watch window is ``410 Expired`` as after an etcd
  compaction. ``resourceVersionMatch=Exact`` only works for the current version.
* Watch history is one ring buffer across all kinds of at most ``watch_window`` events and
  ``watch_window_bytes`` of their serializations (kube-apiserver keeps one per kind, sized by time);
  watches without ``timeoutSeconds`` end after 30 minutes; a watcher whose queue overflows
  ``watch_queue_size`` is closed (the client re-watches and resumes).
* Events are not expired after an hour (``--event-ttl``) but kept to ``event_limit`` per namespace,
  least recently written removed first; controllers aggregate repeats into ``count`` as client-go
  does, so the simulator's Events stay few.
* Deletion is immediate: no graceful termination period (pods vanish without ``Terminating`` unless
  finalizers hold them); finalizers and foreground deletion do work. Terminating namespaces are
  emptied at once, regardless of the finalizers of their content.
* The simulator: containers start ``ready_delay`` after creation; a container whose image changes in
  place restarts; containers report the spec's image, as kubelet does, unless ``image_resolution``
  maps it to a runtime's spelling (see :data:`DEFAULT_IMAGE_RESOLUTION`, a fault to simulate one); the
  StatefulSet controller treats ``minReadySeconds`` as 0 and keeps no ControllerRevision history;
  KafkaTopics become Ready without a Kafka cluster; pod metrics are synthetic (cpu 25-50 % of the
  request, memory about half), served for running pods that are not crash-looping.
"""

from kube_sandbox.cluster import Sandbox, run_standalone, state_dir_of
from kube_sandbox.faults import DEFAULT_IMAGE_RESOLUTION, Faults
from kube_sandbox.persistence import StateError

__all__ = ["DEFAULT_IMAGE_RESOLUTION", "Faults", "Sandbox", "StateError", "run_standalone", "state_dir_of"]

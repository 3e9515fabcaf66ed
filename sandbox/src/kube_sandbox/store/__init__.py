"""The sandbox's object store: objects, the global resourceVersion, the event history and watchers.

Like etcd behind kube-apiserver, every write bumps one cluster-wide ``resourceVersion`` counter and
is recorded as a watch event in a ring buffer (the "watch window") bounded twice: by a number of
events (``watch_window``) and by the bytes of their serializations (``watch_window_bytes``), so
that a window of large objects cannot hold gigabytes. A watch that resumes from a version still
inside the window receives every later event; an older version gets ``410 Gone`` (reason
``Expired``). The window keeps each change as its serialization only (:class:`Change`), never the
parsed object: a parsed Kubernetes object takes five to ten times the memory of its JSON, and a
change is only parsed again when a watch resumes across it. Each stored object keeps its JSON
serialization next to it, so lists and watch events are serialized once per write, not once per
reader; every watcher has a bounded queue and is cut off (as kube-apiserver does with slow
watchers) when it overflows, so one stuck client cannot grow the server's memory.

Kubernetes Events are the one kind written as a side effect of other writes (controllers record
one per pod created or deleted), so they are bounded too: at most ``event_limit`` per namespace, the
least recently written one removed first, as kube-apiserver's ``--event-ttl`` expires them from etcd.

Stored objects are treated as immutable: every write builds a new dict. Readers get the stored dict
and must copy it (:func:`thaw`) before changing it.

All methods are synchronous and must be called from the event loop's thread; that makes each write
atomic with respect to watchers and controllers without locks.

The package is split along those seams; callers import the names below from ``kube_sandbox.store``:

* :mod:`~kube_sandbox.store.values`: serialization, :func:`thaw`, :func:`now` and :class:`Entry`;
* :mod:`~kube_sandbox.store.changes`: :class:`Event`, :class:`Change` and :class:`Watcher`;
* :mod:`~kube_sandbox.store.history`: the watch window and its ``410 Gone`` rule;
* :mod:`~kube_sandbox.store.fanout`: the open watches and subscriptions a change is delivered to;
* :mod:`~kube_sandbox.store.paging`: :class:`ListResult` and continue tokens;
* :mod:`~kube_sandbox.store.versions`: the resourceVersion counter and the persisted :class:`State`;
* :mod:`~kube_sandbox.store.allocators`: ``generateName`` suffixes and Service ClusterIPs;
* :mod:`~kube_sandbox.store.index`: the stored objects, their indexes and every read;
* :mod:`~kube_sandbox.store.objects`: :class:`Store`, every write's semantics.
"""

from kube_sandbox.store.changes import Change, Event, Watcher
from kube_sandbox.store.objects import (
    CRD_KEY,
    EVENT_KEY,
    NAMESPACE_KEY,
    SYSTEM_NAMESPACES,
    Admit,
    ObjectRef,
    StorageKey,
    Store,
)
from kube_sandbox.store.paging import ListResult
from kube_sandbox.store.values import Entry, JsonDict, dumps, now, thaw
from kube_sandbox.store.versions import State

__all__ = [
    "CRD_KEY",
    "EVENT_KEY",
    "NAMESPACE_KEY",
    "SYSTEM_NAMESPACES",
    "Admit",
    "Change",
    "Entry",
    "Event",
    "JsonDict",
    "ListResult",
    "ObjectRef",
    "State",
    "StorageKey",
    "Store",
    "Watcher",
    "dumps",
    "now",
    "thaw",
]

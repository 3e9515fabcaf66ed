"""Keeping the sandbox's objects across restarts: one JSON snapshot, replaced atomically.

With a state directory (``Sandbox(state_dir=...)``; ``broker serve --sandbox`` and ``broker
sandbox`` pass ``<data-dir>/sandbox``), the sandbox keeps every stored object in
``<dir>/state.json`` and restores it at the next start: namespaces, secrets, services,
statefulsets, pods, claims, leases, events, CRDs and their custom objects, each with its uid,
creationTimestamp, resourceVersion, generation and managedFields, and the resourceVersion counter
and ClusterIP allocator with them. Without one (the default, and what throwaway test sandboxes
use) nothing touches the disk.

**Why a snapshot.** A sandbox holds hundreds, at most a few thousand, objects, and the store
already keeps each one's JSON serialization, so a snapshot is a concatenation of bytes that exist
anyway: taking it costs a list of references on the event loop, writing it happens in a worker
thread. An append-only journal would lose less on a crash but has to be compacted, replayed and
kept in step with CRD registration; SQLite is the broker store's business (an import-linter
contract keeps ``sqlite3`` out of ``kube_sandbox``). What clients of a Kubernetes API actually
depend on across a restart is that objects keep their identity and that resourceVersions never
repeat, and a snapshot with a version ceiling (below) gives both.

**When it is written.** At start, before the API serves (an "in use" snapshot carrying the version
ceiling); ``interval`` seconds after a change (debounced: a burst of writes costs one snapshot);
and at stop, after the API and the simulator have stopped, the final "clean" snapshot. Each
snapshot is taken on the event loop in one synchronous step, so it is one consistent version of
the whole store.

**How it is written.** Into a temporary file in the same directory, flushed and ``fsync``-ed,
renamed over ``state.json`` (``os.replace``, atomic on POSIX), then the directory is ``fsync``-ed:
a start sees the previous snapshot or the new one, never a mix. Mode 0600 in a 0700 directory:
Secrets are in it, base64-encoded as in etcd without encryption at rest. ``<dir>/lock`` holds an
exclusive ``flock`` while a sandbox uses the directory, so a second one fails with a clear error
instead of two sandboxes overwriting each other's state.

**Guarantees.**

* After a clean stop, a start restores exactly the stopped state and the resourceVersion counter
  continues from where it stopped.
* After a crash (the process killed, the machine lost), the changes of the last ``interval``
  seconds at most are lost, but no resourceVersion is ever handed out twice: every snapshot records
  a ceiling ``reserve`` versions above its counter, the store never hands out a version above the
  durable ceiling (reaching it writes a snapshot with a new ceiling first, synchronously, which the
  debounced snapshots make rare), and a start after a crash continues from the ceiling.
* The watch history is not kept. After a restore the window starts empty at the restored version:
  a watch or continue token from an older version gets ``410 Gone`` and the client relists, as
  after an etcd compaction, instead of silently missing the changes it did not see; a watch from
  the restored version itself resumes normally.
* Not kept: injected faults, open watches, and the simulator's timers (a pod that was starting
  starts again; running pods are taken over from their status, see
  :meth:`kube_sandbox.controllers.Kubelet.adopt`).

**Format** (``version`` 1; a file of another version is refused, not guessed at)::

    {"kind": "SandboxState", "version": 1, "clean": true, "savedAt": "2025-01-01T00:00:00Z",
     "resourceVersion": "1234", "resourceVersionCeiling": "101234", "serviceIPs": 12,
     "objects": [{"group": "", "resource": "pods", "items": [{...}, ...]}, ...]}
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import pathlib
import threading

from kube_sandbox import store

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
LOCK_FILE = "lock"
FORMAT_VERSION = 1
DEFAULT_RESERVE = 100_000
"""How far above its counter a snapshot's version ceiling lies (versions usable before a new one)."""


class StateError(ValueError):
    """The state directory cannot be used: unreadable or foreign state file, or in use elsewhere."""


@dataclasses.dataclass(frozen=True)
class Loaded:
    """A state file as read back: the counters and the objects by storage key."""

    clean: bool
    saved_at: str
    resource_version: int
    ceiling: int
    service_ips: int
    objects: dict[store.StorageKey, list[store.JsonDict]]


@dataclasses.dataclass(frozen=True)
class Restored:
    """What :meth:`Persistence.open` did: which file, how many objects, from what kind of stop."""

    path: pathlib.Path
    objects: int
    resource_version: int
    existed: bool
    clean: bool
    saved_at: str = ""

    def describe(self) -> str:
        """The start-up line: where the state lives and what was restored from it."""
        if not self.existed:
            return f"sandbox state: {self.path} (none yet; starting empty)"
        how = (
            ""
            if self.clean
            else f" (the last run did not stop cleanly: changes after {self.saved_at} are lost)"
        )
        return (
            f"sandbox state: restored {self.objects} objects from {self.path}, "
            f"resourceVersion continues from {self.resource_version}{how}"
        )


def _encode(state: store.State, *, clean: bool, ceiling: int) -> list[bytes]:
    """The snapshot document as chunks (the objects' serializations are written as they are)."""
    head = {
        "kind": "SandboxState",
        "version": FORMAT_VERSION,
        "clean": clean,
        "savedAt": store.now(),
        "resourceVersion": str(state.resource_version),
        "resourceVersionCeiling": str(ceiling),
        "serviceIPs": state.service_ips,
    }
    chunks = [store.dumps(head)[:-1], b',"objects":[']
    for index, ((group, resource), items) in enumerate(sorted(state.objects.items())):
        if index:
            chunks.append(b",")
        chunks.append(store.dumps({"group": group, "resource": resource})[:-1] + b',"items":[')
        for position, raw in enumerate(items):
            if position:
                chunks.append(b",")
            chunks.append(raw)
        chunks.append(b"]}")
    chunks.append(b"]}\n")
    return chunks


def _decode(path: pathlib.Path, data: bytes) -> Loaded:
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise StateError(f"{path} is not valid JSON ({exc}); move it away to start empty") from exc
    if not isinstance(doc, dict) or doc.get("kind") != "SandboxState":
        raise StateError(f"{path} is not a sandbox state file; move it away to start empty")
    if doc.get("version") != FORMAT_VERSION:
        raise StateError(
            f"{path} has state format version {doc.get('version')!r}, this sandbox reads version "
            f"{FORMAT_VERSION}; move it away to start empty"
        )
    try:
        rv = int(doc["resourceVersion"])
        objects: dict[store.StorageKey, list[store.JsonDict]] = {}
        for group_doc in doc["objects"]:
            key = (str(group_doc["group"]), str(group_doc["resource"]))
            items = group_doc["items"]
            if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
                raise TypeError(f"the items of {key[1]} are not a list of objects")
            objects.setdefault(key, []).extend(items)
        return Loaded(
            clean=bool(doc.get("clean")),
            saved_at=str(doc.get("savedAt", "")),
            resource_version=rv,
            ceiling=max(rv, int(doc.get("resourceVersionCeiling") or rv)),
            service_ips=int(doc.get("serviceIPs") or 0),
            objects=objects,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise StateError(f"{path} is damaged ({exc}); move it away to start empty") from exc


class Persistence:
    """The state directory of one sandbox: restore at start, debounced snapshots, a final one at stop.

    ``interval`` is the debounce delay (and so the most a crash can lose); ``reserve`` how many
    versions each snapshot's ceiling allows before another snapshot must be durable.
    """

    def __init__(
        self, directory: str | os.PathLike[str], *, interval: float = 1.0, reserve: int = DEFAULT_RESERVE
    ) -> None:
        if interval < 0 or reserve < 1:
            raise ValueError("interval must be >= 0 and reserve >= 1")
        self.directory = pathlib.Path(directory)
        self.path = self.directory / STATE_FILE
        self.interval = interval
        self.reserve = reserve
        self._write_lock = threading.Lock()
        self._taken = 0
        self._landed = 0
        self._lock_fd: int | None = None
        self._store: store.Store | None = None
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._failing = False

    # ----- start ---------------------------------------------------------------------------------

    async def open(self, st: store.Store) -> Restored:
        """Lock the directory, restore ``st`` from the state file if there is one, start saving.

        Raises :class:`StateError` when the file cannot be used or another sandbox holds the
        directory; nothing is changed then (the file is left for a human to look at).
        """
        await asyncio.to_thread(self._lock)
        try:
            loaded = await asyncio.to_thread(self._read)
            restored = Restored(path=self.path, objects=0, resource_version=0, existed=False, clean=True)
            if loaded is not None:
                # A crash may have handed out versions up to the ceiling: continue above them all.
                rv = loaded.resource_version if loaded.clean else loaded.ceiling
                try:
                    count = st.restore(
                        resource_version=rv, service_ips=loaded.service_ips, objects=loaded.objects
                    )
                except ValueError as exc:
                    raise StateError(f"{self.path} cannot be restored: {exc}") from exc
                restored = Restored(
                    path=self.path,
                    objects=count,
                    resource_version=rv,
                    existed=True,
                    clean=loaded.clean,
                    saved_at=loaded.saved_at,
                )
            # The file now says "in use" with a ceiling above every version this run may hand out.
            seq, state = self._take(st)
            ceiling = state.resource_version + self.reserve
            await asyncio.to_thread(self._write, seq, state, clean=False, ceiling=ceiling)
        except BaseException:
            self._unlock()
            raise
        self._wake = asyncio.Event()
        st.version_ceiling = ceiling
        st.on_ceiling = self._extend_ceiling
        st.on_write = self._wake.set
        self._store = st
        self._task = asyncio.create_task(self._run(), name="sandbox-persistence")
        return restored

    def _lock(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(fd)
            raise StateError(f"{self.directory} is in use by another sandbox") from exc
        self._lock_fd = fd
        for stale in self.directory.glob(f".{STATE_FILE}.*.tmp"):
            with contextlib.suppress(OSError):
                stale.unlink()

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def _read(self) -> Loaded | None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        return _decode(self.path, data)

    # ----- saving --------------------------------------------------------------------------------

    def _take(self, st: store.Store) -> tuple[int, store.State]:
        """A snapshot of the store and its place in the order of snapshots (event loop only)."""
        self._taken += 1
        return self._taken, st.export()

    def _write(self, seq: int, state: store.State, *, clean: bool, ceiling: int) -> bool:
        """Write snapshot number ``seq`` atomically unless a newer one has landed; thread-safe.

        A debounced snapshot still on its way to the worker thread can be overtaken by a
        synchronous one (:meth:`_extend_ceiling`) or the final one; writing it after them would
        bring back older objects and an older ceiling, so it is dropped instead.
        """
        chunks = _encode(state, clean=clean, ceiling=ceiling)
        with self._write_lock:
            if seq <= self._landed:
                return False
            tmp = self.directory / f".{STATE_FILE}.{os.getpid()}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.writelines(chunks)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    tmp.unlink()
                raise
            dir_fd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
            self._landed = seq
            return True

    async def _save(self) -> None:
        st = self._store
        assert st is not None
        seq, state = self._take(st)
        ceiling = state.resource_version + self.reserve
        landed = await asyncio.to_thread(self._write, seq, state, clean=False, ceiling=ceiling)
        # Only a durable ceiling may be used: raise the store's once the file holds it.
        if landed and st.version_ceiling is not None and ceiling > st.version_ceiling:
            st.version_ceiling = ceiling

    async def _run(self) -> None:
        """Debounce: after a change, wait ``interval`` (collecting more changes), then save once."""
        assert self._wake is not None
        while True:
            await self._wake.wait()
            await asyncio.sleep(self.interval)
            self._wake.clear()
            try:
                await self._save()
            except OSError as exc:
                if not self._failing:
                    log.error("cannot save the sandbox state to %s: %s (will retry)", self.path, exc)
                self._failing = True
                self._wake.set()
            else:
                if self._failing:
                    log.warning("sandbox state saved to %s again", self.path)
                self._failing = False

    def _extend_ceiling(self, rv: int) -> int:
        """The store reached the durable ceiling: save now, synchronously, with a new one.

        Called from inside a write, so the snapshot holds the store just before that write; the
        version being handed out is below the new ceiling, which is what a crash restore needs.
        """
        st = self._store
        assert st is not None
        ceiling = rv + self.reserve
        try:
            seq, state = self._take(st)
            self._write(seq, state, clean=False, ceiling=ceiling)
        except OSError as exc:
            log.error(
                "cannot save the sandbox state to %s: %s; after a crash now, resourceVersions could repeat",
                self.path,
                exc,
            )
        return ceiling

    # ----- stop ----------------------------------------------------------------------------------

    async def close(self) -> None:
        """Write the final, clean snapshot and release the directory."""
        st = self._store
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        try:
            if st is not None:
                st.on_write = None
                st.on_ceiling = None
                seq, state = self._take(st)
                await asyncio.to_thread(self._write, seq, state, clean=True, ceiling=state.resource_version)
                log.info(
                    "sandbox state: saved %d objects to %s (resourceVersion %d)",
                    state.count,
                    self.path,
                    state.resource_version,
                )
        except OSError as exc:
            # Stopping must go on (the broker closes its store after this). The file keeps the last
            # debounced snapshot, marked unclean, so the next start still continues above its ceiling.
            log.error("cannot save the final sandbox state to %s: %s", self.path, exc)
        finally:
            self._store = None
            self._unlock()

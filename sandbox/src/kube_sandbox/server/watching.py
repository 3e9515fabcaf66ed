"""The watch verb: a chunked stream of change events, resumable, with bookmarks and timeouts.

A watch starts from ``resourceVersion`` (``410 Gone`` once the window has moved past it) or from
the current state (``sendInitialEvents``, ending with the annotated bookmark), streams JSON lines
(or Table rows for ``kubectl get -w``), sends ``BOOKMARK`` events to clients that allow them, and
ends after ``timeoutSeconds`` (30 minutes by default). It is its own module because it is the one
long-lived response, with its own loop and clean-up, and because fault injection can force the
next watches to end in ``410 Gone`` (:attr:`Watches.forced_gone`).
"""

from __future__ import annotations

import asyncio
import contextlib

from aiohttp import web

from kube_sandbox import errors, resources, selectors, store, tables
from kube_sandbox.server import wire

JsonDict = wire.JsonDict

DEFAULT_WATCH_TIMEOUT = 1800.0


class Watches:
    """The watch streams of one API server, with the fault that makes the next ones expire."""

    def __init__(self, *, st: store.Store, bookmark_interval: float) -> None:
        self.store = st
        self.bookmark_interval = bookmark_interval
        self.forced_gone = 0
        """How many of the next watches are answered with ``410 Gone`` at once (a fault)."""

    async def watch(self, request: web.Request, route: wire.Route) -> web.StreamResponse:
        """Stream the changes of a collection (or of one object) until the timeout."""
        rt = route.rt
        query = request.query
        labels, fields = wire.selectors_of(request, rt)
        if route.name is not None:
            fields = selectors.FieldSelector(
                (
                    *fields.requirements,
                    *selectors.parse_fields(f"metadata.name={route.name}", kind=rt.kind).requirements,
                )
            )
        timeout = wire.parse_int(query.get("timeoutSeconds"), "timeoutSeconds")
        deadline = DEFAULT_WATCH_TIMEOUT if timeout is None or timeout <= 0 else float(timeout)
        bookmarks = wire.parse_bool(query.get("allowWatchBookmarks"))
        wants, _ = wire.representation(request)
        rv_text = query.get("resourceVersion", "")
        send_initial = wire.parse_bool(query.get("sendInitialEvents"))
        since = None if rv_text in ("", "0") or send_initial else wire.parse_int(rv_text, "resourceVersion")
        response = web.StreamResponse(
            status=200, headers={"Content-Type": wire.JSON, "Cache-Control": "no-cache"}
        )
        response.enable_chunked_encoding()
        gone: errors.Gone | None = None
        watcher: store.Watcher | None = None
        if self.forced_gone > 0:
            self.forced_gone -= 1
            gone = errors.Gone(f"too old resource version: {rv_text or 0} ({self.store.resource_version})")
        else:
            try:
                watcher = self.store.watch(
                    rt,
                    namespace=(route.namespace or None) if rt.namespaced else None,
                    labels=labels,
                    fields=fields,
                    since=since,
                )
            except errors.Gone as exc:
                gone = exc
        if gone is not None or watcher is None:
            error = gone or errors.Gone("watch expired")
            await response.prepare(request)
            await response.write(store.dumps({"type": "ERROR", "object": error.status()}) + b"\n")
            await response.write_eof()
            return response
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline
        next_bookmark = loop.time() + self.bookmark_interval
        headers_sent = False
        initial_end_pending = send_initial and bookmarks
        # From here on the watcher is registered: whatever ends the request (a client gone before the
        # headers went out included) must unregister it, or it would collect events for nobody.
        try:
            await response.prepare(request)
            while True:
                remaining = end - loop.time()
                if remaining <= 0:
                    break
                wait = remaining
                if bookmarks:
                    wait = max(0.0, min(wait, next_bookmark - loop.time()))
                if initial_end_pending and watcher.pending == 0:
                    wait = 0.0
                batch = await watcher.next_batch(wait=wait)
                if batch is None:
                    break
                if batch:
                    if wants == "table":
                        chunks = []
                        for event in batch:
                            chunks.append(self._table_event(rt, event, headers=not headers_sent))
                            headers_sent = True
                        await response.write(b"".join(chunks))
                    elif rt.custom:
                        await response.write(b"".join(self._custom_line(rt, e) for e in batch))
                    else:
                        await response.write(b"".join(e.line() for e in batch))
                if watcher.pending:
                    continue
                if initial_end_pending:
                    initial_end_pending = False
                    await response.write(self._bookmark(rt, initial_end=True))
                    next_bookmark = loop.time() + self.bookmark_interval
                elif bookmarks and loop.time() >= next_bookmark:
                    await response.write(self._bookmark(rt, initial_end=False))
                    next_bookmark = loop.time() + self.bookmark_interval
            if bookmarks and not watcher.closed:
                await response.write(self._bookmark(rt, initial_end=False))
            with contextlib.suppress(ConnectionResetError):
                await response.write_eof()
        except ConnectionResetError:
            pass
        finally:
            self.store.unwatch(watcher)
        return response

    def _bookmark(self, rt: resources.ResourceType, *, initial_end: bool) -> bytes:
        meta: JsonDict = {"resourceVersion": str(self.store.resource_version), "creationTimestamp": None}
        if initial_end:
            meta["annotations"] = {"k8s.io/initial-events-end": "true"}
        return (
            store.dumps(
                {
                    "type": "BOOKMARK",
                    "object": {"kind": rt.kind, "apiVersion": rt.api_version, "metadata": meta},
                }
            )
            + b"\n"
        )

    def _custom_line(self, rt: resources.ResourceType, event: store.Event) -> bytes:
        if event.obj.get("apiVersion") == rt.api_version:
            return event.line()
        return store.dumps({"type": event.type, "object": wire.render(rt, event.obj)}) + b"\n"

    def _table_event(self, rt: resources.ResourceType, event: store.Event, *, headers: bool) -> bytes:
        doc = tables.table(
            rt,
            [wire.render(rt, event.obj)],
            resource_version=str(event.rv),
            include="Metadata",
            headers=headers,
        )
        return store.dumps({"type": event.type, "object": doc}) + b"\n"

"""The operator's web view at ``/ui``: plain HTML, CSS and JavaScript over the service layer.

What an operator looks at when something drifts: the resources of a namespace (phase, health,
drift, cost), one resource's field-level diff (desired against actual, who changed it, when it was
first seen) with its drift history and pending remediations, and the namespace's cost, desired
against actual. The page follows the event log live through server-sent events, resuming by
sequence as WatchDrift does.

Paths (a sub-application of the gateway, so its errors still leave through the one error table):

- ``GET /ui/``                       the page (``index.html``); without credentials, 303 to the login
- ``GET|POST /ui/login``             the login form; POST checks the token and sets the cookie
- ``POST /ui/logout``                clears the cookie
- ``GET /ui/static/{name}``          the page's CSS and JavaScript (no data: served without credentials)
- ``GET /ui/api/session``            who is signed in and the namespaces they are granted
- ``GET /ui/api/resources``          ``?namespace=[&deploymentId=]``: the /v1 resource JSON, plus the
                                     desired monthly cost and the pending remediations of each
- ``GET /ui/api/history``            ``?namespace=&deploymentId=``: the newest events of one deployment
- ``GET /ui/events``                 ``?namespace=[&after=SEQ]``: server-sent events, ``id:`` = sequence

Authentication is the gateway's: ``Authorization: Bearer <token>``, or, for a browser, the same
token posted once to the login form and then held in a cookie that is ``HttpOnly`` (no script
reads it), ``SameSite=Strict`` (no other site's page sends it), ``Path=/ui`` (the /v1 paths never
accept it, so it cannot be used to provision or delete anything) and ``Secure`` over TLS. The
cookie carries the token itself rather than a session id: every request checks it against the
token file again (a revoked token stops working at once), and any replica, restarted or not,
accepts it. A token in a query string was not chosen: URLs end up in logs and browser history.
Every path under /ui except the login is a GET that changes nothing; login and logout refuse a
cross-origin ``Origin``. In ``--insecure`` mode the view is served without credentials, like the
gateway.

Every response carries a strict Content-Security-Policy (scripts, styles and connections from this
origin only, no inline code, no framing). The JavaScript writes data with ``textContent`` and
DOM/SVG element constructors only, never as markup.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import importlib.resources
import json
from typing import Any

from aiohttp import web

from broker import auth, errors, service
from broker.api import convert, seed_json, status
from broker.domain import approval, costs, model, validation
from broker.domain import catalog as catalog_mod

COOKIE = "broker_ui_token"
COOKIE_PATH = "/ui"
COOKIE_MAX_AGE = 8 * 3600
HISTORY_LIMIT = 200

CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "connect-src 'self'",
        "form-action 'self'",
        "frame-ancestors 'none'",
        "base-uri 'none'",
    )
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    # Not no-referrer: under it a browser sends "Origin: null" with the login form, which is refused.
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}

# The files the page is made of, and their types; nothing else under ui_static is served.
STATIC_TYPES = {
    "app.js": "text/javascript",
    "app.css": "text/css",
    "favicon.svg": "image/svg+xml",
}
_LOGIN_ERROR_MARK = 'id="login-error" hidden'


def _static(name: str) -> bytes:
    return (importlib.resources.files("broker.api") / "ui_static" / name).read_bytes()


def pending_remediations(found: list[approval.Remediation]) -> dict[str, Any]:
    """The remediations of a resource that wait for a person's approval (policy mode approve).

    Read-only: each change with its from and to values, who made the running value, the cost
    delta, and when the proposal expires. Deciding stays with ``broker approve`` / ``broker
    reject`` and the API, where the approve grant is checked.
    """
    items = [
        {
            "remediationId": r.remediation_id,
            "field": change.field,
            "from": change.from_value,
            "to": change.to_value,
            "changedBy": change.changed_by,
            "monthlyCostDelta": change.monthly_cost_delta,
            "message": change.message,
            "expireTime": r.expire_time.isoformat(timespec="seconds"),
        }
        for r in found
        if r.state is approval.State.PENDING
        for change in r.changes
    ]
    return {"supported": True, "items": items}


class OperatorView:
    """The /ui sub-application: pages, static files, JSON for the page and its event stream."""

    def __init__(
        self,
        *,
        service: service.BrokerService,
        authenticator: auth.Authenticator,
        catalog: catalog_mod.Catalog,
    ) -> None:
        self._service = service
        self._auth = authenticator
        self._catalog = catalog
        self._files = {name: _static(name) for name in STATIC_TYPES}
        self._index = _static("index.html")
        self._login = _static("login.html")
        # A sub-application: the gateway's error middleware still renders every error.
        self.app = web.Application()
        self.app.on_response_prepare.append(self._secured)
        self.app.add_routes(
            [
                web.get("/", self.index),
                web.get("/login", self.login_form),
                web.post("/login", self.login),
                web.post("/logout", self.logout),
                web.get("/static/{name}", self.static),
                web.get("/api/session", self.session),
                web.get("/api/resources", self.resources),
                web.get("/api/history", self.history),
                web.get("/events", self.events),
            ]
        )

    @staticmethod
    async def _secured(request: web.Request, response: web.StreamResponse) -> None:
        """Security headers on every answer under /ui, the gateway's JSON errors included."""
        response.headers.update(SECURITY_HEADERS)
        response.headers.setdefault("Cache-Control", "no-store")
        if response.status == 401:
            response.headers.setdefault("WWW-Authenticate", 'Bearer realm="resource-broker"')

    # Authentication -------------------------------------------------------------------------------

    def _principal(self, request: web.Request) -> auth.Principal:
        """The caller: from the Authorization header, else from the login cookie."""
        header = request.headers.get("Authorization")
        if header is None and not self._auth.insecure:
            token = _cookie_token(request.cookies.get(COOKIE, ""))
            if token:
                header = f"Bearer {token}"
        return self._auth.authenticate(header)

    def _same_origin(self, request: web.Request) -> None:
        """Refuse a form posted from another site's page (the browser names it in ``Origin``)."""
        origin = request.headers.get("Origin")
        if origin is not None and origin != f"{request.scheme}://{request.host}":
            raise errors.PermissionDenied("this form may only be posted from the broker's own page")

    async def index(self, request: web.Request) -> web.StreamResponse:
        """The page; someone without credentials is sent to the login form."""
        try:
            self._principal(request)
        except errors.Unauthenticated:
            raise web.HTTPSeeOther("/ui/login") from None
        return web.Response(body=self._index, content_type="text/html", charset="utf-8")

    async def login_form(self, request: web.Request) -> web.StreamResponse:
        """The login form (nothing to log into in insecure mode)."""
        if self._auth.insecure:
            raise web.HTTPSeeOther("/ui/")
        return web.Response(body=self._login, content_type="text/html", charset="utf-8")

    async def login(self, request: web.Request) -> web.StreamResponse:
        """Check the posted token; if it is valid, keep it in the cookie and go to the page."""
        self._same_origin(request)
        if self._auth.insecure:
            raise web.HTTPSeeOther("/ui/")
        form = await request.post()
        token = form.get("token")
        token = token.strip() if isinstance(token, str) else ""
        try:
            self._auth.authenticate(f"Bearer {token}" if token else None)
        except errors.Unauthenticated:
            body = self._login.replace(_LOGIN_ERROR_MARK.encode(), b'id="login-error"')
            return web.Response(body=body, status=401, content_type="text/html", charset="utf-8")
        response = web.HTTPSeeOther("/ui/")
        response.set_cookie(
            COOKIE,
            base64.urlsafe_b64encode(token.encode()).decode(),
            max_age=COOKIE_MAX_AGE,
            path=COOKIE_PATH,
            httponly=True,
            samesite="Strict",
            secure=request.secure,
        )
        raise response

    async def logout(self, request: web.Request) -> web.StreamResponse:
        """Forget the cookie."""
        self._same_origin(request)
        response = web.HTTPSeeOther("/ui/login")
        response.del_cookie(COOKIE, path=COOKIE_PATH)
        raise response

    async def static(self, request: web.Request) -> web.StreamResponse:
        """The page's CSS and JavaScript."""
        name = request.match_info["name"]
        if name not in self._files:
            raise errors.NotFound(f"no such file: {name}", reason="NOT_FOUND")
        return web.Response(
            body=self._files[name],
            content_type=STATIC_TYPES[name],
            charset="utf-8",
            headers={"Cache-Control": "no-cache"},
        )

    # Data for the page ----------------------------------------------------------------------------

    async def session(self, request: web.Request) -> web.StreamResponse:
        """Who is signed in, and which namespaces they may look at (``*``: any)."""
        principal = self._principal(request)
        return web.json_response(
            {
                "principal": principal.name,
                "namespaces": sorted(principal.namespaces),
                "insecure": self._auth.insecure,
            }
        )

    async def resources(self, request: web.Request) -> web.StreamResponse:
        """A namespace's resources (or one), in the /v1 JSON, with desired cost and pending remediations."""
        principal = self._principal(request)
        namespace = request.query.get("namespace", "")
        page = await self._service.get_resource_state(
            principal,
            service.ResourceStateInput(
                namespace=namespace,
                deployment_id=request.query.get("deploymentId", ""),
                page_size=validation.MAX_PAGE_SIZE,
            ),
        )
        body = seed_json.render(convert.resource_page_to_proto(namespace, page))
        waiting: dict[str, list[approval.Remediation]] = collections.defaultdict(list)
        for remediation in await self._service.list_remediations(
            principal, service.RemediationsInput(namespace=namespace)
        ):
            waiting[remediation.deployment_id].append(remediation)
        for rendered, view in zip(body["resources"], page.items, strict=True):
            desired = costs.desired_cost(view.deployment, self._catalog)
            if desired is not None:
                rendered["desiredMonthlyCost"] = desired
            rendered["pendingRemediations"] = pending_remediations(waiting[view.deployment.deployment_id])
        return web.json_response(body)

    async def history(self, request: web.Request) -> web.StreamResponse:
        """The newest ``HISTORY_LIMIT`` events of one deployment, oldest first."""
        principal = self._principal(request)
        deployment_id = request.query.get("deploymentId", "")
        if not deployment_id:
            raise errors.InvalidArgument([errors.FieldViolation("deployment_id", "is required")])
        newest: collections.deque[model.DriftEvent] = collections.deque(maxlen=HISTORY_LIMIT)
        count, token = 0, ""
        while True:
            page = await self._service.list_drift_events(
                principal,
                service.EventsInput(
                    namespace=request.query.get("namespace", ""),
                    deployment_id=deployment_id,
                    page_size=validation.MAX_PAGE_SIZE,
                    page_token=token,
                ),
            )
            newest.extend(page.items)
            count += len(page.items)
            token = page.next_token
            if not token:
                break
        events = seed_json.render(
            convert.events_page_to_proto(model.Page(items=tuple(newest), total=count, next_token=""))
        )["events"]
        return web.json_response({"events": events, "total": count})

    # The live stream -------------------------------------------------------------------------------

    async def events(self, request: web.Request) -> web.StreamResponse:
        """The namespace's event log as server-sent events, live, or resumed after a sequence.

        Each drift event is an ``event: drift`` frame whose ``id:`` is its sequence; heartbeats
        (``event: heartbeat``) carry the sequence the stream has handed on up to, so a browser's
        EventSource, which reconnects by itself with ``Last-Event-ID``, resumes exactly where it
        was, as WatchDrift does with ``after_sequence``. ``Last-Event-ID`` wins over ``?after=``.
        An error once streaming is an ``event: broker-error`` frame with the gateway's error body,
        then the stream ends: ``OUT_OF_RANGE`` means the page must re-read the state and start
        afresh; after ``UNAVAILABLE`` or ``RESOURCE_EXHAUSTED`` the browser simply reconnects.
        Credentials, the namespace grant and the arguments are checked before anything is sent,
        so those refusals are plain HTTP errors.
        """
        principal = self._principal(request)
        namespace = request.query.get("namespace", "")
        violations: list[errors.FieldViolation] = []
        validation.check_namespace(namespace, violations)
        after = _sequence(request, violations)
        validation.raise_if(violations)
        principal.require(namespace)
        watch = self._service.watch(
            principal, service.WatchInput(namespaces=(namespace,), after_sequence=after)
        )
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-store",
                "X-Accel-Buffering": "no",  # a proxy in front must not hold frames back
            }
        )
        lag = self._service.watch_limits.max_lag_seconds
        try:
            await response.prepare(request)
            await response.write(b"retry: 2000\n\n")
            async for item in watch:
                if isinstance(item, model.DriftEvent):
                    frame = _frame("drift", item.sequence, seed_json.render(convert.event_to_proto(item)))
                elif isinstance(item, service.Heartbeat):
                    frame = _frame("heartbeat", item.sequence, {"sequence": str(item.sequence)})
                else:
                    continue  # no snapshot is asked for: the page reads the state itself
                # A browser that takes nothing for this long is cut off; it reconnects and resumes.
                async with asyncio.timeout(lag):
                    await response.write(frame)
        except ConnectionError:
            pass  # the browser went away; it resumes by Last-Event-ID when it comes back
        except TimeoutError:
            # The browser stopped reading: drop the connection rather than wait on a full buffer.
            # Its EventSource reconnects and resumes by Last-Event-ID.
            if request.transport is not None:
                request.transport.abort()
        except Exception as e:  # the headers are sent: the error goes in a frame, as the table maps it
            _, body = status.http_body(status.public_error(e))
            with contextlib.suppress(ConnectionError, RuntimeError):  # the browser may be gone already
                await response.write(_frame("broker-error", None, body["error"]))
        finally:
            await watch.aclose()
        return response


def _sequence(request: web.Request, violations: list[errors.FieldViolation]) -> int | None:
    """The resume position: the browser's Last-Event-ID, else ``?after=``; None for live only."""
    for field, raw in (
        ("Last-Event-ID", request.headers.get("Last-Event-ID")),
        ("after", request.query.get("after")),
    ):
        if raw is None or raw == "":
            continue
        if not raw.isascii() or not raw.isdigit() or len(raw) > 19:
            violations.append(errors.FieldViolation(field, "must be an event sequence (a whole number >= 0)"))
            return None
        return int(raw)
    return None


def _frame(event: str, sequence: int | None, data: dict[str, Any]) -> bytes:
    """One server-sent event; JSON has no raw newlines, so ``data`` is one line."""
    lines = [f"event: {event}"]
    if sequence is not None:
        lines.append(f"id: {sequence}")
    lines.append("data: " + json.dumps(data, separators=(",", ":")))
    return ("\n".join(lines) + "\n\n").encode()


def _cookie_token(value: str) -> str:
    """The token the login cookie holds (base64url, so any token survives cookie quoting)."""
    if not value:
        return ""
    try:
        return base64.urlsafe_b64decode(value.encode()).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return ""

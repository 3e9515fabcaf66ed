"""The operator's web view (/ui): in a real headless Chromium, behind the gateway's authentication,
live from the event log.

The browser is Debian's chromium (``/usr/bin/chromium``, which ``./dev.sh test`` installs), driven
by Playwright; Playwright never downloads a browser here. Screenshots of each page go to the
test's ``tmp_path`` and are copied to ``tests/artifacts/`` (ignored by git), and their paths are
printed.
"""

from __future__ import annotations

import asyncio
import base64
import json
import pathlib
import re
import shutil
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from conftest import OTHER_TOKEN, PLATFORM_TOKEN, RunningBroker, broker_running, until
from playwright.async_api import async_playwright
from test_watch_support import Kubectl, filler_event

from broker.api import ui

NS = "team-platform"
HEADERS = {"Authorization": f"Bearer {PLATFORM_TOKEN}"}
CHROMIUM = pathlib.Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
HAVE_CHROMIUM = CHROMIUM.exists()
ARTIFACTS = pathlib.Path(__file__).parent / "artifacts"
HOSTILE = "<img src=x onerror=alert(1)>"


# Helpers -----------------------------------------------------------------------------------------


async def login_cookie(http: aiohttp.ClientSession, token: str) -> str:
    """Sign in through the form and return the cookie header value the browser would send."""
    async with http.post("/ui/login", data={"token": token}, allow_redirects=False) as r:
        assert r.status == 303, await r.text()
        assert r.headers["Location"] == "/ui/"
        morsel = r.cookies[ui.COOKIE]
    return f"{ui.COOKIE}={morsel.value}"


async def sse_frames(response: aiohttp.ClientResponse) -> AsyncIterator[dict[str, str]]:
    """The events of a server-sent event stream, one dict of fields each, as EventSource dispatches
    them: a block without ``data`` (such as ``retry:``) dispatches nothing."""
    fields: dict[str, str] = {}
    async for raw in response.content:
        line = raw.decode().rstrip("\r\n")
        if not line:
            if "data" in fields:
                yield fields
            fields = {}
            continue
        name, _, value = line.partition(":")
        fields[name] = value.removeprefix(" ")


async def frames_until(
    response: aiohttp.ClientResponse, done: Any, *, within: float = 5.0
) -> list[dict[str, str]]:
    """Read frames until ``done(frames)`` holds; fails the test after ``within`` seconds."""
    seen: list[dict[str, str]] = []
    try:
        async with asyncio.timeout(within):
            async for frame in sse_frames(response):
                seen.append(frame)
                if done(seen):
                    return seen
    except TimeoutError:
        pass
    pytest.fail(f"the stream did not deliver what was expected within {within:g}s; got {seen}")


def drift_ids(frames: list[dict[str, str]]) -> list[int]:
    return [int(f["id"]) for f in frames if f.get("event") == "drift"]


async def provision(http: aiohttp.ClientSession, name: str, *, replicas: int = 1) -> str:
    body = {
        "namespace": NS,
        "resourceType": "database",
        "resourceName": name,
        "spec": {"engine": "postgresql", "version": "15", "size": "medium", "replicas": replicas},
    }
    async with http.post("/v1/provision", json=body, headers=HEADERS) as r:
        assert r.status == 202, await r.text()
        return str((await r.json())["deploymentId"])


@pytest.fixture
async def http(running_broker: RunningBroker) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(base_url=running_broker.http_url) as session:
        yield session


# Authentication --------------------------------------------------------------------------------------


async def test_without_credentials_the_page_redirects_to_the_login_and_the_data_is_401(http):
    async with http.get("/ui/", allow_redirects=False) as r:
        assert r.status == 303
        assert r.headers["Location"] == "/ui/login"
    async with http.get("/ui", allow_redirects=False) as r:
        assert r.status == 308
        assert r.headers["Location"] == "/ui/"
    for path in ("/ui/api/resources", "/ui/api/history", "/ui/events"):
        async with http.get(path, params={"namespace": NS, "deploymentId": "deploy-1"}) as r:
            assert r.status == 401, path
            assert r.headers["WWW-Authenticate"].startswith("Bearer")
            assert (await r.json())["error"]["status"] == "UNAUTHENTICATED"
    # A made-up cookie is no credential either.
    bogus = base64.urlsafe_b64encode(b"not-a-token-0123456789").decode()
    async with http.get("/ui/api/session", headers={"Cookie": f"{ui.COOKIE}={bogus}"}) as r:
        assert r.status == 401
    # The page's code and style carry no data and load for the login form.
    async with http.get("/ui/login") as r:
        assert r.status == 200
        assert r.content_type == "text/html"
        assert "Content-Security-Policy" in r.headers
    async with http.get("/ui/static/app.js") as r:
        assert r.status == 200
        assert r.content_type == "text/javascript"
    async with http.get("/ui/static/../ui.py") as r:
        assert r.status == 404


async def test_the_login_form_sets_a_strict_http_only_cookie_scoped_to_ui(http):
    async with http.post("/ui/login", data={"token": "wrong-token-0123456789"}, allow_redirects=False) as r:
        assert r.status == 401
        assert "That token is not valid." in await r.text()
        assert 'id="login-error" hidden' not in await r.text()
        assert ui.COOKIE not in r.cookies
    # A form posted from another site's page is refused, even with a valid token.
    async with http.post(
        "/ui/login",
        data={"token": PLATFORM_TOKEN},
        headers={"Origin": "https://evil.example"},
        allow_redirects=False,
    ) as r:
        assert r.status == 403
        assert ui.COOKIE not in r.cookies

    async with http.post("/ui/login", data={"token": PLATFORM_TOKEN}, allow_redirects=False) as r:
        assert r.status == 303
        set_cookie = r.headers["Set-Cookie"]
        morsel = r.cookies[ui.COOKIE]
    attributes = {part.strip().split("=")[0].lower() for part in set_cookie.split(";")[1:]}
    assert {"httponly", "samesite", "path", "max-age"} <= attributes
    assert morsel["samesite"] == "Strict"
    assert morsel["path"] == "/ui"
    assert PLATFORM_TOKEN not in set_cookie  # base64url: any token survives cookie quoting
    cookie = {"Cookie": f"{ui.COOKIE}={morsel.value}"}

    async with http.get("/ui/", headers=cookie, allow_redirects=False) as r:
        assert r.status == 200
        assert r.content_type == "text/html"
    async with http.get("/ui/api/session", headers=cookie) as r:
        assert r.status == 200
        assert await r.json() == {"principal": "platform", "namespaces": [NS], "insecure": False}
    async with http.get("/ui/api/resources", params={"namespace": NS}, headers=cookie) as r:
        assert r.status == 200
        assert (await r.json())["namespace"] == NS
    # The principal's grants hold: another namespace is 403, on the data and on the stream.
    async with http.get("/ui/api/resources", params={"namespace": "team-other"}, headers=cookie) as r:
        assert r.status == 403
    async with http.get("/ui/events", params={"namespace": "team-other"}, headers=cookie) as r:
        assert r.status == 403
    # The cookie is for /ui only: the /v1 paths, which can change things, do not take it.
    async with http.get("/v1/resources", params={"namespace": NS}, headers=cookie) as r:
        assert r.status == 401
    # A bearer header works on /ui as on /v1 (curl, or a proxy that injects credentials).
    async with http.get("/ui/api/resources", params={"namespace": NS}, headers=HEADERS) as r:
        assert r.status == 200

    async with http.post("/ui/logout", headers=cookie, allow_redirects=False) as r:
        assert r.status == 303
        assert r.headers["Location"] == "/ui/login"
        assert r.cookies[ui.COOKIE].value == ""
        assert r.cookies[ui.COOKIE]["max-age"] == "0"


async def test_every_ui_answer_carries_a_strict_content_security_policy(http):
    cookie = {"Cookie": await login_cookie(http, PLATFORM_TOKEN)}
    for path in ("/ui/", "/ui/login", "/ui/static/app.js", "/ui/api/session", "/ui/api/nothing-here"):
        async with http.get(path, headers=cookie, allow_redirects=False) as r:
            policy = r.headers.get("Content-Security-Policy", "")
            directives = dict(d.strip().split(" ", 1) for d in policy.split(";"))
            assert directives["default-src"] == "'none'", path
            assert directives["script-src"] == "'self'", path
            assert "unsafe-inline" not in policy, path
            assert "unsafe-eval" not in policy, path
            assert directives["frame-ancestors"] == "'none'", path
            assert r.headers["X-Content-Type-Options"] == "nosniff", path


def test_the_pages_have_no_inline_code_the_policy_would_block():
    for name in ("index.html", "login.html"):
        page = (pathlib.Path(ui.__file__).parent / "ui_static" / name).read_text()
        assert "<script>" not in page
        assert "<style" not in page
        assert "style=" not in page
        assert not re.search(r"\son[a-z]+=", page)  # no inline event handlers either


async def test_insecure_mode_serves_the_view_without_credentials(tmp_path: pathlib.Path, browser: Any):
    async with (
        broker_running(tmp_path / "data", None, insecure=True) as running,
        aiohttp.ClientSession(base_url=running.http_url) as http,
    ):
        async with http.get("/ui/", allow_redirects=False) as r:
            assert r.status == 200
        async with http.get("/ui/login", allow_redirects=False) as r:
            assert r.status == 303
            assert r.headers["Location"] == "/ui/"
        async with http.get("/ui/api/session") as r:
            assert (await r.json())["insecure"] is True

        # Every namespace is open: the page asks which one, and says that nobody signed in.
        page = await browser.new_page()
        problems: list[str] = []
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        await page.goto(f"{running.http_url}/ui/")
        await page.fill("#namespace-input", "team-other")
        await page.press("#namespace-input", "Enter")
        await page.wait_for_selector("#resources td:text-is('No resources in this namespace.')", timeout=5000)
        assert page.url.endswith("/ui/#/ns/team-other")
        assert await page.text_content("#who") == "insecure mode: authentication is off"
        assert await page.is_hidden("#logout")
        assert problems == []


# The event stream --------------------------------------------------------------------------------


async def test_the_event_stream_resumes_after_a_sequence_like_watch_drift(running_broker, http):
    deployment = await provision(http, "stream-db")
    store = running_broker.broker.store
    await store.append_events([filler_event(deployment, i, name="stream-db", size=10) for i in range(3)])
    # An event of another namespace, which this principal may not see, among them.
    await store.append_events(
        [filler_event(deployment, 9, name="elsewhere", namespace="team-other", size=10)]
    )
    await store.append_events([filler_event(deployment, 3, name="stream-db", size=10)])
    cookie = {"Cookie": await login_cookie(http, PLATFORM_TOKEN)}

    async with http.get("/ui/events", params={"namespace": NS, "after": "0"}, headers=cookie) as r:
        assert r.status == 200
        assert r.content_type == "text/event-stream"
        frames = await frames_until(r, lambda seen: len(drift_ids(seen)) >= 4)
    everything = drift_ids(frames)
    assert everything == sorted(everything)
    assert len(set(everything)) == len(everything)
    names = [json.loads(f["data"])["resourceName"] for f in frames if f.get("event") == "drift"]
    assert "elsewhere" not in names
    assert json.loads(frames[-1]["data"])["sequence"] == str(everything[-1])

    # The browser's reconnection: Last-Event-ID wins over ?after=, and nothing is sent twice.
    resume = everything[-3]
    async with http.get(
        "/ui/events",
        params={"namespace": NS, "after": "0"},
        headers={**cookie, "Last-Event-ID": str(resume)},
    ) as r:
        assert r.status == 200
        replayed = await frames_until(r, lambda seen: len(drift_ids(seen)) >= 2)
        assert drift_ids(replayed) == everything[-2:]
        # ...and then live: an event appended now arrives with the next id.
        await store.append_events([filler_event(deployment, 4, name="stream-db", size=10)])
        live = await frames_until(r, lambda seen: len(drift_ids(seen)) >= 1)
        assert drift_ids(live)[0] > everything[-1]
        assert json.loads(live[-1]["data"])["message"].startswith("filler 4 ")

    # Live only (no position): a heartbeat says where the stream starts, as its id.
    async with http.get("/ui/events", params={"namespace": NS}, headers=cookie) as r:
        first = await frames_until(r, lambda seen: True)
        assert first[0]["event"] == "heartbeat"
        assert int(first[0]["id"]) == drift_ids(live)[0]


async def test_a_resume_point_outside_the_log_is_an_explicit_error_frame(running_broker, http):
    cookie = {"Cookie": await login_cookie(http, PLATFORM_TOKEN)}
    async with http.get("/ui/events", params={"namespace": NS, "after": "999999"}, headers=cookie) as r:
        assert r.status == 200
        frames = await frames_until(r, lambda seen: any(f.get("event") == "broker-error" for f in seen))
    error = json.loads(frames[-1]["data"])
    assert error["status"] == "OUT_OF_RANGE"
    assert error["reason"] == "SEQUENCE_EXPIRED"
    # A malformed position or namespace is refused before anything streams.
    for params, headers in (
        ({"namespace": NS, "after": "-1"}, {}),
        ({"namespace": NS}, {"Last-Event-ID": "abc"}),
        ({"namespace": "Not_A_Namespace"}, {}),
    ):
        async with http.get("/ui/events", params=params, headers={**cookie, **headers}) as r:
            assert r.status == 400, params
            assert (await r.json())["error"]["status"] == "INVALID_ARGUMENT"
    other = {"Cookie": await login_cookie(http, OTHER_TOKEN)}
    async with http.get("/ui/events", params={"namespace": NS}, headers=other) as r:
        assert r.status == 403


# In the browser ----------------------------------------------------------------------------------


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    """Debian's headless chromium under Playwright, for one test."""
    if not HAVE_CHROMIUM:
        pytest.fail(f"{CHROMIUM} is missing: ./dev.sh test installs it (apt-get install -y chromium)")
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield launched
        finally:
            await launched.close()


def keep(screenshot: pathlib.Path) -> pathlib.Path:
    """Copy a screenshot to tests/artifacts/ and say where both copies are."""
    ARTIFACTS.mkdir(exist_ok=True)
    kept = ARTIFACTS / screenshot.name
    shutil.copyfile(screenshot, kept)
    print(f"screenshot: {screenshot} (kept as {kept})")
    return kept


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not on PATH")
async def test_a_kubectl_scale_appears_on_the_open_page_within_two_seconds(
    cluster_broker: RunningBroker,
    browser: Any,
    sandbox_kubeconfig: pathlib.Path,
    tmp_path: pathlib.Path,
):
    kubectl = Kubectl(sandbox_kubeconfig, tmp_path / "kube-cache")
    async with aiohttp.ClientSession(base_url=cluster_broker.http_url) as http:
        deployment = await provision(http, "orders-db")

        async def state() -> dict[str, Any]:
            async with http.get("/v1/resources", params={"namespace": NS}, headers=HEADERS) as r:
                return dict(await r.json())

        await until(
            state,
            lambda s: any(r["phase"] == "Ready" for r in s["resources"]),
            within=15,
            what="orders-db to be Ready",
        )

    page = await browser.new_page(viewport={"width": 1280, "height": 900})
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.on("dialog", lambda d: problems.append(f"a dialog opened: {d.message}"))
    try:
        await drive(page, cluster_broker, kubectl, deployment, tmp_path)
    except BaseException:
        failed = tmp_path / "ui-failure.png"
        await page.screenshot(path=str(failed), full_page=True)
        keep(failed)
        print("page problems:", problems)
        raise
    assert problems == []  # no script error, no CSP violation, no dialog


async def drive(
    page: Any, cluster_broker: RunningBroker, kubectl: Kubectl, deployment: str, tmp_path: pathlib.Path
) -> None:
    """What an operator does on the open page, checked step by step."""

    # Signing in: the page sends a browser without the cookie to the form.
    await page.goto(f"{cluster_broker.http_url}/ui/")
    assert page.url.endswith("/ui/login")
    await page.fill("#token", PLATFORM_TOKEN)
    await page.click("button[type=submit]")
    # One namespace granted: the page opens it. 15 against 15.2 is expected drift (the seed's case).
    row = 'tr[data-name="orders-db"]'
    await page.wait_for_selector(f'{row}[data-phase="Ready"][data-drift="expected"]', timeout=10_000)
    await page.wait_for_selector('#live[data-state="live"]', timeout=10_000)
    assert await page.text_content("#who") == "signed in as platform"
    desired_cost, actual_cost = [
        await c.text_content() for c in await page.query_selector_all(f"{row} td.num")
    ]
    assert desired_cost == actual_cost == "45.50"  # the seed's figure, desired as it runs

    await kubectl.scale("orders-db", 3)
    # The functional deadline of the issue: the change shows on the open page within 2 seconds.
    await page.wait_for_selector(f'{row}[data-drift="unexpected"]', timeout=2000)
    drift_cell = await page.text_content(f"{row} td.drift")
    assert "Replica count mismatch: desired=1, actual=3" in (drift_cell or "")
    await page.wait_for_selector('#feed li:has(.badge:text-is("DriftDetected"))', timeout=2000)
    namespace_shot = tmp_path / "ui-namespace.png"
    await page.screenshot(path=str(namespace_shot), full_page=True)

    # The resource page: the field-level diff, who changed it, when it was first seen, the history.
    await page.click(f"{row} a")
    replicas = '#diff tr[data-field="replicas"][data-drift="unexpected"]'
    await page.wait_for_selector(replicas, timeout=5000)
    assert await page.text_content(f"{replicas} td.changed-by") == "kubectl"
    assert (await page.text_content(f"{replicas} td.detect-time") or "—") != "—"
    cells = [await c.text_content() for c in await page.query_selector_all(f"{replicas} td")]
    assert cells[1:3] == ["1", "3"]
    await page.wait_for_selector('#timeline li[data-kind="DriftDetected"]', timeout=5000)
    # Under the default policy nothing waits for approval, and the page says so.
    assert await page.get_attribute("#pending", "data-supported") == "true"
    assert deployment in (await page.text_content(".facts") or "")

    # Anything a cluster actor writes is shown as text: a hostile field manager stays a string.
    await kubectl.run(
        "patch", "statefulset", "orders-db", f"--field-manager={HOSTILE}", "--type=merge",
        "-p", '{"spec": {"replicas": 2}}',
    )  # fmt: skip
    await page.wait_for_selector(f'{replicas} td.changed-by:text-is("{HOSTILE}")', timeout=5000)
    assert await page.query_selector("main img") is None
    resource_shot = tmp_path / "ui-resource.png"
    await page.screenshot(path=str(resource_shot), full_page=True)

    # The cost view: desired against actual, drawn as SVG; two replicas cost more than one.
    await page.click("nav a:text-is('Cost')")
    bars = '#cost-chart g[data-name="orders-db"]'
    await page.wait_for_selector(bars, timeout=5000)
    desired = float(await page.get_attribute(f"{bars} rect.desired", "data-value") or "nan")
    actual = float(await page.get_attribute(f"{bars} rect.actual", "data-value") or "nan")
    assert desired == 45.5
    assert actual > desired
    cost_shot = tmp_path / "ui-cost.png"
    await page.screenshot(path=str(cost_shot), full_page=True)

    for shot in (namespace_shot, resource_shot, cost_shot):
        assert shot.stat().st_size > 10_000  # a picture of a page, not a blank
        keep(shot)

// The operator's web view of the resource broker: plain JavaScript, no build step, no libraries.
//
// Data only ever reaches the page through textContent, text nodes and attribute values set with
// setAttribute (never innerHTML or markup strings), and links are built from encodeURIComponent,
// so nothing a resource name or a message contains can become markup or script. The page reads
// JSON from /ui/api/* and follows the namespace's event log on /ui/events (server-sent events):
// every drift event re-reads the state, and the browser's EventSource resumes after the last
// sequence it saw (Last-Event-ID) whenever the connection drops.
"use strict";

(() => {
  const SVG_NS = "http://www.w3.org/2000/svg";
  const FEED_LIMIT = 50;
  const SPEC_FIELDS = [
    ["engine", (s) => s.engine],
    ["version", (s) => s.version],
    ["size", (s) => s.size],
    ["replicas", (s) => s.replicas],
    ["partitions", (s) => (s.topic ? s.topic.partitions : undefined)],
    ["retention_ms", (s) => (s.topic ? s.topic.retentionMs : undefined)],
  ];

  const state = {
    session: null,
    route: { view: "home" },
    resources: null, // the last /ui/api/resources answer for the route's namespace
    history: null, // the last /ui/api/history answer for the route's deployment
    error: null,
    feed: [],
    stream: null,
    streamNamespace: null,
    lastSequence: null,
    refreshTimer: null,
    refreshing: false,
    refreshAgain: false,
  };

  // DOM helpers ---------------------------------------------------------------------------------

  function setAttributes(el, attrs) {
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (typeof value === "function") el.addEventListener(key.replace(/^on/, ""), value);
      else el.setAttribute(key, String(value));
    }
  }

  function appendChildren(el, children) {
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined || child === false) continue;
      el.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
  }

  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    setAttributes(el, attrs);
    appendChildren(el, children);
    return el;
  }

  function svg(tag, attrs, ...children) {
    const el = document.createElementNS(SVG_NS, tag);
    setAttributes(el, attrs);
    appendChildren(el, children);
    return el;
  }

  function replace(el, ...children) {
    el.replaceChildren();
    appendChildren(el, children);
  }

  // Formatting ------------------------------------------------------------------------------------

  function when(iso) {
    if (!iso) return "—";
    const d = new Date(iso);
    if (Number.isNaN(d.getTime())) return String(iso);
    return d.toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z");
  }

  function money(value) {
    return typeof value === "number" ? value.toFixed(2) : "—";
  }

  function shown(value) {
    return value === undefined || value === null || value === "" ? "—" : String(value);
  }

  const PHASE_TONE = { Ready: "ok", DriftDetected: "warn", Failed: "bad", Provisioning: "info", Pending: "info" };
  const HEALTH_TONE = { Healthy: "ok", Degraded: "warn", Unhealthy: "bad" };
  const KIND_TONE = {
    DriftDetected: "warn", DriftChanged: "warn", ResourceMissing: "bad", RemediationFailed: "bad",
    ProvisioningFailed: "bad", DriftResolved: "ok", RemediationSucceeded: "ok",
    ProvisioningSucceeded: "ok", RemediationStarted: "info", ExpectedDrift: "info", CostAlert: "warn",
  };

  function badge(text, tone) {
    return h("span", { class: `badge ${tone || ""}` }, shown(text));
  }

  // What a resource's drift amounts to: "unexpected" when anything needs attention.
  function driftOf(resource) {
    const items = resource.driftItems || [];
    if (items.some((i) => i.driftClass === "Unexpected")) return "unexpected";
    if (items.length) return "expected";
    return "none";
  }

  // Routes: #/ (namespaces), #/ns/NS, #/ns/NS/cost, #/ns/NS/r/DEPLOYMENT ----------------------------

  function parseRoute() {
    const parts = location.hash.replace(/^#\/?/, "").split("/").filter(Boolean).map(decodeURIComponent);
    if (parts[0] !== "ns" || !parts[1]) return { view: "home" };
    const namespace = parts[1];
    if (parts[2] === "cost") return { view: "cost", namespace };
    if (parts[2] === "r" && parts[3]) return { view: "resource", namespace, deploymentId: parts[3] };
    return { view: "namespace", namespace };
  }

  function link(route) {
    if (route.view === "home") return "#/";
    const ns = `#/ns/${encodeURIComponent(route.namespace)}`;
    if (route.view === "cost") return `${ns}/cost`;
    if (route.view === "resource") return `${ns}/r/${encodeURIComponent(route.deploymentId)}`;
    return ns;
  }

  // The broker's JSON ---------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(error) {
      super(error && error.message ? error.message : "the broker did not answer");
      this.status = error && error.status;
    }
  }

  async function api(path, params) {
    const url = new URL(path, location.origin);
    for (const [key, value] of Object.entries(params || {})) url.searchParams.set(key, value);
    const response = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } });
    if (response.status === 401) {
      location.assign("/ui/login");
      throw new ApiError({ message: "signed out" });
    }
    let body = null;
    try {
      body = await response.json();
    } catch (e) {
      throw new ApiError({ message: `HTTP ${response.status}` });
    }
    if (!response.ok) throw new ApiError(body && body.error);
    return body;
  }

  async function refresh() {
    if (state.refreshing) {
      state.refreshAgain = true;
      return;
    }
    state.refreshing = true;
    const route = state.route;
    try {
      if (route.view === "home") return;
      const params = { namespace: route.namespace };
      if (route.view === "resource") params.deploymentId = route.deploymentId;
      const [resources, history] = await Promise.all([
        api("/ui/api/resources", params),
        route.view === "resource" ? api("/ui/api/history", params) : Promise.resolve(null),
      ]);
      if (route !== state.route) return; // the operator moved on meanwhile
      state.resources = resources;
      state.history = history;
      state.error = null;
    } catch (e) {
      if (route === state.route) state.error = e.message;
    } finally {
      state.refreshing = false;
      render();
      if (state.refreshAgain) {
        state.refreshAgain = false;
        scheduleRefresh(0);
      }
    }
  }

  // Coalesces a burst of events into one re-read.
  function scheduleRefresh(delay = 50) {
    if (state.refreshTimer !== null) return;
    state.refreshTimer = setTimeout(() => {
      state.refreshTimer = null;
      refresh();
    }, delay);
  }

  // The live stream -------------------------------------------------------------------------------

  function setLive(kind, text) {
    const el = document.getElementById("live");
    el.setAttribute("data-state", kind);
    el.textContent = text || kind;
  }

  function disconnect() {
    if (state.stream) state.stream.close();
    state.stream = null;
    state.streamNamespace = null;
  }

  function connect(namespace, after) {
    disconnect();
    const url = new URL("/ui/events", location.origin);
    url.searchParams.set("namespace", namespace);
    if (after !== null && after !== undefined) url.searchParams.set("after", after);
    const stream = new EventSource(url);
    state.stream = stream;
    state.streamNamespace = namespace;
    let first = true;
    setLive("connecting");
    stream.addEventListener("heartbeat", (e) => {
      state.lastSequence = e.lastEventId || state.lastSequence;
      setLive("live");
      if (first) {
        // Subscribed: from here on every change arrives as an event, so one read now closes the
        // gap between the page's first read and the subscription.
        first = false;
        scheduleRefresh(0);
      }
    });
    stream.addEventListener("drift", (e) => {
      state.lastSequence = e.lastEventId || state.lastSequence;
      setLive("live");
      first = false;
      let event = null;
      try {
        event = JSON.parse(e.data);
      } catch (err) {
        return;
      }
      state.feed.unshift(event);
      state.feed.length = Math.min(state.feed.length, FEED_LIMIT);
      scheduleRefresh();
    });
    stream.addEventListener("broker-error", (e) => {
      let error = {};
      try {
        error = JSON.parse(e.data);
      } catch (err) {
        error = {};
      }
      if (error.status === "OUT_OF_RANGE") {
        // The log no longer holds our position: read the state again and follow from now on.
        state.lastSequence = null;
        connect(namespace, null);
        scheduleRefresh(0);
      } else if (error.status === "UNAVAILABLE" || error.status === "RESOURCE_EXHAUSTED") {
        setLive("reconnecting"); // the stream ends; EventSource reconnects with Last-Event-ID
      } else {
        disconnect();
        setLive("stopped", `stopped: ${shown(error.message)}`);
      }
    });
    stream.addEventListener("open", () => setLive("live"));
    stream.addEventListener("error", () => {
      if (stream !== state.stream) return;
      if (stream.readyState !== EventSource.CLOSED) {
        setLive("reconnecting");
        return;
      }
      // Refused outright (an HTTP error): find out whether we are still signed in, then retry.
      setLive("stopped", "disconnected; retrying");
      setTimeout(async () => {
        if (stream !== state.stream) return;
        try {
          await api("/ui/api/session");
          connect(namespace, state.lastSequence);
        } catch (err) {
          setLive("stopped", `stopped: ${err.message}`);
        }
      }, 3000);
    });
  }

  // Views -----------------------------------------------------------------------------------------

  function renderNav() {
    const nav = document.getElementById("nav");
    const route = state.route;
    if (route.view === "home") {
      replace(nav);
      return;
    }
    const current = route.view === "cost" ? "cost" : "resources";
    replace(
      nav,
      h("a", { href: link({ view: "namespace", namespace: route.namespace }), "aria-current": current === "resources" ? "page" : null }, `Resources of ${route.namespace}`),
      h("a", { href: link({ view: "cost", namespace: route.namespace }), "aria-current": current === "cost" ? "page" : null }, "Cost"),
      h("a", { href: "#/" }, "Namespaces"),
    );
  }

  function renderHome() {
    const granted = (state.session ? state.session.namespaces : []).filter((n) => n !== "*");
    const anyNamespace = state.session && state.session.namespaces.includes("*");
    const form = h(
      "form",
      { class: "inline", id: "namespace-form" },
      h("label", { for: "namespace-input" }, "Namespace"),
      h("input", { id: "namespace-input", name: "namespace", required: true, maxlength: 63, pattern: "[a-z0-9]([a-z0-9\\-]*[a-z0-9])?", placeholder: "team-platform" }),
      h("button", { type: "submit" }, "Open"),
    );
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      const value = form.elements.namespace.value.trim();
      if (value) location.hash = link({ view: "namespace", namespace: value });
    });
    return [
      h("h1", null, "Namespaces"),
      granted.length
        ? h("ul", { class: "namespaces" }, granted.map((ns) => h("li", null, h("a", { href: link({ view: "namespace", namespace: ns }) }, ns))))
        : null,
      anyNamespace ? [h("p", { class: "muted" }, "You may look at every namespace: name one."), form] : null,
      !granted.length && !anyNamespace ? h("p", { class: "muted" }, "This principal is granted no namespace.") : null,
    ];
  }

  function problem() {
    return state.error ? h("p", { class: "error", role: "alert" }, state.error) : null;
  }

  function renderNamespace() {
    const route = state.route;
    const listing = state.resources;
    const rows = (listing ? listing.resources : []).map((r) => {
      const drift = driftOf(r);
      const unexpected = (r.driftItems || []).filter((i) => i.driftClass === "Unexpected");
      return h(
        "tr",
        { "data-name": r.resourceName, "data-deployment-id": r.deploymentId, "data-phase": r.phase, "data-health": r.healthStatus, "data-drift": drift },
        h("td", null, h("a", { href: link({ view: "resource", namespace: route.namespace, deploymentId: r.deploymentId }) }, r.resourceName)),
        h("td", null, shown(r.resourceType)),
        h("td", { class: "phase" }, badge(r.phase, PHASE_TONE[r.phase])),
        h("td", { class: "health" }, badge(r.healthStatus, HEALTH_TONE[r.healthStatus])),
        h(
          "td",
          { class: "drift" },
          drift === "unexpected"
            ? [badge(`${unexpected.length} unexpected`, "warn"), " ", unexpected.map((i) => i.message).join("; ")]
            : drift === "expected"
              ? h("span", { class: "muted" }, "expected only")
              : h("span", { class: "muted" }, "none"),
        ),
        h("td", { class: "num" }, money(r.desiredMonthlyCost)),
        h("td", { class: "num" }, money(r.estimatedMonthlyCost)),
        h("td", null, when(r.lastChecked)),
      );
    });
    const feed = state.feed.filter((e) => e.namespace === route.namespace);
    return [
      h("h1", null, `Resources of ${route.namespace}`),
      problem(),
      listing === null && !state.error ? h("p", { class: "muted" }, "Loading…") : null,
      listing
        ? h(
          "table",
          { id: "resources" },
          h("thead", null, h("tr", null, ["Name", "Type", "Phase", "Health", "Drift"].map((t) => h("th", null, t)), h("th", { class: "num" }, "Desired /month"), h("th", { class: "num" }, "Actual /month"), h("th", null, "Last checked"))),
          h("tbody", null, rows.length ? rows : h("tr", null, h("td", { colspan: 8, class: "muted" }, "No resources in this namespace."))),
        )
        : null,
      listing && listing.total > listing.resources.length
        ? h("p", { class: "muted" }, `Showing ${listing.resources.length} of ${listing.total}.`)
        : null,
      h("h2", null, "Events since this page was opened"),
      feed.length
        ? h("ul", { class: "feed", id: "feed" }, feed.map((e) => h("li", { "data-sequence": e.sequence }, h("time", null, when(e.eventTime)), badge(e.kind, KIND_TONE[e.kind]), " ", h("strong", null, e.resourceName), " ", e.message)))
        : h("p", { class: "muted", id: "feed" }, "None yet: changes appear here as they happen."),
    ];
  }

  // Desired against actual, field by field, joined with the drift items that explain each difference.
  function diffRows(resource) {
    const desired = resource.desiredSpec || {};
    const actual = resource.actualSpec || null;
    const items = (resource.driftItems || []).slice();
    const rows = [];
    for (const [field, read] of SPEC_FIELDS) {
      const want = read(desired);
      const have = actual ? read(actual) : undefined;
      const matching = items.filter((i) => i.field === field);
      if (want === undefined && have === undefined && !matching.length) continue;
      if (matching.length) {
        for (const item of matching) rows.push({ field, item, desired: item.desired, actual: item.actual });
      } else {
        rows.push({ field, item: null, desired: want, actual: actual ? have : "not observed" });
      }
    }
    const known = new Set(SPEC_FIELDS.map(([f]) => f));
    for (const item of items) {
      if (!known.has(item.field)) rows.push({ field: item.field, item, desired: item.desired, actual: item.actual });
    }
    return rows.map(({ field, item, desired: want, actual: have }) => {
      const drift = item ? item.driftClass.toLowerCase() : "none";
      return h(
        "tr",
        { "data-field": field, "data-drift": drift },
        h("td", null, h("code", null, field)),
        h("td", null, shown(want)),
        h("td", null, shown(have)),
        h("td", null, item ? [badge(item.driftClass, item.driftClass === "Unexpected" ? "warn" : "info"), " ", item.message] : h("span", { class: "muted" }, String(want) === String(have) ? "in sync" : "—")),
        h("td", null, item ? shown(item.recommendedAction) : "—"),
        h("td", { class: "changed-by" }, item ? shown(item.changedBy || "unknown") : "—"),
        h("td", { class: "detect-time" }, item ? when(item.detectTime) : "—"),
        h("td", { class: "num" }, item && typeof item.monthlyCostDelta === "number" ? `${item.monthlyCostDelta >= 0 ? "+" : ""}${money(item.monthlyCostDelta)}` : "—"),
      );
    });
  }

  function renderPending(resource) {
    const pending = resource.pendingRemediations || { supported: false, items: [] };
    if (!pending.supported) {
      return h(
        "div",
        { class: "placeholder", id: "pending", "data-supported": "false" },
        "Approval mode is not available in this broker yet. When a policy asks for approval, the remediations waiting for it will be listed here.",
      );
    }
    if (!pending.items.length) return h("p", { class: "muted", id: "pending", "data-supported": "true" }, "No remediation waits for approval.");
    return h(
      "ul",
      { id: "pending", "data-supported": "true" },
      pending.items.map((p) =>
        h(
          "li",
          { "data-remediation": p.remediationId },
          shown(p.remediationId), " ", shown(p.field), ": ", shown(p.from), " → ", shown(p.to),
          p.changedBy ? ` (changed by ${p.changedBy})` : "",
          typeof p.monthlyCostDelta === "number" ? `, ${p.monthlyCostDelta >= 0 ? "+" : ""}${money(p.monthlyCostDelta)}/month` : "",
          `, expires ${p.expireTime}`,
        ),
      ),
    );
  }

  function renderTimeline() {
    const history = state.history;
    if (!history) return h("p", { class: "muted" }, "Loading…");
    if (!history.events.length) return h("p", { class: "muted", id: "timeline" }, "No events recorded for this resource.");
    const events = history.events.slice().reverse();
    return [
      history.total > history.events.length ? h("p", { class: "muted" }, `The newest ${history.events.length} of ${history.total} events.`) : null,
      h(
        "ol",
        { class: "timeline", id: "timeline" },
        events.map((e) =>
          h(
            "li",
            { class: KIND_TONE[e.kind] || "", "data-sequence": e.sequence, "data-kind": e.kind },
            h("time", { datetime: e.eventTime }, when(e.eventTime)),
            badge(e.kind, KIND_TONE[e.kind]),
            " ",
            e.message,
            (e.driftItems || []).length
              ? h("ul", null, e.driftItems.map((i) => h("li", null, `${i.field}: ${shown(i.desired)} → ${shown(i.actual)}`, i.changedBy ? ` (by ${i.changedBy})` : "")))
              : null,
          ),
        ),
      ),
    ];
  }

  function renderResource() {
    const route = state.route;
    const resource = state.resources && state.resources.resources[0];
    if (!resource) {
      return [
        h("p", null, h("a", { href: link({ view: "namespace", namespace: route.namespace }) }, `← ${route.namespace}`)),
        problem(),
        state.resources ? h("p", { class: "muted" }, "No such resource in this namespace.") : h("p", { class: "muted" }, "Loading…"),
      ];
    }
    const usage = resource.resourceUsage || {};
    return [
      h("p", null, h("a", { href: link({ view: "namespace", namespace: route.namespace }) }, `← ${route.namespace}`)),
      problem(),
      h(
        "h1",
        { id: "resource", "data-phase": resource.phase, "data-drift": driftOf(resource) },
        `${resource.resourceName} `,
        badge(resource.phase, PHASE_TONE[resource.phase]),
        " ",
        badge(resource.healthStatus, HEALTH_TONE[resource.healthStatus]),
      ),
      h("p", null, shown(resource.message)),
      h(
        "dl",
        { class: "facts card" },
        [
          ["Type", resource.resourceType],
          ["Deployment", resource.deploymentId],
          ["Endpoint", resource.endpoint ? `${resource.endpoint}:${resource.port}` : ""],
          ["Connection secret (name)", resource.connectionSecret],
          ["Generation", resource.generation],
          ["Last checked", when(resource.lastChecked)],
          ["Usage", usage.replicas !== undefined ? `cpu ${shown(usage.cpuUsage)}, memory ${shown(usage.memoryUsage)}, storage ${shown(usage.storageUsage)}, ${usage.replicas} replicas` : "not reported"],
          ["Cost /month", `desired ${money(resource.desiredMonthlyCost)}, actual ${money(resource.estimatedMonthlyCost)}`],
        ].map(([k, v]) => [h("dt", null, k), h("dd", null, shown(v))]),
      ),
      h("h2", null, "Desired against actual"),
      h(
        "table",
        { id: "diff" },
        h("thead", null, h("tr", null, ["Field", "Desired", "Actual", "Drift", "Action", "Changed by", "First seen"].map((t) => h("th", null, t)), h("th", { class: "num" }, "Cost /month"))),
        h("tbody", null, diffRows(resource)),
      ),
      h("h2", null, "Pending remediations"),
      renderPending(resource),
      h("h2", null, "Drift history"),
      renderTimeline(),
    ];
  }

  // The smallest 1, 2, 2.5 or 5 times a power of ten at or above ``value``: the chart's axis end.
  function niceCeiling(value) {
    if (!(value > 0)) return 1;
    const magnitude = 10 ** Math.floor(Math.log10(value));
    for (const step of [1, 2, 2.5, 5, 10]) if (step * magnitude >= value) return step * magnitude;
    return 10 * magnitude;
  }

  // Desired against actual monthly cost per resource: horizontal bars drawn as inline SVG.
  function costChart(resources) {
    const priced = resources.filter((r) => typeof r.desiredMonthlyCost === "number" || typeof r.estimatedMonthlyCost === "number");
    const width = 900;
    const label = 200;
    const right = 130;
    const barHeight = 12;
    const rowHeight = 2 * barHeight + 14;
    const top = 24;
    const height = top + priced.length * rowHeight + 10;
    const max = niceCeiling(Math.max(0, ...priced.map((r) => Math.max(r.desiredMonthlyCost || 0, r.estimatedMonthlyCost || 0))));
    const scale = (v) => ((width - label - right) * (v || 0)) / max;
    const chart = svg("svg", { class: "chart", id: "cost-chart", viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": "Monthly cost per resource, desired against actual" });
    for (let i = 0; i <= 4; i += 1) {
      const x = label + ((width - label - right) * i) / 4;
      chart.append(svg("line", { class: "grid", x1: x, x2: x, y1: top - 6, y2: height - 6 }));
      chart.append(svg("text", { x, y: 14, "text-anchor": "middle", class: "value" }, money((max * i) / 4)));
    }
    priced.forEach((r, index) => {
      const y = top + index * rowHeight;
      const group = svg("g", { "data-name": r.resourceName });
      group.append(svg("text", { x: label - 8, y: y + barHeight + 4, "text-anchor": "end" }, r.resourceName));
      for (const [row, kind, value] of [[0, "desired", r.desiredMonthlyCost], [1, "actual", r.estimatedMonthlyCost]]) {
        const by = y + row * barHeight;
        const w = scale(value);
        group.append(svg("rect", { class: kind, x: label, y: by, width: Math.max(w, 0.5), height: barHeight - 2, "data-value": typeof value === "number" ? value : "" }, svg("title", null, `${kind}: ${money(value)}`)));
        group.append(svg("text", { class: "value", x: label + w + 4, y: by + barHeight - 3 }, `${kind} ${money(value)}`));
      }
      chart.append(group);
    });
    return { chart, unpriced: resources.filter((r) => !priced.includes(r)) };
  }

  function renderCost() {
    const route = state.route;
    const listing = state.resources;
    if (!listing) return [h("h1", null, `Cost of ${route.namespace}`), problem(), h("p", { class: "muted" }, "Loading…")];
    const total = (key) => listing.resources.reduce((sum, r) => sum + (typeof r[key] === "number" ? r[key] : 0), 0);
    const desired = total("desiredMonthlyCost");
    const actual = total("estimatedMonthlyCost");
    const { chart, unpriced } = costChart(listing.resources);
    return [
      h("h1", null, `Cost of ${route.namespace}`),
      problem(),
      h(
        "div",
        { class: "totals", id: "cost-totals" },
        h("div", null, h("span", { class: "muted" }, "Desired /month"), h("strong", { id: "total-desired" }, money(desired))),
        h("div", null, h("span", { class: "muted" }, "Actual /month"), h("strong", { id: "total-actual" }, money(actual))),
        h("div", null, h("span", { class: "muted" }, "Difference"), h("strong", null, `${actual - desired >= 0 ? "+" : ""}${money(actual - desired)}`)),
      ),
      h("div", { class: "legend" }, h("span", null, h("span", { class: "swatch desired" }), "desired spec"), h("span", null, h("span", { class: "swatch actual" }), "what runs")),
      listing.resources.length ? chart : h("p", { class: "muted" }, "No resources in this namespace."),
      unpriced.length ? h("p", { class: "muted" }, `No cost estimate for: ${unpriced.map((r) => r.resourceName).join(", ")}.`) : null,
      h("p", { class: "muted" }, "Estimates from the broker's price table; actual storage counts every volume claim."),
    ];
  }

  function render() {
    renderNav();
    const main = document.getElementById("main");
    const view = state.route.view;
    main.setAttribute("data-view", view);
    if (view === "home") replace(main, renderHome());
    else if (view === "namespace") replace(main, renderNamespace());
    else if (view === "resource") replace(main, renderResource());
    else replace(main, renderCost());
  }

  function navigate() {
    const route = parseRoute();
    const previous = state.route;
    state.route = route;
    state.error = null;
    const sameData = previous.namespace === route.namespace && previous.view !== "resource" && route.view !== "resource";
    if (!sameData) {
      state.resources = null;
      state.history = null;
    }
    if (route.view === "home") {
      disconnect();
      setLive("idle", "not connected");
    } else if (state.streamNamespace !== route.namespace) {
      state.feed = [];
      state.lastSequence = null;
      connect(route.namespace, null);
    }
    render();
    if (route.view !== "home") scheduleRefresh(0);
  }

  async function start() {
    try {
      state.session = await api("/ui/api/session");
    } catch (e) {
      replace(document.getElementById("main"), h("p", { class: "error" }, e.message));
      return;
    }
    const who = document.getElementById("who");
    who.textContent = state.session.insecure
      ? "insecure mode: authentication is off"
      : `signed in as ${state.session.principal}`;
    document.getElementById("logout").hidden = state.session.insecure;
    const granted = state.session.namespaces.filter((n) => n !== "*");
    if (!location.hash && granted.length === 1) {
      history.replaceState(null, "", link({ view: "namespace", namespace: granted[0] }));
    }
    window.addEventListener("hashchange", navigate);
    navigate();
  }

  document.addEventListener("DOMContentLoaded", start);
})();

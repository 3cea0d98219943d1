// feedfleet status page: polls the API and redraws in place, without reloading.
//
// Everything shown comes from JSON (/health, /metrics, /api/v1/assignments,
// /api/v1/instances) and is written with textContent, text nodes and attribute setters
// only: provider names and error texts come from the database and from providers, so
// nothing here is ever parsed as HTML. Any field may be missing (an older worker, a
// component not reported yet); it is shown as "—".
"use strict";

const POLL_MS = 1500;
const FETCH_TIMEOUT_MS = 4000;
const HISTORY_POINTS = 48; // 72 s of sparkline at one sample per poll
const LAG_WARN_S = 5; // the quality check's default stale_after_s
const LAG_BAD_S = 30;
const DASH = "—";
const SVG_NS = "http://www.w3.org/2000/svg";

const state = {
  health: null,
  metrics: null,
  assignments: null,
  instances: null,
  lastOk: 0,
  error: null,
  polls: 0,
};
// provider name -> {eps: number[], p99: number[]}, kept only in this page's memory
const history = new Map();

// ------------------------------------------------------------------ fetching

async function getJson(path, acceptAnyStatus) {
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), FETCH_TIMEOUT_MS);
  try {
    const resp = await fetch(path, {
      cache: "no-store",
      headers: { Accept: "application/json" },
      signal: abort.signal,
    });
    const type = resp.headers.get("content-type") || "";
    if (!type.includes("json")) throw new Error(`${path}: HTTP ${resp.status}, not JSON`);
    const body = await resp.json();
    // /health answers 503 with its full document when the fleet is unhealthy
    if (!resp.ok && !acceptAnyStatus) {
      throw new Error(`${path}: HTTP ${resp.status} ${(body && body.error) || ""}`.trim());
    }
    return body;
  } finally {
    clearTimeout(timer);
  }
}

async function poll() {
  const [health, metrics, assignments, instances] = await Promise.allSettled([
    getJson("health", true),
    getJson("metrics", false),
    getJson("api/v1/assignments", false),
    getJson("api/v1/instances", false),
  ]);
  if (health.status === "fulfilled" && isObject(health.value)) {
    state.health = health.value;
    state.lastOk = Date.now();
    state.error = null;
  } else {
    state.error = health.status === "rejected" ? errorText(health.reason) : "bad /health document";
  }
  // The others keep their last good answer through a failed poll.
  if (metrics.status === "fulfilled" && isObject(metrics.value)) state.metrics = metrics.value;
  if (assignments.status === "fulfilled" && Array.isArray(assignments.value)) {
    state.assignments = assignments.value;
  }
  if (instances.status === "fulfilled" && Array.isArray(instances.value)) {
    state.instances = instances.value;
  }
  state.polls += 1;
  if (!state.error) recordHistory();
  try {
    render();
  } finally {
    document.body.dataset.polls = String(state.polls);
    setTimeout(poll, POLL_MS);
  }
}

function errorText(reason) {
  if (reason && reason.name === "AbortError") return "no answer within 4 s";
  return String((reason && reason.message) || reason || "unreachable");
}

// ------------------------------------------------------------------ reading the documents

function isObject(value) {
  return value !== null && typeof value === "object" && !Array.isArray(value);
}

function num(value) {
  return typeof value === "number" && Number.isFinite(value) ? value : null;
}

function first(...values) {
  for (const v of values) if (v !== undefined && v !== null) return v;
  return undefined;
}

// A component is "up" (a string, today) or {"status": "up", ...}.
function componentOf(components, key) {
  const raw = isObject(components) ? components[key] : undefined;
  if (raw === undefined || raw === null) return null;
  return isObject(raw) ? raw : { status: String(raw) };
}

function providerRows() {
  const hp = (state.health && isObject(state.health.providers) && state.health.providers) || {};
  const mp = (state.metrics && isObject(state.metrics.providers) && state.metrics.providers) || {};
  const names = [...Object.keys(hp)];
  for (const name of Object.keys(mp)) if (!(name in hp)) names.push(name);
  const held = new Map();
  for (const a of state.assignments || []) {
    if (!isObject(a) || typeof a.served_by !== "string") continue;
    if (!held.has(a.served_by)) held.set(a.served_by, new Set());
    held.get(a.served_by).add(a.symbol);
  }
  const instances = new Map();
  for (const i of state.instances || []) {
    if (!isObject(i) || !i.live) continue;
    if (!instances.has(i.provider)) instances.set(i.provider, []);
    instances.get(i.provider).push(i);
  }
  return names.map((name) => {
    const h = isObject(hp[name]) ? hp[name] : {};
    const m = isObject(mp[name]) ? mp[name] : {};
    return {
      name,
      status: first(h.status, m.status),
      health: h.health,
      reason: first(h.reason, h.last_error),
      enabled: h.enabled !== false,
      eps: num(first(h.throughput_per_sec, m.throughput_per_sec)),
      p99: num(first(h.publish_lag_p99_ms, m.latency_p99_ms)),
      age: num(first(h.last_event_age_s, m.last_event_age_s)),
      circuit: first(h.circuit_state, m.circuit_state),
      // /health's count from Redis: null means unlimited; undefined that nobody reported it
      budget: h.rate_limit_remaining,
      spool: num(first(h.spool_depth, m.spool_depth, m.spooled)),
      queue: num(first(h.queue_depth, m.queue_depth)),
      symbols: state.assignments ? (held.get(name) || new Set()).size : null,
      instances: state.instances ? instances.get(name) || [] : null,
      lastError: h.last_error,
    };
  });
}

function recordHistory() {
  for (const row of providerRows()) {
    if (!history.has(row.name)) history.set(row.name, { eps: [], p99: [] });
    const h = history.get(row.name);
    h.eps.push(row.eps === null ? 0 : row.eps);
    h.p99.push(row.p99);
    if (h.eps.length > HISTORY_POINTS) h.eps.shift();
    if (h.p99.length > HISTORY_POINTS) h.p99.shift();
  }
}

// ------------------------------------------------------------------ formatting

function fmtNumber(value, digits) {
  if (value === null || value === undefined) return DASH;
  return value.toLocaleString("en-US", { maximumFractionDigits: digits, minimumFractionDigits: 0 });
}

function fmtAge(seconds) {
  if (seconds === null || seconds === undefined) return DASH;
  if (seconds < 10) return `${seconds.toFixed(1)} s`;
  if (seconds < 120) return `${Math.round(seconds)} s`;
  if (seconds < 7200) return `${Math.floor(seconds / 60)} m ${Math.round(seconds % 60)} s`;
  return `${(seconds / 3600).toFixed(1)} h`;
}

function fmtBytes(bytes) {
  if (num(bytes) === null) return DASH;
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${value.toFixed(unit === 0 ? 0 : 1)} ${units[unit]}`;
}

function sinceIso(iso) {
  const t = Date.parse(iso);
  return Number.isNaN(t) ? null : Math.max(0, (Date.now() - t) / 1000);
}

// the tone of a state: ok (green), warn (amber), bad (red), off (grey)
const TONES = {
  healthy: "ok", up: "ok", ok: "ok", connected: "ok", closed: "ok",
  degraded: "warn", low: "warn", connecting: "warn", rate_limited: "warn", half_open: "warn",
  unhealthy: "bad", down: "bad", critical: "bad", error: "bad", disconnected: "bad", open: "bad",
  disabled: "off", unknown: "off",
};

function tone(value) {
  return TONES[String(value || "unknown").toLowerCase()] || "off";
}

// ------------------------------------------------------------------ building the DOM

// An element with a class and children; strings become text nodes, never markup.
function el(tag, className, ...children) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function cell(text, className) {
  return el("td", className, text === undefined || text === null || text === "" ? DASH : text);
}

function sparkline(values, kind, label) {
  const wrap = el("span", `spark ${kind}`);
  const svg = document.createElementNS(SVG_NS, "svg");
  svg.setAttribute("viewBox", "0 0 90 20");
  svg.setAttribute("preserveAspectRatio", "none");
  svg.setAttribute("aria-hidden", "true");
  const known = values.filter((v) => v !== null);
  if (known.length > 1) {
    const max = Math.max(...known) || 1;
    const step = 90 / (HISTORY_POINTS - 1);
    const offset = HISTORY_POINTS - values.length;
    const points = [];
    values.forEach((v, i) => {
      if (v === null) return;
      const x = (offset + i) * step;
      const y = 19 - (v / max) * 18;
      points.push(`${x.toFixed(1)},${y.toFixed(1)}`);
    });
    const line = document.createElementNS(SVG_NS, "polyline");
    line.setAttribute("points", points.join(" "));
    svg.append(line);
  }
  wrap.append(svg, el("span", "value", label));
  return wrap;
}

function renderHeader(rows) {
  const overall = document.getElementById("overall");
  const health = state.health || {};
  const status = state.error ? "API unreachable" : health.status || "unknown";
  overall.textContent = status;
  overall.className = `badge ${state.error ? "bad" : tone(health.status)}`;
  document.title = `feedfleet · ${status}`;
  const enabled = rows.filter((r) => r.enabled);
  const connected = enabled.filter((r) => r.status === "CONNECTED");
  const total = rows.reduce((sum, r) => sum + (r.eps || 0), 0);
  const failover = isObject(health.failover) ? health.failover : null;
  const parts = [
    `${connected.length}/${enabled.length} providers connected`,
    `${fmtNumber(total, 0)} events/s`,
  ];
  if (failover) parts.push(`${fmtNumber(num(failover.symbols_in_failover), 0)} symbols in failover`);
  document.getElementById("summary").textContent = parts.join(" · ");
  const age = state.lastOk ? (Date.now() - state.lastOk) / 1000 : null;
  document.getElementById("updated").textContent =
    age === null ? "" : `updated ${fmtAge(age)} ago${health.timestamp ? ` (${health.timestamp})` : ""}`;
  const banner = document.getElementById("banner");
  banner.hidden = !state.error;
  banner.textContent = state.error
    ? `The API does not answer (${state.error}); the figures below are the last ones received.`
    : "";
  document.body.classList.toggle("stale", Boolean(state.error));
}

const COMPONENTS = [
  ["database", "PostgreSQL"],
  ["redis", "Redis"],
  ["pulsar", "Pulsar"],
  ["disk", "Disk"],
];

function componentDetail(key, c) {
  if (key === "pulsar") {
    const bits = [];
    if (num(c.backlog) !== null) bits.push(`backlog ${fmtNumber(c.backlog, 0)}`);
    if (c.last_receipt) bits.push(`last receipt ${fmtAge(sinceIso(c.last_receipt))} ago`);
    return bits.join(" · ");
  }
  if (key === "disk") {
    const bits = [];
    if (num(c.free_bytes) !== null) bits.push(`${fmtBytes(c.free_bytes)} free`);
    if (num(c.free_ratio) !== null) bits.push(`${(c.free_ratio * 100).toFixed(1)}%`);
    if (c.path) bits.push(String(c.path));
    return bits.join(" · ");
  }
  return c.error ? String(c.error) : "";
}

function renderComponents() {
  const components = state.health ? state.health.components : null;
  const cards = COMPONENTS.map(([key, label]) => {
    const c = componentOf(components, key);
    const status = c && c.status !== undefined ? String(c.status) : null;
    const card = el("div", `component ${status ? tone(status) : "off"}`);
    card.dataset.component = key;
    card.append(el("span", "state", status || DASH), el("div", "name", label));
    card.append(el("div", "detail", (c && componentDetail(key, c)) || "\u00a0"));
    return card;
  });
  document.getElementById("components").replaceChildren(...cards);
}

function lagClass(age) {
  if (age === null) return "num c-age";
  if (age >= LAG_BAD_S) return "num c-age lag-bad";
  if (age >= LAG_WARN_S) return "num c-age lag-warn";
  return "num c-age";
}

function renderProviders(rows) {
  const body = rows.map((r) => {
    const tr = el("tr", r.enabled ? "" : "disabled");
    tr.dataset.provider = r.name;
    const past = history.get(r.name) || { eps: [], p99: [] };
    const healthCell = el("td", `c-health ${tone(r.health)}`, r.health || DASH);
    if (r.reason) healthCell.append(el("span", "reason", r.reason));
    let instances = DASH;
    if (r.instances) {
      const hosts = [...new Set(r.instances.map((i) => i.host))];
      instances = r.instances.length ? `${r.instances.length} · ${hosts.join(", ")}` : "none live";
    }
    const budget = r.budget === undefined ? DASH : r.budget === null ? "unlimited" : fmtNumber(num(r.budget), 0);
    tr.append(
      el("td", "c-name", r.name),
      el("td", `c-status ${tone(r.status)}`, r.status || DASH),
      healthCell,
      el("td", `c-instances${r.instances && !r.instances.length ? " bad" : ""}`, instances),
      cell(fmtNumber(r.symbols, 0), "num c-symbols"),
      el("td", "c-eps", sparkline(past.eps, "eps", fmtNumber(r.eps, 1))),
      el("td", "c-p99", sparkline(past.p99, "p99", r.p99 === null ? DASH : `${fmtNumber(r.p99, 2)} ms`)),
      cell(fmtAge(r.age), lagClass(r.age)),
      el("td", `c-circuit ${r.circuit ? tone(r.circuit) : ""}`, r.circuit ? String(r.circuit).replace("_", "-") : DASH),
      cell(budget, "num c-budget"),
      cell(fmtNumber(r.spool, 0), `num c-spool${r.spool ? " warn" : ""}`),
      cell(fmtNumber(r.queue, 0), "num c-queue"),
      cell(r.lastError, "c-error"),
    );
    return tr;
  });
  if (!body.length) {
    const tr = el("tr", "empty", el("td", "", state.health ? "no providers" : "waiting for /health"));
    tr.firstChild.colSpan = 13;
    body.push(tr);
  }
  document.querySelector("#providers tbody").replaceChildren(...body);
}

function renderAssignments() {
  const rows = state.assignments ? state.assignments.filter(isObject) : null;
  const summary = document.getElementById("assignment-summary");
  const tbody = document.querySelector("#failovers tbody");
  if (!rows) {
    summary.textContent = "assignments not read yet";
    tbody.replaceChildren();
    return;
  }
  const symbols = new Set(rows.map((a) => a.symbol));
  const moved = rows.filter((a) => a.reason !== "primary");
  const failover = state.health && isObject(state.health.failover) ? state.health.failover : null;
  const owners = failover && Array.isArray(failover.providers_failed_over) ? failover.providers_failed_over : [];
  summary.textContent =
    `${fmtNumber(rows.length, 0)} assignments over ${fmtNumber(symbols.size, 0)} symbols; ` +
    `${fmtNumber(moved.length, 0)} served by a backup or failing back` +
    (owners.length ? ` (providers failed over: ${owners.join(", ")})` : "");
  const body = moved.slice(0, 200).map((a) => {
    const tr = el("tr", "");
    tr.append(
      cell(a.symbol),
      cell(a.provider),
      cell(a.served_by),
      el("td", a.reason === "failover" ? "warn" : "info", a.reason || DASH),
      cell(a.instance_id),
      cell(fmtAge(sinceIso(a.since)), "num"),
    );
    return tr;
  });
  if (!body.length) {
    const tr = el("tr", "empty", el("td", "", "every symbol is served by its own provider"));
    tr.firstChild.colSpan = 6;
    body.push(tr);
  }
  tbody.replaceChildren(...body);
}

function renderInstances() {
  const rows = state.instances || [];
  const body = rows.filter(isObject).map((i) => {
    const tr = el("tr", i.live ? "" : "disabled");
    tr.append(
      cell(i.instance_id),
      cell(i.provider),
      cell(i.host),
      cell(i.pid, "num"),
      el("td", i.live ? tone(i.status) : "off", i.live ? i.status || DASH : "no heartbeat"),
      cell(`${fmtAge(num(i.heartbeat_age_s))} ago`, "num"),
    );
    return tr;
  });
  if (!body.length) {
    const tr = el("tr", "empty", el("td", "", state.instances ? "no instance registered" : "instances not read yet"));
    tr.firstChild.colSpan = 6;
    body.push(tr);
  }
  document.querySelector("#instances tbody").replaceChildren(...body);
}

function render() {
  const rows = providerRows();
  renderHeader(rows);
  renderComponents();
  renderProviders(rows);
  renderAssignments();
  renderInstances();
}

poll();

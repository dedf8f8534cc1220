# -*- test-case-name: tests.admin.test_api,tests.integration.test_admin -*-
"""
The dashboard: one self-contained HTML page (inline CSS and JavaScript, no
external resource), served at ``GET /`` of the admin API.

The page holds no data.  It polls ``/clusters``, ``/stats`` and
``/metrics`` every second with the admin token (asked once, kept in the
tab's ``sessionStorage``), computes rates and the p99 latency from counter
and histogram-bucket deltas between polls, draws them on hand-written SVG
charts over the last five minutes, and drains or enables backends with
``POST /clusters/NAME/backends/HOST:PORT/drain|enable``.

It lives in a Python module rather than a package data file so that it
ships wherever the code does.  The Content-Security-Policy allows exactly
this page's script and style (by hash) and requests to its own origin.
"""

from __future__ import annotations

import base64
import hashlib

__all__ = ["CONTENT_SECURITY_POLICY", "PAGE"]

_STYLE = """
:root {
  --bg: #f5f6f8; --card: #fff; --ink: #1d2330; --muted: #6b7385; --line: #e2e5eb;
  --accent: #2f6fde; --good: #1f9d55; --warn: #d98a00; --bad: #d64545; --idle: #7b8494;
}
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--ink);
  font: 14px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; }
header { display: flex; align-items: center; gap: 12px; padding: 10px 20px;
  background: #1d2330; color: #fff; }
header h1 { font-size: 18px; margin: 0; letter-spacing: .5px; }
header .muted { color: #aab1c0; }
.spacer { flex: 1; }
button { font: inherit; border: 1px solid var(--line); background: #fff; color: var(--ink);
  border-radius: 6px; padding: 3px 10px; cursor: pointer; }
button:hover { border-color: var(--accent); }
header button { background: #2c3446; color: #fff; border-color: #3b4458; }
.pill { border-radius: 10px; padding: 2px 10px; font-size: 12px; font-weight: 600;
  background: var(--idle); color: #fff; }
.pill.good { background: var(--good); } .pill.warn { background: var(--warn); }
.pill.bad { background: var(--bad); }
main { padding: 16px 20px 40px; max-width: 1400px; margin: 0 auto; }
#message { margin: 12px 20px 0; padding: 8px 12px; border-radius: 6px; background: #e8f0fe;
  white-space: pre-wrap; font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 12px; }
#message.bad { background: #fde8e8; }
#auth { margin: 12px 20px 0; padding: 12px; border-radius: 6px; background: #fff4e0;
  display: flex; gap: 10px; align-items: center; }
#auth[hidden], #message[hidden] { display: none; }
#auth input { font: inherit; padding: 3px 6px; width: 22em; }
.tiles { display: grid; grid-template-columns: repeat(4, 1fr); gap: 12px; }
.tile, figure, .cluster, .panel { background: var(--card); border: 1px solid var(--line);
  border-radius: 8px; }
.tile { padding: 10px 14px; }
.tile .label { color: var(--muted); font-size: 12px; text-transform: uppercase; letter-spacing: .4px; }
.tile .value { font-size: 24px; font-weight: 600; font-variant-numeric: tabular-nums; }
.charts { display: grid; grid-template-columns: 1fr 1fr; gap: 12px; margin-top: 12px; }
figure { margin: 0; padding: 8px 12px 4px; }
figcaption { color: var(--muted); font-size: 12px; }
svg.chart { width: 100%; height: 150px; display: block; }
svg.chart text { fill: var(--muted); font-size: 10px; }
svg.chart .grid { stroke: var(--line); }
h2 { font-size: 15px; margin: 22px 0 8px; }
table { width: 100%; border-collapse: collapse; font-variant-numeric: tabular-nums; }
th { text-align: left; color: var(--muted); font-weight: 500; font-size: 12px; }
th, td { padding: 5px 10px; border-bottom: 1px solid var(--line); }
tr:last-child td { border-bottom: 0; }
td.num, th.num { text-align: right; }
.mono { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 13px; }
.panel { padding: 2px 4px; }
.cluster { margin-bottom: 12px; padding: 4px 4px 2px; }
.cluster h3 { font-size: 14px; margin: 6px 10px; display: flex; gap: 14px; align-items: baseline; }
.cluster table { table-layout: fixed; }
.cluster th:nth-child(1) { width: 24%; } .cluster th:nth-child(2) { width: 12%; }
.cluster th:nth-child(8) { width: 10%; }
.cluster h3 .muted, .muted { color: var(--muted); font-weight: 400; }
.badge { border-radius: 4px; padding: 1px 7px; font-size: 12px; font-weight: 600; color: #fff; }
.badge.up { background: var(--good); } .badge.unhealthy { background: var(--bad); }
.badge.ejected, .badge.circuit_open { background: var(--warn); }
.badge.panic { background: var(--bad); } .badge.drained { background: var(--idle); }
@media (max-width: 900px) { .tiles, .charts { grid-template-columns: 1fr 1fr; } }
"""

_SCRIPT = r"""
"use strict";
(function () {
  const POLL_MS = 1000;      // how often to poll
  const RATE_S = 5;          // rates and p99 over the last 5 s
  const HISTORY_S = 300;     // the charts show the last 5 minutes
  const TOKEN_KEY = "balance.admin.token";
  const SVG = "http://www.w3.org/2000/svg";
  const $ = (id) => document.getElementById(id);

  let token = sessionStorage.getItem(TOKEN_KEY);
  let samples = [];          // counters at each poll
  let points = [];           // chart points {t, rps, p99}
  let config = null;
  let configAt = 0;
  let timer = null;

  class AuthError extends Error {}

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(props || {})) {
      if (k === "text") node.textContent = v;
      else if (k === "class") node.className = v;
      else if (k.startsWith("data-")) node.setAttribute(k, v);
      else node[k] = v;
    }
    for (const child of children) {
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  function svg(tag, attrs) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    return node;
  }

  async function api(path, init) {
    init = init || {};
    const headers = new Headers(init.headers || {});
    if (token) headers.set("Authorization", "Bearer " + token);
    const response = await fetch(path, Object.assign({}, init,
      { headers, cache: "no-store", credentials: "same-origin" }));
    if (response.status === 401) throw new AuthError("token needed");
    return response;
  }

  async function getJSON(path) {
    const response = await api(path);
    if (!response.ok) throw new Error(path + " answered " + response.status);
    return response.json();
  }

  // -- numbers ---------------------------------------------------------------

  function parseLabels(text) {
    const labels = {};
    const re = /(\w+)="((?:[^"\\]|\\.)*)"/g;
    let m;
    while ((m = re.exec(text)) !== null) {
      labels[m[1]] = m[2].replace(/\\n/g, "\n").replace(/\\"/g, '"').replace(/\\\\/g, "\\");
    }
    return labels;
  }

  // Cumulative duration buckets {le: count}, summed over series: "" for
  // all requests, "c:NAME" per cluster, "r:LISTENER ROUTE" per route.
  function parseMetrics(text) {
    const hist = new Map();
    for (const line of text.split("\n")) {
      if (!line.startsWith("balance_http_request_duration_seconds_bucket")) continue;
      const m = /^\w+\{(.*)\}\s+(\S+)/.exec(line);
      if (!m) continue;
      const labels = parseLabels(m[1]);
      const le = labels.le === "+Inf" ? Infinity : Number(labels.le);
      const value = Number(m[2]);
      for (const key of ["", "c:" + labels.cluster, "r:" + labels.listener + " " + labels.route]) {
        let h = hist.get(key);
        if (!h) hist.set(key, h = new Map());
        h.set(le, (h.get(le) || 0) + value);
      }
    }
    return hist;
  }

  const sum = (obj) => Object.values(obj || {}).reduce((a, b) => a + b, 0);
  const errors = (obj) => Object.entries(obj || {})
    .reduce((a, [code, n]) => a + (Number(code) >= 500 || code === "other" ? n : 0), 0);

  function sample(stats, hist) {
    const listeners = {};
    for (const [name, l] of Object.entries(stats.listeners)) {
      listeners[name] = { req: sum(l.requests), rx: l.bytes_received, tx: l.bytes_sent };
    }
    const backends = {};
    for (const [cluster, c] of Object.entries(stats.clusters)) {
      for (const [address, b] of Object.entries(c.backends)) {
        backends[cluster + " " + address] = { n: sum(b.responses), err: errors(b.responses) };
      }
    }
    return { t: performance.now() / 1000, hist, listeners, backends };
  }

  // The sample to take rates against: about RATE_S seconds older.
  function base(now) {
    let found = null;
    for (const s of samples) {
      if (s === now) break;
      if (now.t - s.t >= RATE_S || found === null) found = s;
      if (now.t - s.t < RATE_S) break;
    }
    return found;
  }

  function histDelta(now, old, key) {
    const a = now.hist.get(key);
    if (!a) return null;
    const b = (old && old.hist.get(key)) || new Map();
    const bounds = [...a.keys()].sort((x, y) => x - y);
    return bounds.map((le) => [le, Math.max(0, a.get(le) - (b.get(le) || 0))]);
  }

  // histogram_quantile over cumulative [le, count] pairs, in seconds.
  function quantile(q, buckets) {
    if (!buckets || !buckets.length) return null;
    const total = buckets[buckets.length - 1][1];
    if (total <= 0) return null;
    const rank = q * total;
    let lower = 0, below = 0;
    for (let i = 0; i < buckets.length; i++) {
      const [le, count] = buckets[i];
      if (count >= rank) {
        if (le === Infinity) return lower;
        if (count === below) return le;
        return lower + (le - lower) * (rank - below) / (count - below);
      }
      lower = le; below = count;
    }
    return lower;
  }

  function rates(now) {
    const old = base(now);
    const dt = old ? now.t - old.t : 0;
    const rate = (a, b) => (dt > 0 ? Math.max(0, a - b) / dt : null);
    const count = (key) => {
      const d = histDelta(now, old, key);
      return d && d.length ? d[d.length - 1][1] : 0;
    };
    return {
      rate,
      old,
      requests: (key) => (old ? count(key) / dt : null),
      p99: (key) => (old ? quantile(0.99, histDelta(now, old, key)) : null),
    };
  }

  const fmtAxis = (v) => (v >= 10 ? Math.round(v).toLocaleString() : String(+v.toFixed(2)));
  const fmtRate = (x) => (x == null ? "–" : x < 10 ? x.toFixed(1) : Math.round(x).toLocaleString());
  function fmtLatency(seconds) {
    if (seconds == null) return "–";
    const ms = seconds * 1000;
    if (ms >= 1000) return (ms / 1000).toFixed(2) + " s";
    return (ms < 1 ? ms.toFixed(2) : ms < 10 ? ms.toFixed(1) : Math.round(ms)) + " ms";
  }
  function fmtBytes(x) {
    if (x == null) return "–";
    const units = ["B", "KiB", "MiB", "GiB"];
    let i = 0;
    while (x >= 1024 && i < units.length - 1) { x /= 1024; i++; }
    return (i ? x.toFixed(1) : Math.round(x)) + " " + units[i] + "/s";
  }

  // -- charts ----------------------------------------------------------------

  function niceCeil(x) {
    if (!(x > 0)) return 1;
    const p = Math.pow(10, Math.floor(Math.log10(x)));
    for (const m of [1, 2, 2.5, 5, 10]) if (x <= m * p) return m * p;
    return 10 * p;
  }

  function drawChart(node, key, scale, color, format) {
    const w = node.clientWidth || 600, h = node.clientHeight || 150;
    const left = 46, right = 8, top = 8, bottom = 18;
    node.setAttribute("viewBox", "0 0 " + w + " " + h);
    node.replaceChildren();
    const now = points.length ? points[points.length - 1].t : 0;
    const span = points.length ? Math.min(HISTORY_S, Math.max(60, now - points[0].t)) : 60;
    const values = points.map((p) => p[key]).filter((v) => v != null).map((v) => v * scale);
    const max = niceCeil(Math.max(0, ...values));
    const x = (t) => left + (w - left - right) * (1 - (now - t) / span);
    const y = (v) => top + (h - top - bottom) * (1 - v / max);
    for (const f of [0, 0.5, 1]) {
      const gy = y(max * f);
      node.append(svg("line", { x1: left, x2: w - right, y1: gy, y2: gy, class: "grid" }));
      const label = svg("text", { x: left - 6, y: gy + 3, "text-anchor": "end" });
      label.textContent = format(max * f);
      node.append(label);
    }
    for (const [t, text] of [[now - span, "-" + Math.round(span / 60) + " min"], [now, "now"]]) {
      const label = svg("text", { x: x(t), y: h - 4, "text-anchor": t === now ? "end" : "start" });
      label.textContent = text;
      node.append(label);
    }
    // One path per run of known values: a gap where nothing was measured.
    let line = "", area = "", run = [];
    const flush = () => {
      if (run.length) {
        const d = run.map(([px, py], i) => (i ? "L" : "M") + px.toFixed(1) + " " + py.toFixed(1)).join("");
        line += d;
        area += d + "L" + run[run.length - 1][0].toFixed(1) + " " + y(0) + "L" + run[0][0].toFixed(1) + " " + y(0) + "Z";
      }
      run = [];
    };
    for (const p of points) {
      if (p[key] == null) flush();
      else run.push([x(p.t), y(p[key] * scale)]);
    }
    flush();
    node.append(svg("path", { d: area, fill: color, "fill-opacity": "0.12", stroke: "none" }));
    node.append(svg("path", { d: line, fill: "none", stroke: color, "stroke-width": "1.6",
      "stroke-linejoin": "round" }));
  }

  // -- rendering -------------------------------------------------------------

  function setStatus(text, kind) {
    const pill = $("status");
    pill.textContent = text;
    pill.className = "pill " + kind;
  }

  function showMessage(text, bad) {
    const box = $("message");
    box.textContent = text;
    box.className = bad ? "bad" : "";
    box.hidden = !text;
  }

  function row(cells) {
    return el("tr", {}, ...cells.map(([text, cls]) =>
      text instanceof Node ? el("td", { class: cls || "" }, text) : el("td", { class: cls || "", text })));
  }

  function renderListeners(stats, r, now) {
    const rows = [];
    for (const [name, l] of Object.entries(stats.listeners)) {
      const cur = now.listeners[name], old = r.old && r.old.listeners[name];
      rows.push(row([
        [name], [l.protocol || "–"], [l.listen || "–", "mono"],
        [l.active_connections, "num"], [l.connections_total, "num"],
        [l.protocol === "tcp" ? "–" : fmtRate(old ? r.rate(cur.req, old.req) : null), "num"],
        [fmtBytes(old ? r.rate(cur.rx, old.rx) : null), "num"],
        [fmtBytes(old ? r.rate(cur.tx, old.tx) : null), "num"],
      ]));
    }
    $("listeners").tBodies[0].replaceChildren(...rows);
  }

  function describeMatch(m) {
    const parts = [];
    if (m.host) parts.push("host " + m.host);
    if (m.sni) parts.push("sni " + m.sni);
    if (m.path) parts.push("path " + m.path);
    if (m.path_prefix) parts.push("prefix " + m.path_prefix);
    if (m.path_regex) parts.push("regex " + m.path_regex);
    if (m.methods && m.methods.length) parts.push(m.methods.join(","));
    for (const [k, v] of Object.entries(m.headers || {})) parts.push(k + ": " + v);
    return parts.length ? parts.join("  ") : "everything";
  }

  function describeTarget(route) {
    if (route.cluster) return "→ " + route.cluster;
    if (route.redirect) return route.redirect.status + " → " + route.redirect.location;
    if (route.direct_response) return "answers " + route.direct_response.status;
    return "–";
  }

  function renderRoutes(r) {
    const rows = [];
    for (const l of (config && config.listeners) || []) {
      const routes = l.routes.map((route, i) => [String(i), route]);
      if (l.cluster) routes.push(["default", { match: {}, cluster: l.cluster }]);
      for (const [label, route] of routes) {
        const key = "r:" + l.name + " " + label;
        rows.push(row([
          [l.name], [label], [describeMatch(route.match), "mono"], [describeTarget(route)],
          [l.protocol === "tcp" ? "–" : fmtRate(r.requests(key)), "num"],
          [l.protocol === "tcp" ? "–" : fmtLatency(r.p99(key)), "num"],
        ]));
      }
    }
    $("routes").tBodies[0].replaceChildren(...rows);
  }

  function actionButton(cluster, backend) {
    const action = backend.drained ? "enable" : "drain";
    const button = el("button", {
      type: "button", text: backend.drained ? "Enable" : "Drain",
      "data-action": action, "data-cluster": cluster, "data-address": backend.address,
    });
    button.addEventListener("click", () => act(cluster, backend.address, action));
    return button;
  }

  function renderClusters(clusters, stats, r, now) {
    const cards = [];
    for (const c of clusters.clusters) {
      const rows = [];
      for (const b of c.backends) {
        const key = c.name + " " + b.address;
        const cur = now.backends[key], old = r.old && r.old.backends[key];
        const counters = (stats.clusters[c.name] || { backends: {} }).backends[b.address] || {};
        const tr = row([
          [b.name, "mono"],
          [el("span", { class: "badge " + b.state, text: b.state })],
          [b.weight, "num"], [b.active_connections, "num"],
          [fmtRate(cur && old ? r.rate(cur.n, old.n) : null), "num"],
          [fmtRate(cur && old ? r.rate(cur.err, old.err) : null), "num"],
          [counters.connect_failures || 0, "num"],
          [actionButton(c.name, b)],
        ]);
        tr.setAttribute("data-address", b.address);
        tr.setAttribute("data-state", b.state);
        rows.push(tr);
      }
      const head = el("tr", {}, ...["backend", "state", "weight", "active", "req/s", "5xx/s",
        "connect failures", ""].map((t, i) => el("th", { class: i >= 2 && i <= 6 ? "num" : "", text: t })));
      cards.push(el("div", { class: "cluster", "data-cluster": c.name },
        el("h3", {}, c.name,
          el("span", { class: "muted", text: c.lb }),
          c.panic ? el("span", { class: "badge panic", text: "panic" }) : "",
          el("span", { class: "muted", text: c.backends_eligible + "/" + c.backends_total + " eligible" }),
          el("span", { class: "muted", text: fmtRate(r.requests("c:" + c.name)) + " req/s" }),
          el("span", { class: "muted", text: "p99 " + fmtLatency(r.p99("c:" + c.name)) })),
        el("table", {}, el("thead", {}, head), el("tbody", {}, ...rows))));
    }
    $("clusters").replaceChildren(...cards);
  }

  function render(clusters, stats, now) {
    const r = rates(now);
    const rps = r.requests(""), p99 = r.p99("");
    points.push({ t: now.t, rps, p99 });
    while (points.length && now.t - points[0].t > HISTORY_S) points.shift();
    $("t-rps").textContent = fmtRate(rps);
    $("t-p99").textContent = fmtLatency(p99);
    $("t-active").textContent = sum(Object.fromEntries(
      Object.entries(stats.listeners).map(([k, l]) => [k, l.active_connections || 0])));
    let up = 0, total = 0;
    for (const c of clusters.clusters) { up += c.backends_eligible; total += c.backends_total; }
    $("t-up").textContent = up + " / " + total;
    if (stats.draining) setStatus("draining", "warn");
    else if (stats.ready) setStatus("ready", "good");
    else setStatus("not ready", "bad");
    $("config-path").textContent = config ? config.path : "";
    $("updated").textContent = "updated " + new Date().toLocaleTimeString();
    renderListeners(stats, r, now);
    renderRoutes(r);
    renderClusters(clusters, stats, r, now);
    drawChart($("chart-rps"), "rps", 1, "#2f6fde", fmtAxis);
    drawChart($("chart-p99"), "p99", 1000, "#d98a00", fmtAxis);
  }

  // -- polling and actions -----------------------------------------------------

  async function poll() {
    clearTimeout(timer);
    try {
      if (!config || Date.now() - configAt > 30000) {
        config = await getJSON("/config");
        configAt = Date.now();
      }
      const [clusters, stats, text] = await Promise.all([
        getJSON("/clusters"), getJSON("/stats"),
        api("/metrics").then((response) => (response.ok ? response.text() : "")),
      ]);
      $("auth").hidden = true;
      const now = sample(stats, parseMetrics(text));
      samples.push(now);
      while (samples.length > 2 && now.t - samples[1].t > RATE_S * 2) samples.shift();
      render(clusters, stats, now);
    } catch (e) {
      if (e instanceof AuthError) {
        askToken();
        return;          // until a token is entered
      }
      setStatus("unreachable", "bad");
    }
    timer = setTimeout(poll, POLL_MS);
  }

  function askToken() {
    setStatus("token needed", "warn");
    $("auth").hidden = false;
    $("forget").hidden = true;
    $("token").focus();
  }

  async function act(cluster, address, action) {
    const path = "/clusters/" + encodeURIComponent(cluster) + "/backends/" +
      encodeURIComponent(address) + "/" + action;
    try {
      const response = await api(path, { method: "POST" });
      const body = await response.json();
      if (response.ok) showMessage((action === "drain" ? "Drained " : "Enabled ") + address + " in " + cluster, false);
      else showMessage(action + " " + address + ": " + (body.error || response.status), true);
    } catch (e) {
      if (e instanceof AuthError) askToken();
      else showMessage(action + " " + address + ": " + e.message, true);
    }
    poll();
  }

  async function reload(dryRun) {
    try {
      const response = await api("/reload" + (dryRun ? "?dry_run=1" : ""), { method: "POST" });
      const body = await response.json();
      const what = dryRun ? "Config check" : "Reload";
      if (response.ok) {
        const changes = body.changes ? "\n" + JSON.stringify(body.changes, null, 2) : "";
        showMessage(what + ": OK" + changes, false);
        if (!dryRun) config = null;
      } else {
        showMessage(what + " failed:\n" + ((body.errors || []).join("\n") || body.error || response.status), true);
      }
    } catch (e) {
      if (e instanceof AuthError) askToken();
      else showMessage("reload: " + e.message, true);
    }
    poll();
  }

  $("auth").addEventListener("submit", (event) => {
    event.preventDefault();
    token = $("token").value.trim();
    $("token").value = "";
    sessionStorage.setItem(TOKEN_KEY, token);
    $("forget").hidden = false;
    config = null;
    poll();
  });
  $("forget").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    token = null;
    askToken();
  });
  $("check").addEventListener("click", () => reload(true));
  $("reload").addEventListener("click", () => reload(false));
  $("forget").hidden = !token;
  poll();
})();
"""

_BODY = """
<header>
  <h1>Balance</h1>
  <span id="status" class="pill">connecting</span>
  <span id="config-path" class="muted"></span>
  <span class="spacer"></span>
  <span id="updated" class="muted"></span>
  <button id="check" type="button" title="POST /reload?dry_run=1">Check config</button>
  <button id="reload" type="button" title="POST /reload">Reload</button>
  <button id="forget" type="button" hidden>Forget token</button>
</header>
<div id="message" hidden></div>
<form id="auth" hidden>
  <label>Admin token <input id="token" type="password" autocomplete="off"></label>
  <button type="submit">Use token</button>
  <span class="muted">The token of admin.token_file; kept in this tab only.</span>
</form>
<main>
  <section class="tiles">
    <div class="tile"><div class="label">Requests/s</div><div id="t-rps" class="value">–</div></div>
    <div class="tile"><div class="label">p99 latency</div><div id="t-p99" class="value">–</div></div>
    <div class="tile"><div class="label">Active connections</div>
      <div id="t-active" class="value">–</div></div>
    <div class="tile"><div class="label">Backends eligible</div><div id="t-up" class="value">–</div></div>
  </section>
  <section class="charts">
    <figure><figcaption>Requests/s</figcaption><svg id="chart-rps" class="chart"></svg></figure>
    <figure><figcaption>p99 latency (ms)</figcaption><svg id="chart-p99" class="chart"></svg></figure>
  </section>
  <h2>Listeners</h2>
  <div class="panel"><table id="listeners"><thead><tr>
    <th>listener</th><th>protocol</th><th>listen</th><th class="num">active</th>
    <th class="num">connections</th><th class="num">req/s</th><th class="num">in</th>
    <th class="num">out</th></tr></thead><tbody></tbody></table></div>
  <h2>Routes</h2>
  <div class="panel"><table id="routes"><thead><tr>
    <th>listener</th><th>route</th><th>match</th><th>goes to</th><th class="num">req/s</th>
    <th class="num">p99</th></tr></thead><tbody></tbody></table></div>
  <h2>Clusters</h2>
  <div id="clusters"></div>
</main>
<noscript>The dashboard needs JavaScript; the JSON is at /clusters, /stats and /config.</noscript>
"""


def _hash(source: str) -> str:
    digest = hashlib.sha256(source.encode("utf-8")).digest()
    return "'sha256-" + base64.b64encode(digest).decode("ascii") + "'"


#: The dashboard page, UTF-8.
PAGE = (
    '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
    '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
    '<title>Balance</title>\n<link rel="icon" href="data:,">\n'
    f"<style>{_STYLE}</style>\n</head>\n<body>{_BODY}<script>{_SCRIPT}</script>\n</body>\n</html>\n"
).encode()

#: The page's Content-Security-Policy: its own inline script and style (by
#: hash), requests to the admin API's origin, nothing else.
CONTENT_SECURITY_POLICY = (
    f"default-src 'none'; script-src {_hash(_SCRIPT)}; style-src {_hash(_STYLE)}; "
    "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
).encode("ascii")

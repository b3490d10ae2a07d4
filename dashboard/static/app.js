// HMS operations dashboard. Plain DOM, no framework, no innerHTML: every string from the
// server (service names, reasons, images) reaches the page through textContent or attributes.
"use strict";

const TOKEN_KEY = "hms.token";
const MAX_EVENTS = 200;
const STALE_AFTER_MS = 5000;

const state = {
  snapshot: null,          // the latest "state" message
  receivedAt: 0,
  history: {},             // service -> [[t, cpu, desired, ready], ...]
  historyLen: 300,
  events: [],              // newest last
  me: null,                // {user, role, can_approve, can_reject} when signed in
  approvalCards: new Map(),
  busy: new Set(),         // services with an approve/reject in flight
};

// --- DOM helpers -------------------------------------------------------------------------

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function svg(tag, attrs) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  return node;
}

// Links only to http(s) URLs the server computed; anything else is shown as text.
function link(href, text, cls) {
  if (typeof href === "string" && /^https?:\/\//i.test(href)) {
    return el("a", { href, target: "_blank", rel: "noopener noreferrer", class: cls }, text);
  }
  return el("span", { class: cls }, text);
}

const $ = (id) => document.getElementById(id);

function ago(iso, now) {
  if (!iso) return "–";
  let s = Math.max(0, Math.round((now - Date.parse(iso)) / 1000));
  if (s < 60) return s + "s";
  if (s < 3600) return Math.floor(s / 60) + "m" + String(s % 60).padStart(2, "0") + "s";
  if (s < 86400) return Math.floor(s / 3600) + "h" + String(Math.floor((s % 3600) / 60)).padStart(2, "0") + "m";
  return Math.floor(s / 86400) + "d";
}

function clock(iso) {
  const d = new Date(iso);
  return isNaN(d) ? "" : d.toLocaleTimeString([], { hour12: false });
}

function fmt(v, digits = 1, unit = "") {
  return v === null || v === undefined || Number.isNaN(v) ? "–" : Number(v).toFixed(digits) + unit;
}

const PHASE_CLASS = {
  Running: "b-ok", Stopped: "b-muted", AwaitingApproval: "b-warn", Degraded: "b-bad", Failed: "b-bad",
  Rejected: "b-bad", Healing: "b-warn", Scaling: "b-info", Deploying: "b-info", Updating: "b-info",
  VerifyingImage: "b-info", Validating: "b-muted", Undeploying: "b-muted",
};
const HEALTH_CLASS = { healthy: "b-ok", starting: "b-info", unhealthy: "b-warn", exited: "b-bad" };

function eventClass(type) {
  if (/denied|invalid|untrusted|failed|exited|degraded|rejected|capacity/.test(type)) return "b-bad";
  if (/unhealthy|at_max|requested|replaced/.test(type)) return "b-warn";
  if (/started|deployed|recovered|granted|verified/.test(type)) return "b-ok";
  return "b-info";
}

function isProblem(s) {
  return ["Degraded", "Failed", "Healing", "AwaitingApproval"].includes(s.phase) ||
    s.ready_replicas < s.desired_replicas || s.crash_count > 1 || s.backoff_s > 0 ||
    s.pods.some((p) => p.health !== "healthy");
}

// --- charts ------------------------------------------------------------------------------

const CW = 170, CH = 40;
const MIN_WINDOW = 30; // samples: a young ring is stretched over at least this many

function polyline(points, cls) {
  return svg("polyline", { points: points.map((p) => p[0].toFixed(1) + "," + p[1].toFixed(1)).join(" "), class: cls });
}

function chart(series, { max, lines, target, label }) {
  const root = svg("svg", { width: CW, height: CH, viewBox: `0 0 ${CW} ${CH}`, class: "chart", role: "img" });
  root.append(svg("rect", { x: 0.5, y: 0.5, width: CW - 1, height: CH - 1, rx: 3, class: "frame" }));
  const n = series.length;
  // The newest sample at the right edge; the width spans what the ring holds so far (at least
  // MIN_WINDOW samples), so a dashboard started a minute ago still draws a readable line.
  const step = (CW - 4) / Math.max(1, Math.max(MIN_WINDOW, n) - 1);
  const x = (i) => CW - 2 - (n - 1 - i) * step;
  const y = (v) => CH - 3 - (Math.min(v, max) / max) * (CH - 12);
  if (target !== undefined) {
    root.append(svg("line", { x1: 1, x2: CW - 1, y1: y(target), y2: y(target), class: "target" }));
  }
  for (const { index, cls, area } of lines) {
    const pts = [];
    series.forEach((row, i) => { if (row[index] !== null && row[index] !== undefined) pts.push([x(i), y(row[index])]); });
    if (pts.length === 0) continue;
    if (pts.length === 1) pts.push([pts[0][0] + 1, pts[0][1]]);
    if (area) {
      const poly = [[pts[0][0], CH - 3], ...pts, [pts[pts.length - 1][0], CH - 3]];
      root.append(svg("polygon", { points: poly.map((p) => p[0].toFixed(1) + "," + p[1].toFixed(1)).join(" "), class: area }));
    }
    root.append(polyline(pts, cls));
  }
  const span = series.length > 1 ? series[series.length - 1][0] - series[0][0] : 0;
  const spanText = span >= 90 ? Math.round(span / 60) + " min" : Math.round(span) + " s";
  const t = svg("text", { x: 4, y: 10 });
  t.textContent = label;
  root.append(t);
  const s = svg("text", { x: CW - 4, y: 10, "text-anchor": "end" });
  s.textContent = spanText;
  root.append(s);
  const title = svg("title", {});
  title.textContent = label + ", over the last " + spanText;
  root.append(title);
  return root;
}

function cpuChart(s) {
  const rows = state.history[s.name] || [];
  const last = rows.length ? rows[rows.length - 1][1] : null;
  const peak = Math.max(100, ...rows.map((r) => r[1] || 0));
  return chart(rows, {
    max: peak, target: s.cpu_target, label: "CPU " + fmt(last, 0, "%") + " (target " + s.cpu_target + "%)",
    lines: [{ index: 1, cls: "line-cpu", area: "area-cpu" }],
  });
}

function replicaChart(s) {
  const rows = state.history[s.name] || [];
  const peak = Math.max(1, s.max_replicas > 20 ? 0 : s.max_replicas, ...rows.map((r) => Math.max(r[2] || 0, r[3] || 0))) + 1;
  return chart(rows, {
    max: peak, label: "pods " + s.ready_replicas + "/" + s.desired_replicas,
    lines: [{ index: 2, cls: "line-desired" }, { index: 3, cls: "line-ready" }],
  });
}

// --- rendering ---------------------------------------------------------------------------

function renderSummary(snap, now) {
  const services = snap.services;
  const pods = services.flatMap((s) => s.pods);
  const healthy = pods.filter((p) => p.health === "healthy").length;
  const bad = pods.filter((p) => p.health === "unhealthy" || p.health === "exited").length;
  const degraded = services.filter((s) => s.phase === "Degraded" || s.crash_count > 1).length;
  const pending = services.filter((s) => s.pending_approval).length;
  const tile = (k, v, cls, id) => el("div", { class: "tile " + (cls || ""), "data-tile": id }, el("div", { class: "v" }, v), el("div", { class: "k" }, k));
  $("summary").replaceChildren(
    tile("services", services.length, "", "services"),
    tile("pods healthy", healthy + " / " + pods.length, healthy === pods.length ? "ok" : "warn", "pods"),
    tile("pods failing", bad, bad ? "bad" : "ok", "failing"),
    tile("degraded / crash-looping", degraded, degraded ? "bad" : "ok", "degraded"),
    tile("awaiting approval", pending, pending ? "warn" : "", "approvals"),
    tile("heals", services.reduce((a, s) => a + s.heal_count, 0), "", "heals"),
    tile("scale actions", services.reduce((a, s) => a + s.scale_count, 0), "", "scales"),
  );
}

function trafficCell(s, router) {
  if (!router || !router.ok) return el("div", { class: "traffic muted", "data-traffic": "none" }, "no router");
  const t = router.services && router.services[s.name];
  if (!t) return el("div", { class: "traffic muted", "data-traffic": "idle" }, "no traffic");
  const errCls = t.error_rate > 0.05 ? "error" : "";
  return el("div", { class: "traffic", "data-traffic": "live", title: "from the router; p50 " + fmt(t.p50_ms, 1, " ms") },
    el("div", {}, fmt(t.rps, 1) + " req/s"),
    el("div", { class: errCls }, "errors " + fmt((t.error_rate || 0) * 100, 1, "%")),
    el("div", { class: "muted" }, "p99 " + fmt(t.p99_ms, 0, " ms")));
}

function routerCell(p, routed) {
  if (!routed) return el("td", { class: "muted" }, "–");
  const r = routed[p.id];
  if (!r) return el("td", { class: "muted", "data-routed": "no" }, "not routed");
  const parts = [];
  if (r.ejected) parts.push("ejected");
  else if (r.state) parts.push(r.state);
  if (r.outstanding !== undefined && r.outstanding !== null) parts.push(r.outstanding + " in flight");
  if (r.latency_ms !== undefined && r.latency_ms !== null) parts.push(fmt(r.latency_ms, 1, " ms"));
  const cls = r.ejected ? "error" : r.state === "draining" ? "muted" : "";
  return el("td", { class: cls, "data-routed": r.ejected ? "ejected" : r.state || "yes" }, parts.join(" · "));
}

function podRow(s, p, now, routed) {
  return el("tr", { "data-pod": p.id, "data-health": p.health },
    el("td", { class: "mono", title: p.id }, p.id.slice(0, 8), " ",
      el("button", { type: "button", class: "logs quiet", "data-logs": p.id, "data-service": s.name, title: "live log" }, "log")),
    el("td", {}, p.node),
    el("td", { class: "mono" }, p.endpoint || "–"),
    el("td", {}, el("span", { class: "badge " + (HEALTH_CLASS[p.health] || "") }, p.health)),
    el("td", {}, p.ready ? "yes" : "no"),
    el("td", { class: "num" + (p.consecutive_failures ? " error" : "") }, p.consecutive_failures),
    el("td", { class: "num" }, fmt(p.cpu_percent, 1, "%")),
    el("td", { class: "num" }, ago(p.started_at, now)),
    el("td", { class: "num" }, p.revision),
    routerCell(p, routed));
}

function decisionItem(s, d) {
  const what = d.kind === "scale" && d.from_replicas !== null ? `${d.from_replicas} → ${d.to_replicas}` : "";
  return el("li", {},
    el("span", { class: "ev-time" }, clock(d.at) + " "),
    el("span", { class: "kind" }, d.kind),
    what ? el("span", {}, what + " ") : null,
    el("span", {}, d.reason + " "),
    d.workflow_url ? link(d.workflow_url, "workflow ↗", "wf-link") : null);
}

function routedPods(s, router) {
  if (!router || !router.ok) return null;
  const t = router.services && router.services[s.name];
  return t && t.pods && Object.keys(t.pods).length ? t.pods : null;
}

function slotLine(slot) {
  if (!slot) return null;
  const until = slot.ends_at ? " until " + new Date(slot.ends_at).toLocaleString() : "";
  const what = slot.landed ? "landed" : slot.min_replicas + "–" + slot.max_replicas + " pods";
  return el("div", { class: "slot", "data-slot": slot.name }, "time slot " + slot.name + ": " + what + until);
}

function serviceBlock(s, router, now) {
  const pct = s.desired_replicas ? Math.min(100, (100 * s.ready_replicas) / s.desired_replicas) : 100;
  const bar = el("span");
  bar.style.width = pct + "%";
  const head = el("div", { class: "svc-head" },
    el("div", {},
      el("div", { class: "svc-name" }, link(s.web_ui_url, s.name, "svc-link")),
      el("div", { class: "svc-sub mono", title: s.image }, s.image)),
    el("div", {}, el("span", { class: "badge phase " + (PHASE_CLASS[s.phase] || ""), "data-phase": s.phase }, s.phase)),
    el("div", { class: "replicas", title: "ready / desired (min " + s.min_replicas + ", max " + s.max_replicas + ")" },
      el("span", { "data-ready": s.ready_replicas }, s.ready_replicas + " / " + s.desired_replicas),
      el("div", { class: "bar" }, bar)),
    el("div", { class: "svc-sub" },
      el("div", {}, "revision ", link(s.deploy_url, String(s.revision), "rev-link")),
      el("div", {}, "heals " + s.heal_count + " · scales " + s.scale_count +
        (s.crash_count ? " · crashes " + s.crash_count : "") + (s.backoff_s ? " · backoff " + fmt(s.backoff_s, 0, "s") : "")),
      s.approved_by ? el("div", {}, "approved by " + s.approved_by) : null,
      slotLine(s.active_slot)),
    cpuChart(s),
    replicaChart(s),
    trafficCell(s, router));
  const body = el("div", { class: "svc-body" });
  if (s.message && s.phase !== "Running") body.append(el("div", { class: "svc-msg" }, s.message));
  if (s.waiting_for) body.append(waitingLine(s.waiting_for));
  if (s.pods.length) {
    body.append(el("table", { class: "pods" },
      el("thead", {}, el("tr", {}, ["pod", "node", "endpoint", "health", "ready", "failed pings", "CPU", "age", "rev", "router"].map(
        (h, i) => el("th", { class: i >= 5 && i < 9 ? "num" : "" }, h)))),
      el("tbody", {}, s.pods.map((p) => podRow(s, p, now, routedPods(s, router))))));
  }
  if (s.decisions.length) {
    body.append(el("ul", { class: "decisions" }, s.decisions.slice(-5).reverse().map((d) => decisionItem(s, d))));
  }
  return el("article", { class: "svc" + (isProblem(s) ? " problem" : ""), "data-service": s.name }, head, body);
}

function renderServices(snap, now) {
  const q = $("filter").value.trim().toLowerCase();
  const problemsOnly = $("problems").checked;
  const shown = snap.services.filter((s) =>
    (!q || s.name.includes(q) || s.image.toLowerCase().includes(q) || s.phase.toLowerCase().includes(q)) &&
    (!problemsOnly || isProblem(s)));
  $("services").replaceChildren(...shown.map((s) => serviceBlock(s, snap.router, now)));
  $("no-services").hidden = snap.services.length > 0;
  const r = snap.router;
  $("router-status").textContent = !r ? "" : !r.ok ? "no router" :
    r.routers > 1 ? `routers: ${r.live}/${r.routers} live` : "router: live";
  $("router-status").title = r && r.errors && r.errors.length ? r.errors.join("\n") : "";
}

function approvalCard(s) {
  const reason = el("input", { type: "text", placeholder: "reason (recorded with the decision)", maxlength: 500, "aria-label": "reason" });
  const result = el("div", { class: "result small" });
  const waited = el("span", { class: "muted" });
  const requestedBy = el("span", {});
  const why = el("div", { class: "muted" });
  const attempts = el("div", { class: "small error" });
  const buttons = el("span", { class: "buttons" });
  const card = el("div", { class: "approval", "data-approval": s.name },
    el("div", { class: "what" },
      el("div", {}, el("strong", {}, link(s.web_ui_url, s.name)), " ", requestedBy, " ", waited),
      why, attempts),
    buttons, result);
  const decide = async (action) => {
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (!token) return;
    state.busy.add(s.name);
    buttons.querySelectorAll("button").forEach((b) => { b.disabled = true; });
    result.className = "result small muted";
    result.textContent = (action === "approve" ? "approving" : "rejecting") + "…";
    try {
      const resp = await fetch(`/api/services/${encodeURIComponent(s.name)}/${action}`, {
        method: "POST",
        headers: { "Content-Type": "application/json", Authorization: "Bearer " + token },
        body: JSON.stringify({ reason: reason.value }),
      });
      const body = await resp.json().catch(() => ({}));
      if (!resp.ok) throw new Error(body.error || resp.status + " " + resp.statusText);
      result.className = "result small";
      result.textContent = `${action}d by ${body.by}: ${body.service} is now ${body.phase}`;
      toast(`${s.name}: ${action}d, now ${body.phase}`);
    } catch (e) {
      result.className = "result small error";
      result.textContent = action + " failed: " + e.message;
      buttons.querySelectorAll("button").forEach((b) => { b.disabled = false; });
    } finally {
      state.busy.delete(s.name);
    }
  };
  return {
    card,
    update(svc, now) {
      const pa = svc.pending_approval;
      requestedBy.textContent = "requested by " + pa.requested_by;
      waited.textContent = "· waiting " + ago(pa.requested_at, now);
      why.textContent = pa.reason;
      attempts.textContent = pa.invalid_attempts.length ? "refused attempts: " + pa.invalid_attempts.join("; ") : "";
      const canAct = !!(state.me && state.me.can_approve);
      const hint = state.me ? `${state.me.user} (${state.me.role}) may not approve` : "sign in as a gov_approver to approve";
      const mode = canAct ? "buttons" : "hint:" + hint;
      if (buttons.dataset.mode !== mode) {
        buttons.dataset.mode = mode;
        if (canAct) {
          buttons.replaceChildren(
            reason,
            el("button", { type: "button", class: "approve", "data-action": "approve", onclick: () => decide("approve") }, "Approve"),
            el("button", { type: "button", class: "reject", "data-action": "reject", onclick: () => decide("reject") }, "Reject"));
        } else {
          buttons.replaceChildren(el("span", { class: "muted small" }, hint));
        }
      }
    },
  };
}

function renderApprovals(snap, now) {
  const pending = snap.services.filter((s) => s.pending_approval);
  const wanted = new Set(pending.map((s) => s.name + "@" + s.pending_approval.requested_at));
  for (const [key, entry] of state.approvalCards) {
    if (!wanted.has(key) && !state.busy.has(key.split("@")[0])) { entry.card.remove(); state.approvalCards.delete(key); }
  }
  for (const s of pending) {
    const key = s.name + "@" + s.pending_approval.requested_at;
    let entry = state.approvalCards.get(key);
    if (!entry) {
      entry = approvalCard(s);
      state.approvalCards.set(key, entry);
      $("approvals").append(entry.card);
    }
    entry.update(s, now);
  }
  $("approvals-section").hidden = state.approvalCards.size === 0;
}

function renderEvent(e, fresh) {
  return el("li", { class: fresh ? "fresh" : "", "data-event": e.type, "data-service": e.service },
    el("div", { class: "ev-head" },
      el("span", { class: "ev-time" }, clock(e.time)),
      el("span", { class: "badge " + eventClass(e.type) }, e.type),
      el("span", { class: "ev-svc" }, e.service)),
    el("div", { class: "ev-reason" }, e.reason));
}

function eventMatches(e) {
  const q = $("event-filter").value.trim().toLowerCase();
  return !q || e.type.includes(q) || e.service.includes(q) || (e.reason || "").toLowerCase().includes(q);
}

function renderEvents() {
  const list = state.events.filter(eventMatches).slice(-MAX_EVENTS).reverse();
  $("events").replaceChildren(...list.map((e) => renderEvent(e, false)));
}

function addEvent(e) {
  state.events.push(e);
  if (state.events.length > MAX_EVENTS) state.events.splice(0, state.events.length - MAX_EVENTS);
  if (!eventMatches(e)) return;
  const ol = $("events");
  ol.prepend(renderEvent(e, true));
  while (ol.childElementCount > MAX_EVENTS) ol.lastElementChild.remove();
}

function render() {
  const snap = state.snapshot;
  if (!snap) return;
  const now = Date.now();
  renderSummary(snap, now);
  renderApprovals(snap, now);
  renderServices(snap, now);
  const banner = $("banner");
  banner.hidden = snap.ok;
  banner.textContent = snap.ok ? "" : snap.error || "cannot read the fleet";
  const webui = $("webui");
  if (snap.web_ui_url && /^https?:\/\//i.test(snap.web_ui_url)) webui.href = snap.web_ui_url + "/namespaces/" + encodeURIComponent(snap.namespace) + "/workflows";
}

function tick() {
  const conn = $("conn");
  const age = Date.now() - state.receivedAt;
  if (state.receivedAt && age > STALE_AFTER_MS) {
    conn.className = "conn conn-bad";
    conn.textContent = "stale " + Math.round(age / 1000) + "s";
  }
  if (state.snapshot) $("updated").textContent = "updated " + clock(state.snapshot.generated_at);
}

function toast(text, bad) {
  const t = $("toast");
  t.textContent = text;
  t.className = "toast" + (bad ? " bad" : "");
  t.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { t.hidden = true; }, 5000);
}

// --- live stream -------------------------------------------------------------------------

// Reading needs a viewer token (unless the dashboard runs with --public-read). An EventSource
// cannot send a header, so the page trades its token for a one-connection stream ticket first;
// when the stream closes (a ticket is good once, a token expires) it asks for a new one.
let stream = null;
let streamRetry = null;

async function streamUrl() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (!token) return "/api/stream";
  const resp = await fetch("/api/stream-ticket", { method: "POST", headers: { Authorization: "Bearer " + token } });
  const body = await resp.json().catch(() => ({}));
  if (!resp.ok) throw new Error(body.error || "no stream ticket (" + resp.status + ")");
  return body.ticket ? "/api/stream?ticket=" + encodeURIComponent(body.ticket) : "/api/stream";
}

function reconnect() {
  if (stream) { stream.close(); stream = null; }
  clearTimeout(streamRetry);
  connect();
}

async function connect() {
  const conn = $("conn");
  let url;
  try {
    url = await streamUrl();
  } catch (e) {
    conn.className = "conn conn-bad";
    conn.textContent = "sign in to view";
    streamRetry = setTimeout(reconnect, 5000);
    return;
  }
  const es = new EventSource(url);
  stream = es;
  es.addEventListener("open", () => { conn.className = "conn conn-ok"; conn.textContent = "live"; });
  es.addEventListener("error", () => {
    if (es.readyState === EventSource.CLOSED) {  // refused (401, 503) or its ticket is spent: start over
      conn.className = "conn conn-bad";
      conn.textContent = sessionStorage.getItem(TOKEN_KEY) ? "reconnecting…" : "sign in to view";
      if (stream === es) streamRetry = setTimeout(reconnect, 2000);
    } else {
      conn.className = "conn conn-wait";
      conn.textContent = "reconnecting…";
    }
  });
  es.addEventListener("init", (m) => {
    const init = JSON.parse(m.data);
    state.history = init.history || {};
    state.historyLen = init.history_len || 300;
    state.events = init.events || [];
    renderEvents();
  });
  es.addEventListener("state", (m) => {
    state.snapshot = JSON.parse(m.data);
    state.receivedAt = Date.now();
    conn.className = "conn conn-ok";
    conn.textContent = "live";
    render();
  });
  es.addEventListener("sample", (m) => {
    const sample = JSON.parse(m.data);
    for (const [name, point] of Object.entries(sample.services)) {
      const rows = state.history[name] || (state.history[name] = []);
      rows.push([sample.t, ...point]);
      if (rows.length > state.historyLen) rows.splice(0, rows.length - state.historyLen);
    }
    for (const name of Object.keys(state.history)) if (!(name in sample.services)) delete state.history[name];
  });
  es.addEventListener("event", (m) => addEvent(JSON.parse(m.data)));
}

// --- sign-in -----------------------------------------------------------------------------

async function whoami(token) {
  const resp = await fetch("/api/me", { headers: { Authorization: "Bearer " + token } });
  const body = await resp.json().catch(() => ({}));
  if (!resp.ok) throw new Error(body.error || "sign-in failed (" + resp.status + ")");
  return body;
}

function showIdentity() {
  const who = $("who");
  if (state.me) {
    who.textContent = `signed in: ${state.me.user} (${state.me.role})`;
    who.className = "who signed";
    who.dataset.role = state.me.role;
  } else {
    who.textContent = "read-only: not signed in";
    who.className = "who";
    delete who.dataset.role;
  }
  $("signin-open").hidden = !!state.me;
  $("signout").hidden = !state.me;
  render();
}

async function signIn(token) {
  const err = $("signin-error");
  err.textContent = "";
  try {
    state.me = await whoami(token);
    sessionStorage.setItem(TOKEN_KEY, token);
    $("signin").hidden = true;
    $("token").value = "";
  } catch (e) {
    state.me = null;
    sessionStorage.removeItem(TOKEN_KEY);
    err.textContent = e.message;
    $("signin").hidden = false;
  }
  showIdentity();
  reconnect();  // the stream as this identity (or as nobody)
}

// A pod's live log: the dashboard relays the node's stream as server-sent events, read with
// this tab's token (fetch, since an EventSource sends no header). One pane, one stream.
const LOG_KEPT = 2000;
let logAbort = null;

function logLine(text, cls) {
  const pre = $("log-lines");
  const atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
  pre.append(el("span", cls ? { class: cls } : {}, text + "\n"));
  while (pre.childNodes.length > LOG_KEPT) pre.firstChild.remove();
  if (atEnd) pre.scrollTop = pre.scrollHeight;
}

function closeLog() {
  if (logAbort) logAbort.abort();
  logAbort = null;
  $("logpane").hidden = true;
}

async function openLog(service, pod) {
  closeLog();
  const abort = new AbortController();
  logAbort = abort;
  $("log-title").textContent = service + " / " + pod.slice(0, 8);
  $("log-lines").textContent = "";
  $("logpane").hidden = false;
  const token = sessionStorage.getItem(TOKEN_KEY);
  const stateEl = $("log-state");
  if (!token) { stateEl.textContent = "sign in to read logs"; return; }
  stateEl.textContent = "connecting…";
  let resp;
  try {
    resp = await fetch(`/api/services/${encodeURIComponent(service)}/pods/${encodeURIComponent(pod)}/logs`, {
      headers: { Authorization: "Bearer " + token }, signal: abort.signal });
  } catch (e) { if (logAbort === abort) stateEl.textContent = "cannot connect"; return; }
  if (!resp.ok) {
    let msg = resp.status + "";
    try { msg = (await resp.json()).error || msg; } catch (e) { /* not JSON */ }
    stateEl.textContent = "refused: " + msg;
    return;
  }
  stateEl.textContent = "live";
  await readEvents(resp.body, abort, (event, data) => {
    if (event === "end") { stateEl.textContent = "ended"; return; }
    if (event === "error") { stateEl.textContent = "broken: " + data; return; }
    logLine(data, data.startsWith("--- ") ? "log-end" : "");
  });
  if (logAbort === abort && stateEl.textContent === "live") stateEl.textContent = "closed";
}

async function readEvents(body, abort, onEvent) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buf += decoder.decode(value, { stream: true });
      let m;
      while ((m = /\r?\n\r?\n/.exec(buf)) !== null) {  // aiohttp-sse ends lines with \r\n
        const block = buf.slice(0, m.index);
        buf = buf.slice(m.index + m[0].length);
        let event = "message";
        const data = [];
        for (const line of block.split(/\r?\n/)) {
          if (line.startsWith("event:")) event = line.slice(6).trim();
          else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
        }
        if (data.length) onEvent(event, data.join("\n"));
      }
    }
  } catch (e) {
    if (!abort.signal.aborted) onEvent("error", "the stream broke");
  }
}

function setup() {
  $("log-close").addEventListener("click", closeLog);
  $("services").addEventListener("click", (ev) => {
    const b = ev.target.closest("button[data-logs]");
    if (b) openLog(b.dataset.service, b.dataset.logs);
  });
  $("signin-open").addEventListener("click", () => { $("signin").hidden = false; $("token").focus(); });
  $("signin-cancel").addEventListener("click", () => { $("signin").hidden = true; });
  $("signin").addEventListener("submit", (ev) => { ev.preventDefault(); const t = $("token").value.trim(); if (t) signIn(t); });
  $("signout").addEventListener("click", () => { sessionStorage.removeItem(TOKEN_KEY); state.me = null; showIdentity(); reconnect(); });
  $("filter").addEventListener("input", render);
  $("problems").addEventListener("change", render);
  $("event-filter").addEventListener("input", renderEvents);

  // `hms dashboard --token-file` prints a link with the token in the fragment: take it, then
  // drop it from the address bar and history.
  // A token is `<certificate>~<holder key>` (base64url, dots, the `~`); a link may arrive
  // percent-encoded by whatever carried it.
  const m = location.hash.match(/^#token=(\S+)$/);
  let linked = null;
  if (m) {
    try { linked = decodeURIComponent(m[1]); } catch (e) { linked = null; }
    if (linked !== null && !/^[A-Za-z0-9._~-]+$/.test(linked)) linked = null;
    history.replaceState(null, "", location.pathname + location.search);
  }
  const saved = linked || sessionStorage.getItem(TOKEN_KEY);
  if (saved) signIn(saved);  // connects once signed in
  else connect();
  setInterval(tick, 1000);
}

document.addEventListener("DOMContentLoaded", setup);

// What the service waits for and what ends the wait (status().waiting_for).
function waitingLine(w) {
  const parts = ["waiting for " + w.kind.replace(/_/g, " ") + ": " + w.reason];
  if (w.until) parts.push("until " + new Date(w.until).toLocaleString());
  const line = el("div", { class: "svc-msg svc-wait", "data-waiting": w.kind }, parts.join("; "));
  if (w.command) line.append(" — run ", el("code", {}, w.command));
  return line;
}

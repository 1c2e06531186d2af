// radflag dashboard: reads the read-only admin API with a bearer token kept in sessionStorage.
// No dependencies; every value is inserted as text (never as HTML).
"use strict";

const TOKEN_KEY = "radflag.token";
const REFRESH_MS = 15000;
const API = "/api/v1";
let timer = null;

function takeTokenFromFragment() {
  // "#token=..." lets a script open the page once; the fragment never reaches the server.
  const match = /(?:^#|&)token=([^&]+)/.exec(window.location.hash);
  if (match) {
    sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(match[1]));
    history.replaceState(null, "", window.location.pathname + window.location.search);
  }
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined) continue;
    if (k === "class") node.className = v;
    else if (k === "style") node.style.cssText = v;  // CSSOM: allowed by the CSP
    else node.setAttribute(k, v);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function fmtTime(iso) {
  if (!iso) return "–";
  return iso.replace("T", " ").replace(/\.\d+/, "").replace(/(\+00:00|Z)$/, "").slice(0, 19);
}

function fmtSeconds(s) {
  if (s === null || s === undefined) return "–";
  if (s < 1) return (s * 1000).toFixed(0) + " ms";
  if (s < 120) return s.toFixed(1) + " s";
  if (s < 7200) return (s / 60).toFixed(1) + " min";
  return (s / 3600).toFixed(1) + " h";
}

class AuthError extends Error {}

async function api(path) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  const response = await fetch(API + path, {
    headers: { Authorization: "Bearer " + token, Accept: "application/json" },
    cache: "no-store",
  });
  if (response.status === 401) throw new AuthError("wrong token");
  if (!response.ok) {
    let detail = response.statusText;
    try { detail = (await response.json()).detail || detail; } catch (e) { /* not JSON */ }
    throw new Error(path + ": " + response.status + " " + detail);
  }
  return response.json();
}

function fillTable(id, rows, makeRow, emptyText) {
  const body = document.querySelector("#" + id + " tbody");
  body.replaceChildren();
  if (!rows.length) {
    const cols = document.querySelectorAll("#" + id + " thead th").length;
    body.append(el("tr", { class: "empty" }, el("td", { colspan: cols }, emptyText)));
    return;
  }
  for (const row of rows) body.append(makeRow(row));
}

function renderCards(ov) {
  const cards = document.getElementById("cards");
  cards.replaceChildren();
  const card = (label, n, alert) =>
    el("div", { class: "card" + (alert && n > 0 ? " alert" : "") },
      el("div", { class: "n" }, n), el("div", { class: "label" }, label));
  const s = ov.studies_by_state;
  cards.append(
    card("receiving", s.RECEIVING || 0),
    card("queue (ready)", ov.queue_depth),
    card("processing", s.PROCESSING || 0),
    card("delivering", s.DELIVERING || 0),
    card("done", s.DONE || 0),
    card("not applicable", s.NOT_APPLICABLE || 0),
    card("failed", s.FAILED || 0, true),
    card("delivery failed", s.DELIVERY_FAILED || 0, true),
    card("outbox backlog", ov.outbox_backlog),
    card("dead letters", ov.dead_letters, true),
  );
  document.getElementById("version").textContent =
    "v" + ov.version + " · up since " + fmtTime(ov.started_at) + " UTC";
}

function fmtDate(d) {
  return d && /^\d{8}$/.test(d) ? d.slice(0, 4) + "-" + d.slice(4, 6) + "-" + d.slice(6) : (d || "–");
}

function actionsCell(st) {
  // Read-only: the dashboard shows the audited CLI commands; there is no write API.
  const cmds = [];
  if (["DONE", "DELIVERY_FAILED", "DELIVERING"].includes(st.state) && st.decision !== null) {
    cmds.push("radflag studies resend " + st.study_instance_uid);
  }
  if (["DONE", "NOT_APPLICABLE", "FAILED", "DELIVERY_FAILED", "DELIVERING"].includes(st.state)) {
    cmds.push("radflag studies reprocess " + st.study_instance_uid);
  }
  cmds.push("radflag studies show " + st.study_instance_uid);
  return el("td", { class: "actions" },
    el("details", {}, el("summary", {}, "commands"),
      ...cmds.map((c) => el("code", {}, c))));
}

function renderStudies(studies) {
  fillTable("studies", studies, (st) => {
    const finding = st.decision === null ? el("span", { class: "muted" }, "–")
      : el("span", {}, el("span", { class: "badge " + st.decision }, st.decision), " ",
        st.finding || "");
    const prob = st.probability === null ? "–" : el("span", {},
      el("span", { class: "prob" + (st.positive ? " pos" : "") },
        el("span", { style: "width:" + Math.round(st.probability * 100) + "%" })),
      st.probability.toFixed(3));
    const delivered = el("span", { class: "delivered" + (st.deliveries_dead ? " bad"
      : (st.delivered === "no destination" ? " warn" : "")) }, st.delivered);
    return el("tr", { "data-uid": st.study_instance_uid },
      el("td", { class: "uid" }, st.study_instance_uid),
      el("td", {}, st.accession_number || "–"),
      el("td", { class: "time" }, fmtDate(st.study_date)),
      el("td", {}, el("span", { class: "badge " + st.state }, st.state)),
      el("td", {}, finding),
      el("td", { class: "time" }, prob),
      el("td", { class: "num" }, st.threshold === null ? "–" : st.threshold.toFixed(2)),
      el("td", {}, delivered),
      el("td", { class: "reason", title: st.reason || "" }, el("span", {}, st.reason || "")),
      el("td", {}, st.calling_ae || "–"),
      el("td", { class: "time" }, fmtTime(st.last_received_at)),
      actionsCell(st));
  }, "no study received yet");
}

function renderWarnings(ov) {
  const box = document.getElementById("warnings");
  const warnings = ov.warnings || [];
  box.replaceChildren(...warnings.map((w) => el("p", {}, "⚠ " + w)));
  box.hidden = warnings.length === 0;
}

function renderThroughput(tp) {
  const series = [
    ["received_instances", "instances received", "#7aa6d6"],
    ["classified_studies", "studies classified", "#1f5fa8"],
    ["delivered_objects", "objects delivered", "#2e7d32"],
    ["failed_studies", "studies failed", "#c62828"],
    ["dead_letters", "dead letters", "#7b1fa2"],
  ];
  const buckets = tp.buckets;
  const max = Math.max(1, ...buckets.flatMap((b) => series.map(([k]) => b[k])));
  const ns = "http://www.w3.org/2000/svg";
  const W = 720, H = 180, padL = 30, padB = 18, slot = (W - padL) / buckets.length;
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", "0 0 " + W + " " + H);
  svg.setAttribute("role", "img");
  const add = (name, attrs, text) => {
    const n = document.createElementNS(ns, name);
    for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v);
    if (text !== undefined) n.textContent = text;
    svg.append(n);
    return n;
  };
  add("line", { x1: padL, y1: H - padB, x2: W, y2: H - padB, stroke: "#999" });
  add("text", { x: 2, y: 12, "font-size": 10, fill: "#666" }, String(max));
  add("text", { x: 2, y: H - padB, "font-size": 10, fill: "#666" }, "0");
  const barW = Math.max(1, (slot - 2) / series.length);
  buckets.forEach((b, i) => {
    series.forEach(([key, label, color], j) => {
      const h = ((H - padB - 16) * b[key]) / max;
      if (h <= 0) return;
      const bar = add("rect", { x: padL + i * slot + 1 + j * barW, y: H - padB - h,
        width: barW, height: h, fill: color });
      const t = document.createElementNS(ns, "title");
      t.textContent = fmtTime(b.hour).slice(11, 16) + " " + label + ": " + b[key];
      bar.append(t);
    });
    if (i % 3 === 0) {
      add("text", { x: padL + i * slot, y: H - 4, "font-size": 10, fill: "#666" },
        fmtTime(b.hour).slice(11, 16));
    }
  });
  document.getElementById("throughput-chart").replaceChildren(svg);
  const legend = document.getElementById("throughput-legend");
  legend.replaceChildren(...series.map(([key, label, color]) => el("span", {},
    el("i", { style: "background:" + color }),
    label + ": " + buckets.reduce((sum, b) => sum + b[key], 0))));
}

function renderLatency(lat) {
  fillTable("latency", lat.latencies, (x) => el("tr", {},
    el("td", {}, x.stage.replaceAll("_", " ")),
    el("td", { class: "num" }, x.n),
    ...[x.p50_s, x.p90_s, x.p95_s, x.p99_s, x.max_s].map((v) =>
      el("td", { class: "num" }, fmtSeconds(v)))), "no data");
}

function renderFailures(rows) {
  fillTable("failures", rows, (f) => el("tr", {},
    el("td", { class: "uid", title: f.study_instance_uid }, f.study_instance_uid),
    el("td", {}, el("span", { class: "badge " + f.state }, f.state)),
    el("td", { class: "num" }, f.processing_attempts),
    el("td", { class: "reason", title: f.failure_reason || "" }, el("span", {}, f.failure_reason || "–")),
    el("td", { class: "time" }, fmtTime(f.updated_at))), "no failed study");
}

function renderDeadLetters(rows) {
  fillTable("dead-letters", rows, (d) => el("tr", {},
    el("td", {}, d.destination),
    el("td", {}, d.kind),
    el("td", { class: "uid", title: d.study_instance_uid }, d.study_instance_uid),
    el("td", { class: "num" }, d.attempts),
    el("td", { class: "reason", title: d.last_error || "" }, el("span", {}, d.last_error || "–"))),
  "no dead letter");
}

function renderModels(rows) {
  fillTable("models", rows, (m) => el("tr", {},
    el("td", {}, m.name),
    el("td", {}, m.version),
    el("td", { class: "uid", title: m.weights_sha256 }, m.weights_sha256.slice(0, 16) + "…"),
    el("td", {}, m.loaded ? el("span", { class: "badge DONE" }, "loaded") : "–"),
    el("td", { class: "num" }, m.n_results),
    el("td", {}, fmtTime(m.last_result_at)),
    el("td", { class: "num" }, m.card && typeof m.card.threshold === "number"
      ? m.card.threshold.toFixed(2) : "–")),
  "no model registered");
}

async function renderReadiness() {
  const pill = document.getElementById("readiness");
  try {
    const response = await fetch("/readyz", { cache: "no-store" });
    const body = await response.json();
    pill.textContent = body.status;
    pill.className = "pill " + (response.ok ? "ok" : "bad");
    pill.title = body.checks.map((c) => c.name + ": " + (c.ok ? "ok" : "FAIL") + " – " + c.detail).join("\n");
  } catch (e) {
    pill.textContent = "unreachable";
    pill.className = "pill bad";
  }
}

function showLogin(message) {
  document.body.dataset.state = "need-token";
  document.getElementById("content").hidden = true;
  document.getElementById("logout").hidden = true;
  document.getElementById("login").hidden = false;
  document.getElementById("login-error").textContent = message || "";
}

async function refresh() {
  renderReadiness();
  if (!sessionStorage.getItem(TOKEN_KEY)) { showLogin(); return; }
  try {
    const [ov, studies, tp, lat, failures, dead, models] = await Promise.all([
      api("/overview"), api("/studies?limit=50"), api("/throughput?hours=24"),
      api("/latency?hours=24"), api("/failures?limit=20"), api("/dead-letters?limit=20"),
      api("/models"),
    ]);
    document.getElementById("login").hidden = true;
    document.getElementById("content").hidden = false;
    document.getElementById("logout").hidden = false;
    document.getElementById("error").hidden = true;
    renderCards(ov);
    renderWarnings(ov);
    renderStudies(studies);
    renderThroughput(tp);
    renderLatency(lat);
    renderFailures(failures);
    renderDeadLetters(dead);
    renderModels(models);
    document.getElementById("refreshed").textContent = "updated " + fmtTime(ov.now) + " UTC";
    document.body.dataset.state = "loaded";
  } catch (e) {
    if (e instanceof AuthError) {
      sessionStorage.removeItem(TOKEN_KEY);
      showLogin("That token was refused.");
      return;
    }
    const box = document.getElementById("error");
    box.textContent = "Could not refresh: " + e.message;
    box.hidden = false;
    document.getElementById("content").hidden = false;
    document.body.dataset.state = "error";
  }
}

function schedule() {
  if (timer !== null) clearInterval(timer);
  timer = setInterval(refresh, REFRESH_MS);
}

document.getElementById("login-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const input = document.getElementById("token");
  sessionStorage.setItem(TOKEN_KEY, input.value.trim());
  input.value = "";
  refresh();
});
document.getElementById("logout").addEventListener("click", () => {
  sessionStorage.removeItem(TOKEN_KEY);
  showLogin();
});

takeTokenFromFragment();
refresh();
schedule();

// neoxq dashboard: polls /dashboard/api/* once a second and draws with <canvas>.
// Plain JS, no libraries: the page must work on machines with no internet access.
"use strict";

const POLL_MS = 1000;
const state = { selected: null, key: localStorage.getItem("neoxq.key") || "", history: [] };
const $ = (sel) => document.querySelector(sel);

function headers() {
  return state.key ? { Authorization: "Bearer " + state.key } : {};
}

async function getJSON(path) {
  const resp = await fetch(path, { headers: headers(), cache: "no-store" });
  if (resp.status === 401) {
    $("#auth").hidden = false;
    throw new Error("an API key is needed");
  }
  if (!resp.ok) throw new Error("HTTP " + resp.status + " for " + path);
  return resp.json();
}

// ------------------------------------------------------------------ formatting

function fmtInt(n) { return Math.round(n).toLocaleString("en-US"); }
function fmtRate(x) { return x >= 100 ? fmtInt(x) : x.toFixed(1); }
function fmtSecs(s) {
  if (s === null || s === undefined) return "–";
  if (s < 1) return (s * 1000).toFixed(s < 0.01 ? 1 : 0) + " ms";
  if (s < 120) return s.toFixed(1) + " s";
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = Math.floor(s % 60);
  return h ? `${h}:${String(m).padStart(2, "0")}:${String(sec).padStart(2, "0")}`
           : `${m}:${String(sec).padStart(2, "0")}`;
}
function fmtTime(t) { return new Date(t * 1000).toLocaleTimeString(); }
function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v; else if (k === "style") e.style.cssText = v;
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

// ------------------------------------------------------------------ canvas helpers

function setupCanvas(canvas) {
  // Draw at device-pixel resolution so lines stay sharp on HiDPI screens.
  const ratio = window.devicePixelRatio || 1;
  const w = canvas.clientWidth, h = canvas.clientHeight;
  if (canvas.width !== Math.round(w * ratio)) canvas.width = Math.round(w * ratio);
  if (canvas.height !== Math.round(h * ratio)) canvas.height = Math.round(h * ratio);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, w, h);
  return { ctx, w, h };
}

function niceMax(v) {
  if (v <= 0) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

function drawThroughput(canvas, series) {
  const { ctx, w, h } = setupCanvas(canvas);
  const pad = { l: 52, r: 12, t: 10, b: 24 };
  const ys = series.map((p) => p.tokens_per_s);
  const ymax = niceMax(Math.max(1, ...ys));
  const x = (i) => pad.l + (i / Math.max(1, series.length - 1)) * (w - pad.l - pad.r);
  const y = (v) => h - pad.b - (v / ymax) * (h - pad.t - pad.b);
  ctx.font = "11px system-ui, sans-serif";
  ctx.strokeStyle = "#e2e6ee"; ctx.fillStyle = "#6b7385"; ctx.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const v = (ymax * i) / 4;
    ctx.beginPath(); ctx.moveTo(pad.l, y(v)); ctx.lineTo(w - pad.r, y(v)); ctx.stroke();
    ctx.textAlign = "right"; ctx.fillText(fmtRate(v), pad.l - 6, y(v) + 4);
  }
  if (series.length) {
    ctx.textAlign = "left"; ctx.fillText(fmtTime(series[0].t), pad.l, h - 6);
    ctx.textAlign = "right"; ctx.fillText(fmtTime(series[series.length - 1].t), w - pad.r, h - 6);
  }
  if (series.length < 2) return;
  ctx.beginPath(); ctx.moveTo(x(0), y(0));
  series.forEach((p, i) => ctx.lineTo(x(i), y(p.tokens_per_s)));
  ctx.lineTo(x(series.length - 1), y(0)); ctx.closePath();
  ctx.fillStyle = "rgba(47,111,236,.15)"; ctx.fill();
  ctx.beginPath();
  series.forEach((p, i) => (i ? ctx.lineTo(x(i), y(p.tokens_per_s)) : ctx.moveTo(x(i), y(p.tokens_per_s))));
  ctx.strokeStyle = "#2f6fec"; ctx.lineWidth = 2; ctx.stroke();
}

function drawHistogram(canvas, hist, fmt) {
  const { ctx, w, h } = setupCanvas(canvas);
  const pad = { l: 8, r: 8, t: 6, b: 18 };
  ctx.font = "10px system-ui, sans-serif"; ctx.fillStyle = "#6b7385";
  if (!hist.count) { ctx.fillText("no results yet", pad.l, h / 2); return; }
  const cmax = Math.max(...hist.counts);
  const bw = (w - pad.l - pad.r) / hist.counts.length;
  hist.counts.forEach((c, i) => {
    const bh = (c / cmax) * (h - pad.t - pad.b);
    ctx.fillStyle = "#2f6fec";
    ctx.fillRect(pad.l + i * bw + 1, h - pad.b - bh, Math.max(1, bw - 2), bh);
  });
  ctx.fillStyle = "#6b7385";
  ctx.textAlign = "left"; ctx.fillText(fmt(hist.min), pad.l, h - 4);
  ctx.textAlign = "right"; ctx.fillText(fmt(hist.max), w - pad.r, h - 4);
  // p50/p90 markers
  for (const [q, color] of [["p50", "#1f9d55"], ["p90", "#d98b00"], ["p99", "#d64545"]]) {
    const v = hist[q];
    const span = hist.max - hist.min || 1;
    const px = pad.l + ((v - hist.min) / span) * (w - pad.l - pad.r);
    ctx.strokeStyle = color; ctx.setLineDash([3, 3]);
    ctx.beginPath(); ctx.moveTo(px, pad.t); ctx.lineTo(px, h - pad.b); ctx.stroke();
    ctx.setLineDash([]);
  }
}

// ------------------------------------------------------------------ rendering

function progressBar(b) {
  const total = b.counts.total || 0;
  const ok = total ? (100 * b.counts.completed) / total : 0;
  const bad = total ? (100 * b.counts.failed) / total : 0;
  const pct = (100 * b.progress).toFixed(1);
  const bar = el("div", { class: "bar", role: "progressbar", "aria-valuemin": "0",
                          "aria-valuemax": "100", "aria-valuenow": pct,
                          "data-progress": String(b.progress), "data-batch": b.id });
  bar.append(el("div", { class: "fill" + (b.status === "completed" ? " done" : ""),
                         style: `width:${ok}%` }));
  if (bad) bar.append(el("div", { class: "fill failed", style: `left:${ok}%;width:${bad}%` }));
  bar.append(el("span", {}, pct + "%"));
  return bar;
}

function renderBatches(batches) {
  const body = $("#batches tbody");
  body.replaceChildren(...batches.map((b) => {
    const tr = el("tr", { class: "batch" + (b.id === state.selected ? " selected" : ""),
                          "data-id": b.id },
      el("td", {}, el("code", {}, b.id)),
      el("td", {}, el("span", { class: "pill " + b.status }, b.status),
        b.waiting ? el("div", { class: "waiting", title: b.waiting }, b.waiting) : ""),
      el("td", {}, progressBar(b)),
      el("td", {}, `${fmtInt(b.counts.completed + b.counts.failed)} / ${fmtInt(b.counts.total)}`),
      el("td", {}, fmtInt(b.counts.failed)),
      el("td", {}, fmtInt(b.tokens.completion)),
      el("td", {}, fmtRate(b.tokens_per_s)),
      el("td", {}, b.status === "in_progress" ? fmtSecs(b.eta_s) : "–"),
      el("td", {}, fmtTime(b.created_at)));
    tr.addEventListener("click", () => select(b.id));
    return tr;
  }));
  $("#no-batches").hidden = batches.length > 0;
}

function renderWorkers(workers) {
  $("#workers tbody").replaceChildren(...workers.map((w) => el("tr", { "data-id": w.id },
    el("td", {}, el("code", {}, w.id)),
    el("td", {}, el("span", { class: "pill " + w.health }, w.health)),
    el("td", {}, w.status),
    el("td", {}, w.model),
    el("td", {}, (w.devices || []).join(", ") + (w.pipeline_parallel > 1 ? ` (PP=${w.pipeline_parallel})` : "")),
    el("td", {}, fmtRate(w.tokens_per_s)),
    el("td", {}, fmtInt(w.items_done)),
    el("td", {}, fmtInt(w.tokens_done)),
    el("td", { class: "prefix-hits" }, `${Math.round(100 * (w.prefix_cache_hit_rate || 0))}%`),
    el("td", {}, fmtSecs(w.last_seen_s) + " ago"))));
  $("#no-workers").hidden = workers.length > 0;
}

const SVG = "http://www.w3.org/2000/svg";
function svgEl(tag, attrs) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  return e;
}

// A job's losses by step as inline SVG: training loss a line, validation loss dots.
function lossCurve(curve) {
  const W = 240, H = 48, P = 3;
  const svg = svgEl("svg", { class: "loss", viewBox: `0 0 ${W} ${H}`, role: "img" });
  const pts = curve.filter((p) => p.train_loss !== null || p.valid_loss !== null);
  if (!pts.length) return svg;
  const losses = pts.flatMap((p) => [p.train_loss, p.valid_loss]).filter((v) => v !== null);
  const lo = Math.min(...losses), hi = Math.max(...losses);
  const s0 = pts[0].step, s1 = pts[pts.length - 1].step;
  const x = (s) => P + (s1 > s0 ? ((s - s0) / (s1 - s0)) * (W - 2 * P) : (W - 2 * P) / 2);
  const y = (v) => P + (hi > lo ? ((hi - v) / (hi - lo)) * (H - 2 * P) : (H - 2 * P) / 2);
  const train = pts.filter((p) => p.train_loss !== null);
  if (train.length) {
    const d = train.map((p, i) => `${i ? "L" : "M"}${x(p.step).toFixed(1)},${y(p.train_loss).toFixed(1)}`);
    svg.append(svgEl("path", { class: "train", d: d.join(" ") }));
  }
  for (const p of pts.filter((q) => q.valid_loss !== null)) {
    svg.append(svgEl("circle", { class: "valid", cx: x(p.step).toFixed(1),
                                 cy: y(p.valid_loss).toFixed(1), r: 2.2 }));
  }
  svg.append(svgEl("title", {}));
  svg.lastChild.textContent = `loss ${hi.toFixed(3)} → ${lo.toFixed(3)} over steps ${s0}–${s1}`;
  return svg;
}

function fmtLoss(v) { return v === null || v === undefined ? "–" : v.toFixed(4); }

function renderJobs(jobs) {
  $("#jobs tbody").replaceChildren(...jobs.map((j) => el("tr", { class: "job", "data-id": j.id },
    el("td", {}, el("code", {}, j.id)),
    el("td", {}, el("span", { class: "pill " + j.status }, j.status),
      j.error ? el("div", { class: "waiting", title: j.error.message }, j.error.message) : ""),
    el("td", {}, j.model, j.fine_tuned_model ? el("div", { class: "result" }, "→ " + j.fine_tuned_model) : ""),
    el("td", {}, j.step === null ? "–" : fmtInt(j.step)),
    el("td", {}, fmtLoss(j.train_loss)),
    el("td", {}, fmtLoss(j.valid_loss)),
    el("td", {}, lossCurve(j.curve)),
    el("td", {}, fmtTime(j.created_at)))));
  $("#no-jobs").hidden = jobs.length > 0;
}

const CHARTS = [
  ["queue_wait_s", "Queue wait", fmtSecs],
  ["first_token_s", "Time to first token", fmtSecs],
  ["duration_s", "Generation time", fmtSecs],
  ["tokens_per_s", "Tokens/s per item", fmtRate],
  ["completion_tokens", "Completion tokens", fmtInt],
];

async function renderDetail() {
  if (!state.selected) { $("#detail").hidden = true; return; }
  const d = await getJSON(`/dashboard/api/batches/${encodeURIComponent(state.selected)}`);
  const b = d.batch, t = d.timings;
  $("#detail").hidden = false;
  $("#detail-id").textContent = b.id;
  const pill = $("#detail-status"); pill.textContent = b.status; pill.className = "pill " + b.status;
  const workers = Object.entries(t.workers).map(([id, n]) => `${id} (${fmtInt(n)})`).join(", ");
  $("#detail-summary").textContent =
    `${fmtInt(b.counts.completed)} completed, ${fmtInt(b.counts.failed)} failed of ` +
    `${fmtInt(b.counts.total)} · ${fmtInt(b.tokens.completion)} tokens generated · ` +
    `timings over ${fmtInt(t.sampled)} results` + (workers ? ` · workers: ${workers}` : "");
  const grid = $("#detail-charts");
  if (!grid.children.length) {
    for (const [key, title] of CHARTS) {
      grid.append(el("div", { class: "chart", "data-chart": key }, el("h3", {}, title),
        el("canvas"), el("div", { class: "stats" })));
    }
  }
  for (const [key, , fmt] of CHARTS) {
    const box = grid.querySelector(`[data-chart="${key}"]`);
    const h = t[key];
    drawHistogram(box.querySelector("canvas"), h, fmt);
    box.querySelector(".stats").textContent = h.count
      ? `p50 ${fmt(h.p50)} · p90 ${fmt(h.p90)} · p99 ${fmt(h.p99)} · mean ${fmt(h.mean)} · n=${fmtInt(h.count)}`
      : "";
  }
}

function select(id) {
  state.selected = state.selected === id ? null : id;
  $("#detail-charts").replaceChildren();
  tick();
}

// ------------------------------------------------------------------ loop

async function tick() {
  try {
    const o = await getJSON("/dashboard/api/overview?window=900&step=3");
    $("#auth").hidden = true;
    renderBatches(o.batches);
    renderWorkers(o.workers);
    renderJobs((await getJSON("/dashboard/api/jobs")).jobs);
    // From the first busy bucket on (at least a minute), so a fresh run's plot is not
    // a flat line with a spike at the right edge.
    const first = o.series.findIndex((p) => p.tokens_per_s > 0);
    const keep = Math.max(Math.ceil(60 / o.step), first < 0 ? 0 : o.series.length - first + 1);
    const series = o.series.slice(-keep);
    drawThroughput($("#throughput"), series);
    $("#series-note").textContent = `last ${fmtSecs(series.length * o.step)}, ${o.step} s buckets`;
    $("#rate").textContent = fmtRate(o.tokens_per_s) + " tok/s";
    await renderDetail();
    $("#live").textContent = "updated " + new Date().toLocaleTimeString();
    document.body.dataset.updated = String(Date.now());
  } catch (err) {
    $("#live").textContent = "⚠ " + err.message;
  }
}

$("#auth-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  state.key = $("#auth-key").value.trim();
  localStorage.setItem("neoxq.key", state.key);
  tick();
});
$("#detail-close").addEventListener("click", () => select(state.selected));
window.addEventListener("resize", tick);

let running = false;
async function loop() {
  if (!running) { running = true; await tick(); running = false; }
  setTimeout(loop, POLL_MS);
}
loop();

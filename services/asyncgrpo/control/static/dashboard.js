// The control plane's dashboard: polls the REST API (/v1) and draws with plotly.js (served from the plotly package).
"use strict";
const POLL_MS = 2000;
const queueSeries = { t: [], depth: [], running: [] };  // kept client-side: the API gives the current depth only
let current = null;

const $ = (id) => document.getElementById(id);
const fmt = (x, d = 3) => (x === null || x === undefined || Number.isNaN(x)) ? "-" : Number(x).toFixed(d);

function token() { return sessionStorage.getItem("asyncgrpo-token") || ""; }
function askToken() {
  const t = window.prompt("Control token (control.token / ASYNCGRPO_CONTROL_TOKEN)", token());
  if (t !== null) sessionStorage.setItem("asyncgrpo-token", t.trim());
}

async function api(method, path, body) {
  const headers = { "x-asyncgrpo-actor": "dashboard" };
  if (token()) headers["Authorization"] = "Bearer " + token();
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const r = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const data = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(data.message || ("HTTP " + r.status));
  return data;
}

function runPath(runId) { return "/v1/runs/" + runId.split("/").map(encodeURIComponent).join("/"); }

async function loadRuns() {
  const runs = await api("GET", "/v1/runs");
  const sel = $("run");
  const keep = sel.value;
  sel.innerHTML = "";
  for (const r of runs) {
    const o = document.createElement("option");
    o.value = r.run_id; o.textContent = r.run_id + " (" + r.status + ")";
    sel.appendChild(o);
  }
  if (keep && runs.some((r) => r.run_id === keep)) sel.value = keep;
  return sel.value;
}

function card(k, v) { return `<div class="card"><div class="k">${k}</div><div class="v">${v}</div></div>`; }

function line(el, title, traces, ytitle) {
  Plotly.react(el, traces, { title: { text: title, font: { size: 14 } }, margin: { t: 36, r: 12, b: 40, l: 52 },
    xaxis: { title: { text: "step" } }, yaxis: { title: { text: ytitle || "" } },
    legend: { orientation: "h", x: 0, y: 1.0, yanchor: "bottom", bgcolor: "rgba(255,255,255,0.6)" } },
    { displayModeBar: false, responsive: true });
}

function draw(detail, insp) {
  const st = $("status");
  st.textContent = detail.status; st.className = "badge " + detail.status;
  $("pause").disabled = detail.status !== "running";
  $("resume").disabled = detail.status !== "paused";
  const last = insp.steps.length ? insp.steps[insp.steps.length - 1] : {};
  $("summary").innerHTML = [
    card("version", detail.version + (detail.max_steps ? " / " + detail.max_steps : "")),
    card("trainer", detail.trainer_state), card("reward (last step)", fmt(last.reward_mean)),
    card("queue depth", insp.queue_depth), card("running groups", insp.running_groups),
    card("dead letters", insp.dead_letters.count), card("stale drops", insp.counters.stale_requeued || 0),
    card("trainer tok/s", fmt(insp.trainer_tokens_per_s, 0)),
    ...Object.entries(detail.knobs).map(([k, v]) => card(k, v)),
  ].join("");
  const steps = insp.steps, x = steps.map((s) => s.version);
  const col = (k) => steps.map((s) => (s[k] === undefined ? null : s[k]));
  const reward = [{ x, y: col("reward_mean"), name: "reward (train)", mode: "lines+markers" }];
  if (steps.some((s) => s.eval_accuracy !== undefined && s.eval_accuracy !== null))
    reward.push({ x, y: col("eval_accuracy"), name: "held-out accuracy", mode: "lines+markers", connectgaps: true });
  line("plot-reward", "Reward", reward);
  line("plot-loss", "Loss, KL, clipping", [
    { x, y: col("loss"), name: "loss" }, { x, y: col("kl_ref"), name: "kl to ref" }, { x, y: col("approx_kl"), name: "approx kl" }, { x, y: col("clip_frac"), name: "clip frac" },
    { x, y: col("behav_cap_frac"), name: "behav cap frac" }, { x, y: col("entropy"), name: "entropy" }]);
  line("plot-staleness", "Staleness of trained samples", [
    { x, y: col("staleness_mean"), name: "mean" }, { x, y: col("staleness_max"), name: "max" }], "versions");
  const now = new Date();
  queueSeries.t.push(now); queueSeries.depth.push(insp.queue_depth); queueSeries.running.push(insp.running_groups);
  for (const k of Object.keys(queueSeries)) if (queueSeries[k].length > 900) queueSeries[k].shift();
  Plotly.react("plot-queue", [{ x: queueSeries.t, y: queueSeries.depth, name: "queued" },
    { x: queueSeries.t, y: queueSeries.running, name: "running" }],
    { title: { text: "Queue depth (groups)", font: { size: 14 } }, margin: { t: 36, r: 12, b: 40, l: 52 },
      legend: { orientation: "h", x: 0, y: 1.0, yanchor: "bottom" }, xaxis: { tickformat: "%H:%M:%S" } },
    { displayModeBar: false, responsive: true });
  line("plot-throughput", "Training throughput", [{ x, y: col("tokens_per_s"), name: "tokens/s" }], "tokens/s");
  const servers = detail.servers;
  Plotly.react("plot-versions", [{ type: "bar", x: servers.map((s) => s.url), y: servers.map((s) => s.weight_version),
    name: "weight version", marker: { color: servers.map((s) => (s.healthy ? "#059669" : "#dc2626")) } },
  { type: "scatter", mode: "lines", x: servers.map((s) => s.url), y: servers.map(() => detail.version), name: "trainer version" }],
  { title: { text: "Weight versions", font: { size: 14 } }, margin: { t: 36, r: 12, b: 60, l: 52 },
    legend: { orientation: "h", x: 0, y: 1.0, yanchor: "bottom" } },
  { displayModeBar: false, responsive: true });
}

function drawTables(audit, insp) {
  const esc = (s) => String(s === null || s === undefined ? "" : s).replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c]);
  $("audit").querySelector("tbody").innerHTML = audit.entries.map((e) =>
    `<tr><td>${new Date(e.at * 1000).toLocaleTimeString()}</td><td>${esc(e.who)}</td><td>${esc(e.action)}</td><td>${esc(e.key)}</td><td>${esc(JSON.stringify(e.old))} → ${esc(JSON.stringify(e.new))}</td></tr>`).join("");
  $("completions").querySelector("tbody").innerHTML = insp.completions.map((c) =>
    `<tr><td>${esc(c.group_id)}</td><td>${fmt(c.reward_mean, 2)}</td><td class="text">${esc(c.text)}</td></tr>`).join("");
}

async function refresh() {
  try {
    const runId = await loadRuns();
    if (!runId) { $("message").textContent = "no run registered yet"; return; }
    if (runId !== current) { current = runId; for (const k of Object.keys(queueSeries)) queueSeries[k] = []; }
    const p = runPath(runId);
    const [detail, insp, audit] = await Promise.all([api("GET", p), api("GET", p + "/inspect"), api("GET", p + "/audit?limit=20")]);
    draw(detail, insp);
    drawTables(audit, insp);
    document.body.dataset.version = detail.version;  // for tests: the data the page last drew
    document.body.dataset.status = detail.status;
  } catch (e) {
    $("message").textContent = e.message;
  }
}

async function act(action) {
  if (!token()) askToken();
  try {
    const r = await api("POST", runPath($("run").value) + "/" + action);
    $("message").textContent = action + ": " + r.status;
  } catch (e) {
    $("message").textContent = action + " failed: " + e.message;
  }
  refresh();
}

$("pause").addEventListener("click", () => act("pause"));
$("resume").addEventListener("click", () => act("resume"));
$("token-btn").addEventListener("click", askToken);
$("run").addEventListener("change", refresh);
// a chain, not an interval: a slow answer never piles refreshes up
async function loop() { await refresh(); setTimeout(loop, POLL_MS); }
loop();

// The shardq dashboard: polls the gateway's HTTP API every POLL_MS (topology, with each
// replicated shard's members, roles and lag from /shards; queues, metrics, stats, crons,
// one queue's dead letters), follows /events over SSE, and lets an
// operator retry dead jobs and pause or resume queues. Every API error is shown where it
// happened. Must not: keep state the page cannot rebuild from the API.

import { api, ApiError, eventsUrl, getToken, onUnauthorized, queuePath, setToken } from "./api.js";
import { Chart, formatRate } from "./chart.js";
import { bytes, clock, h, localTime, num, preview, relative, setText, show, syncChildren } from "./dom.js";

const POLL_MS = 2000;
const CRONS_EVERY_MS = 10000;
const DLQ_COUNT = 50;
const MAX_EVENTS = 200;
const RATE_WINDOW_S = 10;
const PALETTE = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#b07aa1", "#76b7b2", "#edc948",
  "#9c755f", "#ff9da7", "#6b6ecf", "#8ca252", "#bd9e39"];

const $ = (id) => document.getElementById(id);

const state = {
  live: true,
  polling: false,
  again: false,
  timer: 0,
  queues: [],
  backlog: new Map(), // queue -> {t, pending, rate}
  metrics: null, // the last {t, pushed, completed, failed}
  topoKey: "",
  crons: [],
  cronsAt: 0,
  dlqQueue: "",
  dlqChosen: false,
  eventRates: new Map(), // queue -> {completed: Map(second -> n), failed: Map(second -> n)}
  eventCounts: {},
  pendingEvents: [],
  source: null,
  sourceRetry: 0,
};

// Drawn in this order: pushed (dashed) last, so it shows when completions keep up with it.
const chart = new Chart($("chart"), [
  { key: "completed", label: "completed", cls: "s-completed" },
  { key: "failed", label: "failed", cls: "s-failed" },
  { key: "pushed", label: "pushed", cls: "s-pushed" },
]);

// -- messages -------------------------------------------------------------------------------

let noticeTimer = 0;

function notify(text, kind = "ok") {
  const box = $("notice");
  box.className = `notice ${kind}`;
  box.setAttribute("role", kind === "error" ? "alert" : "status");
  setText($("notice-text"), text);
  show(box, true);
  clearTimeout(noticeTimer);
  if (kind === "ok") noticeTimer = setTimeout(() => show(box, false), 6000);
}

function panelError(id, err) {
  const node = $(`${id}-error`);
  if (!node) return;
  setText(node, err ? `${err.status ? `HTTP ${err.status}: ` : ""}${err.message}` : "");
  show(node, Boolean(err));
}

/** Run a panel's loader; its error shows in the panel and is passed on. */
async function panel(id, load) {
  try {
    await load();
    panelError(id, null);
  } catch (err) {
    panelError(id, err);
    throw err;
  }
}

// -- polling --------------------------------------------------------------------------------

async function poll() {
  if (state.polling) {
    state.again = true;
    return;
  }
  state.polling = true;
  clearTimeout(state.timer);
  try {
    const tasks = [
      panel("nodes", loadTopology),
      panel("queues", loadQueues),
      panel("throughput", loadMetrics),
      loadStats(),
      panel("dlq", loadDlq),
    ];
    const due = state.crons.some((c) => c.next_run && c.next_run < Date.now());
    if (due || Date.now() - state.cronsAt > CRONS_EVERY_MS) tasks.push(panel("crons", loadCrons));
    else renderCrons();
    const failed = (await Promise.allSettled(tasks)).filter((r) => r.status === "rejected");
    const pill = $("conn");
    if (failed.length) {
      const err = failed[0].reason;
      pill.className = "pill bad";
      setText(pill, err.status === 401 ? "needs a token" : `error: ${err.message}`);
    } else {
      pill.className = "pill good";
      setText(pill, `updated ${clock(Date.now())}`);
    }
  } finally {
    state.polling = false;
    if (state.again) {
      state.again = false;
      poll();
    } else if (state.live) {
      state.timer = setTimeout(poll, POLL_MS);
    }
  }
}

async function loadStats() {
  const s = await api("stats", { raw: true });
  setText($("sum-ready"), num(s.ready));
  setText($("sum-processing"), num(s.processing));
  setText($("sum-delayed"), num(s.delayed));
  setText($("sum-dlq"), num(s.dlq));
  $("sum-dlq").classList.toggle("warn", s.dlq > 0);
  setText($("sum-memory"), bytes(s.memoryUsage));
}

async function loadMetrics() {
  const m = await api("metrics.json");
  const t = Date.now();
  const now = { t, pushed: m.total_pushed, completed: m.total_completed, failed: m.total_failed };
  setText($("totals"), `since the nodes started: ${num(m.total_pushed)} pushed · ${num(m.total_completed)} completed · `
    + `${num(m.total_failed)} failed · average latency ${formatRate(m.avg_latency_ms)} ms`);
  const prev = state.metrics;
  state.metrics = now;
  if (!prev) return;
  const dt = (t - prev.t) / 1000;
  // A counter that went down (a node restarted) gives no point rather than a negative one.
  if (!(dt > 0) || ["pushed", "completed", "failed"].some((k) => !(now[k] >= prev[k]))) return;
  const rate = (k) => (now[k] - prev[k]) / dt;
  const values = { pushed: rate("pushed"), completed: rate("completed"), failed: rate("failed") };
  chart.add(t, values);
  setText($("rate-pushed"), formatRate(values.pushed));
  setText($("rate-completed"), formatRate(values.completed));
  setText($("rate-failed"), formatRate(values.failed));
  setText($("sum-push-rate"), formatRate(values.pushed));
  setText($("sum-done-rate"), formatRate(values.completed));
}

// -- topology -------------------------------------------------------------------------------

/** A colour per slot owner: each node, or each shard of a replicated topology. */
function nodeColours(topo) {
  const names = topo.shards
    ? Object.keys(topo.shards).sort()
    : [...new Set([...topo.nodes.map((n) => n.name), ...topo.owners])].sort();
  return new Map(names.map((name, i) => [name, PALETTE[i % PALETTE.length]]));
}

async function loadTopology() {
  const topo = await api("topology");
  if (!topo) throw new ApiError(0, "the gateway has no topology yet");
  const colours = nodeColours(topo);
  const owned = new Map();
  for (const o of topo.owners) owned.set(o, (owned.get(o) || 0) + 1);
  const moving = Object.entries(topo.moving || {});
  const active = topo.nodes.filter((n) => n.state === "active").length;
  setText($("sum-epoch"), topo.epoch);
  setText($("sum-nodes"), active === topo.nodes.length ? active : `${active}/${topo.nodes.length}`);
  const shards = Object.keys(topo.shards || {}).length;
  setText($("nodes-meta"), `epoch ${topo.epoch} · ${topo.owners.length} slots`
    + (shards ? ` · ${shards} shard${shards > 1 ? "s" : ""}` : ""));
  show($("nodes-table"), !shards);
  show($("shards-table"), Boolean(shards));
  if (shards) await loadShards(colours);
  else syncChildren($("shards-body"), [], (r) => r.key, buildShardRow, () => {});
  syncChildren($("nodes-body"), shards ? [] : topo.nodes, (n) => n.name, buildNodeRow, (row, n) => {
    row.querySelector(".swatch").style.background = colours.get(n.name);
    setText(row.children[0].lastChild, n.name);
    setText(row.children[1], n.tcp);
    row.children[1].title = n.http ? `HTTP ${n.http}` : "";
    const badge = row.children[2].firstChild;
    setText(badge, n.state);
    badge.className = `badge ${n.state === "active" ? "good" : "warn"}`;
    const out = moving.filter(([, m]) => m.from === n.name).length;
    const into = moving.filter(([, m]) => m.to === n.name).length;
    let slots = num(owned.get(n.name) || 0);
    if (out) slots += ` (−${out} moving)`;
    if (into) slots += ` (+${into} coming)`;
    setText(row.children[3], slots);
  });
  const key = `${topo.epoch}|${topo.owners.join(",")}|${JSON.stringify(topo.moving || {})}`;
  if (key !== state.topoKey) {
    state.topoKey = key;
    drawSlotMap(topo, colours);
  }
  setText($("moving"), moving.length
    ? `${moving.length} slot${moving.length > 1 ? "s" : ""} moving: ` + moving.slice(0, 6)
      .map(([s, m]) => `${s} ${m.from}→${m.to}`).join(", ") + (moving.length > 6 ? ", …" : "")
    : "No slot is moving.");
}

// -- replicated shards: one heading row per shard, then a row per member -----------------------

const ROLE_CLASS = { primary: "good", follower: "good", learner: "warn", none: "warn", standalone: "warn" };

async function loadShards(colours) {
  const { shards } = await api("shards");
  const rows = [];
  for (const s of shards) {
    rows.push({ key: `shard:${s.name}`, shard: s });
    for (const m of s.nodes) rows.push({ key: `node:${m.name}`, shard: s, member: m });
  }
  syncChildren($("shards-body"), rows, (r) => r.key, buildShardRow, (row, r) => {
    if (r.member) updateMemberRow(row, r.shard, r.member);
    else updateShardHeading(row, r.shard, colours);
  });
}

function buildShardRow(r) {
  if (!r.member) {
    return h("tr", { class: "shard" },
      h("th", { scope: "rowgroup", colspan: "4" },
        h("span", { class: "swatch", "aria-hidden": "true" }), h("span", { class: "shard-name" }),
        " ", h("span", { class: "shard-meta muted" })));
  }
  return h("tr", { class: "member" },
    h("th", { scope: "row" }, ""), h("td", { class: "mono" }),
    h("td", { class: "c-role" }, h("span", { class: "badge" })), h("td", { class: "c-lag num" }));
}

function updateShardHeading(row, s, colours) {
  row.querySelector(".swatch").style.background = colours.get(s.name) || "#999";
  setText(row.querySelector(".shard-name"), s.name);
  const parts = [`term ${s.term}`, `${num(s.slots)} slots`];
  if (s.members_in_sync !== null) parts.push(`${s.members_in_sync}/${s.members} in sync`);
  else parts.push(s.primary ? `primary ${s.primary} did not answer` : "no primary");
  if (s.quorum_lost_seconds > 0) parts.push(`no quorum for ${s.quorum_lost_seconds.toFixed(1)} s`);
  if (s.state !== "active") parts.push(s.state);
  setText(row.querySelector(".shard-meta"), parts.join(" · "));
  row.classList.toggle("degraded", s.members_in_sync === null || s.members_in_sync < s.members);
}

function updateMemberRow(row, s, m) {
  setText(row.children[0], m.name);
  setText(row.children[1], m.tcp);
  row.children[1].title = m.http ? `HTTP ${m.http}` : "";
  const badge = row.children[2].firstChild;
  const role = m.role || "unreachable";
  setText(badge, m.voter || role === "learner" ? role : `${role} (learner)`);
  const inSync = m.in_sync !== false;
  badge.className = `badge ${m.role ? (inSync ? ROLE_CLASS[m.role] || "" : "warn") : "bad"}`;
  badge.title = m.error || (m.role ? `term ${m.term}, log at ${num(m.lsn)}` : "");
  const lag = row.children[3];
  if (m.name === s.primary && m.role === "primary") {
    setText(lag, "leads");
    lag.title = `primary of ${s.name} in term ${s.term}`;
  } else if (m.lag_records === null) {
    setText(lag, "–");
    lag.title = "the primary did not say";
  } else {
    const text = `${num(m.lag_records)} rec · ${seconds(m.lag_seconds)}`;
    setText(lag, m.in_sync ? text : `not in sync · ${text}`);
    lag.title = `${num(m.lag_records)} log records behind the primary, for ${seconds(m.lag_seconds)}`;
  }
  lag.classList.toggle("warn", m.in_sync === false);
}

function seconds(s) {
  if (!(s > 0)) return "0 s";
  return s < 10 ? `${s.toFixed(1)} s` : `${num(Math.round(s))} s`;
}

function buildNodeRow() {
  return h("tr", {},
    h("th", { scope: "row" }, h("span", { class: "swatch", "aria-hidden": "true" }), ""),
    h("td", { class: "mono" }), h("td", {}, h("span", { class: "badge" })), h("td", { class: "num" }));
}

function drawSlotMap(topo, colours) {
  const NS = "http://www.w3.org/2000/svg";
  const cols = 64;
  const cell = 9;
  const rows = Math.ceil(topo.owners.length / cols);
  const svg = document.createElementNS(NS, "svg");
  svg.setAttribute("viewBox", `0 0 ${cols * cell} ${rows * cell}`);
  svg.setAttribute("role", "img");
  const counts = [...colours.keys()].map((n) => `${n}: ${topo.owners.filter((o) => o === n).length}`);
  svg.setAttribute("aria-label", `Slot map: ${topo.owners.length} slots by owner (${counts.join(", ")})`);
  const moving = topo.moving || {};
  topo.owners.forEach((owner, slot) => {
    const r = document.createElementNS(NS, "rect");
    r.setAttribute("x", (slot % cols) * cell);
    r.setAttribute("y", Math.floor(slot / cols) * cell);
    r.setAttribute("width", cell - 1);
    r.setAttribute("height", cell - 1);
    r.setAttribute("fill", colours.get(owner) || "#999");
    const t = document.createElementNS(NS, "title");
    const m = moving[String(slot)];
    t.textContent = m ? `slot ${slot}: moving ${m.from} → ${m.to}` : `slot ${slot}: ${owner}`;
    if (m) r.setAttribute("class", "moving");
    r.append(t);
    svg.append(r);
  });
  $("slotmap").replaceChildren(svg);
}

// -- queues ---------------------------------------------------------------------------------

async function loadQueues() {
  const queues = await api("queues");
  const t = Date.now();
  for (const q of queues) {
    const prev = state.backlog.get(q.name);
    const rate = prev && t > prev.t ? ((q.pending - prev.pending) * 1000) / (t - prev.t) : null;
    state.backlog.set(q.name, { t, pending: q.pending, rate });
  }
  state.queues = queues;
  renderQueues();
  renderDlqChoices();
}

function eventRate(queue, kind) {
  const byQueue = state.eventRates.get(queue);
  if (!byQueue) return 0;
  const now = Math.floor(Date.now() / 1000);
  let n = 0;
  for (const [sec, count] of byQueue[kind]) {
    if (sec <= now - RATE_WINDOW_S) byQueue[kind].delete(sec);
    else if (sec < now) n += count;
  }
  return n / (RATE_WINDOW_S - 1);
}

function renderQueues() {
  const filter = $("queue-filter").value.trim().toLowerCase();
  const shown = state.queues.filter((q) => q.name.toLowerCase().includes(filter));
  syncChildren($("queues-body"), shown, (q) => q.name, buildQueueRow, updateQueueRow, $("queue-filter"));
  const total = state.queues.length;
  setText($("queues-meta"), filter ? `${shown.length} of ${total} queues match` : `${total} queue${total === 1 ? "" : "s"}`);
  show($("queues-empty"), total === 0);
}

function buildQueueRow(q) {
  const pause = h("button", { type: "button", class: "pause", onclick: () => togglePause(q.name, pause) });
  const dead = h("button", { type: "button", class: "to-dlq", onclick: () => showDlq(q.name) }, "DLQ");
  dead.setAttribute("aria-label", `Dead letters of queue ${q.name}`);
  const cells = ["pending", "waiting", "delayed", "waiting_children", "processing", "dlq", "backlog", "done", "failed"]
    .map((k) => h("td", { class: `num c-${k}` }));
  return h("tr", {},
    h("th", { scope: "row", class: "mono" }, q.name),
    h("td", {}, h("span", { class: "badge" })),
    ...cells,
    h("td", { class: "limits" }),
    h("td", { class: "actions" }, pause, dead));
}

function updateQueueRow(row, q) {
  const cell = (k) => row.querySelector(`.c-${k}`);
  for (const k of ["pending", "waiting", "delayed", "waiting_children", "processing", "dlq"]) setText(cell(k), num(q[k]));
  cell("dlq").classList.toggle("warn", q.dlq > 0);
  const badge = row.children[1].firstChild;
  setText(badge, q.paused ? "paused" : "running");
  badge.className = `badge ${q.paused ? "warn" : "good"}`;
  const b = state.backlog.get(q.name);
  const rate = b ? b.rate : null;
  setText(cell("backlog"), rate === null ? "–" : `${rate > 0 ? "+" : rate < 0 ? "−" : ""}${formatRate(Math.abs(rate))}`);
  cell("backlog").className = `num c-backlog ${rate > 0 ? "up" : rate < 0 ? "down" : ""}`;
  setText(cell("done"), formatRate(eventRate(q.name, "completed")));
  setText(cell("failed"), formatRate(eventRate(q.name, "failed")));
  const limits = [];
  if (q.rate_limit !== null && q.rate_limit !== undefined) limits.push(`rate ${num(q.rate_limit)}/s`);
  if (q.concurrency_limit !== null && q.concurrency_limit !== undefined) limits.push(`concurrency ${num(q.concurrency_limit)}`);
  setText(row.querySelector(".limits"), limits.join(" · ") || "–");
  const pause = row.querySelector(".pause");
  setText(pause, q.paused ? "Resume" : "Pause");
  pause.setAttribute("aria-label", `${q.paused ? "Resume" : "Pause"} queue ${q.name}`);
  pause.dataset.paused = q.paused ? "true" : "false";
}

async function togglePause(queue, button) {
  const resume = button.dataset.paused === "true";
  button.disabled = true;
  try {
    await api(queuePath(queue, resume ? "/resume" : "/pause"), { method: "POST" });
    notify(`${resume ? "Resumed" : "Paused"} queue ${queue}.`);
  } catch (err) {
    notify(`Could not ${resume ? "resume" : "pause"} ${queue}: ${err.message}`, "error");
  } finally {
    button.disabled = false;
    poll();
  }
}

// -- dead letters ---------------------------------------------------------------------------

function renderDlqChoices() {
  const select = $("dlq-queue");
  if (!state.dlqChosen || !state.dlqQueue) {
    const first = state.queues.find((q) => q.dlq > 0);
    state.dlqQueue = first ? first.name : state.dlqQueue || (state.queues[0] || { name: "" }).name;
  }
  const names = state.queues.map((q) => q.name);
  const items = state.queues.map((q) => ({ name: q.name, dlq: q.dlq }));
  if (state.dlqQueue && !names.includes(state.dlqQueue)) items.push({ name: state.dlqQueue, dlq: 0 });
  if (!items.length) items.push({ name: "", dlq: 0 });
  syncChildren(select, items, (q) => q.name, (q) => h("option", { value: q.name }), (opt, q) => {
    setText(opt, q.name ? `${q.name} (${num(q.dlq)})` : "no queues");
  });
  if (select.value !== state.dlqQueue) select.value = state.dlqQueue;
}

async function loadDlq() {
  const queue = state.dlqQueue;
  const body = $("dlq-body");
  if (!queue) {
    syncChildren(body, [], (j) => j.id, null, null, $("dlq-queue"));
    show($("dlq-empty"), true);
    setText($("dlq-meta"), "");
    return;
  }
  const jobs = await api(queuePath(queue, "/dlq"), { query: { count: DLQ_COUNT } });
  if (queue !== state.dlqQueue) return; // the choice changed meanwhile
  syncChildren(body, jobs, (j) => j.id, buildDeadRow, updateDeadRow, $("dlq-retry-all"));
  show($("dlq-empty"), jobs.length === 0);
  const q = state.queues.find((x) => x.name === queue);
  const total = q ? q.dlq : jobs.length;
  setText($("dlq-meta"), total > jobs.length ? `showing ${jobs.length} of ${num(total)}` : `${num(jobs.length)} dead`);
  $("dlq-retry-all").disabled = jobs.length === 0;
}

function buildDeadRow(job) {
  const retry = h("button", { type: "button", class: "retry", onclick: () => retryDead(job.queue, job.id, retry) }, "Retry");
  retry.setAttribute("aria-label", `Retry job ${job.id}`);
  return h("tr", {},
    h("th", { scope: "row", class: "mono" }, `#${job.id}`),
    h("td", { class: "num" }), h("td", { class: "error" }), h("td", {}, h("code")), h("td", { class: "muted" }),
    h("td", {}, retry));
}

function updateDeadRow(row, job) {
  setText(row.children[1], `${job.attempts}/${job.max_attempts || "∞"}`);
  setText(row.children[2], job.error || "–");
  row.children[2].title = job.error || "";
  const data = row.children[3].firstChild;
  setText(data, preview(job.data));
  data.title = preview(job.data, 2000);
  const last = job.started_at || job.created_at;
  setText(row.children[4], last ? clock(last) : "–");
  row.children[4].title = last ? `last attempt ${localTime(last)}` : "";
}

async function retryDead(queue, id, button) {
  button.disabled = true;
  try {
    const n = await api(queuePath(queue, "/dlq/retry"), { method: "POST", body: { id } });
    if (n > 0) notify(`Job #${id} of ${queue} is waiting again.`);
    else notify(`Job #${id} was no longer in the dead-letter queue of ${queue}.`, "warn");
  } catch (err) {
    notify(`Could not retry job #${id}: ${err.message}`, "error");
    button.disabled = false;
  } finally {
    poll();
  }
}

async function retryAll() {
  const queue = state.dlqQueue;
  if (!queue) return;
  const button = $("dlq-retry-all");
  button.disabled = true;
  try {
    const n = await api(queuePath(queue, "/dlq/retry"), { method: "POST", body: {} });
    notify(`Retried ${num(n)} dead job${n === 1 ? "" : "s"} of ${queue}.`, n ? "ok" : "warn");
  } catch (err) {
    notify(`Could not retry the dead jobs of ${queue}: ${err.message}`, "error");
  } finally {
    button.disabled = false;
    poll();
  }
}

function showDlq(queue) {
  state.dlqQueue = queue;
  state.dlqChosen = true;
  renderDlqChoices();
  $("dlq-queue").focus();
  poll();
}

// -- crons ----------------------------------------------------------------------------------

async function loadCrons() {
  state.crons = await api("crons");
  state.cronsAt = Date.now();
  renderCrons();
}

function renderCrons() {
  const now = Date.now();
  syncChildren($("crons-body"), state.crons, (c) => c.name,
    () => h("tr", {}, h("th", { scope: "row", class: "mono" }), h("td", { class: "mono" }),
      h("td", {}, h("code")), h("td", {}, h("time"), h("br"), h("small", { class: "muted" }))),
    (row, c) => {
      setText(row.children[0], c.name);
      setText(row.children[1], c.queue);
      setText(row.children[2].firstChild, c.schedule);
      const [when, , rel] = row.children[3].childNodes;
      setText(when, localTime(c.next_run));
      if (c.next_run) when.setAttribute("datetime", new Date(c.next_run).toISOString());
      setText(rel, relative(c.next_run, now));
      row.children[3].title = c.next_run ? new Date(c.next_run).toString() : "";
    });
  show($("crons-empty"), state.crons.length === 0);
  setText($("crons-meta"), state.crons.length ? `${state.crons.length}` : "");
}

// -- events ---------------------------------------------------------------------------------

function connectEvents() {
  if (state.source) state.source.close();
  clearTimeout(state.sourceRetry);
  const pill = $("events-state");
  pill.className = "pill";
  setText(pill, "connecting…");
  const source = new EventSource(eventsUrl());
  state.source = source;
  source.onopen = () => {
    pill.className = "pill good";
    setText(pill, "live");
  };
  source.onmessage = (msg) => {
    try {
      state.pendingEvents.push({ at: Date.now(), ...JSON.parse(msg.data) });
    } catch {
      state.pendingEvents.push({ at: Date.now(), event: "error", error: `unreadable event: ${msg.data}` });
    }
    if (state.pendingEvents.length === 1) setTimeout(flushEvents, 150);
  };
  source.onerror = () => {
    if (source !== state.source) return;
    pill.className = "pill bad";
    if (source.readyState === EventSource.CLOSED) {
      // A refused stream (401, 4xx) is not retried by the browser: try again later.
      setText(pill, getToken() ? "closed: retrying" : "closed (token?): retrying");
      state.sourceRetry = setTimeout(connectEvents, 5000);
    } else {
      setText(pill, "reconnecting…");
    }
  };
}

function countEvent(e) {
  state.eventCounts[e.event] = (state.eventCounts[e.event] || 0) + 1;
  // Every failed attempt emits "failed" (then "retrying" or "dead"): count that one only.
  const kind = e.event === "completed" || e.event === "failed" ? e.event : null;
  if (!kind || !e.queue) return;
  let byQueue = state.eventRates.get(e.queue);
  if (!byQueue) state.eventRates.set(e.queue, (byQueue = { completed: new Map(), failed: new Map() }));
  const sec = Math.floor(e.at / 1000);
  byQueue[kind].set(sec, (byQueue[kind].get(sec) || 0) + 1);
}

function eventItem(e) {
  const job = e.job || {};
  let detail = "";
  if (e.error) detail = e.error;
  else if (e.event === "retrying") {
    detail = `attempt ${job.attempts}/${job.max_attempts || "∞"}${job.error ? ` · ${job.error}` : ""}`;
  } else if (["failed", "dead", "timeout"].includes(e.event) && job.error) detail = job.error;
  else if (e.event === "progress") detail = `${job.progress ?? 0}%${job.progress_msg ? ` ${job.progress_msg}` : ""}`;
  return h("li", { class: `ev-${e.event}` },
    h("time", { datetime: new Date(e.at).toISOString() }, clock(e.at)),
    h("span", { class: `badge ev ${e.event}` }, e.event),
    h("span", { class: "mono q" }, e.queue || ""),
    h("span", { class: "mono" }, job.id !== undefined ? `#${job.id}` : ""),
    h("span", { class: "detail" }, detail));
}

function flushEvents() {
  const batch = state.pendingEvents;
  state.pendingEvents = [];
  const list = $("events-list");
  const items = batch.slice(-MAX_EVENTS).reverse().map(eventItem);
  for (const e of batch) countEvent(e);
  list.prepend(...items);
  while (list.children.length > MAX_EVENTS) list.lastElementChild.remove();
  show($("events-empty"), list.children.length === 0);
  setText($("events-counts"), Object.entries(state.eventCounts).map(([k, n]) => `${k} ${num(n)}`).join(" · "));
}

// -- token ----------------------------------------------------------------------------------

function openTokenForm(why) {
  const form = $("token-form");
  if (why) setText($("token-why"), why);
  if (form.hidden) {
    show(form, true);
    $("token-input").value = getToken();
    $("token-input").focus();
  }
}

onUnauthorized((text) => openTokenForm(`The gateway answered “${text}”: enter an API token.`));

function wireTokenForm() {
  const form = $("token-form");
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    setToken($("token-input").value.trim());
    show(form, false);
    notify("Token saved in this browser.");
    connectEvents();
    poll();
  });
  $("token-forget").addEventListener("click", () => {
    setToken("");
    $("token-input").value = "";
    notify("Token forgotten.");
    connectEvents();
    poll();
  });
  $("token-cancel").addEventListener("click", () => show(form, false));
}

// -- controls and keys ------------------------------------------------------------------------

function setLive(live) {
  state.live = live;
  const b = $("live-toggle");
  b.setAttribute("aria-pressed", String(live));
  setText(b, live ? "Live" : "Paused");
  if (live) {
    connectEvents();
    poll();
  } else {
    clearTimeout(state.timer);
    clearTimeout(state.sourceRetry);
    if (state.source) state.source.close();
    state.source = null;
    setText($("conn"), "updates paused");
    $("conn").className = "pill";
    setText($("events-state"), "paused");
    $("events-state").className = "pill";
  }
}

/** A refresh asked for by the user: everything, crons included. */
function refreshNow() {
  state.cronsAt = 0;
  poll();
}

function typing(target) {
  return target instanceof HTMLElement &&
    (target.isContentEditable || ["INPUT", "TEXTAREA", "SELECT"].includes(target.tagName));
}

function onKey(ev) {
  if (ev.ctrlKey || ev.metaKey || ev.altKey || $("help").open) return;
  const filter = $("queue-filter");
  if (ev.key === "Escape" && ev.target === filter) {
    filter.value = "";
    renderQueues();
    filter.blur();
    return;
  }
  if (typing(ev.target)) return;
  const actions = {
    r: refreshNow,
    "/": () => filter.focus(),
    d: () => $("dlq-queue").focus(),
    e: () => $("events").focus(),
    l: () => setLive(!state.live),
    t: () => openTokenForm(""),
    "?": () => $("help").showModal(),
  };
  const action = actions[ev.key];
  if (action) {
    ev.preventDefault();
    action();
  }
}

function wire() {
  $("refresh").addEventListener("click", refreshNow);
  $("live-toggle").addEventListener("click", () => setLive(!state.live));
  $("token-open").addEventListener("click", () => openTokenForm(""));
  $("help-open").addEventListener("click", () => $("help").showModal());
  $("notice-close").addEventListener("click", () => show($("notice"), false));
  $("queue-filter").addEventListener("input", renderQueues);
  $("dlq-queue").addEventListener("change", (ev) => {
    state.dlqQueue = ev.target.value;
    state.dlqChosen = true;
    syncChildren($("dlq-body"), [], (j) => j.id, null, null);
    poll();
  });
  $("dlq-retry-all").addEventListener("click", retryAll);
  $("events-clear").addEventListener("click", () => {
    $("events-list").replaceChildren();
    state.eventCounts = {};
    setText($("events-counts"), "");
    show($("events-empty"), true);
  });
  wireTokenForm();
  document.addEventListener("keydown", onKey);
}

wire();
connectEvents();
poll();

// The phasewatch dashboard: an overview (tasks by phase, latest tasks, recent changes
// arriving live, handlers and dead letters, ingest charts, Kafka lag) and a task's
// detail view (#/task/<id>). It only reads the API, with the token when one is needed;
// all data is set as text (see dom.js).

import { ApiError, Unauthorized, getJSON, openStream, postJSON, query, setToken, token } from "./api.js";
import { drawChart } from "./chart.js";
import { byId, el, number, phaseBadge, replace, taskLink, time } from "./dom.js";

const MAX_CHANGES = 100;
const TASK_ROWS = 25;

const state = {
  config: null,
  counts: null, // the last /dashboard/phases answer, adjusted by live changes
  changes: [], // newest first
  stream: null,
  streamRetry: null,
  timers: [],
  pending: new Map(), // debounced refreshes: name -> timeout id
  running: false,
};

// ------------------------------------------------------------ start, token, errors

async function main() {
  byId("login-form").addEventListener("submit", onLogin);
  byId("signout").addEventListener("click", () => {
    setToken(null);
    showLogin("");
  });
  byId("filter-phase").addEventListener("change", () => refreshSoon("tasks", 0));
  byId("filter-type").addEventListener("input", () => refreshSoon("tasks", 300));
  byId("filters").addEventListener("submit", (event) => event.preventDefault());
  window.addEventListener("hashchange", route);
  try {
    state.config = await getJSON("/dashboard/config");
  } catch (err) {
    notice(`phasewatch does not answer: ${err.message}`, "error");
    return;
  }
  fillFilters(state.config);
  if (state.config.tokenRequired && !token()) showLogin("");
  else start();
}

function fillFilters(config) {
  const phases = byId("filter-phase");
  for (const phase of config.phases) phases.append(el("option", { value: phase }, phase));
  replace(byId("types"), config.types.map((t) => el("option", { value: t })));
}

function showLogin(message) {
  stop();
  byId("overview").hidden = true;
  byId("detail").hidden = true;
  byId("signout").hidden = true;
  byId("login").hidden = false;
  byId("login-error").textContent = message;
  byId("token").focus();
}

async function onLogin(event) {
  event.preventDefault();
  const input = byId("token");
  setToken(input.value.trim());
  input.value = "";
  try {
    await getJSON("/tasks?limit=1");
  } catch (err) {
    setToken(null);
    showLogin(err instanceof Unauthorized ? "That token was refused." : `Could not check it: ${err.message}`);
    return;
  }
  start();
}

function start() {
  state.running = true;
  byId("login").hidden = true;
  byId("signout").hidden = !state.config.tokenRequired;
  renderChanges();
  connect();
  every(5000, refreshHandlers); // with the ingest series and handler latency
  every(10000, refreshPhases);
  every(10000, refreshTasks);
  route();
  refreshHandlers();
  refreshPhases();
}

function stop() {
  state.running = false;
  for (const id of state.timers) clearInterval(id);
  state.timers = [];
  for (const id of state.pending.values()) clearTimeout(id);
  state.pending.clear();
  clearTimeout(state.streamRetry);
  if (state.stream) state.stream.close();
  state.stream = null;
  live("off", "off");
}

function every(ms, fn) {
  state.timers.push(setInterval(fn, ms));
}

// Run a refresh once, ms from now, however often it is asked for meanwhile.
function refreshSoon(name, ms) {
  if (state.pending.has(name)) return;
  state.pending.set(
    name,
    setTimeout(() => {
      state.pending.delete(name);
      ({ tasks: refreshTasks, phases: refreshPhases, handlers: refreshHandlers })[name]();
    }, ms),
  );
}

// Every API call goes through here: a refused token asks for it again, other errors
// are shown and the next refresh tries again.
async function guarded(fn) {
  if (!state.running) return;
  try {
    await fn();
  } catch (err) {
    if (err instanceof Unauthorized) {
      setToken(null);
      showLogin("The API token was refused; enter it again.");
    } else {
      notice(err instanceof ApiError ? `${err.status}: ${err.message}` : String(err.message || err), "error");
    }
  }
}

function notice(text, kind = "") {
  const node = byId("notice");
  node.textContent = text;
  node.dataset.kind = kind;
}

function live(stateName, text) {
  const node = byId("live");
  node.dataset.state = stateName;
  node.textContent = text;
}

// ------------------------------------------------------------ routing

function route() {
  if (!state.running) return;
  const hash = location.hash;
  if (hash.startsWith("#/task/")) {
    let id;
    try {
      id = decodeURIComponent(hash.slice("#/task/".length));
    } catch {
      id = hash.slice("#/task/".length);
    }
    byId("overview").hidden = true;
    byId("detail").hidden = false;
    guarded(() => showDetail(id));
  } else {
    byId("detail").hidden = true;
    byId("overview").hidden = false;
    guarded(loadTasks);
  }
}

// ------------------------------------------------------------ live changes

function connect() {
  if (!state.running) return;
  // From the newest change on; the browser resumes after the last id it got by itself
  // (Last-Event-ID) when a connection drops. A new connection (after a refusal) starts
  // at the head again, and the tables are re-read to cover what it did not see.
  const source = openStream("/changes/stream", { after: "now" });
  state.stream = source;
  live("connecting", "connecting");
  source.addEventListener("open", () => {
    live("live", "live");
    refreshSoon("tasks", 0);
    refreshSoon("phases", 0);
  });
  source.addEventListener("change", (message) => {
    let change;
    try {
      change = JSON.parse(message.data);
    } catch {
      return;
    }
    onChange(change);
  });
  source.addEventListener("error", () => {
    if (source.readyState === EventSource.CLOSED) {
      // Refused for good (a 401, a 404 from an older service): try again later.
      live("off", "live feed lost; retrying");
      state.streamRetry = setTimeout(connect, 5000);
    } else {
      live("connecting", "reconnecting");
    }
  });
}

function onChange(change) {
  state.changes.unshift(change);
  if (state.changes.length > MAX_CHANGES) state.changes.length = MAX_CHANGES;
  renderChanges();
  if (change.kind === "phase" || change.kind === undefined) adjustCounts(change);
  refreshSoon("tasks", 250);
  refreshSoon("phases", 2000);
  refreshSoon("handlers", 1000);
}

function renderChanges() {
  const list = byId("change-list");
  if (!state.changes.length) {
    replace(list, el("li", { class: "empty" }, "no phase change since this page opened"));
    return;
  }
  replace(
    list,
    state.changes.map((c) =>
      el(
        "li",
        { class: "change" },
        el("time", {}, time(c.changedAt)),
        " ",
        taskLink(String(c.taskId)),
        " ",
        el("span", { class: "type" }, c.type ?? ""),
        " ",
        phaseBadge(c.previousPhase),
        " → ",
        phaseBadge(c.phase),
      ),
    ),
  );
}

// ------------------------------------------------------------ tasks by phase

async function refreshPhases() {
  await guarded(async () => {
    state.counts = await getJSON("/dashboard/phases");
    renderCounts();
  });
}

function adjustCounts(change) {
  const counts = state.counts;
  if (!counts) return;
  const capped = new Set(counts.capped);
  const move = (phase, by) => {
    if (phase === null || phase === undefined || capped.has(phase)) return;
    if (phase in counts.phases) counts.phases[phase] = Math.max(0, counts.phases[phase] + by);
    else if (counts.other !== null) counts.other = Math.max(0, counts.other + by);
  };
  move(change.previousPhase, -1);
  move(change.phase, +1);
  if (change.previousPhase === null || change.previousPhase === undefined) counts.total += 1;
  renderCounts();
}

function renderCounts() {
  const counts = state.counts;
  const capped = new Set(counts.capped);
  const card = (phase, value, plus) =>
    el(
      "button",
      {
        type: "button",
        class: "card",
        "data-phase": phase,
        onclick: () => {
          byId("filter-phase").value = phase === "all" || phase === "other" ? "" : phase;
          refreshSoon("tasks", 0);
        },
      },
      el("span", { class: "count" }, `${number(value)}${plus ? "+" : ""}`),
      phase === "all" ? el("span", { class: "phase" }, "all tasks") : phaseBadge(phase),
    );
  const cards = [card("all", counts.total, false)];
  for (const [phase, value] of Object.entries(counts.phases)) cards.push(card(phase, value, capped.has(phase)));
  if (counts.other) cards.push(card("other", counts.other, false));
  replace(byId("phase-counts"), cards);
}

async function refreshTasks() {
  if (!byId("overview").hidden) await guarded(loadTasks);
}

async function loadTasks() {
  const params = {
    order: "desc",
    limit: TASK_ROWS,
    phase: byId("filter-phase").value,
    type: byId("filter-type").value.trim(),
  };
  const page = await getJSON(`/tasks${query(params)}`);
  const rows = page.tasks.map((task) => {
    const status = task.status && typeof task.status === "object" ? task.status : {};
    const progress = typeof status.progress === "number" ? `${number(status.progress * 100, 1)} %` : "";
    return el(
      "tr",
      {},
      el("td", {}, taskLink(String(task.id))),
      el("td", { class: "type" }, task.type ?? ""),
      el("td", {}, phaseBadge(status.phase)),
      el("td", { class: "time" }, time(status.updatedAt)),
      el("td", { class: "num" }, progress),
      el("td", { class: "error" }, status.errorMessage ?? ""),
    );
  });
  if (!rows.length) rows.push(el("tr", {}, el("td", { colspan: 6, class: "empty" }, "no task matches")));
  replace(byId("task-rows"), rows);
}

// ------------------------------------------------------------ handlers, Kafka lag

async function refreshHandlers() {
  await guarded(async () => {
    // /readyz answers 503 with the same figures while the service is not ready.
    const [status, dead, series] = await Promise.all([
      getJSON("/readyz", [200, 503]),
      getJSON("/dead-letters?limit=100"),
      getJSON("/dashboard/series"),
    ]);
    renderHandlers(status, series.handlers);
    renderSeries(series);
    renderDead(dead.deadLetters);
    renderLag(status.kafka);
    if (status.status === "not_ready") notice(`not ready: ${status.message ?? status.error ?? ""}`, "error");
  });
}

function ms(value) {
  return typeof value === "number" ? `${number(value)} ms` : "–";
}

function renderHandlers(status, latency) {
  const handlers = (status.dispatch && status.dispatch.handlers) || {};
  const rows = Object.entries(handlers).map(([name, h]) => {
    const lat = latency[name];
    return el(
      "tr",
      {},
      el("td", { class: "handler" }, name),
      el("td", { class: "num" }, number(h.delivered)),
      el("td", { class: "num" }, number(h.failures)),
      el("td", { class: "num" }, number(h.dead)),
      el("td", { class: "num" }, number(h.queued)),
      el("td", { class: "num" }, lat && lat.samples ? `${ms(lat.p50Ms)} / ${ms(lat.p95Ms)} / ${ms(lat.maxMs)}` : "–"),
    );
  });
  if (!rows.length) rows.push(el("tr", {}, el("td", { colspan: 6, class: "empty" }, "no handler configured")));
  replace(byId("handler-rows"), rows);
}

function renderDead(deadLetters) {
  const rows = deadLetters.map((d) => {
    const act = (to) => async (event) => {
      event.target.disabled = true;
      await guarded(async () => {
        const answer = await postJSON(`/dead-letters/${to}`, { handler: d.handler, seqs: [d.seq] });
        notice(`${to === "retry" ? "re-driving" : "dropped"} ${answer.moved} dead letter(s)`);
      });
      refreshSoon("handlers", 0);
    };
    return el(
      "tr",
      { "data-seq": d.seq },
      el("td", { class: "num" }, String(d.seq)),
      el("td", { class: "handler" }, d.handler),
      el("td", {}, d.taskId === null ? "" : taskLink(String(d.taskId))),
      el("td", {}, phaseBadge(d.previousPhase), " → ", phaseBadge(d.phase)),
      el("td", { class: "num" }, number(d.attempts)),
      el("td", { class: "error" }, d.error),
      el(
        "td",
        { class: "actions" },
        el("button", { type: "button", class: "retry", onclick: act("retry") }, "retry"),
        el("button", { type: "button", class: "drop", onclick: act("drop") }, "drop"),
      ),
    );
  });
  if (!rows.length) rows.push(el("tr", {}, el("td", { colspan: 7, class: "empty" }, "no dead letter")));
  replace(byId("dead-rows"), rows);
}

function renderLag(kafka) {
  const rows = kafka
    ? Object.entries(kafka.lag).map(([partition, behind]) =>
        el("tr", {}, el("td", {}, partition), el("td", { class: "num" }, number(behind))),
      )
    : [];
  if (!rows.length) {
    const text = kafka ? "no partition assigned" : "Kafka is not configured";
    rows.push(el("tr", {}, el("td", { colspan: 2, class: "empty" }, text)));
  }
  replace(byId("lag-rows"), rows);
}

// ------------------------------------------------------------ ingest charts

function renderSeries(series) {
  const opts = {
    nowMs: series.now,
    windowMs: series.windowSeconds * 1000,
    intervalMs: series.intervalSeconds * 1000,
  };
  const of = (key) => series.points.map((p) => ({ t: p.t, value: p[key] }));
  drawChart(byId("chart-events"), of("eventsPerSecond"), { ...opts, unit: "events/s" });
  drawChart(byId("chart-changes"), of("changesPerSecond"), { ...opts, unit: "changes/s" });
}

// ------------------------------------------------------------ task detail

function snapshotOf(event) {
  const body = event.body;
  if (!body || typeof body !== "object") return null;
  if (event.format === "task") return body;
  const task = body.payload && body.payload.task;
  return task && typeof task.snapshot === "object" ? task.snapshot : null;
}

async function showDetail(id) {
  byId("detail-id").textContent = id;
  byId("detail-error").textContent = "";
  replace(byId("timeline"));
  byId("detail-task").textContent = "";
  const path = `/tasks/${encodeURIComponent(id)}`;
  let task;
  let history;
  try {
    [task, history] = await Promise.all([getJSON(path), getJSON(`${path}/history`)]);
  } catch (err) {
    if (err instanceof ApiError && err.status === 404) {
      byId("detail-error").textContent = "No task with this id.";
      return;
    }
    throw err;
  }
  byId("detail-task").textContent = JSON.stringify(task, null, 2);
  const changesByEvent = new Map();
  for (const c of history.phaseChanges) {
    if (!changesByEvent.has(c.eventId)) changesByEvent.set(c.eventId, []);
    changesByEvent.get(c.eventId).push(c);
  }
  const items = history.events.map((e) => {
    const snapshot = snapshotOf(e);
    const status = snapshot && snapshot.status && typeof snapshot.status === "object" ? snapshot.status : {};
    const changes = changesByEvent.get(e.eventId) || [];
    changesByEvent.delete(e.eventId);
    return el(
      "li",
      { class: changes.length ? "event moved" : "event" },
      el(
        "div",
        { class: "event-head" },
        el("span", { class: "seq" }, `#${e.seq}`),
        " ",
        el("span", { class: "kind" }, e.event),
        " ",
        snapshot ? phaseBadge(status.phase) : null,
      ),
      el(
        "dl",
        {},
        el("dt", {}, "source"),
        el("dd", { class: "source" }, e.source),
        el("dt", {}, "received"),
        el("dd", { class: "received" }, time(e.receivedAt)),
        el("dt", {}, "snapshot"),
        el("dd", { class: "snapshot-time" }, snapshot ? time(status.updatedAt) : "–"),
        el("dt", {}, "event id"),
        el("dd", { class: "event-id" }, e.eventId),
        e.bodyError ? [el("dt", {}, "body"), el("dd", { class: "error" }, e.bodyError)] : null,
      ),
      changes.map((c) =>
        el("p", { class: "phase-change" }, "phase change: ", phaseBadge(c.previousPhase), " → ", phaseBadge(c.phase), ` at ${time(c.changedAt)}`),
      ),
    );
  });
  // Changes whose event is not listed (should not happen): shown rather than lost.
  for (const changes of changesByEvent.values()) {
    for (const c of changes) {
      items.push(el("li", { class: "event moved" }, el("p", { class: "phase-change" }, "phase change: ", phaseBadge(c.previousPhase), " → ", phaseBadge(c.phase), ` at ${time(c.changedAt)}`)));
    }
  }
  replace(byId("timeline"), items);
}

main();

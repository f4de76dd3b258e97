// The alignd operator dashboard: policy versions (promote, roll back), the canary's live test (its figures over
// time and its decision; promote, reject or stop it), training runs (start, cancel, progress and per-iteration plots),
// feedback volume by kind, and plugins. Every call sends the admin key as a bearer token.
// An endpoint this server lacks (an older version) leaves a plain note in its section; the others still work.
import { ApiError, h, jsonStore, requestJSON } from "./api.js";
import { lineChart, stackedBars } from "./chart.js";

const session = jsonStore(window.sessionStorage); // the admin key lives as long as the tab
const KEY = "alignd.adminKey";
const POLL_MS = 3000; // while a run is in progress
const RUNS_PLOTTED = 6;

const $ = (id) => document.getElementById(id);
let pollTimer = null;
let running = new Set(); // runs seen running, to say when one finishes

function adminKey() {
  return session.get(KEY, "");
}

async function api(path, options = {}) {
  const key = adminKey();
  try {
    return await requestJSON(path, { ...options, key });
  } catch (err) {
    // A refusal of a key the operator has since replaced (a late answer to the wrong key's load) must not hide the
    // panels that the right key just opened.
    if (err instanceof ApiError && err.status === 401 && key === adminKey()) {
      showLogin(`That key was not accepted: ${err.plain.detail || err.plain.text}`);
    }
    throw err;
  }
}

/** A plain sentence for a failed call; `what` names the feature ("policy versions"). */
function explain(err, what) {
  if (!(err instanceof ApiError)) return `Could not show ${what}: ${err.message || err}`;
  if (err.status === 404 || err.status === 405) {
    return `This server does not offer ${what} (the endpoint is missing: it may be an older version of alignd).`;
  }
  if (err.status === 403) return `${err.plain.text} ${err.plain.detail}`.trim();
  return err.plain.detail ? `${err.plain.text} The server said: ${err.plain.detail}` : err.plain.text;
}

function note(id, text, kind = "") {
  const el = $(id);
  el.textContent = text || "";
  el.className = `note ${kind}`;
}

function when(iso) {
  if (!iso) return "—";
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? iso : d.toLocaleString();
}

function figure(value, digits = 3) {
  if (typeof value !== "number" || !Number.isFinite(value)) return "—";
  return value.toFixed(digits).replace(/^-(0\.?0*)$/, "$1"); // no "-0.000"
}

function table(headers, rows) {
  return h("table", {}, h("thead", {}, h("tr", {}, ...headers.map((t) => h("th", { scope: "col" }, t)))),
    h("tbody", {}, ...rows));
}

// --- policies ----------------------------------------------------------------------------------------------------

async function loadPolicies() {
  const box = $("policies");
  try {
    const list = await api("v1/policies");
    box.replaceChildren(table(["Version", "Status", "Parent", "Run", "Created", "Promoted", "Loaded", "Reward", "KL",
      "Note", ""], list.data.map((p) => h("tr", { "data-version": String(p.version) },
      h("td", {}, h("strong", {}, String(p.version))),
      h("td", {}, h("span", { className: `status ${p.status}` }, p.status)),
      h("td", {}, p.parent === null ? "—" : String(p.parent)),
      h("td", {}, p.run_id ? p.run_id.slice(0, 16) : "—"),
      h("td", {}, when(p.created)),
      h("td", {}, when(p.promoted_at)),
      h("td", {}, p.loaded ? "yes" : "no"),
      h("td", {}, figure(p.metrics && p.metrics.reward)),
      h("td", {}, figure(p.metrics && p.metrics.kl)),
      h("td", {}, p.reason || ""),
      h("td", {}, p.status === "promoted" ? "serving" : h("button", { type: "button", className: "promote",
        onclick: () => promote(p.version) }, `Promote ${p.version}`))))));
    $("rollback").disabled = false;
    note("policies-note", `Serving version ${list.promoted}. ${list.data.length} version(s).`);
    await loadCanary(list);
  } catch (err) {
    box.replaceChildren();
    $("rollback").disabled = true;
    note("policies-note", explain(err, "policy versions"), "bad");
  }
}

async function promote(version) {
  note("policies-note", `Promoting version ${version}…`);
  try {
    const p = await api(`v1/policies/${version}/promote`, { method: "POST" });
    await loadPolicies();
    note("policies-note", `Version ${p.version} is now served.`, "ok");
  } catch (err) {
    note("policies-note", explain(err, "promotion"), "bad");
  }
}

async function rollback() {
  note("policies-note", "Rolling back…");
  try {
    const p = await api("v1/policies/rollback", { method: "POST" });
    await loadPolicies();
    note("policies-note", `Rolled back: version ${p.version} is served again.`, "ok");
  } catch (err) {
    note("policies-note", explain(err, "roll back"), "bad");
  }
}

// --- the canary's live test -------------------------------------------------------------------------------------

function pct(rate) {
  return typeof rate === "number" ? `${(rate * 100).toFixed(1)}%` : "—";
}

function bounds(pair) {
  return Array.isArray(pair) ? ` [${pct(pair[0])}, ${pct(pair[1])}]` : "";
}

/** The running canary's experiment (or the latest one that ended): share, rates with bounds, verdict, history. */
async function loadCanary(list) {
  const running = list.data.find((p) => p.status === "canary");
  const latest = running || list.data.find((p) => p.metrics && p.metrics.canary);
  $("canary-actions").replaceChildren();
  if (!latest) {
    $("canary").replaceChildren();
    lineChart($("plot-canary"), { label: "Canary figures over time", series: [], xLabel: "seconds", emptyText: "No live test yet." });
    note("canary-note", "No canary yet: a candidate that passes the gate is tested live on a share of users.");
    return;
  }
  try {
    const ev = await api(`v1/policies/${latest.version}/evaluation`);
    const live = ev.live || {};
    const canary = live.canary || {};
    const promoted = live.promoted || {};
    const decision = live.decision || live.verdict || {};
    $("canary").replaceChildren(table(["Version", "Share", "Requests", "Good rate (canary)", "Good rate (promoted)",
      "Side-by-side win rate", "Decision"], [h("tr", { "data-canary": String(latest.version) },
      h("td", {}, h("strong", {}, String(latest.version))),
      h("td", {}, pct(live.share)),
      h("td", {}, String(canary.requests ?? "—")),
      h("td", {}, pct(canary.good_rate) + bounds(canary.good_interval)),
      h("td", {}, pct(promoted.good_rate) + bounds(promoted.good_interval)),
      h("td", {}, canary.wins + canary.losses ? `${pct(canary.win_rate)}${bounds(canary.win_interval)} (${canary.wins}–${canary.losses})` : "—"),
      h("td", {}, h("span", { className: `status ${ev.status}` }, live.decision ? live.decision.outcome : "running"),
        ` ${decision.reason || ""}`))]));
    const history = Array.isArray(live.history) ? live.history : [];
    const series = (pick) => history.map((pt) => [pt.elapsed_s, pick(pt)]).filter(([, v]) => typeof v === "number");
    lineChart($("plot-canary"), { label: "Canary figures over time", xLabel: "seconds since the start", emptyText: "No figures yet.",
      series: [{ name: "good rate, canary", points: series((pt) => pt.good_rate) },
        { name: "good rate, promoted", points: series((pt) => pt.promoted_good_rate) },
        { name: "canary good rate, low", points: series((pt) => pt.good_interval && pt.good_interval[0]) },
        { name: "win rate", points: series((pt) => pt.win_rate) },
        { name: "win rate, low", points: series((pt) => pt.win_interval && pt.win_interval[0]) }] });
    if (running) {
      const act = (what, label) => h("button", { type: "button", className: `canary-${what}`,
        onclick: () => endCanary(running.version, what) }, label);
      $("canary-actions").replaceChildren(act("promote", "Promote now"), act("reject", "Reject"), act("stop", "Stop"));
    }
    note("canary-note", running ? `Version ${running.version} answers ${pct(live.share)} of users; the test decides by itself.`
      : `The last live test (version ${latest.version}) ended: ${live.decision ? live.decision.outcome : ev.status}.`);
  } catch (err) {
    $("canary").replaceChildren();
    note("canary-note", explain(err, "the live test"), "bad");
  }
}

async function endCanary(version, what) {
  try {
    await api(`v1/policies/${version}/canary/${what}`, { method: "POST" });
    await loadPolicies();
    note("canary-note", `Canary ${version}: ${what === "promote" ? "promoted" : what === "reject" ? "rejected" : "stopped"}.`, "ok");
  } catch (err) {
    note("canary-note", explain(err, "the canary"), "bad");
  }
}

// --- training runs -----------------------------------------------------------------------------------------------

async function loadRuns() {
  const box = $("runs");
  clearTimeout(pollTimer);
  try {
    const list = await api("v1/training/runs?limit=50");
    const runs = list.data;
    box.replaceChildren(runs.length === 0 ? h("p", { className: "note" }, "No training runs yet.") :
      table(["Run", "Objective", "Status", "Phase", "Progress", "Trigger", "From → to", "Started", "Finished", "Error", ""],
        runs.map((r) => h("tr", { "data-run": r.id },
          h("td", {}, h("code", {}, r.id.slice(0, 16))),
          h("td", { className: "objective" }, objectiveOf(r)),
          h("td", {}, h("span", { className: `status ${r.status}` }, r.status)),
          h("td", {}, r.phase),
          h("td", {}, h("progress", { max: "1", value: String(r.progress), "aria-label": `Progress of run ${r.id}` }),
            ` ${Math.round(r.progress * 100)}%`),
          h("td", {}, r.trigger),
          h("td", {}, `${r.parent} → ${r.candidate ?? "…"}${r.promoted ? " (promoted)" : ""}`),
          h("td", {}, when(r.created)),
          h("td", {}, when(r.finished)),
          h("td", {}, r.error || ""),
          h("td", {}, r.status === "running" ? h("button", { type: "button", onclick: () => cancelRun(r.id) }, "Cancel") : "")))));
    plotRuns(runs);
    const finished = runs.find((r) => running.has(r.id) && r.status !== "running");
    if (finished) {
      note("training-note", `Run ${finished.id} ${finished.status}${finished.promoted ? `: version ${finished.candidate} is served`
        : finished.candidate !== null ? `: version ${finished.candidate} was not promoted` : ""}.`,
      finished.status === "succeeded" ? "ok" : "bad");
    }
    running = new Set(runs.filter((r) => r.status === "running").map((r) => r.id));
    if (running.size) pollTimer = setTimeout(refreshRunning, POLL_MS);
    return runs;
  } catch (err) {
    box.replaceChildren();
    note("training-note", explain(err, "training runs"), "bad");
    plotRuns([]);
    note("plots-note", "No training metrics to plot: the training runs could not be read.");
    return null;
  }
}

async function refreshRunning() {
  const runs = await loadRuns();
  // A run that just finished may have registered or promoted a version.
  if (runs && !runs.some((r) => r.status === "running")) loadPolicies();
}

async function startRun(e) {
  e.preventDefault();
  const body = { promote: $("run-promote").checked };
  const iterations = $("run-iterations").value;
  if (iterations) body.iterations = Number(iterations);
  $("start-run-button").disabled = true;
  try {
    const run = await api("v1/training/runs", { method: "POST", body });
    note("training-note", `Started run ${run.id}.`, "ok");
    await loadRuns();
  } catch (err) {
    const text = err.code === "run_in_progress"
      ? "A training run is already in progress: wait for it to finish, or cancel it first."
      : explain(err, "training runs");
    note("training-note", text, "bad");
  } finally {
    $("start-run-button").disabled = false;
  }
}

async function cancelRun(id) {
  try {
    await api(`v1/training/runs/${encodeURIComponent(id)}/cancel`, { method: "POST" });
    note("training-note", `Cancelling run ${id}…`);
    await loadRuns();
  } catch (err) {
    note("training-note", explain(err, "cancelling runs"), "bad");
  }
}

/** How a run optimised its policy (runs from before the objective was recorded were PPO). */
const objectiveOf = (r) => (r.config && r.config.objective) || "ppo";

/** Per-iteration reward and KL of the latest runs, and the reward model's held-out accuracy across runs. */
function plotRuns(runs) {
  const withPPO = runs.filter((r) => Array.isArray(r.metrics && r.metrics.ppo) && r.metrics.ppo.length)
    .slice(0, RUNS_PLOTTED).reverse();
  const perIteration = (field) => withPPO.map((r) => ({
    name: `${r.id.slice(0, 12)} (${objectiveOf(r)})`,
    points: r.metrics.ppo.filter((it) => typeof it[field] === "number")
      .map((it, k) => [typeof it.iteration === "number" ? it.iteration : k, it[field]]),
  })).filter((ser) => ser.points.length);
  const emptyText = runs.length ? "No figures yet." : "No training runs yet.";
  const drawn = lineChart($("plot-reward"), { label: "Mean reward per iteration", series: perIteration("reward"),
    xLabel: "iteration", emptyText })
    + lineChart($("plot-kl"), { label: "KL per iteration", series: perIteration("kl"), xLabel: "iteration", emptyText });
  const chronological = [...runs].reverse();
  const rmFigure = (pick) => chronological.map((r, k) => [k + 1, r.metrics && r.metrics.reward_model && pick(r.metrics.reward_model)])
    .filter(([, a]) => typeof a === "number");
  const interval = (end) => (rm) => Array.isArray(rm.heldout_interval) ? rm.heldout_interval[end] : undefined;
  const rm = lineChart($("plot-rm"), { label: "Reward model held-out accuracy by run, with its confidence interval",
    series: [{ name: "held-out accuracy", points: rmFigure((m) => m.heldout_accuracy) },
      { name: "interval, low", points: rmFigure(interval(0)) },
      { name: "interval, high", points: rmFigure(interval(1)) }], xLabel: "run (oldest first)", emptyText });
  note("plots-note", drawn + rm ? "One line per run (the latest six); hover a point for its value."
    : runs.length ? "The runs have no metrics to plot yet." : "Start a training run to see its figures here.");
}

// --- feedback volume and plugins ---------------------------------------------------------------------------------

const BUCKET_MS = { hour: 3600e3, day: 86400e3 };

async function loadVolume() {
  const bucket = $("volume-bucket").value;
  try {
    const stats = await api(`v1/feedback/stats?bucket=${bucket}`);
    // The server leaves empty buckets out; the chart shows every bucket from `since` to now.
    const counts = new Map(stats.data.map((b) => [Date.parse(b.start), b.counts]));
    const buckets = [];
    for (let t = Date.parse(stats.since); t <= Date.now(); t += BUCKET_MS[bucket]) {
      const d = new Date(t);
      // Hours in local time; days are UTC days, so they are labelled as such.
      buckets.push({ label: bucket === "hour" ? d.toLocaleString() : `${d.toISOString().slice(0, 10)} (UTC)`,
        short: bucket === "hour" ? `${String(d.getHours()).padStart(2, "0")}:00` : `${d.getUTCMonth() + 1}/${d.getUTCDate()}`,
        counts: counts.get(t) || {} });
    }
    stackedBars($("volume-chart"), { label: `Feedback events per ${bucket}, by kind`, buckets, kinds: stats.kinds,
      xLabel: bucket === "hour" ? "hour (local time)" : "day (UTC)" });
    const total = Object.values(stats.totals).reduce((a, b) => a + b, 0);
    note("volume-note", total ? `${total} event(s): ` + stats.kinds.map((k) => `${k} ${stats.totals[k]}`).join(" · ")
      : "No feedback in this period yet.");
  } catch (err) {
    $("volume-chart").replaceChildren();
    note("volume-note", explain(err, "feedback statistics"), "bad");
  }
}

async function loadPlugins() {
  try {
    const list = await api("v1/plugins");
    $("plugins").replaceChildren(table(["Plugin", "Status", "Origin", "Feedback kinds", "Hooks"],
      list.data.map((p) => h("tr", { "data-plugin": p.name },
        h("td", {}, h("strong", {}, p.name)),
        h("td", {}, h("span", { className: `status ${p.status === "loaded" ? "loaded" : ""}` }, p.status)),
        h("td", {}, p.origin),
        h("td", {}, p.kinds.join(", ") || "—"),
        h("td", {}, p.hooks.join(", ") || "—")))));
    note("plugins-note", `${list.data.filter((p) => p.status === "loaded").length} loaded.`);
  } catch (err) {
    $("plugins").replaceChildren();
    note("plugins-note", explain(err, "the plugin list"), "bad");
  }
}

// --- page --------------------------------------------------------------------------------------------------------

function showLogin(message) {
  clearTimeout(pollTimer);
  $("panels").hidden = true;
  $("refresh").hidden = true;
  $("sign-out").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message || "";
  $("admin-key").focus();
}

let loadGeneration = 0;

async function loadAll() {
  // A load that a newer one overtook (a refused key, then the right one) must not mark the page loaded.
  const generation = ++loadGeneration;
  delete document.body.dataset.loaded;
  document.querySelectorAll(".note[id]").forEach((el) => note(el.id, ""));
  $("login").hidden = true;
  $("panels").hidden = false;
  $("refresh").hidden = false;
  $("sign-out").hidden = false;
  await Promise.allSettled([loadPolicies(), loadRuns(), loadVolume(), loadPlugins()]);
  if (generation === loadGeneration) document.body.dataset.loaded = "true"; // for tests and scripts: every section has answered
}

function init() {
  $("login-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const key = $("admin-key").value.trim();
    if (!key) {
      $("login-error").textContent = "Enter the admin key first.";
      return;
    }
    session.set(KEY, key);
    loadAll();
  });
  $("sign-out").addEventListener("click", () => { session.remove(KEY); showLogin(""); });
  $("refresh").addEventListener("click", loadAll);
  $("rollback").addEventListener("click", rollback);
  $("start-run").addEventListener("submit", startRun);
  $("volume-bucket").addEventListener("change", loadVolume);
  if (adminKey()) loadAll();
  else showLogin("");
}

init();

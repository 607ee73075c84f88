// celeriac dashboard (docs/dashboard.md): one module, no framework, no build step.
// Every read and action goes through the public JSON API; the key lives in an HttpOnly
// cookie that the service accepts only with the X-Celeriac-UI header (CSRF-safe).

const REFRESH_MS = 5000;
const STATUSES = ["waiting", "queued", "scheduled", "running", "retrying", "succeeded", "failed", "cancelled", "expired"];
const PENDING = ["waiting", "queued", "scheduled", "running", "retrying"];
const main = document.getElementById("main");
const flash = document.getElementById("flash");
const who = document.getElementById("who");
let session = null; // {auth, key_id, scopes, can_act}
let timer = null;

// ---- helpers ------------------------------------------------------------------------

const escapes = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
function esc(value) {
  return String(value ?? "").replace(/[&<>"']/g, (c) => escapes[c]);
}
// Tagged template: every interpolated value is escaped unless wrapped with raw().
class Raw { constructor(html) { this.html = html; } }
const raw = (html) => new Raw(html);
function html(strings, ...values) {
  let out = strings[0];
  values.forEach((v, i) => {
    const text = Array.isArray(v) ? v.map((x) => (x instanceof Raw ? x.html : esc(x))).join("")
      : v instanceof Raw ? v.html : esc(v);
    out += text + strings[i + 1];
  });
  return raw(out);
}

class ApiError extends Error {
  constructor(status, problem) {
    super(problem?.detail || problem?.title || `HTTP ${status}`);
    this.status = status;
    this.problem = problem;
  }
}

async function api(method, path, body) {
  const init = { method, headers: { "X-Celeriac-UI": "1", Accept: "application/json" }, credentials: "same-origin" };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  const text = await response.text();
  const data = text ? JSON.parse(text) : null;
  if (!response.ok) throw new ApiError(response.status, data);
  return data;
}

function say(message, kind = "ok") {
  flash.innerHTML = html`<p class="msg ${kind}">${message}</p>`.html;
}
function clearFlash() { flash.textContent = ""; }

function when(iso) {
  if (!iso) return "—";
  const d = new Date(iso);
  return d.toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z");
}
function age(seconds) {
  if (seconds === null || seconds === undefined) return "—";
  if (seconds < 60) return `${seconds.toFixed(1)} s`;
  if (seconds < 3600) return `${(seconds / 60).toFixed(1)} min`;
  return `${(seconds / 3600).toFixed(1)} h`;
}
const statusBadge = (s) => html`<span class="status ${s}">${s}</span>`;
const pretty = (v) => JSON.stringify(v, null, 2);

// Action buttons: disabled, saying why, for a key without the admin scope.
function actButton(label, attrs, kind = "") {
  const allowed = session?.can_act;
  const title = allowed ? "" : "needs an API key with the admin scope";
  return html`<button type="button" class="${kind}" ${raw(attrs)} ${allowed ? "" : raw("disabled")} title="${title}">${label}</button>`;
}

// ---- routing ------------------------------------------------------------------------

function route() {
  const hash = location.hash.slice(1) || "/";
  const [path, query = ""] = hash.split("?");
  const params = new URLSearchParams(query);
  const parts = path.split("/").filter(Boolean);
  if (parts[0] === "jobs" && parts[1]) return { view: "job", id: decodeURIComponent(parts[1]), params };
  if (parts[0] === "jobs") return { view: "jobs", params };
  if (parts[0] === "workers") return { view: "workers", params };
  if (parts[0] === "schedules") return { view: "schedules", params };
  return { view: "overview", params };
}

const VIEWS = { overview: showOverview, jobs: showJobs, job: showJob, workers: showWorkers, schedules: showSchedules };

async function render(options = {}) {
  clearTimeout(timer);
  const current = route();
  for (const link of document.querySelectorAll("[data-nav]")) {
    const active = link.dataset.nav === (current.view === "job" ? "jobs" : current.view);
    if (active) link.setAttribute("aria-current", "page"); else link.removeAttribute("aria-current");
  }
  if (!options.quiet) clearFlash();
  try {
    if (!session) await loadSession();
    if (!session) return;
    const live = await VIEWS[current.view](current, options);
    if (live && !document.hidden) timer = setTimeout(() => render({ quiet: true, refresh: true }), REFRESH_MS);
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) {
      session = null;
      showLogin("Your key was not accepted; log in again.");
      return;
    }
    say(error.message, "error");
  }
}

// ---- session ------------------------------------------------------------------------

async function loadSession() {
  try {
    session = await api("GET", "/ui/session");
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) {
      session = null;
      showLogin();
      return;
    }
    throw error;
  }
  const scopes = session.scopes.join(", ");
  who.innerHTML = session.auth
    ? html`<span>key ${session.key_id} · ${scopes}</span><button type="button" class="secondary" id="logout">Log out</button>`.html
    : html`<span>no API keys configured (loopback)</span>`.html;
  document.getElementById("logout")?.addEventListener("click", async () => {
    await api("POST", "/ui/logout");
    session = null;
    who.textContent = "";
    showLogin("Logged out.");
  });
}

function showLogin(message = "") {
  main.innerHTML = html`
    <section class="login" aria-labelledby="login-title">
      <h1 id="login-title">Log in</h1>
      <p class="muted">This service requires an API key. It is kept in an HttpOnly cookie for this browser only, never in the page or its address.</p>
      ${message ? html`<p role="alert">${message}</p>` : ""}
      <form class="stack" id="login-form">
        <label>API key <input type="password" name="key" autocomplete="current-password" required></label>
        <button type="submit">Log in</button>
      </form>
    </section>`.html;
  const form = document.getElementById("login-form");
  form.key.focus();
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
      await api("POST", "/ui/login", { key: form.key.value });
      form.key.value = "";
      await loadSession();
      render();
    } catch (error) {
      showLogin(error.message);
    }
  });
}

// ---- overview -----------------------------------------------------------------------

async function showOverview() {
  const [data, limits] = await Promise.all([
    api("GET", "/ui/overview"),
    api("GET", "/limits").catch(() => ({ limits: [] })),
  ]);
  const rows = data.queues.map((q) => {
    const c = q.counts;
    const n = (s) => c[s] ?? 0;
    const failRate = n("succeeded") + n("failed") ? (100 * n("failed")) / (n("succeeded") + n("failed")) : 0;
    const pause = q.paused
      ? actButton("Resume", `data-queue="${esc(q.name)}" data-paused="false"`, "secondary")
      : actButton("Pause", `data-queue="${esc(q.name)}" data-paused="true"`, "secondary");
    return html`<tr>
      <th scope="row"><a href="#/jobs?queue=${encodeURIComponent(q.name)}">${q.name}</a></th>
      ${["queued", "running", "scheduled", "retrying", "failed"].map((s) =>
        html`<td class="num"><a href="#/jobs?queue=${encodeURIComponent(q.name)}&status=${s}">${n(s)}</a></td>`)}
      <td class="num">${age(q.oldest_queued_age_seconds)}</td>
      <td class="num hide-narrow">${failRate.toFixed(1)} %</td>
      <td>${q.paused ? "paused" : "active"} ${pause}</td>
    </tr>`;
  });
  main.innerHTML = html`
    <h1>Overview</h1>
    <div class="table-wrap"><table>
      <caption class="muted">Queues (counts refreshed every few seconds)</caption>
      <thead><tr><th scope="col">queue</th><th class="num" scope="col">queued</th><th class="num" scope="col">running</th>
        <th class="num" scope="col">scheduled</th><th class="num" scope="col">retrying</th><th class="num" scope="col">failed</th>
        <th class="num" scope="col">oldest waiting</th><th class="num hide-narrow" scope="col">failure rate</th><th scope="col">state</th></tr></thead>
      <tbody>${rows.length ? rows : html`<tr><td colspan="9" class="muted">No jobs yet.</td></tr>`}</tbody>
    </table></div>
    <h2 id="chart-title">Finished in the last hour (per 5 minutes)</h2>
    ${chart(data.throughput)}
    ${limitsTable(limits.limits ?? [])}`.html;
  for (const button of main.querySelectorAll("button[data-queue]")) {
    button.addEventListener("click", async () => {
      const paused = button.dataset.paused === "true";
      await act(() => api("PATCH", `/queues/${encodeURIComponent(button.dataset.queue)}`, { paused }),
        `Queue ${button.dataset.queue} ${paused ? "paused" : "resumed"}.`);
    });
  }
  return true;
}

function limitsTable(limits) {
  if (!limits.length) return "";
  const rate = (r) => (r ? `${r.limit} per ${r.period} s` : "—");
  return html`<h2>Limits</h2><div class="table-wrap"><table>
    <caption class="muted">Named limits (docs/flow-control.md); a pattern gives its defaults to every matching name</caption>
    <thead><tr><th scope="col">name</th><th class="num" scope="col">max running</th><th scope="col">rate</th><th class="num" scope="col">running now</th></tr></thead>
    <tbody>${limits.map((l) => html`<tr><th scope="row" class="mono">${l.name}</th><td class="num">${l.max_running ?? "—"}</td>
      <td>${rate(l.rate)}</td><td class="num">${l.pattern ? "per name" : l.running}</td></tr>`)}</tbody></table></div>`;
}

function chart(throughput) {
  const buckets = 12;
  const ok = new Array(buckets).fill(0);
  const bad = new Array(buckets).fill(0);
  for (const s of throughput.series) {
    s.succeeded.forEach((v, i) => { ok[i] += v; });
    s.failed.forEach((v, i) => { bad[i] += v; });
  }
  const top = Math.max(1, ...ok.map((v, i) => v + bad[i]));
  const width = 600, height = 160, gap = 6, barWidth = (width - gap * (buckets + 1)) / buckets;
  const start = new Date(throughput.start).getTime();
  const bars = ok.map((v, i) => {
    const x = gap + i * (barWidth + gap);
    const hOk = (v / top) * (height - 20), hBad = (bad[i] / top) * (height - 20);
    const label = new Date(start + i * throughput.bucket_seconds * 1000).toISOString().slice(11, 16);
    return html`<g><title>${label} UTC: ${v} succeeded, ${bad[i]} failed</title>
      <rect x="${x}" y="${height - 14 - hOk}" width="${barWidth}" height="${hOk}" fill="#2e7d32"></rect>
      <rect x="${x}" y="${height - 14 - hOk - hBad}" width="${barWidth}" height="${hBad}" fill="#b3261e"></rect>
      <text x="${x + barWidth / 2}" y="${height - 2}" font-size="9" text-anchor="middle" fill="#5b6770">${label}</text></g>`;
  });
  const total = ok.reduce((a, b) => a + b, 0), failed = bad.reduce((a, b) => a + b, 0);
  return html`<figure class="chart" aria-labelledby="chart-title">
    <svg viewBox="0 0 ${width} ${height}" role="img" aria-label="${total} succeeded and ${failed} failed in the last hour">${bars}</svg>
    <figcaption class="legend"><span><span class="swatch ok"></span>succeeded ${total}</span>
      <span><span class="swatch bad"></span>failed, cancelled or expired ${failed}</span></figcaption>
  </figure>`;
}

// ---- jobs ---------------------------------------------------------------------------

const FILTERS = ["status", "queue", "task", "created_after", "created_before", "id_prefix"];

async function showJobs({ params }) {
  const query = new URLSearchParams();
  for (const name of [...FILTERS, "cursor"]) if (params.get(name)) query.set(name, params.get(name));
  query.set("limit", "50");
  const page = await api("GET", `/jobs?${query}`);
  const value = (name) => esc(params.get(name) ?? "");
  const rows = page.jobs.map((j) => html`<tr>
    <td class="mono"><a href="#/jobs/${j.id}">${j.id}</a></td><td>${j.task}</td><td>${j.queue}</td>
    <td>${statusBadge(j.status)}</td><td class="num">${j.attempt}</td>
    <td class="hide-narrow">${when(j.created_at)}</td><td class="hide-narrow">${when(j.finished_at)}</td></tr>`);
  const next = new URLSearchParams(params);
  next.set("cursor", page.next_cursor ?? "");
  main.innerHTML = html`
    <h1>Jobs</h1>
    <form class="filters" id="filters" role="search" aria-label="Filter jobs">
      <div class="field"><label for="f-status">Status</label><select id="f-status" name="status"><option value="">any</option>
        ${STATUSES.map((s) => html`<option ${params.get("status") === s ? raw("selected") : ""}>${s}</option>`)}</select></div>
      <div class="field"><label for="f-queue">Queue</label><input id="f-queue" name="queue" value="${raw(value("queue"))}"></div>
      <div class="field"><label for="f-task">Task</label><input id="f-task" name="task" value="${raw(value("task"))}"></div>
      <div class="field"><label for="f-after">Created after</label><input id="f-after" name="created_after" type="datetime-local" step="1" value="${raw(local(params.get("created_after")))}"></div>
      <div class="field"><label for="f-before">Created before</label><input id="f-before" name="created_before" type="datetime-local" step="1" value="${raw(local(params.get("created_before")))}"></div>
      <div class="field"><label for="f-prefix">Id starts with</label><input id="f-prefix" name="id_prefix" value="${raw(value("id_prefix"))}" pattern="[0-9a-f-]{1,36}"></div>
      <button type="submit">Filter</button>
    </form>
    <div class="actions" aria-label="Bulk actions">
      <span class="muted">All jobs matching status, queue and task:</span>
      ${actButton("Retry all", 'data-bulk="retry"', "secondary")}
      ${actButton("Cancel all", 'data-bulk="cancel"', "secondary")}
      ${actButton("Delete all", 'data-bulk="delete"', "danger")}
    </div>
    <div class="table-wrap"><table>
      <thead><tr><th scope="col">id</th><th scope="col">task</th><th scope="col">queue</th><th scope="col">status</th>
        <th class="num" scope="col">attempt</th><th class="hide-narrow" scope="col">created</th><th class="hide-narrow" scope="col">finished</th></tr></thead>
      <tbody>${rows.length ? rows : html`<tr><td colspan="7" class="muted">No jobs match.</td></tr>`}</tbody>
    </table></div>
    <div class="actions">${page.next_cursor ? html`<a href="#/jobs?${next}">Next page →</a>` : ""}</div>`.html;
  const form = document.getElementById("filters");
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const chosen = new URLSearchParams();
    for (const name of FILTERS) {
      let v = form.elements[name].value.trim();
      if (v && name.startsWith("created_")) v = new Date(`${v}Z`).toISOString();
      if (v) chosen.set(name, v);
    }
    location.hash = `#/jobs?${chosen}`;
  });
  for (const button of main.querySelectorAll("button[data-bulk]")) {
    button.addEventListener("click", () => bulk(button.dataset.bulk, params));
  }
  return !params.get("cursor");
}

function local(iso) {
  return iso ? esc(new Date(iso).toISOString().slice(0, 19)) : "";
}

async function bulk(action, params) {
  const filter = {};
  for (const name of ["status", "queue", "task"]) if (params.get(name)) filter[name] = params.get(name);
  const described = Object.entries(filter).map(([k, v]) => `${k} = ${v}`).join(", ") || "every job it applies to";
  if (!confirm(`${action} all jobs where ${described}? This cannot be undone.`)) return;
  await act(async () => {
    const result = await api("POST", "/jobs/bulk", { action, filter });
    return `${action}: ${result.matched} matched, ${result.changed} changed.`;
  });
}

async function act(work, message) {
  try {
    const said = await work();
    say(typeof said === "string" ? said : message);
    await render({ quiet: true });
  } catch (error) {
    if (error instanceof ApiError && error.status === 403) say(`Refused: ${error.message}`, "error");
    else say(error.message, "error");
  }
}

async function showJob({ id }) {
  const path = `/jobs/${encodeURIComponent(id)}`;
  const [job, logs, deliveries] = await Promise.all([
    api("GET", path),
    api("GET", `${path}/logs`).catch(() => ({ attempts: [] })),
    api("GET", `${path}/deliveries`).catch(() => ({ deliveries: [] })),
  ]);
  const result = job.result_stored
    ? html`<p><a href="${path}/result">the stored result</a> (in the result store)</p>`
    : html`<pre>${pretty(job.result)}</pre>`;
  const attempts = logs.attempts.map((a) => html`<section class="card">
      <h3>Attempt ${a.attempt} · ${statusBadge(a.outcome)}</h3>
      <p class="muted">worker ${a.worker ?? "—"} · reported ${when(a.created_at)}</p>
      <pre>${a.logs}</pre></section>`);
  const list = deliveries.deliveries ?? [];
  main.innerHTML = html`
    <h1>Job <span class="mono">${job.id}</span></h1>
    <div class="actions">
      ${actButton("Retry", 'data-act="retry"')}
      ${actButton("Cancel", 'data-act="cancel"', "secondary")}
      <a href="#/jobs?task=${encodeURIComponent(job.task)}">other ${job.task} jobs</a>
    </div>
    <div class="cards">
      <section class="card"><dl class="facts">
        <dt>status</dt><dd>${statusBadge(job.status)}${job.cancel_requested ? " (cancel requested)" : ""}</dd>
        <dt>task</dt><dd>${job.task}</dd><dt>queue</dt><dd>${job.queue}</dd>
        <dt>priority</dt><dd>${job.priority}</dd>
        <dt>attempt</dt><dd>${job.attempt} of ${job.max_retries + 1}</dd>
        <dt>worker</dt><dd>${job.worker ?? "—"}</dd>
      </dl></section>
      <section class="card"><dl class="facts">
        <dt>created</dt><dd>${when(job.created_at)}</dd><dt>run at</dt><dd>${when(job.run_at)}</dd>
        <dt>started</dt><dd>${when(job.started_at)}</dd><dt>finished</dt><dd>${when(job.finished_at)}</dd>
        <dt>expires</dt><dd>${when(job.expires_at)}</dd>
        <dt>progress</dt><dd>${job.progress ? pretty(job.progress) : "—"}</dd>
      </dl></section>
    </div>
    <h2>Arguments</h2>
    <pre>${pretty({ args: job.args, kwargs: job.kwargs })}</pre>
    ${job.status === "succeeded" ? html`<h2>Result</h2>${result}` : ""}
    ${job.error ? html`<h2>Error</h2><p><strong>${job.error.type}</strong>: ${job.error.message}</p>
      ${job.error.traceback ? html`<pre class="traceback">${job.error.traceback}</pre>` : ""}` : ""}
    <h2>Attempts with logs</h2>
    ${attempts.length ? html`<div class="cards">${attempts}</div>` : html`<p class="muted">No attempt sent logs.</p>`}
    <h2>Webhook deliveries</h2>
    ${list.length ? html`<div class="table-wrap"><table><thead><tr><th scope="col">event</th><th scope="col">status</th><th scope="col">attempts</th><th scope="col">url</th></tr></thead>
      <tbody>${list.map((d) => html`<tr><td>${d.event}</td><td>${d.status}</td><td class="num">${d.attempts?.length ?? d.attempt_count ?? ""}</td><td class="mono">${d.url}</td></tr>`)}</tbody></table></div>`
      : html`<p class="muted">None.</p>`}`.html;
  for (const button of main.querySelectorAll("button[data-act]")) {
    button.addEventListener("click", () => {
      const verb = button.dataset.act;
      act(() => api("POST", `${path}/${verb}`), `Job ${verb === "retry" ? "queued again" : "cancel requested"}.`);
    });
  }
  return PENDING.includes(job.status);
}

// ---- workers and schedules ------------------------------------------------------------

async function showWorkers() {
  const data = await api("GET", "/workers");
  const rows = data.workers.map((w) => html`<tr>
    <th scope="row">${w.name}</th><td>${w.hostname}</td><td class="num">${w.pid}</td><td>${w.pool}</td>
    <td class="num">${w.concurrency}</td><td>${w.queues.join(", ")}</td><td class="num">${w.running}</td>
    <td>${w.status}${w.command ? ` (${w.command})` : ""}</td><td class="hide-narrow">${when(w.last_heartbeat_at)}</td>
    <td>${actButton("Quiet", `data-worker="${esc(w.id)}" data-command="quiet"`, "secondary")}
        ${actButton("Shut down", `data-worker="${esc(w.id)}" data-command="shutdown"`, "danger")}</td></tr>`);
  main.innerHTML = html`<h1>Workers</h1>
    <div class="table-wrap"><table>
      <thead><tr><th scope="col">name</th><th scope="col">host</th><th class="num" scope="col">pid</th><th scope="col">pool</th>
        <th class="num" scope="col">concurrency</th><th scope="col">queues</th><th class="num" scope="col">jobs in hand</th>
        <th scope="col">status</th><th class="hide-narrow" scope="col">last heartbeat</th><th scope="col">actions</th></tr></thead>
      <tbody>${rows.length ? rows : html`<tr><td colspan="10" class="muted">No worker has registered.</td></tr>`}</tbody>
    </table></div>`.html;
  for (const button of main.querySelectorAll("button[data-worker]")) {
    button.addEventListener("click", () => {
      const command = button.dataset.command;
      if (command === "shutdown" && !confirm("Shut this worker down (warm: it finishes its jobs first)?")) return;
      act(() => api("POST", `/workers/${encodeURIComponent(button.dataset.worker)}/${command}`), `Sent ${command}.`);
    });
  }
  return true;
}

async function showSchedules() {
  const data = await api("GET", "/schedules");
  const rows = data.schedules.map((s) => html`<tr>
    <th scope="row">${s.name}</th><td class="mono">${s.cron ?? `every ${s.every} s`}</td><td>${s.job.task}</td>
    <td>${when(s.next_fire_at)}</td><td>${when(s.last_fired_at)}
      ${s.last_job_id ? html` (<a href="#/jobs/${s.last_job_id}">job</a>)` : ""}</td>
    <td>${s.enabled ? "active" : "paused"}</td>
    <td>${actButton(s.enabled ? "Pause" : "Resume", `data-schedule="${esc(s.name)}" data-enabled="${!s.enabled}"`, "secondary")}
        ${actButton("Trigger now", `data-trigger="${esc(s.name)}"`)}</td></tr>`);
  main.innerHTML = html`<h1>Schedules</h1>
    <div class="table-wrap"><table>
      <thead><tr><th scope="col">name</th><th scope="col">when</th><th scope="col">task</th><th scope="col">next fire</th>
        <th scope="col">last run</th><th scope="col">state</th><th scope="col">actions</th></tr></thead>
      <tbody>${rows.length ? rows : html`<tr><td colspan="7" class="muted">No schedules.</td></tr>`}</tbody>
    </table></div>`.html;
  for (const button of main.querySelectorAll("button[data-schedule]")) {
    button.addEventListener("click", () => {
      const enabled = button.dataset.enabled === "true";
      act(() => api("PATCH", `/schedules/${encodeURIComponent(button.dataset.schedule)}`, { enabled }),
        `Schedule ${enabled ? "resumed" : "paused"}.`);
    });
  }
  for (const button of main.querySelectorAll("button[data-trigger]")) {
    button.addEventListener("click", () => act(async () => {
      const job = await api("POST", `/schedules/${encodeURIComponent(button.dataset.trigger)}/trigger`);
      return `Triggered: job ${job.id}.`;
    }));
  }
  return true;
}

window.addEventListener("hashchange", () => { render(); main.focus(); });
document.addEventListener("visibilitychange", () => { if (!document.hidden) render({ quiet: true }); });
render();

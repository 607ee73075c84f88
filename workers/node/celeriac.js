// celeriac for Node.js: a worker that runs registered handlers for jobs it leases from a
// celeriac service, and re-exports the producer Client. The protocol is in
// docs/protocol.md; this file holds everything that does not depend on the transport
// (slots, heartbeats, reports, shutdown), http.js the HTTP calls.
//
//   import { Worker } from "./celeriac.js";
//   const worker = new Worker({ server, apiKey, queues: ["default"], concurrency: 10 });
//   worker.register("math.add", async ([x, y], kwargs, ctx) => x + y);
//   process.exit(await worker.run());

import { EventEmitter } from "node:events";
import os from "node:os";
import { HttpTransport } from "./http.js";

export { CeleriacError, Client, FINISHED, HttpApi, HttpTransport } from "./http.js";

const MAX_BATCH = 1000; // the service's max_jobs per lease; also our report batch size
const MAX_REPORT_BYTES = 1_000_000; // per report call (a larger single report goes alone)
const MIN_LEASE = 0.5; // seconds: bounds on a lease length computed from expires_at,
const MAX_LEASE = 3600; // guarding against clock skew with the service
const RETRY_MS = 1000; // first back-off after a failed call; doubles up to MAX_BACKOFF_MS
const MAX_BACKOFF_MS = 30_000;
const COLD_REPORT_MS = 5000; // a cold shutdown waits this long for its release reports
// Field limits of ErrorInfo in the API; longer values would fail the whole batch.
const MAX_ERROR_TYPE = 200;
const MAX_ERROR_MESSAGE = 65_536;
const MAX_TRACEBACK = 262_144;

/** Throw from a handler to choose what happens next:
 *   throw new JobError("bad input", { retry: false })   // fail now, whatever retries are left
 *   throw new JobError("busy", { retryIn: 30 })         // retry in 30 s (if attempts remain)
 * Any other thrown value is a failure the service retries with its backoff. */
export class JobError extends Error {
  constructor(message, { type, retry = true, retryIn, cause } = {}) {
    super(message, { cause });
    this.name = type ?? "JobError";
    this.retry = retry;
    this.retryIn = retryIn;
  }
}

/** The reason `ctx.signal` aborts when the job is cancelled, its lease is lost, or the
 * worker shuts down cold; `ctx.throwIfCancelled()` throws it. */
export class Cancelled extends Error {
  constructor(message) {
    super(message);
    this.name = "Cancelled";
  }
}

/** What a handler gets as its third argument. */
class JobContext {
  #held;

  constructor(held, worker) {
    this.#held = held;
    const job = held.job;
    this.jobId = job.id;
    this.task = job.task;
    this.attempt = job.attempt;
    this.maxRetries = job.max_retries;
    this.queue = job.queue;
    this.worker = worker;
  }

  /** True once the job should stop: cancel requested, lease lost, or cold shutdown. */
  get cancelled() {
    return this.#held.cancelReason !== undefined;
  }

  /** An AbortSignal that fires when `cancelled` becomes true: pass it to fetch() etc. */
  get signal() {
    return this.#held.signal();
  }

  throwIfCancelled() {
    if (this.cancelled) throw this.#held.cancelReason;
  }

  /** Record progress; it reaches the service with the next heartbeat. */
  reportProgress(current, total = null, message = null) {
    this.#held.progress = { current, total, message };
    this.#held.progressDirty = true;
  }
}

/** One job this worker holds a lease on, from lease until its report is acknowledged. */
class HeldLease {
  constructor(job, leaseSeconds) {
    this.job = job;
    this.id = job.id;
    this.token = job.lease.token;
    this.state = "running"; // running -> reporting (report queued or in flight)
    this.lost = false; // the service re-leased or settled it: never report it
    this.released = false; // given back by a cold shutdown
    this.cancelReason = undefined;
    this.progress = undefined;
    this.progressDirty = false;
    this.controller = undefined;
    this.extended(job.lease.expires_at, leaseSeconds);
  }

  /** Beat again after a third of the lease: two beats may fail before it is lost. */
  extended(expiresAt, leaseSeconds) {
    let seconds = leaseSeconds;
    if (!seconds) {
      const left = (Date.parse(expiresAt) - Date.now()) / 1000;
      seconds = Math.min(MAX_LEASE, Math.max(MIN_LEASE, left));
    }
    this.beatEveryMs = (seconds * 1000) / 3;
    this.nextBeat = performance.now() + this.beatEveryMs;
  }

  signal() {
    this.controller ??= new AbortController();
    if (this.cancelReason !== undefined) this.controller.abort(this.cancelReason);
    return this.controller.signal;
  }

  cancel(reason) {
    if (this.cancelReason !== undefined) return;
    this.cancelReason = reason;
    this.controller?.abort(reason);
  }

  ref() {
    const ref = { id: this.id, token: this.token };
    if (this.progressDirty) {
      ref.progress = this.progress;
      this.progressDirty = false;
    }
    return ref;
  }
}

const LEVELS = { debug: 10, info: 20, warn: 30, warning: 30, error: 40 };

function consoleLogger(level = "info") {
  const threshold = LEVELS[level.toLowerCase()] ?? LEVELS.info;
  const log = (name) => (message) => {
    if (LEVELS[name] >= threshold) {
      console.error(`[${new Date().toISOString()} ${name.toUpperCase()}] celeriac: ${message}`);
    }
  };
  return { debug: log("debug"), info: log("info"), warn: log("warn"), error: log("error") };
}

function errorInfo(err) {
  const isError = err instanceof Error;
  let type = isError ? err.name : "Error"; // `throw "text"` is allowed, if unusual
  if (type === "Error" && err.constructor?.name) type = err.constructor.name;
  const info = {
    type: String(type || "Error").slice(0, MAX_ERROR_TYPE),
    message: String(isError ? err.message : err).slice(0, MAX_ERROR_MESSAGE),
  };
  if (isError && err.stack) info.traceback = err.stack.slice(-MAX_TRACEBACK);
  return info;
}

/** One Report of POST /leases/report, JSON-encoded. */
const reportJson = (held, fields) => JSON.stringify({ id: held.id, token: held.token, ...fields });

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/**
 * Leases jobs from `queues` (in priority order) with max_jobs = free slots, runs them
 * through the registered handlers at most `concurrency` at a time, heartbeats every held
 * lease in one call at a third of the lease, and reports finished jobs in batches.
 *
 * Options: server, apiKey (default $CELERIAC_SERVER_URL, $CELERIAC_API_KEY), queues,
 * concurrency, leaseSeconds (default: each job's timeout, else the service's default),
 * pollWait (long-poll seconds, also the longest a warm shutdown waits for a poll),
 * name, logLevel or logger, transport (default: an HttpTransport).
 *
 * Events: "report" ({id, task, outcome, ok, status, detail}) for every acknowledged
 * report, "lost" ({id, task, detail}) when a lease turns out to be stale.
 */
export class Worker extends EventEmitter {
  #handlers = new Map();
  #held = new Map(); // job id -> HeldLease
  #executing = 0;
  #outbox = []; // [{held, json, outcome}] waiting to be reported
  #flushScheduled = false;
  #flushing = false;
  #beating = false;
  #beatTimer = undefined;
  #beatAt = Infinity; // when #beatTimer fires
  #done = false; // run() has returned
  #waiters = [];
  #stopping = false;
  #cold = false;
  #exitCode = 0;
  #pollAbort = new AbortController();

  constructor({
    server,
    apiKey,
    queues = ["default"],
    concurrency = 10,
    leaseSeconds,
    pollWait = 10,
    name,
    logLevel,
    logger,
    transport,
  } = {}) {
    super();
    this.queues = typeof queues === "string" ? queues.split(",").map((q) => q.trim()) : queues;
    this.concurrency = Math.max(1, Math.floor(concurrency));
    this.leaseSeconds = leaseSeconds ? Number(leaseSeconds) : undefined;
    this.pollWait = Number(pollWait);
    this.name = name ?? `node-${process.pid}@${os.hostname()}`;
    this.log = logger ?? consoleLogger(logLevel ?? process.env.CELERIAC_LOG_LEVEL);
    this.transport = transport ?? new HttpTransport({ server, apiKey });
    this.stats = { leased: 0, succeeded: 0, failed: 0, released: 0, lost: 0 };
  }

  /** handler(args, kwargs, ctx) -> result (JSON-serialisable), sync or async. */
  register(task, handler) {
    if (typeof handler !== "function") throw new TypeError(`handler for ${task} is not a function`);
    this.#handlers.set(task, handler);
    return this;
  }

  /** Work until stopped; resolves with the exit status: 0 after a warm shutdown, 1 after
   * a cold one or when the service refuses this worker. With `signals` (the default) the
   * first SIGTERM/SIGINT is warm (stop leasing, finish running jobs, report them), the
   * second cold (release unfinished jobs and leave), a third abandons an open long-poll. */
  async run({ signals = true } = {}) {
    const onSignal = (name) => {
      if (this.#cold) {
        this.log.warn(`${name} again: not waiting for the open long-poll`);
        this.#pollAbort.abort(new Cancelled("shutting down"));
      } else if (this.#stopping) {
        this.log.warn(`${name} again: cold shutdown, releasing unfinished jobs`);
        this.stop({ cold: true });
      } else {
        this.log.info(`${name}: warm shutdown, finishing ${this.#executing} running jobs`);
        this.stop();
      }
    };
    if (signals) for (const name of ["SIGTERM", "SIGINT"]) process.on(name, onSignal);
    this.log.info(
      `worker ${this.name}: ${this.transport.name}, queues ${this.queues.join(",")}, ` +
        `concurrency ${this.concurrency}, tasks ${[...this.#handlers.keys()].join(", ")}`,
    );
    try {
      await this.#leaseLoop();
      while (!this.#cold && (this.#executing > 0 || this.#outbox.length || this.#flushing)) {
        await this.#nextChange();
      }
      if (this.#cold) await this.#releaseAll();
    } finally {
      this.#done = true;
      clearTimeout(this.#beatTimer);
      if (signals) for (const name of ["SIGTERM", "SIGINT"]) process.off(name, onSignal);
      await this.transport.close();
    }
    this.log.info(`worker ${this.name} stopped: ${JSON.stringify(this.stats)}`);
    return this.#cold ? 1 : this.#exitCode;
  }

  /** Stop leasing. Warm: running jobs finish and are reported. Cold: they are released
   * at once (not counted as an attempt) and their ctx.signal aborts. Either way an open
   * long-poll is let finish, and what it brings is released: a lease request abandoned
   * mid-poll could still be granted jobs, which would then wait out their lease. */
  stop({ cold = false } = {}) {
    this.#stopping = true;
    if (cold && !this.#cold) {
      this.#cold = true;
      this.#releaseRunning();
    }
    this.#notify();
  }

  // --- leasing -------------------------------------------------------------------------

  async #leaseLoop() {
    let backoff = RETRY_MS;
    while (!this.#stopping) {
      // No hoarding: ask for exactly the free slots (finished jobs awaiting their
      // report no longer take one, but at most one batch of them may pile up).
      const free = Math.min(
        this.concurrency - this.#executing,
        this.concurrency + MAX_BATCH - this.#held.size,
        MAX_BATCH,
      );
      if (free <= 0) {
        await this.#nextChange();
        // Let every job that finishes in this turn of the event loop free its slot, so
        // one lease call asks for all of them.
        await new Promise((resolve) => setImmediate(resolve));
        continue;
      }
      let jobs;
      try {
        jobs = await this.transport.lease({
          worker: this.name,
          queues: this.queues,
          maxJobs: free,
          wait: this.pollWait,
          leaseSeconds: this.leaseSeconds,
          signal: this.#pollAbort.signal,
        });
        backoff = RETRY_MS;
      } catch (err) {
        if (this.#pollAbort.signal.aborted) return;
        if (err.retryable === false) {
          // 401/403/422: wrong key, scope or settings. Retrying cannot help.
          this.log.error(`the service refuses this worker: ${err.message}`);
          this.#exitCode = 1;
          this.#stopping = true;
          return;
        }
        this.log.warn(`lease failed, retrying in ${backoff / 1000}s: ${err.message}`);
        await Promise.race([sleep(backoff), this.#nextChange()]);
        backoff = Math.min(backoff * 2, MAX_BACKOFF_MS);
        continue;
      }
      this.stats.leased += jobs.length;
      for (const job of jobs) this.#start(job);
    }
  }

  #start(job) {
    const held = new HeldLease(job, this.leaseSeconds);
    this.#held.set(job.id, held);
    this.#armBeat(held.nextBeat);
    if (this.#stopping) {
      // Leased by a poll that was in flight when the shutdown began: give it back.
      this.#queueReport(held, "released", reportJson(held, { outcome: "released" }));
      return;
    }
    this.#executing++;
    const handler = this.#handlers.get(job.task);
    const ctx = new JobContext(held, this.name);
    const run = handler
      ? new Promise((resolve) => resolve(handler(job.args, job.kwargs, ctx)))
      : Promise.reject(
          new JobError(`no handler for task ${JSON.stringify(job.task)} in this worker`, {
            type: "UnknownTask",
            retry: false,
          }),
        );
    run.then(
      (result) => this.#finished(held, () => this.#success(held, result)),
      (err) => this.#finished(held, () => this.#failure(held, err)),
    );
  }

  /** [outcome, the report as JSON]: serialised once, here, so a result that is not JSON
   * fails its own job rather than the batch it would be sent in. */
  #success(held, result) {
    try {
      return ["succeeded", reportJson(held, { outcome: "succeeded", result: result ?? null })];
    } catch (err) {
      const error = { type: "ResultNotSerializable", message: `not JSON: ${err.message}` };
      return ["failed", reportJson(held, { outcome: "failed", error, retry: false })];
    }
  }

  #failure(held, err) {
    if (held.cancelReason !== undefined) {
      const error = { type: "Cancelled", message: held.cancelReason.message };
      return ["failed", reportJson(held, { outcome: "failed", error, retry: false })];
    }
    const report = { outcome: "failed", error: errorInfo(err), retry: err?.retry !== false };
    if (typeof err?.retryIn === "number") report.retry_in = Math.max(0, err.retryIn);
    this.log.warn(
      `${held.job.task}[${held.id}] attempt ${held.job.attempt} failed: ` +
        `${report.error.type}: ${report.error.message}`,
    );
    return ["failed", reportJson(held, report)];
  }

  #finished(held, makeReport) {
    this.#executing--;
    this.#notify();
    if (held.lost || held.released) return; // nothing to say: the service moved on
    const [outcome, json] = makeReport();
    this.#queueReport(held, outcome, json);
  }

  // --- reporting -----------------------------------------------------------------------

  #queueReport(held, outcome, json) {
    held.state = "reporting";
    this.#outbox.push({ held, json, outcome });
    // After this turn of the event loop: every job that finishes in it joins the batch.
    if (!this.#flushScheduled && !this.#flushing) {
      this.#flushScheduled = true;
      setImmediate(() => this.#flush().catch((err) => this.log.error(`report: ${err.stack}`)));
    }
  }

  /** Send everything in the outbox, a batch at a time; reports that finish meanwhile go
   * in the next batch (one report call in flight at a time). */
  async #flush() {
    this.#flushScheduled = false;
    this.#flushing = true;
    let backoff = RETRY_MS;
    try {
      while (this.#outbox.length) {
        const batch = this.#takeBatch();
        let answers;
        try {
          answers = await this.transport.report(batch.map((item) => item.json));
          backoff = RETRY_MS;
        } catch (err) {
          if (err.retryable === false) {
            await this.#reportOneByOne(batch);
            continue;
          }
          this.#outbox.unshift(...batch);
          this.log.warn(
            `report of ${batch.length} jobs failed, retrying in ${backoff / 1000}s: ${err.message}`,
          );
          await sleep(backoff);
          backoff = Math.min(backoff * 2, MAX_BACKOFF_MS);
          continue;
        }
        answers.forEach((answer, i) => this.#acknowledged(batch[i], answer));
      }
    } finally {
      this.#flushing = false;
      this.#notify();
    }
  }

  #takeBatch() {
    let bytes = 0;
    let count = 0;
    for (const item of this.#outbox) {
      if (count === MAX_BATCH || (count > 0 && bytes + item.json.length > MAX_REPORT_BYTES)) break;
      bytes += item.json.length;
      count++;
    }
    return this.#outbox.splice(0, count);
  }

  /** The service refused a whole batch (e.g. 413: a result too large). Send each report
   * alone; one it still refuses becomes a failure of its job saying why, so the job does
   * not wait for its lease to expire. */
  async #reportOneByOne(batch) {
    for (let i = 0; i < batch.length; i++) {
      const item = batch[i];
      try {
        const [answer] = await this.transport.report([item.json]);
        this.#acknowledged(item, answer);
      } catch (err) {
        if (err.retryable !== false) {
          this.#outbox.unshift(...batch.slice(i)); // the flush loop retries with back-off
          return;
        }
        if (item.rejected) {
          this.log.error(`could not report job ${item.held.id}: ${err.message}`);
          this.#drop(item.held);
          continue;
        }
        const error = { type: "ReportRejected", message: err.message.slice(0, MAX_ERROR_MESSAGE) };
        item.json = reportJson(item.held, { outcome: "failed", error, retry: false });
        item.outcome = "failed";
        item.rejected = true;
        i--; // send the replacement
      }
    }
  }

  #acknowledged(item, answer) {
    const held = item.held;
    this.#drop(held);
    if (answer.ok) {
      this.stats[item.outcome]++;
    } else {
      this.stats.lost++;
      this.log.warn(`report for job ${held.id} refused (${answer.detail}): dropped`);
    }
    this.emit("report", { id: held.id, task: held.job.task, outcome: item.outcome, ...answer });
  }

  #drop(held) {
    if (this.#held.get(held.id) === held) this.#held.delete(held.id);
  }

  // --- heartbeats ----------------------------------------------------------------------

  /** One timer: it fires when the first held lease is due for a heartbeat. */
  #armBeat(at) {
    if (this.#beating || this.#done || at >= this.#beatAt) return; // #beat re-arms when done
    clearTimeout(this.#beatTimer);
    this.#beatAt = at;
    this.#beatTimer = setTimeout(() => {
      this.#beatAt = Infinity;
      this.#beat().catch((err) => this.log.error(`heartbeat: ${err.stack}`));
    }, at - performance.now());
  }

  #rearmBeat() {
    let due = Infinity;
    for (const held of this.#held.values()) if (held.nextBeat < due) due = held.nextBeat;
    if (due !== Infinity) this.#armBeat(due);
  }

  /** Extend every held lease (running, or finished with the report pending) in one call
   * per 1000, carrying progress; pass cancel requests and lost leases on to the jobs. */
  async #beat() {
    this.#beating = true;
    const all = [...this.#held.values()];
    const now = performance.now();
    // Until an answer says otherwise (or if none comes), try again soon.
    for (const held of all) held.nextBeat = now + Math.min(RETRY_MS, held.beatEveryMs);
    try {
      for (let start = 0; start < all.length; start += MAX_BATCH) {
        const chunk = all.slice(start, start + MAX_BATCH);
        let answers;
        try {
          answers = await this.transport.heartbeat(
            chunk.map((held) => held.ref()),
            this.leaseSeconds,
          );
        } catch (err) {
          for (const held of chunk) if (held.progress !== undefined) held.progressDirty = true;
          this.log.warn(`heartbeat of ${chunk.length} leases failed: ${err.message}`);
          continue;
        }
        answers.forEach((answer, i) => this.#beaten(chunk[i], answer));
      }
    } finally {
      this.#beating = false;
      this.#rearmBeat();
    }
  }

  #beaten(held, answer) {
    if (this.#held.get(held.id) !== held) return; // reported meanwhile
    if (answer.ok) {
      held.extended(answer.expires_at, this.leaseSeconds);
      if (answer.cancel_requested && held.state === "running" && held.cancelReason === undefined) {
        this.log.info(`${held.job.task}[${held.id}]: cancel requested`);
        held.cancel(new Cancelled(`job ${held.id} was cancelled`));
      }
    } else if (held.state === "running") {
      // Re-leased elsewhere or settled: stop the handler, and never report it.
      // (A job whose report is in flight is decided by that report's answer.)
      held.lost = true;
      held.cancel(new Cancelled(`lost the lease of job ${held.id} (${answer.detail})`));
      this.#drop(held);
      this.stats.lost++;
      this.log.warn(`lost the lease of ${held.job.task}[${held.id}] (${answer.detail}): dropped`);
      this.emit("lost", { id: held.id, task: held.job.task, detail: answer.detail });
    }
  }

  // --- shutdown ------------------------------------------------------------------------

  /** Cold shutdown: give every unfinished job back. */
  #releaseRunning() {
    for (const held of this.#held.values()) {
      if (held.state !== "running") continue;
      held.released = true;
      held.cancel(new Cancelled("the worker is shutting down"));
      this.#queueReport(held, "released", reportJson(held, { outcome: "released" }));
    }
  }

  /** ... and wait a little for the reports. */
  async #releaseAll() {
    this.#releaseRunning();
    const deadline = Date.now() + COLD_REPORT_MS;
    while (
      (this.#outbox.length || this.#flushing || this.#flushScheduled) &&
      Date.now() < deadline
    ) {
      await Promise.race([this.#nextChange(), sleep(100)]);
    }
  }

  #nextChange() {
    return new Promise((resolve) => this.#waiters.push(resolve));
  }

  #notify() {
    if (this.#waiters.length === 0) return;
    const waiters = this.#waiters;
    this.#waiters = [];
    for (const resolve of waiters) resolve();
  }
}

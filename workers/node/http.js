// celeriac over HTTP: the API v1 calls a worker and a producer make (docs/protocol.md).
// No dependencies: Node's built-in fetch keeps connections alive between calls.

import { randomUUID } from "node:crypto";
import { setTimeout as sleep } from "node:timers/promises";

const DEFAULT_SERVER = "http://127.0.0.1:8000";
const REQUEST_TIMEOUT_MS = 30_000;
// The Client's retries (the worker's transport has its own, in celeriac.js).
const DEFAULT_RETRIES = 5;
const DEFAULT_RETRY_BUDGET = 10; // seconds after the first attempt began: no retry later
const FIRST_WAIT_MS = 500; // then 1, 2, 4, 4 s, each shortened by up to a quarter at random
const MAX_WAIT_MS = 4000;
// "Not done, come back later", from the service or a proxy in front of it.
const RETRY_STATUS = new Set([429, 502, 503, 504]);
// The connection could not be opened: the request never left this process.
const NOT_SENT_CODES = new Set([
  "ECONNREFUSED",
  "ENOTFOUND",
  "EAI_AGAIN",
  "UND_ERR_CONNECT_TIMEOUT",
]);

/** An error from the service (`status` and the problem+json body) or from the network
 * (`status` undefined; `code` e.g. "ECONNREFUSED"). `retryable` says whether trying again
 * later may help; `notSent` that the request provably never reached the service;
 * `retryAfter` is the answer's Retry-After in seconds, if it had one. */
export class CeleriacError extends Error {
  constructor(message, { status, problem, cause, code, retryAfter } = {}) {
    super(message, { cause });
    this.name = "CeleriacError";
    this.status = status;
    this.problem = problem;
    this.code = code;
    this.retryAfter = retryAfter;
  }

  get notSent() {
    return this.status === undefined && NOT_SENT_CODES.has(this.code);
  }

  get retryable() {
    const status = this.status;
    return status === undefined || status >= 500 || status === 408 || status === 429;
  }
}

/** A base URL, an API key and one `request()`: shared by the Client and the transport. */
export class HttpApi {
  constructor({ server, apiKey } = {}) {
    this.server = (server || process.env.CELERIAC_SERVER_URL || DEFAULT_SERVER).replace(/\/+$/, "");
    this.headers = { "content-type": "application/json", accept: "application/json" };
    const key = apiKey ?? process.env.CELERIAC_API_KEY;
    if (key) this.headers.authorization = `Bearer ${key}`;
  }

  /** Send `body` (an object, or a string already JSON-encoded) and return the parsed
   * answer; throws CeleriacError for a problem response or a network failure. */
  async request(method, path, { body, headers, timeoutMs = REQUEST_TIMEOUT_MS, signal } = {}) {
    // One controller per request, not AbortSignal.any(): a long-lived `signal` would
    // collect a listener per call.
    const controller = new AbortController();
    const timer = setTimeout(
      () => controller.abort(new Error(`timed out after ${timeoutMs} ms`)),
      timeoutMs,
    );
    const onAbort = () => controller.abort(signal.reason);
    if (signal?.aborted) onAbort();
    signal?.addEventListener("abort", onAbort);
    let response;
    let text;
    try {
      response = await fetch(this.server + path, {
        method,
        headers: headers ? { ...this.headers, ...headers } : this.headers,
        body: body === undefined || typeof body === "string" ? body : JSON.stringify(body),
        signal: controller.signal,
      });
      text = await response.text();
    } catch (err) {
      const code = err.cause?.code;
      const reason = code ?? err.cause?.message ?? err.message;
      throw new CeleriacError(`${method} ${path}: ${reason}`, { cause: err, code });
    } finally {
      clearTimeout(timer);
      signal?.removeEventListener("abort", onAbort);
    }
    if (response.ok) return text ? JSON.parse(text) : null;
    let problem;
    try {
      problem = JSON.parse(text);
    } catch {
      problem = { title: response.statusText, detail: text.slice(0, 500) };
    }
    const { title = "", detail = "" } = problem;
    const message = `${method} ${path} -> ${response.status} ${title}: ${detail}`;
    const retryAfter = parseRetryAfter(response.headers.get("retry-after"));
    throw new CeleriacError(message, { status: response.status, problem, retryAfter });
  }
}

/** Retry-After as seconds from now: delay-seconds or an HTTP-date (RFC 9110 10.2.3). */
function parseRetryAfter(value) {
  if (!value) return undefined;
  if (/^\s*\d+\s*$/.test(value)) return Number(value);
  const when = Date.parse(value);
  return Number.isNaN(when) ? undefined : Math.max(0, (when - Date.now()) / 1000);
}

function envNumber(name) {
  const raw = process.env[name]?.trim();
  if (!raw) return undefined;
  const value = Number(raw);
  if (!Number.isFinite(value) || value < 0) {
    throw new Error(`${name} must be a non-negative number, not ${JSON.stringify(raw)}`);
  }
  return value;
}

/** The worker protocol over HTTP. A transport has four methods, and a Redis transport
 * (a second module, later) implements the same ones. Answers come in the order asked.
 *   lease({worker, queues, maxJobs, wait, leaseSeconds, signal}) -> [LeasedJob]
 *   heartbeat(refs: [{id, token, progress?}], leaseSeconds)
 *     -> [{id, ok, expires_at, cancel_requested, detail}]
 *   report(reports: [a Report, JSON-encoded]) -> [{id, ok, status, detail}]
 *   close()
 */
export class HttpTransport {
  constructor(options = {}) {
    this.api = options.api ?? new HttpApi(options);
    this.name = `http ${this.api.server}`;
  }

  async lease({ worker, queues, maxJobs, wait, leaseSeconds, signal }) {
    const body = { worker, queues, max_jobs: maxJobs, wait };
    if (leaseSeconds) body.lease_seconds = leaseSeconds;
    // The service holds a long-poll for up to `wait` seconds: allow for that.
    const timeoutMs = (wait + 30) * 1000;
    const answer = await this.api.request("POST", "/leases", { body, signal, timeoutMs });
    return answer.jobs;
  }

  async heartbeat(refs, leaseSeconds) {
    const body = { leases: refs };
    if (leaseSeconds) body.lease_seconds = leaseSeconds;
    const answer = await this.api.request("POST", "/leases/heartbeat", { body });
    return answer.leases;
  }

  async report(reports) {
    const body = `{"reports":[${reports.join(",")}]}`;
    const answer = await this.api.request("POST", "/leases/report", { body });
    return answer.reports;
  }

  async close() {}
}

/** A producer: submit jobs and read them back.
 *
 * A blip is retried: reads and submits when no answer came (refused, reset, timed out) and
 * on 429/502/503/504 (waiting at least the answer's Retry-After); anything else (a batch,
 * a cancel) only when the connection could not be opened, so it never reached the
 * service. Every submit carries an Idempotency-Key, the caller's or a random one that all
 * its retries share: a submit whose answer was lost gives back its job, not a second one.
 * Options: `retries` (default $CELERIAC_CLIENT_RETRIES, else 5; 0 turns retrying and the
 * automatic key off) and `retryBudget` (seconds; default $CELERIAC_CLIENT_RETRY_BUDGET,
 * else 10): no retry starts later than that after the first attempt began. */
export class Client {
  constructor(options = {}) {
    this.api = options.api ?? new HttpApi(options);
    this.retries = options.retries ?? envNumber("CELERIAC_CLIENT_RETRIES") ?? DEFAULT_RETRIES;
    this.retryBudget =
      options.retryBudget ?? envNumber("CELERIAC_CLIENT_RETRY_BUDGET") ?? DEFAULT_RETRY_BUDGET;
  }

  /** `api.request` with the retries above; `headers` are lower-case. */
  async request(method, path, options = {}) {
    const safe = method === "GET" || Boolean(options.headers?.["idempotency-key"]);
    const deadline = Date.now() + this.retryBudget * 1000;
    for (let retry = 0; ; retry += 1) {
      try {
        return await this.api.request(method, path, options);
      } catch (err) {
        const waitMs = this.#waitBefore(retry, err, safe, deadline);
        if (waitMs === undefined) throw err;
        await sleep(waitMs);
      }
    }
  }

  #waitBefore(retry, err, safe, deadline) {
    if (retry >= this.retries || !(err instanceof CeleriacError)) return undefined;
    const transient = err.status === undefined || RETRY_STATUS.has(err.status);
    if (!err.notSent && !(safe && transient)) return undefined;
    const left = deadline - Date.now();
    const asked = (err.retryAfter ?? 0) * 1000;
    if (asked > left) return undefined; // the service wants more time than we may spend
    const backoff = Math.min(MAX_WAIT_MS, FIRST_WAIT_MS * 2 ** retry) * (0.75 + Math.random() / 4);
    const waitMs = Math.min(Math.max(backoff, asked), left);
    return waitMs >= 0 ? waitMs : undefined;
  }

  /** Submit one job: `client.submit("math.add", {args: [2, 3], queue: "default"})`.
   * Options are the JobSubmit fields of the API (queue, priority, delay, run_at,
   * expires_at, max_retries, retry_backoff, timeout) plus `idempotencyKey` (default: a
   * random UUID, unless retries are off). */
  async submit(task, { idempotencyKey, ...options } = {}) {
    const key = idempotencyKey || (this.retries > 0 ? randomUUID() : undefined);
    const headers = key ? { "idempotency-key": key } : undefined;
    // Encoded once: every retry must send the very body the key was first sent with.
    const body = JSON.stringify({ task, ...options });
    return this.request("POST", "/jobs", { body, headers });
  }

  /** Submit up to 1000 jobs in one transaction: [{task, args, ...}, ...] -> [Job]. The
   * service has no Idempotency-Key for batches: a batch is sent again only when its
   * connection could not be opened; after any other network error it is unknown whether
   * it was committed. */
  async submitBatch(jobs) {
    return (await this.request("POST", "/jobs/batch", { body: { jobs } })).jobs;
  }

  /** The job now, or (with `wait` seconds, at most 60) once it finishes. */
  async get(id, { wait } = {}) {
    const query = wait ? `?wait=${wait}` : "";
    const timeoutMs = ((wait ?? 0) + 30) * 1000;
    return this.request("GET", `/jobs/${encodeURIComponent(id)}${query}`, { timeoutMs });
  }

  /** Wait up to `timeout` seconds for the job to finish; returns it whatever its state. */
  async waitFor(id, timeout = 60) {
    const deadline = Date.now() + timeout * 1000;
    for (;;) {
      const left = Math.max(0, (deadline - Date.now()) / 1000);
      const job = await this.get(id, { wait: Math.min(60, left) });
      if (FINISHED.has(job.status) || left === 0) return job;
    }
  }

  async cancel(id) {
    return this.request("POST", `/jobs/${encodeURIComponent(id)}/cancel`);
  }
}

export const FINISHED = new Set(["succeeded", "failed", "cancelled", "expired"]);

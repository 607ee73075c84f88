// celeriac over HTTP: the API v1 calls a worker and a producer make (docs/protocol.md).
// No dependencies: Node's built-in fetch keeps connections alive between calls.

const DEFAULT_SERVER = "http://127.0.0.1:8000";
const REQUEST_TIMEOUT_MS = 30_000;

/** An error from the service (`status` and the problem+json body) or from the network
 * (`status` undefined). `retryable` says whether trying again later may help. */
export class CeleriacError extends Error {
  constructor(message, { status, problem, cause } = {}) {
    super(message, { cause });
    this.name = "CeleriacError";
    this.status = status;
    this.problem = problem;
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
      const reason = err.cause?.code ?? err.cause?.message ?? err.message;
      throw new CeleriacError(`${method} ${path}: ${reason}`, { cause: err });
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
    throw new CeleriacError(message, { status: response.status, problem });
  }
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

/** A producer: submit jobs and read them back. */
export class Client {
  constructor(options = {}) {
    this.api = options.api ?? new HttpApi(options);
  }

  /** Submit one job: `client.submit("math.add", {args: [2, 3], queue: "default"})`.
   * Options are the JobSubmit fields of the API (queue, priority, delay, run_at,
   * expires_at, max_retries, retry_backoff, timeout) plus `idempotencyKey`. */
  async submit(task, { idempotencyKey, ...options } = {}) {
    const headers = idempotencyKey ? { "idempotency-key": idempotencyKey } : undefined;
    return this.api.request("POST", "/jobs", { body: { task, ...options }, headers });
  }

  /** Submit up to 1000 jobs in one transaction: [{task, args, ...}, ...] -> [Job]. */
  async submitBatch(jobs) {
    return (await this.api.request("POST", "/jobs/batch", { body: { jobs } })).jobs;
  }

  /** The job now, or (with `wait` seconds, at most 60) once it finishes. */
  async get(id, { wait } = {}) {
    const query = wait ? `?wait=${wait}` : "";
    const timeoutMs = ((wait ?? 0) + 30) * 1000;
    return this.api.request("GET", `/jobs/${encodeURIComponent(id)}${query}`, { timeoutMs });
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
    return this.api.request("POST", `/jobs/${encodeURIComponent(id)}/cancel`);
  }
}

export const FINISHED = new Set(["succeeded", "failed", "cancelled", "expired"]);

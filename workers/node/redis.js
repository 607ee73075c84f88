// The Redis transport: lease, heartbeat and settle jobs straight from Redis with the
// service's Redis worker protocol v1 (docs/protocol.md, "Redis protocol"), one FCALL per
// operation. The Worker in celeriac.js is unchanged: this module has the same four
// methods as HttpTransport. node-redis pipelines the calls made in one tick on its own.

import { createClient } from "redis";

export { createClient }; // for scripts that speak the protocol by hand (tests)

const PROTOCOL = "1";
const DEFAULT_LEASE_MS = 30_000;

export class RedisTransport {
  constructor({ url = "redis://127.0.0.1:6379/0", prefix = "celeriac" } = {}) {
    this.tag = `{${prefix}}`;
    this.events = `${this.tag}:events`;
    this.name = `redis ${url.replace(/\/\/[^@]*@/, "//")}`; // never log a password
    this.client = createClient({ url });
    // BLPOP holds its connection while it waits: give it one of its own.
    this.waiter = this.client.duplicate();
    this.ready = Promise.all([this.client.connect(), this.waiter.connect()]);
  }

  async lease({ worker, queues, maxJobs, wait, leaseSeconds }) {
    await this.ready;
    const leaseMs = String(Math.round((leaseSeconds ?? DEFAULT_LEASE_MS / 1000) * 1000));
    const ready = queues.map((queue) => `${this.tag}:ready:${queue}`);
    const call = ["FCALL", "celeriac_v1_lease", String(1 + ready.length), this.events, ...ready,
                  PROTOCOL, worker, String(maxJobs), leaseMs]; // prettier-ignore
    let answer = await this.client.sendCommand(call);
    if (answer.length === 0 && wait > 0) {
      // Nothing ready: sleep on the wake-up lists (no polling), then try once more.
      const wakes = queues.map((queue) => `${this.tag}:wake:${queue}`);
      await this.waiter.sendCommand(["BLPOP", ...wakes, String(wait)]);
      answer = await this.client.sendCommand(call);
    }
    return answer.map((text) => {
      const job = JSON.parse(text);
      const { token, deadline_ms: deadline } = job.lease;
      return { ...job, lease: { token, expires_at: new Date(deadline).toISOString() } };
    });
  }

  async heartbeat(refs, leaseSeconds) {
    await this.ready;
    const leaseMs = String(Math.round((leaseSeconds ?? DEFAULT_LEASE_MS / 1000) * 1000));
    const calls = refs.map(({ id, token, progress }) =>
      this.#call("heartbeat", id, [
        token,
        leaseMs,
        progress === undefined ? "" : JSON.stringify(progress),
      ]),
    );
    return (await Promise.allSettled(calls)).map((outcome, i) =>
      outcome.status === "fulfilled"
        ? { id: refs[i].id, ok: true, expires_at: new Date(Number(outcome.value[0])).toISOString(),
            cancel_requested: Number(outcome.value[1]) === 1 } // prettier-ignore
        : { id: refs[i].id, ok: false, detail: String(outcome.reason?.message ?? outcome.reason) },
    );
  }

  async report(reports) {
    await this.ready;
    const parsed = reports.map((json) => JSON.parse(json));
    const calls = parsed.map((r) => {
      if (r.outcome === "succeeded") {
        return this.#call("complete", r.id, [r.token, JSON.stringify(r.result ?? null)]);
      }
      if (r.outcome === "released") return this.#call("release", r.id, [r.token]);
      const retryIn = r.retry_in === undefined || r.retry_in === null ? "" : String(r.retry_in);
      return this.#call("fail", r.id, [
        r.token,
        JSON.stringify(r.error),
        r.retry === false ? "0" : "1",
        retryIn,
      ]);
    });
    return (await Promise.allSettled(calls)).map((outcome, i) =>
      outcome.status === "fulfilled"
        ? { id: parsed[i].id, ok: true, status: null, detail: null }
        : { id: parsed[i].id, ok: false, status: null, detail: staleOrError(outcome.reason) },
    );
  }

  #call(operation, id, args) {
    return this.client.sendCommand([
      "FCALL", `celeriac_v1_${operation}`, "2", this.events, `${this.tag}:job:${id}`,
      PROTOCOL, id, ...args,
    ]); // prettier-ignore
  }

  async close() {
    await Promise.allSettled([this.client.quit(), this.waiter.disconnect()]);
  }
}

function staleOrError(reason) {
  const message = String(reason?.message ?? reason);
  return message.startsWith("STALE") ? "stale-lease" : message;
}

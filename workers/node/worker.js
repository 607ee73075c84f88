// A runnable celeriac worker: `node worker.js`. It runs the same tasks as the Python
// demo app (celeriac.examples.demo), so both can serve one queue, plus a few more.
//
// Environment: CELERIAC_SERVER_URL (default http://127.0.0.1:8000), CELERIAC_API_KEY,
// CELERIAC_QUEUES (comma-separated, in priority order; default "default"),
// CELERIAC_CONCURRENCY (default 10), CELERIAC_LEASE_SECONDS (default: each job's
// timeout, else the service's default), CELERIAC_POLL_WAIT (long-poll seconds, default
// 10), CELERIAC_LOG_LEVEL (debug, info, warn, error), CELERIAC_BROKER_URL (redis://…
// to use the Redis worker protocol) and CELERIAC_REDIS_PREFIX.

import { Cancelled, JobError, Worker } from "./celeriac.js";
import { RedisTransport } from "./redis.js";

const env = process.env;
// CELERIAC_BROKER_URL=redis://…: lease straight from Redis (the Redis worker protocol);
// otherwise over HTTP from CELERIAC_SERVER_URL.
const broker = env.CELERIAC_BROKER_URL ?? "";
const transport = broker.startsWith("redis")
  ? new RedisTransport({ url: broker, prefix: env.CELERIAC_REDIS_PREFIX || "celeriac" })
  : undefined;
const worker = new Worker({
  transport,
  queues: env.CELERIAC_QUEUES || "default",
  concurrency: Number(env.CELERIAC_CONCURRENCY || 10),
  leaseSeconds: env.CELERIAC_LEASE_SECONDS ? Number(env.CELERIAC_LEASE_SECONDS) : undefined,
  pollWait: env.CELERIAC_POLL_WAIT ? Number(env.CELERIAC_POLL_WAIT) : 10,
});

/** Sleep `ms`, waking early (with Cancelled) if the job is cancelled. */
function pause(ms, signal) {
  return new Promise((resolve, reject) => {
    if (signal.aborted) return reject(signal.reason);
    const timer = setTimeout(() => {
      signal.removeEventListener("abort", onAbort);
      resolve();
    }, ms);
    const onAbort = () => {
      clearTimeout(timer);
      reject(signal.reason);
    };
    signal.addEventListener("abort", onAbort, { once: true });
  });
}

worker.register("math.add", ([x, y]) => x + y);

worker.register("text.shout", async ([text]) => {
  await pause(200, AbortSignal.timeout(1000));
  return `${text.toUpperCase()}!`;
});

// Sleeps `seconds` in `steps`, reporting progress; stops early when cancelled.
worker.register("demo.slow", async ([seconds = 3, steps = 6], kwargs, ctx) => {
  for (let step = 0; step < steps; step++) {
    ctx.reportProgress(step, steps, "working");
    await pause((seconds * 1000) / steps, ctx.signal);
  }
  ctx.reportProgress(steps, steps, "done");
  return `slept ${seconds}s`;
});

// Plain sleep: no progress, no cancellation check.
worker.register("demo.sleep", async ([seconds = 1]) => {
  await new Promise((resolve) => setTimeout(resolve, seconds * 1000));
  return `slept ${seconds}s`;
});

// Fails until its `succeedOnAttempt`-th attempt; the service retries it with backoff.
worker.register("demo.flaky", ([succeedOnAttempt = 3], kwargs, ctx) => {
  if (ctx.attempt < succeedOnAttempt)
    throw new Error(`attempt ${ctx.attempt}: upstream not ready yet`);
  return `succeeded on attempt ${ctx.attempt}`;
});

// Always fails, without retrying.
worker.register("demo.fail", ([message = "failing on purpose"]) => {
  throw new JobError(message, { type: "DemoFailure", retry: false });
});

worker.register("demo.noop", () => null);

worker.register("demo.whoami", (args, kwargs, ctx) => ({
  worker: ctx.worker,
  attempt: ctx.attempt,
  runtime: "node",
}));

export { Cancelled }; // for tasks modules that copy this file as a template

// Exit explicitly: after a cold shutdown abandoned handlers may still hold timers.
process.exit(await worker.run());

// A direct AMQP worker: `node amqp.js`. Jobs arrive from RabbitMQ; leases, heartbeats and
// results go over HTTP (docs/protocol.md, "AMQP protocol"). The service must run with
// CELERIAC_BROKER_URL=amqp://…
//
// A message is a wake-up carrying a job id. The worker claims the job (POST /leases/claim:
// SQL grants the lease and its fencing token), runs it while heartbeating, reports it, and
// only then acks the message: unacked messages are the jobs in hand, so the channel's
// prefetch is the worker's concurrency. A claim that grants nothing (leased elsewhere,
// finished, a duplicate) is acked and dropped; SQL publishes the job again if it must run.
//
// Environment: CELERIAC_SERVER_URL (default http://127.0.0.1:8000), CELERIAC_API_KEY,
// CELERIAC_AMQP_URL (default amqp://guest:guest@127.0.0.1:5672/%2F), CELERIAC_AMQP_PREFIX
// (default celeriac), CELERIAC_AMQP_QUORUM (true if the service declares quorum queues),
// CELERIAC_QUEUES (comma-separated, default "default"), CELERIAC_CONCURRENCY (default 10),
// CELERIAC_LEASE_SECONDS (default 30), CELERIAC_WORKER_NAME.

import os from "node:os";
import amqplib from "amqplib";
import { HttpApi } from "./http.js";

const env = process.env;
const settings = {
  amqpUrl: env.CELERIAC_AMQP_URL || "amqp://guest:guest@127.0.0.1:5672/%2F",
  prefix: env.CELERIAC_AMQP_PREFIX || "celeriac",
  quorum: ["1", "true", "yes"].includes((env.CELERIAC_AMQP_QUORUM || "").toLowerCase()),
  queues: (env.CELERIAC_QUEUES || "default").split(",").map((q) => q.trim()),
  concurrency: Number(env.CELERIAC_CONCURRENCY || 10),
  leaseSeconds: Number(env.CELERIAC_LEASE_SECONDS || 30),
  worker: env.CELERIAC_WORKER_NAME || `node-amqp-${process.pid}@${os.hostname()}`,
};
const api = new HttpApi();
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Sleep `ms`, or less if `signal` aborts first. */
function pause(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(done, ms);
    signal.addEventListener("abort", done, { once: true });
    function done() {
      clearTimeout(timer);
      signal.removeEventListener("abort", done);
      resolve();
    }
  });
}
const log = (...parts) => console.log(new Date().toISOString(), ...parts);

// The tasks this worker runs: name -> function(args, kwargs, job).
const tasks = {
  "math.add": ([x, y]) => x + y,
  "text.shout": async ([text]) => {
    await sleep(50);
    return `${text.toUpperCase()}!`;
  },
  "demo.sleep": async ([seconds = 1]) => {
    await sleep(seconds * 1000);
    return `slept ${seconds}s`;
  },
};

/** Run one job's task; the report to send (without id and token). */
async function execute(job) {
  const task = tasks[job.task];
  if (!task) {
    const error = { type: "UnknownTask", message: `no task named ${JSON.stringify(job.task)}` };
    return { outcome: "failed", error, retry: false };
  }
  try {
    return { outcome: "succeeded", result: (await task(job.args, job.kwargs, job)) ?? null };
  } catch (err) {
    const error = { type: err?.name || "Error", message: String(err?.message ?? err) };
    if (err?.stack) error.traceback = String(err.stack);
    return { outcome: "failed", error };
  }
}

/** Extend the lease every third of it until `stop` is aborted. */
async function heartbeat(job, stop) {
  const ref = { id: job.id, token: job.lease.token };
  while (!stop.aborted) {
    await pause((settings.leaseSeconds * 1000) / 3, stop);
    if (stop.aborted) return;
    try {
      const body = { leases: [ref], lease_seconds: settings.leaseSeconds };
      const [answer] = (await api.request("POST", "/leases/heartbeat", { body })).leases;
      if (!answer.ok) return log(`lost the lease of ${job.id}: ${answer.detail}`);
    } catch (err) {
      log(`heartbeat of ${job.id} failed: ${err.message}`); // the lease has slack: go on
    }
  }
}

/** Report with retries: the lease outlives a short outage of the service. */
async function report(job, outcome) {
  const body = { reports: [{ ...outcome, id: job.id, token: job.lease.token }] };
  for (const delay of [500, 1000, 2000, 4000, 8000]) {
    try {
      return await api.request("POST", "/leases/report", { body });
    } catch (err) {
      if (!err.retryable) throw err;
      log(`report of ${job.id} failed (${err.message}); retrying`);
      await sleep(delay);
    }
  }
}

async function runJob(job) {
  const stop = new AbortController();
  const beating = heartbeat(job, stop.signal);
  let outcome;
  try {
    outcome = await execute(job);
  } finally {
    stop.abort();
  }
  await report(job, outcome);
  await beating.catch(() => {});
  log(`${job.task} ${job.id}: ${outcome.outcome}`);
}

let inHand = 0;
let stopping = false;

async function onMessage(channel, message) {
  if (message === null) return; // the consumer was cancelled (queue deleted): recovery re-consumes
  inHand += 1;
  const id = message.content.toString();
  try {
    const body = { worker: settings.worker, ids: [id], lease_seconds: settings.leaseSeconds };
    const { jobs } = await api.request("POST", "/leases/claim", { body });
    for (const job of jobs) await runJob(job);
    channel.ack(message); // after the report, or at once when there was nothing to claim
  } catch (err) {
    log(`job ${id}: ${err.message}; giving the message back`);
    await sleep(1000);
    try {
      channel.nack(message, false, true);
    } catch {} // the channel is gone: RabbitMQ has requeued the message already
  } finally {
    inHand -= 1;
  }
}

async function main() {
  const consumers = [];
  const connection = await amqplib.connect(settings.amqpUrl, {
    recovery: {
      initialDelay: 200,
      maxDelay: 10_000,
      // After every (re)connect: a channel, its prefetch, the queues and the consumers.
      async setup(model) {
        const channel = await model.createChannel();
        await channel.prefetch(settings.concurrency);
        const args = settings.quorum ? { "x-queue-type": "quorum" } : { "x-max-priority": 10 };
        consumers.length = 0;
        for (const queue of settings.queues) {
          const name = `${settings.prefix}.${queue}`;
          await channel.assertQueue(name, { durable: true, arguments: args });
          const { consumerTag } = await channel.consume(name, (m) => onMessage(channel, m));
          consumers.push({ channel, consumerTag });
        }
        log(`${settings.worker} consuming ${settings.queues.join(", ")} from RabbitMQ`);
      },
    },
  });
  connection.on("disconnect", (err) => log(`RabbitMQ connection lost: ${err?.message}`));

  const shutdown = async () => {
    if (stopping) return process.exit(1); // a second signal: cold
    stopping = true;
    log("stopping: finishing the jobs in hand");
    for (const { channel, consumerTag } of consumers) {
      await channel.cancel(consumerTag).catch(() => {});
    }
    while (inHand > 0) await sleep(50);
    await connection.close().catch(() => {});
    process.exit(0);
  };
  process.on("SIGTERM", shutdown);
  process.on("SIGINT", shutdown);
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});

// A direct AMQP worker: `node amqp.js`. Jobs arrive from RabbitMQ; leases, heartbeats and
// results go over HTTP (docs/protocol.md, "AMQP protocol"). The service must run with
// CELERIAC_BROKER_URL=amqp://…
//
// A message is a wake-up carrying a job id. The worker claims the job (POST /leases/claim:
// SQL grants the lease and its fencing token), runs it while heartbeating, reports it, and
// only then acks the message: unacked messages are the jobs in hand, so the channel's
// prefetch is the worker's concurrency. A claim that grants nothing (leased elsewhere,
// finished, a duplicate) is acked and dropped; SQL publishes the job again if it must run.
// Claims, reports and heartbeats are batched like the HTTP worker's.
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

// Three loops share the work, each batching what piled up while its last call was in
// flight: claims, reports, and one heartbeat call for every job in hand.
const inbox = []; // [{channel, message}] delivered, not yet claimed
const outbox = []; // [{report, channel, message}] finished, not yet reported
const held = new Map(); // job id -> {id, token}: what to heartbeat
let inHand = 0; // messages not yet acked or nacked
let stopping = false;
const wakeups = { claim: null, report: null };

function wake(name) {
  wakeups[name]?.();
  wakeups[name] = null;
}

/** Resolve when `list` has something, or at once if it has. */
function whenAny(list, name) {
  return list.length ? Promise.resolve() : new Promise((resolve) => (wakeups[name] = resolve));
}

function settle({ channel, message }, requeue = false) {
  try {
    if (requeue) channel.nack(message, false, true);
    else channel.ack(message);
  } catch {} // the channel is gone: RabbitMQ has requeued the message already
  inHand -= 1;
}

async function claimLoop() {
  for (;;) {
    await whenAny(inbox, "claim");
    const batch = inbox.splice(0, 1000);
    const ids = batch.map(({ message }) => message.content.toString());
    let jobs;
    try {
      const body = { worker: settings.worker, ids, lease_seconds: settings.leaseSeconds };
      ({ jobs } = await api.request("POST", "/leases/claim", { body }));
    } catch (err) {
      log(`claim failed (${err.message}); requeueing ${batch.length} messages`);
      await sleep(1000);
      batch.forEach((delivery) => settle(delivery, true));
      continue;
    }
    const granted = new Map(jobs.map((job) => [job.id, job]));
    batch.forEach((delivery, i) => {
      const job = granted.get(ids[i]);
      granted.delete(ids[i]); // a duplicate in the same batch gets nothing
      if (!job) return settle(delivery); // leased elsewhere, finished, or a duplicate
      held.set(job.id, { id: job.id, token: job.lease.token });
      execute(job).then((report) => {
        outbox.push({ ...delivery, report: { ...report, id: job.id, token: job.lease.token } });
        wake("report");
      });
    });
  }
}

async function reportLoop() {
  for (;;) {
    await whenAny(outbox, "report");
    const batch = outbox.splice(0, 1000);
    await report(batch.map(({ report }) => report));
    for (const delivery of batch) {
      held.delete(delivery.report.id);
      settle(delivery); // ack only once the report was answered
      log(`${delivery.report.id}: ${delivery.report.outcome}`);
    }
  }
}

/** Report with retries: the leases outlive a short outage of the service. */
async function report(reports) {
  for (const delay of [500, 1000, 2000, 4000, 8000, 16000]) {
    try {
      return await api.request("POST", "/leases/report", { body: { reports } });
    } catch (err) {
      if (!err.retryable) return log(`reports refused: ${err.message}`);
      log(`reports failed (${err.message}); retrying`);
      await sleep(delay);
    }
  }
}

async function heartbeatLoop() {
  for (;;) {
    await sleep((settings.leaseSeconds * 1000) / 3);
    const leases = [...held.values()].slice(0, 1000);
    if (!leases.length) continue;
    try {
      const body = { leases, lease_seconds: settings.leaseSeconds };
      for (const answer of (await api.request("POST", "/leases/heartbeat", { body })).leases) {
        if (!answer.ok) {
          held.delete(answer.id); // its report will be refused: nothing more to do
          log(`lost the lease of ${answer.id}: ${answer.detail}`);
        }
      }
    } catch (err) {
      log(`heartbeat failed: ${err.message}`); // the leases have slack: next tick
    }
  }
}

function onMessage(channel, message) {
  if (message === null) return; // the consumer was cancelled (queue deleted): recovery re-consumes
  inHand += 1;
  inbox.push({ channel, message });
  wake("claim");
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
  claimLoop();
  reportLoop();
  heartbeatLoop();
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});

// Fencing from a worker's side: lease a job, let the lease expire, lease it again, then
// report with the first (stale) token through every call. Prints one JSON line.
import { HttpTransport } from "../../workers/node/celeriac.js";

const transport = new HttpTransport(); // CELERIAC_SERVER_URL
const queue = process.env.TEST_QUEUE;
const lease = (leaseSeconds) =>
  transport.lease({ worker: "stale-test", queues: [queue], maxJobs: 1, wait: 5, leaseSeconds });

const [first] = await lease(0.5);
// No heartbeat: the lease expires, the service requeues the job, and we lease it again.
let second;
while (!second) [second] = await lease(30);

const stale = { id: first.id, token: first.lease.token };
const current = { id: second.id, token: second.lease.token };
const out = { sameJob: first.id === second.id, tokensDiffer: stale.token !== current.token };
try {
  const body = { token: stale.token, result: "stale" };
  await transport.api.request("POST", `/jobs/${stale.id}/complete`, { body });
  out.complete = "accepted";
} catch (err) {
  out.complete = { status: err.status, type: err.problem.type };
}
out.heartbeat = await transport.heartbeat([stale]);
out.report = await transport.report([
  JSON.stringify({ ...stale, outcome: "succeeded", result: "stale" }),
]);
out.current = await transport.report([
  JSON.stringify({ ...current, outcome: "succeeded", result: "current" }),
]);
console.log(JSON.stringify(out));

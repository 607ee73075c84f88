// A worker whose lease is lost: the handler blocks the event loop (so no heartbeat goes
// out) until the test has taken the job over and touched TEST_RELEASE_FILE. Prints the
// answer to the worker's report, and its stats, as one JSON line.
import { existsSync } from "node:fs";
import { Worker } from "../../workers/node/celeriac.js";

const worker = new Worker({
  queues: [process.env.TEST_QUEUE],
  concurrency: 1,
  leaseSeconds: 1,
  pollWait: 1,
  logLevel: "error",
});
worker.register("node.block", () => {
  while (!existsSync(process.env.TEST_RELEASE_FILE)) {
    // busy: nothing else runs in this process, heartbeats included
  }
  return "from node";
});
const answers = [];
worker.on("report", (answer) => {
  answers.push(answer);
  worker.stop();
});
const code = await worker.run({ signals: false });
console.log(JSON.stringify({ code, answers, stats: worker.stats }));

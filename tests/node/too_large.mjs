// Two jobs reported in one batch, one with a result the service refuses (413). Prints the
// worker's stats as one JSON line once both reports are acknowledged.
import { Worker } from "../../workers/node/celeriac.js";

const worker = new Worker({
  queues: [process.env.TEST_QUEUE],
  concurrency: 4,
  pollWait: 1,
  logLevel: "error",
});
worker.register("node.big", () => "x".repeat(10_000));
worker.register("node.small", () => "ok");
let acknowledged = 0;
worker.on("report", () => {
  if (++acknowledged === 2) worker.stop();
});
await worker.run({ signals: false });
console.log(JSON.stringify({ stats: worker.stats }));

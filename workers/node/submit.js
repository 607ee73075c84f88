// A producer: submit a job and wait for its result.
//
//   node submit.js math.add 2 3                  # args are JSON where they parse: [2, 3]
//   node submit.js demo.slow 3 6 --queue default --no-wait
//   node submit.js demo.noop --count 1000        # one POST /jobs/batch per 1000 jobs
//
// Environment: CELERIAC_SERVER_URL (default http://127.0.0.1:8000), CELERIAC_API_KEY
// (a key with the submit and read scopes).

import { parseArgs } from "node:util";
import { Client } from "./celeriac.js";

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    queue: { type: "string", default: "default" },
    count: { type: "string", default: "1" },
    "max-retries": { type: "string" },
    "no-wait": { type: "boolean", default: false },
    timeout: { type: "string", default: "60" },
  },
});
const [task, ...rest] = positionals;
if (!task) {
  console.error("usage: node submit.js TASK [ARG ...] [--queue Q] [--count N] [--no-wait]");
  process.exit(2);
}
const parse = (text) => {
  try {
    return JSON.parse(text);
  } catch {
    return text; // a bare word is a string
  }
};
const options = { args: rest.map(parse), queue: values.queue };
if (values["max-retries"] !== undefined) options.max_retries = Number(values["max-retries"]);

const client = new Client();
try {
  const count = Number(values.count);
  if (count > 1) {
    for (let submitted = 0; submitted < count; submitted += 1000) {
      const size = Math.min(1000, count - submitted);
      await client.submitBatch(Array.from({ length: size }, () => ({ task, ...options })));
    }
    console.log(`submitted ${count} ${task} jobs to queue ${values.queue}`);
  } else {
    const job = await client.submit(task, options);
    console.error(`submitted ${job.id} (${job.status})`);
    if (!values["no-wait"]) {
      const done = await client.waitFor(job.id, Number(values.timeout));
      const { id, status, result, error } = done;
      console.log(JSON.stringify({ id, status, result, error }));
      process.exitCode = status === "succeeded" ? 0 : 1;
    }
  }
} catch (err) {
  console.error(err.message); // e.g. "POST /jobs -> 422 The request body is not valid: …"
  process.exitCode = 2;
}

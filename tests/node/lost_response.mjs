// A producer through a proxy that loses answers (tests/test_client_retry.py): one submit
// whose first answer is lost, then one batch whose answer is lost. Prints one JSON line.
import { Client } from "../../workers/node/celeriac.js";

const client = new Client(); // CELERIAC_SERVER_URL: the proxy
const queue = process.env.TEST_QUEUE;
const out = {};
const job = await client.submit("tests.noop", { args: [1], queue });
out.submitted = job.id;
try {
  await client.submitBatch([
    { task: "tests.noop", queue },
    { task: "tests.noop", queue },
  ]);
  out.batch = "answered";
} catch (err) {
  out.batch = { status: err.status ?? null, code: err.code ?? null, notSent: err.notSent };
}
const off = new Client({ retries: 0 });
try {
  await off.submit("tests.noop", { queue });
  out.off = "answered";
} catch (err) {
  out.off = { status: err.status ?? null, code: err.code ?? null };
}
console.log(JSON.stringify(out));

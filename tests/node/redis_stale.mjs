// Speak the Redis worker protocol by hand. MODE=lease: lease one job with a 300 ms lease
// and print it. MODE=complete: report JOB_ID done with TOKEN; print {"error": …} or OK.
import { createClient } from "../../workers/node/redis.js";

const { REDIS_URL, TAG, QUEUE, MODE, JOB_ID, TOKEN } = process.env;
const client = createClient({ url: REDIS_URL });
await client.connect();
const events = `${TAG}:events`;
if (MODE === "lease") {
  const call = [
    "FCALL",
    "celeriac_v1_lease",
    "2",
    events,
    `${TAG}:ready:${QUEUE}`,
    "1",
  ];
  const [text] = await client.sendCommand([...call, "node-stale", "1", "300"]);
  console.log(text);
} else {
  const job = `${TAG}:job:${JOB_ID}`;
  const call = [
    "FCALL",
    "celeriac_v1_complete",
    "2",
    events,
    job,
    "1",
    JOB_ID,
    TOKEN,
    "3",
  ];
  try {
    console.log(
      JSON.stringify({ answer: String(await client.sendCommand(call)) }),
    );
  } catch (err) {
    console.log(JSON.stringify({ error: String(err.message ?? err) }));
  }
}
await client.quit();

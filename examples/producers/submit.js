// Submit a job over HTTP with Node's built-in fetch, and wait for its result.
//
//   node submit.js math.add '[2, 3]'            # TASK [ARGS-JSON [QUEUE]]
//
// CELERIAC_SERVER_URL (default http://127.0.0.1:8000); CELERIAC_API_KEY, a key with the
// submit and read scopes, if the service has keys. No dependencies, no imports: it runs
// as a CommonJS script or an ES module alike.

const server = process.env.CELERIAC_SERVER_URL || "http://127.0.0.1:8000";
const headers = { "content-type": "application/json" };
if (process.env.CELERIAC_API_KEY) headers.authorization = `Bearer ${process.env.CELERIAC_API_KEY}`;

async function call(method, path, body) {
  const response = await fetch(server + path, {
    method,
    headers,
    body: body && JSON.stringify(body),
  });
  const answer = await response.json();
  // Errors are application/problem+json: {type, title, status, detail}.
  if (!response.ok)
    throw new Error(`${method} ${path}: ${response.status} ${answer.title}: ${answer.detail}`);
  return answer;
}

async function main() {
  const [task = "math.add", args = "[2, 3]", queue = "default"] = process.argv.slice(2);
  const job = await call("POST", "/jobs", { task, args: JSON.parse(args), queue, max_retries: 3 });
  console.error(`submitted ${job.id} (${job.status})`);
  // One long-poll: answered the moment the job finishes (or after 60 s with its state).
  const done = await call("GET", `/jobs/${job.id}?wait=60`);
  console.log(
    JSON.stringify({ id: done.id, status: done.status, result: done.result, error: done.error }),
  );
  process.exitCode = done.status === "succeeded" ? 0 : 1;
}

main().catch((err) => {
  console.error(err.message);
  process.exitCode = 2;
});

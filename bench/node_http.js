// Drain throughput of the reference Node.js worker over HTTP: submit N no-op jobs to a
// running service, then time one worker leasing, running and reporting all of them.
//
//   node bench/node_http.js --server http://127.0.0.1:8000 --jobs 20000 --concurrency 1000
//
// Prints one JSON line. Uses only the worker library (workers/node, no dependencies),
// loaded with dynamic import(): no static imports, so it runs as CommonJS or ES module.

async function main() {
  const { parseArgs } = await import("node:util");
  const path = await import("node:path");
  const { pathToFileURL } = await import("node:url");
  const { values } = parseArgs({
    options: {
      server: {
        type: "string",
        default: process.env.CELERIAC_SERVER_URL || "http://127.0.0.1:8000",
      },
      jobs: { type: "string", default: "20000" },
      concurrency: { type: "string", default: "1000" },
      queue: { type: "string", default: `bench_${process.pid}_${Date.now()}` },
    },
  });
  const here = path.dirname(path.resolve(process.argv[1]));
  const library = pathToFileURL(path.join(here, "..", "workers", "node", "celeriac.js"));
  const { Client, Worker } = await import(library.href);
  const total = Number(values.jobs);
  const client = new Client({ server: values.server });

  const submitStart = performance.now();
  const specs = Array.from({ length: 1000 }, () => ({ task: "bench.noop", queue: values.queue }));
  for (let sent = 0; sent < total; sent += 1000) {
    await client.submitBatch(specs.slice(0, Math.min(1000, total - sent)));
  }
  const submitSeconds = (performance.now() - submitStart) / 1000;

  const worker = new Worker({
    server: values.server,
    queues: [values.queue],
    concurrency: Number(values.concurrency),
    pollWait: 1,
    logLevel: "warn",
  });
  worker.register("bench.noop", () => null);
  let done = 0;
  let refused = 0;
  const start = performance.now();
  worker.on("report", (answer) => {
    if (!answer.ok) refused++;
    if (++done === total) worker.stop();
  });
  await worker.run({ signals: false });
  const seconds = (performance.now() - start) / 1000;
  console.log(
    JSON.stringify({
      scenario: "node_http_drain",
      jobs: total,
      concurrency: Number(values.concurrency),
      submit_jobs_per_s: Math.round(total / submitSeconds),
      drain_seconds: Number(seconds.toFixed(3)),
      drain_jobs_per_s: Math.round(total / seconds),
      refused,
      stats: worker.stats,
    }),
  );
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});

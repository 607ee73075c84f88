// Drain throughput of the reference Node.js worker over HTTP: submit N no-op jobs to a
// running service, then time one worker leasing, running and reporting all of them.
//
//   node bench/node_http.js --server http://127.0.0.1:8000 --jobs 20000 --concurrency 1000
//   node bench/node_http.js --raw ...    # the same drain with bare lease/report calls, one
//                                        # batch at a time: the service's own ceiling
//   --service-pid PID                    # (Linux) also report the CPU seconds the service
//                                        # process spent: on a shared machine, jobs per
//                                        # service CPU second is the steadier figure
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
      raw: { type: "boolean", default: false },
      "service-pid": { type: "string" },
    },
  });
  const here = path.dirname(path.resolve(process.argv[1]));
  const library = pathToFileURL(path.join(here, "..", "workers", "node", "celeriac.js"));
  const { Client, HttpTransport, Worker } = await import(library.href);
  const total = Number(values.jobs);
  const concurrency = Number(values.concurrency);
  const client = new Client({ server: values.server });

  const submitStart = performance.now();
  const specs = Array.from({ length: 1000 }, () => ({ task: "bench.noop", queue: values.queue }));
  for (let sent = 0; sent < total; sent += 1000) {
    await client.submitBatch(specs.slice(0, Math.min(1000, total - sent)));
  }
  const submitSeconds = (performance.now() - submitStart) / 1000;

  const { readFile } = await import("node:fs/promises");
  // utime + stime of a process, in seconds (fields 14 and 15 of /proc/PID/stat, in ticks
  // of 1/100 s on Linux).
  const serviceCpu = async () => {
    if (!values["service-pid"]) return 0;
    const stat = await readFile(`/proc/${values["service-pid"]}/stat`, "utf8");
    const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    return (Number(fields[11]) + Number(fields[12])) / 100;
  };
  const serviceStart = await serviceCpu();
  const start = performance.now();
  const cpuStart = process.cpuUsage();
  const outcome = values.raw
    ? await drainRaw(new HttpTransport({ server: values.server }), values.queue, total, concurrency)
    : await drainWithWorker(Worker, values.server, values.queue, total, concurrency);
  const seconds = (performance.now() - start) / 1000;
  const cpu = process.cpuUsage(cpuStart);
  const serviceSeconds = (await serviceCpu()) - serviceStart;
  console.log(
    JSON.stringify({
      scenario: values.raw ? "raw_http_drain" : "node_http_drain",
      jobs: total,
      concurrency,
      submit_jobs_per_s: Math.round(total / submitSeconds),
      drain_seconds: Number(seconds.toFixed(3)),
      drain_jobs_per_s: Math.round(total / seconds),
      node_cpu_seconds: Number(((cpu.user + cpu.system) / 1e6).toFixed(2)),
      ...(serviceSeconds && {
        service_cpu_seconds: Number(serviceSeconds.toFixed(2)),
        jobs_per_service_cpu_second: Math.round(total / serviceSeconds),
      }),
      ...outcome,
    }),
  );
}

async function drainWithWorker(Worker, server, queue, total, concurrency) {
  const worker = new Worker({
    server,
    queues: [queue],
    concurrency,
    pollWait: 1,
    logLevel: "warn",
  });
  worker.register("bench.noop", () => null);
  let done = 0;
  let refused = 0;
  worker.on("report", (answer) => {
    if (!answer.ok) refused++;
    if (++done === total) worker.stop();
  });
  await worker.run({ signals: false });
  return { refused, stats: worker.stats };
}

async function drainRaw(transport, queue, total, batch) {
  let done = 0;
  let refused = 0;
  while (done < total) {
    const maxJobs = Math.min(batch, 1000);
    const jobs = await transport.lease({ worker: "bench-raw", queues: [queue], maxJobs, wait: 1 });
    if (jobs.length === 0) break;
    const reports = jobs.map((job) =>
      JSON.stringify({ id: job.id, token: job.lease.token, outcome: "succeeded", result: null }),
    );
    for (const answer of await transport.report(reports)) if (!answer.ok) refused++;
    done += jobs.length;
  }
  return { refused, stats: { succeeded: done - refused } };
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});

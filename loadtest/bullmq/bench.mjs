// BullMQ's side of loadtest/bench_peers.py: the same workloads against BullMQ on a
// Redis the Python script started. Prints one JSON object on stdout.
//   node bench.mjs <redis-port> <n-seq> <n-batches> <n-drain> <payload-bytes>
import { Queue, Worker } from "bullmq";

const [port, nSeq, nBatches, nDrain, size] = process.argv.slice(2).map(Number);
const connection = { host: "127.0.0.1", port };
const data = { type: "user_registration", userId: "12345", email: "user@example.com", pad: "" };
data.pad = "x".repeat(Math.max(0, size - JSON.stringify(data).length));
const opts = { removeOnComplete: true, removeOnFail: true };

function pct(sorted, q) {
  return sorted.length ? sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))] : null;
}

async function sequential(queue, n) {
  const lat = [];
  const t0 = process.hrtime.bigint();
  for (let i = 0; i < n; i++) {
    const s = process.hrtime.bigint();
    await queue.add("job", data, opts);
    lat.push(Number(process.hrtime.bigint() - s) / 1000);
  }
  const secs = Number(process.hrtime.bigint() - t0) / 1e9;
  lat.sort((a, b) => a - b);
  return { rate: n / secs, p50_us: pct(lat, 0.5), p99_us: pct(lat, 0.99) };
}

async function batches(queue, k) {
  const jobs = Array.from({ length: 1000 }, () => ({ name: "job", data, opts }));
  const t0 = process.hrtime.bigint();
  for (let i = 0; i < k; i++) await queue.addBulk(jobs);
  return { rate: (k * 1000) / (Number(process.hrtime.bigint() - t0) / 1e9) };
}

async function concurrent(queue, producers, total) {
  const per = Math.floor(total / producers);
  const t0 = process.hrtime.bigint();
  await Promise.all(Array.from({ length: producers }, async () => {
    for (let i = 0; i < per; i++) await queue.add("job", data, opts);
  }));
  return { rate: (per * producers) / (Number(process.hrtime.bigint() - t0) / 1e9) };
}

async function drain(name, n) {
  const queue = new Queue(name, { connection });
  const jobs = Array.from({ length: 1000 }, () => ({ name: "job", data, opts }));
  for (let i = 0; i < n / 1000; i++) await queue.addBulk(jobs);
  let done = 0;
  let t0;
  const finished = new Promise((resolve) => {
    const worker = new Worker(name, async () => null, { connection, concurrency: 50 });
    worker.on("completed", () => {
      if (done === 0) t0 = process.hrtime.bigint();
      done += 1;
      if (done === n) { resolve(worker); }
    });
  });
  const worker = await finished;
  const secs = Number(process.hrtime.bigint() - t0) / 1e9;
  await worker.close();
  await queue.close();
  return { rate: n / secs };
}

const queue = new Queue("bench", { connection });
const out = {};
out.sequential = await sequential(queue, nSeq);
out.batch = await batches(queue, nBatches);
out.concurrent10 = await concurrent(queue, 10, nSeq);
out.concurrent50 = await concurrent(queue, 50, nSeq);
await queue.obliterate({ force: true });
await queue.close();
out.drain = await drain("drain", nDrain);
console.log(JSON.stringify(out));
process.exit(0);
